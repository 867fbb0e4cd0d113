import assert from 'node:assert/strict';
import { before, test } from 'node:test';
import * as tf from '@tensorflow/tfjs';
import { initBackend } from '../../src/backend/index.js';
import { HeadPopulation } from '../../src/head/population.js';
import { SwagPosterior, sampleSeed, seededNormal } from '../../src/swa/swag.js';
import { ArrayBatches } from '../../src/train/fit.js';
import { resolveTrainOptions } from '../../src/train/options.js';
import {
  KEEP_SWAG_SAMPLES,
  runMembers,
  type StageMember,
  type StageResult,
} from '../../src/train/stage.js';
import { blobs as gaussianBlobs } from '../helpers.js';

before(async () => {
  await initBackend('wasm');
});

const DIM = 10;
const K = 3;

function blobs(n: number, seed: number): ArrayBatches {
  const { x, y } = gaussianBlobs(n, seed, { dim: DIM, classes: K, centre: 1, noise: 2 });
  return new ArrayBatches(x, [DIM], y);
}

const train = blobs(64, 1);
const val = blobs(30, 2);
const member = (over: Partial<StageMember> = {}): StageMember => ({
  seed: 3,
  lr: 0.05,
  labelSmoothing: 0,
  classWeights: null,
  swa: null,
  ...over,
});

async function stage(
  m: StageMember,
  epochs: number,
  keepRaw = false,
): Promise<{ r: StageResult; weights: Float32Array[]; raw: Float32Array[] | null }> {
  const heads = new HeadPopulation(DIM, K, 0, [{ seed: m.seed, dropout: 0 }]);
  try {
    const [r] = await runMembers(
      train,
      val,
      {
        name: 'head',
        forward: (x, t) => heads.forward(x, t),
        variables: heads.variables,
        reseed: (s) => heads.reseed(s),
        epochs,
        batchSize: 16,
        optimizer: 'adam',
        numClasses: K,
        stacked: true,
        keepRaw,
      },
      [m],
    );
    if (r instanceof Error) throw r;
    const weights = heads.variables.map((v) => (v.dataSync() as Float32Array).slice());
    const raw = r!.rawWeights?.map((t) => (t.dataSync() as Float32Array).slice()) ?? null;
    tf.dispose(r!.rawWeights ?? []);
    return { r: r!, weights, raw };
  } finally {
    heads.dispose();
  }
}

test('averaged weights are evaluated every epoch once they exist; the last equals the final figures', async () => {
  const before = tf.memory().numTensors;
  const { r } = await stage(member({ swa: { start: 2, freq: 1, lr: 0.02, annealEpochs: 0 } }), 6);
  assert.deepEqual(
    r.history.map((h) => h.val_avg_loss !== undefined),
    [false, false, true, true, true, true],
  );
  assert.deepEqual(
    r.history.map((h) => h.snapshots),
    [0, 0, 1, 2, 3, 4],
  );
  assert.equal(r.history.at(-1)!.val_avg_loss, r.swa!.loss);
  assert.equal(r.history.at(-1)!.val_loss, r.raw!.loss);
  assert.equal(r.averagingFrom, 3);
  assert.equal(r.kept, 'swa');
  assert.equal(tf.memory().numTensors, before);
});

test('the tensor count stays the same from epoch to epoch (SWA, EMA, early stopping)', async () => {
  for (const over of [
    { swa: { start: 1, freq: '3s', lr: 0.02, annealEpochs: 0 } },
    { swa: { kind: 'ema' as const, start: 0, freq: 1, lr: 0.02, annealEpochs: 0 } },
    {
      earlyStop: { patience: 3, minDelta: 0 },
      swa: { start: 1, freq: 1, lr: 0.02, annealEpochs: 0 },
    },
  ]) {
    const counts: number[] = [];
    await stage(
      member({
        ...over,
        callbacks: [{ onEpochEnd: () => void counts.push(tf.memory().numTensors) }],
      }),
      6,
    );
    // after the first snapshot the averages exist: from then on nothing may grow
    const settled = counts.slice(2);
    assert.ok(settled.length >= 3, JSON.stringify(counts));
    assert.deepEqual(
      settled,
      settled.map(() => settled[0]),
      JSON.stringify({ over, counts }),
    );
  }
});

