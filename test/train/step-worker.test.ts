import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';
import * as tf from '@tensorflow/tfjs';
import type { BackendInfo } from '../../src/backend/index.js';
import { FinetuneError } from '../../src/errors.js';
import { childThreadOptions, expandSweep } from '../../src/experiments/config.js';
import * as lib from '../../src/index.js';
import { optionsHash } from '../../src/train/checkpoint.js';
import { stageModel, stepPlan } from '../../src/train/finetune.js';
import {
  ArrayBatches,
  CHUNK_ROWS,
  type FitOptions,
  fit,
  type HalvedSteps,
} from '../../src/train/fit.js';
import { resolveTrainOptions, type TrainOptions } from '../../src/train/options.js';
import { StepWorker } from '../../src/train/step-worker.js';
import { train } from '../../src/train/train.js';
import { useColourWorkspace } from '../helpers.js';

const ws = useColourWorkspace('step-worker');

/**
 * A fine-tune run of the tiny backbone from dw1 on the workspace's colours, with its steps
 * on tfjs (halves are tfjs's; ONNX Runtime takes the whole batch), and `extra` on top.
 */
const halvesRun = (extra: Partial<TrainOptions>): TrainOptions => ({
  data: ws.data,
  backbone: ws.backbone,
  backend: 'wasm',
  engine: 'tfjs',
  unfreeze: 'from:dw1',
  finetuneLr: 0.01,
  dropout: 0.3,
  cache: false,
  ...extra,
});

/** Counts what StepWorker.gradients answers while `body` runs: outcomes, and nulls (failures). */
async function countWorkerSteps<T>(
  body: () => Promise<T>,
): Promise<{ result: T; answered: number; failed: number }> {
  const proto = StepWorker.prototype;
  const original = proto.gradients;
  let answered = 0;
  let failed = 0;
  proto.gradients = async function (this: StepWorker, ...args) {
    const r = await original.apply(this, args);
    if (r) answered++;
    else failed++;
    return r;
  };
  try {
    return { result: await body(), answered, failed };
  } finally {
    proto.gradients = original;
  }
}

const withoutSeconds = (jsonl: string) =>
  jsonl
    .trim()
    .split('\n')
    .map((l) => {
      const { seconds: _, ...rest } = JSON.parse(l) as Record<string, unknown>;
      return rest;
    });

test('fine-tune steps in halves: 1 and 2 threads give the same weights and figures bit for bit, the worker answers every step, no tensor leak', async () => {
  // 18 training images in batches of 17 (halves of 9, in chunks of 8 and 1, and 8; then a
  // batch of one row, with no second half), dropout, label smoothing, balanced class weights
  // and a flip view per epoch: every part setting counts.
  const options = halvesRun({
    valSplit: 0.25,
    epochs: 2,
    batchSize: 17,
    finetuneEpochs: 3,
    labelSmoothing: 0.1,
    classWeights: 'balanced',
    augment: 'flip',
  });
  const runs: { weights: Buffer; metrics: unknown[]; steps: number }[] = [];
  for (const finetuneThreads of [1, 2]) {
    const before = tf.memory().numTensors;
    const out = path.join(ws.dir, `threads-${finetuneThreads}`);
    const { result, answered, failed } = await countWorkerSteps(() =>
      train({ ...options, out, finetuneThreads }),
    );
    assert.equal(tf.memory().numTensors, before, `threads ${finetuneThreads}: tensors`);
    assert.equal(failed, 0);
    assert.equal(result.stages['finetune']!.threads, finetuneThreads);
    assert.deepEqual(result.warnings, []);
    runs.push({
      weights: await readFile(path.join(out, 'model', 'weights.bin')),
      metrics: withoutSeconds(await readFile(path.join(out, 'metrics.jsonl'), 'utf8')),
      steps: answered,
    });
  }
  const [one, two] = runs;
  assert.equal(one!.steps, 0, 'one thread: no worker');
  assert.equal(two!.steps, 3, 'two threads: a worker half in every step that has one');
  assert.ok(one!.weights.equals(two!.weights), 'the same exported weights');
  assert.deepEqual(one!.metrics, two!.metrics);
});

