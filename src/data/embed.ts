import type { FrozenModel } from '../engine/types.js';
import { sha256 } from '../io/hash.js';
import { nonNegativeInteger, positiveInteger } from '../util/is.js';
import type { CacheNamespace, EmbeddingCache } from './cache.js';
import {
  DEFAULT_MAX_BYTES,
  DEFAULT_MAX_PIXELS,
  decodeImage,
  mapConcurrent,
  readImageFile,
  toModelInput,
} from './decode.js';
import { DecodePool } from './decode-pool.js';

/** A file that could not be used, and why. */
export interface SkippedFile {
  readonly path: string;
  readonly reason: string;
}

export interface EmbedProgress {
  /** Files handled so far (embedded, cached or skipped). */
  readonly done: number;
  readonly total: number;
  readonly skipped: number;
  /** Files answered by the cache so far. */
  readonly cached: number;
}

export interface EmbedOptions {
  /** Images per engine call. Default 16. */
  batchSize?: number;
  /** Images in flight (read, hashed, decoded) at once. Default EMBED_CONCURRENCY (8). */
  concurrency?: number;
  /** Largest accepted input size in pixels (width × height). */
  maxPixels?: number;
  /** Largest file read, in bytes; larger files are skipped unread. Default DEFAULT_MAX_BYTES (256 MiB). */
  maxBytes?: number;
  /**
   * Worker threads that decode, resize and convert images (DecodePool), so the engine's
   * thread only reads files and runs batches; 0 does that work on the calling thread.
   * Not used with `transform`. Default DEFAULT_DECODE_WORKERS.
   */
  decodeWorkers?: number;
  onProgress?: (p: EmbedProgress) => void;
  /**
   * Changes the decoded pixels before the engine sees them (augmentation). `key` is the
   * sha256 of the file's bytes, so a transform seeded by it repeats for the same image
   * wherever it sits in a list.
   */
  transform?: (pixels: Uint8Array, key: string, size: number) => Uint8Array;
  /** Outputs on disk, by image content: hits skip decoding and the engine. */
  cache?: { readonly store: EmbeddingCache; readonly namespace: CacheNamespace } | null;
}

export interface EmbedResult {
  /** One row of `outputSize` floats per file that was used, in input order. */
  readonly features: Float32Array;
  /** Index in the input list of each row of `features` (ascending). */
  readonly rows: readonly number[];
  readonly skipped: readonly SkippedFile[];
  readonly outputSize: number;
  /** Rows that came from the cache. */
  readonly cached: number;
  /** The engine that ran, or null when every row came from the cache. */
  readonly engine: string | null;
}

/**
 * Images in flight while embedding. More than the libuv pool's 4 threads pays off here
 * because ONNX Runtime runs a batch on the main thread: decodes queued beforehand keep
 * the pool busy meanwhile (sample set, 2 cores: 8 in flight ~170 images/s, 4 ~158).
 */
export const EMBED_CONCURRENCY = 8;

/**
 * Decode workers of `embedFiles` (started at the first cache miss, ended when it returns).
 * 0: on a loaded 2-core machine one worker measured no faster than the calling thread
 * (cold embedding 0.72–0.78 of the engine alone against 0.86–0.89), since ONNX Runtime
 * already keeps both cores busy.
 */
export const DEFAULT_DECODE_WORKERS = 0;

// Raw 0–255 pixels: every backbone carries its own normalisation as its first layer.
const RAW = { mean: [0, 0, 0], std: [1 / 255, 1 / 255, 1 / 255] } as const;

/** A frozen model made only when the first cache miss needs it (a warm cache never loads an engine). */
export interface LazyFrozenModel {
  readonly inputSize: number;
  readonly outputSize: number;
  open(): Promise<FrozenModel>;
}

type Prepared =
  | { readonly kind: 'hit'; readonly values: Float32Array }
  | { readonly kind: 'pixels'; readonly pixels: Uint8Array; readonly key: string }
  /** Decoded by a worker into `slot` of the staging buffer, in the model's layout. */
  | { readonly kind: 'staged'; readonly slot: number; readonly key: string }
  | { readonly kind: 'skip'; readonly reason: string };

