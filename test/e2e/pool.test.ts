import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { writeFile } from 'node:fs/promises';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { pathToFileURL } from 'node:url';
import * as tf from '@tensorflow/tfjs';
import { type Backbone, loadBackbone } from '../../src/backbones/load.js';
import { cutPrefix } from '../../src/backbones/prefix.js';
import { initBackend } from '../../src/backend/index.js';
import { lowerToOnnx } from '../../src/engine/onnx/lower.js';
import { WorkerPoolFrozenModel, type WorkerRecipe } from '../../src/engine/pool.js';
import { TfjsFrozenModel } from '../../src/engine/tfjs.js';
import { FinetuneError } from '../../src/errors.js';
import { type ClassifierMetadata, saveClassifier } from '../../src/export/model-dir.js';
import { ROOT, tempDir, writeTinyBackbone } from '../helpers.js';

// A small input size keeps every forward pass fast; the machine has 2 shared cores.
const SIZE = 96;
const RECIPE: WorkerRecipe = {
  kind: 'backbone',
  backbone: 'nsfwjs_mobilenet_v2',
  options: { inputSize: SIZE },
};

let dir: string;
let cleanup: () => Promise<void>;
let tiny: string;
let backbone: Backbone;
let pool1: WorkerPoolFrozenModel;
let pool2: WorkerPoolFrozenModel;

/** Raw pixels 0–255 (NHWC), reproducible: a 32-bit LCG. */
function pixels(n: number, size: number, seed: number): Float32Array {
  const out = new Float32Array(n * size * size * 3);
  let s = seed >>> 0;
  for (let i = 0; i < out.length; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    out[i] = s >>> 24;
  }
  return out;
}

function maxAbsDiff(a: Float32Array, b: Float32Array): number {
  assert.equal(a.length, b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!));
  return m;
}

before(async () => {
  await initBackend('wasm');
  ({ dir, cleanup } = await tempDir('pool'));
  tiny = await writeTinyBackbone(dir);
  [backbone, pool1, pool2] = await Promise.all([
    loadBackbone('nsfwjs_mobilenet_v2', { inputSize: SIZE }),
    WorkerPoolFrozenModel.create(RECIPE, { workers: 1 }),
    WorkerPoolFrozenModel.create(RECIPE, { workers: 2 }),
  ]);
});
after(async () => {
  backbone?.dispose();
  await Promise.all([pool1?.dispose(), pool2?.dispose()]);
  await cleanup();
});

test('2 workers give exactly what 1 worker gives, and match in-process tfjs within 1e-5', async () => {
  assert.equal(pool2.engine, 'tfjs');
  assert.equal(pool2.layout, 'nhwc');
  assert.equal(pool2.workers, 2);
  assert.equal(pool2.inputSize, SIZE);
  assert.equal(pool2.outputSize, backbone.featureSize);
  const n = 5; // odd: chunks of 3 and 2
  const x = pixels(n, SIZE, 7);
  const copy = x.slice();
  const [two, one] = await Promise.all([pool2.run(x, n), pool1.run(x, n)]);
  assert.deepEqual(x, copy, 'run must not detach or change the caller’s batch');
  assert.equal(two.length, n * backbone.featureSize);
  assert.equal(maxAbsDiff(two, one), 0);
  const local = new TfjsFrozenModel(backbone.inputSize, backbone.featureSize, (p) =>
    backbone.embed(p),
  );
  const expected = await local.run(x, n);
  const diff = maxAbsDiff(two, expected);
  assert.ok(diff <= 1e-5, `max abs diff ${diff} vs in-process tfjs`);
});

test('fewer images than workers, none, and concurrent runs come back in order', async () => {
  const x = pixels(3, SIZE, 11);
  const per = SIZE * SIZE * 3;
  const f = backbone.featureSize;
  const all = await pool1.run(x, 3);
  const single = await pool2.run(x.subarray(0, per), 1);
  assert.equal(maxAbsDiff(single, all.subarray(0, f)), 0);
  assert.equal((await pool2.run(x, 0)).length, 0);
  // Interleaved runs of different sizes on the same pool: each gets its own rows back.
  const [a, b, c] = await Promise.all([
    pool2.run(x.subarray(per), 2),
    pool2.run(x.subarray(2 * per), 1),
    pool2.run(x, 3),
  ]);
  assert.equal(maxAbsDiff(a, all.subarray(f)), 0);
  assert.equal(maxAbsDiff(b, all.subarray(2 * f)), 0);
  assert.equal(maxAbsDiff(c, all), 0);
  await assert.rejects(pool2.run(x, 4), /Expected at least/);
});

