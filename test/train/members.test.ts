import assert from 'node:assert/strict';
import { before, test } from 'node:test';
import * as tf from '@tensorflow/tfjs';
import { initBackend } from '../../src/backend/index.js';
import { FinetuneError } from '../../src/errors.js';
import { buildHead, dropoutSeeder, logitsView } from '../../src/head/build.js';
import { type HeadMember, HeadPopulation } from '../../src/head/population.js';
import { WeightAverager } from '../../src/swa/averager.js';
import { ArrayBatches } from '../../src/train/fit.js';
import { StageOptimizer } from '../../src/train/optimizers.js';
import { runMembers, runStage, type StageMember, type StageResult } from '../../src/train/stage.js';
import { blobs as gaussianBlobs } from '../helpers.js';

before(async () => {
  await initBackend('wasm');
});

const DIM = 12;
const K = 3;

function blobs(n: number, seed: number): ArrayBatches {
  const { x, y } = gaussianBlobs(n, seed, { dim: DIM, classes: K, centre: 1.5, noise: 1 });
  return new ArrayBatches(x, [DIM], y);
}

const train = blobs(90, 1);
const val = blobs(30, 2);

test('StageOptimizer steps exactly as tfjs own adam, sgd and momentum, learning-rate changes included', () => {
  const before = tf.memory().numTensors;
  const makers: Record<string, (lr: number) => tf.Optimizer> = {
    adam: (lr) => tf.train.adam(lr),
    sgd: (lr) => tf.train.sgd(lr),
    momentum: (lr) => tf.train.momentum(lr, 0.9),
  };
  for (const [name, make] of Object.entries(makers)) {
    const init = [
      tf.randomNormal([4, 3], 0, 1, 'float32', 1),
      tf.randomNormal([3], 0, 1, 'float32', 2),
    ];
    const ours = tf.tidy(() => init.map((t) => tf.variable(t.clone())));
    const theirs = tf.tidy(() => init.map((t) => tf.variable(t.clone())));
    const a = new StageOptimizer(name, ours, 0.05);
    const b = make(0.05) as tf.Optimizer & {
      setLearningRate?(lr: number): void;
      learningRate: number;
    };
    for (let step = 0; step < 6; step++) {
      if (step === 3) {
        a.setLearningRate(0.01);
        if (b.setLearningRate) b.setLearningRate(0.01);
        else b.learningRate = 0.01;
      }
      const grads = (vs: tf.Variable[]) =>
        tf.tidy(() => {
          const { grads } = tf.variableGrads(
            () =>
              tf.sum(tf.square(tf.sub(tf.matMul(tf.ones([2, 4]), vs[0]!), vs[1]!))) as tf.Scalar,
            vs,
          );
          return grads;
        });
      const ga = grads(ours);
      a.applyGradients(ga);
      tf.dispose(Object.values(ga));
      const gb = grads(theirs);
      b.applyGradients(gb);
      tf.dispose(Object.values(gb));
    }
    ours.forEach((v, i) => {
      assert.deepEqual(v.dataSync(), theirs[i]!.dataSync(), `${name}: variable ${i}`);
    });
    a.dispose();
    b.dispose();
    // tf.train.momentum's dispose forgets its learning-rate scalar (SGD's `c`).
    (b as unknown as { c?: tf.Tensor }).c?.dispose();
    tf.dispose([...init, ...ours, ...theirs]);
  }
  assert.equal(tf.memory().numTensors, before);
});

const shared = (heads: HeadPopulation) => ({
  name: 'head',
  forward: (x: tf.Tensor, training: boolean) => heads.forward(x, training),
  variables: heads.variables,
  reseed: (seeds: readonly number[]) => heads.reseed(seeds),
  epochs: 6,
  batchSize: 16,
  optimizer: 'adam' as const,
  numClasses: K,
  stacked: true,
});

const MEMBERS: (HeadMember & StageMember)[] = [
  { seed: 3, dropout: 0.2, lr: 0.02, labelSmoothing: 0.1, classWeights: null, swa: null },
  {
    seed: 4,
    dropout: 0,
    lr: 0.05,
    labelSmoothing: 0,
    classWeights: [1, 2, 0.5],
    swa: { start: 0.5, freq: 1, lr: 0.01, annealEpochs: 2 },
  },
  {
    seed: 5,
    dropout: 0.4,
    lr: 0.01,
    labelSmoothing: 0.2,
    classWeights: null,
    swa: { start: 2, freq: 2, lr: 0.005, annealEpochs: 0 },
  },
];

