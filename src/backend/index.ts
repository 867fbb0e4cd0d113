import os from 'node:os';
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

type Loadable = Exclude<BackendOption, 'auto'>;

/** One backend: the npm package it comes from, and how it loads (returns tfjs's name for it). */
interface BackendRow {
  readonly package: string;
  readonly load: () => Promise<string>;
}

/**
 * How each backend loads, in `auto`'s order of preference. Native TF first (GPU, then
 * CPU), then wasm; the pure-JS cpu backend is ~17× slower than wasm and never chosen
 * by `auto`. `initBackend` and `probeBackends` both load through this table.
 */
const BACKENDS: Readonly<Record<Loadable, BackendRow>> = Object.freeze({
  'node-gpu': {
    package: '@tensorflow/tfjs-node-gpu',
    load: async () => {
      await importOptional('@tensorflow/tfjs-node-gpu');
      return 'tensorflow';
    },
  },
  node: {
    package: '@tensorflow/tfjs-node',
    load: async () => {
      await importOptional('@tensorflow/tfjs-node');
      return 'tensorflow';
    },
  },
  wasm: {
    package: '@tensorflow/tfjs-backend-wasm',
    load: async () => {
      await import('@tensorflow/tfjs-backend-wasm');
      const { registerWasmGradientKernels } = await import('./wasm-grad-kernels.js');
      registerWasmGradientKernels();
      return 'wasm';
    },
  },
  cpu: { package: '@tensorflow/tfjs', load: async () => 'cpu' },
});

const AUTO_ORDER: readonly Loadable[] = ['node-gpu', 'node', 'wasm'];

/** Loads `option` and makes it tfjs's backend; throws what went wrong. */
async function activate(option: Loadable): Promise<string> {
  const tfBackend = await BACKENDS[option].load();
  if (!(await tf.setBackend(tfBackend)))
    throw new Error(`tf.setBackend('${tfBackend}') returned false`);
  return tfBackend;
}

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
      tfBackend = await activate(option);
    } catch (err) {
      if (requested !== 'auto') {
        throw new FinetuneError(
          `Backend ${option} could not be loaded (${firstLine(err)})${hint(option)}`,
          { cause: err },
        );
      }
      skipped.push(`${option}: ${loadFailure(option, err)}`);
      continue;
    }
    await tf.ready();
    const gpu = option === 'node-gpu' && tfBackend === 'tensorflow';
    current = { requested, option, tfBackend, gpu, skipped };
    return current;
  }
  throw new FinetuneError(`No backend could be loaded: ${skipped.join('; ')}`);
}

/** Whether one backend loads here, and why not when it does not. */
export interface BackendProbe {
  readonly option: Loadable;
  /** The npm package it comes from (`@tensorflow/tfjs` for cpu, which is built in). */
  readonly package: string;
  readonly loads: boolean;
  /** tfjs's name for it ('tensorflow', 'wasm', 'cpu') when it loads, else null. */
  readonly tfBackend: string | null;
  /** One line when it does not load (`not installed`, `native addon missing: …`), else null. */
  readonly reason: string | null;
  /**
   * wasm, when it loads: WebAssembly SIMD and threads as tfjs reports them
   * (`WASM_HAS_SIMD_SUPPORT`, `WASM_HAS_MULTITHREAD_SUPPORT`; tfjs reports no threads in Node).
   */
  readonly wasm?: { readonly simd: boolean; readonly threads: boolean };
}

export interface BackendReport {
  /** Every backend in `auto`'s order of preference, then cpu. */
  readonly backends: readonly BackendProbe[];
  /** What `--backend auto` picks here: the first of node-gpu, node, wasm that loads; null when none does. */
  readonly auto: Loadable | null;
}

/**
 * Threads a training loop uses by default: one per core on backends that train on one
 * thread (wasm has no threads in Node; cpu is plain JavaScript), one with native
 * TensorFlow (it spreads its own kernels over the cores).
 */