/**
 * Slots of a shared buffer that decode workers write images into, handed out and taken
 * back; `acquire` waits while every slot is taken.
 */
class Slots {
  private readonly free: number[];
  private readonly waiting: ((slot: number) => void)[] = [];
  constructor(count: number) {
    this.free = Array.from({ length: count }, (_, i) => count - 1 - i);
  }
  acquire(): Promise<number> {
    const slot = this.free.pop();
    if (slot !== undefined) return Promise.resolve(slot);
    return new Promise((resolve) => this.waiting.push(resolve));
  }
  release(slot: number): void {
    const next = this.waiting.shift();
    if (next) next(slot);
    else this.free.push(slot);
  }
}

/**
 * Decodes files and runs them through a frozen model in streamed batches: the next
 * batch decodes while the engine runs the current one, and only the outputs are kept,
 * so memory does not grow with the number of images beyond one row each. With a cache,
 * a file whose bytes were seen before (same namespace) is neither decoded nor run, and
 * each batch's outputs are stored as soon as they exist, so an interrupted run loses at
 * most the batch in flight. Files that cannot be used (not a regular file, over
 * `maxBytes`, not decodable) are skipped and listed, never thrown. When a batch fails (the
 * engine, a cache write), the work in flight settles before the error is thrown: nothing
 * is left running, and no rejection goes unhandled.
 */
