import { constants } from 'node:fs';
import { access, readdir, readFile, stat } from 'node:fs/promises';
import { createRequire } from 'node:module';
import os from 'node:os';
import path from 'node:path';
import type { Argv } from 'yargs';
import {
  type BackendReport,
  defaultCacheDir,
  EmbeddingCache,
  type ErrorKind,
  EXIT_CODES,
  executionProviders,
  initBackend,
  loadOnnxRuntime,
  OnnxRuntimeUnavailable,
  onnxWorkers,
  probeBackends,
  resolveEngineContext,
  stepPlan,
  VERSION,
  versions,
} from '../index.js';
import { megabytes } from './cache.js';
import { createOutput, table } from './output.js';

export const command = 'doctor';
export const describe =
  'Say what this machine has for training and frozen passes: tfjs backends, ONNX Runtime, CPU, cache';

export function builder(y: Argv) {
  return y
    .option('cache-dir', {
      type: 'string',
      default: defaultCacheDir(),
      describe: 'Cache folder to check',
    })
    .option('json', { type: 'boolean', describe: 'Print the findings as one JSON object' });
}

type Args = Awaited<ReturnType<ReturnType<typeof builder>['parseAsync']>>;

/** What ONNX Runtime offers here. */
interface OnnxRuntimeReport {
  loads: boolean;
  /** One line when onnxruntime-node does not load. */
  reason: string | null;
  version: string | null;
  /** The execution providers this build knows; `bundled: false` ones need a library of their own. */
  providers: { name: string; bundled: boolean }[] | null;
  /** How `providers` was found: `listSupportedBackends()`, or why it could not be. */
  providersFrom: string;
  /** What the toolkit's sessions ask for (`FINETUNE_ORT_PROVIDERS`, default cpu); null when invalid. */
  requested: string[] | null;
  /** Why `FINETUNE_ORT_PROVIDERS` is invalid, else null. */
  requestedError: string | null;
  cuda: { present: boolean; reason: string | null; nvidiaDriver: string | null };
}

interface CpuReport {
  model: string;
  logicalCores: number;
  availableParallelism: number;
  /** The flags below from /proc/cpuinfo; null off Linux or without x86 flags. */
  extensions: Record<string, boolean> | null;
}

interface CacheReport {
  dir: string;
  exists: boolean;
  /** Whether a write would succeed: the folder itself, or the nearest existing parent it would be made in. */
  writable: boolean;
  /** One line when the cache cannot be written or read. */
  reason: string | null;
  /** From `cache info`; null when the folder cannot be read. */
  entries: number | null;
  bytes: number | null;
  lowered: { count: number; bytes: number } | null;
  temp: { count: number; bytes: number } | null;
}

/** Something the toolkit cannot run without, and the exit code it earns. */
interface Problem {
  message: string;
  kind: ErrorKind;
}

/** x86 vector extensions that decide the speed of ONNX Runtime and native TF here. */
const EXTENSIONS: readonly string[] = Object.freeze([
  'avx2',
  'avx512f',
  'avx512_vnni',
  'avx_vnni',
  'amx_tile',
  'amx_int8',
  'amx_bf16',
]);

/** The provider libraries onnxruntime-node's install step downloads beside its binding, by platform. */
const CUDA_LIBRARIES: Readonly<Record<string, readonly string[]>> = Object.freeze({
  linux: ['libonnxruntime_providers_cuda.so', 'libonnxruntime_providers_shared.so'],
  win32: ['onnxruntime_providers_cuda.dll', 'onnxruntime_providers_shared.dll'],
});

const require = createRequire(import.meta.url);

function firstLine(err: unknown): string {
  return String((err as Error)?.message ?? err)
    .split('\n')[0]!
    .trim();
}

async function readOrNull(file: string): Promise<string | null> {
  try {
    return await readFile(file, 'utf8');
  } catch {
    return null;
  }
}

/** An ONNX graph that copies a float[1]: enough for ONNX Runtime to place it on a provider. */
async function identityModel(): Promise<Uint8Array> {
  const { default: onnxProto } = await import('onnx-proto');
  const tensor = {
    tensorType: {
      elemType: onnxProto.onnx.TensorProto.DataType.FLOAT,
      shape: { dim: [{ dimValue: 1 }] },
    },
  };
  return onnxProto.onnx.ModelProto.encode({
    irVersion: 8,
    opsetImport: [{ domain: '', version: 13 }],
    graph: {
      name: 'doctor',
      node: [{ opType: 'Identity', input: ['x'], output: ['y'] }],
      input: [{ name: 'x', type: tensor }],
      output: [{ name: 'y', type: tensor }],
    },
  }).finish();
}

