import { mkdir, readFile } from 'node:fs/promises';
import { availableParallelism } from 'node:os';
import path from 'node:path';
import type * as tf from '@tensorflow/tfjs';
import type { BackendInfo } from '../backend/index.js';
import { FinetuneError } from '../errors.js';
import { writeFileAtomic } from '../io/atomic.js';
import { oneOfValues, positiveInteger } from '../util/is.js';
import { lowerToOnnx, UnsupportedLayerError } from './onnx/lower.js';
import { OnnxFrozenModel } from './onnx/session.js';
import { WorkerPoolFrozenModel, type WorkerRecipe } from './pool.js';
import { TfjsFrozenModel } from './tfjs.js';
import type { EngineName, FrozenModel } from './types.js';

/** Bumped whenever the lowering changes what it writes, so stale cached graphs are not reused. */
const LOWERING_VERSION = 1;

export type EngineOption = 'auto' | EngineName;
export const ENGINE_OPTIONS: readonly EngineOption[] = ['auto', 'onnx', 'tfjs'];

/** A frozen model to run, which engine runs it, and why when auto passed onnx over. */
export interface EngineChoice {
  readonly model: FrozenModel;
  readonly engine: EngineName;
  readonly reason: string | null;
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
  /** Keys the lowered-model cache; null disables it. */
  readonly hash: string | null;
  /** How a worker thread builds the same model, for the tfjs engine's worker pool on wasm. */
  readonly recipe?: WorkerRecipe;
}

export interface EngineOptions {
  engine?: EngineOption;
  backend: BackendInfo;
  /** ONNX Runtime intra-op threads; default all cores. */
  threads?: number;
  /** Where lowered models are cached (`<dir>/onnx/<hash>.onnx`); null for no cache. */
  cacheDir?: string | null;
  /**
   * Worker threads for the tfjs engine on wasm (which has no threads of its own in
   * Node); default all cores. 1 runs in this thread.
   */
  workers?: number;
}

/**
 * Picks the engine for a frozen forward pass. `auto` lowers to ONNX Runtime unless the
 * model cannot be lowered or the tfjs backend is a GPU one (then tfjs, with the reason).
 */
export async function createFrozenModel(
  source: FrozenModelSource,
  options: EngineOptions,
): Promise<EngineChoice> {
  const requested = oneOfValues('engine', options.engine ?? 'auto', ENGINE_OPTIONS);
  if (options.workers !== undefined) positiveInteger('workers', options.workers);
  const workers = options.workers ?? availableParallelism();
  const tfjs = async (): Promise<FrozenModel> =>
    source.recipe && workers > 1 && options.backend.tfBackend === 'wasm'
      ? WorkerPoolFrozenModel.create(source.recipe, { workers })
      : new TfjsFrozenModel(source.inputSize, source.outputSize, source.forward);
  if (requested === 'tfjs') return { model: await tfjs(), engine: 'tfjs', reason: null };
  let why: string | null = null;
  let bytes: Uint8Array | null = null;
  if (requested === 'auto' && options.backend.gpu) why = 'the tfjs backend runs on a GPU';
  else if (source.onnx) bytes = source.onnx;
  else if (!source.layersModel) why = 'graph models cannot be lowered to ONNX';
  else {
    try {
      bytes = await loweredBytes(source.layersModel, source.hash, options.cacheDir ?? null);
    } catch (err) {
      if (!(err instanceof UnsupportedLayerError)) throw err;
      why = err.message;
    }
  }
  if (why || !bytes) {
    if (requested === 'onnx') throw new FinetuneError(`Cannot use --engine onnx: ${why}`);
    return { model: await tfjs(), engine: 'tfjs', reason: why };
  }
  const model = await OnnxFrozenModel.create(bytes, {
    inputSize: source.inputSize,
    ...(options.threads !== undefined ? { threads: options.threads } : {}),
  });
  return { model, engine: 'onnx', reason: null };
}

/** Lowers once per machine: the ONNX bytes are kept beside the embedding cache, keyed by the weights' hash. */
async function loweredBytes(
  model: tf.LayersModel,
  hash: string | null,
  cacheDir: string | null,
): Promise<Uint8Array> {
  if (!hash || !cacheDir) return lowerToOnnx(model);
  const file = path.join(cacheDir, 'onnx', `${hash}-lowering${LOWERING_VERSION}.onnx`);
  try {
    return new Uint8Array(await readFile(file));
  } catch {
    // not cached yet
  }
  const bytes = lowerToOnnx(model);
  await mkdir(path.dirname(file), { recursive: true });
  await writeFileAtomic(file, bytes);
  return bytes;
}
