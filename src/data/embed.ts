import type { FrozenModel } from '../engine/types.js';
import { sha256 } from '../io/hash.js';
import { positiveInteger } from '../util/is.js';
import type { CacheNamespace, EmbeddingCache } from './cache.js';
import {
  DEFAULT_MAX_BYTES,
  decodeRgb,
  mapConcurrent,
  readImageFile,
  toModelInput,
} from './decode.js';
import type { KeptPixels } from './pixel-store.js';
import { resizeRgbFast, resizeToModelInput } from './resize-wasm.js';

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
  onProgress?: (p: EmbedProgress) => void;
  /**
   * Changes the decoded pixels before the engine sees them (augmentation). `key` is the
   * sha256 of the file's bytes, so a transform seeded by it repeats for the same image
   * wherever it sits in a list.
   */
  transform?: (pixels: Uint8Array, key: string, size: number) => Uint8Array;
  /**
   * Decoded images kept from an earlier pass over the same list (by position): a kept image
   * is neither read nor decoded again, and each image decoded here is kept. With a cache,
   * a hit still skips the engine (the key is the one the image was kept with).
   */
  keep?: KeptPixels | null;
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
 * Images in flight while embedding. More than the libuv pool's 4 threads pays off when
 * ONNX Runtime runs a batch on the main thread (one session, as with `--threads 1`):
 * decodes queued beforehand keep the pool busy meanwhile (sample set, 2 cores: 8 in flight
 * ~170 images/s, 4 ~158).
 */
export const EMBED_CONCURRENCY = 8;

/**
 * Batches given to the engine at once. With one, a pool's workers each took half of a batch
 * and the first to finish waited for the other, which the decoding thread had slowed: on 2
 * cores the cold pass ran at 124–127 images/s against 140–144 with two (alternated, in
 * process, cache included); three were no faster.
 */
const IN_FLIGHT = 2;

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
  | {
      readonly kind: 'decoded';
      readonly rgb: Uint8Array;
      readonly width: number;
      readonly height: number;
      readonly key: string;
    }
  | { readonly kind: 'skip'; readonly reason: string };

