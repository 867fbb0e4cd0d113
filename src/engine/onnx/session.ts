import os from 'node:os';
import type * as ort from 'onnxruntime-node';
import { FinetuneError, invalidOption } from '../../errors.js';
import type { FrozenModel } from '../types.js';

export interface OnnxFrozenModelOptions {
  /** Square input size in pixels (the graph input is [N, 3, size, size]). */
  inputSize: number;
  /** ONNX Runtime intra-op threads; default os.availableParallelism(). */
  threads?: number;
  /**
   * Order of the rows of a 4-D output: 'nchw' (default) as the graph computes them, or
   * 'nhwc', reordered here to what tfjs gives for the same model.
   */
  rows?: 'nchw' | 'nhwc';
}

/**
 * ONNX Runtime execution providers, from `FINETUNE_ORT_PROVIDERS` (comma-separated,
 * default `cpu`). The CUDA provider needs onnxruntime-node installed with its CUDA
 * libraries (remove `onnxruntime-node-install=skip` from .npmrc and reinstall on a
 * machine with an NVIDIA GPU), then `FINETUNE_ORT_PROVIDERS=cuda,cpu`.
 */
export function executionProviders(value = process.env['FINETUNE_ORT_PROVIDERS']): string[] {
  const known = ['cpu', 'cuda', 'tensorrt', 'dml', 'coreml', 'webgpu'];
  const list = (value ?? 'cpu')
    .split(',')
    .map((p) => p.trim())
    .filter(Boolean);
  for (const p of list) {
    if (!known.includes(p))
      throw invalidOption(
        'FINETUNE_ORT_PROVIDERS',
        `a comma-separated list of ${known.join(', ')}`,
        value,
      );
  }
  return list.length ? list : ['cpu'];
}

/** onnxruntime-node does not load on this machine; the message says why, in one line. */
export class OnnxRuntimeUnavailable extends FinetuneError {
  /** The loader's own first line, e.g. the binding file it could not find. */
  readonly reason: string;
  constructor(reason: string, cause: unknown) {
    super(`ONNX Runtime does not load (${reason})`, { cause, exitCode: 1 });
    this.reason = reason;
  }
}

let runtime: typeof ort | null = null;
let loading: Promise<typeof ort> | null = null;

/**
 * onnxruntime-node, imported on first use rather than with this module, so that a machine
 * where its native binding does not load (no prebuilt binary for the platform, an install
 * that failed or was skipped) still runs: `--engine auto` computes on tfjs and says why,
 * and `finetune doctor` reports the reason. Rejects with OnnxRuntimeUnavailable.
 */
export function loadOnnxRuntime(): Promise<typeof ort> {
  loading ??= import('onnxruntime-node').then(
    (m) => {
      runtime = m;
      return m;
    },
    (err: unknown) => {
      const why = String((err as Error)?.message ?? err)
        .split('\n')[0]!
        .trim();
      throw new OnnxRuntimeUnavailable(why, err);
    },
  );
  return loading;
}

/** A float32 tensor for a session's feeds; ONNX Runtime is loaded once any session is open. */
export function float32Tensor(data: Float32Array, dims: readonly number[]): ort.Tensor {
  if (!runtime) throw new FinetuneError('ONNX Runtime is used before it was loaded');
  return new runtime.Tensor('float32', data, dims);
}

/**
 * Opens an ONNX Runtime session with the settings of every frozen pass (providers from
 * `FINETUNE_ORT_PROVIDERS`, all graph optimisations, `threads` intra-op threads). Shared by
 * {@link OnnxFrozenModel} and the int8 calibration pass, so both run the graph alike.
 */
export async function openOrtSession(
  onnxBytes: Uint8Array,
  threads: number,
): Promise<ort.InferenceSession> {
  const { InferenceSession } = await loadOnnxRuntime();
  try {
    return await InferenceSession.create(onnxBytes, {
      executionProviders: executionProviders(),
      graphOptimizationLevel: 'all',
      executionMode: 'sequential',
      // One graph branch at a time; all threads go to each op (measured fastest for
      // MobileNetV2: ~190 images/s with 1 thread, 300–370 with 2 on a 2-core machine).
      interOpNumThreads: 1,
      intraOpNumThreads: threads,
      // Idle intra-op threads would spin between batches, taking the cores that decode
      // the next batch meanwhile: embedding 500 images, ~5% faster without spinning,
      // with no loss in inference alone.
      extra: { session: { intra_op: { allow_spinning: '0' } } },
    });
  } catch (err) {
    throw new FinetuneError(
      `ONNX Runtime could not load the lowered model: ${(err as Error).message}`,
      {
        cause: err,
        exitCode: 1,
      },
    );
  }
}

/**
 * A frozen forward pass on ONNX Runtime (CPU) over a graph from `lowerToOnnx`: NCHW raw
 * pixels in, one flat output row per image out (a 4-D output is flattened in NCHW order,
 * or NHWC with `rows: 'nhwc'`).
 */
