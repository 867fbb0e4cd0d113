import assert from 'node:assert/strict';
import { before, test } from 'node:test';
import * as tf from '@tensorflow/tfjs';
import { initBackend } from '../../src/backend/index.js';
import { buildHead, dropoutSeeder, logitsView } from '../../src/head/build.js';
import { ArrayBatches, type Batches, balancedWeights } from '../../src/train/fit.js';
import { runStage, type StageOptions } from '../../src/train/stage.js';
import { blobs as gaussianBlobs } from '../helpers.js';

before(async () => {
  await initBackend('wasm');
});

const DIM = 16;
const K = 3;

/** Three Gaussian blobs in 16-d: linearly separable, so a head must learn them. */
function blobs(n: number, seed: number): { x: Float32Array; y: Int32Array; batches: ArrayBatches } {
  const { x, y } = gaussianBlobs(n, seed, { dim: DIM, classes: K, centre: 2, noise: 1 });
  return { x, y, batches: new ArrayBatches(x, [DIM], y) };
}

function headStage(head: tf.LayersModel, overrides: Partial<StageOptions>): StageOptions {
  const logits = logitsView(head);
  return {
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
    numClasses: K,
    seed: 5,
    swa: null,
    ...overrides,
  };
}

const values = (vs: readonly tf.Tensor[]): Float32Array<ArrayBufferLike>[] =>
  vs.map((v) => (v.dataSync() as Float32Array).slice());

test('SWA: the kept weights are the mean of exactly the snapshot epochs of the same run; every tensor freed', async () => {
  const before = tf.memory().numTensors;
  const head = buildHead(DIM, K, { hidden: 8, dropout: 0.2, seed: 3 });
  const variables = head.trainableWeights.map((w) => w.read() as tf.Variable);
  const atEpochEnd: Float32Array[][] = [];
  const snapshots: Float32Array[][] = [];
  let counted = 0;
  const r = await runStage(
    blobs(120, 1).batches,
    blobs(30, 2).batches,
    headStage(head, {
      variables,
      // start epoch index 4 of 8, every 2nd: snapshots after epochs 5 and 7 (not after 8)
      swa: { start: 0.5, freq: 2, lr: 0.005, annealEpochs: 0 },
      keepRaw: true,
      callbacks: [
        {
          // Runs after the stage's own averaging callback, so `snapshots` is already counted.
          onEpochEnd(_epoch, logs) {
            const now = values(variables);
            atEpochEnd.push(now);
            if (logs.snapshots !== counted) snapshots.push(now);
            counted = logs.snapshots ?? 0;
          },
        },
      ],
    }),
  );
  assert.equal(r.snapshots, 2);
  assert.equal(snapshots.length, 2);
  assert.equal(r.kept, 'swa');
  assert.deepEqual(snapshots, [atEpochEnd[4], atEpochEnd[6]]);
  // the raw weights handed back are the last epoch's, bit for bit
  assert.ok(r.rawWeights);
  assert.deepEqual(values(r.rawWeights), atEpochEnd[7]);
  // the variables now hold the mean of the two snapshots
  const kept = values(variables);
  let worst = 0;
  let moved = 0;
  kept.forEach((k, i) => {
    for (let j = 0; j < k.length; j++) {
      const mean = (snapshots[0]![i]![j]! + snapshots[1]![i]![j]!) / 2;
      worst = Math.max(worst, Math.abs(k[j]! - mean));
      moved = Math.max(moved, Math.abs(k[j]! - atEpochEnd[7]![i]![j]!));
    }
  });
  assert.ok(worst <= 1e-6, `SWA weights differ from the mean of the snapshots by ${worst}`);
  assert.ok(moved > 1e-4, 'SWA weights equal the raw weights: nothing was averaged');
  assert.ok(r.swa && r.raw);
  assert.ok(r.swa.acc >= 0.9, `val acc ${r.swa.acc}`);
  assert.ok(r.history.at(-1)!.loss < r.history[0]!.loss, 'loss fell');
  tf.dispose(r.rawWeights);
  head.dispose();
  assert.equal(tf.memory().numTensors, before);
});

test('same seed, same result', async () => {
  const once = async () => {
    const head = buildHead(DIM, K, { hidden: 8, dropout: 0.2, seed: 3 });
    const r = await runStage(
      blobs(120, 1).batches,
      blobs(30, 2).batches,
      headStage(head, { swa: { start: 0.5, freq: 2, lr: 0.005, annealEpochs: 0 } }),
    );
    const w = values(head.getLayer('head_logits').getWeights());
    head.dispose();
    return { losses: r.history.map((h) => h.loss), w };
  };
  const a = await once();
  const b = await once();
  assert.deepEqual(a.losses, b.losses);
  assert.deepEqual(a.w, b.w);
});

