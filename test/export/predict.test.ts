import assert from 'node:assert/strict';
import { cp, mkdir, rm } from 'node:fs/promises';
import path from 'node:path';
import { after, before, test } from 'node:test';
import * as tf from '@tensorflow/tfjs';
import { initBackend } from '../../src/backend/index.js';
import { evaluate, predict } from '../../src/export/predict.js';
import { train } from '../../src/train/train.js';
import { tempDir, writeColourDataset, writeTinyBackbone } from '../helpers.js';

let dir: string;
let cleanup: () => Promise<void>;
let run: string;
let data: string;

before(async () => {
  await initBackend('wasm');
  ({ dir, cleanup } = await tempDir('predict'));
  const backbone = await writeTinyBackbone(dir);
  data = path.join(dir, 'data');
  await writeColourDataset(data, 8, {
    cyan: [20, 200, 200],
    magenta: [200, 20, 200],
    yellow: [220, 220, 30],
  });
  run = path.join(dir, 'run');
  const summary = await train({
    data,
    out: run,
    backbone,
    epochs: 15,
    lr: 0.05,
    batchSize: 8,
    cache: false,
  });
  assert.equal(summary.onnx, path.join(run, 'model', 'model.onnx'));
});
after(async () => {
  await cleanup();
});

test('model.onnx and the tfjs export give the same probabilities', async () => {
  const before = tf.memory().numTensors;
  const viaTfjs = await predict({ model: run, inputs: [data], topK: 3, engine: 'tfjs' });
  const viaOnnx = await predict({ model: run, inputs: [data], topK: 3, engine: 'onnx' });
  assert.equal(tf.memory().numTensors, before);
  assert.equal(viaTfjs.engine, 'tfjs');
  assert.equal(viaOnnx.engine, 'onnx');
  assert.equal(viaTfjs.predictions.length, 24);
  let worst = 0;
  viaTfjs.predictions.forEach((p, i) => {
    const q = viaOnnx.predictions[i]!;
    assert.equal(q.path, p.path);
    assert.equal(q.top[0]!.label, p.top[0]!.label);
    for (const t of p.top) {
      const other = q.top.find((x) => x.label === t.label)!;
      worst = Math.max(worst, Math.abs(other.probability - t.probability));
    }
  });
  assert.ok(worst <= 1e-4, `max abs difference ${worst}`);
});

test('without a usable model.onnx the classifier still runs and says why', async () => {
  const before = tf.memory().numTensors;
  const used = await predict({ model: run, inputs: [data], engine: 'onnx' });
  assert.equal(used.onnxFallback, null);
  const viaTfjs = await predict({ model: run, inputs: [data], engine: 'tfjs' });
  assert.equal(viaTfjs.onnxFallback, null); // not wanted, so not a fallback
  // None exported: the normal fallback, lowered again here.
  const none = path.join(dir, 'run-no-onnx');
  await cp(run, none, { recursive: true });
  await rm(path.join(none, 'model', 'model.onnx'));
  const lowered = await predict({ model: none, inputs: [data] });
  assert.deepEqual(lowered.onnxFallback, { reason: 'no model.onnx', error: false });
  assert.equal(lowered.engine, 'onnx');
  // One that cannot be read: reported as an error, and the run goes on.
  const broken = path.join(dir, 'run-bad-onnx');
  await cp(none, broken, { recursive: true });
  const file = path.join(broken, 'model', 'model.onnx');
  await mkdir(file);
  const report = await evaluate({ model: broken, data });
  assert.deepEqual(report.onnxFallback, { reason: `${file}: not a regular file`, error: true });
  assert.equal(report.count, 24);
  lowered.predictions.forEach((p, i) => {
    assert.equal(p.top[0]!.label, used.predictions[i]!.top[0]!.label);
    assert.ok(Math.abs(p.top[0]!.probability - used.predictions[i]!.top[0]!.probability) <= 1e-5);
  });
  assert.equal(tf.memory().numTensors, before);
});

test('evaluate reports per-class figures on labelled folders; unknown classes are named', async () => {
  const report = await evaluate({ model: run, data });
  assert.equal(report.count, 24);
  assert.deepEqual(report.labels, ['cyan', 'magenta', 'yellow']);
  assert.ok(report.accuracy >= 0.9, `accuracy ${report.accuracy}`);
  const other = path.join(dir, 'other');
  await writeColourDataset(other, 1, { black: [0, 0, 0] });
  await assert.rejects(evaluate({ model: run, data: other }), {
    message: `${path.join(other, 'black')}: class 'black' is not one of the training classes (cyan, magenta, yellow)`,
  });
});

test('predict: bad inputs are named', async () => {
  await assert.rejects(predict({ model: run, inputs: [path.join(dir, 'missing.png')] }), {
    message: `${path.join(dir, 'missing.png')}: no such file or folder`,
  });
  await assert.rejects(predict({ model: run, inputs: [data], topK: 0 }), {
    message: 'Expected a positive integer for topK but received 0',
  });
  await assert.rejects(predict({ model: dir, inputs: [data] }), /no model found/);
});