export class OnnxFrozenModel implements FrozenModel {
  readonly engine = 'onnx' as const;
  readonly layout = 'nchw' as const;
  readonly inputSize: number;
  readonly outputSize: number;
  private readonly session: ort.InferenceSession;
  private readonly inputName: string;
  private readonly outputName: string;
  /** [C, H, W] of a 4-D output whose rows come back NHWC; null: rows as the graph gives them. */
  private readonly reorder: readonly [number, number, number] | null;
  private disposed = false;

  private constructor(
    session: ort.InferenceSession,
    inputSize: number,
    outputSize: number,
    reorder: readonly [number, number, number] | null,
  ) {
    this.session = session;
    this.inputSize = inputSize;
    this.outputSize = outputSize;
    this.reorder = reorder;
    this.inputName = session.inputNames[0]!;
    this.outputName = session.outputNames[0]!;
  }

  /**
   * Opens an ONNX Runtime session on the serialized model.
   *
   * @example
   *   const frozen = await OnnxFrozenModel.create(lowerToOnnx(backbone.model!), { inputSize: 224 });
   */
  static async create(
    onnxBytes: Uint8Array,
    options: OnnxFrozenModelOptions,
  ): Promise<OnnxFrozenModel> {
    const { inputSize, threads } = sessionSize(options);
    const rows = options.rows ?? 'nchw';
    if (rows !== 'nchw' && rows !== 'nhwc') throw invalidOption('rows', "'nchw' or 'nhwc'", rows);
    const session = await openOrtSession(onnxBytes, threads);
    const meta = session.outputMetadata[0];
    let dims: number[];
    if (meta?.isTensor && meta.shape.slice(1).every((d) => typeof d === 'number')) {
      dims = meta.shape.slice(1) as number[];
    } else {
      // No static output shape in the graph: measure it on one blank image.
      const probe = new Float32Array(3 * inputSize * inputSize);
      const tensor = float32Tensor(probe, [1, 3, inputSize, inputSize]);
      const out = await session.run({ [session.inputNames[0]!]: tensor });
      dims = out[session.outputNames[0]!]!.dims.slice(1);
    }
    const outputSize = dims.reduce((a, d) => a * d, 1);
    const reorder =
      rows === 'nhwc' && dims.length === 3 ? (dims as [number, number, number]) : null;
    return new OnnxFrozenModel(session, inputSize, outputSize, reorder);
  }

  /**
   * Runs `n` NCHW images packed at the start of `batch`; resolves to n × outputSize floats.
   * Blocks the event loop while the graph runs (onnxruntime-node computes on the main thread).
   */
  async run(batch: Float32Array, n: number): Promise<Float32Array> {
    const per = checkBatch(batch, n, this.inputSize, this.disposed, 'The ONNX frozen model');
    const s = this.inputSize;
    // subarray: a view, no copy. onnxruntime-node runs the graph on the main thread in a
    // setImmediate callback, so the caller must leave `batch` alone until this resolves.
    const input = float32Tensor(batch.subarray(0, n * per), [n, 3, s, s]);
    const out = await this.session.run({ [this.inputName]: input });
    const data = out[this.outputName]!.data as Float32Array;
    const rows = data.length === n * this.outputSize ? data : data.slice(0, n * this.outputSize);
    return this.reorder ? chwToHwc(rows, n, this.reorder) : rows;
  }

  async dispose(): Promise<void> {
    if (this.disposed) return;
    this.disposed = true;
    await this.session.release();
  }
}

/** Rows of n images from [C, H, W] order to tfjs's [H, W, C]. */
function chwToHwc(
  chw: Float32Array,
  n: number,
  [c, h, w]: readonly [number, number, number],
): Float32Array {
  const out = new Float32Array(chw.length);
  const plane = h * w;
  for (let i = 0; i < n; i++) {
    const base = i * plane * c;
    for (let ch = 0; ch < c; ch++) {
      const src = base + ch * plane;
      for (let p = 0; p < plane; p++) out[base + p * c + ch] = chw[src + p]!;
    }
  }
  return out;
}

/** A session's input size and threads (all cores unless given), checked. */
export function sessionSize(options: { inputSize: number; threads?: number }): {
  inputSize: number;
  threads: number;
} {
  const { inputSize } = options;
  if (!Number.isInteger(inputSize) || inputSize <= 0) {
    throw invalidOption('inputSize', 'a positive integer', inputSize);
  }
  const threads = options.threads ?? os.availableParallelism();
  if (!Number.isInteger(threads) || threads <= 0) {
    throw invalidOption('threads', 'a positive integer', threads);
  }
  return { inputSize, threads };
}

/**
 * Checks a batch of `n` NCHW images of `inputSize`² pixels before a session runs it;
 * returns the floats per image. `what` names the model in the message after dispose().
 */
export function checkBatch(
  batch: Float32Array,
  n: number,
  inputSize: number,
  disposed: boolean,
  what: string,
): number {
  if (disposed) throw new FinetuneError(`${what} was used after dispose()`, { exitCode: 1 });
  const s = inputSize;
  const per = 3 * s * s;
  if (!Number.isInteger(n) || n <= 0 || batch.length < n * per) {
    throw new FinetuneError(
      `Expected ${n} images of 3×${s}×${s} floats (${n * per}) but the batch holds ${batch.length}`,
      { exitCode: 1 },
    );
  }
  return per;
}
