import assert from 'node:assert/strict';
import { before, test } from 'node:test';
import * as tf from '@tensorflow/tfjs';
import { initBackend } from '../../src/backend/index.js';
import { buildHead, dropoutSeeder, logitsView } from '../../src/head/build.js';
import { ArrayBatches, balancedWeights } from '../../src/train/fit.js';
import { runStage, type StageOptions } from '../../src/train/stage.js';
import { seededRandom } from '../../src/util/random.js';

before(async () => {
  await initBackend('wasm');
});

/** Three Gaussian blobs in 16-d: linearly separable, so a head must learn them. */
function blobs(n: number, seed: number): ArrayBatches {
  const random = seededRandom(seed);
  const dim = 16;
  const x = new Float32Array(n * dim);
  const y = new Int32Array(n);
  for (let i = 0; i < n; i++) {
    const c = i % 3;
    y[i] = c;
    for (let d = 0; d < dim; d++) x[i * dim + d] = (d % 3 === c ? 2 : 0) + (random() - 0.5);
  }
  return new ArrayBatches(x, [dim], y);
}

async function trainOnce(swa: boolean): Promise<{
  acc: number;
  rawAcc: number;
  snapshots: number;
  losses: number[];
  weights: number[];
}> {
  const head = buildHead(16, 3, { hidden: 8, dropout: 0.2, seed: 3 });
  const logits = logitsView(head);
  const options: StageOptions = {
    name: 'head',
    forward: (x, training) => logits.apply(x, { training }) as tf.Tensor,
    variables: head.trainableWeights.map((w) => w.read() as tf.Variable),
    reseed: dropoutSeeder(head),
    epochs: 8,
    batchSize: 16,
    optimizer: 'adam',
    lr: 0.01,
    labelSmoothing: 0.1,
    classWeights: null,
    numClasses: 3,
    seed: 5,
    swa: swa ? { start: 0.5, freq: 2, lr: 0.005, annealEpochs: 0 } : null,
  };
  const r = await runStage(blobs(120, 1), blobs(30, 2), options);
  const weights = Array.from(head.getLayer('head_logits').getWeights()[0]!.dataSync());
  head.dispose();
  return {
    acc: (r.swa ?? r.raw)!.acc,
    rawAcc: r.raw!.acc,
    snapshots: r.snapshots,
    losses: r.history.map((h) => h.loss),
    weights,
  };
}

test('a head stage with SWA learns separable data, counts snapshots and frees every tensor', async () => {
  const before = tf.memory().numTensors;
  const r = await trainOnce(true);
  assert.equal(tf.memory().numTensors, before);
  assert.equal(r.snapshots, 2); // start epoch index 4 of 8, every 2nd: after epochs 5 and 7
  assert.ok(r.acc >= 0.9, `val acc ${r.acc}`);
  assert.ok(r.losses[r.losses.length - 1]! < r.losses[0]!, 'loss fell');
});

test('same seed, same result; SWA weights differ from raw weights', async () => {
  const a = await trainOnce(true);
  const b = await trainOnce(true);
  assert.deepEqual(a.losses, b.losses);
  assert.deepEqual(a.weights, b.weights);
  const raw = await trainOnce(false);
  assert.notDeepEqual(raw.weights, a.weights);
});

test('balanced class weights are n / (k · n_c)', () => {
  assert.deepEqual(balancedWeights(Int32Array.from([0, 0, 0, 1]), 2), [4 / 6, 2]);
  assert.deepEqual(balancedWeights(Int32Array.from([0, 2]), 3), [1, 0, 1]);
});
