import assert from 'node:assert/strict';
import { test } from 'node:test';
import * as tf from '@tensorflow/tfjs';
import { WeightAverager } from '../../src/swa/averager.js';
import {
  isSnapshotEpoch,
  resolveSwaStart,
  type SwaSchedule,
  swaLearningRate,
} from '../../src/swa/schedule.js';
import type { EpochLogs } from '../../src/train/callbacks.js';
import { swaCallback } from '../../src/train/swa-callback.js';

const logs = (epoch: number): EpochLogs => ({
  stage: 't',
  epoch,
  loss: 0,
  acc: 0,
  lr: 0,
  seconds: 0,
});

test('SWA with freq 2 averages exactly the snapshot epochs, counted in snapshots', async () => {
  const before = tf.memory().numTensors;
  const a = tf.tidy(() => tf.variable(tf.tensor1d([0, 0]), true, 'swa_test_a'));
  const b = tf.tidy(() => tf.variable(tf.scalar(0), true, 'swa_test_b'));
  const averager = new WeightAverager([a, b]);
  // start at epoch index 1, every 2nd epoch: snapshots after epochs 1, 3, 5 of 0..6
  const schedule: SwaSchedule = {
    startEpoch: 1,
    freq: 2,
    swaLr: 0.1,
    annealEpochs: 0,
    annealStrategy: 'cos',
  };
  const cb = swaCallback(averager, schedule);
  const values = [10, 1, 20, 3, 30, 8, 40];
  const seen: (number | undefined)[] = [];
  for (let epoch = 0; epoch < values.length; epoch++) {
    tf.tidy(() => {
      a.assign(tf.tensor1d([values[epoch]!, -values[epoch]!]));
      b.assign(tf.scalar(2 * values[epoch]!));
    });
    const l = logs(epoch + 1);
    await cb.onEpochEnd!(epoch, l);
    seen.push(l.snapshots);
  }
  assert.deepEqual(seen, [0, 1, 1, 2, 2, 3, 3]);
  assert.equal(averager.count(), 3);
  // (1 + 3 + 8) / 3 = 4: equal weights per snapshot, not per epoch since start
  const avg = averager.averaged()!;
  assert.deepEqual(Array.from(avg[0]!.dataSync()), [4, -4]);
  assert.equal(avg[1]!.dataSync()[0], 8);
  tf.dispose(avg);

  averager.swapIn();
  assert.deepEqual(Array.from(a.dataSync()), [4, -4]);
  averager.swapOut();
  assert.deepEqual(Array.from(a.dataSync()), [40, -40]);
  averager.apply();
  assert.equal(b.dataSync()[0], 8);

  averager.dispose();
  a.dispose();
  b.dispose();
  assert.equal(tf.memory().numTensors, before);
});

test('EMA weighting and state round trip', () => {
  const before = tf.memory().numTensors;
  const v = tf.tidy(() => tf.variable(tf.scalar(1), true, 'ema_test_v'));
  const ema = new WeightAverager([v], { kind: 'ema', decay: 0.5 });
  ema.update(); // 1
  tf.tidy(() => v.assign(tf.scalar(3)));
  ema.update(); // 0.5*1 + 0.5*3 = 2
  tf.tidy(() => v.assign(tf.scalar(6)));
  ema.update(); // 0.5*2 + 0.5*6 = 4
  const state = ema.state();
  assert.equal(state.count, 3);
  assert.deepEqual(state.values[0]!.data, [4]);
  const other = new WeightAverager([v], { kind: 'ema', decay: 0.5 });
  other.restore(state);
  assert.equal(other.count(), 3);
  const avg = other.averaged()!;
  assert.equal(avg[0]!.dataSync()[0], 4);
  tf.dispose(avg);
  other.dispose();
  ema.dispose();
  v.dispose();
  assert.equal(tf.memory().numTensors, before);
});

test('swa start as a fraction or an epoch, and the LR schedule', () => {
  assert.equal(resolveSwaStart(0.75, 40), 30);
  assert.equal(resolveSwaStart(5, 10), 5);
  assert.throws(
    () => resolveSwaStart(10, 10),
    /Expected an epoch from 1 to 9 or a fraction of the epochs below 1 for swaStart but received 10/,
  );
  const s: SwaSchedule = {
    startEpoch: 4,
    freq: 3,
    swaLr: 0.01,
    annealEpochs: 0,
    annealStrategy: 'cos',
  };
  assert.deepEqual(
    Array.from({ length: 12 }, (_, e) => isSnapshotEpoch(s, e)),
    [false, false, false, false, true, false, false, true, false, false, true, false],
  );
  assert.equal(swaLearningRate(s, 0.1, 3), 0.1);
  assert.equal(swaLearningRate(s, 0.1, 4), 0.01);
  const annealed: SwaSchedule = { ...s, annealEpochs: 2, annealStrategy: 'linear' };
  assert.ok(Math.abs(swaLearningRate(annealed, 0.1, 4) - 0.055) < 1e-12);
  assert.ok(Math.abs(swaLearningRate(annealed, 0.1, 5) - 0.01) < 1e-12);
  assert.ok(
    Math.abs(swaLearningRate({ ...annealed, annealStrategy: 'cos' }, 0.1, 4) - 0.055) < 1e-12,
  );
});
