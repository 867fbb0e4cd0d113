import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { after, before, test } from 'node:test';
import * as tf from '@tensorflow/tfjs';
import { loadBackbone } from '../../src/backbones/load.js';
import { initBackend } from '../../src/backend/index.js';
import { decodeImage } from '../../src/data/decode.js';
import { loadSplits } from '../../src/data/scan.js';
import { resolveEngineContext } from '../../src/engine/index.js';
import { EXIT_CODES, FinetuneError } from '../../src/errors.js';
import { expandSweep } from '../../src/experiments/config.js';
import { buildHead, logitsView, stageHead } from '../../src/head/build.js';
import { fileLoadHandler } from '../../src/io/files.js';
import { learningRateAt } from '../../src/swa/schedule.js';
import { optionsHash } from '../../src/train/checkpoint.js';
import { type FineTuneSettings, runFineTune, warmupSteps } from '../../src/train/finetune.js';
import { StageOptimizer } from '../../src/train/optimizers.js';
import { resolveTrainOptions, type TrainOptions } from '../../src/train/options.js';
import { VAL_PREDICTIONS, type ValPrediction } from '../../src/train/phases.js';
import { train } from '../../src/train/train.js';
import { colourWorkspace, runCli } from '../helpers.js';

let dir: string;
let cleanup: () => Promise<void>;
let tiny: string;
let data: string;

before(async () => {
  await initBackend('wasm');
  ({ dir, cleanup, backbone: tiny, data } = await colourWorkspace('stage-options'));
});
after(async () => {
  await cleanup();
});

/**
 * Every learning rate the stage optimizers are given while `body` runs, in order: the
 * loop sets it before each step, and to 0 when a stage ends (one run at a time here).
 */
async function recordLrs<T>(body: () => Promise<T>): Promise<{ result: T; lrs: number[] }> {
  const proto = StageOptimizer.prototype;
  const original = proto.setLearningRate;
  const lrs: number[] = [];
  proto.setLearningRate = function (this: StageOptimizer, lr: number, member = 0) {
    lrs.push(lr);
    original.call(this, lr, member);
  };
  try {
    return { result: await body(), lrs };
  } finally {
    proto.setLearningRate = original;
  }
}

const ramp = (lr: number, warmup: number, steps: number) =>
  Array.from({ length: steps }, (_, i) => (i < warmup ? (lr * (i + 1)) / warmup : lr));

const close = (got: readonly number[], want: readonly number[], what: string) => {
  assert.equal(got.length, want.length, `${what}: ${got} vs ${want}`);
  got.forEach((g, i) => {
    assert.ok(Math.abs(g - want[i]!) <= 1e-15, `${what}: step ${i}: ${got} vs ${want}`);
  });
};

