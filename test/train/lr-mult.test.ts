import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { after, before, test } from 'node:test';
import * as tf from '@tensorflow/tfjs';
import { type Backbone, loadBackbone } from '../../src/backbones/load.js';
import { initBackend } from '../../src/backend/index.js';
import { loadSplits } from '../../src/data/scan.js';
import { resolveEngineContext } from '../../src/engine/index.js';
import { FinetuneError } from '../../src/errors.js';
import { buildHead } from '../../src/head/build.js';
import { fileLoadHandler } from '../../src/io/files.js';
import {
  evenMults,
  type FineTuneSettings,
  groupScales,
  layerGroups,
  runFineTune,
} from '../../src/train/finetune.js';
import { StageOptimizer } from '../../src/train/optimizers.js';
import { resolveTrainOptions } from '../../src/train/options.js';
import { train } from '../../src/train/train.js';
import { colourWorkspace } from '../helpers.js';

let dir: string;
let cleanup: () => Promise<void>;
let tiny: string;
let data: string;

before(async () => {
  await initBackend('wasm');
  ({ dir, cleanup, backbone: tiny, data } = await colourWorkspace('lr-mult'));
});
after(async () => {
  await cleanup();
});

const close = (got: readonly number[], want: readonly number[]) => {
  assert.equal(got.length, want.length, `${got} vs ${want}`);
  got.forEach((g, i) => {
    assert.ok(Math.abs(g - want[i]!) <= 1e-12 * Math.abs(want[i]!), `${got} vs ${want}`);
  });
};

test("evenMults is fastai's even_mults; groupScales puts the head at 1 and the first group at 1/K", () => {
  // fastai: even_mults(1e-5, 1e-3, 3) → [1e-5, 1e-4, 1e-3]; (1e-6, 1e-2, 5) → one decade a step
  close(evenMults(1e-5, 1e-3, 3), [1e-5, 1e-4, 1e-3]);
  close(evenMults(1e-6, 1e-2, 5), [1e-6, 1e-5, 1e-4, 1e-3, 1e-2]);
  // 1e-4 → 1e-3 in 4 steps: ratio 10^(1/3) = 2.154434690031884
  close(evenMults(1e-4, 1e-3, 4), [1e-4, 2.154434690031884e-4, 4.641588833612779e-4, 1e-3]);
  assert.deepEqual(evenMults(3e-4, 1e-3, 1), [1e-3]);
  // the last is hi itself, not a rounded power of it
  assert.equal(evenMults(1 / 3, 1, 4)[3], 1);
  // three body blocks and the head, K = 100: 1/100, 1/100^(2/3), 1/100^(1/3), 1
  close(groupScales(3, 100), [0.01, 0.046415888336127774, 0.21544346900318834, 1]);
  close(groupScales(1, 100), [0.01, 1]);
  // K = 1: every factor exactly 1 (so the optimizer multiplies by nothing)
  assert.deepEqual(groupScales(17, 1), new Array(18).fill(1));
});

test('layerGroups: one group per named block from the cut; without blocks the body is one group', () => {
  const layers = ['dw1', 'bn2', 'relu2', 'conv2', 'bn3', 'pool'].map((name) =>
    tf.layers.activation({ activation: 'linear', name }),
  );
  const names = (blocks: readonly string[] | undefined, from = 0) =>
    layerGroups(layers.slice(from), blocks).map((g) => [g.from, ...g.layers.map((l) => l.name)]);
  assert.deepEqual(names(undefined), [['dw1', 'dw1', 'bn2', 'relu2', 'conv2', 'bn3', 'pool']]);
  assert.deepEqual(names(['conv1', 'dw1', 'conv2']), [
    ['dw1', 'dw1', 'bn2', 'relu2'],
    ['conv2', 'conv2', 'bn3', 'pool'],
  ]);
  // a cut inside a block: what lies before the next block start is a group of its own
  assert.deepEqual(names(['conv1', 'dw1', 'conv2'], 1), [
    ['bn2', 'bn2', 'relu2'],
    ['conv2', 'conv2', 'bn3', 'pool'],
  ]);
});

