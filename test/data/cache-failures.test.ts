import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdir, readdir, readFile, rm, utimes, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { promisify } from 'node:util';
import * as tf from '@tensorflow/tfjs';
import { initBackend } from '../../src/backend/index.js';
import { EmbeddingCache } from '../../src/data/cache.js';
import type { TrainSummary } from '../../src/train/events.js';
import { train } from '../../src/train/train.js';
import { tempDir, writeColourDataset, writeTinyBackbone } from '../helpers.js';

/**
 * The cache is an accelerator, never a requirement: every way it can fail ends in one
 * warning and the same result as a run without a cache.
 */

const run = promisify(execFile);
let dir: string;
let cleanup: () => Promise<void>;
let backbone: string;
let data: string;
let reference: TrainSummary;
let n = 0;

before(async () => {
  await initBackend('wasm');
  ({ dir, cleanup } = await tempDir('cache-failures'));
  backbone = await writeTinyBackbone(dir);
  data = path.join(dir, 'data');
  await writeColourDataset(data, 8, {
    red: [220, 30, 30],
    green: [30, 200, 40],
    blue: [20, 40, 230],
  });
  reference = await trainWith(null);
});
after(async () => {
  await cleanup();
});

/** A run of the tiny backbone on the onnx engine (so a lowered model is cached too). */
async function trainWith(cacheDir: string | null): Promise<TrainSummary> {
  return train({
    data,
    out: path.join(dir, `run-${n++}`),
    backbone,
    engine: 'onnx',
    epochs: 3,
    seed: 3,
    ...(cacheDir === null ? { cache: false } : { cacheDir }),
  });
}

/** Runs through `train` with `cacheDir`, checking tensors, the result and the warnings. */
async function expectOneWarning(cacheDir: string, pattern: RegExp): Promise<TrainSummary> {
  const tensors = tf.memory().numTensors;
  const summary = await trainWith(cacheDir);
  assert.equal(tf.memory().numTensors, tensors);
  const cacheWarnings = summary.warnings.filter((w) => w.startsWith('cache: '));
  assert.equal(cacheWarnings.length, 1, cacheWarnings.join('\n'));
  assert.match(cacheWarnings[0]!, pattern);
  assert.deepEqual(
    summary.warnings.filter((w) => !w.startsWith('cache: ')),
    reference.warnings,
  );
  assert.deepEqual(summary.counts, reference.counts);
  assert.deepEqual(summary.val, reference.val);
  assert.deepEqual(summary.stages.head?.raw, reference.stages.head?.raw);
  return summary;
}

async function filesUnder(folder: string, suffix: string): Promise<string[]> {
  const entries = await readdir(folder, { recursive: true, withFileTypes: true });
  return entries
    .filter((e) => e.isFile() && e.name.endsWith(suffix))
    .map((e) => path.join(e.parentPath, e.name));
}