test('--finetune-warmup-epochs and --finetune-dropout: defaults, ranges, and only with a fine-tune stage', () => {
  const ft = resolveTrainOptions({ data: 'x', finetuneEpochs: 3 });
  assert.equal(ft.finetuneWarmupEpochs, 1);
  assert.equal(ft.finetuneDropout, 0.2);
  assert.equal(
    resolveTrainOptions({ data: 'x', finetuneEpochs: 3, dropout: 0 }).finetuneDropout,
    0,
  );
  const r = resolveTrainOptions({
    data: 'x',
    finetuneEpochs: 3,
    finetuneWarmupEpochs: 3,
    dropout: 0,
    finetuneDropout: 0.5,
  });
  assert.equal(r.finetuneWarmupEpochs, 3);
  assert.equal(r.dropout, 0);
  assert.equal(r.finetuneDropout, 0.5);
  assert.equal(
    resolveTrainOptions({ data: 'x', finetuneEpochs: 3, finetuneWarmupEpochs: 0 })
      .finetuneWarmupEpochs,
    0,
  );
  const bad: [Partial<TrainOptions>, string][] = [
    [
      { finetuneEpochs: 3, finetuneWarmupEpochs: 4 },
      "Expected an integer from 0 to 3 (the fine-tune stage's epochs) for finetuneWarmupEpochs but received 4",
    ],
    [
      { finetuneEpochs: 3, finetuneWarmupEpochs: 1.5 },
      "Expected an integer from 0 to 3 (the fine-tune stage's epochs) for finetuneWarmupEpochs but received 1.5",
    ],
    [
      { finetuneEpochs: 3, finetuneWarmupEpochs: -1 },
      "Expected an integer from 0 to 3 (the fine-tune stage's epochs) for finetuneWarmupEpochs but received -1",
    ],
    [
      { finetuneEpochs: 3, finetuneDropout: 1 },
      'Expected a number from 0 to 1 (exclusive) for finetuneDropout but received 1',
    ],
    [
      { finetuneEpochs: 3, finetuneDropout: -0.1 },
      'Expected a number from 0 to 1 (exclusive) for finetuneDropout but received -0.1',
    ],
    [
      { finetuneWarmupEpochs: 0 },
      'finetuneWarmupEpochs need a fine-tune stage (finetuneEpochs > 0)',
    ],
    [{ finetuneDropout: 0.5 }, 'finetuneDropout need a fine-tune stage (finetuneEpochs > 0)'],
    [
      { finetuneEpochs: 0, finetuneDropout: 0, finetuneWarmupEpochs: 2 },
      'finetuneWarmupEpochs, finetuneDropout need a fine-tune stage (finetuneEpochs > 0)',
    ],
  ];
  for (const [options, message] of bad) {
    assert.throws(
      () => resolveTrainOptions({ data: 'x', ...options }),
      (err: unknown) => err instanceof FinetuneError && err.message === message,
      message,
    );
  }
});

test("the CLI's epoch and stage lines name the averaging kind: ema for EMA, swa for SWA", async () => {
  for (const average of ['ema', 'swa'] as const) {
    const r = await runCli(
      [
        'train',
        '--data',
        data,
        '--out',
        path.join(dir, `labels-${average}`),
        '--backbone',
        tiny,
        '--backend',
        'wasm',
        '--no-cache',
        '--epochs',
        '3',
        '--swa-start',
        '1',
        '--average',
        average,
      ],
      dir,
    );
    assert.equal(r.code, 0, r.stderr);
    // The progress lines go to stderr, the result to stdout.
    const other = average === 'ema' ? 'swa' : 'ema';
    assert.match(r.stderr, new RegExp(`\\nhead epoch 3/3 .* ${average} \\d+ \\(`), r.stderr);
    assert.match(r.stderr, new RegExp(`\\nhead stage val acc: raw [\\d.]+, ${average} [\\d.]+\\n`));
    assert.doesNotMatch(r.stderr, new RegExp(`epoch .* ${other} \\d+ \\(|, ${other} [\\d.]+\\n`));
  }
});

test('the CLI refuses either option without a fine-tune stage, and a warm-up longer than the stage, in one line (usage exit code)', async () => {
  for (const [args, line] of [
    [
      ['--finetune-warmup-epochs', '2'],
      'finetune: --finetune-warmup-epochs need a fine-tune stage (--finetune-epochs > 0)',
    ],
    [
      ['--finetune-dropout', '0.5'],
      'finetune: --finetune-dropout need a fine-tune stage (--finetune-epochs > 0)',
    ],
    [
      ['--finetune-epochs', '2', '--finetune-warmup-epochs', '3'],
      "finetune: Expected an integer from 0 to 2 (the fine-tune stage's epochs) for --finetune-warmup-epochs but received 3",
    ],
  ] as const) {
    const r = await runCli(
      ['train', '--data', data, '--out', path.join(dir, 'refused'), ...args],
      dir,
    );
    assert.equal(r.code, EXIT_CODES.usage, r.stderr);
    assert.equal(r.stderr, `${line}\n`);
  }
});

