import assert from 'node:assert/strict';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { loadSplits, stratifiedSplit } from '../../src/data/scan.js';

let root: string;
before(async () => {
  root = await mkdtemp(path.join(tmpdir(), 'finetune-scan-'));
});
after(async () => {
  await rm(root, { recursive: true, force: true });
});

async function files(dir: string, names: string[]): Promise<void> {
  await mkdir(dir, { recursive: true });
  for (const n of names) await writeFile(path.join(dir, n), 'x');
}

test('stratified split is per class, seeded and repeatable', () => {
  const map = new Map([
    ['a', Array.from({ length: 10 }, (_, i) => `a/${i}`)],
    ['b', Array.from({ length: 5 }, (_, i) => `b/${i}`)],
    ['c', ['c/0']],
  ]);
  const s1 = stratifiedSplit(map, ['a', 'b', 'c'], 0.2, 7);
  const s2 = stratifiedSplit(map, ['a', 'b', 'c'], 0.2, 7);
  const s3 = stratifiedSplit(map, ['a', 'b', 'c'], 0.2, 8);
  assert.deepEqual(s1, s2);
  assert.notDeepEqual(s1.val, s3.val);
  const perClass = (list: { label: number }[], l: number): number =>
    list.filter((f) => f.label === l).length;
  assert.deepEqual(
    [0, 1, 2].map((l) => perClass(s1.val, l)),
    [2, 1, 0],
  );
  assert.deepEqual(
    [0, 1, 2].map((l) => perClass(s1.train, l)),
    [8, 4, 1],
  );
  const all = [...s1.train, ...s1.val].map((f) => f.path).sort();
  assert.deepEqual(all, [...map.values()].flat().sort());
});

test('class folders: sorted classes, hidden and stray files ignored, empty class warned', async () => {
  const d = path.join(root, 'flat');
  await files(path.join(d, 'zebra'), ['1.jpg', '2.jpg', '.DS_Store']);
  await files(path.join(d, 'ant'), ['1.jpg', '2.jpg', '3.jpg', '4.jpg', '5.jpg']);
  await mkdir(path.join(d, 'empty'), { recursive: true });
  await mkdir(path.join(d, '.hidden'), { recursive: true });
  await writeFile(path.join(d, 'stray.jpg'), 'x');
  const s = await loadSplits(d, { valSplit: 0.2, seed: 1 });
  assert.deepEqual(s.classes, ['ant', 'zebra']);
  assert.equal(s.layout, 'class-folders');
  assert.equal(s.train.length + s.val.length, 7);
  assert.equal(s.val.length, 2);
  assert.deepEqual(s.warnings, [`${path.join(d, 'empty')}: empty class folder, ignored`]);
  assert.ok(
    ![...s.train, ...s.val].some(
      (f) => f.path.includes('.DS_Store') || f.path.endsWith('stray.jpg'),
    ),
  );
});

test('train/val/test folders are used as they are', async () => {
  const d = path.join(root, 'splits');
  await files(path.join(d, 'train', 'cat'), ['1.png', '2.png']);
  await files(path.join(d, 'train', 'dog'), ['1.png']);
  await files(path.join(d, 'val', 'cat'), ['v.png']);
  await files(path.join(d, 'test', 'dog'), ['t.png']);
  const s = await loadSplits(d);
  assert.equal(s.layout, 'split-folders');
  assert.deepEqual(s.classes, ['cat', 'dog']);
  assert.equal(s.train.length, 3);
  assert.deepEqual(
    s.val.map((f) => [path.basename(f.path), f.label]),
    [['v.png', 0]],
  );
  assert.deepEqual(
    s.test.map((f) => [path.basename(f.path), f.label]),
    [['t.png', 1]],
  );
});

test('fewer than 2 classes, unknown val class and missing folder are clear errors', async () => {
  const one = path.join(root, 'one');
  await files(path.join(one, 'only'), ['1.jpg']);
  await assert.rejects(loadSplits(one), {
    message: `${one}: expected at least 2 class folders with images but found 1 (only)`,
  });
  const bad = path.join(root, 'bad');
  await files(path.join(bad, 'train', 'a'), ['1.jpg']);
  await files(path.join(bad, 'train', 'b'), ['1.jpg']);
  await files(path.join(bad, 'val', 'c'), ['1.jpg']);
  await assert.rejects(loadSplits(bad), {
    message: `${path.join(bad, 'val', 'c')}: class 'c' is not one of the training classes (a, b)`,
  });
  await assert.rejects(loadSplits(path.join(root, 'nope')), {
    message: `${path.join(root, 'nope')}: data directory not found or not a directory`,
  });
});