async function trainTogether(
  members: readonly (HeadMember & StageMember)[],
  hidden: number,
  bn = false,
): Promise<{ results: (StageResult | FinetuneError)[]; weights: Float32Array[][] }> {
  const heads = new HeadPopulation(DIM, K, hidden, members, { bn });
  try {
    const results = await runMembers(
      train,
      val,
      { ...shared(heads), batchNorm: heads.batchNormState() },
      members,
    );
    const weights = members.map((_, k) => {
      const model = heads.toModel(k);
      const w = model.getWeights().map((t) => t.dataSync() as Float32Array);
      model.dispose();
      return w;
    });
    return { results, weights };
  } finally {
    heads.dispose();
  }
}

test('heads trained side by side end exactly as each would alone; every tensor freed', async () => {
  const before = tf.memory().numTensors;
  for (const hidden of [0, 6]) {
    const together = await trainTogether(MEMBERS, hidden);
    for (const [k, member] of MEMBERS.entries()) {
      const alone = await trainTogether([member], hidden);
      const a = together.results[k] as StageResult;
      const b = alone.results[0] as StageResult;
      assert.deepEqual(
        a.history.map((h) => [h.loss, h.acc, h.val_loss, h.lr, h.snapshots]),
        b.history.map((h) => [h.loss, h.acc, h.val_loss, h.lr, h.snapshots]),
        `member ${k}, hidden ${hidden}`,
      );
      assert.equal(a.snapshots, b.snapshots);
      assert.equal(a.kept, member.swa ? 'swa' : 'raw');
      assert.deepEqual(a.swa?.loss, b.swa?.loss);
      assert.deepEqual(together.weights[k], alone.weights[0], `member ${k} weights`);
    }
    // The members really differ (the test would pass trivially if they all were one).
    assert.notDeepEqual(together.weights[0], together.weights[1]);
    // member 1: snapshots after epochs 4, 5, 6; member 2: after epochs 3 and 5
    assert.deepEqual(
      together.results.map((r) => (r as StageResult).snapshots),
      [0, 3, 2],
    );
  }
  assert.equal(tf.memory().numTensors, before);
});

test("a head step reads no tensor its forward pass freed (tfjs-node's kernels read every input, even ZerosLike's)", async () => {
  // wasm's ZerosLike reads only its input's shape; tfjs-node's looks the input up and
  // crashes on a freed one. This stand-in fails the same way.
  const native = tf.getKernel('ZerosLike', 'wasm')!;
  const freed: string[] = [];
  tf.unregisterKernel('ZerosLike', 'wasm');
  tf.registerKernel({
    ...native,
    kernelFunc: (args) => {
      const x = args.inputs['x'] as tf.TensorInfo;
      const info = (tf.engine() as unknown as { state: { tensorInfo: WeakMap<object, unknown> } })
        .state.tensorInfo;
      if (!info.has(x.dataId)) freed.push(`[${x.shape}]`);
      return native.kernelFunc(args);
    },
  });
  try {
    for (const hidden of [0, 6]) await trainTogether(MEMBERS.slice(0, 2), hidden);
  } finally {
    tf.unregisterKernel('ZerosLike', 'wasm');
    tf.registerKernel(native);
  }
  assert.deepEqual(freed, []);
});

test('heads with BatchNorm side by side end exactly as each would alone, statistics and early stopping included', async () => {
  const before = tf.memory().numTensors;
  // member 0 stops early (its statistics must stop moving with it); 1 and 2 average (refresh).
  const members = [
    { ...MEMBERS[0]!, lr: 0.2, earlyStop: { patience: 1, minDelta: 0.5 } },
    MEMBERS[1]!,
    MEMBERS[2]!,
  ];
  for (const hidden of [0, 6]) {
    const together = await trainTogether(members, hidden, true);
    assert.ok((together.results[0] as StageResult).stoppedAfter !== null, 'member 0 stopped early');
    for (const [k, member] of members.entries()) {
      const alone = await trainTogether([member], hidden, true);
      const a = together.results[k] as StageResult;
      const b = alone.results[0] as StageResult;
      assert.deepEqual(
        a.history.map((h) => [h.loss, h.val_loss, h.val_avg_loss]),
        b.history.map((h) => [h.loss, h.val_loss, h.val_avg_loss]),
        `member ${k}, hidden ${hidden}`,
      );
      assert.deepEqual(a.swa?.loss, b.swa?.loss);
      assert.deepEqual(
        a.bnRefreshed,
        member.swa ? ['head_bn_0', ...(hidden ? ['head_bn_1'] : [])] : [],
      );
      // every weight of the exported head, gamma, beta and moving statistics included
      assert.deepEqual(together.weights[k], alone.weights[0], `member ${k} weights`);
    }
  }
  assert.equal(tf.memory().numTensors, before);
});

