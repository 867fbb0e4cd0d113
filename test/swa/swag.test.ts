import assert from 'node:assert/strict';
import { test } from 'node:test';
import * as tf from '@tensorflow/tfjs';
import {
  decodeSwag,
  encodeSwag,
  SwagCollector,
  SwagPosterior,
  seededNormal,
} from '../../src/swa/swag.js';

const near = (a: ArrayLike<number>, b: ArrayLike<number>, what: string, tol = 1e-5) => {
  assert.equal(a.length, b.length, `${what}: lengths`);
  for (let i = 0; i < a.length; i++)
    assert.ok(Math.abs(a[i]! - b[i]!) <= tol, `${what}[${i}]: ${a[i]} vs ${b[i]}`);
};

test('SWAG moments and deviations match hand-computed values; the window keeps the last K', () => {
  const before = tf.memory().numTensors;
  const a = tf.tidy(() => tf.variable(tf.tensor1d([0, 0]), true, 'swag_test_a'));
  const b = tf.tidy(() => tf.variable(tf.tensor2d([[0]]), true, 'swag_test_b'));
  const swag = new SwagCollector([a, b], { rank: 3 });
  const snaps = [1, 3, 8, 4, 2];
  const means: number[] = [];
  const devsSeen: number[] = [];
  snaps.forEach((x, i) => {
    tf.tidy(() => {
      a.assign(tf.tensor1d([x, -2 * x]));
      b.assign(tf.tensor2d([[x * x]]));
    });
    swag.update();
    const mean = snaps.slice(0, i + 1).reduce((s, v) => s + v, 0) / (i + 1);
    means.push(mean);
    devsSeen.push(x - mean);
  });
  assert.equal(swag.count(), 5);
  const s = swag.state();
  const n = snaps.length;
  const mean = means.at(-1)!;
  const sq = snaps.reduce((t, v) => t + v * v, 0) / n;
  const mean4 = snaps.reduce((t, v) => t + v ** 2, 0) / n;
  const sq4 = snaps.reduce((t, v) => t + v ** 4, 0) / n;
  assert.deepEqual(s.names, ['swag_test_a', 'swag_test_b']);
  assert.deepEqual(s.shapes, [[2], [1, 1]]);
  near(s.mean, [mean, -2 * mean, mean4], 'mean');
  near(s.sqMean, [sq, 4 * sq, sq4], 'sqMean', 1e-3);
  // Snapshots 3, 4 and 5 (the ring went round once), oldest first; each w − mean after it.
  assert.equal(s.deviations.length, 3);
  s.deviations.forEach((row, j) => {
    const i = j + 2;
    const m2 = snaps.slice(0, i + 1).reduce((t, v) => t + v * v, 0) / (i + 1);
    near(row, [devsSeen[i]!, -2 * devsSeen[i]!, snaps[i]! ** 2 - m2], `deviation ${j}`, 1e-4);
  });
  swag.dispose();
  tf.dispose([a, b]);
  assert.equal(tf.memory().numTensors, before);
});

test('stacked members keep their own counts, moments and deviations', () => {
  const before = tf.memory().numTensors;
  const v = tf.tidy(() => tf.variable(tf.zeros([2, 3]), true, 'swag_test_stacked'));
  const swag = new SwagCollector([v], { rank: 2, members: 2 });
  const set = (m0: number, m1: number) =>
    tf.tidy(() => v.assign(tf.tensor2d([new Array(3).fill(m0), new Array(3).fill(m1)])));
  set(1, 10);
  swag.update([0, 1]);
  set(3, 20);
  swag.update([1]);
  set(5, 30);
  swag.update([0, 1]);
  assert.equal(swag.count(0), 2);
  assert.equal(swag.count(1), 3);
  const s0 = swag.state(0);
  const s1 = swag.state(1);
  near(s0.mean, [3, 3, 3], 'member 0 mean');
  near(s0.sqMean, [13, 13, 13], 'member 0 sqMean');
  near(s1.mean, [20, 20, 20], 'member 1 mean');
  assert.equal(s0.deviations.length, 2);
  near(s0.deviations[0]!, [0, 0, 0], 'member 0 first deviation');
  near(s0.deviations[1]!, [2, 2, 2], 'member 0 second deviation');
  // Member 1: deviations of snapshots 2 and 3: 20 − 15 and 30 − 20.
  near(s1.deviations[0]!, [5, 5, 5], 'member 1 deviation (2)');
  near(s1.deviations[1]!, [10, 10, 10], 'member 1 deviation (3)');
  swag.dispose();
  v.dispose();
  assert.equal(tf.memory().numTensors, before);
});