test('EMA updates after every step from its start', async () => {
  const before = tf.memory().numTensors;
  const { r } = await stage(
    member({ swa: { kind: 'ema', start: 3, freq: 1, lr: 0.02, annealEpochs: 0, emaDecay: 0.9 } }),
    5,
  );
  // 64 rows in batches of 16: 4 steps an epoch, epochs 4 and 5 average
  assert.deepEqual(
    r.history.map((h) => h.snapshots),
    [0, 0, 0, 4, 8],
  );
  assert.equal(r.average, 'ema');
  assert.equal(r.kept, 'ema');
  assert.equal(tf.memory().numTensors, before);
});

test('early stopping without averaging stops after its patience and restores the best weights', async () => {
  const before = tf.memory().numTensors;
  // min-delta so large that only the first epoch counts as an improvement
  const { r } = await stage(member({ earlyStop: { patience: 2, minDelta: 100 } }), 10);
  assert.equal(r.history.length, 3);
  assert.equal(r.stoppedAfter, 3);
  // the weights evaluated at the end are epoch 1's, restored
  assert.equal(r.raw!.loss, r.history[0]!.val_loss);
  assert.notEqual(r.history[2]!.val_loss, r.history[0]!.val_loss);
  assert.equal(tf.memory().numTensors, before);
});

test('early stopping before averaging starts the averaging phase early, for as long as planned', async () => {
  const before = tf.memory().numTensors;
  const { r } = await stage(
    member({
      swa: { start: 8, freq: 1, lr: 0.02, annealEpochs: 0 },
      earlyStop: { patience: 2, minDelta: 100 },
    }),
    10,
  );
  // epoch 1 improves, 2 and 3 do not: averaging from epoch 4, for the planned 2 epochs
  assert.equal(r.averagingFrom, 4);
  assert.equal(r.history.length, 5);
  assert.deepEqual(
    r.history.map((h) => h.snapshots),
    [0, 0, 0, 1, 2],
  );
  assert.equal(r.stoppedAfter, null);
  assert.equal(r.kept, 'swa');
  // the learning rate switched to swa-lr at the moved start
  assert.equal(r.history[3]!.lr, 0.02);
  assert.equal(r.history[2]!.lr, 0.05);
  assert.equal(tf.memory().numTensors, before);
});

test('keep best: the raw or the averaged weights, whichever has the lower validation loss', async () => {
  const before = tf.memory().numTensors;
  for (const lr of [0.5, 0.01]) {
    const { r, weights, raw } = await stage(
      member({ lr, swa: { start: 0.5, freq: 1, lr: lr / 2, annealEpochs: 0 }, keep: 'best' }),
      6,
      true,
    );
    const rawBetter = r.raw!.loss < r.swa!.loss;
    assert.equal(r.kept, rawBetter ? 'raw' : 'swa', `lr ${lr}`);
    if (rawBetter) assert.deepEqual(weights, raw);
    else assert.notDeepEqual(weights, raw);
  }
  assert.equal(tf.memory().numTensors, before);
});

