import assert from 'node:assert/strict';
import { readdir, readFile } from 'node:fs/promises';
import path from 'node:path';
import { after, before, test } from 'node:test';
import * as tf from '@tensorflow/tfjs';
import { loadBackbone } from '../../src/backbones/load.js';
import { initBackend } from '../../src/backend/index.js';
import { applyAugment, augmentPlan, parseAugment } from '../../src/data/augment.js';
import { EmbeddingCache } from '../../src/data/cache.js';
import { loadSplits } from '../../src/data/scan.js';
import { resolveEngineContext } from '../../src/engine/index.js';
import { buildHead } from '../../src/head/build.js';
import { fileLoadHandler } from '../../src/io/files.js';
import {
  firstUnfrozenLayer,
  parseUnfreeze,
  runFineTune,
  viewReturns,
} from '../../src/train/finetune.js';
import { train } from '../../src/train/train.js';
import { colourWorkspace } from '../helpers.js';

let dir: string;
let cleanup: () => Promise<void>;
let tiny: string;
let data: string;

before(async () => {
  await initBackend('wasm');
  ({ dir, cleanup, backbone: tiny, data } = await colourWorkspace('finetune'));
});
after(async () => {
  await cleanup();
});

async function weights(modelJson: string): Promise<Map<string, Float32Array>> {
  const m = await tf.loadLayersModel(fileLoadHandler(modelJson));
  const out = new Map(m.weights.map((w) => [w.originalName, w.read().dataSync() as Float32Array]));
  m.dispose();
  return out;
}

const same = (a: Float32Array, b: Float32Array): boolean =>
  Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(
    Buffer.from(b.buffer, b.byteOffset, b.byteLength),
  );

test('--unfreeze values; a backbone without named blocks says what to use instead', async () => {
  assert.deepEqual(parseUnfreeze('all'), { kind: 'all' });
  assert.deepEqual(parseUnfreeze('from:block_16_expand'), {
    kind: 'from',
    layer: 'block_16_expand',
  });
  assert.deepEqual(parseUnfreeze('blocks:2'), { kind: 'blocks', count: 2 });
  assert.throws(() => parseUnfreeze('blocks:0'), {
    message:
      "Expected all, from:LAYER_NAME or blocks:K (K ≥ 1) for unfreeze but received 'blocks:0'",
  });
  const tinyBb = await loadBackbone(tiny);
  assert.throws(() => firstUnfrozenLayer(tinyBb, { kind: 'blocks', count: 1 }), {
    message: `Backbone ${tiny} names no blocks: use --unfreeze from:LAYER_NAME or --unfreeze all`,
  });
  tinyBb.dispose();
});

test('fine-tune stage: only unfrozen weights change, BN statistics stay, snapshots counted, no tensor leak', async () => {
  const before = tf.memory().numTensors;
  const out = path.join(dir, 'ft');
  const summary = await train({
    data,
    out,
    backbone: tiny,
    backend: 'wasm',
    epochs: 10,
    lr: 0.05,
    batchSize: 8,
    finetuneEpochs: 4,
    unfreeze: 'from:dw1',
    finetuneLr: 0.01,
    finetuneSwaStart: 1,
    finetuneSwaFreq: 2,
    cache: false,
  });
  assert.equal(tf.memory().numTensors, before);
  const ft = summary.stages['finetune']!;
  assert.equal(ft.snapshots, 2); // after epochs 2 and 4 of 4 (0-based 1 and 3)
  assert.equal(ft.unfreezeFrom, 'dw1');
  assert.ok(ft.raw && ft.swa && summary.stages['head']!.swa);
  assert.equal(summary.exported, 'finetune-swa');
  const lines = (await readFile(path.join(out, 'metrics.jsonl'), 'utf8'))
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l));
  assert.deepEqual(
    lines.map((l) => l.stage),
    [...new Array(10).fill('head'), ...new Array(4).fill('finetune')],
  );

  const original = await weights(tiny);
  const exported = await weights(path.join(out, 'model', 'model.json'));
  const frozen = [
    'conv1/kernel',
    'conv1/bias',
    'bn1/gamma',
    'bn1/beta',
    'bn1/moving_mean',
    'bn1/moving_variance',
  ];
  const statistics = ['bn2/moving_mean', 'bn2/moving_variance'];
  const trained = [
    'dw1/depthwise_kernel',
    'dw1/bias',
    'bn2/gamma',
    'bn2/beta',
    'conv2/kernel',
    'conv2/bias',
  ];
  assert.deepEqual([...original.keys()].sort(), [...frozen, ...statistics, ...trained].sort());
  for (const name of [...frozen, ...statistics])
    assert.ok(same(original.get(name)!, exported.get(name)!), `${name} unchanged`);
  for (const name of trained)
    assert.ok(!same(original.get(name)!, exported.get(name)!), `${name} trained`);
});