test('samples have the variables shapes; zero variance gives the mean exactly', () => {
  const before = tf.memory().numTensors;
  const a = tf.tidy(() => tf.variable(tf.tensor2d([[0.1, -0.7, 2.5]]), true, 'swag_test_zero_a'));
  const b = tf.tidy(() => tf.variable(tf.tensor1d([0.3]), true, 'swag_test_zero_b'));
  const swag = new SwagCollector([a, b], { rank: 3 });
  for (let i = 0; i < 4; i++) swag.update();
  const normal = seededNormal(5);
  for (let s = 0; s < 3; s++) {
    const [ta, tb] = swag.sample(normal);
    assert.deepEqual(ta!.shape, [1, 3]);
    assert.deepEqual(tb!.shape, [1]);
    assert.deepEqual(Array.from(ta!.dataSync()), Array.from(a.dataSync()));
    assert.deepEqual(Array.from(tb!.dataSync()), Array.from(b.dataSync()));
    tf.dispose([ta!, tb!]);
  }
  swag.dispose();
  tf.dispose([a, b]);
  assert.equal(tf.memory().numTensors, before);
});

test('samples spread as the formula says and repeat for a seed', () => {
  const before = tf.memory().numTensors;
  // Diagonal only (rank term left out with one deviation): θ = mean + scale·σ·z/√2.
  const p = new SwagPosterior({
    rank: 2,
    count: 1,
    names: ['w'],
    shapes: [[2000]],
    mean: new Float32Array(2000).fill(1),
    sqMean: new Float32Array(2000).fill(5), // σ² = 5 − 1 = 4
    deviations: [new Float32Array(2000)],
  });
  const [t] = p.sample(seededNormal(9), 0.5);
  const x = Array.from(t!.dataSync());
  const m = x.reduce((s, v) => s + v, 0) / x.length;
  const sd = Math.sqrt(x.reduce((s, v) => s + (v - m) ** 2, 0) / x.length);
  // scale·σ/√2 = 0.5·2/√2 ≈ 0.707
  assert.ok(Math.abs(m - 1) < 0.05, `mean ${m}`);
  assert.ok(Math.abs(sd - Math.SQRT1_2) < 0.05, `sd ${sd}`);
  const [again] = p.sample(seededNormal(9), 0.5);
  assert.deepEqual(Array.from(again!.dataSync()), x);
  tf.dispose([t!, again!]);
  p.dispose();
  // Low rank only: θ = mean + scale·D·z₂/√(2(d − 1)), so θ − mean lies along the deviations.
  const q = new SwagPosterior({
    rank: 2,
    count: 2,
    names: ['w'],
    shapes: [[3]],
    mean: new Float32Array([0, 0, 0]),
    sqMean: new Float32Array([0, 0, 0]),
    deviations: [new Float32Array([1, 0, 0]), new Float32Array([0, 1, 0])],
  });
  const [u] = q.sample(seededNormal(3), 1);
  const uv = u!.dataSync();
  assert.equal(uv[2], 0);
  assert.ok(uv[0] !== 0 && uv[1] !== 0);
  u!.dispose();
  q.dispose();
  assert.equal(tf.memory().numTensors, before);
});

test('a state survives encodeSwag/decodeSwag; a changed byte is refused naming the file', () => {
  const state = {
    rank: 3,
    count: 4,
    names: ['head_logits/kernel', 'head_logits/bias'],
    shapes: [[2, 2], [2]],
    mean: new Float32Array([1, 2, 3, 4, 5, 6]),
    sqMean: new Float32Array([1, 4, 9, 16, 25, 36]),
    deviations: [new Float32Array(6).fill(0.5), new Float32Array(6).fill(-0.5)],
  };
  const { manifest, data } = encodeSwag(state);
  const files = { manifest: 'm/swag.json', data: 'm/swag.bin' };
  const back = decodeSwag(JSON.parse(JSON.stringify(manifest)), data, files);
  assert.deepEqual(back.names, state.names);
  assert.deepEqual(back.shapes, state.shapes);
  assert.deepEqual(Array.from(back.sqMean), Array.from(state.sqMean));
  assert.deepEqual(
    back.deviations.map((d) => Array.from(d)),
    state.deviations.map((d) => Array.from(d)),
  );
  const changed = data.slice();
  changed[3] = changed[3]! ^ 1;
  assert.throws(
    () => decodeSwag(manifest, changed, files),
    /^FinetuneError: m\/swag.bin: does not match the sha256 in m\/swag.json/,
  );
  assert.throws(
    () => decodeSwag({ format: 'other' }, data, files),
    /m\/swag.json: is not a SWAG manifest/,
  );
});

test('SwagCollector refuses a rank below 2', () => {
  assert.throws(() => new SwagCollector([], { rank: 1 }), /rank must be an integer of at least 2/);
});
