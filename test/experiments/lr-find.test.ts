import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { after, before, test } from 'node:test';
import * as tf from '@tensorflow/tfjs';
import { initBackend } from '../../src/backend/index.js';
import { type LrFindResult, lrFind } from '../../src/experiments/lr-find.js';
import { embedSplits, prepareRun } from '../../src/train/run.js';
import { colourWorkspace, runCli } from '../helpers.js';

let dir: string;
let cleanup: () => Promise<void>;
let backbone: string;
let data: string;
let cacheDir: string;

before(async () => {
  await initBackend('wasm');
  ({ dir, cleanup, backbone, data } = await colourWorkspace('lr-find'));
  cacheDir = path.join(dir, 'cache');
});
after(async () => {
  await cleanup();
});

/** Mean squared norm of the training features. */
async function meanSquaredNorm(): Promise<number> {
  const run = await prepareRun({ data, backbone, cacheDir });
  try {
    const { train, featureSize } = await embedSplits(run);
    let sum = 0;
    for (let i = 0; i < train.features.length; i++) sum += train.features[i]! ** 2;
    return sum / (train.features.length / featureSize);
  } finally {
    run.dispose();
  }
}

test('plain SGD: the loss turns where gradient descent stops being stable (known from the features)', async () => {
  // Softmax cross-entropy's Hessian in the logits has eigenvalues ≤ 1/2, so in the weights
  // λmax ≤ E‖x‖²/2 and full-batch gradient descent is stable below 2/λmax ≥ 4/E‖x‖². The
  // bound is loose by the softmax's spread, so divergence comes a few times above it.
  const stable = 4 / (await meanSquaredNorm());
  const before = tf.memory().numTensors;
  const out = path.join(dir, 'sgd');
  const result = await lrFind(
    { data, backbone, cacheDir, out, optimizer: 'sgd', labelSmoothing: 0, dropout: 0 },
    { startLr: 1e-4, endLr: 1e5, steps: 100 },
  );
  assert.equal(tf.memory().numTensors, before);
  assert.ok(result.diverged);
  const last = result.points.at(-1)!.lr;
  assert.ok(result.points.length < 100);
  assert.ok(last > stable && last < 20 * stable, `stopped at ${last}; stable below ${stable}`);
  const steep = result.suggestions.steep;
  assert.ok(
    steep > stable / 10 && steep < 2 * stable,
    `steepest at ${steep}; stable below ${stable}`,
  );
  assert.ok(result.suggested < last);
  // An exponential ramp: a constant ratio between steps.
  const ratio = 1e9 ** (1 / 99);
  for (let i = 1; i < result.points.length; i++)
    assert.ok(Math.abs(result.points[i]!.lr / result.points[i - 1]!.lr - ratio) < 1e-9);

  const written = JSON.parse(
    await readFile(path.join(out, 'lr-find.json'), 'utf8'),
  ) as LrFindResult;
  assert.equal(written.suggested, result.suggested);
  assert.equal(written.points.length, result.points.length);
  assert.deepEqual(written.settings, {
    startLr: 1e-4,
    endLr: 1e5,
    steps: 100,
    beta: 0.98,
    divergence: 4,
  });
});

test('Adam on the same features: a suggestion in the range where Adam trains a head, in seconds', async () => {
  const before = tf.memory().numTensors;
  const result = await lrFind({ data, backbone, cacheDir, out: path.join(dir, 'adam') });
  assert.equal(tf.memory().numTensors, before);
  assert.equal(result.points.length, 100);
  assert.ok(result.suggested >= 1e-4 && result.suggested <= 0.5, `suggested ${result.suggested}`);
  // The loss where it suggests is below where the ramp began.
  const at = result.points.find((p) => p.lr >= result.suggested)!;
  assert.ok(at.smoothed < result.points[10]!.smoothed);
  assert.ok(result.seconds['ramp']! < 30);
});

test('ramp settings are checked before any work', async () => {
  await assert.rejects(lrFind({ data, backbone }, { startLr: 1, endLr: 0.1 }), {
    message: 'Expected a number above startLr (1) for endLr but received 0.1',
  });
  await assert.rejects(lrFind({ data, backbone }, { steps: 5 }), {
    message: 'Expected an integer of at least 10 for steps but received 5',
  });
  await assert.rejects(lrFind({ data, backbone }, { startLr: -1 }), {
    message: 'Expected a positive number for startLr but received -1',
  });
});

test('finetune lr-find on the real CLI prints the suggestion; train-only flags are refused', async () => {
  const run = await runCli(
    ['lr-find', '--data', data, '--backbone', backbone, '--out', 'lr', '--steps', '40'],
    dir,
  );
  assert.equal(run.code, 0, run.stderr);
  assert.match(
    run.stdout,
    /^suggested lr [\d.e-]+ \(valley\); steep [\d.e-]+, minimum\/10 [\d.e-]+; 40 of 40 steps; wrote lr\/lr-find.json \(/,
  );
  const refused = await runCli(['lr-find', '--data', data, '--epochs', '3'], dir);
  assert.equal(refused.code, 2);
  assert.match(refused.stderr, /Unknown argument: epochs/);
});
