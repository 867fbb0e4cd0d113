import assert from 'node:assert/strict';
import { access, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { tempDir, writeColourDataset, writeImage, writeTinyBackbone } from '../helpers.js';
import { runCliGuarded } from './cli-guard.js';

// Messages name the flag the user typed (--batch-size), not the library's key (batchSize);
// bounds fail at once with exit 2; a broken cache is one warning line, never a failure.

let dir: string;
let cleanup: () => Promise<void>;
let backbone: string;
let data: string;
let image: string;

const lines = (s: string): string[] => s.split('\n').filter((l) => l.trim() !== '');
const exists = (p: string) =>
  access(p).then(
    () => true,
    () => false,
  );

before(async () => {
  ({ dir, cleanup } = await tempDir('flags'));
  backbone = await writeTinyBackbone(dir);
  data = path.join(dir, 'data');
  await writeColourDataset(data, 6, { red: [220, 30, 30], blue: [20, 40, 230] });
  image = path.join(dir, 'one.png');
  await writeImage(image, [200, 30, 30]);
});
after(async () => {
  await cleanup();
});

test('train: bad values fail at once, named by their flag (exit 2)', async () => {
  const cases: [string[], string][] = [
    [['--lr', '1e308'], 'Expected a number above 0 and at most 10 for --lr but received 1e+308'],
    [
      ['--epochs', '1e9'],
      'Expected an integer from 1 to 100000 for --epochs but received 1000000000',
    ],
    [['--input-size', '3'], 'Expected an integer from 32 to 2048 for --input-size but received 3'],
    [['--batch-size', '0'], 'Expected a positive integer for --batch-size but received 0'],
    [
      ['--finetune-swa-lr', '20', '--finetune-epochs', '1'],
      'Expected a number above 0 and at most 10 for --finetune-swa-lr but received 20',
    ],
    // Bounds that need the backbone's feature size: still before any image is decoded.
    [
      ['--hidden', '1e9'],
      'Expected an integer from 0 to 16777216 for --hidden but received 1000000000',
    ],
    [
      ['--embed-batch-size', '100000'],
      'Expected an integer from 1 to 87381 for --embed-batch-size but received 100000',
    ],
    // Options given without what they need name flags too.
    [
      ['--unfreeze', 'blocks:1', '--lr-mult', '4'],
      '--unfreeze, --lr-mult need a fine-tune stage (--finetune-epochs > 0)',
    ],
    [
      ['--no-swa', '--swa-freq', '2'],
      '--swa-freq cannot be used with --average none (or --swa turned off)',
    ],
  ];
  for (const [flags, message] of cases) {
    const out = path.join(dir, 'never');
    const r = await runCliGuarded(
      ['train', '--data', data, '--backbone', backbone, '--out', out, '--quiet', ...flags],
      dir,
    );
    assert.equal(r.code, 2, r.stderr);
    assert.deepEqual(lines(r.stderr), [`finetune: ${message}`]);
    assert.equal(await exists(out), false);
  }
});

test('predict: --batch-size 0 or -5 is refused before the model is loaded', async () => {
  for (const size of ['0', '-5']) {
    const r = await runCliGuarded(
      ['predict', '--model', path.join(dir, 'no-such-run'), image, '--batch-size', size],
      dir,
    );
    assert.equal(r.code, 2, r.stderr);
    assert.deepEqual(lines(r.stderr), [
      `finetune: Expected a positive integer for --batch-size but received ${size}`,
    ]);
  }
});

test('cache clear --older-than -1d: a bad duration, not unknown flags', async () => {
  const r = await runCliGuarded(
    ['cache', 'clear', '--cache-dir', path.join(dir, 'c'), '--older-than', '-1d'],
    dir,
  );
  assert.equal(r.code, 2, r.stderr);
  assert.deepEqual(lines(r.stderr), [
    "finetune: Expected a duration such as 30d, 12h or 45m for --older-than but received '-1d'",
  ]);
});

test('train with a cache dir that is a file: one warning line, exit 0, a usable model', async () => {
  const file = path.join(dir, 'cache-file');
  await writeFile(file, 'not a folder');
  const out = path.join(dir, 'run');
  const r = await runCliGuarded(
    [
      'train',
      '--data',
      data,
      '--backbone',
      backbone,
      '--out',
      out,
      '--epochs',
      '2',
      '--cache-dir',
      file,
    ],
    dir,
  );
  assert.equal(r.code, 0, r.stderr);
  const warnings = lines(r.stderr).filter((l) => l.startsWith('warning: cache: '));
  assert.equal(warnings.length, 1, r.stderr);
  assert.match(warnings[0]!, /cache-file.*: cannot write \(ENOTDIR/);
  // A batch of pixels must fit in memory: the bound comes from the model's input size.
  const big = await runCliGuarded(['predict', '--model', out, image, '--batch-size', '1e6'], dir);
  assert.equal(big.code, 2, big.stderr);
  assert.deepEqual(lines(big.stderr), [
    'finetune: Expected an integer from 1 to 87381 for --batch-size but received 1000000',
  ]);
  const ok = await runCliGuarded(['predict', '--model', out, image, '--format', 'csv'], dir);
  assert.equal(ok.code, 0, ok.stderr);
  assert.match(ok.stdout, /^path,label_1/);
});