export function trainingThreads(backend: BackendInfo): number {
  return backend.tfBackend === 'tensorflow' ? 1 : os.availableParallelism();
}

/**
 * Tries to load every backend (node-gpu, node, wasm, cpu) and says which load, why the
 * others do not, and what `auto` would pick. The backend in use before the call stays in
 * use; when there was none, `auto`'s pick is (as after `initBackend('auto')`).
 *
 * @example const { auto, backends } = await probeBackends(); // auto: 'wasm' without tfjs-node
 */
export async function probeBackends(): Promise<BackendReport> {
  const before = tf.engine().backendName as string | undefined;
  const backends: BackendProbe[] = [];
  for (const option of [...AUTO_ORDER, 'cpu'] as const) {
    const row = BACKENDS[option];
    const base = { option, package: row.package };
    // Both native packages register tfjs's 'tensorflow' backend and its kernels: importing
    // the second after the first loaded only prints hundreds of duplicate-kernel warnings.
    const native = backends.find((b) => b.loads && b.tfBackend === 'tensorflow');
    if (native && (option === 'node' || option === 'node-gpu')) {
      const reason = `not tried: ${native.package} already provides the 'tensorflow' backend in this process`;
      backends.push({ ...base, loads: false, tfBackend: null, reason });
      continue;
    }
    try {
      const tfBackend = await activate(option);
      const wasm =
        option === 'wasm'
          ? {
              wasm: {
                simd: Boolean(await tf.env().getAsync('WASM_HAS_SIMD_SUPPORT')),
                threads: Boolean(await tf.env().getAsync('WASM_HAS_MULTITHREAD_SUPPORT')),
              },
            }
          : {};
      backends.push({ ...base, loads: true, tfBackend, reason: null, ...wasm });
    } catch (err) {
      backends.push({ ...base, loads: false, tfBackend: null, reason: loadFailure(option, err) });
    }
  }
  const auto = AUTO_ORDER.find((o) => backends.find((b) => b.option === o)?.loads) ?? null;
  if (before !== undefined) await tf.setBackend(before);
  else if (auto !== null) await activate(auto);
  return { backends, auto };
}

/**
 * What a failed load means, in one line; first match wins. tfjs-node's own error for a
 * missing `tfjs_binding.node` spans several lines and names the path, not the cause.
 */
const LOAD_FAILURES: readonly {
  readonly matches: (err: unknown, pkg: string) => boolean;
  readonly reason: (err: unknown, pkg: string) => string;
}[] = [
  {
    matches: (err, pkg) =>
      (err as { code?: string })?.code === 'ERR_MODULE_NOT_FOUND' &&
      firstLine(err).includes(`'${pkg}'`),
    reason: () => 'not installed',
  },
  {
    matches: (err) => /tfjs_binding\.node\) can not be found/.test(firstLine(err)),
    reason: (_, pkg) =>
      `native addon missing: tfjs_binding.node was not built (its install step downloads libtensorflow; npm rebuild ${pkg})`,
  },
  {
    matches: (err) =>
      /cannot open shared object file|Library not loaded|specified module could not be found/i.test(
        firstLine(err),
      ),
    reason: (err) => `native library missing: ${firstLine(err)}`,
  },
];

function loadFailure(option: Loadable, err: unknown): string {
  const pkg = BACKENDS[option].package;
  const row = LOAD_FAILURES.find((r) => r.matches(err, pkg));
  return row ? row.reason(err, pkg) : firstLine(err);
}

function firstLine(err: unknown): string {
  return String((err as Error)?.message ?? err).split('\n')[0]!;
}

function hint(option: string): string {
  return option === 'node' || option === 'node-gpu'
    ? `; install it with npm install @tensorflow/tfjs-${option === 'node' ? 'node' : 'node-gpu'} (its install step downloads libtensorflow) or use --backend wasm`
    : '';
}
