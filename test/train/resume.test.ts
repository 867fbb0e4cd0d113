import assert from 'node:assert/strict';
import { appendFile, readdir, readFile } from 'node:fs/promises';
import path from 'node:path';
import { after, before, test } from 'node:test';
import * as tf from '@tensorflow/tfjs';
import { initBackend } from '../../src/backend/index.js';
import { EXIT_CODES } from '../../src/errors.js';
import { readCheckpoint } from '../../src/train/checkpoint.js';
import type { TrainOptions } from '../../src/train/options.js';
import { train } from '../../src/train/train.js';
import { colourWorkspace, runCli } from '../helpers.js';

let dir: string;
let cleanup: () => Promise<void>;
let backbone: string;
let data: string;

before(async () => {
  await initBackend('wasm');
  ({ dir, cleanup, backbone, data } = await colourWorkspace('resume'));
});
after(async () => {
  await cleanup();
});

class Interrupt extends Error {}

/** Throws from the progress events once `stage` has ended epoch `epoch` (before that epoch's checkpoint). */
function interruptAfter(stage: string, epoch: number): TrainOptions['onEvent'] {
  return (e) => {
    if (e.type === 'epoch' && e.logs.stage === stage && e.logs.epoch === epoch)
      throw new Interrupt(`interrupted after ${stage} epoch ${epoch}`);
  };
}

/** metrics.jsonl without the timings. */
async function metrics(out: string): Promise<unknown[]> {
  const text = await readFile(path.join(out, 'metrics.jsonl'), 'utf8');
  return text
    .trim()
    .split('\n')
    .map((l) => {
      const { seconds: _, ...rest } = JSON.parse(l);
      return rest;
    });
}

/** Every file of the exported model, byte for byte, except what names the run (its id). */
async function sameExport(a: string, b: string): Promise<void> {
  const bin = (run: string) => readFile(path.join(run, 'model', 'weights.bin'));
  assert.ok((await bin(a)).equals(await bin(b)), 'weights.bin differs');
  const summary = async (run: string) => {
    const s = JSON.parse(await readFile(path.join(run, 'summary.json'), 'utf8'));
    return { stages: s.stages, val: s.val, test: s.test, exported: s.exported };
  };
  assert.deepEqual(await summary(b), await summary(a));
  assert.deepEqual(await metrics(b), await metrics(a));
}

test('head stage: interrupted and resumed ends with the weights and metrics of an uninterrupted run (SWA and SWAG across the interruption), no tensor leak', async () => {
  const options: TrainOptions = {
    data,
    backbone,
    backend: 'wasm',
    epochs: 6,
    batchSize: 8,
    lr: 0.05,
    swaStart: 1,
    swaFreq: 1,
    swag: 2,
    checkpointEvery: 2,
    cache: false,
  };
  const whole = path.join(dir, 'head-whole');
  const cut = path.join(dir, 'head-cut');
  const before = tf.memory().numTensors;
  // Checkpoints (epochs 2, 4, 6) hold no tensor: the count is the same at every epoch's end
  // once the average exists (from epoch 2).
  const counts: number[] = [];
  await train({
    ...options,
    out: whole,
    onEvent: (e) => {
      if (e.type === 'epoch') counts.push(tf.memory().numTensors);
    },
  });
  assert.equal(counts.length, 6);
  assert.equal(new Set(counts.slice(1)).size, 1, counts.join(' '));
  await assert.rejects(
    train({ ...options, out: cut, onEvent: interruptAfter('head', 3) }),
    Interrupt,
  );
  assert.equal(tf.memory().numTensors, before);
  const cp = await readCheckpoint(cut);
  try {
    // The checkpoint of epoch 2 already holds an average: SWA spans the interruption.
    assert.equal(cp.stage, 'head');
    assert.equal(cp.epoch, 2);
    assert.ok(cp.state.averagerCounts![0]![0]! > 0);
    assert.ok(cp.state.swagCounts![0]! > 0);
  } finally {
    cp.dispose();
  }
  assert.equal((await metrics(cut)).length, 2);
  const summary = await train({ resume: cut });
  assert.equal(tf.memory().numTensors, before);
  assert.equal(summary.stages['head']!.snapshots, 5);
  await sameExport(whole, cut);
  // The finished run is complete: no checkpoint left, and nothing to resume.
  assert.ok(!(await readdir(cut)).includes('checkpoint'));
  await assert.rejects(train({ resume: cut }), {
    message: `${cut}: cannot be resumed: the run is complete (it has a summary.json)`,
  });
});

test('head stage with early stopping, EMA, momentum and class weights: resumed equals uninterrupted', async () => {
  const options: TrainOptions = {
    data,
    backbone,
    backend: 'wasm',
    epochs: 8,
    batchSize: 4,
    lr: 0.3,
    optimizer: 'momentum',
    classWeights: 'balanced',
    average: 'ema',
    swaStart: 3,
    earlyStop: 1,
    minDelta: 0.1,
    lrSchedule: 'cos',
    checkpointEvery: 1,
    cache: false,
  };
  const whole = path.join(dir, 'es-whole');
  const cut = path.join(dir, 'es-cut');
  const before = tf.memory().numTensors;
  await train({ ...options, out: whole });
  await assert.rejects(
    train({ ...options, out: cut, onEvent: interruptAfter('head', 3) }),
    Interrupt,
  );
  const summary = await train({ resume: cut });
  assert.equal(tf.memory().numTensors, before);
  // Patience ran out before averaging (moving it forward) and then during it: both in the plan saved.
  assert.ok(summary.stages['head']!.stoppedAfter !== null);
  assert.ok(summary.stages['head']!.averagingFrom! < 4);
  await sameExport(whole, cut);
});

