import assert from 'node:assert/strict';
import { mkdir, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';
import * as tf from '@tensorflow/tfjs';
import { initBackend } from '../../src/backend/index.js';
import type { SweepConfig } from '../../src/experiments/config.js';
import type { ResultRow } from '../../src/experiments/results.js';
import { type SweepEvent, sweep } from '../../src/experiments/sweep.js';
import { train } from '../../src/train/train.js';
import { runCli, tempDir, writeColourDataset, writeTinyBackbone } from '../helpers.js';

let dir: string;
let cleanup: () => Promise<void>;
let backbone: string;
let data: string;
const colours: Record<string, [number, number, number]> = {
  red: [220, 30, 30],
  green: [30, 200, 40],
  blue: [20, 40, 230],
};

before(async () => {
  await initBackend('wasm');
  ({ dir, cleanup } = await tempDir('sweep'));
  backbone = await writeTinyBackbone(dir);
  data = path.join(dir, 'data');
  await writeColourDataset(path.join(data, 'train'), 8, colours);
  await writeColourDataset(path.join(data, 'test'), 3, colours);
});
after(async () => {
  await cleanup();
});

const exists = (file: string) =>
  stat(file).then(
    () => true,
    () => false,
  );

function config(name: string, extra: Partial<SweepConfig> = {}): SweepConfig {
  return {
    out: path.join(dir, name),
    base: { data, backbone, epochs: 4, cacheDir: path.join(dir, `cache-${name}`) },
    grid: { lr: [0.01, 0.1], hidden: [0, 8] },
    repeats: 2,
    ...extra,
  };
}

test('a head-only sweep: one embedding pass, a record per run, the tables, the best model only', async () => {
  const before = tf.memory().numTensors;
  const events: SweepEvent[] = [];
  const ended: string[] = [];
  const result = await sweep(config('heads'), {
    onEvent: (e) => events.push(e),
    onRunEnd: (row) => ended.push(row.id),
  });
  assert.equal(tf.memory().numTensors, before);
  const out = result.out;
  assert.equal(result.rows.length, 8);
  assert.ok(result.rows.every((r) => r.status === 'done'));
  // Heads of one shape train side by side and end together: hidden 0 runs, then hidden 8.
  assert.deepEqual(
    ended,
    [...result.rows]
      .sort((a, b) => Number(a.options.hidden) - Number(b.options.hidden))
      .map((r) => r.id),
  );
  // The 33 images (24 train/val, 9 test) went through the backbone once, for all 8 runs.
  const embeddings = events.filter((e) => e.type === 'embedding');
  assert.equal(embeddings.length, 1);
  assert.deepEqual(
    embeddings.map((e) => e.type === 'embedding' && [e.runs, e.images]),
    [[8, 33]],
  );
  // Only the 9 test images that repeat training images byte for byte can hit a fresh cache
  // (when their twin's entry lands first: timing decides).
  assert.ok(embeddings.every((e) => e.type === 'embedding' && e.cached <= 9));
  assert.equal(events.filter((e) => e.type === 'run-start' && !e.inChild).length, 8);

  // Per run: the records train writes, and result.json.
  for (const row of result.rows) {
    const runDir = path.join(out, row.runDir);
    const names = (await readdir(runDir)).sort();
    const files = ['config.json', 'labels.json', 'metrics.jsonl', 'result.json', 'summary.json'];
    assert.deepEqual(names, row.id === result.best!.id ? [...files, 'model'].sort() : files);
    const metrics = (await readFile(path.join(runDir, 'metrics.jsonl'), 'utf8')).trim().split('\n');
    assert.equal(metrics.length, 4);
    const cfg = JSON.parse(await readFile(path.join(runDir, 'config.json'), 'utf8'));
    assert.equal(cfg.lr, row.params['lr']);
    assert.equal(cfg.seed, row.params['seed']);
  }
  assert.equal(result.model, path.join(out, 'runs', result.best!.id, 'model'));
  assert.ok(await exists(path.join(result.model!, 'model.json')));

  // results.jsonl rows describe themselves.
  const jsonl = (await readFile(path.join(out, 'results.jsonl'), 'utf8'))
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l) as ResultRow);
  assert.equal(jsonl.length, 8);
  const first = jsonl[0]!;
  for (const key of ['id', 'params', 'options', 'status', 'runDir', 'val', 'test', 'seconds'])
    assert.ok(key in first, key);
  assert.deepEqual(first.params, { lr: 0.01, hidden: 0, seed: 42 });
  assert.equal(first.options.lr, 0.01);
  assert.ok(first.val!.raw!.loss > 0 && first.val!.swa!.loss > 0);
  assert.ok(first.test!.acc >= 0 && first.test!.macroF1 >= 0);
  assert.ok(first.seconds['head']! > 0);

  const csv = (await readFile(path.join(out, 'results.csv'), 'utf8')).trim().split('\n');
  assert.equal(csv.length, 9);
  assert.ok(csv[0]!.startsWith('id,config,repeat,status,lr,hidden,seed,val_raw_loss,'));
  const summary = (await readFile(path.join(out, 'summary.csv'), 'utf8')).trim().split('\n');
  assert.equal(summary.length, 5);
  assert.ok(summary[0]!.includes('test_acc_ci95_high'));
  const sweepJson = JSON.parse(await readFile(path.join(out, 'sweep.json'), 'utf8'));
  assert.equal(sweepJson.metric, 'val_loss');
  assert.equal(sweepJson.best, result.best!.id);
  assert.equal(sweepJson.status, 'done');
  assert.deepEqual(sweepJson.config.grid, { lr: [0.01, 0.1], hidden: [0, 8] });
  // Best run by val loss: no finished run has a lower one.
  const losses = result.rows.map((r) => r.val!.kept!.loss);
  assert.equal(result.best!.val!.kept!.loss, Math.min(...losses));
});