test("a BatchNorm head trained alone matches buildHead's model trained with tfjs's own BatchNormalization", async () => {
  const before = tf.memory().numTensors;
  const member = { ...MEMBERS[0]!, dropout: 0, labelSmoothing: 0 };
  const ours = await trainTogether([member], 6, true);
  const model = buildHead(DIM, K, { hidden: 6, dropout: 0, seed: member.seed, bn: true });
  const logits = logitsView(model);
  await runStage(train, val, {
    ...member,
    name: 'head',
    forward: (x, training) => logits.apply(x, { training }) as tf.Tensor,
    // The same random stream: the loop draws a dropout seed per step when there is a reseed.
    reseed: dropoutSeeder(model),
    variables: model.trainableWeights.map((w) => w.read() as tf.Variable),
    epochs: 6,
    batchSize: 16,
    optimizer: 'adam',
    numClasses: K,
  });
  const theirs = model.getWeights().map((w) => w.dataSync() as Float32Array);
  assert.deepEqual(
    model.weights.map((w) => w.originalName),
    [
      'head_bn_0/gamma',
      'head_bn_0/beta',
      'head_hidden/kernel',
      'head_hidden/bias',
      'head_bn_1/gamma',
      'head_bn_1/beta',
      'head_logits/kernel',
      'head_logits/bias',
      'head_bn_0/moving_mean',
      'head_bn_0/moving_variance',
      'head_bn_1/moving_mean',
      'head_bn_1/moving_variance',
    ],
  );
  let worst = 0;
  theirs.forEach((t, i) => {
    const o = ours.weights[0]![i]!;
    for (let j = 0; j < t.length; j++)
      worst = Math.max(worst, Math.abs(o[j]! - t[j]!) / Math.max(1, Math.abs(t[j]!)));
  });
  // Float rounding only (tf.batchNorm's kernel against the head's own arithmetic): ~2e-7 measured.
  assert.ok(worst < 1e-5, `weights differ by ${worst}`);
  model.dispose();
  assert.equal(tf.memory().numTensors, before);
});

test('a member whose loss diverges fails alone: the others end as they would alone', async () => {
  const before = tf.memory().numTensors;
  const wild = { ...MEMBERS[1]!, lr: 1e38 };
  const together = await trainTogether([MEMBERS[0]!, wild, MEMBERS[2]!], 0);
  assert.ok(together.results[1] instanceof FinetuneError);
  assert.match((together.results[1] as Error).message, /training diverged: the head stage's loss/);
  const alone = await trainTogether([MEMBERS[2]!], 0);
  assert.deepEqual(
    (together.results[2] as StageResult).history.map((h) => h.val_loss),
    (alone.results[0] as StageResult).history.map((h) => h.val_loss),
  );
  assert.deepEqual(together.weights[2], alone.weights[0]);
  // every member diverging ends the stage with the error
  await assert.rejects(trainTogether([wild], 0), /training diverged/);
  assert.equal(tf.memory().numTensors, before);
});

test('a stacked averager averages each member over its own snapshots; members without one stay raw', () => {
  const before = tf.memory().numTensors;
  const v = tf.tidy(() =>
    tf.variable(
      tf.tensor([
        [1, 1],
        [2, 2],
        [3, 3],
      ]),
    ),
  );
  const avg = new WeightAverager([v], { members: 3 });
  avg.update(0); // member 0: [1, 1]
  tf.tidy(() =>
    v.assign(
      tf.tensor([
        [3, 5],
        [4, 4],
        [9, 9],
      ]),
    ),
  );
  avg.update(0); // member 0: mean of [1, 1] and [3, 5]
  avg.update(1); // member 1: [4, 4]
  tf.tidy(() =>
    v.assign(
      tf.tensor([
        [7, 7],
        [8, 6],
        [0, 0],
      ]),
    ),
  );
  avg.update(1); // member 1: mean of [4, 4] and [8, 6]
  assert.deepEqual([avg.count(0), avg.count(1), avg.count(2)], [2, 2, 0]);
  avg.swapIn();
  assert.deepEqual(Array.from(v.dataSync()), [2, 3, 6, 5, 0, 0]);
  avg.swapOut();
  assert.deepEqual(Array.from(v.dataSync()), [7, 7, 8, 6, 0, 0]);
  avg.apply();
  assert.deepEqual(Array.from(v.dataSync()), [2, 3, 6, 5, 0, 0]);
  avg.dispose();
  v.dispose();
  assert.equal(tf.memory().numTensors, before);
});
