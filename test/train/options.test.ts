import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { test } from 'node:test';
import yargs from 'yargs';
import { END, START, withTable } from '../../scripts/readme-options.js';
import { builder } from '../../src/cli/train.js';
import {
  optionsMarkdown,
  resolveTrainOptions,
  TRAIN_OPTIONS,
  type TrainOptions,
} from '../../src/train/options.js';
import { ROOT } from '../helpers.js';

test("the README's option table is the one the option table generates", async () => {
  const readme = await readFile(path.join(ROOT, 'README.md'), 'utf8');
  assert.ok(readme.includes(START) && readme.includes(END), 'README has the table markers');
  assert.equal(readme, withTable(readme, optionsMarkdown()), 'run `npm run docs`');
  // and the comparison can fail: a changed row changes the README section
  const changed = TRAIN_OPTIONS.map((r) => (r.key === 'lr' ? { ...r, defaultText: '0.5' } : r));
  assert.notEqual(readme, withTable(readme, optionsMarkdown(changed)));
});

test('every row is a CLI flag with its doc and default in --help, and nothing else is', async () => {
  const y = builder(yargs([]).scriptName('finetune'));
  const help = await y.getHelp();
  const flags = Object.keys(
    (y as unknown as { getOptions(): { key: Record<string, unknown> } }).getOptions().key,
  );
  for (const row of TRAIN_OPTIONS) {
    assert.ok(flags.includes(row.flag), `--${row.flag} is a flag`);
    assert.match(help, new RegExp(`--${row.flag}\\b`));
  }
  assert.match(help, /--epochs\s+Head-stage epochs \(at most 100000\) \[default: 40\]/);
  const extra = flags.filter(
    (f) =>
      !TRAIN_OPTIONS.some((r) => r.flag === f) &&
      !['quiet', 'json', 'resume', 'help', 'version'].includes(f),
  );
  assert.deepEqual(extra, []);
});

test('flags reach the library under their keys; absent flags stay absent', async () => {
  const argv = await builder(yargs([])).parseAsync([
    '--data',
    'd',
    '--batch-size',
    '8',
    '--no-swa',
    '--augment',
    'flip',
  ]);
  assert.equal(argv['batch-size'], 8);
  assert.equal(argv['swa'], false);
  assert.equal(argv['epochs'], undefined);
});

test('defaults resolve in table order from the options above them', () => {
  const r = resolveTrainOptions({ data: 'x', lr: 0.02, finetuneEpochs: 4, augment: 'crop,flip' });
  assert.equal(r.swaLr, 0.01);
  assert.equal(r.finetuneLr, 0.0002);
  assert.equal(r.finetuneSwaLr, 0.0001);
  assert.equal(r.finetuneSwaStart, 0.75);
  assert.equal(r.augmentViews, 4);
  assert.deepEqual(r.augment, ['flip', 'crop']);
  assert.equal(r.engine, 'auto');
  assert.equal(r.threads, undefined);
  for (const key of Object.keys(r))
    assert.ok(
      TRAIN_OPTIONS.some((row) => row.key === key),
      key,
    );
});

test('every option is checked once, before any work, in one wording', () => {
  const bad: [Partial<TrainOptions>, string][] = [
    [
      { engine: 'bogus' as never },
      "Expected one of auto, onnx, tfjs for engine but received 'bogus'",
    ],
    [
      { backend: 'tpu' as never },
      "Expected one of auto, node-gpu, node, wasm, cpu for backend but received 'tpu'",
    ],
    [{ threads: 0 }, 'Expected a positive integer for threads but received 0'],
    [{ valSplit: 1 }, 'Expected a number from 0 to 1 (exclusive) for valSplit but received 1'],
    [
      { unfreeze: 'blocks:0', finetuneEpochs: 2 },
      "Expected all, from:LAYER_NAME or blocks:K (K ≥ 1) for unfreeze but received 'blocks:0'",
    ],
    [
      { finetuneEpochs: 4, finetuneSwaStart: 4 },
      'Expected an epoch from 1 to 3 or a fraction of the epochs below 1 for finetuneSwaStart but received 4',
    ],
    [
      { epochs: 1, swaStart: 1 },
      'Expected a fraction of the epochs below 1 for swaStart but received 1',
    ],
    [
      { swaStart: 2.5 },
      'Expected an epoch from 1 to 39 or a fraction of the epochs below 1 for swaStart but received 2.5',
    ],
    [{ epoch: 3 } as never, 'Unknown option epoch; did you mean epochs?'],
    [{ keep: 'best', augmentViews: 2 }, 'augmentViews need a fine-tune stage (finetuneEpochs > 0)'],
    [{ finetuneEpochs: 2, augmentViews: 2 }, 'augmentViews needs augment (e.g. flip,crop)'],
    [{ swa: false, swaFreq: 2 }, 'swaFreq cannot be used with average none (or swa turned off)'],
    [{ bn: 'train' }, 'bn need a fine-tune stage (finetuneEpochs > 0)'],
    [
      { finetuneEpochs: 2, bn: 'on' as never },
      "Expected one of frozen, train for bn but received 'on'",
    ],
    [{ headBn: 'yes' as never }, "Expected a boolean for headBn but received 'yes'"],
    [
      { swa: false, finetuneEpochs: 2, finetuneSwaLr: 1e-4 },
      'finetuneSwaLr cannot be used with average none (or swa turned off)',
    ],
  ];
  assert.throws(() => resolveTrainOptions({} as TrainOptions), {
    message: 'Expected a folder of class folders for data but received undefined',
  });
  for (const [options, message] of bad) {
    assert.throws(() => resolveTrainOptions({ data: 'x', ...options }), { message }, message);
  }
});