/** Rows served as ArrayBatches does, remembering which rows the last batch held. */
class RecordingBatches implements Batches {
  last: number[] = [];
  constructor(private readonly inner: ArrayBatches) {}
  get size(): number {
    return this.inner.size;
  }
  get labels(): Int32Array {
    return this.inner.labels;
  }
  take(rows: ArrayLike<number>): tf.Tensor {
    this.last = Array.from(rows);
    return this.inner.take(rows);
  }
}

/**
 * The learning rate each SGD step really used, measured on a linear softmax head: the
 * bias gradient of the mean cross-entropy is mean(p − onehot) over the batch, computed
 * here from the weights before the step, and plain SGD moves the bias by −lr·gradient.
 */
async function measuredLearningRates(
  overrides: Partial<StageOptions>,
): Promise<{ steps: number[]; epochs: number[] }> {
  const before = tf.memory().numTensors;
  const { x, y, batches } = blobs(48, 4);
  const train = new RecordingBatches(batches);
  const head = buildHead(DIM, K, { hidden: 0, dropout: 0, seed: 9 });
  const layer = head.getLayer('head_logits');
  let kernel: Float32Array = new Float32Array(0);
  let bias: Float32Array = new Float32Array(0);
  const steps: number[] = [];
  const r = await runStage(
    train,
    null,
    headStage(head, {
      optimizer: 'sgd',
      lr: 0.5,
      labelSmoothing: 0,
      ...overrides,
      callbacks: [
        {
          onBatchBegin() {
            [kernel, bias] = values(layer.getWeights()) as [Float32Array, Float32Array];
          },
          onBatchEnd() {
            const after = values(layer.getWeights())[1]!;
            const grad = new Float64Array(K);
            for (const row of train.last) {
              const z = Array.from({ length: K }, (_, c) => {
                let s = bias[c]!;
                for (let d = 0; d < DIM; d++) s += x[row * DIM + d]! * kernel[d * K + c]!;
                return s;
              });
              const m = Math.max(...z);
              const e = z.map((v) => Math.exp(v - m));
              const sum = e.reduce((a, b) => a + b, 0);
              for (let c = 0; c < K; c++)
                grad[c]! += (e[c]! / sum - (y[row] === c ? 1 : 0)) / train.last.length;
            }
            let c = 0;
            for (let j = 1; j < K; j++) if (Math.abs(grad[j]!) > Math.abs(grad[c]!)) c = j;
            steps.push(-(after[c]! - bias[c]!) / grad[c]!);
          },
        },
      ],
    }),
  );
  head.dispose();
  assert.equal(tf.memory().numTensors, before);
  return { steps, epochs: r.history.map((h) => h.lr) };
}

function assertClose(actual: number[], expected: number[], relative: number): void {
  assert.equal(actual.length, expected.length, `${actual} vs ${expected}`);
  actual.forEach((a, i) => {
    assert.ok(
      Math.abs(a - expected[i]!) <= relative * expected[i]!,
      `step ${i}: ${a} vs ${expected[i]} (all: ${actual.map((v) => v.toPrecision(4))})`,
    );
  });
}

test('warm-up: the LR climbs linearly over the first steps to the base LR, then stays there', async () => {
  // 48 rows in batches of 16: 3 steps an epoch; a 5-step warm-up crosses an epoch end
  const { steps, epochs } = await measuredLearningRates({ epochs: 3, warmupSteps: 5 });
  assertClose(steps, [0.1, 0.2, 0.3, 0.4, 0.5, 0.5, 0.5, 0.5, 0.5], 1e-3);
  assert.deepEqual(epochs, [0.5, 0.5, 0.5]);
});

test('SWA annealing: the LR follows the cosine from lr to swaLr over annealEpochs (PyTorch SWALR), per epoch and per step', async () => {
  // start at epoch index 4 of 8, anneal over 3: alpha = (1 − cos(π·t))/2 for t = 1/3, 2/3, 1
  // → 0.25, 0.75, 1: 0.5·0.75 + 0.1·0.25 = 0.4, 0.5·0.25 + 0.1·0.75 = 0.2, then 0.1
  const expected = [0.5, 0.5, 0.5, 0.5, 0.4, 0.2, 0.1, 0.1];
  const { steps, epochs } = await measuredLearningRates({
    epochs: 8,
    swa: { start: 0.5, freq: 1, lr: 0.1, annealEpochs: 3 },
  });
  assertClose(epochs, expected, 1e-12);
  assertClose(
    steps,
    expected.flatMap((lr) => [lr, lr, lr]),
    1e-3,
  );
  // without annealing the LR switches at once
  const atOnce = await measuredLearningRates({
    epochs: 6,
    swa: { start: 4, freq: 1, lr: 0.1, annealEpochs: 0 },
  });
  assertClose(atOnce.epochs, [0.5, 0.5, 0.5, 0.5, 0.1, 0.1], 1e-12);
});

