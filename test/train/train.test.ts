import assert from 'node:assert/strict';
import { access, cp, readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { after, before, test } from 'node:test';
import * as tf from '@tensorflow/tfjs';
import sharp from 'sharp';
import { initBackend } from '../../src/backend/index.js';
import { predict } from '../../src/export/predict.js';
import { fileLoadHandler } from '../../src/io/files.js';
import { resolveTrainOptions } from '../../src/train/options.js';
import { train } from '../../src/train/train.js';
import { tempDir, writeColourDataset, writeImage, writeTinyBackbone } from '../helpers.js';

let dir: string;
let cleanup: () => Promise<void>;
let backbone: string;
let data: string;

before(async () => {
  await initBackend('wasm');
  ({ dir, cleanup } = await tempDir('train'));
  backbone = await writeTinyBackbone(dir);
  data = path.join(dir, 'data');
  await writeColourDataset(data, 10, {
    red: [220, 30, 30],
    green: [30, 200, 40],
    blue: [20, 40, 230],
  });
  // every kind of unusable file, inside class folders
  const good = await readFile(path.join(data, 'red', '0.png'));
  await writeFile(
    path.join(data, 'red', 'corrupt.png'),
    Buffer.concat([good.subarray(0, 40), Buffer.alloc(200, 7)]),
  );
  const jpeg = await sharp({
    create: {
      width: 64,
      height: 64,
      channels: 3,
      background: '#808080',
      noise: { type: 'gaussian', mean: 128, sigma: 40 },
    },
  })
    .jpeg()
    .toBuffer();
  await writeFile(
    path.join(data, 'green', 'truncated.jpg'),
    jpeg.subarray(0, Math.floor(jpeg.length / 2)),
  );
  await writeFile(path.join(data, 'green', 'empty.jpg'), Buffer.alloc(0));
  await writeFile(path.join(data, 'blue', 'notes.txt'), 'not an image');
  await writeFile(
    path.join(data, 'blue', 'huge.png'),
    await sharp({ create: { width: 300, height: 300, channels: 3, background: '#123456' } })
      .png()
      .toBuffer(),
  );
});
after(async () => {
  await cleanup();
});

async function weightsOf(modelJson: string): Promise<Map<string, Float32Array>> {
  const m = await tf.loadLayersModel(fileLoadHandler(modelJson));
  const out = new Map<string, Float32Array>();
  for (const w of m.weights) out.set(w.originalName, w.read().dataSync() as Float32Array);
  m.dispose();
  return out;
}

for (const engine of ['onnx', 'tfjs'] as const) {
  test(`train (${engine}): skips and lists bad files, keeps the backbone bit-identical, frees every tensor`, async () => {
    const before = tf.memory().numTensors;
    const out = path.join(dir, `run-${engine}`);
    const events: string[] = [];
    const summary = await train({
      data,
      out,
      backbone,
      // both named: what `auto` picks depends on what is installed (tfjs-node, a GPU)
      backend: 'wasm',
      engine,
      epochs: 20,
      batchSize: 8,
      lr: 0.05,
      valSplit: 0.2,
      maxPixels: 50_000,
      cache: false,
      onEvent: (e) => events.push(e.type),
    });
    assert.equal(tf.memory().numTensors, before);
    assert.equal(summary.engine, engine);
    assert.equal(summary.backend, 'wasm');
    const skipped = Object.fromEntries(
      summary.skipped.map((s) => [path.relative(data, s.path), s.reason]),
    );
    assert.deepEqual(Object.keys(skipped).sort(), [
      'blue/huge.png',
      'blue/notes.txt',
      'green/empty.jpg',
      'green/truncated.jpg',
      'red/corrupt.png',
    ]);
    assert.match(skipped['green/empty.jpg']!, /^empty file/);
    assert.match(skipped['blue/notes.txt']!, /^not an image/);
    assert.match(skipped['blue/huge.png']!, /^too many pixels/);
    assert.match(skipped['green/truncated.jpg']!, /truncated|corrupt/);
    assert.match(skipped['red/corrupt.png']!, /corrupt|truncated/);
    assert.ok(summary.val && summary.val.acc >= 0.8, `val acc ${summary.val?.acc}`);
    assert.equal(summary.stages['head']!.snapshots, 5);
    assert.ok(events.includes('skipped') && events.includes('epoch'));

    const onDisk = JSON.parse(await readFile(path.join(out, 'summary.json'), 'utf8'));
    assert.equal(onDisk.skipped.length, 5);
    const labels = JSON.parse(await readFile(path.join(out, 'labels.json'), 'utf8'));
    assert.deepEqual(labels, ['blue', 'green', 'red']);
    const config = JSON.parse(await readFile(path.join(out, 'config.json'), 'utf8'));
    assert.equal(config.epochs, 20);
    assert.equal(config.backendInfo.option, 'wasm');
    const metrics = (await readFile(path.join(out, 'metrics.jsonl'), 'utf8'))
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l));
    assert.equal(metrics.length, 20);
    assert.deepEqual(Object.keys(metrics[19]).sort(), [
      'acc',
      'epoch',
      'loss',
      'lr',
      'seconds',
      'snapshots',
      'stage',
      'val_acc',
      'val_avg_acc',
      'val_avg_loss',
      'val_loss',
    ]);

    // frozen: every backbone weight in the export equals the original file, bit for bit
    const original = await weightsOf(backbone);
    const exported = await weightsOf(path.join(out, 'model', 'model.json'));
    assert.ok(original.size >= 8);
    for (const [name, values] of original) {
      const got = exported.get(name);
      assert.ok(got, `exported model lacks ${name}`);
      assert.deepEqual(
        Buffer.from(got.buffer, got.byteOffset, got.byteLength),
        Buffer.from(values.buffer, values.byteOffset, values.byteLength),
        name,
      );
    }
  });
}