test('both options are part of the options hash and of a sweep run id; a sweep refuses them without the stage', () => {
  const base = { data: 'x', finetuneEpochs: 3 };
  const hash = (o: Partial<TrainOptions>) => optionsHash(resolveTrainOptions({ ...base, ...o }));
  assert.equal(hash({}), hash({ finetuneWarmupEpochs: 1, finetuneDropout: 0.2 }));
  assert.notEqual(hash({}), hash({ finetuneWarmupEpochs: 0 }));
  assert.notEqual(hash({}), hash({ finetuneDropout: 0.5 }));
  const runs = expandSweep({
    out: path.join(dir, 'sweep'),
    base,
    grid: { finetuneWarmupEpochs: [0, 1, 2], finetuneDropout: [0, 0.5] },
  });
  assert.equal(new Set(runs.map((r) => r.id)).size, 6);
  assert.deepEqual(
    runs.map((r) => [r.options.finetuneWarmupEpochs, r.options.finetuneDropout]),
    [
      [0, 0],
      [0, 0.5],
      [1, 0],
      [1, 0.5],
      [2, 0],
      [2, 0.5],
    ],
  );
  assert.throws(
    () => expandSweep({ out: 'sweep', base: { data: 'x' }, grid: { finetuneDropout: [0.1] } }),
    {
      message:
        'run 1 of 1 [finetuneDropout=0.1]: finetuneDropout need a fine-tune stage (finetuneEpochs > 0)',
    },
  );
});

test('warmupSteps: whole epochs of steps (a short last batch is a step); the schedule ramps over them', () => {
  assert.equal(warmupSteps(0, 24, 8), 0);
  assert.equal(warmupSteps(1, 24, 8), 3);
  assert.equal(warmupSteps(2, 25, 8), 8);
  const plan = { lr: 0.01, epochs: 3, schedule: 'constant' as const, averaging: null };
  const rates = (warmup: number) =>
    [0, 1, 2].flatMap((e) =>
      [0, 1, 2].map((s) =>
        learningRateAt({ ...plan, warmupSteps: warmupSteps(warmup, 24, 8) }, e, s, 3),
      ),
    );
  close(rates(0), ramp(0.01, 0, 9), 'no warm-up');
  close(rates(2), ramp(0.01, 6, 9), 'two epochs');
  close(rates(3), ramp(0.01, 9, 9), 'the whole stage');
});

/** runFineTune on the tiny backbone from a fresh head: its per-step LRs and each step's largest move of the head's bias. */
async function fineTuneSteps(settings: Partial<FineTuneSettings>, headDropout: number) {
  const backend = await initBackend('wasm');
  const backbone = await loadBackbone(tiny);
  const splits = await loadSplits(data, { valSplit: 0 });
  const head = buildHead(backbone.featureSize, splits.classes.length, {
    hidden: 0,
    dropout: headDropout,
    seed: 1,
  });
  const bias = (): Float32Array =>
    (head.getLayer('head_logits').getWeights()[1]!.dataSync() as Float32Array).slice();
  let start: Float32Array = new Float32Array(0);
  const moves: number[] = [];
  const { lrs } = await recordLrs(async () => {
    const result = await runFineTune(
      {
        backbone,
        head,
        train: {
          files: splits.train.map((f) => f.path),
          labels: Int32Array.from(splits.train, (f) => f.label),
        },
        val: { files: [], labels: new Int32Array(0) },
        numClasses: splits.classes.length,
        headLoss: null,
        engine: resolveEngineContext({ engine: 'tfjs', backend, workers: 1 }),
        callbacks: [
          {
            onBatchBegin() {
              start = bias();
            },
            onBatchEnd() {
              const end = bias();
              moves.push(Math.max(...end.map((v, i) => Math.abs(v - start[i]!))));
            },
          },
        ],
        warn: () => undefined,
        cache: null,
      },
      {
        epochs: 3,
        unfreeze: 'from:dw1',
        lr: 0.01,
        batchSize: 8,
        optimizer: 'adam',
        freezeBn: false,
        swa: null,
        earlyStop: null,
        augment: [],
        augmentViews: 1,
        keep: 'last',
        labelSmoothing: 0,
        classWeights: null,
        seed: 1,
        decodeConcurrency: 2,
        embedBatchSize: 16,
        ...settings,
      },
    );
    await result.dispose();
  });
  const rate = (head.getLayer('head_dropout') as unknown as { rate: number } | undefined)?.rate;
  head.dispose();
  backbone.dispose();
  assert.equal(splits.train.length, 24); // 3 steps an epoch in batches of 8
  return { lrs, moves, rate };
}