test('fine-tune stage: resumed inside the stage (averaging and warm-up spanning the interruption, a stage dropout rate, another --finetune-threads) ends as the uninterrupted run, without training the head again', async () => {
  const options: TrainOptions = {
    data,
    backbone,
    backend: 'wasm',
    epochs: 3,
    batchSize: 8,
    lr: 0.05,
    finetuneEpochs: 4,
    unfreeze: 'from:dw1',
    finetuneLr: 0.01,
    finetuneWarmupEpochs: 3,
    finetuneDropout: 0.5,
    finetuneSwaStart: 1,
    finetuneSwaFreq: 1,
    augment: 'flip,crop',
    augmentViews: 3,
    keep: 'best',
    checkpointEvery: 2,
    cache: false,
  };
  const whole = path.join(dir, 'ft-whole');
  const cut = path.join(dir, 'ft-cut');
  const before = tf.memory().numTensors;
  await train({ ...options, out: whole });
  await assert.rejects(
    train({
      ...options,
      out: cut,
      finetuneThreads: 1,
      onEvent: interruptAfter('finetune', 3),
    }),
    Interrupt,
  );
  assert.equal(tf.memory().numTensors, before);
  const cp = await readCheckpoint(cut);
  try {
    assert.equal(cp.stage, 'finetune');
    assert.equal(cp.epoch, 2);
    assert.ok(cp.state.averagerCounts![0]![0]! > 0);
    assert.equal(cp.head?.history.length, 3);
  } finally {
    cp.dispose();
  }
  const stages: string[] = [];
  // Cut on one thread, resumed on two (the uninterrupted run had the default).
  const resumed = await train({
    resume: cut,
    finetuneThreads: 2,
    onEvent: (e) => {
      if (e.type === 'epoch') stages.push(`${e.logs.stage} ${e.logs.epoch}`);
    },
  });
  assert.equal(resumed.stages['finetune']!.threads, 2);
  assert.deepEqual(stages, ['finetune 3', 'finetune 4']);
  assert.equal(tf.memory().numTensors, before);
  await sameExport(whole, cut);
});

test('BatchNorm in training mode (--head-bn, --bn train), stage dropout after --dropout 0: resumed in either stage equals uninterrupted, refreshed statistics included', async () => {
  const options: TrainOptions = {
    data,
    backbone,
    backend: 'wasm',
    epochs: 4,
    batchSize: 8,
    lr: 0.05,
    hidden: 4,
    headBn: true,
    dropout: 0,
    finetuneDropout: 0.3,
    swaStart: 1,
    finetuneEpochs: 3,
    unfreeze: 'from:dw1',
    bn: 'train',
    finetuneLr: 0.01,
    finetuneSwaStart: 1,
    checkpointEvery: 1,
    cache: false,
  };
  const whole = path.join(dir, 'bn-whole');
  const before = tf.memory().numTensors;
  const summary = await train({ ...options, out: whole });
  assert.ok((summary.stages['head']!.bnRefreshed?.length ?? 0) > 0);
  assert.ok((summary.stages['finetune']!.bnRefreshed?.length ?? 0) > 0);
  for (const [stage, epoch] of [
    ['head', 3],
    ['finetune', 2],
  ] as const) {
    const cut = path.join(dir, `bn-cut-${stage}`);
    await assert.rejects(
      train({ ...options, out: cut, onEvent: interruptAfter(stage, epoch) }),
      Interrupt,
    );
    await train({ resume: cut });
    assert.equal(tf.memory().numTensors, before);
    await sameExport(whole, cut);
  }
});

test('resume refuses a folder without a checkpoint, a complete run and other options, in one line', async () => {
  const plain = path.join(dir, 'plain');
  await train({ data, backbone, backend: 'wasm', epochs: 1, out: plain, cache: false });
  const empty = path.join(dir, 'data', 'red');
  await assert.rejects(train({ resume: path.join(dir, 'nowhere') }), {
    message: `${path.join(dir, 'nowhere')}: cannot be resumed: no such run folder`,
  });
  await assert.rejects(train({ resume: empty }), {
    message: `${empty}: cannot be resumed: it holds no checkpoint/manifest.json (runs with checkpointEvery, --checkpoint-every N, write one)`,
  });
  // A damaged data file: refused, naming it.
  const damaged = path.join(dir, 'damaged');
  await assert.rejects(
    train({
      data,
      backbone,
      backend: 'wasm',
      epochs: 3,
      checkpointEvery: 1,
      out: damaged,
      cache: false,
      onEvent: interruptAfter('head', 2),
    }),
    Interrupt,
  );
  const [bin] = (await readdir(path.join(damaged, 'checkpoint'))).filter((n) => n.endsWith('.bin'));
  await appendFile(path.join(damaged, 'checkpoint', bin!), 'x');
  await assert.rejects(train({ resume: damaged }), {
    message: `${damaged}: cannot be resumed: checkpoint/${bin} is missing or damaged`,
  });
  await assert.rejects(train({ resume: plain, epochs: 3 } as never), {
    message:
      'a resumed run keeps its own options: drop epochs (only checkpointEvery, decodeConcurrency and finetuneThreads may be given)',
  });
  for (const [args, line] of [
    [
      ['--resume', plain],
      `finetune: ${plain}: cannot be resumed: the run is complete (it has a summary.json)`,
    ],
    [
      ['--resume', plain, '--epochs', '3'],
      'finetune: a resumed run keeps its own options: drop --epochs (only --checkpoint-every, --decode-concurrency and --finetune-threads may be given)',
    ],
  ] as const) {
    const r = await runCli(['train', ...args], dir);
    assert.equal(r.code, EXIT_CODES.usage, r.stderr);
    assert.equal(r.stderr, `${line}\n`);
  }
});
