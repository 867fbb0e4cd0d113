import assert from 'node:assert/strict';
import { readdir, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { PixelStore, PixelStoreRefused } from '../../src/data/pixel-store.js';
import type { FrozenModel } from '../../src/engine/types.js';
import { prefixActivations } from '../../src/train/finetune.js';
import { tempDir, writeImage } from '../helpers.js';

let dir: string;
let cleanup: () => Promise<void>;

before(async () => {
  ({ dir, cleanup } = await tempDir('pixel-store'));
});
after(async () => {
  await cleanup();
});

const posix = process.platform !== 'win32';

/** A frozen model whose output is its input: what the engine was fed, value for value. */
const identity: FrozenModel = {
  engine: 'tfjs',
  layout: 'nhwc',
  inputSize: 8,
  outputSize: 8 * 8 * 3,
  async run(batch, n) {
    return batch.slice(0, n * 8 * 8 * 3);
  },
  async dispose() {},
};

test('PixelStore: images come back by position with their key; nothing is left on disk', async () => {
  const parent = path.join(dir, 'plain');
  const store = await PixelStore.open(6, 6, parent);
  // Removed as soon as it is open (POSIX): nothing to leave behind, even on SIGKILL.
  if (posix) assert.deepEqual(await readdir(parent), []);
  await store.put(5, 'k5', Uint8Array.from([1, 2, 3, 4, 5, 6]));
  await store.put(2, 'k2', Uint8Array.from([9, 8, 7, 6, 5, 4]));
  await store.put(3, 'k3', Uint8Array.from([1, 2, 3])); // not a record: not kept
  assert.equal(store.key(5), 'k5');
  assert.equal(store.key(2), 'k2');
  assert.equal(store.key(3), null);
  assert.equal(store.key(0), null);
  assert.deepEqual(await store.pixels(5), Uint8Array.from([1, 2, 3, 4, 5, 6]));
  assert.deepEqual(await store.pixels(2), Uint8Array.from([9, 8, 7, 6, 5, 4]));
  assert.equal(await store.pixels(3), null);
  assert.equal(store.size, 2);
  assert.equal(store.failure, null);
  await store.close();
  await store.close();
  assert.equal(store.isClosed, true);
  assert.equal(store.key(5), null);
  assert.equal(await store.pixels(5), null);
  assert.deepEqual(await readdir(parent), []);
});

test('PixelStore: refused, naming the folder, when the images would take over half the free space', async () => {
  const parent = path.join(dir, 'small');
  await assert.rejects(
    PixelStore.open(150_528, 1e12, parent),
    (err: Error) =>
      err instanceof PixelStoreRefused &&
      /^1000000000000 decoded images would take [\d.]+ GB, more than half the [\d.]+ GB free in /.test(
        err.message,
      ) &&
      err.message.endsWith(`free in ${parent}`),
  );
  assert.deepEqual(await readdir(parent), []);
});

test('PixelStore: a failed write turns keeping off and says why; what was kept stays', async () => {
  const store = await PixelStore.open(2, 2, path.join(dir, 'full'));
  await store.put(0, 'a', Uint8Array.from([1, 2]));
  // As a full disk answers.
  const file = (store as unknown as { file: { write: () => Promise<never> } }).file;
  file.write = async () => {
    throw Object.assign(new Error('ENOSPC: no space left on device, write'), { code: 'ENOSPC' });
  };
  await store.put(1, 'b', Uint8Array.from([3, 4]));
  assert.equal(store.failure, 'ENOSPC');
  assert.equal(store.key(1), null);
  assert.deepEqual(await store.pixels(0), Uint8Array.from([1, 2]));
  await store.close();
});

test('augmented views cut from kept pixels are the views of the files as first decoded, which are read once', async () => {
  const files: string[] = [];
  for (let i = 0; i < 6; i++) {
    const file = path.join(dir, 'views', `${i}.png`);
    await writeImage(file, [(i * 53) % 256, (i * 97) % 256, 40], { variant: i, size: 24 });
    files.push(file);
  }
  const bad = path.join(dir, 'views', 'bad.png');
  await writeFile(bad, 'not an image');
  files.splice(3, 0, bad);
  const options = {
    augment: ['flip', 'crop'] as const,
    seed: 3,
    batchSize: 4,
    concurrency: 2,
    cache: null,
  };
  // The reference: view 1 decoded from the files, as without a store.
  const reference = await prefixActivations(files, identity, { ...options, view: 1 });
  const store = await PixelStore.open(8 * 8 * 3, files.length, path.join(dir, 'views-store'));
  try {
    const view0 = await prefixActivations(files, identity, { ...options, view: 0, keep: store });
    assert.deepEqual(view0.rows, [0, 1, 2, 4, 5, 6]);
    assert.equal(store.size, 6);
    // Every file now holds another image: a view that read them would differ.
    for (const [i, file] of files.entries()) {
      if (file !== bad)
        await writeImage(file, [255 - i * 30, 10, 200], { variant: i + 3, size: 24 });
    }
    const kept = await prefixActivations(files, identity, { ...options, view: 1, keep: store });
    assert.deepEqual(kept.rows, reference.rows);
    assert.deepEqual(kept.data, reference.data);
    const reread = await prefixActivations(files, identity, { ...options, view: 1 });
    assert.notDeepEqual(reread.data, reference.data);
  } finally {
    await store.close();
  }
});
