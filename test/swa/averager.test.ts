import assert from 'node:assert/strict';
import { test } from 'node:test';
import * as tf from '@tensorflow/tfjs';
import { WeightAverager } from '../../src/swa/averager.js';
import {
  type AveragingPlan,
  averagesAfterEpoch,
  averagesAfterStep,
  emaDecay,
  type LrPlan,
  learningRateAt,
  parseFrequency,
  resolveSwaStart,
} from '../../src/swa/schedule.js';

const plan = (over: Partial<AveragingPlan> = {}): AveragingPlan => ({
  kind: 'swa',
  startEpoch: 1,
  frequency: { every: 2, unit: 'epoch' },
  swaLr: 0.01,
  schedule: 'constant',
  annealEpochs: 0,
  cycle: 1,
  emaDecay: 0.999,
  ...over,
});

const close = (a: number, b: number, what: string) =>
  assert.ok(Math.abs(a - b) < 1e-12, `${what}: ${a} vs ${b}`);

test('SWA every 2 epochs averages exactly the snapshot epochs', () => {
  const before = tf.memory().numTensors;
  const a = tf.tidy(() => tf.variable(tf.tensor1d([0, 0]), true, 'swa_test_a'));
  const b = tf.tidy(() => tf.variable(tf.scalar(0), true, 'swa_test_b'));
  const averager = new WeightAverager([a, b]);
  // start at epoch index 1, every 2nd epoch: snapshots after epochs 1, 3, 5 of 0..6
  const p = plan();
  const values = [10, 1, 20, 3, 30, 8, 40];
  const counts: number[] = [];
  for (let epoch = 0; epoch < values.length; epoch++) {
    tf.tidy(() => {
      a.assign(tf.tensor1d([values[epoch]!, -values[epoch]!]));
      b.assign(tf.scalar(2 * values[epoch]!));
    });
    if (averagesAfterEpoch(p, epoch)) averager.update();
    counts.push(averager.count());
  }
  assert.deepEqual(counts, [0, 1, 1, 2, 2, 3, 3]);
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

test('SWA every N steps, and a variable that joins late starts its own count', () => {
  const before = tf.memory().numTensors;
  // 4 steps an epoch, averaging from epoch 1, every 3 steps: after steps 2 and 5 of the
  // averaging phase, i.e. (epoch 1, step 2) and (epoch 2, step 1).
  const p = plan({ frequency: parseFrequency('swaFreq', '3s') });
  const due: string[] = [];
  for (let e = 0; e < 3; e++)
    for (let s = 0; s < 4; s++) {
      if (averagesAfterStep(p, e, s, 4)) due.push(`${e}.${s}`);
      assert.equal(averagesAfterEpoch(p, e), false, 'a step frequency takes no epoch snapshots');
    }
  assert.deepEqual(due, ['1.2', '2.1']);

  const a = tf.tidy(() => tf.variable(tf.scalar(0)));
  const late = tf.tidy(() => tf.variable(tf.scalar(0)));
  const averager = new WeightAverager([a]);
  const set = (x: number, y: number) =>
    tf.tidy(() => {
      a.assign(tf.scalar(x));
      late.assign(tf.scalar(y));
    });
  set(2, 100);
  averager.update(); // a: [2]
  set(4, 100);
  averager.update(); // a: [2, 4]
  averager.add([late]);
  set(9, 5);
  averager.update(); // a: [2, 4, 9]; late: [5]
  set(3, 7);
  averager.update(); // a: [2, 4, 9, 3]; late: [5, 7]
  const avg = averager.averaged()!;
  assert.deepEqual(
    avg.map((t) => t.dataSync()[0]),
    [(2 + 4 + 9 + 3) / 4, (5 + 7) / 2],
  );
  tf.dispose(avg);
  assert.equal(averager.state().counts!.length, 2);
  assert.deepEqual(averager.state().counts, [[4], [2]]);
  averager.dispose();
  tf.dispose([a, late]);
  assert.equal(tf.memory().numTensors, before);
});

test('EMA with warm-up against hand-computed values; state round trip', () => {
  const before = tf.memory().numTensors;
  // d_t = min(0.5, (1 + t)/(10 + t)): t=1 → 2/11, t=2 → 3/12 = 0.25
  assert.equal(emaDecay(0.5, 1), 2 / 11);
  assert.equal(emaDecay(0.5, 100), 0.5);
  assert.equal(emaDecay(0.999, 0), 0.1);
  const v = tf.tidy(() => tf.variable(tf.scalar(1), true, 'ema_test_v'));
  const ema = new WeightAverager([v], { kind: 'ema', decay: 0.5 });
  ema.update(); // 1 (the first update is the weights)
  tf.tidy(() => v.assign(tf.scalar(12)));
  ema.update(); // 2/11·1 + 9/11·12 = 10
  tf.tidy(() => v.assign(tf.scalar(2)));
  ema.update(); // 0.25·10 + 0.75·2 = 4
  const state = ema.state();
  assert.equal(state.count, 3);
  close(state.values[0]!.data[0]!, 4, 'ema');
  const other = new WeightAverager([v], { kind: 'ema', decay: 0.5 });
  other.restore(state);
  assert.equal(other.count(), 3);
  const avg = other.averaged()!;
  close(avg[0]!.dataSync()[0]!, 4, 'restored');
  tf.dispose(avg);
  other.dispose();
  ema.dispose();
  v.dispose();
  assert.equal(tf.memory().numTensors, before);
});

test('swa start as a fraction or an epoch; frequencies in epochs and steps', () => {
  assert.equal(resolveSwaStart(0.75, 40), 30);
  assert.equal(resolveSwaStart(5, 10), 5);
  assert.throws(
    () => resolveSwaStart(10, 10),
    /Expected an epoch from 1 to 9 or a fraction of the epochs below 1 for swaStart but received 10/,
  );
  assert.deepEqual(parseFrequency('swaFreq', 2), { every: 2, unit: 'epoch' });
  assert.deepEqual(parseFrequency('swaFreq', '2'), { every: 2, unit: 'epoch' });
  assert.deepEqual(parseFrequency('swaFreq', '50s'), { every: 50, unit: 'step' });
  for (const bad of [0, -1, 1.5, '3x', 's', ''])
    assert.throws(() => parseFrequency('swaFreq', bad), /for swaFreq but received/);
  const p = plan({ startEpoch: 4, frequency: { every: 3, unit: 'epoch' } });
  assert.deepEqual(
    Array.from({ length: 12 }, (_, e) => averagesAfterEpoch(p, e)),
    [false, false, false, false, true, false, false, true, false, false, true, false],
  );
});

test('learning-rate schedules at chosen epochs against their formulas', () => {
  const base: LrPlan = {
    lr: 0.1,
    epochs: 10,
    schedule: 'constant',
    warmupSteps: 0,
    averaging: null,
  };
  const at = (p: LrPlan, epoch: number, step = 0, steps = 5) =>
    learningRateAt(p, epoch, step, steps);
  // constant, then SWA's constant
  const swa = { ...base, averaging: plan({ startEpoch: 6, swaLr: 0.02 }) };
  assert.equal(at(swa, 5), 0.1);
  assert.equal(at(swa, 6), 0.02);
  // SWALR cos / linear over 2 epochs from the first phase's rate
  const cos = {
    ...base,
    averaging: plan({ startEpoch: 6, swaLr: 0.02, schedule: 'cos', annealEpochs: 2 }),
  };
  close(at(cos, 6), 0.1 * 0.5 + 0.02 * 0.5, 'cos anneal, epoch 1 of 2'); // alpha = (1 − cos(π/2))/2
  close(at(cos, 7), 0.02, 'cos anneal done');
  const linear = {
    ...cos,
    averaging: { ...cos.averaging!, schedule: 'linear' as const, annealEpochs: 4 },
  };
  close(at(linear, 6), 0.1 * 0.75 + 0.02 * 0.25, 'linear, 1 of 4');
  // cyclic: 2-epoch cycles of 5 steps, from lr to swaLr: t = (i mod 10 + 1)/10
  const cyclic = {
    ...base,
    averaging: plan({ startEpoch: 6, swaLr: 0.02, schedule: 'cyclic', cycle: 2 }),
  };
  close(at(cyclic, 6, 0), 0.9 * 0.1 + 0.1 * 0.02, 'cyclic, first step');
  close(at(cyclic, 7, 4), 0.02, 'cyclic, last step of the cycle');
  close(at(cyclic, 8, 0), 0.9 * 0.1 + 0.1 * 0.02, 'cyclic, next cycle');
  assert.deepEqual(
    [5, 6, 7, 8, 9].map((e) => averagesAfterEpoch(cyclic.averaging!, e)),
    [false, false, true, false, true],
  );
  // cos before averaging: from lr towards swaLr at the averaging start (epoch 6)
  const cosFirst = { ...swa, schedule: 'cos' as const };
  close(at(cosFirst, 0), 0.1, 'cos start');
  close(at(cosFirst, 3), 0.02 + (0.08 * (1 + Math.cos(Math.PI / 2))) / 2, 'cos half way');
  // cos without averaging goes towards 0 over all epochs
  close(at({ ...base, schedule: 'cos' }, 5), (0.1 * (1 + Math.cos(Math.PI / 2))) / 2, 'cos to 0');
  // step: ÷10 at 50% and 75% of the epochs before averaging (epochs 5 and 7 of 10)
  const step = { ...base, schedule: 'step' as const };
  assert.deepEqual(
    [0, 4, 5, 6, 7, 9].map((e) => at(step, e)),
    [0.1, 0.1, 0.1 * 0.1, 0.1 * 0.1, 0.1 * 0.1 ** 2, 0.1 * 0.1 ** 2],
  );
  // warm-up: (step + 1)/warmupSteps of the scheduled rate over the first steps
  const warm = { ...base, warmupSteps: 8 };
  close(at(warm, 0, 0), 0.1 / 8, 'warm-up first step');
  close(at(warm, 1, 2), (0.1 * 8) / 8, 'warm-up last step (global 7)');
  assert.equal(at(warm, 1, 3), 0.1);
  // EMA averages after every step once started, never at epoch ends
  const ema = plan({ kind: 'ema', startEpoch: 2 });
  assert.deepEqual(
    [averagesAfterStep(ema, 1, 4, 5), averagesAfterStep(ema, 2, 0, 5), averagesAfterEpoch(ema, 3)],
    [false, true, false],
  );
});
