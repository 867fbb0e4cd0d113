import { availableParallelism } from 'node:os';
import type { BackendInfo } from '../backend/index.js';
import type { CacheFailure } from '../data/cache.js';
import { invalidOption } from '../errors.js';
import { nonEmptyString, oneOfValues, positiveInteger } from '../util/is.js';
import type { EngineName } from './types.js';

export type EngineOption = 'auto' | EngineName;
export const ENGINE_OPTIONS: readonly EngineOption[] = Object.freeze(['auto', 'onnx', 'tfjs']);

/** What a caller may say about frozen passes; every field but `backend` has a default. */
export interface EngineContextOptions {
  /** Default 'auto': ONNX Runtime unless the model cannot be lowered or tfjs runs on a GPU. */
  engine?: EngineOption;
  /** The tfjs backend in use (from `initBackend`). */
  backend: BackendInfo;
  /** ONNX Runtime intra-op threads; default all cores. */
  threads?: number;
  /**
   * Worker threads for the tfjs engine on wasm (which has no threads of its own in
   * Node); default all cores. 1 runs in this thread.
   */
  workers?: number;
  /** The cache folder where lowered models are kept (see `EmbeddingCache`); null for none. */
  cacheDir?: string | null;
  /** Where a failure of that cache goes (the engine then lowers without it); unset: it throws. */
  onCacheFailure?: ((failure: CacheFailure) => void) | null;
}

/** Everything a frozen pass needs to know about where it runs, checked and with defaults filled in. */
export interface EngineContext {
  readonly engine: EngineOption;
  readonly backend: BackendInfo;
  readonly threads: number;
  readonly workers: number;
  readonly cacheDir: string | null;
  readonly onCacheFailure: ((failure: CacheFailure) => void) | null;
}

/**
 * Checks each engine setting once and fills in the defaults, so a bad value fails here and
 * not at the first cache miss. Pass the result to every `createFrozenModel` of a run.
 *
 * @example
 *   const context = resolveEngineContext({ backend: await initBackend('auto'), threads: 2 });
 *   const { model } = await createFrozenModel(source, context);
 */
export function resolveEngineContext(options: EngineContextOptions): EngineContext {
  if (typeof options !== 'object' || options === null)
    throw invalidOption('engine options', 'an object', options);
  const { backend } = options;
  if (typeof backend !== 'object' || backend === null || typeof backend.tfBackend !== 'string')
    throw invalidOption('backend', 'the result of initBackend', backend);
  return Object.freeze({
    engine: oneOfValues('engine', options.engine ?? 'auto', ENGINE_OPTIONS),
    backend,
    threads: positiveInteger('threads', options.threads ?? availableParallelism()),
    workers: positiveInteger('workers', options.workers ?? availableParallelism()),
    cacheDir:
      options.cacheDir === undefined || options.cacheDir === null
        ? null
        : nonEmptyString('cache-dir', options.cacheDir),
    onCacheFailure: options.onCacheFailure ?? null,
  });
}