test('a sweep run is the train run of the same options: same figures, though trained beside others', async () => {
  const result = await sweep(
    {
      out: path.join(dir, 'same'),
      base: { data, backbone, epochs: 4, cacheDir: path.join(dir, 'cache-same') },
      grid: { lr: [0.01, 0.05], dropout: [0, 0.3], labelSmoothing: [0, 0.2] },
      repeats: 2,
    },
    { export: 'none' },
  );
  assert.equal(result.model, null);
  assert.equal(result.rows.length, 16);
  assert.ok(!(await exists(path.join(result.out, result.rows[0]!.runDir, 'model'))));
  // One of the sixteen heads that trained side by side, neither the first nor the last (repeat
  // 0: train splits with its seed, and a sweep splits with the base seed).
  const row = result.rows.find(
    (r) =>
      r.params['lr'] === 0.05 &&
      r.params['dropout'] === 0.3 &&
      r.params['labelSmoothing'] === 0 &&
      r.repeat === 0,
  )!;
  const summary = await train({
    data,
    backbone,
    epochs: 4,
    lr: 0.05,
    dropout: 0.3,
    labelSmoothing: 0,
    seed: row.options.seed,
    out: path.join(dir, 'same-train'),
    cacheDir: path.join(dir, 'cache-same'),
  });
  assert.deepEqual(row.val!.kept, summary.val);
  assert.deepEqual(row.test, summary.test);
  assert.deepEqual(row.val!.raw, summary.stages.head!.raw);
});

test('resume: finished runs are skipped; killed, half-written and failed runs run again', async () => {
  const cfg = config('resume', { grid: { lr: [0.01, 0.1] }, repeats: 2 });
  const first = await sweep(cfg, { export: 'all' });
  assert.equal(first.rows.length, 4);
  for (const row of first.rows) assert.ok(await exists(path.join(first.out, row.runDir, 'model')));

  const starts = async (): Promise<{ started: string[]; skipped: number; rows: ResultRow[] }> => {
    const started: string[] = [];
    const r = await sweep(cfg, {
      export: 'none',
      onEvent: (e) => {
        if (e.type === 'run-start') started.push(e.id);
      },
    });
    return { started, skipped: r.skipped, rows: [...r.rows] };
  };
  const again = await starts();
  assert.deepEqual(again.started, []);
  assert.equal(again.skipped, 4);
  assert.deepEqual(again.rows, first.rows);

  const [a, b, c] = first.rows.map((r) => path.join(first.out, r.runDir));
  // Killed before its records: no result.json.
  await rm(path.join(a!, 'result.json'));
  // Killed while writing: a partial result.json.
  await writeFile(path.join(b!, 'result.json'), '{"id":');
  // Failed earlier.
  const failed = JSON.parse(await readFile(path.join(c!, 'result.json'), 'utf8'));
  await writeFile(path.join(c!, 'result.json'), JSON.stringify({ ...failed, status: 'failed' }));
  const redo = await starts();
  assert.deepEqual(
    redo.started.sort(),
    first.rows
      .slice(0, 3)
      .map((r) => r.id)
      .sort(),
  );
  assert.equal(redo.skipped, 1);
  // Same seeds, same figures.
  assert.deepEqual(
    redo.rows.map((r) => r.val),
    first.rows.map((r) => r.val),
  );
  // Every run has its complete record again.
  for (const row of redo.rows) {
    const written = JSON.parse(
      await readFile(path.join(first.out, row.runDir, 'result.json'), 'utf8'),
    );
    assert.equal(written.status, 'done');
  }
});

test('a run that fails is recorded as failed and does not stop the others', async () => {
  const dataWithOneClass = path.join(dir, 'one-class');
  await writeColourDataset(dataWithOneClass, 4, { red: colours.red! });
  const result = await sweep({
    out: path.join(dir, 'fails'),
    base: { backbone, epochs: 2, cacheDir: path.join(dir, 'cache-fails') },
    variants: [{ data: dataWithOneClass }, { data: path.join(data, 'train') }],
  });
  assert.deepEqual(
    result.rows.map((r) => r.status),
    ['failed', 'done'],
  );
  assert.match(result.rows[0]!.error!, /one-class: expected at least 2 class folders/);
  assert.equal(result.best!.id, result.rows[1]!.id);
  const csv = await readFile(path.join(result.out, 'results.csv'), 'utf8');
  assert.match(csv, /,failed,.*expected at least 2 class folders/);
});