test('firstUnfrozen runs the shared prefix cut: a worker gives what this thread gives', async () => {
  const first = 'block_4_expand';
  const pool = await WorkerPoolFrozenModel.create(
    { ...RECIPE, firstUnfrozen: first },
    { workers: 1 },
  );
  const inProcess = cutPrefix(backbone.model!, first);
  try {
    assert.equal(inProcess.cutLayer, 'block_3_project_BN');
    assert.deepEqual(inProcess.cutShape, [SIZE / 8, SIZE / 8, 32]);
    const row = inProcess.cutShape.reduce((a, b) => a * b, 1);
    assert.equal(pool.outputSize, row);
    const x = pixels(3, SIZE, 5);
    const got = await pool.run(x, 3);
    assert.equal(got.length, 3 * row);
    const expected = tf.tidy(
      () =>
        (
          inProcess.model.predict(tf.tensor4d(x, [3, SIZE, SIZE, 3])) as tf.Tensor
        ).dataSync() as Float32Array,
    );
    assert.equal(maxAbsDiff(got, expected), 0);
  } finally {
    await pool.dispose();
  }
});

test('a classifier recipe runs the saved full model', async () => {
  const input = tf.input({ shape: [32, 32, 3] });
  const pooled = tf.layers.globalAveragePooling2d({}).apply(input) as tf.SymbolicTensor;
  const probs = tf.layers
    .dense({
      units: 3,
      activation: 'softmax',
      kernelInitializer: tf.initializers.glorotUniform({ seed: 3 }),
    })
    .apply(pooled) as tf.SymbolicTensor;
  const model = tf.model({ inputs: input, outputs: probs });
  const run = path.join(dir, 'run');
  await saveClassifier(model, run, {
    toolkit: 'tfjs-finetune',
    labels: ['a', 'b', 'c'],
    contents: 'full',
  } as unknown as ClassifierMetadata);
  const pool = await WorkerPoolFrozenModel.create(
    { kind: 'classifier', model: run },
    { workers: 2 },
  );
  try {
    assert.equal(pool.inputSize, 32);
    assert.equal(pool.outputSize, 3);
    const x = pixels(3, 32, 9);
    const expected = tf.tidy(
      () => (model.predict(tf.tensor4d(x, [3, 32, 32, 3])) as tf.Tensor).dataSync() as Float32Array,
    );
    const diff = maxAbsDiff(await pool.run(x, 3), expected);
    assert.ok(diff <= 1e-6, `max abs diff ${diff}`);
  } finally {
    await pool.dispose();
    model.dispose();
  }
});

test('a recipe that cannot load rejects with the worker’s message', async () => {
  const bad = 'models/none/model.json';
  await assert.rejects(
    WorkerPoolFrozenModel.create({ kind: 'backbone', backbone: bad, options: {} }, { workers: 2 }),
    (err: Error) => err instanceof FinetuneError && err.message.includes(bad),
  );
  await assert.rejects(
    WorkerPoolFrozenModel.create(
      { kind: 'backbone', backbone: tiny, options: {}, firstUnfrozen: 'nope' },
      { workers: 1 },
    ),
    { message: "The backbone has no layer 'nope' to cut before" },
  );
  await assert.rejects(WorkerPoolFrozenModel.create(RECIPE, { workers: 0 }), /workers/);
});

test('a worker that dies rejects the pending run; dispose rejects later runs', async () => {
  const pool = await WorkerPoolFrozenModel.create(
    { kind: 'backbone', backbone: tiny, options: {} },
    { workers: 2 },
  );
  const x = pixels(4, 32, 3);
  assert.equal((await pool.run(x, 4)).length, 4 * 16);
  // No public way to crash a worker: terminate one from under the pool.
  const slots = (pool as unknown as { slots: { worker: { terminate(): Promise<number> } }[] })
    .slots;
  // Enough images that the worker is still busy when it is terminated.
  const pending = pool.run(pixels(512, 32, 4), 512);
  await slots[1]!.worker.terminate();
  await assert.rejects(pending, /tfjs pool worker 1 exited/);
  await assert.rejects(pool.run(x, 4), /tfjs pool worker 1 exited/);
  await pool.dispose();
  await pool.dispose();
  await assert.rejects(pool.run(x, 4), /disposed/);
});

