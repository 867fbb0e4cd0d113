import assert from 'node:assert/strict';
import { before, test } from 'node:test';
import * as tf from '@tensorflow/tfjs';
import { initBackend } from '../../src/backend/index.js';
import { HEAD_BN_EPSILON, headBnName } from '../../src/head/build.js';
import { HeadPopulation } from '../../src/head/population.js';
import { MomentAccumulator, passBatches, refreshBatchNorm } from '../../src/swa/bn-refresh.js';
import { ArrayBatches } from '../../src/train/fit.js';
import { runMembers, type StageMember } from '../../src/train/stage.js';
import { blobs } from '../helpers.js';

before(async () => {
  await initBackend('wasm');
});

/** Mean and biased variance of each column of `rows` (n × d), in float64. */
function columnMoments(rows: number[][]): { mean: number[]; variance: number[] } {
  const d = rows[0]!.length;
  const mean = new Array<number>(d).fill(0);
  for (const r of rows) {
    r.forEach((v, j) => {
      mean[j]! += v / rows.length;
    });
  }
  const variance = new Array<number>(d).fill(0);
  for (const r of rows) {
    r.forEach((v, j) => {
      variance[j]! += (v - mean[j]!) ** 2 / rows.length;
    });
  }
  return { mean, variance };
}

function close(actual: ArrayLike<number>, expected: ArrayLike<number>, tol: number, what: string) {
  assert.equal(actual.length, expected.length, what);
  let worst = 0;
  for (let i = 0; i < actual.length; i++)
    worst = Math.max(
      worst,
      Math.abs(actual[i]! - expected[i]!) / Math.max(1, Math.abs(expected[i]!)),
    );
  assert.ok(worst <= tol, `${what}: off by ${worst}`);
}

test('MomentAccumulator: chunks folded one by one give the moments of all rows together', () => {
  const rows = Array.from({ length: 37 }, (_, i) => [Math.sin(i) * 3 + 5, (i % 7) - 2, i * 0.1]);
  const acc = new MomentAccumulator(3);
  for (const [a, b] of [
    [0, 10],
    [10, 11],
    [11, 30],
    [30, 37],
  ] as const) {
    const chunk = columnMoments(rows.slice(a, b));
    acc.add(chunk.mean, chunk.variance, b - a);
  }
  const all = columnMoments(rows);
  close(acc.mean(), all.mean, 1e-6, 'mean');
  close(acc.variance(), all.variance, 1e-6, 'variance');
  assert.equal(acc.count, 37);
});

test('passBatches covers every row once, in order, with sizes differing by at most one', () => {
  const b = passBatches(50, 16);
  assert.deepEqual(
    b.map((r) => r.length),
    [13, 12, 13, 12],
  );
  assert.deepEqual(
    b.flat(),
    Array.from({ length: 50 }, (_, i) => i),
  );
  assert.deepEqual(passBatches(3, 64), [[0, 1, 2]]);
});

/** dense → BN (refreshed) → dense → BN (refreshed), plus a BN that is not refreshed. */
function model(): { m: tf.LayersModel; refreshed: tf.layers.Layer[]; frozen: tf.layers.Layer } {
  const input = tf.input({ shape: [6] });
  const frozen = tf.layers.batchNormalization({ name: 'frozen_bn' });
  const d1 = tf.layers.dense({
    units: 5,
    name: 'd1',
    kernelInitializer: tf.initializers.glorotUniform({ seed: 1 }),
  });
  const bn1 = tf.layers.batchNormalization({ name: 'bn1' });
  const d2 = tf.layers.dense({
    units: 4,
    activation: 'relu',
    name: 'd2',
    kernelInitializer: tf.initializers.glorotUniform({ seed: 2 }),
  });
  const bn2 = tf.layers.batchNormalization({ name: 'bn2' });
  let x = frozen.apply(input) as tf.SymbolicTensor;
  x = bn1.apply(d1.apply(x)) as tf.SymbolicTensor;
  x = bn2.apply(d2.apply(x)) as tf.SymbolicTensor;
  const m = tf.model({ inputs: input, outputs: x });
  // Statistics and affine weights away from their initial values, so the test can tell.
  for (const l of [frozen, bn1, bn2]) {
    const n = (l.getWeights()[0]!.shape[0] as number) ?? 0;
    l.setWeights([
      tf.linspace(0.5, 1.5, n),
      tf.linspace(-0.2, 0.3, n),
      tf.linspace(-1, 1, n),
      tf.linspace(0.5, 2, n),
    ]);
  }
  return { m, refreshed: [bn1, bn2], frozen };
}