test('averaging options: defaults, the alias, and what each needs', () => {
  const r = resolveTrainOptions({ data: 'x' });
  assert.equal(r.average, 'swa');
  assert.equal(resolveTrainOptions({ data: 'x', swa: false }).average, 'none');
  assert.equal(resolveTrainOptions({ data: 'x', swaFreq: '50s' }).swaFreq, '50s');
  assert.equal(resolveTrainOptions({ data: 'x', swaFreq: '3' }).swaFreq, 3);
  const fails: [Record<string, unknown>, RegExp][] = [
    [{ emaDecay: 0.99 }, /emaDecay needs average ema/],
    [
      { average: 'ema', swaFreq: 2 },
      /swaFreq needs average swa with a swaSchedule other than cyclic/,
    ],
    [{ swaSchedule: 'cyclic', swaFreq: 2 }, /swaFreq needs average swa/],
    [{ swaCycle: 2 }, /swaCycle needs swaSchedule cyclic/],
    [
      { swaSchedule: 'constant', swaAnnealEpochs: 2 },
      /swaAnnealEpochs needs swaSchedule cos or linear/,
    ],
    [{ minDelta: 0.1 }, /minDelta needs earlyStop > 0/],
    [{ swa: false, average: 'ema' }, /swa turned off contradicts average ema/],
    [{ average: 'none', swaLr: 0.1 }, /swaLr cannot be used with average none/],
    [{ swaFreq: '5x' }, /a whole number of epochs \(2\) or of optimizer steps with an s \(50s\)/],
    [{ emaDecay: 1, average: 'ema' }, /for emaDecay but received 1/],
    [{ warmupEpochs: 50 }, /for warmupEpochs but received 50/],
  ];
  for (const [given, message] of fails)
    assert.throws(
      () => resolveTrainOptions({ data: 'x', ...given }),
      message,
      JSON.stringify(given),
    );
});

test("keep best's SWAG candidate is the model average of 20 seeded samples, alone or beside another member", async () => {
  const before = tf.memory().numTensors;
  const swa = { start: 2, freq: 1, lr: 0.02, annealEpochs: 0, swag: 3 };
  const members: StageMember[] = [
    member({ seed: 3, swa, keep: 'best' }),
    member({ seed: 8, lr: 0.03, swa, keep: 'best' }),
  ];
  const run = async (ms: StageMember[]) => {
    const heads = new HeadPopulation(
      DIM,
      K,
      0,
      ms.map((m) => ({ seed: m.seed, dropout: 0 })),
    );
    try {
      const results = await runMembers(
        train,
        val,
        {
          name: 'head',
          forward: (x, t) => heads.forward(x, t),
          variables: heads.variables,
          reseed: (s) => heads.reseed(s),
          epochs: 6,
          batchSize: 16,
          optimizer: 'adam',
          numClasses: K,
          stacked: true,
        },
        ms,
      );
      return results as StageResult[];
    } finally {
      heads.dispose();
    }
  };
  const together = await run(members);
  const alone = await run([members[1]!]);
  const r = together[1]!;
  assert.deepEqual(
    r.candidates!.map((c) => [c.weights, c.samples]),
    [
      ['raw', undefined],
      ['swa', undefined],
      ['swag', KEEP_SWAG_SAMPLES],
    ],
  );
  assert.deepEqual(r.candidates, alone[0]!.candidates);
  assert.equal(r.chosen, r.candidates!.reduce((a, b) => (b.loss <= a.loss ? b : a)).weights);
  // By hand: the same samples from the returned posterior, a softmax head per sample.
  const posterior = new SwagPosterior(r.swag!);
  const probs = tf.tidy(() => {
    let sum: tf.Tensor | null = null;
    const x = val.take(Array.from({ length: val.size }, (_, i) => i));
    for (let s = 0; s < KEEP_SWAG_SAMPLES; s++) {
      const [kernel, bias] = posterior.sample(seededNormal(sampleSeed(8, s)));
      const p = tf.softmax(tf.add(tf.matMul(x, kernel!.reshape([DIM, K])), bias!.reshape([K])));
      sum = sum ? tf.add(sum, p) : p;
    }
    return tf.div(sum!, KEEP_SWAG_SAMPLES);
  });
  const p = probs.dataSync();
  let loss = 0;
  for (let i = 0; i < val.size; i++) loss -= Math.log(Math.max(p[i * K + val.labels[i]!]!, 1e-7));
  loss /= val.size;
  const swag = r.candidates!.find((c) => c.weights === 'swag')!;
  assert.ok(Math.abs(swag.loss - loss) < 1e-5, `SWAG loss ${swag.loss}, by hand ${loss}`);
  // the samples varied: their average is not the SWA mean's prediction
  assert.notEqual(swag.loss, r.candidates![1]!.loss);
  tf.dispose(probs);
  posterior.dispose();
  assert.equal(tf.memory().numTensors, before);
});