test('the fine-tune stage warms up over --finetune-warmup-epochs: 0 starts at the full LR, 2 ramps over two epochs of steps', async () => {
  // Adam's first step moves every weight with a nonzero gradient by the LR itself
  // (m̂/√v̂ = g/|g|), so the head's bias shows the first step's LR in the weights too.
  const before = tf.memory().numTensors;
  const lr = 0.01;
  for (const [warmup, steps] of [
    [undefined, 3],
    [0, 0],
    [2, 6],
  ] as const) {
    // One of them also trains at another dropout rate than the head's, given back after.
    const { lrs, moves, rate } = await fineTuneSteps(
      warmup === undefined ? {} : { warmupEpochs: warmup, dropout: 0.5 },
      0.2,
    );
    assert.equal(rate, 0.2);
    close(lrs, [...ramp(lr, steps, 9), 0], `warm-up ${warmup}`);
    const first = moves[0]!;
    const want = steps ? lr / steps : lr;
    assert.ok(
      Math.abs(first - want) <= 1e-3 * want,
      `warm-up ${warmup}: first step moved ${first}, expected ${want}`,
    );
  }
  assert.equal(tf.memory().numTensors, before);
});

test("stageHead: the stage rate on the head's own Dropout (restored after), or a Dropout added before the classifier of a head built without; inference unchanged", () => {
  const before = tf.memory().numTensors;
  const x = tf.tidy(() => tf.randomNormal([6, 5], 0, 1, 'float32', 4));
  const values = (t: tf.Tensor) => {
    const v = t.dataSync() as Float32Array;
    t.dispose();
    return Array.from(v);
  };
  for (const shape of [
    { hidden: 0, bn: false },
    { hidden: 4, bn: false },
    { hidden: 4, bn: true },
  ]) {
    const what = JSON.stringify(shape);
    // Same seed: same initial weights whatever the dropout (its layer has none).
    const bare = buildHead(5, 3, { ...shape, dropout: 0, seed: 3 });
    const built = buildHead(5, 3, { ...shape, dropout: 0.5, seed: 3 });
    const rateOf = () => (built.getLayer('head_dropout') as unknown as { rate: number }).rate;
    // BN (with `bn`) in training mode normalises with the batch's statistics: comparable.
    const trained = () => values(logitsView(bare).apply(x, { training: true }) as tf.Tensor);
    const added = stageHead(bare, 0.5);
    const own = stageHead(built);
    added.reseed([7]);
    own.reseed([7]);
    // Added after the build or built in: the same mask for the same seed, the same logits.
    const a = values(added.forward(x, true));
    assert.deepEqual(a, values(own.forward(x, true)), what);
    assert.notDeepEqual(a, trained(), `${what}: dropout applied`);
    assert.deepEqual(
      values(added.forward(x, false)),
      values(logitsView(bare).apply(x) as tf.Tensor),
      `${what}: inference`,
    );
    assert.equal(bare.layers.length, built.layers.length - 1, `${what}: the head's graph as built`);
    added.restore();
    own.restore();
    // The built head at rate 0 for the stage, then its own rate back.
    const off = stageHead(built, 0);
    off.reseed([7]);
    assert.equal(rateOf(), 0);
    assert.deepEqual(values(off.forward(x, true)), trained(), `${what}: rate 0 drops nothing`);
    off.restore();
    assert.equal(rateOf(), 0.5);
    assert.equal((built.getLayer('head_dropout').getConfig() as { rate: number }).rate, 0.5);
    // No rate, or 0, on a head without dropout: exactly logitsView.
    for (const rate of [undefined, 0]) {
      const none = stageHead(bare, rate);
      none.reseed([7]);
      assert.deepEqual(values(none.forward(x, true)), trained(), `${what}: rate ${rate}`);
    }
    bare.dispose();
    built.dispose();
  }
  x.dispose();
  assert.equal(tf.memory().numTensors, before);
});

async function weightsBin(run: string): Promise<Buffer> {
  return readFile(path.join(run, 'model', 'weights.bin'));
}

