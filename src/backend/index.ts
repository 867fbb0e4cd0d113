import * as tf from '@tensorflow/tfjs';
import { FinetuneError } from '../errors.js';
import { oneOfValues } from '../util/is.js';

export type BackendOption = 'auto' | 'node-gpu' | 'node' | 'wasm' | 'cpu';
export const BACKEND_OPTIONS: readonly BackendOption[] = [
  'auto',
  'node-gpu',
  'node',
  'wasm',
  'cpu',
];

/** What trains: recorded in every run. */
export interface BackendInfo {
  /** The option that was asked for. */
  readonly requested: BackendOption;
  /** The one that loaded. */
  readonly option: Exclude<BackendOption, 'auto'>;
  /** tfjs's own backend name ('tensorflow', 'wasm', 'cpu'). */
  readonly tfBackend: string;
  readonly gpu: boolean;
  /** Why earlier candidates were passed over (auto only). */
  readonly skipped: readonly string[];
}

// A variable specifier keeps TypeScript from resolving optional packages at build time.
const importOptional = (name: string): Promise<unknown> => import(name);

/**
 * How each backend loads, in `auto`'s order of preference. Native TF first (GPU, then
 * CPU), then wasm; the pure-JS cpu backend is ~17× slower than wasm and never chosen
 * by `auto`.
 */
const LOADERS: Readonly<Record<Exclude<BackendOption, 'auto'>, () => Promise<string>>> =
  Object.freeze({
    'node-gpu': async () => {
      await importOptional('@tensorflow/tfjs-node-gpu');
      return 'tensorflow';
    },
    node: async () => {
      await importOptional('@tensorflow/tfjs-node');
      return 'tensorflow';
    },
    wasm: async () => {
      await import('@tensorflow/tfjs-backend-wasm');
      const { registerWasmGradientKernels } = await import('./wasm-grad-kernels.js');
      registerWasmGradientKernels();
      return 'wasm';
    },
    cpu: async () => 'cpu',
  });

const AUTO_ORDER: readonly Exclude<BackendOption, 'auto'>[] = ['node-gpu', 'node', 'wasm'];

let current: BackendInfo | null = null;

/**
 * Selects the tfjs backend that trains. `auto` takes the first of node-gpu, node, wasm
 * that loads. Calling again with the same request is free.
 *
 * @example const info = await initBackend('auto'); // → { option: 'wasm', ... } without tfjs-node
 */
export async function initBackend(requested: BackendOption = 'auto'): Promise<BackendInfo> {
  oneOfValues('backend', requested, BACKEND_OPTIONS);
  if (current && (current.requested === requested || current.option === requested)) return current;
  const candidates = requested === 'auto' ? AUTO_ORDER : [requested];
  const skipped: string[] = [];
  for (const option of candidates) {
    let tfBackend: string;
    try {
      tfBackend = await LOADERS[option]();
      if (!(await tf.setBackend(tfBackend)))
        throw new Error(`tf.setBackend('${tfBackend}') returned false`);
    } catch (err) {
      const missing = (err as { code?: string })?.code === 'ERR_MODULE_NOT_FOUND';
      const reason = `${option}: ${missing ? 'not installed' : firstLine(err)}`;
      if (requested !== 'auto') {
        throw new FinetuneError(
          `Backend ${option} could not be loaded (${firstLine(err)})${hint(option)}`,
          { cause: err },
        );
      }
      skipped.push(reason);
      continue;
    }
    await tf.ready();
    const gpu = option === 'node-gpu' && tfBackend === 'tensorflow';
    current = { requested, option, tfBackend, gpu, skipped };
    return current;
  }
  throw new FinetuneError(`No backend could be loaded: ${skipped.join('; ')}`);
}

function firstLine(err: unknown): string {
  return String((err as Error)?.message ?? err).split('\n')[0]!;
}

function hint(option: string): string {
  return option === 'node' || option === 'node-gpu'
    ? `; install it with npm install @tensorflow/tfjs-${option === 'node' ? 'node' : 'node-gpu'} (its install step downloads libtensorflow) or use --backend wasm`
    : '';
}