/**
 * Decodes files and runs them through a frozen model in streamed batches: the next
 * batch decodes while the engine runs the current one, and only the outputs are kept,
 * so memory does not grow with the number of images beyond one row each. With a cache,
 * a file whose bytes were seen before (same namespace) is neither decoded nor run, and
 * each batch's outputs are stored (one write) as soon as they exist, while the engine runs
 * the next batches, so an interrupted run loses at most the batches in flight (those with
 * the engine, and one being written). Files that cannot be used (not a regular file, over
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
  let model: FrozenModel | null = 'run' in source ? source : null;
  const engine = async (): Promise<FrozenModel> => {
    model ??= await (source as LazyFrozenModel).open();
    return model;
  };
  const imageLength = size * size * 3;
  const slots = new Float32Array(files.length * width);
  const ok = new Uint8Array(files.length);
  const skipped: SkippedFile[] = [];
  const cache = options.cache ?? null;
  // The batches the engine has at once, and one buffer more, being filled meanwhile.
  const buffers = Array.from(
    { length: IN_FLIGHT + 1 },
    () => new Float32Array(batchSize * imageLength),
  );
  let current = 0;
  let batch: { index: number; key: string }[] = [];
  // The batches the engine is running while the next one is decoded, oldest first.
  const inFlight: Promise<void>[] = [];
  let done = 0;
  let cached = 0;
  const progress = (): void =>
    options.onProgress?.({ done, total: files.length, skipped: skipped.length, cached });

  // Each batch's cache write, settling while the engine runs the next batch: waiting for it
  // before the next dispatch left both engine threads idle for the write's duration.
  const writes: Promise<void>[] = [];
  const dispatch = (
    m: FrozenModel,
    buffer: Float32Array,
    items: { index: number; key: string }[],
  ): Promise<void> =>
    m.run(buffer, items.length).then((out) => {
      const rows = items.map(({ index, key }, i) => {
        const values = out.subarray(i * width, (i + 1) * width);
        slots.set(values, index * width);
        ok[index] = 1;
        return { key, values };
      });
      if (cache) {
        // One write for the batch; the rows are copied before putMany returns.
        const written = cache.store.putMany(cache.namespace, rows);
        written.catch(() => {}); // observed when awaited below, never unhandled
        writes.push(written);
      }
      done += items.length;
      progress();
    });
  /** Waits for the writes of all but the newest `keep` batches (throwing a failed one's error). */
  const settleWrites = async (keep: number): Promise<void> => {
    while (writes.length > keep) await writes.shift();
  };

  const decodeOptions = {
    maxBytes,
    ...(options.maxPixels !== undefined ? { maxPixels: options.maxPixels } : {}),
  };
  const keep = options.keep ?? null;
  const lookup = async (key: string): Promise<Prepared | null> => {
    const values = cache ? await cache.store.get(cache.namespace, key, width) : null;
    return values ? { kind: 'hit', values } : null;
  };
  const prepare = async (file: string, index: number): Promise<Prepared> => {
    const keptKey = keep?.key(index) ?? null;
    if (keptKey !== null) {
      const hit = await lookup(keptKey);
      if (hit) return hit;
      const pixels = await keep!.pixels(index);
      if (pixels) return { kind: 'pixels', pixels, key: keptKey };
    }
    const read = await readImageFile(file, maxBytes);
    if (!read.ok) return { kind: 'skip', reason: read.reason };
    const bytes = read.bytes;
    const key = sha256(bytes);
    const hit = await lookup(key);
    if (hit) return hit;
    const decoded = await decodeRgb(bytes, decodeOptions);
    if (!decoded.ok) return { kind: 'skip', reason: decoded.reason };
    const { rgb, width: w, height: h } = decoded;
    // An image no larger than the model's input waits for its batch as decoded, to be
    // resized straight into it; a larger one is resized now, so what waits stays small.
    if (!keep && !options.transform && rgb.length <= imageLength)
      return { kind: 'decoded', rgb, width: w, height: h, key };
    const pixels = resizeRgbFast(rgb, w, h, size, size);
    await keep?.put(index, key, pixels);
    return { kind: 'pixels', pixels, key };
  };

  let index = 0;
  try {
    for await (const item of mapConcurrent(
      files,
      options.concurrency ?? EMBED_CONCURRENCY,
      prepare,
    )) {
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
      if (item.kind === 'decoded') {
        resizeToModelInput(
          item.rgb,
          item.width,
          item.height,
          size,
          RAW,
          m.layout,
          buffers[current]!,
          at,
        );
      } else {
        const pixels = options.transform
          ? options.transform(item.pixels, item.key, size)
          : item.pixels;
        toModelInput(pixels, RAW, m.layout, buffers[current]!, at);
      }
      batch.push({ index: i, key: item.key });
      if (batch.length === batchSize) {
        if (inFlight.length >= IN_FLIGHT) await inFlight.shift();
        // At most one batch's write behind the engine, so a slow disk holds it up.
        await settleWrites(1);
        const running = dispatch(m, buffers[current]!, batch);
        // Observed at once: if it fails while the next batch decodes, the failure waits for
        // the `await` above (or the catch below) instead of being an unhandled rejection,
        // which tfjs-wasm's process handler turns into a crash.
        running.catch(() => {});
        inFlight.push(running);
        current = (current + 1) % buffers.length;
        batch = [];
      }
    }
    while (inFlight.length) await inFlight.shift();
    if (batch.length) await dispatch(model!, buffers[current]!, batch);
    await settleWrites(0);
  } catch (err) {
    // Leaving the loop above already waited for the decodes in flight; now the engine and
    // the cache writes.
    await Promise.allSettled(inFlight);
    await Promise.allSettled(writes);
    throw err;
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