test('fine-tune runs in parallel child processes share the prefix cache without recomputing it', async () => {
  const before = tf.memory().numTensors;
  const events: SweepEvent[] = [];
  const result = await sweep(
    {
      out: path.join(dir, 'parallel'),
      base: {
        data,
        backbone,
        epochs: 2,
        finetuneEpochs: 1,
        unfreeze: 'from:dw1',
        cacheDir: path.join(dir, 'cache-parallel'),
      },
      grid: { finetuneLr: [1e-4, 3e-4, 1e-3] },
    },
    { parallel: 2, export: 'none', onEvent: (e) => events.push(e) },
  );
  assert.equal(tf.memory().numTensors, before);
  assert.deepEqual(
    result.rows.map((r) => r.status),
    ['done', 'done', 'done'],
    result.rows.map((r) => r.error).join('; '),
  );
  assert.ok(result.rows.every((r) => r.val!.stage === 'finetune'));
  // A child's own prepare and embed phases count in its seconds.
  for (const row of result.rows) {
    const s = row.seconds;
    assert.ok(s['embed']! > 0 && s['finetune']! > 0);
    assert.ok(s['total']! >= s['scan']! + s['load']! + s['embed']! + s['head']! + s['finetune']!);
  }
  // The first run computes the embeddings and the prefix activations (33 images each). The
  // 9 test images repeat training images byte for byte: each copy hits only if its twin's
  // entry was written before it was read, which depends on timing (up to 9 per pass, 18 in
  // all). The other two, running at the same time, read all of them from the cache.
  const [first, ...rest] = result.rows;
  assert.equal(first!.cache!.hits + first!.cache!.misses, 66);
  assert.ok(first!.cache!.misses >= 48, `first run computed ${first!.cache!.misses} of 66`);
  for (const row of rest) assert.deepEqual(row.cache, { hits: 66, misses: 0 });
  const order = events.flatMap((e) =>
    e.type === 'run-start'
      ? [`start ${e.index}`]
      : e.type === 'run-end'
        ? [`end ${e.row.index}`]
        : [],
  );
  assert.deepEqual(order.slice(0, 3), ['start 1', 'end 1', 'start 2']);
  assert.equal(order[3], 'start 3', `runs 2 and 3 overlap: ${order.join(', ')}`);
  assert.ok(events.every((e) => e.type !== 'run-start' || e.inChild));
});

test('threads × parallel may not exceed the cores', async () => {
  const cores = os.availableParallelism();
  await assert.rejects(
    sweep(
      {
        out: path.join(dir, 'threads'),
        base: { data, backbone, finetuneEpochs: 1, threads: cores },
      },
      { parallel: 2 },
    ),
    {
      message: `run 1: threads ${cores} × parallel 2 would run ${2 * cores} engine threads on ${cores} cores; lower threads or parallel`,
    },
  );
  assert.ok(!(await exists(path.join(dir, 'threads'))));
  await assert.rejects(
    sweep({ out: path.join(dir, 'threads'), base: { data } }, { paralel: 2 } as object),
    { message: 'Unknown sweep setting paralel; did you mean parallel?' },
  );
});

test('finetune sweep from a YAML file, on the real CLI', async () => {
  const work = path.join(dir, 'cli');
  await mkdir(work, { recursive: true });
  await writeFile(
    path.join(work, 'sweep.yaml'),
    [
      'out: sw',
      'base:',
      `  data: ${JSON.stringify(data)}`,
      `  backbone: ${JSON.stringify(backbone)}`,
      '  epochs: 3',
      'grid:',
      '  lr: [0.01, 0.1]',
      'repeats: 2',
      '',
    ].join('\n'),
  );
  const run = await runCli(
    ['sweep', '--config', 'sweep.yaml', '--metric', 'val_acc', '--head-threads', '1'],
    work,
  );
  assert.equal(run.code, 0, run.stderr);
  assert.match(
    run.stdout,
    /best config by val_acc: lr=0\.(01|1): [\d.]+ over 2 runs \(95% interval /,
  );
  assert.match(run.stderr, /embedded 33 images once for 4 runs/);
  const sweepJson = JSON.parse(await readFile(path.join(work, 'sw', 'sweep.json'), 'utf8'));
  assert.equal(sweepJson.metric, 'val_acc');
  // --head-threads reaches the sweep (the default is every core).
  assert.deepEqual(
    sweepJson.embeddings.map((e: { headThreads: number }) => e.headThreads),
    [1],
  );

  const bad = await runCli(['sweep', '--config', 'sweep.yaml', '--metric', 'val_f1'], work);
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /Invalid values:/);
  await writeFile(path.join(work, 'typo.yaml'), `out: sw\nbase:\n  data: x\ngrid:\n  lrr: [1]\n`);
  const typo = await runCli(['sweep', '--config', 'typo.yaml'], work);
  assert.equal(typo.code, 2);
  assert.equal(typo.stderr, 'finetune: grid: Unknown option lrr; did you mean lr?\n');
});