/** The folders holding onnxruntime-node's native binding for this platform: bin/napi-vN/OS/ARCH. */
async function bindingDirs(): Promise<string[]> {
  // dist/index.js → the package folder
  const root = path.dirname(path.dirname(require.resolve('onnxruntime-node')));
  const bin = path.join(root, 'bin');
  const napi = (await readdir(bin).catch(() => [] as string[])).filter((d) =>
    d.startsWith('napi-v'),
  );
  return napi.map((d) => path.join(bin, d, process.platform, process.arch));
}

/**
 * Whether ONNX Runtime's CUDA provider can run here, and the first reason it cannot: not in
 * this build, its libraries not downloaded, or (with them) a session on it failing.
 */
async function probeCuda(
  ort: typeof import('onnxruntime-node'),
  providers: OnnxRuntimeReport['providers'],
): Promise<{ present: boolean; reason: string | null }> {
  const entry = providers?.find((p) => p.name === 'cuda');
  if (providers && !entry) {
    return {
      present: false,
      reason: `this onnxruntime-node build has no CUDA provider for ${process.platform}-${process.arch}`,
    };
  }
  if (entry && !entry.bundled) {
    const libraries = CUDA_LIBRARIES[process.platform] ?? [];
    const dirs = await bindingDirs();
    for (const lib of libraries) {
      const found = await Promise.all(
        dirs.map((d) =>
          stat(path.join(d, lib)).then(
            (s) => s.isFile(),
            () => false,
          ),
        ),
      );
      if (!found.includes(true)) {
        return {
          present: false,
          reason: `${lib} is not installed (onnxruntime-node's install step downloads it; here it was skipped or failed)`,
        };
      }
    }
  }
  // The libraries are there: a session placed on CUDA says whether the CUDA runtime, cuDNN
  // and a device are too. Native errors would otherwise also be logged on stderr.
  ort.env.logLevel = 'fatal';
  try {
    const session = await ort.InferenceSession.create(await identityModel(), {
      executionProviders: ['cuda'],
      logSeverityLevel: 4,
    });
    await session.release();
    return { present: true, reason: null };
  } catch (err) {
    return { present: false, reason: `a session on the CUDA provider failed: ${firstLine(err)}` };
  }
}

async function probeOnnxRuntime(): Promise<OnnxRuntimeReport> {
  const nvidiaDriver =
    (await readOrNull('/proc/driver/nvidia/version'))?.split('\n')[0]?.trim() || null;
  let requested: string[] | null = null;
  let requestedError: string | null = null;
  try {
    requested = executionProviders();
  } catch (err) {
    requestedError = firstLine(err);
  }
  let ort: typeof import('onnxruntime-node');
  try {
    ort = await loadOnnxRuntime();
  } catch (err) {
    return {
      loads: false,
      reason: err instanceof OnnxRuntimeUnavailable ? err.reason : firstLine(err),
      version: null,
      providers: null,
      providersFrom: 'onnxruntime-node does not load',
      requested,
      requestedError,
      cuda: { present: false, reason: 'onnxruntime-node does not load', nvidiaDriver },
    };
  }
  const version = ort.env.versions.node ?? versions()['onnxruntime-node'] ?? null;
  const list = (ort as { listSupportedBackends?: () => { name: string; bundled: boolean }[] })
    .listSupportedBackends;
  const providers =
    typeof list === 'function' ? list().map(({ name, bundled }) => ({ name, bundled })) : null;
  const providersFrom = providers
    ? 'listSupportedBackends()'
    : `onnxruntime-node ${version} has no listSupportedBackends(); the CUDA provider was tried directly`;
  const cuda = await probeCuda(ort, providers);
  return {
    loads: true,
    reason: null,
    version,
    providers,
    providersFrom,
    requested,
    requestedError,
    cuda: { ...cuda, nvidiaDriver },
  };
}