test('same data, seed and backend give identical summary metrics; the cache serves the rerun and re-embeds a changed file only', async () => {
  // its own copy of the data set: this test changes a file
  const own = path.join(dir, 'repeat-data');
  await cp(data, own, { recursive: true });
  const cacheDir = path.join(dir, 'repeat-cache');
  const run = (name: string) =>
    train({
      data: own,
      out: path.join(dir, name),
      backbone,
      // on wasm `auto` lowers to ONNX (it passes onnx over only for a GPU backend)
      backend: 'wasm',
      epochs: 6,
      batchSize: 8,
      maxPixels: 50_000,
      cacheDir,
    });
  const a = await run('repeat-a');
  const b = await run('repeat-b');
  assert.deepEqual(a.stages, b.stages);
  assert.deepEqual(a.val, b.val);
  // the second run answered every usable image from the cache and loaded no engine
  const usable = 30;
  assert.equal(a.cachedEmbeddings, 0);
  assert.equal(a.engine, 'onnx');
  assert.equal(b.cachedEmbeddings, usable);
  assert.equal(b.engine, 'cache');
  assert.equal(b.skipped.length, 5, 'bad files are still listed on a warm run');
  // a changed file is embedded again, alone
  await writeImage(path.join(own, 'red', '3.png'), [250, 10, 10], { variant: 7 });
  const c = await run('repeat-c');
  assert.equal(c.cachedEmbeddings, usable - 1);
  assert.equal(c.engine, 'onnx');
});

test('an invalid engine fails before any work, even when every embedding is cached', async () => {
  const own = path.join(dir, 'bogus-data');
  await writeColourDataset(own, 3, { red: [220, 30, 30], blue: [20, 40, 230] });
  const cacheDir = path.join(dir, 'bogus-cache');
  const options = { data: own, backbone, backend: 'wasm' as const, epochs: 2, cacheDir };
  await train({ ...options, out: path.join(dir, 'bogus-warm') });
  const out = path.join(dir, 'bogus-run');
  await assert.rejects(train({ ...options, out, engine: 'bogus' as never }), {
    message: "Expected one of auto, onnx, tfjs for engine but received 'bogus'",
  });
  await assert.rejects(access(out), { code: 'ENOENT' }, 'the run folder was not even made');
});