/** A softmax regression fitted on 21 rows for two epochs, with or without halved steps. */
async function fitRegression(
  halves: HalvedSteps | undefined,
  classWeights: number[] | null,
  batchSize: number,
) {
  const optimizer = tf.train.sgd(0.5);
  const w = tf.variable(tf.tensor2d([0.1, -0.2, 0.3, 0.05, -0.1, 0.2, 0.4, -0.3, 0.1], [3, 3]));
  const b = tf.variable(tf.zeros([3]));
  const x = Float32Array.from({ length: 63 }, (_, i) => Math.sin(i * 1.7));
  const labels = Int32Array.from({ length: 21 }, (_, i) => (i * 7) % 3);
  const options: FitOptions = {
    stage: 'test',
    epochs: 2,
    batchSize,
    optimizer,
    variables: [w, b],
    forward: (t) => tf.add(tf.matMul(t, w), b),
    numClasses: 3,
    members: [
      {
        seed: 3,
        labelSmoothing: 0.1,
        classWeights,
        callbacks: [],
        lr: () => 0.5,
      },
    ],
    ...(halves ? { halves } : {}),
  };
  const before = tf.memory().numTensors;
  const { histories } = await fit(new ArrayBatches(x, [3], labels), null, options);
  assert.equal(tf.memory().numTensors, before, 'fit leaves no tensor');
  const out = { w: w.dataSync().slice(), b: b.dataSync().slice(), logs: histories[0]! };
  tf.dispose([w, b]);
  optimizer.dispose();
  return out;
}

test("halves add up to the whole batch's step: class weights, label smoothing, odd and one-row batches, halves over CHUNK_ROWS", async () => {
  assert.equal(CHUNK_ROWS, 8);
  // Batches of 4 (halves 2 + 2, the last batch one row) and of 20 (halves 10 + 10, each two
  // chunks, then one row).
  for (const [classWeights, batchSize] of [
    [null, 4],
    [[1, 0.5, 2.5], 4],
    [null, 20],
    [[1, 0.5, 2.5], 20],
  ] as const) {
    const whole = await fitRegression(
      undefined,
      classWeights ? [...classWeights] : null,
      batchSize,
    );
    const halved = await fitRegression(
      { second: null },
      classWeights ? [...classWeights] : null,
      batchSize,
    );
    const near = (a: ArrayLike<number>, c: ArrayLike<number>, what: string) => {
      for (let i = 0; i < a.length; i++)
        assert.ok(Math.abs(a[i]! - c[i]!) < 1e-6, `${what}[${i}]: ${a[i]} vs ${c[i]}`);
    };
    near(halved.w, whole.w, 'w');
    near(halved.b, whole.b, 'b');
    near(
      halved.logs.map((l) => l.loss),
      whole.logs.map((l) => l.loss),
      'loss',
    );
    assert.deepEqual(
      halved.logs.map((l) => l.acc),
      whole.logs.map((l) => l.acc),
    );
    // The steps moved the weights: the comparison is not of two untouched copies.
    assert.ok(Math.abs(whole.w[0]! - 0.1) > 1e-3);
  }
});

test('a worker that dies mid-stage: one warning, the stage ends on one thread with the same weights', async () => {
  const options = halvesRun({ epochs: 1, batchSize: 8, finetuneEpochs: 2 });
  const one = path.join(ws.dir, 'dies-reference');
  await train({ ...options, out: one, finetuneThreads: 1 });
  const proto = StepWorker.prototype;
  const original = proto.gradients;
  let calls = 0;
  proto.gradients = async function (this: StepWorker, ...args) {
    // The worker is killed before the third step reaches it.
    if (++calls === 3)
      await (this as unknown as { worker: { terminate(): Promise<number> } }).worker.terminate();
    return original.apply(this, args);
  };
  const out = path.join(ws.dir, 'dies');
  const before = tf.memory().numTensors;
  let summary: Awaited<ReturnType<typeof train>>;
  try {
    summary = await train({ ...options, out, finetuneThreads: 2 });
  } finally {
    proto.gradients = original;
  }
  assert.equal(tf.memory().numTensors, before);
  assert.ok(calls > 3, `${calls} steps`);
  const failed = summary.warnings.filter((w) => w.startsWith('fine-tune step worker failed'));
  assert.equal(failed.length, 1, summary.warnings.join('\n'));
  assert.match(failed[0]!, /the stage goes on in one thread$/);
  const weights = (run: string) => readFile(path.join(run, 'model', 'weights.bin'));
  assert.ok((await weights(one)).equals(await weights(out)));
});

test('a step worker that fails answers null, says why once, and is not asked again', async () => {
  const reasons: string[] = [];
  const worker = new StepWorker(
    'wasm',
    {
      body: { class_name: 'Model', config: { name: 'broken', layers: [] } },
      suffix: [],
      head: { topology: {}, weights: [] },
      firstUnfrozen: 'missing',
      settings: { freezeBn: false },
      numClasses: 2,
    },
    (reason) => reasons.push(reason),
  );
  try {
    const part = () => ({
      x: new Float32Array(4),
      shape: [1, 4],
      labels: Int32Array.from([0]),
      rowWeights: null,
      labelSmoothing: 0,
      divisor: 1,
      seed: 1,
    });
    assert.equal(await worker.gradients(part(), []), null);
    assert.equal(await worker.gradients(part(), []), null);
    assert.equal(reasons.length, 1, reasons.join('\n'));
  } finally {
    await worker.close();
  }
});