test('class weights: each row of the loss is weighted by its class weight (sum over nonzero weights)', async () => {
  // One batch holding every row: the logged loss is that of the initial weights.
  const { x, y, batches } = blobs(30, 6);
  // imbalanced: drop most of class 2
  const keep = Array.from({ length: 30 }, (_, i) => i).filter((i) => y[i] !== 2 || i < 6);
  const xs = Float32Array.from(keep.flatMap((i) => Array.from(x.subarray(i * DIM, (i + 1) * DIM))));
  const ys = Int32Array.from(keep, (i) => y[i]!);
  assert.ok(batches.size > ys.length);
  assert.deepEqual(balancedWeights(Int32Array.from([0, 0, 0, 1]), 2), [4 / 6, 2]);
  assert.deepEqual(balancedWeights(Int32Array.from([0, 2]), 3), [1, 0, 1]);
  const weights = balancedWeights(ys, K);
  assert.deepEqual(weights, [ys.length / (3 * 10), ys.length / (3 * 10), ys.length / (3 * 2)]);
  const firstLoss = async (classWeights: number[] | null): Promise<number> => {
    const head = buildHead(DIM, K, { hidden: 0, dropout: 0, seed: 2 });
    const [kernel, bias] = values(head.getLayer('head_logits').getWeights());
    let loss = Number.NaN;
    await runStage(
      new ArrayBatches(xs, [DIM], ys),
      null,
      headStage(head, {
        epochs: 1,
        batchSize: ys.length,
        labelSmoothing: 0,
        classWeights,
        callbacks: [
          {
            onBatchEnd(_b, logs) {
              loss = logs.loss;
            },
          },
        ],
      }),
    );
    head.dispose();
    // the same figure by hand
    let sum = 0;
    ys.forEach((label, row) => {
      const z = Array.from({ length: K }, (_, c) => {
        let s = bias![c]!;
        for (let d = 0; d < DIM; d++) s += xs[row * DIM + d]! * kernel![d * K + c]!;
        return s;
      });
      const m = Math.max(...z);
      const logSum = m + Math.log(z.reduce((a, v) => a + Math.exp(v - m), 0));
      sum += (classWeights ? classWeights[label]! : 1) * (logSum - z[label]!);
    });
    assert.ok(Math.abs(loss - sum / ys.length) <= 1e-5, `${loss} vs ${sum / ys.length} by hand`);
    return loss;
  };
  const plain = await firstLoss(null);
  const balanced = await firstLoss(weights);
  assert.notEqual(plain, balanced);
});

test('class weights: a batch with no row of non-zero weight has loss 0 and moves nothing, as TensorFlow gives it (not 0 / 0)', async () => {
  const { x, y } = blobs(30, 7);
  const rows = Array.from({ length: 30 }, (_, i) => i).filter((i) => y[i] === 2);
  const xs = Float32Array.from(rows.flatMap((i) => Array.from(x.subarray(i * DIM, (i + 1) * DIM))));
  const ys = Int32Array.from(rows, () => 2);
  // Whole steps, and steps as the sum of two halves' gradients (each over the batch's divisor).
  for (const halves of [undefined, { second: null }]) {
    const tensors = tf.memory().numTensors;
    const head = buildHead(DIM, K, { hidden: 0, dropout: 0, seed: 2 });
    const before = values(head.getWeights());
    const losses: number[] = [];
    await runStage(
      new ArrayBatches(xs, [DIM], ys),
      null,
      headStage(head, {
        epochs: 2,
        batchSize: 4,
        classWeights: [1, 1, 0],
        ...(halves ? { halves } : {}),
        callbacks: [{ onBatchEnd: (_b, logs) => void losses.push(logs.loss) }],
      }),
    );
    assert.ok(losses.length >= 2);
    const zeros = losses.map(() => 0);
    assert.deepEqual(losses, zeros, `halves: ${halves !== undefined}`);
    assert.deepEqual(values(head.getWeights()), before);
    head.dispose();
    assert.equal(tf.memory().numTensors, tensors);
  }
});