test('a cache dir that is a regular file: one warning, same result', async () => {
  const file = path.join(dir, 'cache-is-a-file');
  await writeFile(file, 'not a folder');
  await expectOneWarning(file, /^cache: .*cache-is-a-file.*: cannot write \(ENOTDIR/);
});

test('a cache dir path under a regular file (cannot be created): one warning', async () => {
  const file = path.join(dir, 'plain-file');
  await writeFile(file, 'x');
  await expectOneWarning(path.join(file, 'cache'), /cannot write \(ENOTDIR/);
});

test('a pack that is a folder is computed, not read; one warning', async () => {
  const cacheDir = path.join(dir, 'pack-dir');
  const warm = await trainWith(cacheDir);
  assert.deepEqual(warm.warnings, reference.warnings);
  const [pack] = await filesUnder(cacheDir, '.pack');
  assert.ok(pack);
  await rm(pack);
  await mkdir(path.join(pack, 'inside'), { recursive: true });
  const summary = await expectOneWarning(cacheDir, /\.pack: not a regular file/);
  assert.equal(summary.cachedEmbeddings, 0);
  // What was computed instead went to a pack of its own: the next run reads it.
  const again = await expectOneWarning(cacheDir, /\.pack: not a regular file/);
  assert.equal(again.cachedEmbeddings, 24);
});

test('a namespace folder that is a file: one warning', async () => {
  const cacheDir = path.join(dir, 'ns-file');
  await trainWith(cacheDir);
  const [ns] = await readdir(path.join(cacheDir, 'embeddings'));
  await rm(path.join(cacheDir, 'embeddings', ns!), { recursive: true });
  await writeFile(path.join(cacheDir, 'embeddings', ns!), 'not a folder');
  // Creating the namespace folder meets the file.
  await expectOneWarning(cacheDir, /cannot write \(EEXIST/);
});

test('a damaged lowered model: one warning, lowered again and stored', async () => {
  const cacheDir = path.join(dir, 'lowered');
  await trainWith(cacheDir);
  const [lowered] = await filesUnder(cacheDir, '.lowered');
  assert.ok(lowered);
  // Past the header and key: a flipped byte inside the ONNX graph.
  const bytes = await readFile(lowered);
  bytes[bytes.length - 10]! ^= 0xff;
  await writeFile(lowered, bytes);
  await rm(path.join(cacheDir, 'embeddings'), { recursive: true });
  await expectOneWarning(cacheDir, /\.lowered: damaged lowered model/);
  const info = await new EmbeddingCache(cacheDir).info();
  assert.equal(info.lowered.count, 1);
});

/** Mounts a tmpfs (needs root); null where that is not allowed. */
async function tmpfs(options: string): Promise<{ dir: string; done: () => Promise<void> } | null> {
  const mount = path.join(dir, `mnt-${n++}`);
  await mkdir(mount);
  try {
    await run('mount', ['-t', 'tmpfs', '-o', options, 'tmpfs', mount]);
  } catch {
    return null;
  }
  return { dir: mount, done: async () => void (await run('umount', [mount])) };
}

test('a full disk (ENOSPC on an 8 KiB tmpfs): one warning, no temp files left', async (t) => {
  // Two pages: the lowered model and namespace.json fit, the pack's first write does not.
  const fs = await tmpfs('size=8k');
  if (!fs) return t.skip('cannot mount a tmpfs here (needs root)');
  try {
    await expectOneWarning(fs.dir, /\.pack: cannot write \(ENOSPC/);
    assert.deepEqual(await filesUnder(fs.dir, '.tmp'), []);
    const info = await new EmbeddingCache(fs.dir).info();
    assert.equal(info.lowered.count, 1);
    assert.equal(info.entries, 0);
    assert.equal(info.temp.count, 0);
  } finally {
    await fs.done();
  }
});

test('a read-only cache (a read-only mount; root ignores chmod): one warning', async (t) => {
  const fs = await tmpfs('ro,size=64k');
  if (!fs) return t.skip('cannot mount a tmpfs here (needs root)');
  try {
    // Node's recursive mkdir reports a read-only parent as ENOENT.
    await expectOneWarning(fs.dir, /cannot write \((EROFS|ENOENT)/);
  } finally {
    await fs.done();
  }
});

test('a warm cache on a read-only mount is read without a warning', async (t) => {
  const fs = await tmpfs('size=1m');
  if (!fs) return t.skip('cannot mount a tmpfs here (needs root)');
  try {
    await trainWith(fs.dir);
    await run('mount', ['-o', 'remount,ro', fs.dir]);
    const summary = await trainWith(fs.dir);
    assert.deepEqual(summary.warnings, reference.warnings);
    assert.equal(summary.cachedEmbeddings, 24);
    assert.deepEqual(summary.val, reference.val);
  } finally {
    await fs.done();
  }
});

test('EmbeddingCache without onFailure throws cache failures as internal errors (exit 1)', async () => {
  const file = path.join(dir, 'strict-file');
  await writeFile(file, 'x');
  const cache = new EmbeddingCache(file);
  const ns = {
    backboneId: 'b',
    weightsHash: 'w',
    layer: 'features',
    inputSize: 32,
    preprocessing: 'p',
    view: 'plain',
  };
  const key = cache.key(new Uint8Array([1]));
  assert.equal(await cache.get(ns, key, 4), null);
  await assert.rejects(cache.put(ns, key, new Float32Array(4)), (err: unknown) => {
    assert.ok(err instanceof Error && 'exitCode' in err);
    assert.equal(err.exitCode, 1);
    assert.match(err.message, /strict-file.*: cannot write \(ENOTDIR/);
    return true;
  });
  // With onFailure: reported, and later writes are skipped rather than failing again.
  const failures: string[] = [];
  const tolerant = new EmbeddingCache(file, { onFailure: (f) => failures.push(f.kind) });
  await tolerant.put(ns, key, new Float32Array(4));
  await tolerant.put(ns, tolerant.key(new Uint8Array([2])), new Float32Array(4));
  await tolerant.putLowered(
    { backboneId: 'b', weightsHash: 'w', cut: null, lowering: 1 },
    new Uint8Array(8),
  );
  assert.deepEqual(failures, ['write']);
});

test('info counts temp files under onnx/ too; clear removes the stale ones', async () => {
  const cacheDir = path.join(dir, 'tmp-count');
  const cache = new EmbeddingCache(cacheDir);
  await cache.putLowered(
    { backboneId: 'b', weightsHash: 'w', cut: null, lowering: 1 },
    new Uint8Array(8),
  );
  const stale = path.join(cacheDir, 'onnx', 'x.lowered.1.0.abc.tmp');
  const fresh = path.join(cacheDir, 'onnx', 'y.lowered.1.0.abd.tmp');
  await writeFile(stale, 'abc');
  await writeFile(fresh, 'de');
  const old = new Date(Date.now() - 10 * 60 * 1000);
  await utimes(stale, old, old);
  const info = await cache.info();
  assert.equal(info.lowered.count, 1);
  assert.deepEqual(info.temp, { count: 2, bytes: 5 });
  const cleared = await cache.clear({ backbone: 'none' });
  assert.equal(cleared.temp, 1);
  assert.equal(cleared.lowered, 0);
  assert.deepEqual((await cache.info()).temp, { count: 1, bytes: 2 });
});

test('the fine-tune stage (prefix activations, lowered prefix) with a broken cache: one warning', async () => {
  const file = path.join(dir, 'finetune-cache-file');
  await writeFile(file, 'not a folder');
  const options = {
    data,
    backbone,
    engine: 'onnx' as const,
    epochs: 2,
    finetuneEpochs: 1,
    unfreeze: 'from:dw1',
    augment: 'flip',
    seed: 3,
  };
  const ref = await train({ ...options, out: path.join(dir, `run-${n++}`), cache: false });
  const tensors = tf.memory().numTensors;
  const summary = await train({ ...options, out: path.join(dir, `run-${n++}`), cacheDir: file });
  assert.equal(tf.memory().numTensors, tensors);
  const cacheWarnings = summary.warnings.filter((w) => w.startsWith('cache: '));
  assert.equal(cacheWarnings.length, 1, cacheWarnings.join('\n'));
  assert.deepEqual(summary.stages, ref.stages);
});