async function metricsLines(run: string): Promise<Record<string, unknown>[]> {
  const text = await readFile(path.join(run, 'metrics.jsonl'), 'utf8');
  return text
    .trim()
    .split('\n')
    .map((l) => {
      const { seconds: _, ...rest } = JSON.parse(l);
      return rest;
    });
}

test("runs: --finetune-dropout changes only stage two (stage one bit-identical); the export is the plain model and loads in plain tfjs with the run's predictions; both options recorded", async () => {
  const before = tf.memory().numTensors;
  const options: TrainOptions = {
    data,
    backbone: tiny,
    backend: 'wasm',
    epochs: 4,
    lr: 0.05,
    batchSize: 8,
    dropout: 0,
    finetuneEpochs: 3,
    unfreeze: 'from:dw1',
    finetuneLr: 0.01,
    finetuneSwaStart: 2,
    finetuneWarmupEpochs: 2,
    cache: false,
  };
  const off = path.join(dir, 'dropout-off');
  const on = path.join(dir, 'dropout-on');
  await train({ ...options, finetuneDropout: 0, out: off });
  const { lrs } = await recordLrs(() => train({ ...options, finetuneDropout: 0.5, out: on }));
  assert.equal(tf.memory().numTensors, before);
  // The stage's LRs, the last of the run's: 18 training images (6 val), 3 steps an epoch,
  // ramping over two epochs, then the stage's SWA LR (finetune-lr / 2) from its third.
  close(lrs.slice(-10), [...ramp(0.01, 6, 6), 0.005, 0.005, 0.005, 0], 'the run');

  const [a, b] = [await metricsLines(off), await metricsLines(on)];
  const head = (lines: Record<string, unknown>[]) => lines.filter((l) => l['stage'] === 'head');
  const stage = (lines: Record<string, unknown>[]) =>
    lines.filter((l) => l['stage'] === 'finetune');
  assert.equal(head(a).length, 4);
  assert.deepEqual(head(b), head(a));
  assert.equal(stage(b).length, 3);
  assert.notDeepEqual(stage(b), stage(a));
  assert.ok(!(await weightsBin(off)).equals(await weightsBin(on)));

  const config = JSON.parse(await readFile(path.join(on, 'config.json'), 'utf8'));
  assert.equal(config.finetuneDropout, 0.5);
  assert.equal(config.finetuneWarmupEpochs, 2);
  assert.equal(config.dropout, 0);

  // The export is the model --dropout 0 describes (no Dropout layer), in plain tfjs.
  const modelJson = path.join(on, 'model', 'model.json');
  const saved = JSON.parse(await readFile(modelJson, 'utf8'));
  const classes = (saved.modelTopology.config.layers as { class_name: string }[]).map(
    (l) => l.class_name,
  );
  assert.ok(!classes.includes('Dropout'), classes.join(','));
  const model = await tf.loadLayersModel(fileLoadHandler(modelJson));
  const { predictions } = JSON.parse(await readFile(path.join(on, VAL_PREDICTIONS), 'utf8')) as {
    predictions: ValPrediction[];
  };
  assert.equal(predictions.length, 6);
  const size = 32;
  const pixels = new Float32Array(predictions.length * size * size * 3);
  for (const [i, p] of predictions.entries()) {
    const decoded = await decodeImage(p.file, { width: size, height: size });
    assert.ok(decoded.ok);
    pixels.set(decoded.pixels, i * size * size * 3);
  }
  const probs = tf.tidy(
    () =>
      (
        model.predict(tf.tensor4d(pixels, [predictions.length, size, size, 3])) as tf.Tensor
      ).arraySync() as number[][],
  );
  const labels = saved.userDefinedMetadata.labels as string[];
  predictions.forEach((p, i) => {
    const row = probs[i]!;
    const top = row.indexOf(Math.max(...row));
    assert.equal(labels[top], p.predicted, p.file);
    assert.ok(
      Math.abs(row[top]! - p.confidence) <= 1e-5,
      `${p.file}: ${row[top]} vs ${p.confidence}`,
    );
  });
  model.dispose();
  assert.equal(tf.memory().numTensors, before);
});