async function probeCpu(): Promise<CpuReport> {
  const cpus = os.cpus();
  let extensions: Record<string, boolean> | null = null;
  if (process.platform === 'linux') {
    const flagsLine = (await readOrNull('/proc/cpuinfo'))
      ?.split('\n')
      .find((l) => /^flags\s*:/.test(l));
    if (flagsLine) {
      const flags = new Set(flagsLine.split(':')[1]!.trim().split(/\s+/));
      extensions = Object.fromEntries(EXTENSIONS.map((f) => [f, flags.has(f)]));
    }
  }
  return {
    model: cpus[0]?.model.trim() || 'unknown',
    logicalCores: cpus.length,
    availableParallelism: os.availableParallelism(),
    extensions,
  };
}

/** Why a write under `dir` would fail, or null when it would succeed. */
async function unwritable(dir: string): Promise<string | null> {
  let at = dir;
  for (;;) {
    const st = await stat(at).catch(() => null);
    if (st) {
      if (!st.isDirectory()) return `${at} is not a folder`;
      try {
        await access(at, constants.W_OK);
        return null;
      } catch (err) {
        return `${at} is not writable (${(err as NodeJS.ErrnoException).code ?? firstLine(err)})`;
      }
    }
    const parent = path.dirname(at);
    if (parent === at) return `no existing parent folder of ${dir}`;
    at = parent;
  }
}

async function probeCache(dir: string): Promise<CacheReport> {
  const cache = new EmbeddingCache(dir);
  const exists = (await stat(cache.dir).catch(() => null)) !== null;
  const notWritable = await unwritable(cache.dir);
  const report: CacheReport = {
    dir: cache.dir,
    exists,
    writable: notWritable === null,
    reason: notWritable,
    entries: null,
    bytes: null,
    lowered: null,
    temp: null,
  };
  try {
    const info = await cache.info();
    report.entries = info.entries;
    report.bytes = info.bytes;
    report.lowered = { count: info.lowered.count, bytes: info.lowered.bytes };
    report.temp = info.temp;
  } catch (err) {
    report.reason = [notWritable, firstLine(err)].filter(Boolean).join('; ');
  }
  return report;
}

function problemsOf(backends: BackendReport, ortReport: OnnxRuntimeReport): Problem[] {
  const problems: Problem[] = [];
  if (backends.auto === null) {
    const why = backends.backends
      .filter((b) => b.option !== 'cpu')
      .map((b) => `${b.option}: ${b.reason}`)
      .join('; ');
    problems.push({
      message: `no training backend loads for --backend auto (${why})`,
      kind: 'internal',
    });
  }
  if (ortReport.requestedError !== null) {
    problems.push({ message: ortReport.requestedError, kind: 'usage' });
  }
  return problems;
}

const yesNo = (b: boolean): string => (b ? 'yes' : 'no');

function backendNotes(b: BackendReport['backends'][number]): string {
  if (!b.loads) return b.reason ?? '';
  if (b.wasm) return `SIMD ${yesNo(b.wasm.simd)}, threads ${yesNo(b.wasm.threads)}`;
  if (b.option === 'cpu') return 'pure JS; never picked by auto';
  return b.option === 'node-gpu' ? 'native TF, GPU build' : 'native TF';
}