test('StageOptimizer scales: a scaled variable moves by exactly scale × the unscaled step (sgd, momentum, stacked)', () => {
  const before = tf.memory().numTensors;
  const g = [1, -2, 0.75, 3];
  for (const name of ['sgd', 'momentum']) {
    // Weights start at 0 and the scale is a power of two, so every float step is exact.
    const vars = tf.tidy(() => [0, 1, 2].map(() => tf.variable(tf.zeros([4]))));
    const opt = new StageOptimizer(name, vars, 0.3, { scales: [1, 0.25, 4] });
    for (let step = 0; step < 2; step++) {
      const grads = tf.tidy(() => Object.fromEntries(vars.map((v) => [v.name, tf.tensor1d(g)])));
      opt.applyGradients(grads);
      tf.dispose(Object.values(grads));
    }
    const [a, b, c] = vars.map((v) => Array.from(v.dataSync()));
    assert.ok(a!.every((x) => x !== 0));
    assert.deepEqual(
      b,
      a!.map((x) => x * 0.25),
      name,
    );
    assert.deepEqual(
      c,
      a!.map((x) => x * 4),
      name,
    );
    opt.dispose();
    tf.dispose(vars);
  }
  // Members trained side by side: each member's rate times the variable's scale.
  const stacked = tf.tidy(() => [tf.variable(tf.zeros([2, 4])), tf.variable(tf.zeros([2, 4]))]);
  const opt = new StageOptimizer('sgd', stacked, [0.5, 0.125], { scales: [1, 0.5] });
  const grads = tf.tidy(() =>
    Object.fromEntries(stacked.map((v) => [v.name, tf.tensor2d([g, g])])),
  );
  opt.applyGradients(grads);
  tf.dispose(Object.values(grads));
  const rows = stacked.map((v) => v.arraySync() as number[][]);
  assert.deepEqual(rows[0], [g.map((x) => -0.5 * x), g.map((x) => -0.125 * x)]);
  assert.deepEqual(rows[1], [g.map((x) => -0.25 * x), g.map((x) => -0.0625 * x)]);
  opt.dispose();
  tf.dispose(stacked);
  assert.equal(tf.memory().numTensors, before);
});

test('StageOptimizer refuses scales that do not match its variables', () => {
  const vars = tf.tidy(() => [tf.variable(tf.zeros([2]), true, 'lr_mult_a')]);
  assert.throws(() => new StageOptimizer('sgd', vars, 0.1, { scales: [1, 1] }), {
    message: 'StageOptimizer: 2 LR scales for 1 variables',
  });
  assert.throws(() => new StageOptimizer('sgd', vars, 0.1, { scales: [0] }), {
    message: 'StageOptimizer: LR scale 0 of variable lr_mult_a is not a positive number',
  });
  tf.dispose(vars);
});

test('--lr-mult: bounded 1 to 10000, and only with a fine-tune stage', () => {
  const bad = (lrMult: number) => () =>
    resolveTrainOptions({ data: 'x', finetuneEpochs: 2, lrMult });
  for (const k of [0.5, 10001, Number.NaN]) {
    assert.throws(bad(k), (err: unknown) => {
      assert.ok(err instanceof FinetuneError);
      assert.equal(err.message, `Expected a number from 1 to 10000 for lrMult but received ${k}`);
      return true;
    });
  }
  assert.equal(resolveTrainOptions({ data: 'x', finetuneEpochs: 2 }).lrMult, 1);
  assert.equal(resolveTrainOptions({ data: 'x', finetuneEpochs: 2, lrMult: 1e4 }).lrMult, 1e4);
  assert.throws(() => resolveTrainOptions({ data: 'x', lrMult: 10 }), {
    message: 'lrMult need a fine-tune stage (finetuneEpochs > 0)',
  });
});

async function weights(modelJson: string): Promise<Map<string, Float32Array>> {
  const m = await tf.loadLayersModel(fileLoadHandler(modelJson));
  const out = new Map(m.weights.map((w) => [w.originalName, w.read().dataSync() as Float32Array]));
  m.dispose();
  return out;
}

const distance = (a: Float32Array, b: Float32Array) =>
  Math.sqrt(a.reduce((s, x, i) => s + (x - b[i]!) ** 2, 0));

test('fine-tune with --lr-mult: K = 1 is the run without it bit for bit; K = 100 moves the body less', async () => {
  const before = tf.memory().numTensors;
  const run = async (name: string, lrMult?: number) => {
    const out = path.join(dir, name);
    const summary = await train({
      data,
      out,
      backbone: tiny,
      backend: 'wasm',
      epochs: 4,
      lr: 0.05,
      batchSize: 8,
      finetuneEpochs: 3,
      unfreeze: 'from:dw1',
      finetuneLr: 0.01,
      finetuneSwaStart: 1,
      cache: false,
      ...(lrMult !== undefined ? { lrMult } : {}),
    });
    const bin = await readFile(path.join(out, 'model', 'weights.bin'));
    return { summary, bin, weights: await weights(path.join(out, 'model', 'model.json')) };
  };
  const plain = await run('plain');
  const one = await run('k1', 1);
  const hundred = await run('k100', 100);
  assert.equal(tf.memory().numTensors, before);

  assert.ok(one.bin.equals(plain.bin), 'K = 1 exports the same bytes as no --lr-mult');
  assert.deepEqual(one.summary.stages, plain.summary.stages);
  assert.equal(plain.summary.stages['finetune']!.lrGroups, undefined);
  // The tiny backbone names no blocks: the unfrozen body is one group, at finetune-lr / K.
  const groups = hundred.summary.stages['finetune']!.lrGroups!;
  assert.deepEqual(
    groups.map((g) => g.from),
    ['dw1', 'head'],
  );
  close(
    groups.map((g) => g.lr),
    [1e-4, 0.01],
  );

  const original = await weights(tiny);
  for (const name of ['dw1/depthwise_kernel', 'conv2/kernel']) {
    const moved1 = distance(original.get(name)!, one.weights.get(name)!);
    const moved100 = distance(original.get(name)!, hundred.weights.get(name)!);
    assert.ok(moved100 > 0, `${name} still trains`);
    assert.ok(moved100 < moved1 / 10, `${name}: moved ${moved100} with K = 100, ${moved1} with 1`);
  }
});

