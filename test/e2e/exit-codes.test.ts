import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { constants } from 'node:fs';
import { cp, open, readdir, readFile, symlink, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { ROOT, tempDir, writeColourDataset, writeImage, writeTinyBackbone } from '../helpers.js';
import { runCliGuarded } from './cli-guard.js';

// The exit-code table (src/errors.ts EXIT_CODES): 0 ok, 1 internal, 2 usage, 3 data.
// Every run has a 60 s kill timer: a FIFO or /dev/zero that is read again would hang.

const posix = process.platform !== 'win32';
let dir: string;
let cleanup: () => Promise<void>;
let backbone: string;
let data: string;
let run: string;
let hostile: string;
const fifos: string[] = [];

const lines = (s: string): string[] => s.split('\n').filter((l) => l.trim() !== '');
const noStack = (stderr: string): void => {
  assert.doesNotMatch(stderr, /Unhandled|^\s+at /m, stderr);
};

async function mkfifo(file: string): Promise<void> {
  execFileSync('mkfifo', [file]);
  fifos.push(file);
}

before(async () => {
  ({ dir, cleanup } = await tempDir('exit-codes'));
  backbone = await writeTinyBackbone(dir);
  data = path.join(dir, 'data');
  await writeColourDataset(data, 8, {
    cyan: [20, 200, 200],
    magenta: [200, 20, 200],
    yellow: [220, 220, 30],
  });
  run = path.join(dir, 'run');
  const trained = await runCliGuarded(
    ['train', '--data', data, '--out', run, '--backbone', backbone, '--epochs', '8'],
    dir,
  );
  assert.equal(trained.code, 0, trained.stderr);
  hostile = path.join(dir, 'hostile');
  await writeFile(path.join(dir, 'notes.jpg'), 'not an image\n');
  if (posix) {
    await cp(data, hostile, { recursive: true });
    await symlink('/dev/zero', path.join(hostile, 'cyan', 'zero.jpg'));
    await symlink('/dev/urandom', path.join(hostile, 'magenta', 'urandom.png'));
    await mkfifo(path.join(hostile, 'yellow', 'pipe'));
    await symlink(path.join(hostile, 'yellow', 'pipe'), path.join(hostile, 'cyan', 'pipe.jpg'));
  }
});

after(async () => {
  // A reader stuck in open() on a FIFO (a regression) returns once a writer opens it.
  for (const fifo of fifos) {
    await open(fifo, constants.O_WRONLY | constants.O_NONBLOCK)
      .then((h) => h.close())
      .catch(() => {});
  }
  await cleanup();
});

describe('hostile files', { skip: !posix && 'needs FIFOs and /dev' }, () => {
  const reasons = (skipped: { path: string; reason: string }[]) =>
    skipped.map((s) => [path.relative(hostile, s.path), s.reason]).sort();
  const expected = [
    ['cyan/pipe.jpg', 'not a regular file (a FIFO)'],
    ['cyan/zero.jpg', 'not a regular file (a character device)'],
    ['magenta/urandom.png', 'not a regular file (a character device)'],
    ['yellow/pipe', 'not a regular file (a FIFO)'],
  ];

  test('train skips /dev/zero, /dev/urandom and FIFOs, names them, and finishes', async () => {
    const r = await runCliGuarded(
      ['train', '--data', hostile, '--out', path.join(dir, 'run-hostile'), '--backbone', backbone],
      dir,
    );
    assert.equal(r.killed, false, 'hung');
    assert.equal(r.code, 0, r.stderr);
    for (const [file, reason] of expected)
      assert.ok(r.stderr.includes(`skipped ${path.join(hostile, file!)}: ${reason}`), r.stderr);
    const summary = JSON.parse(
      await readFile(path.join(dir, 'run-hostile', 'summary.json'), 'utf8'),
    );
    assert.deepEqual(reasons(summary.skipped), expected);
  });

  test('predict skips them too; with nothing usable left it exits 3 with one line', async () => {
    const r = await runCliGuarded(
      ['predict', '--model', run, hostile, '--format', 'json', '--top-k', '1'],
      dir,
    );
    assert.equal(r.killed, false, 'hung');
    assert.equal(r.code, 0, r.stderr);
    const out = JSON.parse(r.stdout);
    assert.equal(out.predictions.length, 24);
    assert.deepEqual(reasons(out.skipped), expected);

    const zero = path.join(hostile, 'cyan', 'zero.jpg');
    const pipe = path.join(hostile, 'yellow', 'pipe');
    const none = await runCliGuarded(['predict', '--model', run, zero, pipe], dir);
    assert.equal(none.killed, false, 'hung');
    assert.equal(none.code, 3);
    assert.equal(none.stdout, '');
    assert.deepEqual(lines(none.stderr), [
      `finetune: no usable images (2 skipped: ${zero}: not a regular file (a character device); ${pipe}: not a regular file (a FIFO))`,
    ]);
  });
});

test('--max-bytes: files over it are skipped unread; a bad value is a usage error', async () => {
  const image = path.join(data, 'cyan', '0.png');
  const size = (await readFile(image)).length;
  const over = await runCliGuarded(
    ['predict', '--model', run, image, '--max-bytes', String(size - 1)],
    dir,
  );
  assert.equal(over.code, 3);
  assert.deepEqual(lines(over.stderr), [
    `finetune: no usable images (1 skipped: ${image}: too large (more than ${size - 1} bytes))`,
  ]);
  const fits = await runCliGuarded(
    ['predict', '--model', run, image, '--max-bytes', String(size), '--format', 'csv'],
    dir,
  );
  assert.equal(fits.code, 0, fits.stderr);
  assert.equal(lines(fits.stdout).length, 2);
  const bad = await runCliGuarded(['predict', '--model', run, image, '--max-bytes', '0'], dir);
  assert.equal(bad.code, 2);
  assert.deepEqual(lines(bad.stderr), [
    'finetune: Expected a positive integer for --max-bytes but received 0',
  ]);
});

test('predict: every input skipped is exit 3 with one line, not an empty table', async () => {
  const notes = path.join(dir, 'notes.jpg');
  const r = await runCliGuarded(['predict', '--model', run, notes], dir);
  assert.equal(r.code, 3);
  assert.equal(r.stdout, '');
  assert.deepEqual(lines(r.stderr), [
    `finetune: no usable images (1 skipped: ${notes}: not an image (unrecognised content))`,
  ]);
});

test('labels that do not match the model outputs: exit 3, the line names model.json', async () => {
  for (const labels of [
    ['cyan', 'magenta'],
    ['cyan', 'magenta', 'yellow', 'black'],
  ]) {
    const copy = path.join(dir, `labels-${labels.length}`);
    await cp(path.join(run, 'model'), copy, { recursive: true });
    const file = path.join(copy, 'model.json');
    const json = JSON.parse(await readFile(file, 'utf8'));
    json.userDefinedMetadata.labels = labels;
    await writeFile(file, JSON.stringify(json));
    const image = path.join(data, 'cyan', '0.png');
    for (const command of [
      ['predict', '--model', copy, image],
      ['evaluate', '--model', copy, '--data', data],
    ]) {
      const r = await runCliGuarded(command, dir);
      assert.equal(r.code, 3, r.stderr);
      assert.deepEqual(lines(r.stderr), [
        `finetune: ${file}: has ${labels.length} labels in its metadata but the model has 3 outputs`,
      ]);
    }
  }
});

test('evaluate: a class without examples is named and counts in the macro average', async () => {
  const partial = path.join(dir, 'partial');
  await cp(path.join(data, 'cyan'), path.join(partial, 'cyan'), { recursive: true });
  await cp(path.join(data, 'yellow'), path.join(partial, 'yellow'), { recursive: true });
  const json = await runCliGuarded(['evaluate', '--model', run, '--data', partial, '--json'], dir);
  assert.equal(json.code, 0, json.stderr);
  const report = JSON.parse(json.stdout);
  assert.deepEqual(report.withoutExamples, ['magenta']);
  const recall = report.perClass.map((m: { recall: number }) => m.recall);
  assert.equal(recall[1], 0);
  assert.ok(Math.abs(report.macro.recall - (recall[0] + recall[2]) / 3) < 1e-12);
  const text = await runCliGuarded(['evaluate', '--model', run, '--data', partial], dir);
  assert.equal(text.code, 0, text.stderr);
  assert.match(text.stdout, /^no examples of magenta \(recall 0 in the macro average\)$/m);

  // Calibration agrees with the model's own probabilities, read back through predict and
  // recomputed here from the definitions (the bins' edges taken from the report).
  const predicted = await runCliGuarded(
    ['predict', '--model', run, partial, '--top-k', '3', '--format', 'json'],
    dir,
  );
  assert.equal(predicted.code, 0, predicted.stderr);
  const images = (
    JSON.parse(predicted.stdout).predictions as {
      path: string;
      top: { label: string; probability: number }[];
    }[]
  ).map((p) => ({ truth: path.basename(path.dirname(p.path)), top: p.top }));
  assert.equal(images.length, report.count);
  const c = report.calibration;
  const n = images.length;
  let nll = 0;
  let brier = 0;
  for (const { truth, top } of images) {
    assert.equal(top.length, 3);
    nll -= Math.log(Math.max(top.find((t) => t.label === truth)!.probability, 1e-7)) / n;
    for (const t of top) brier += (t.probability - (t.label === truth ? 1 : 0)) ** 2 / n;
  }
  const close = (a: number, b: number, what: string) =>
    assert.ok(Math.abs(a - b) <= 1e-9, `${what}: report ${a}, recomputed ${b}`);
  close(c.nll, nll, 'nll');
  close(c.brier, brier, 'brier');
  assert.equal(c.bins.length, 15);
  let ece = 0;
  let mce = 0;
  for (const [i, bin] of (c.bins as Record<string, number | null>[]).entries()) {
    const lo = bin.lo!;
    const hi = bin.hi!;
    const inBin = images.filter(({ top }) => {
      const p = top[0]!.probability;
      return (p > lo || (i === 0 && p === 0)) && p <= hi;
    });
    assert.equal(bin.count, inBin.length, `bin ${i}`);
    if (!inBin.length) {
      assert.deepEqual([bin.confidence, bin.accuracy], [null, null]);
      continue;
    }
    const conf = inBin.reduce((a, x) => a + x.top[0]!.probability, 0) / inBin.length;
    const acc = inBin.filter((x) => x.top[0]!.label === x.truth).length / inBin.length;
    close(bin.confidence!, conf, `bin ${i} confidence`);
    close(bin.accuracy!, acc, `bin ${i} accuracy`);
    ece += (inBin.length / n) * Math.abs(acc - conf);
    mce = Math.max(mce, Math.abs(acc - conf));
  }
  close(c.ece, ece, 'ece');
  close(c.mce, mce, 'mce');
  const figures = `nll ${c.nll.toFixed(4)}  brier ${c.brier.toFixed(4)}  ece ${c.ece.toFixed(4)}  mce ${c.mce.toFixed(4)}`;
  assert.ok(text.stdout.includes(`calibration: ${figures}`), text.stdout);

  const junk = path.join(dir, 'junk');
  await writeImage(path.join(junk, 'cyan', 'a.png'), [20, 200, 200]);
  await writeFile(path.join(junk, 'cyan', 'a.png'), 'garbage');
  const none = await runCliGuarded(['evaluate', '--model', run, '--data', junk], dir);
  assert.equal(none.code, 3);
  assert.deepEqual(lines(none.stderr), [
    `finetune: no usable images (1 skipped: ${path.join(junk, 'cyan', 'a.png')}: not an image (unrecognised content))`,
  ]);
});

describe('failures inside embedding', () => {
  /** Makes ONNX Runtime fail on its nth run, as a full disk or a bad graph would mid-way. */
  async function faultModule(n: number): Promise<string> {
    const file = path.join(dir, `fail-run-${n}.mjs`);
    await writeFile(
      file,
      `import { createRequire } from 'node:module';
const require = createRequire(${JSON.stringify(path.join(ROOT, 'package.json'))});
const { InferenceSession } = require('onnxruntime-node');
const run = InferenceSession.prototype.run;
let calls = 0;
InferenceSession.prototype.run = function (...args) {
  // Fails a turn later, as onnxruntime-node does, while the next batch is being decoded.
  if (++calls === ${n})
    return new Promise((_, reject) =>
      setImmediate(() => reject(new Error('ENOSPC: no space left on device, write'))),
    );
  return run.apply(this, args);
};
`,
    );
    return file;
  }

  test('an engine failing mid-embedding: one line, exit 1, no unhandled rejection or stack', async () => {
    const images = await readdir(path.join(data, 'cyan'));
    assert.equal(images.length, 8);
    // One session, in the main thread.
    const args = ['predict', '--model', run, data, '--engine', 'onnx', '--batch-size', '4'];
    const inThread = [...args, '--threads', '1'];
    const nodeArgs = ['--import', await faultModule(2)];
    const r = await runCliGuarded(inThread, dir, { nodeArgs });
    assert.equal(r.code, 1, r.stderr);
    assert.equal(r.stdout, '');
    assert.deepEqual(lines(r.stderr), [
      'finetune: ENOSPC: no space left on device, write (FINETUNE_DEBUG=1 prints the stack trace)',
    ]);
    const debug = await runCliGuarded(inThread, dir, { nodeArgs, env: { FINETUNE_DEBUG: '1' } });
    assert.equal(debug.code, 1);
    assert.match(
      debug.stderr,
      /^finetune: ENOSPC: no space left on device, write\nError: ENOSPC.*\n\s+at /,
    );
    // Two single-threaded sessions in worker threads (the preload runs in each): the line
    // names the worker, and the debug output ends with the worker's own stack.
    const pooled = [...args, '--threads', '2'];
    const p = await runCliGuarded(pooled, dir, { nodeArgs });
    assert.equal(p.code, 1, p.stderr);
    assert.equal(p.stdout, '');
    assert.equal(lines(p.stderr).length, 1, p.stderr);
    assert.match(
      p.stderr,
      /^finetune: ONNX Runtime worker [01] failed on a batch: ENOSPC: no space left on device, write \(FINETUNE_DEBUG=1 prints the stack trace\)\n$/,
    );
    const pDebug = await runCliGuarded(pooled, dir, { nodeArgs, env: { FINETUNE_DEBUG: '1' } });
    assert.equal(pDebug.code, 1);
    assert.match(
      pDebug.stderr,
      /\nCaused by: Error: ENOSPC: no space left on device, write\n\s+at /,
    );
  });

  test('--input-size 3 (which ONNX Runtime used to reject mid-run) is refused before any work: exit 2', async () => {
    const r = await runCliGuarded(
      ['train', '--data', data, '--out', path.join(dir, 'tiny-input'), '--input-size', '3'],
      dir,
    );
    assert.equal(r.code, 2, r.stderr);
    noStack(r.stderr);
    assert.deepEqual(lines(r.stderr), [
      'finetune: Expected an integer from 32 to 2048 for --input-size but received 3',
    ]);
  });
});