test('--freeze-bn keeps gamma/beta; --keep best exports the best on validation', async () => {
  const out = path.join(dir, 'ft-best');
  const summary = await train({
    data,
    out,
    backbone: tiny,
    backend: 'wasm',
    epochs: 6,
    lr: 0.05,
    batchSize: 8,
    finetuneEpochs: 2,
    unfreeze: 'from:dw1',
    freezeBn: true,
    keep: 'best',
    augment: 'flip,brightness',
    cacheDir: path.join(dir, 'cache'),
  });
  const original = await weights(tiny);
  const exported = await weights(path.join(out, 'model', 'model.json'));
  for (const name of ['bn2/gamma', 'bn2/beta'])
    assert.ok(same(original.get(name)!, exported.get(name)!), `${name} frozen`);
  const accs: Record<string, number> = {
    'head-swa': summary.stages['head']!.swa!.acc,
    'finetune-raw': summary.stages['finetune']!.raw!.acc,
    'finetune-swa': summary.stages['finetune']!.swa!.acc,
  };
  assert.equal(accs[summary.exported], Math.max(...Object.values(accs)));
  assert.equal(summary.val!.acc, Math.max(...Object.values(accs)));
});

test('--head-bn and --bn train: trained statistics, refreshed after averaging; the prefix BN untouched; --keep best ranks SWAG too', async () => {
  const before = tf.memory().numTensors;
  const out = path.join(dir, 'ft-bn');
  const summary = await train({
    data,
    out,
    backbone: tiny,
    backend: 'wasm',
    epochs: 6,
    lr: 0.05,
    batchSize: 8,
    hidden: 4,
    headBn: true,
    swag: 2,
    swaStart: 2,
    finetuneEpochs: 3,
    unfreeze: 'from:dw1',
    bn: 'train',
    finetuneSwaStart: 1,
    keep: 'best',
    cache: false,
  });
  assert.equal(tf.memory().numTensors, before);
  const head = summary.stages['head']!;
  const ft = summary.stages['finetune']!;
  assert.deepEqual(head.bnRefreshed, ['head_bn_0', 'head_bn_1']);
  assert.deepEqual(ft.bnRefreshed, ['bn2', 'head_bn_0', 'head_bn_1']);
  assert.deepEqual(
    head.candidates!.map((c) => [c.weights, c.samples]),
    [
      ['raw', undefined],
      ['swa', undefined],
      ['swag', 20],
    ],
  );
  assert.deepEqual(
    ft.candidates!.map((c) => c.weights),
    ['head', 'finetune-raw', 'finetune-swa', 'finetune-swag'],
  );
  for (const stage of [head, ft]) {
    const best = stage.candidates!.reduce((a, b) => (b.loss <= a.loss ? b : a));
    assert.equal(stage.chosen, best.weights);
  }
  assert.equal(head.candidates![0]!.loss, head.raw!.loss);
  assert.equal(head.candidates![1]!.loss, head.swa!.loss);
  // SWAG's winner exports the SWA mean (its samples' centre)
  const chosen = ft.chosen!;
  assert.equal(
    summary.exported,
    chosen === 'head'
      ? `head-${head.chosen === 'swag' ? 'swa' : head.chosen}`
      : chosen.replace('swag', 'swa'),
  );
  assert.ok(summary.onnx, 'the classifier with its BN head lowers to ONNX');
  const original = await weights(tiny);
  const exported = await weights(path.join(out, 'model', 'model.json'));
  for (const name of ['bn1/moving_mean', 'bn1/moving_variance', 'bn1/gamma', 'bn1/beta'])
    assert.ok(same(original.get(name)!, exported.get(name)!), `${name} untouched`);
  if (chosen !== 'head') {
    for (const name of ['bn2/moving_mean', 'bn2/moving_variance'])
      assert.ok(!same(original.get(name)!, exported.get(name)!), `${name} trained`);
  }
  for (const name of ['head_bn_0/moving_mean', 'head_bn_1/moving_variance', 'head_bn_1/gamma'])
    assert.ok(exported.has(name), name);
});

