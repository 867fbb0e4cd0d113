import assert from 'node:assert/strict';
import { readdir, readFile } from 'node:fs/promises';
import path from 'node:path';
import { after, before, test } from 'node:test';
import * as tf from '@tensorflow/tfjs';
import { initBackend } from '../../src/backend/index.js';
import { FinetuneError } from '../../src/errors.js';
import type { SweepConfig } from '../../src/experiments/config.js';
import { HeadWorker, shareSplits } from '../../src/experiments/head-worker.js';
import { type SweepEvent, sweep } from '../../src/experiments/sweep.js';
import { fileSaveHandler } from '../../src/io/files.js';
import { resolveTrainOptions } from '../../src/train/options.js';
import type { HeadJob } from '../../src/train/phases.js';
import type { EmbeddedSplits } from '../../src/train/run.js';
import { train } from '../../src/train/train.js';
import { RGB_CLASSES, tempDir, writeColourDataset, writeTinyBackbone } from '../helpers.js';

let dir: string;
let cleanup: () => Promise<void>;
let backbone: string;
let data: string;

before(async () => {
  await initBackend('wasm');
  ({ dir, cleanup } = await tempDir('head-worker'));
  backbone = await writeTinyBackbone(dir);
  data = path.join(dir, 'data');
  await writeColourDataset(path.join(data, 'train'), 8, RGB_CLASSES);
  await writeColourDataset(path.join(data, 'test'), 3, RGB_CLASSES);
});
after(async () => {
  await cleanup();
});

/** The weight files of each run's exported model, by run id and file name (model.json holds a fresh run id). */
async function exportedWeights(out: string, ids: readonly string[]): Promise<Map<string, Buffer>> {
  const files = new Map<string, Buffer>();
  for (const id of ids) {
    const model = path.join(out, 'runs', id, 'model');
    for (const name of (await readdir(model)).filter((n) => n.endsWith('.bin')))
      files.set(`${id}/${name}`, await readFile(path.join(model, name)));
  }
  return files;
}

test('heads with BatchNorm (--head-bn) split across two threads come back as the unsplit ones', async () => {
  const config = (name: string): SweepConfig => ({
    out: path.join(dir, name),
    base: {
      data,
      backbone,
      epochs: 3,
      hidden: 4,
      headBn: true,
      cacheDir: path.join(dir, 'cache-bn'),
    },
    grid: { lr: [0.01, 0.05] },
  });
  const before = tf.memory().numTensors;
  const one = await sweep(config('bn-unsplit'), { headThreads: 1, export: 'all' });
  const two = await sweep(config('bn-split'), { headThreads: 2, export: 'all' });
  assert.equal(tf.memory().numTensors, before);
  assert.ok(two.rows.every((r) => r.status === 'done'));
  const ids = one.rows.map((r) => r.id);
  const a = await exportedWeights(one.out, ids);
  const b = await exportedWeights(two.out, ids);
  assert.equal(b.size, a.size);
  for (const [name, bytes] of a) assert.ok(b.get(name)?.equals(bytes), name);
});

test('heads split across two threads end exactly as unsplit: same figures, same weights, same order', async () => {
  const base = { data, backbone, epochs: 4, cacheDir: path.join(dir, 'cache-split') };
  const config = (name: string): SweepConfig => ({
    out: path.join(dir, name),
    base,
    // Eight heads of one shape (4 per thread), what may differ per member varied.
    grid: { lr: [0.01, 0.05], dropout: [0, 0.3] },
    variants: [{}, { labelSmoothing: 0.2, swaStart: 2, classWeights: 'balanced' }],
  });
  const run = async (name: string, headThreads: number) => {
    const events: SweepEvent[] = [];
    const ended: string[] = [];
    const before = tf.memory().numTensors;
    const result = await sweep(config(name), {
      headThreads,
      export: 'all',
      onEvent: (e) => events.push(e),
      onRunEnd: (row) => ended.push(row.id),
    });
    assert.equal(tf.memory().numTensors, before);
    return { result, events, ended };
  };
  const one = await run('unsplit', 1);
  const two = await run('split', 2);
  const threads = (events: SweepEvent[]) =>
    events.flatMap((e) => (e.type === 'embedding' ? [e.headThreads] : []));
  assert.deepEqual(threads(one.events), [1]);
  assert.deepEqual(threads(two.events), [2]);
  assert.equal(two.result.rows.length, 8);
  assert.ok(two.result.rows.every((r) => r.status === 'done'));
  // Rows end in the same order, with the same figures.
  assert.deepEqual(two.ended, one.ended);
  const figures = (rows: typeof one.result.rows) =>
    rows.map((r) => ({ id: r.id, val: r.val, test: r.test }));
  assert.deepEqual(figures(two.result.rows), figures(one.result.rows));
  // Every epoch's logs, from the worker's part too.
  for (const row of two.result.rows) {
    const strip = (text: string) =>
      text
        .trim()
        .split('\n')
        .map((l) => {
          const { seconds: _, ...rest } = JSON.parse(l) as Record<string, unknown>;
          return rest;
        });
    const metrics = (out: string) => readFile(path.join(out, row.runDir, 'metrics.jsonl'), 'utf8');
    assert.deepEqual(strip(await metrics(two.result.out)), strip(await metrics(one.result.out)));
  }
  // The exported models, byte for byte.
  const ids = one.result.rows.map((r) => r.id);
  const a = await exportedWeights(one.result.out, ids);
  const b = await exportedWeights(two.result.out, ids);
  assert.ok(a.size >= ids.length);
  assert.equal(b.size, a.size);
  for (const [name, bytes] of a) assert.ok(b.get(name)?.equals(bytes), name);
  // Events of the worker's runs arrive too: an epoch event per run and epoch.
  const epochs = two.events.filter((e) => e.type === 'train' && e.event.type === 'epoch');
  assert.equal(epochs.length, 8 * 4);
});