export async function embedFiles(
  files: readonly string[],
  source: FrozenModel | LazyFrozenModel,
  options: EmbedOptions = {},
): Promise<EmbedResult> {
  const batchSize = options.batchSize ?? 16;
  const maxBytes = positiveInteger('maxBytes', options.maxBytes ?? DEFAULT_MAX_BYTES);
  const size = source.inputSize;
  const width = source.outputSize;
  const concurrency = positiveInteger('concurrency', options.concurrency ?? EMBED_CONCURRENCY);
  const workers = options.transform
    ? 0
    : nonNegativeInteger('decodeWorkers', options.decodeWorkers ?? DEFAULT_DECODE_WORKERS);
  let model: FrozenModel | null = 'run' in source ? source : null;
  let opening: Promise<FrozenModel> | null = null;
  // Opened once, however many decodes ask for it at the same time.
  const engine = (): Promise<FrozenModel> => {
    opening ??= model
      ? Promise.resolve(model)
      : (source as LazyFrozenModel).open().then((m) => {
          model = m;
          return m;
        });
    return opening;
  };
  const imageLength = size * size * 3;
  const slots = new Float32Array(files.length * width);
  const ok = new Uint8Array(files.length);
  const skipped: SkippedFile[] = [];
  const cache = options.cache ?? null;
  // Two buffers: one being filled while the engine reads the other.
  const buffers = [
    new Float32Array(batchSize * imageLength),
    new Float32Array(batchSize * imageLength),
  ];
  let current = 0;
  let batch: { index: number; key: string }[] = [];
  // The batch the engine is running while the next one is decoded.
  let inFlight: Promise<void> | null = null;
  let done = 0;
  let cached = 0;
  const progress = (): void =>
    options.onProgress?.({ done, total: files.length, skipped: skipped.length, cached });

  const dispatch = (
    m: FrozenModel,
    buffer: Float32Array,
    items: { index: number; key: string }[],
  ): Promise<void> =>
    m.run(buffer, items.length).then(async (out) => {
      const puts: Promise<void>[] = [];
      items.forEach(({ index, key }, i) => {
        const row = out.subarray(i * width, (i + 1) * width);
        slots.set(row, index * width);
        ok[index] = 1;
        if (cache) puts.push(cache.store.put(cache.namespace, key, row.slice()));
      });
      // Every write settles before a failed one is reported, so none outlives the call.
      const failed = (await Promise.allSettled(puts)).find((r) => r.status === 'rejected');
      if (failed) throw failed.reason;
      done += items.length;
      progress();
    });

  const decodeOptions = {
    width: size,
    height: size,
    maxBytes,
    ...(options.maxPixels !== undefined ? { maxPixels: options.maxPixels } : {}),
  };
  // With workers: at most `concurrency` decodes in flight plus the one being placed in a
  // batch hold a staging slot (mapConcurrent's bound), so that many slots never wait.
  // Pool and staging buffer come with the first cache miss: a warm cache starts no worker.
  let pool: DecodePool | null = null;
  let staging: Float32Array | null = null;
  const free = new Slots(concurrency + 1);
  const stage = async (bytes: Buffer, key: string): Promise<Prepared> => {
    const m = await engine();
    pool ??= DecodePool.start(workers);
    staging ??= new Float32Array(new SharedArrayBuffer((concurrency + 1) * imageLength * 4));
    const slot = await free.acquire();
    try {
      const job = {
        size,
        maxPixels: options.maxPixels ?? DEFAULT_MAX_PIXELS,
        maxBytes,
        pre: RAW,
        layout: m.layout,
      };
      const r = await pool.decodeInto(bytes, job, staging, slot * imageLength);
      if (r.ok) return { kind: 'staged', slot, key };
      free.release(slot);
      return { kind: 'skip', reason: r.reason };
    } catch (err) {
      free.release(slot);
      throw err;
    }
  };
  const prepare = async (file: string): Promise<Prepared> => {
    const read = await readImageFile(file, maxBytes);
    if (!read.ok) return { kind: 'skip', reason: read.reason };
    const bytes = read.bytes;
    const key = sha256(bytes);
    if (cache) {
      const values = await cache.store.get(cache.namespace, key, width);
      if (values) return { kind: 'hit', values };
    }
    if (workers > 0) return stage(bytes, key);
    const decoded = await decodeImage(bytes, decodeOptions);
    if (!decoded.ok) return { kind: 'skip', reason: decoded.reason };
    return { kind: 'pixels', pixels: decoded.pixels, key };
  };

  let index = 0;
  try {
    for await (const item of mapConcurrent(files, concurrency, prepare)) {
      const i = index++;
      if (item.kind === 'skip') {
        skipped.push({ path: files[i]!, reason: item.reason });
        done++;
        progress();
        continue;
      }
      if (item.kind === 'hit') {
        slots.set(item.values, i * width);
        ok[i] = 1;
        cached++;
        done++;
        progress();
        continue;
      }
      const m = await engine();
      const at = batch.length * imageLength;
      if (item.kind === 'staged') {
        const from = item.slot * imageLength;
        buffers[current]!.set(staging!.subarray(from, from + imageLength), at);
        free.release(item.slot);
      } else {
        const pixels = options.transform
          ? options.transform(item.pixels, item.key, size)
          : item.pixels;
        toModelInput(pixels, RAW, m.layout, buffers[current]!, at);
      }
      batch.push({ index: i, key: item.key });
      if (batch.length === batchSize) {
        if (inFlight) await inFlight;
        inFlight = dispatch(m, buffers[current]!, batch);
        // Observed at once: if it fails while the next batch decodes, the failure waits for
        // the `await` above (or the catch below) instead of being an unhandled rejection,
        // which tfjs-wasm's process handler turns into a crash.
        inFlight.catch(() => {});
        current = 1 - current;
        batch = [];
      }
    }
    if (inFlight) await inFlight;
    if (batch.length) await dispatch(model!, buffers[current]!, batch);
  } catch (err) {
    // Leaving the loop above already waited for the decodes in flight; now the engine.
    if (inFlight) await inFlight.catch(() => {});
    throw err;
  } finally {
    await (pool as DecodePool | null)?.close();
  }

  const rows: number[] = [];
  for (let i = 0; i < files.length; i++) if (ok[i]) rows.push(i);
  // Compact in place: row r moves to position k ≤ r, so nothing is overwritten unread.
  rows.forEach((r, k) => {
    if (r !== k) slots.copyWithin(k * width, r * width, (r + 1) * width);
  });
  return {
    features: slots.subarray(0, rows.length * width),
    rows,
    skipped,
    outputSize: width,
    cached,
    engine: model?.engine ?? null,
  };
}
