import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { stat, writeFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import * as tf from '@tensorflow/tfjs';
import { initBackend } from '../../src/backend/index.js';
import { type CacheNamespace, EmbeddingCache } from '../../src/data/cache.js';
import { executionProviders } from '../../src/engine/onnx/session.js';
import { ROOT, runCli, tempDir } from '../helpers.js';
import { runCliGuarded } from './cli-guard.js';

const require = createRequire(import.meta.url);

/** Whether a package resolves from the project (the optional native ones need libtensorflow's download). */
function installed(name: string): boolean {
  try {
    require.resolve(name);
    return true;
  } catch {
    return false;
  }
}

const NS: CacheNamespace = {
  backboneId: 'doctor-test',
  weightsHash: 'w'.repeat(64),
  layer: 'features',
  inputSize: 32,
  preprocessing: 'test',
  view: 'plain',
};

interface Probe {
  option: string;
  package: string;
  loads: boolean;
  tfBackend: string | null;
  reason: string | null;
  wasm?: { simd: boolean; threads: boolean };
}

let dir: string;
let cleanup: () => Promise<void>;

before(async () => {
  ({ dir, cleanup } = await tempDir('doctor'));
});
after(() => cleanup());

/** Loads XOR a one-line reason: never both, never neither. */
function consistent(b: Probe): void {
  if (b.loads) {
    assert.equal(b.reason, null, `${b.option} loads but has a reason`);
    assert.equal(typeof b.tfBackend, 'string');
  } else {
    assert.equal(typeof b.reason, 'string', `${b.option} does not load and says no reason`);
    assert.ok(b.reason!.length > 0 && !b.reason!.includes('\n'), `${b.option}: ${b.reason}`);
    assert.equal(b.tfBackend, null);
  }
}

describe('finetune doctor', () => {
  test('--json reports what this process can observe itself: backends, cores, cache', async () => {
    const cacheDir = path.join(dir, 'cache');
    const cache = new EmbeddingCache(cacheDir);
    const key = cache.key(new Uint8Array([7, 7, 7]));
    await cache.put(
      NS,
      key,
      Float32Array.from({ length: 100 }, (_, i) => i),
    );
    const entryBytes = (await stat(cache.packPath(NS)!)).size;

    const r = await runCli(['doctor', '--json', '--cache-dir', cacheDir], dir);
    assert.equal(r.code, 0, r.stderr);
    const report = JSON.parse(r.stdout);

    const pkg = JSON.parse(readFileSync(path.join(ROOT, 'package.json'), 'utf8'));
    assert.equal(report.toolkit, pkg.version);
    assert.equal(report.node, process.versions.node);
    assert.equal(report.platform.os, process.platform);
    assert.equal(report.platform.arch, process.arch);
    assert.deepEqual(report.problems, []);

    // Backends: in auto's order, then cpu; each loads XOR says why not.
    const backends = report.backends as Probe[];
    assert.deepEqual(
      backends.map((b) => b.option),
      ['node-gpu', 'node', 'wasm', 'cpu'],
    );
    for (const b of backends) consistent(b);
    const byOption = Object.fromEntries(backends.map((b) => [b.option, b]));
    for (const option of ['node-gpu', 'node'] as const) {
      const b = byOption[option]!;
      assert.equal(b.package, `@tensorflow/tfjs-${option}`);
      if (!installed(b.package)) assert.equal(b.reason, 'not installed');
    }
    // wasm loads here, with the features tfjs reports in this process too.
    await import('@tensorflow/tfjs-backend-wasm');
    const wasm = byOption['wasm']!;
    assert.equal(wasm.loads, true);
    assert.equal(wasm.tfBackend, 'wasm');
    assert.deepEqual(wasm.wasm, {
      simd: await tf.env().getAsync('WASM_HAS_SIMD_SUPPORT'),
      threads: await tf.env().getAsync('WASM_HAS_MULTITHREAD_SUPPORT'),
    });
    assert.equal(byOption['cpu']!.loads, true);
    // auto: the first of node-gpu, node, wasm that loads; what initBackend picks here.
    assert.equal(
      report.autoBackend,
      backends.find((b) => b.option !== 'cpu' && b.loads)?.option ?? null,
    );
    assert.equal(report.autoBackend, (await initBackend('auto')).option);

    // ONNX Runtime: the library imports it, so it loads; CUDA present XOR a reason.
    const ort = report.onnxRuntime;
    assert.equal(ort.loads, true);
    assert.equal(ort.version, require('onnxruntime-node/package.json').version);
    assert.ok(ort.providers.some((p: { name: string }) => p.name === 'cpu'));
    assert.equal(ort.providersFrom, 'listSupportedBackends()');
    assert.deepEqual(ort.requested, executionProviders());
    assert.equal(ort.cuda.present, ort.cuda.reason === null);

    // CPU and the engine's defaults.
    assert.equal(report.cpu.logicalCores, os.cpus().length);
    assert.equal(report.cpu.availableParallelism, os.availableParallelism());
    assert.equal(report.engine.threads, os.availableParallelism());
    assert.equal(report.engine.workers, os.availableParallelism());
    // --finetune-threads' default: the cores, at most 2, on a backend that trains on one thread.
    assert.equal(
      report.engine.finetuneThreads,
      report.autoBackend === 'node' || report.autoBackend === 'node-gpu'
        ? 1
        : Math.min(2, os.availableParallelism()),
    );
    assert.equal(report.engine.auto, report.autoBackend === 'node-gpu' ? 'tfjs' : 'onnx');
    if (process.platform === 'linux' && report.cpu.extensions) {
      const flags = readFileSync('/proc/cpuinfo', 'utf8')
        .match(/^flags\s*:(.*)$/m)![1]!
        .split(/\s+/);
      assert.equal(report.cpu.extensions.avx2, flags.includes('avx2'));
      assert.equal(report.cpu.extensions.avx512f, flags.includes('avx512f'));
    }

    // The cache named by --cache-dir, with the one entry put above.
    assert.equal(report.cache.dir, path.resolve(cacheDir));
    assert.equal(report.cache.exists, true);
    assert.equal(report.cache.writable, true);
    assert.equal(report.cache.reason, null);
    assert.equal(report.cache.entries, 1);
    assert.equal(report.cache.bytes, entryBytes);
    assert.deepEqual(report.cache.lowered, { count: 0, bytes: 0 });
  });

  test('the table by default; a cache not made yet, or a file in its place, is information (exit 0)', async () => {
    const fresh = path.join(dir, 'not-yet', 'cache');
    const text = await runCli(['doctor', '--cache-dir', fresh], dir);
    assert.equal(text.code, 0, text.stderr);
    assert.match(text.stdout, /^tfjs-finetune \S+, Node /);
    assert.match(
      text.stdout,
      /\nwasm +@tensorflow\/tfjs-backend-wasm +yes +SIMD (yes|no), threads (yes|no)\n/,
    );
    assert.match(text.stdout, /\n {2}cores +\d+ logical, availableParallelism \d+\n/);
    assert.ok(text.stdout.includes(`${fresh} (not created yet, writable)`), text.stdout);

    const file = path.join(dir, 'a-file');
    await writeFile(file, 'x');
    const r = await runCli(['doctor', '--json', '--cache-dir', file], dir);
    assert.equal(r.code, 0, r.stderr);
    const { cache } = JSON.parse(r.stdout);
    assert.equal(cache.exists, true);
    assert.equal(cache.writable, false);
    assert.equal(cache.reason, `${file} is not a folder`);
  });

  test('no training backend for auto: the findings, then one line and exit 1', async () => {
    // Every backend auto could pick fails to import, as a broken install would.
    const hooks = path.join(dir, 'hooks.mjs');
    await writeFile(
      hooks,
      `const BROKEN = ['@tensorflow/tfjs-node-gpu', '@tensorflow/tfjs-node', '@tensorflow/tfjs-backend-wasm'];
export async function resolve(specifier, context, next) {
  if (BROKEN.includes(specifier))
    return { url: 'data:text/javascript,throw new Error("simulated: cannot load")', shortCircuit: true };
  return next(specifier, context);
}
`,
    );
    const register = path.join(dir, 'register.mjs');
    await writeFile(
      register,
      `import { register } from 'node:module';\nregister(${JSON.stringify(`file://${hooks}`)});\n`,
    );
    const r = await runCliGuarded(['doctor', '--json'], dir, { nodeArgs: ['--import', register] });
    assert.equal(r.code, 1, r.stderr);
    const report = JSON.parse(r.stdout);
    assert.equal(report.autoBackend, null);
    assert.deepEqual(
      report.backends.map((b: Probe) => [b.option, b.loads, b.reason]),
      [
        ['node-gpu', false, 'simulated: cannot load'],
        ['node', false, 'simulated: cannot load'],
        ['wasm', false, 'simulated: cannot load'],
        ['cpu', true, null],
      ],
    );
    const why =
      'node-gpu: simulated: cannot load; node: simulated: cannot load; wasm: simulated: cannot load';
    assert.deepEqual(report.problems, [`no training backend loads for --backend auto (${why})`]);
    assert.deepEqual(r.stderr.trim().split('\n'), [
      `finetune: doctor: no training backend loads for --backend auto (${why})`,
    ]);
  });

  test('an invalid FINETUNE_ORT_PROVIDERS fails every frozen pass: exit 2, naming it', async () => {
    const r = await runCliGuarded(['doctor', '--json'], dir, {
      env: { FINETUNE_ORT_PROVIDERS: 'cpu,gpu' },
    });
    assert.equal(r.code, 2, r.stderr);
    assert.equal(JSON.parse(r.stdout).onnxRuntime.requested, null);
    assert.deepEqual(r.stderr.trim().split('\n'), [
      "finetune: doctor: Expected a comma-separated list of cpu, cuda, tensorrt, dml, coreml, webgpu for FINETUNE_ORT_PROVIDERS but received 'cpu,gpu'",
    ]);
  });
});