test('refreshBatchNorm equals the statistics computed directly over every row; a BN not refreshed keeps its own bit for bit', async () => {
  const { m, refreshed, frozen } = model();
  const { x, y } = blobs(50, 3, { dim: 6, classes: 2, centre: 1, noise: 2 });
  const data = new ArrayBatches(x, [6], y);
  const frozenBefore = frozen.getWeights().map((w) => (w.dataSync() as Float32Array).slice());
  const start = tf.memory().numTensors;
  await refreshBatchNorm(refreshed, (t) => m.apply(t, { training: false }) as tf.Tensor, data, 16);
  assert.equal(tf.memory().numTensors, start);
  // By hand: the same batches; in the pass each refreshed BN normalises with its batch's moments.
  const inputs1: number[][] = [];
  const inputs2: number[][] = [];
  const [g1, b1] = refreshed[0]!.getWeights();
  const batchNorm = (t: tf.Tensor, g: tf.Tensor, b: tf.Tensor) => {
    const { mean, variance } = tf.moments(t, 0);
    return tf.add(tf.mul(tf.div(tf.sub(t, mean), tf.sqrt(tf.add(variance, 1e-3))), g), b);
  };
  for (const rows of passBatches(50, 16)) {
    tf.tidy(() => {
      const input = data.take(rows);
      const a = frozen.apply(input, { training: false }) as tf.Tensor;
      const h1 = m.getLayer('d1').apply(a) as tf.Tensor;
      inputs1.push(...(h1.arraySync() as number[][]));
      const h2 = m.getLayer('d2').apply(batchNorm(h1, g1!, b1!)) as tf.Tensor;
      inputs2.push(...(h2.arraySync() as number[][]));
    });
  }
  for (const [layer, rows] of [
    [refreshed[0]!, inputs1],
    [refreshed[1]!, inputs2],
  ] as const) {
    const [, , mean, variance] = layer.getWeights();
    const direct = columnMoments(rows);
    close(mean!.dataSync(), direct.mean, 1e-5, `${layer.name} mean`);
    close(variance!.dataSync(), direct.variance, 1e-5, `${layer.name} variance`);
  }
  assert.deepEqual(
    frozen.getWeights().map((w) => w.dataSync()),
    frozenBefore,
  );
  // The layers normalise with their moving statistics again afterwards.
  const out = tf.tidy(() => m.apply(data.take([0, 1]), { training: false }) as tf.Tensor);
  const again = tf.tidy(() => m.apply(data.take([0, 1]), { training: false }) as tf.Tensor);
  assert.deepEqual(out.dataSync(), again.dataSync());
  tf.dispose([out, again]);
  m.dispose();
});

