import type { FrozenModel } from '../engine/types.js';
import { DEFAULT_DECODE_CONCURRENCY, decodeImage, mapConcurrent, toModelInput } from './decode.js';

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
}

export interface EmbedOptions {
  /** Images per engine call. Default 16. */
  batchSize?: number;
  /** Images decoded at once. Default DEFAULT_DECODE_CONCURRENCY. */
  concurrency?: number;
  /** Largest accepted input size in pixels (width × height). */
  maxPixels?: number;
  onProgress?: (p: EmbedProgress) => void;
}

export interface EmbedResult {
  /** One row of `outputSize` floats per file that was used, in input order. */
  readonly features: Float32Array;
  /** Index in the input list of each row of `features`. */
  readonly rows: readonly number[];
  readonly skipped: readonly SkippedFile[];
  readonly outputSize: number;
}

// Raw 0–255 pixels: every backbone carries its own normalisation as its first layer.
const RAW = { mean: [0, 0, 0], std: [1 / 255, 1 / 255, 1 / 255] } as const;

/**
 * Decodes files and runs them through a frozen model in streamed batches: the next
 * batch decodes while the engine runs the current one, and only the outputs are kept,
 * so memory does not grow with the number of images. Files that cannot be decoded are
 * skipped and listed, never thrown.
 */
export async function embedFiles(
  files: readonly string[],
  model: FrozenModel,
  options: EmbedOptions = {},
): Promise<EmbedResult> {
  const batchSize = options.batchSize ?? 16;
  const size = model.inputSize;
  const imageLength = size * size * 3;
  const features = new Float32Array(files.length * model.outputSize);
  const rows: number[] = [];
  const skipped: SkippedFile[] = [];
  // Two buffers: one being filled while the engine reads the other.
  const buffers = [
    new Float32Array(batchSize * imageLength),
    new Float32Array(batchSize * imageLength),
  ];
  let current = 0;
  let batchRows: number[] = [];
  let inFlight: Promise<void> | null = null;
  let done = 0;

  const dispatch = (buffer: Float32Array, indices: number[]): Promise<void> =>
    model.run(buffer, indices.length).then((out) => {
      for (let i = 0; i < indices.length; i++) {
        features.set(
          out.subarray(i * model.outputSize, (i + 1) * model.outputSize),
          rows.length * model.outputSize,
        );
        rows.push(indices[i]!);
      }
      done += indices.length;
      options.onProgress?.({ done, total: files.length, skipped: skipped.length });
    });

  const decodeOptions = {
    width: size,
    height: size,
    ...(options.maxPixels !== undefined ? { maxPixels: options.maxPixels } : {}),
  };
  const decoded = mapConcurrent(files, options.concurrency ?? DEFAULT_DECODE_CONCURRENCY, (file) =>
    decodeImage(file, decodeOptions),
  );
  let index = 0;
  for await (const result of decoded) {
    const i = index++;
    if (!result.ok) {
      skipped.push({ path: files[i]!, reason: result.reason });
      done++;
      options.onProgress?.({ done, total: files.length, skipped: skipped.length });
      continue;
    }
    toModelInput(
      result.pixels,
      RAW,
      model.layout,
      buffers[current]!,
      batchRows.length * imageLength,
    );
    batchRows.push(i);
    if (batchRows.length === batchSize) {
      if (inFlight) await inFlight;
      inFlight = dispatch(buffers[current]!, batchRows);
      current = 1 - current;
      batchRows = [];
    }
  }
  if (inFlight) await inFlight;
  if (batchRows.length) await dispatch(buffers[current]!, batchRows);
  return {
    features: features.subarray(0, rows.length * model.outputSize),
    rows,
    skipped,
    outputSize: model.outputSize,
  };
}