test('--bn train with --freeze-bn: the statistics train, gamma and beta do not', async () => {
  const out = path.join(dir, 'ft-bn-frozen-affine');
  await train({
    data,
    out,
    backbone: tiny,
    backend: 'wasm',
    epochs: 2,
    batchSize: 8,
    finetuneEpochs: 2,
    unfreeze: 'from:dw1',
    bn: 'train',
    freezeBn: true,
    cache: false,
  });
  const original = await weights(tiny);
  const exported = await weights(path.join(out, 'model', 'model.json'));
  for (const name of ['bn2/gamma', 'bn2/beta', 'bn1/moving_mean', 'bn1/moving_variance'])
    assert.ok(same(original.get(name)!, exported.get(name)!), `${name} unchanged`);
  for (const name of ['bn2/moving_mean', 'bn2/moving_variance'])
    assert.ok(!same(original.get(name)!, exported.get(name)!), `${name} trained`);
});

test('a graph-model backbone with a fine-tune stage fails at once, saying why', async () => {
  await assert.rejects(
    train({ data, backbone: 'mobilenet_v2', finetuneEpochs: 1 }),
    (err: Error) => {
      assert.match(
        err.message,
        /^Backbone mobilenet_v2 is a graph model: it carries no trainable variables/,
      );
      assert.match(err.message, /nsfwjs_mobilenet_v2/);
      return true;
    },
  );
  await assert.rejects(train({ data, unfreeze: 'all' }), {
    message: 'unfreeze need a fine-tune stage (finetuneEpochs > 0)',
  });
});

test('augmentation plans repeat per (seed, view, image) and transform as drawn', () => {
  assert.deepEqual(parseAugment('crop,flip'), ['flip', 'crop']);
  assert.throws(() => parseAugment('flip,blur'), {
    message: "Expected a list of flip, crop, rotate, brightness for augment but received 'blur'",
  });
  const key = 'ab12cd34'.padEnd(64, '0');
  assert.deepEqual(
    augmentPlan(['flip', 'crop', 'rotate'], 1, 2, key),
    augmentPlan(['flip', 'crop', 'rotate'], 1, 2, key),
  );
  assert.notDeepEqual(
    augmentPlan(['crop', 'rotate'], 1, 2, key),
    augmentPlan(['crop', 'rotate'], 1, 3, key),
  );
  const size = 4;
  const pixels = Uint8Array.from({ length: size * size * 3 }, (_, i) => i);
  const flipped = applyAugment(pixels, size, { flip: true, crop: null, angle: 0, brightness: 1 });
  for (let y = 0; y < size; y++) {
    for (let x = 0; x < size; x++) {
      for (let c = 0; c < 3; c++)
        assert.equal(flipped[(y * size + x) * 3 + c], pixels[(y * size + (size - 1 - x)) * 3 + c]);
    }
  }
  const identity = applyAugment(pixels, size, { flip: false, crop: null, angle: 0, brightness: 1 });
  assert.deepEqual(identity, pixels);
  const darker = applyAugment(pixels, size, { flip: false, crop: null, angle: 0, brightness: 0.5 });
  assert.deepEqual(Array.from(darker.slice(0, 6)), [0, 1, 1, 2, 2, 3]);
});