function render(report: ReturnType<typeof assemble>): string {
  const { backends, onnxRuntime: o, cpu, engine, cache } = report;
  const header = `tfjs-finetune ${report.toolkit}, Node ${report.node}, ${report.platform.os} ${report.platform.arch} (${report.platform.release})`;
  const backendTable = table([
    ['backend', 'package', 'loads', 'notes'],
    ...backends.map((b) => [b.option, b.package, yesNo(b.loads), backendNotes(b)]),
  ]);
  const providers = o.providers
    ? o.providers.map((p) => (p.bundled ? p.name : `${p.name} (separate library)`)).join(', ')
    : '-';
  const ext = cpu.extensions
    ? EXTENSIONS.map((f) => `${f} ${yesNo(cpu.extensions![f]!)}`).join(', ')
    : 'unknown (not Linux, or no x86 flags in /proc/cpuinfo)';
  const cacheState = [
    cache.exists ? 'exists' : 'not created yet',
    cache.writable ? 'writable' : 'not writable',
  ].join(', ');
  const cacheSize =
    cache.entries === null
      ? '-'
      : `${cache.entries} ${cache.entries === 1 ? 'entry' : 'entries'}, ${megabytes(cache.bytes!)} MB; ` +
        `${cache.lowered!.count} lowered ${cache.lowered!.count === 1 ? 'model' : 'models'}, ${megabytes(cache.lowered!.bytes)} MB`;
  const rows: string[][] = [
    ['onnxruntime-node', o.loads ? `${o.version} loads` : `does not load: ${o.reason}`],
    ['  providers', `${providers} (${o.providersFrom})`],
    [
      '  requested',
      o.requested
        ? `${o.requested.join(', ')} (FINETUNE_ORT_PROVIDERS${process.env['FINETUNE_ORT_PROVIDERS'] === undefined ? ' unset: the default' : ''})`
        : `${o.requestedError}`,
    ],
    ['  CUDA', o.cuda.present ? 'yes' : `no: ${o.cuda.reason}`],
    ['  NVIDIA driver', o.cuda.nvidiaDriver ?? 'none found'],
    ['CPU', cpu.model],
    ['  cores', `${cpu.logicalCores} logical, availableParallelism ${cpu.availableParallelism}`],
    ['  extensions', ext],
    [
      'engine',
      `frozen passes on ${engine.auto} (--engine auto${engine.autoWhy ? `: ${engine.autoWhy}` : ''}), ${onnxWorkers(engine.threads) ? `${engine.threads} single-threaded ONNX Runtime sessions in worker threads` : `one ONNX Runtime session of ${engine.threads} thread${engine.threads === 1 ? '' : 's'}`}, ${engine.workers} tfjs workers on wasm; fine-tune steps ${engine.auto === 'onnx' ? `on onnx (${engine.threads} threads) where the step graph covers the model, else ` : ''}on tfjs (${engine.finetuneThreads} thread${engine.finetuneThreads === 1 ? '' : 's'})`,
    ],
    ['cache', `${cache.dir} (${cacheState})`],
    ['  size', cacheSize],
  ];
  if (cache.reason) rows.push(['  problem', cache.reason]);
  return [
    header,
    '',
    `tfjs backends (--backend auto: ${report.autoBackend ?? 'none loads'})`,
    backendTable,
    '',
    table(rows),
  ].join('\n');
}

function assemble(
  probed: BackendReport,
  onnxRuntime: OnnxRuntimeReport,
  cpu: CpuReport,
  engine: {
    auto: 'onnx' | 'tfjs';
    /** Why `auto` runs frozen passes on tfjs, else null. */
    autoWhy: string | null;
    threads: number;
    workers: number;
    finetuneThreads: number;
  },
  cache: CacheReport,
  problems: Problem[],
) {
  return {
    toolkit: VERSION,
    node: process.versions.node,
    platform: { os: process.platform, arch: process.arch, release: os.release() },
    versions: versions(),
    autoBackend: probed.auto,
    backends: probed.backends,
    onnxRuntime,
    cpu,
    engine,
    cache,
    problems: problems.map((p) => p.message),
  };
}

export async function handler(argv: Args): Promise<void> {
  const out = createOutput({ json: argv.json });
  // Checked first: a bad --cache-dir is a usage error before any probing.
  const cacheDir = new EmbeddingCache(argv.cacheDir).dir;
  const probed = await probeBackends();
  const onnxRuntime = await probeOnnxRuntime();
  const cpu = await probeCpu();
  // The engine defaults a run would use, resolved as a run resolves them (cpu stands in
  // when auto finds nothing, so the thread counts are still shown).
  const context = resolveEngineContext({ backend: await initBackend(probed.auto ?? 'cpu') });
  // As createFrozenModel decides: onnx unless the backend is a GPU one or ONNX Runtime does not load.
  const autoWhy = context.backend.gpu
    ? 'the tfjs backend runs on a GPU'
    : onnxRuntime.loads
      ? null
      : 'onnxruntime-node does not load';
  const engine = {
    auto: autoWhy ? ('tfjs' as const) : ('onnx' as const),
    autoWhy,
    threads: context.threads,
    workers: context.workers,
    // --finetune-threads' default on this backend.
    finetuneThreads: stepPlan(context.backend, false, undefined).threads,
  };
  const cache = await probeCache(cacheDir);
  const problems = problemsOf(probed, onnxRuntime);
  const report = assemble(probed, onnxRuntime, cpu, engine, cache, problems);
  out.result(argv.json ? JSON.stringify(report, null, 2) : render(report));
  // Missing optional backends are information, as is ONNX Runtime not loading (runs then
  // compute on tfjs); these make every run fail. Reported here rather than thrown: they are
  // findings, and a stack trace of this handler says nothing.
  const first = problems[0];
  if (first) {
    process.stderr.write(`finetune: doctor: ${problems.map((p) => p.message).join('; ')}\n`);
    process.exitCode = EXIT_CODES[first.kind];
  }
}