test('HeadPopulation with BN: a refresh recomputes exactly the listed members, each from its own weights', async () => {
  const start = tf.memory().numTensors;
  const { x, y } = blobs(40, 5, { dim: 8, classes: 3, centre: 1, noise: 1 });
  const data = new ArrayBatches(x, [8], y);
  const heads = new HeadPopulation(
    8,
    3,
    5,
    [
      { seed: 1, dropout: 0.3 },
      { seed: 2, dropout: 0 },
      { seed: 3, dropout: 0 },
    ],
    { bn: true },
  );
  const state = heads.batchNormState()!;
  assert.deepEqual(state.layers, ['head_bn_0', 'head_bn_1']);
  const untouched = state.variables.map((v) => (v.dataSync() as Float32Array).slice());
  await state.refresh(data, 16, [0, 2]);
  for (const k of [0, 1, 2]) {
    const m = heads.toModel(k);
    const bn0 = m.getLayer(headBnName(0));
    const bn1 = m.getLayer(headBnName(1));
    const [g0, b0, mean0, var0] = bn0.getWeights();
    const [, , mean1, var1] = bn1.getWeights();
    if (k === 1) {
      // not listed: the initial statistics
      assert.deepEqual(mean0!.dataSync(), untouched[0]!.subarray(8, 16));
      assert.deepEqual(var1!.dataSync(), untouched[3]!.subarray(5, 10));
      m.dispose();
      continue;
    }
    const hidden: number[][] = [];
    for (const rows of passBatches(40, 16)) {
      tf.tidy(() => {
        const input = data.take(rows);
        const { mean, variance } = tf.moments(input, 0);
        const normed = tf.add(
          tf.mul(tf.div(tf.sub(input, mean), tf.sqrt(tf.add(variance, HEAD_BN_EPSILON))), g0!),
          b0!,
        );
        hidden.push(
          ...((m.getLayer('head_hidden').apply(normed) as tf.Tensor).arraySync() as number[][]),
        );
      });
    }
    const features = columnMoments(
      Array.from({ length: 40 }, (_, i) => Array.from(x.subarray(i * 8, i * 8 + 8))),
    );
    close(mean0!.dataSync(), features.mean, 1e-5, `member ${k} bn_0 mean`);
    close(var0!.dataSync(), features.variance, 1e-5, `member ${k} bn_0 variance`);
    const direct = columnMoments(hidden);
    close(mean1!.dataSync(), direct.mean, 1e-5, `member ${k} bn_1 mean`);
    close(var1!.dataSync(), direct.variance, 1e-5, `member ${k} bn_1 variance`);
    m.dispose();
  }
  heads.dispose();
  assert.equal(tf.memory().numTensors, start);
});

test('a head stage with BN and SWA recomputes the statistics for the averaged weights and says which layers', async () => {
  const start = tf.memory().numTensors;
  const { x, y } = blobs(48, 7, { dim: 8, classes: 3, centre: 1.5, noise: 1 });
  const train = new ArrayBatches(x, [8], y);
  const v = blobs(24, 8, { dim: 8, classes: 3, centre: 1.5, noise: 1 });
  const val = new ArrayBatches(v.x, [8], v.y);
  const run = async (swa: StageMember['swa']) => {
    const heads = new HeadPopulation(8, 3, 6, [{ seed: 4, dropout: 0 }], { bn: true });
    const [r] = await runMembers(
      train,
      val,
      {
        name: 'head',
        forward: (t, training) => heads.forward(t, training),
        variables: heads.variables,
        reseed: (s) => heads.reseed(s),
        epochs: 4,
        batchSize: 16,
        optimizer: 'adam',
        numClasses: 3,
        stacked: true,
        batchNorm: heads.batchNormState(),
      },
      [{ seed: 4, lr: 0.02, labelSmoothing: 0, classWeights: null, swa }],
    );
    if (r instanceof Error) throw r;
    const model = heads.toModel(0);
    heads.dispose();
    return { r: r!, model };
  };
  const averaged = await run({ start: 2, freq: 1, lr: 0.01, annealEpochs: 0 });
  assert.deepEqual(averaged.r.bnRefreshed, ['head_bn_0', 'head_bn_1']);
  assert.equal(averaged.r.kept, 'swa');
  // The features' statistics do not depend on the weights: the refresh makes them exact.
  const [, , mean0, var0] = averaged.model.getLayer('head_bn_0').getWeights();
  const features = columnMoments(
    Array.from({ length: 48 }, (_, i) => Array.from(x.subarray(i * 8, i * 8 + 8))),
  );
  close(mean0!.dataSync(), features.mean, 1e-5, 'bn_0 mean');
  close(var0!.dataSync(), features.variance, 1e-5, 'bn_0 variance');
  averaged.model.dispose();
  const plain = await run(null);
  assert.deepEqual(plain.r.bnRefreshed, []);
  // Without a refresh the moving averages of 12 steps are still far from the data's.
  const [, , mean] = plain.model.getLayer('head_bn_0').getWeights();
  assert.ok(Math.abs(mean!.dataSync()[0]! - features.mean[0]!) > 1e-2);
  plain.model.dispose();
  assert.equal(tf.memory().numTensors, start);
});