test('the fine-tune stage warms its LR up linearly over its first epoch', async () => {
  // Adam's first step moves every weight with a nonzero gradient by the LR itself
  // (m̂/√v̂ = g/|g|), so the first step's largest move is the LR of that step: finetuneLr
  // divided by the steps of an epoch (24 images in batches of 8: 3). No later Adam step
  // moves a weight by more than about its LR (≤ 1.01× over the first steps).
  const before = tf.memory().numTensors;
  const backend = await initBackend('wasm');
  const backbone = await loadBackbone(tiny);
  const splits = await loadSplits(data, { valSplit: 0 });
  const head = buildHead(backbone.featureSize, splits.classes.length, {
    hidden: 0,
    dropout: 0,
    seed: 1,
  });
  const bias = (): Float32Array =>
    (head.getLayer('head_logits').getWeights()[1]!.dataSync() as Float32Array).slice();
  const lr = 0.01;
  let epoch = -1;
  let start: Float32Array = new Float32Array(0);
  const moves: number[][] = [];
  const epochLrs: number[] = [];
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
          onEpochBegin(e) {
            epoch = e;
            moves.push([]);
          },
          onBatchBegin() {
            start = bias();
          },
          onBatchEnd() {
            const end = bias();
            moves[epoch]!.push(Math.max(...end.map((v, i) => Math.abs(v - start[i]!))));
          },
          onEpochEnd(_e, logs) {
            epochLrs.push(logs.lr);
          },
        },
      ],
      warn: () => undefined,
      cache: null,
    },
    {
      epochs: 2,
      unfreeze: 'from:dw1',
      lr,
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
    },
  );
  await result.dispose();
  head.dispose();
  backbone.dispose();
  assert.equal(tf.memory().numTensors, before);
  assert.equal(splits.train.length, 24);
  assert.deepEqual(
    moves.map((m) => m.length),
    [3, 3],
  );
  const [first, second, third] = moves[0]!;
  assert.ok(
    Math.abs(first! - lr / 3) <= 1e-3 * lr,
    `first step moved ${first}, expected ${lr / 3}`,
  );
  assert.ok(second! <= 1.01 * ((2 * lr) / 3), `second step moved ${second}`);
  assert.ok(third! <= 1.01 * lr, `third step moved ${third}`);
  assert.deepEqual(epochLrs, [lr, lr]);
});

test('augmentViews: K views cycle over E > K epochs; by default every epoch has its own view', async () => {
  const views = async (name: string, finetuneEpochs: number, augmentViews?: number) => {
    const cacheDir = path.join(dir, `${name}-cache`);
    const summary = await train({
      data,
      out: path.join(dir, name),
      backbone: tiny,
      backend: 'wasm',
      epochs: 2,
      batchSize: 8,
      swa: false,
      finetuneEpochs,
      unfreeze: 'from:dw1',
      augment: 'flip',
      ...(augmentViews !== undefined ? { augmentViews } : {}),
      cacheDir,
    });
    const trainImages = Object.values(summary.counts.train).reduce((a, b) => a + b, 0);
    const info = await new EmbeddingCache(cacheDir).info();
    const augmented = info.namespaces.filter((n) => n.layer !== 'features' && n.view !== 'plain');
    for (const n of augmented) assert.equal(n.entries, trainImages, n.view);
    // The decoded images the views were cut from (kept in the cache folder) are gone.
    assert.deepEqual(
      (await readdir(cacheDir)).filter((e) => e.startsWith('pixels-')),
      [],
    );
    return augmented.map((n) => Number(/view(\d+)$/.exec(n.view)?.[1])).sort((a, b) => a - b);
  };
  // 5 epochs over 2 views: epochs 1–5 use views 0, 1, 0, 1, 0; only two are ever computed
  assert.deepEqual(await views('views-2-of-5', 5, 2), [0, 1]);
  assert.deepEqual(await views('views-default', 3), [0, 1, 2]);
});

test('viewReturns: a view stays in memory only while a later epoch uses it again', () => {
  // 5 epochs over 2 views (0, 1, 0, 1, 0): view 0 serves epochs 0, 2 and 4, view 1 epochs 1 and 3
  assert.deepEqual(
    [0, 1, 2, 3, 4].map((e) => viewReturns(e, 2, 5)),
    [true, true, true, false, false],
  );
  // the default, a view per epoch: none is kept past its epoch
  assert.deepEqual(
    [0, 1, 2].map((e) => viewReturns(e, 3, 3)),
    [false, false, false],
  );
});