test('after dispose no worker keeps the process alive', async () => {
  // A child process exits on its own only if every worker is gone.
  const script = path.join(dir, 'exit.mjs');
  const pool = pathToFileURL(path.join(ROOT, 'dist', 'src', 'engine', 'pool.js')).href;
  await writeFile(
    script,
    `import { WorkerPoolFrozenModel } from ${JSON.stringify(pool)};
const p = await WorkerPoolFrozenModel.create({ kind: 'backbone', backbone: ${JSON.stringify(tiny)}, options: {} }, { workers: 2 });
const y = await p.run(new Float32Array(3 * 32 * 32 * 3), 3);
await p.dispose();
process.stdout.write(String(y.length));
`,
  );
  const child = spawn(process.execPath, [script], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d) => (stdout += d));
  child.stderr.on('data', (d) => (stderr += d));
  const timer = setTimeout(() => child.kill(), 20_000);
  const code = await new Promise<number | null>((resolve) => child.on('close', resolve));
  clearTimeout(timer);
  assert.equal(code, 0, `child did not exit cleanly: ${stderr}`);
  assert.equal(stdout, String(3 * 16));
});

test('ONNX Runtime workers: disposed or ended mid-run without aborting; a load failure in their words', async () => {
  // A worker stopped inside ONNX Runtime's run aborts the whole process when the run
  // returns (exit 134), so the pool lets a run in progress finish first.
  const onnx = lowerToOnnx(backbone.model!);
  const pool = await WorkerPoolFrozenModel.create(
    { kind: 'onnx', onnx, inputSize: SIZE, rows: 'nhwc' },
    { workers: 2 },
  );
  assert.deepEqual([pool.engine, pool.layout], ['onnx', 'nchw']);
  const x = pixels(1024, SIZE, 3);
  const running = pool.run(x, 1024);
  const queued = pool.run(x, 1024);
  running.catch(() => {});
  queued.catch(() => {});
  await new Promise((resolve) => setTimeout(resolve, 100));
  await pool.dispose();
  await assert.rejects(running, /The ONNX Runtime worker pool was disposed/);
  await assert.rejects(queued, /The ONNX Runtime worker pool was disposed/);
  await assert.rejects(pool.run(x, 4), /The ONNX Runtime worker pool was disposed/);

  // The process ending mid-run (a signal's handler, an error's exit) keeps its exit code.
  const onnxFile = path.join(dir, 'backbone.onnx');
  await writeFile(onnxFile, onnx);
  const script = path.join(dir, 'exit-mid-run.mjs');
  const poolModule = pathToFileURL(path.join(ROOT, 'dist', 'src', 'engine', 'pool.js')).href;
  await writeFile(
    script,
    `import { readFileSync } from 'node:fs';
import { WorkerPoolFrozenModel } from ${JSON.stringify(poolModule)};
const onnx = new Uint8Array(readFileSync(${JSON.stringify(onnxFile)}));
const p = await WorkerPoolFrozenModel.create({ kind: 'onnx', onnx, inputSize: ${SIZE}, rows: 'nhwc' }, { workers: 2 });
p.run(new Float32Array(1024 * 3 * ${SIZE} * ${SIZE}), 1024).catch(() => {});
setTimeout(() => process.exit(130), 100);
`,
  );
  const child = spawnSync(process.execPath, [script], { encoding: 'utf8', timeout: 60_000 });
  assert.equal(child.status, 130, child.stderr);
  assert.equal(child.stderr, '');

  // The session's own error, thrown in the worker, comes back as it is.
  await assert.rejects(
    WorkerPoolFrozenModel.create(
      { kind: 'onnx', onnx: onnx.subarray(0, 100), inputSize: SIZE, rows: 'nhwc' },
      { workers: 2 },
    ),
    (err: Error) =>
      err instanceof FinetuneError &&
      err.message.startsWith('ONNX Runtime could not load the lowered model'),
  );
});