test('--finetune-threads: 1 or 2, only with a fine-tune stage, out of the options hash and the sweep run id', () => {
  assert.equal(resolveTrainOptions({ data: 'x', finetuneEpochs: 2 }).finetuneThreads, undefined);
  assert.equal(
    resolveTrainOptions({ data: 'x', finetuneEpochs: 2, finetuneThreads: 1 }).finetuneThreads,
    1,
  );
  for (const [options, message] of [
    [
      { finetuneEpochs: 2, finetuneThreads: 3 },
      'Expected an integer from 1 to 2 for finetuneThreads but received 3',
    ],
    [{ finetuneThreads: 2 }, 'finetuneThreads need a fine-tune stage (finetuneEpochs > 0)'],
  ] as const) {
    assert.throws(
      () => resolveTrainOptions({ data: 'x', ...options }),
      (err: unknown) => err instanceof FinetuneError && err.message === message,
      message,
    );
  }
  const hash = (o: Partial<TrainOptions>) =>
    optionsHash(resolveTrainOptions({ data: 'x', finetuneEpochs: 2, ...o }));
  assert.equal(hash({}), hash({ finetuneThreads: 1 }));
  assert.notEqual(hash({}), hash({ finetuneEpochs: 3 }));
  const id = (finetuneThreads: number) =>
    expandSweep({
      out: path.join(ws.dir, 'sweep'),
      base: { data: ws.data, finetuneEpochs: 2, finetuneThreads },
    })[0]!.id;
  assert.equal(id(1), id(2));
  // A grid over it would repeat one run: refused as such.
  assert.throws(
    () =>
      expandSweep({
        out: path.join(ws.dir, 'sweep'),
        base: { data: ws.data, finetuneEpochs: 2 },
        grid: { finetuneThreads: [1, 2] },
      }),
    /resolves to the same options as run 1/,
  );
});

test("a sweep's child processes share the cores: the fine-tune stage's threads follow the child's share (at most 2) unless the run sets them", () => {
  const options = (o: Partial<TrainOptions>) => resolveTrainOptions({ data: 'x', ...o });
  assert.deepEqual(childThreadOptions(options({ finetuneEpochs: 2 }), 1), {
    threads: 1,
    workers: 1,
    finetuneThreads: 1,
  });
  assert.deepEqual(childThreadOptions(options({ finetuneEpochs: 2 }), 4), {
    threads: 4,
    workers: 4,
    finetuneThreads: 2,
  });
  assert.deepEqual(childThreadOptions(options({ finetuneEpochs: 2, finetuneThreads: 2 }), 1), {
    threads: 1,
    workers: 1,
  });
  // Without the stage the option would be refused.
  assert.deepEqual(childThreadOptions(options({}), 1), { threads: 1, workers: 1 });
});

test('stepPlan: halves on backends that train on one thread, whole steps on native TensorFlow unless asked, and whole with BatchNorm training', () => {
  const backend = (tfBackend: string, option: 'wasm' | 'cpu' | 'node') =>
    ({ requested: option, option, tfBackend, gpu: false, skipped: [] }) as unknown as BackendInfo;
  const wasm = backend('wasm', 'wasm');
  const node = backend('tensorflow', 'node');
  const cores = Math.min(2, os.availableParallelism());
  assert.deepEqual(stepPlan(wasm, false, undefined), { halved: true, threads: cores });
  assert.deepEqual(stepPlan(backend('cpu', 'cpu'), false, undefined), {
    halved: true,
    threads: cores,
  });
  assert.deepEqual(stepPlan(wasm, false, 1), { halved: true, threads: 1 });
  assert.deepEqual(stepPlan(node, false, undefined), { halved: false, threads: 1 });
  assert.deepEqual(stepPlan(node, false, 2), { halved: true, threads: 2 });
  assert.deepEqual(stepPlan(wasm, true, 2), { halved: false, threads: 1 });
  // The library exports what a script needs to build the stage's model or its own loop.
  assert.equal(lib.stepPlan, stepPlan);
  assert.equal(lib.stageModel, stageModel);
  assert.equal(typeof lib.stageHead, 'function');
  assert.equal(typeof lib.halfGradients, 'function');
  assert.equal(lib.CHUNK_ROWS, 8);
});