test('named blocks: each block steps at its own rate, the head at the stage LR (one sgd step)', async () => {
  // One step (all 24 images in one batch, warm-up over that one step) from the same weights:
  // the gradients are the same for every K, so each variable's move is its group's factor
  // times its move with K = 1. K = 16 over two blocks gives factors 1/16, 1/4 and 1.
  const before = tf.memory().numTensors;
  const backend = await initBackend('wasm');
  const splits = await loadSplits(data, { valSplit: 0 });
  const files = splits.train.map((f) => f.path);
  const labels = Int32Array.from(splits.train, (f) => f.label);
  const settings: FineTuneSettings = {
    epochs: 1,
    unfreeze: 'from:dw1',
    lr: 0.05,
    batchSize: 24,
    optimizer: 'sgd',
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
  };
  const step = async (lrMult: number) => {
    const loaded = await loadBackbone(tiny);
    const backbone: Backbone = {
      ...loaded,
      spec: { ...loaded.spec, blocks: ['conv1', 'dw1', 'conv2'] },
    };
    const head = buildHead(backbone.featureSize, splits.classes.length, {
      hidden: 0,
      dropout: 0,
      seed: 1,
    });
    // All weights (the body is frozen as loaded; the stage unfreezes its top itself).
    const all = [...backbone.model!.weights, ...head.weights];
    const start = new Map(all.map((w) => [w.originalName, w.read().dataSync()]));
    const result = await runFineTune(
      {
        backbone,
        head,
        train: { files, labels },
        val: { files: [], labels: new Int32Array(0) },
        numClasses: splits.classes.length,
        headLoss: null,
        engine: resolveEngineContext({ engine: 'tfjs', backend, workers: 1 }),
        callbacks: [],
        warn: () => undefined,
        cache: null,
      },
      { ...settings, lrMult },
    );
    const moves = new Map<string, number[]>();
    for (const w of all) {
      const was = start.get(w.originalName)!;
      moves.set(
        w.originalName,
        Array.from(w.read().dataSync(), (x, i) => x - was[i]!),
      );
    }
    const groups = result.lrGroups;
    await result.dispose();
    head.dispose();
    loaded.dispose();
    return { moves, groups };
  };
  const base = await step(1);
  const k16 = await step(16);
  assert.equal(tf.memory().numTensors, before);

  assert.deepEqual(
    k16.groups.map((g) => g.from),
    ['dw1', 'conv2', 'head'],
  );
  close(
    k16.groups.map((g) => g.lr),
    [0.05 / 16, 0.05 / 4, 0.05],
  );
  const factor: Record<string, number> = {
    'dw1/depthwise_kernel': 1 / 16,
    'dw1/bias': 1 / 16,
    'bn2/gamma': 1 / 16,
    'bn2/beta': 1 / 16,
    'conv2/kernel': 1 / 4,
    'conv2/bias': 1 / 4,
  };
  for (const [name, moved] of base.moves) {
    const scaled = k16.moves.get(name)!;
    const size = (xs: number[]) => Math.sqrt(xs.reduce((s, x) => s + x * x, 0));
    if (/^(conv1|bn1)\/|moving/.test(name)) {
      assert.equal(size(moved) + size(scaled), 0, `${name} frozen`);
      continue;
    }
    const f = factor[name] ?? 1; // the head's weights
    assert.ok(size(moved) > 0, `${name} trained`);
    // exact up to the rounding of adding a step to a weight
    const ratio = size(scaled) / size(moved);
    assert.ok(
      Math.abs(ratio - f) <= 1e-3 * f,
      `${name}: moved ${ratio} × the K = 1 step, want ${f}`,
    );
    if (f === 1) assert.deepEqual(scaled, moved, `${name}: the head steps at the stage LR`);
  }
  assert.ok(Object.keys(factor).every((n) => base.moves.has(n)));
});
