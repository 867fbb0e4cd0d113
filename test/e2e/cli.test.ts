import assert from 'node:assert/strict';
import { readdir, readFile } from 'node:fs/promises';
import path from 'node:path';
import { type TestContext, test } from 'node:test';
import { initBackend } from '../../src/backend/index.js';
import { runCli, SAMPLE, tempDir, writeImage } from '../helpers.js';

/** A temp folder of the test's own (its cwd and, through XDG_CACHE_HOME, its cache), removed after it. */
async function ownDir(t: TestContext, name: string): Promise<string> {
  const { dir, cleanup } = await tempDir(name);
  t.after(cleanup);
  return dir;
}

test('train → predict → evaluate on the sample set, in a temp folder, beats chance by far', async (t) => {
  const dir = await ownDir(t, 'cli-run');
  const out = path.join(dir, 'run');
  const trained = await runCli(
    ['train', '--data', path.join(SAMPLE, 'train'), '--out', out, '--json'],
    dir,
  );
  assert.equal(trained.code, 0, trained.stderr);
  const summary = JSON.parse(trained.stdout);
  // what `auto` resolves to here (wasm without tfjs-node; node where it is installed)
  assert.equal(summary.backend, (await initBackend('auto')).option);
  assert.equal(summary.classes.length, 10);
  assert.equal(summary.exported, 'head-swa');
  assert.ok(summary.stages.head.raw.acc > 0 && summary.stages.head.swa.acc > 0);
  assert.ok(summary.val.acc >= 0.5, `val acc ${summary.val.acc} (chance is 0.1)`);

  const evaluated = await runCli(
    ['evaluate', '--model', out, '--data', path.join(SAMPLE, 'test'), '--json'],
    dir,
  );
  assert.equal(evaluated.code, 0, evaluated.stderr);
  const report = JSON.parse(evaluated.stdout);
  assert.equal(report.count, 200);
  assert.ok(report.accuracy >= 0.5, `test accuracy ${report.accuracy}`);
  assert.equal(report.confusion.length, 10);
  assert.equal(report.perClass.length, 10);

  const bag = path.join(SAMPLE, 'test', 'bag');
  const one = path.join(
    SAMPLE,
    'test',
    'trouser',
    (await readdir(path.join(SAMPLE, 'test', 'trouser')))[0]!,
  );
  const predicted = await runCli(
    ['predict', '--model', out, one, bag, '--top-k', '2', '--format', 'json'],
    dir,
  );
  assert.equal(predicted.code, 0, predicted.stderr);
  const p = JSON.parse(predicted.stdout);
  assert.equal(p.predictions.length, 21);
  assert.equal(p.predictions[0].top.length, 2);
  assert.ok(p.predictions[0].top[0].probability >= p.predictions[0].top[1].probability);
  const bagHits = p.predictions.filter(
    (x: { path: string; top: { label: string }[] }) =>
      x.path.includes(`${path.sep}bag${path.sep}`) && x.top[0]!.label === 'bag',
  );
  assert.ok(bagHits.length >= 10, `bags recognised: ${bagHits.length}/20`);

  const csv = await runCli(
    ['predict', '--model', out, one, '--format', 'csv', '--top-k', '1'],
    dir,
  );
  assert.equal(csv.code, 0, csv.stderr);
  assert.deepEqual(csv.stdout.trim().split('\n')[0], 'path,label_1,probability_1');
  const table = await runCli(['predict', '--model', out, one], dir);
  assert.match(table.stdout, /^file\s+prediction\s+probability\s+next/);

  // the export loads in plain tfjs with its labels inside
  const modelJson = JSON.parse(await readFile(path.join(out, 'model', 'model.json'), 'utf8'));
  assert.deepEqual(modelJson.userDefinedMetadata.labels, summary.classes);
  assert.equal(modelJson.userDefinedMetadata.weights, 'head-swa');
});

test('fine-tune stage from the CLI: blocks:1 for 2 epochs reports head-SWA, stage-two raw and SWA figures', async (t) => {
  const dir = await ownDir(t, 'cli-finetune');
  const out = path.join(dir, 'run-ft');
  const r = await runCli(
    [
      'train',
      '--data',
      path.join(SAMPLE, 'train'),
      '--out',
      out,
      '--finetune-epochs',
      '2',
      '--unfreeze',
      'blocks:1',
      '--json',
    ],
    dir,
  );
  assert.equal(r.code, 0, r.stderr);
  const summary = JSON.parse(r.stdout);
  const { head, finetune } = summary.stages;
  for (const figures of [head.swa, finetune.raw, finetune.swa]) {
    assert.ok(figures.acc > 0.3 && figures.loss > 0, JSON.stringify(figures));
  }
  assert.equal(finetune.unfreezeFrom, 'block_16_expand');
  assert.equal(finetune.snapshots, 1);
  assert.equal(summary.exported, 'finetune-swa');
  const metrics = (await readFile(path.join(out, 'metrics.jsonl'), 'utf8'))
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l));
  assert.deepEqual(
    metrics.slice(-2).map((m) => [m.stage, m.epoch]),
    [
      ['finetune', 1],
      ['finetune', 2],
    ],
  );
  const evaluated = await runCli(
    ['evaluate', '--model', out, '--data', path.join(SAMPLE, 'test'), '--json'],
    dir,
  );
  assert.equal(evaluated.code, 0, evaluated.stderr);
  assert.ok(JSON.parse(evaluated.stdout).accuracy >= 0.5);
});

test('bad input: exit code 2 and a message that names the problem', async (t) => {
  const dir = await ownDir(t, 'cli-bad');
  const one = path.join(dir, 'one-class');
  await writeImage(path.join(one, 'cats', 'a.png'), [10, 10, 10]);
  const r = await runCli(['train', '--data', one, '--out', path.join(dir, 'x')], dir);
  assert.equal(r.code, 3); // a data problem (src/errors.ts EXIT_CODES)
  assert.match(r.stderr, /expected at least 2 class folders with images but found 1 \(cats\)/);

  const typo = await runCli(['train', '--data', one, '--epoch', '3'], dir);
  assert.equal(typo.code, 2);
  assert.match(typo.stderr, /Unknown argument: epoch; did you mean --epochs/);

  const bad = await runCli(['train', '--data', one, '--epochs', '-3'], dir);
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /Expected an integer from 1 to 100000 for --epochs but received -3/);

  const missing = await runCli(['predict', '--model', path.join(dir, 'nope'), 'x.png'], dir);
  assert.equal(missing.code, 2);
  assert.match(missing.stderr, /no such file or folder|no model found/);
});

test('finetune models lists every registered backbone', async (t) => {
  const dir = await ownDir(t, 'cli-models');
  const r = await runCli(['models', '--json'], dir);
  assert.equal(r.code, 0, r.stderr);
  const ids = JSON.parse(r.stdout).map((s: { id: string }) => s.id);
  assert.deepEqual(ids, ['nsfwjs_mobilenet_v2', 'mobilenet_v1', 'mobilenet_v2']);
});