test('heads that start from an earlier run (init) train alike split and unsplit', async () => {
  const earlier = path.join(dir, 'earlier');
  await train({ data, backbone, epochs: 2, out: earlier, cacheDir: path.join(dir, 'cache-init') });
  const config = (name: string): SweepConfig => ({
    out: path.join(dir, name),
    base: { data, backbone, epochs: 3, init: earlier, cacheDir: path.join(dir, 'cache-init') },
    grid: { lr: [0.01, 0.05], dropout: [0, 0.3] },
  });
  const one = await sweep(config('init-1'), { headThreads: 1, export: 'none' });
  const two = await sweep(config('init-2'), { headThreads: 2, export: 'none' });
  assert.ok(two.rows.every((r) => r.status === 'done'));
  assert.deepEqual(
    two.rows.map((r) => [r.id, r.val, r.test]),
    one.rows.map((r) => [r.id, r.val, r.test]),
  );
  // The summary records where each head started, from the worker's part too.
  const init = async (r: typeof one) =>
    JSON.parse(await readFile(path.join(r.out, r.rows[3]!.runDir, 'summary.json'), 'utf8')).stages
      .head.init;
  const record = await init(two);
  assert.equal(record.run, path.resolve(earlier));
  assert.deepEqual(record, await init(one));
});

/** A backbone whose features are about 1e19: sgd at lr 9 diverges on them, at 1e-30 it does not. */
async function writeLoudBackbone(): Promise<string> {
  const input = tf.input({ shape: [32, 32, 3], name: 'image' });
  const x = tf.layers
    .conv2d({
      filters: 8,
      kernelSize: 1,
      name: 'loud',
      kernelInitializer: tf.initializers.constant({ value: 1e19 }),
    })
    .apply(input) as tf.SymbolicTensor;
  const model = tf.model({ inputs: input, outputs: x });
  const folder = path.join(dir, 'loud');
  await model.save(fileSaveHandler(folder));
  model.dispose();
  return path.join(folder, 'model.json');
}

test("heads that diverge in the worker's part fail alone, each with its own error", async () => {
  const loud = await writeLoudBackbone();
  const before = tf.memory().numTensors;
  const result = await sweep(
    {
      out: path.join(dir, 'diverge'),
      base: { data, backbone: loud, optimizer: 'sgd', epochs: 3, cache: false },
      // The first two runs train in this thread, the last two in the worker: both diverge there.
      grid: { lr: [1e-30, 2e-30, 8, 9] },
    },
    { headThreads: 2, export: 'none' },
  );
  assert.equal(tf.memory().numTensors, before);
  assert.deepEqual(
    result.rows.map((r) => r.status),
    ['done', 'done', 'failed', 'failed'],
  );
  for (const row of result.rows.slice(2))
    assert.match(
      row.error!,
      /^training diverged: the head stage's loss became (NaN|Infinity) at epoch \d+, batch \d+; nothing was exported/,
    );
});

test('a worker without its backend fails with a plain error (the caller trains its part itself)', async () => {
  const worker = new HeadWorker('node-gpu');
  try {
    const jobs = [{ seed: 1 }].map(({ seed }) => ({
      run: { splits: { classes: ['a', 'b'] }, init: null, emit: () => undefined },
      options: resolveTrainOptions({ data, seed, epochs: 1 }),
    })) as unknown as HeadJob[];
    const splits = shareSplits({
      featureSize: 2,
      train: {
        files: [],
        features: new Float32Array([1, 0, 0, 1]),
        labels: new Int32Array([0, 1]),
      },
      val: { files: [], features: new Float32Array(0), labels: new Int32Array(0) },
    } as unknown as EmbeddedSplits);
    await assert.rejects(worker.train(splits, jobs), (err: unknown) => {
      assert.ok(!(err instanceof FinetuneError));
      assert.match(
        (err as Error).message,
        /^head worker: no backend \(Backend node-gpu could not be loaded/,
      );
      return true;
    });
  } finally {
    await worker.close();
  }
});

test('headThreads is checked', async () => {
  await assert.rejects(
    sweep({ out: path.join(dir, 'bad'), base: { data, backbone } }, { headThreads: 0 }),
    /^FinetuneError: Expected a positive integer for headThreads but received 0$/,
  );
});
