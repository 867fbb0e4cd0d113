import type * as tf from '@tensorflow/tfjs';
import { EmbeddingCache, type LoweredModelKey } from '../data/cache.js';
import { FinetuneError } from '../errors.js';
import { oneOfValues } from '../util/is.js';
import type { EngineContext } from './context.js';
import { lowerToOnnx, UnsupportedLayerError } from './onnx/lower.js';
import {
  executionProviders,
  loadOnnxRuntime,
  OnnxFrozenModel,
  OnnxRuntimeUnavailable,
} from './onnx/session.js';
import { type TfjsWorkerRecipe, WorkerPoolFrozenModel } from './pool.js';
import { TfjsFrozenModel } from './tfjs.js';
import type { EngineName, FrozenModel } from './types.js';

export {
  ENGINE_OPTIONS,
  type EngineContext,
  type EngineContextOptions,
  type EngineOption,
  resolveEngineContext,
} from './context.js';

/** Bumped whenever the lowering changes what it writes, so stale cached graphs are not reused. */
const LOWERING_VERSION = 1;

const ROW_ORDERS: readonly ('nhwc' | 'nchw')[] = Object.freeze(['nhwc', 'nchw']);

/** A frozen model to run, which engine runs it, and why when auto passed onnx over. */
export interface EngineChoice {
  readonly model: FrozenModel;
  readonly engine: EngineName;
  readonly reason: string | null;
  /**
   * Where the ONNX graph came from: 'cache' (lowered by an earlier run), 'now' (lowered
   * here), or null (given as bytes, or the tfjs engine runs).
   */
  readonly lowered: 'cache' | 'now' | null;
}

export interface FrozenModelSource {
  /** A layers model (raw NHWC pixels in) that can be lowered to ONNX; null for graph models. */
  readonly layersModel: tf.LayersModel | null;
  /** An already lowered copy (e.g. an exported model.onnx): used as it is. */
  readonly onnx?: Uint8Array;
  readonly inputSize: number;
  readonly outputSize: number;
  /** The tfjs forward pass (the fallback). */
  readonly forward: (pixels: tf.Tensor4D) => tf.Tensor;
  /**
   * Keys the lowered copy in the context's cache folder (the lowering version is added
   * here); omitted or null: lowered on every call, never cached.
   */
  readonly cacheKey?: Omit<LoweredModelKey, 'lowering'> | null;
  /** How a worker thread builds the same model, for the tfjs engine's worker pool on wasm. */
  readonly recipe?: TfjsWorkerRecipe;
  /**
   * Order of each row of a 4-D output: 'nhwc' (default) is what tfjs gives and tfjs
   * consumers read, whichever engine runs; 'nchw' leaves ONNX Runtime's rows as the graph
   * computes them (and only suits the onnx engine).
   */
  readonly rows?: 'nhwc' | 'nchw';
}

/**
 * Picks the engine for a frozen forward pass. `auto` lowers to ONNX Runtime unless the
 * model cannot be lowered, the tfjs backend is a GPU one or onnxruntime-node does not load
 * (then tfjs, with the reason).
 * Every engine returns rows in the order `source.rows` asks for.
 *
 * @example
 *   const context = resolveEngineContext({ backend: await initBackend('auto') });
 *   const { model, engine } = await createFrozenModel(source, context);
 */
export async function createFrozenModel(
  source: FrozenModelSource,
  context: EngineContext,
): Promise<EngineChoice> {
  const requested = context.engine;
  const rows = oneOfValues('rows', source.rows ?? 'nhwc', ROW_ORDERS);
  const tfjs = async (): Promise<FrozenModel> => {
    if (rows !== 'nhwc')
      throw new FinetuneError("Cannot give 'nchw' rows on the tfjs engine: tfjs computes NHWC");
    return source.recipe && context.workers > 1 && context.backend.tfBackend === 'wasm'
      ? WorkerPoolFrozenModel.create(source.recipe, { workers: context.workers })
      : new TfjsFrozenModel(source.inputSize, source.outputSize, source.forward);
  };
  if (requested === 'tfjs')
    return { model: await tfjs(), engine: 'tfjs', reason: null, lowered: null };
  const graph = await onnxGraph(source, context);
  if ('why' in graph) {
    if (requested === 'onnx') throw new FinetuneError(`Cannot use --engine onnx: ${graph.why}`);
    return { model: await tfjs(), engine: 'tfjs', reason: graph.why, lowered: null };
  }
  const workers = onnxWorkers(context.threads);
  const model =
    workers > 0
      ? await WorkerPoolFrozenModel.create(
          { kind: 'onnx', onnx: graph.bytes, inputSize: source.inputSize, rows },
          { workers },
        )
      : await OnnxFrozenModel.create(graph.bytes, {
          inputSize: source.inputSize,
          threads: context.threads,
          rows,
        });
  return { model, engine: 'onnx', reason: null, lowered: graph.lowered };
}

/**
 * How many single-threaded ONNX Runtime sessions, each in a worker thread, run a frozen
 * pass of `threads` threads (see WorkerPoolFrozenModel); 0: one session of `threads`
 * threads in the calling thread, as with one thread or a GPU provider.
 */
export function onnxWorkers(threads: number): number {
  return threads > 1 && executionProviders().every((p) => p === 'cpu') ? threads : 0;
}

/** The graph ONNX Runtime would run for `source`, or why ONNX Runtime is passed over. */
async function onnxGraph(
  source: FrozenModelSource,
  context: EngineContext,
): Promise<{ bytes: Uint8Array; lowered: 'cache' | 'now' | null } | { why: string }> {
  if (context.engine === 'auto' && context.backend.gpu)
    return { why: 'the tfjs backend runs on a GPU' };
  // Before lowering: nothing is lowered for a runtime that cannot run it.
  const missing = await onnxRuntimeMissing();
  if (missing) return { why: missing };
  if (source.onnx) return { bytes: source.onnx, lowered: null };
  if (!source.layersModel) return { why: 'graph models cannot be lowered to ONNX' };
  try {
    const { bytes, from } = await loweredBytes(
      source.layersModel,
      source.cacheKey ?? null,
      context,
    );
    return { bytes, lowered: from };
  } catch (err) {
    if (!(err instanceof UnsupportedLayerError)) throw err;
    return { why: err.message };
  }
}

/** Why ONNX Runtime cannot run here (onnxruntime-node does not load), or null. */
async function onnxRuntimeMissing(): Promise<string | null> {
  try {
    await loadOnnxRuntime();
    return null;
  } catch (err) {
    if (err instanceof OnnxRuntimeUnavailable) return err.message;
    throw err;
  }
}

/**
 * Lowers once per machine: the ONNX bytes are kept in the cache folder (see `EmbeddingCache`)
 * under the backbone's weights hash, the cut and the lowering version; a damaged copy is
 * lowered again.
 */
async function loweredBytes(
  model: tf.LayersModel,
  key: Omit<LoweredModelKey, 'lowering'> | null,
  context: EngineContext,
): Promise<{ bytes: Uint8Array; from: 'cache' | 'now' }> {
  const { cacheDir, onCacheFailure } = context;
  if (!key || !cacheDir) return { bytes: lowerToOnnx(model), from: 'now' };
  const cache = new EmbeddingCache(cacheDir, onCacheFailure ? { onFailure: onCacheFailure } : {});
  const full: LoweredModelKey = { ...key, lowering: LOWERING_VERSION };
  const cached = await cache.getLowered(full);
  if (cached) return { bytes: cached, from: 'cache' };
  const bytes = lowerToOnnx(model);
  await cache.putLowered(full, bytes);
  return { bytes, from: 'now' };
}