test("classWeights 'balanced' weighs each row's loss by n / (k · n_c), and moves the optimum to equal odds", async () => {
  // Every image the same: every row has the same features, so the first epoch's loss (one
  // batch, the initial weights) is a mix of two per-class losses l_few and l_many, and the
  // trained head can only learn a prior: n_c / n without weights, 1/k with balanced ones.
  const own = path.join(dir, 'imbalanced');
  for (const [name, count] of [
    ['few', 4],
    ['many', 12],
  ] as const) {
    for (let i = 0; i < count; i++)
      await writeImage(path.join(own, name, `${i}.png`), [200, 120, 40]);
  }
  const run = async (classWeights: 'balanced' | 'none') => {
    const out = path.join(dir, `weights-${classWeights}`);
    await train({
      data: own,
      out,
      backbone,
      backend: 'wasm',
      classWeights,
      valSplit: 0,
      epochs: 200,
      batchSize: 16,
      lr: 0.02,
      labelSmoothing: 0,
      dropout: 0,
      swa: false,
      cache: false,
    });
    const first = JSON.parse(
      (await readFile(path.join(out, 'metrics.jsonl'), 'utf8')).split('\n')[0]!,
    );
    const predicted = await predict({
      model: out,
      inputs: [path.join(own, 'few', '0.png')],
      backend: 'wasm',
    });
    const odds = Object.fromEntries(
      predicted.predictions[0]!.top.map((t) => [t.label, t.probability]),
    );
    return { loss: first.loss as number, few: odds['few']! };
  };
  const none = await run('none');
  const balanced = await run('balanced');
  // none: (4·l_few + 12·l_many)/16; balanced, weights 16/(2·4) = 2 and 16/(2·12) = 2/3: (l_few + l_many)/2
  const sum = 2 * balanced.loss;
  const lMany = 2 * none.loss - sum / 2;
  const lFew = sum - lMany;
  assert.ok(
    Math.abs(lFew - lMany) > 0.05,
    `initial odds too close to even to tell (${lFew}, ${lMany})`,
  );
  // the two losses are -log p and -log(1 − p) of one softmax
  const total = Math.exp(-lFew) + Math.exp(-lMany);
  assert.ok(Math.abs(total - 1) < 1e-4, `p_few + p_many = ${total}`);
  assert.ok(Math.abs(none.few - 0.25) < 0.03, `p(few) without weights ${none.few}`);
  assert.ok(Math.abs(balanced.few - 0.5) < 0.03, `p(few) with balanced weights ${balanced.few}`);
});

test('swaAnnealEpochs reaches the head stage: metrics.jsonl shows the cosine from lr to swaLr', async () => {
  const out = path.join(dir, 'anneal');
  await train({
    data,
    out,
    backbone,
    backend: 'wasm',
    epochs: 6,
    batchSize: 8,
    maxPixels: 50_000,
    lr: 0.02,
    swaStart: 0.5,
    swaLr: 0.01,
    swaAnnealEpochs: 2,
    cache: false,
  });
  const lrs = (await readFile(path.join(out, 'metrics.jsonl'), 'utf8'))
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l).lr as number);
  // SWA from epoch index 3; alpha = (1 − cos(π·t))/2 for t = 1/2, 1 → 0.5, 1
  const expected = [0.02, 0.02, 0.02, 0.015, 0.01, 0.01];
  assert.equal(lrs.length, expected.length);
  lrs.forEach((lr, i) => {
    assert.ok(
      Math.abs(lr - expected[i]!) < 1e-12,
      `epoch ${i + 1}: lr ${lr}, expected ${expected[i]}`,
    );
  });
});

test('options are checked before any work, in one wording', () => {
  assert.throws(() => resolveTrainOptions({ data: 'x', epochs: -1 }), {
    message: 'Expected an integer from 1 to 100000 for epochs but received -1',
  });
  assert.throws(() => resolveTrainOptions({ data: 'x', optimizer: 'rmsprop' as never }), {
    message: "Expected one of adam, sgd, momentum for optimizer but received 'rmsprop'",
  });
  assert.throws(() => resolveTrainOptions({ data: 'x', epochs: 10, swaStart: 10 }), {
    message:
      'Expected an epoch from 1 to 9 or a fraction of the epochs below 1 for swaStart but received 10',
  });
  assert.throws(() => resolveTrainOptions({ data: 'x', swa: false, swaLr: 0.1 }), {
    message: 'swaLr cannot be used with average none (or swa turned off)',
  });
  assert.equal(resolveTrainOptions({ data: 'x', lr: 0.01 }).swaLr, 0.005);
});
