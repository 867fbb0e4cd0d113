import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdir, mkdtemp, readdir, readFile, rm, stat, utimes, writeFile } from 'node:fs/promises';
import { homedir, tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import {
  type CacheNamespace,
  defaultCacheDir,
  EmbeddingCache,
  type LoweredModelKey,
} from '../../src/data/cache.js';
import { FinetuneError } from '../../src/errors.js';

const NS: CacheNamespace = {
  backboneId: 'mobilenet-v2',
  weightsHash: 'abc123',
  layer: 'features',
  inputSize: 224,
  preprocessing: 'cover-bilinear;[-1,1]',
  view: 'plain',
};
const LOWERED: LoweredModelKey = {
  backboneId: 'mobilenet-v2',
  weightsHash: 'abc123',
  cut: null,
  lowering: 1,
};
const DAY = 24 * 60 * 60 * 1000;

let root: string;
let n = 0;
/** A fresh cache folder per test, all under one temp root. */
const fresh = () => new EmbeddingCache(path.join(root, `c${n++}`));

function values(seed: number, length = 64): Float32Array {
  return Float32Array.from({ length }, (_, i) => Math.sin(seed * 1000 + i) * 10);
}

before(async () => {
  root = await mkdtemp(path.join(tmpdir(), 'finetune-cache-'));
});
after(async () => {
  await rm(root, { recursive: true, force: true });
});

describe('EmbeddingCache', () => {
  test('miss, then hit with the exact values; the namespace folder is described', async () => {
    const cache = fresh();
    const key = cache.key(new Uint8Array([1, 2, 3]));
    assert.match(key, /^[0-9a-f]{64}$/);
    assert.equal(await cache.get(NS, key, 64), null);
    const v = values(1);
    await cache.put(NS, key, v);
    assert.deepEqual(await cache.get(NS, key, 64), v);
    const id = cache.namespaceId(NS);
    assert.match(id, /^[0-9a-f]{32}$/);
    assert.equal(
      cache.entryPath(NS, key),
      path.join(cache.dir, 'embeddings', id, key.slice(0, 2), `${key}.bin`),
    );
    const meta = JSON.parse(
      await readFile(path.join(cache.dir, 'embeddings', id, 'namespace.json'), 'utf8'),
    );
    assert.equal(meta.backboneId, NS.backboneId);
    assert.equal(meta.inputSize, 224);
    assert.equal(typeof meta.createdAt, 'string');
    // Same fields in another order → same namespace.
    const reordered = Object.fromEntries(Object.entries(NS).reverse()) as unknown as CacheNamespace;
    assert.equal(cache.namespaceId(reordered), id);
  });

  test('any namespace field change misses', async () => {
    const cache = fresh();
    const key = cache.key(new Uint8Array([9]));
    await cache.put(NS, key, values(2));
    const others: Partial<CacheNamespace>[] = [
      { backboneId: 'efficientnet-b0' },
      { weightsHash: 'def456' },
      { inputSize: 192 },
      { layer: 'block_13_expand_relu' },
      { preprocessing: 'squash-bilinear;[0,1]' },
      { view: 'flip' },
    ];
    const ids = new Set([cache.namespaceId(NS)]);
    for (const change of others) {
      const ns = { ...NS, ...change };
      ids.add(cache.namespaceId(ns));
      assert.equal(await cache.get(ns, key, 64), null, JSON.stringify(change));
    }
    assert.equal(ids.size, others.length + 1);
    assert.ok(await cache.get(NS, key, 64));
  });

  test('changed image bytes give another key and miss', async () => {
    const cache = fresh();
    const bytes = new Uint8Array(1000).fill(7);
    const key = cache.key(bytes);
    await cache.put(NS, key, values(3));
    bytes[500] = 8;
    const changed = cache.key(bytes);
    assert.notEqual(changed, key);
    assert.equal(await cache.get(NS, changed, 64), null);
    assert.ok(await cache.get(NS, key, 64));
  });

  test('a damaged entry is a miss, is deleted, and is rewritten by put', async () => {
    const cache = fresh();
    const key = cache.key(new Uint8Array([4, 4]));
    const v = values(4);
    const file = cache.entryPath(NS, key);
    const damage: [string, (b: Buffer) => Buffer][] = [
      [
        'flipped payload byte',
        (b) => {
          b[40] = b[40]! ^ 0xff;
          return b;
        },
      ],
      ['truncated', (b) => b.subarray(0, b.length - 6)],
      ['truncated header', (b) => b.subarray(0, 10)],
      [
        'wrong magic',
        (b) => {
          b.write('XXXX', 0);
          return b;
        },
      ],
      [
        'wrong version',
        (b) => {
          b.writeUInt32LE(2, 4);
          return b;
        },
      ],
      ['empty', () => Buffer.alloc(0)],
    ];
    for (const [label, hurt] of damage) {
      await cache.put(NS, key, v);
      await writeFile(file, hurt(await readFile(file)));
      assert.equal(await cache.get(NS, key, 64), null, label);
      await assert.rejects(stat(file), { code: 'ENOENT' }, `${label}: not deleted`);
      await cache.put(NS, key, v);
      assert.deepEqual(await cache.get(NS, key, 64), v, label);
    }
    // Asking for another length is a mismatch too (e.g. a different head input width).
    assert.equal(await cache.get(NS, key, 65), null);
    assert.equal(await cache.get(NS, key, 64), null);
  });

  test('bad keys and values are rejected with the project wording', async () => {
    const cache = fresh();
    assert.throws(() => cache.entryPath(NS, '../../etc/passwd'), {
      message: /^Expected a sha256 hex digest .* for key but received '\.\.\/\.\.\/etc\/passwd'$/,
    });
    await assert.rejects(
      cache.put(NS, 'a'.repeat(64), [1, 2] as unknown as Float32Array),
      FinetuneError,
    );
    assert.throws(() => cache.namespaceId({ ...NS, inputSize: 0 }), {
      message: 'Expected a positive integer for namespace.inputSize but received 0',
    });
  });

  test('info counts entries and bytes per namespace, and *.tmp files apart', async () => {
    const cache = fresh();
    assert.deepEqual(await cache.info(), {
      dir: cache.dir,
      entries: 0,
      bytes: 0,
      namespaces: [],
      lowered: { count: 0, bytes: 0, models: [] },
      temp: { count: 0, bytes: 0 },
    });
    const flip = { ...NS, view: 'flip' };
    const other = { ...NS, backboneId: 'efficientnet-b0', inputSize: 240 };
    for (let i = 0; i < 5; i++) await cache.put(NS, cache.key(new Uint8Array([i])), values(i));
    for (let i = 0; i < 3; i++) await cache.put(flip, cache.key(new Uint8Array([i])), values(i));
    await cache.put(other, cache.key(new Uint8Array([0])), values(0, 128));
    // A killed writer's leftover.
    const key = cache.key(new Uint8Array([0]));
    await writeFile(`${cache.entryPath(NS, key)}.999.abcdef.tmp`, 'half');
    const info = await cache.info();
    const entrySize = 20 + 64 * 4;
    assert.equal(info.entries, 9);
    assert.equal(info.bytes, 8 * entrySize + (20 + 128 * 4));
    assert.deepEqual(info.temp, { count: 1, bytes: 4 });
    assert.deepEqual(
      info.namespaces.map((x) => [x.backboneId, x.view, x.inputSize, x.entries, x.bytes]),
      [
        ['efficientnet-b0', 'plain', 240, 1, 20 + 128 * 4],
        ['mobilenet-v2', 'flip', 224, 3, 3 * entrySize],
        ['mobilenet-v2', 'plain', 224, 5, 5 * entrySize],
      ],
    );
    const plain = info.namespaces.find((x) => x.id === cache.namespaceId(NS))!;
    assert.equal(plain.layer, 'features');
    assert.ok(Math.abs(Date.parse(plain.lastUsed!) - Date.now()) < 60_000);
  });

  test('clear by backbone removes only that backbone and its folders', async () => {
    const cache = fresh();
    const other = { ...NS, backboneId: 'efficientnet-b0' };
    for (let i = 0; i < 4; i++) {
      await cache.put(NS, cache.key(new Uint8Array([i])), values(i));
      await cache.put(other, cache.key(new Uint8Array([i])), values(i));
    }
    assert.deepEqual(await cache.clear({ backbone: 'efficientnet-b0' }), {
      removed: 4,
      lowered: 0,
      temp: 0,
      bytes: 4 * (20 + 64 * 4),
    });
    const ids = await readdir(path.join(cache.dir, 'embeddings'));
    assert.deepEqual(ids, [cache.namespaceId(NS)]);
    assert.equal((await cache.info()).entries, 4);
    assert.deepEqual(await cache.clear({ backbone: 'no-such' }), {
      removed: 0,
      lowered: 0,
      temp: 0,
      bytes: 0,
    });
    // A put after clear recreates the folder and its namespace.json.
    await cache.put(other, cache.key(new Uint8Array([0])), values(0));
    const info = await cache.info();
    assert.deepEqual(info.namespaces.map((x) => x.backboneId).sort(), [
      'efficientnet-b0',
      'mobilenet-v2',
    ]);
    assert.deepEqual(await cache.clear(), {
      removed: 5,
      lowered: 0,
      temp: 0,
      bytes: 5 * (20 + 64 * 4),
    });
    assert.deepEqual(await readdir(path.join(cache.dir, 'embeddings')), []);
  });

  test('clear --older-than uses last use (mtime); get refreshes it; old *.tmp are removed', async () => {
    const cache = fresh();
    const keys = [0, 1, 2, 3].map((i) => cache.key(new Uint8Array([i])));
    for (const [i, k] of keys.entries()) await cache.put(NS, k, values(i));
    const old = new Date(Date.now() - 40 * DAY);
    for (const k of keys.slice(0, 3)) await utimes(cache.entryPath(NS, k), old, old);
    // Reading entry 2 marks it used now.
    assert.ok(await cache.get(NS, keys[2]!, 64));
    const stray = `${cache.entryPath(NS, keys[3]!)}.123.0a0b0c.tmp`;
    const fresher = `${cache.entryPath(NS, keys[3]!)}.124.0a0b0d.tmp`;
    await writeFile(stray, 'x'.repeat(10));
    await writeFile(fresher, 'y');
    await utimes(stray, old, old);
    assert.deepEqual(await cache.clear({ olderThanMs: 30 * DAY }), {
      removed: 2,
      lowered: 0,
      temp: 1,
      bytes: 2 * (20 + 64 * 4) + 10,
    });
    assert.equal(await cache.get(NS, keys[0]!, 64), null);
    assert.equal(await cache.get(NS, keys[1]!, 64), null);
    assert.ok(await cache.get(NS, keys[2]!, 64));
    assert.ok(await cache.get(NS, keys[3]!, 64));
    await assert.rejects(stat(stray), { code: 'ENOENT' });
    await stat(fresher); // may belong to a running writer
    assert.equal((await cache.info()).entries, 2);
  });

  test('lowered models: stored under their key, a damaged copy is a deleted miss', async () => {
    const cache = fresh();
    const model = Uint8Array.from({ length: 3000 }, (_, i) => (i * 7) % 256);
    assert.equal(await cache.getLowered(LOWERED), null);
    await cache.putLowered(LOWERED, model);
    assert.deepEqual(await cache.getLowered(LOWERED), model);
    // Every key field matters.
    for (const other of [
      { ...LOWERED, backboneId: 'b' },
      { ...LOWERED, weightsHash: 'def' },
      { ...LOWERED, cut: 'block_3_add' },
      { ...LOWERED, lowering: 2 },
    ]) {
      assert.notEqual(cache.loweredPath(other), cache.loweredPath(LOWERED));
      assert.equal(await cache.getLowered(other), null);
    }
    const file = cache.loweredPath(LOWERED);
    assert.equal(path.dirname(file), path.join(cache.dir, 'onnx'));
    const good = await readFile(file);
    // One flipped byte in the model, a truncated file, a wrong magic: each a miss, each deleted.
    for (const bad of [
      Buffer.concat([good.subarray(0, good.length - 1), Buffer.from([good.at(-1)! ^ 1])]),
      good.subarray(0, 40),
      Buffer.concat([Buffer.from('XXXX'), good.subarray(4)]),
    ]) {
      await writeFile(file, bad);
      assert.equal(await cache.getLowered(LOWERED), null);
      await assert.rejects(stat(file), { code: 'ENOENT' });
    }
    await cache.putLowered(LOWERED, model);
    assert.deepEqual(await cache.getLowered(LOWERED), model);
    assert.throws(() => cache.loweredPath({ ...LOWERED, cut: '' }), {
      message: "Expected a non-empty string for lowered key.cut but received ''",
    });
    await assert.rejects(cache.putLowered(LOWERED, [1, 2] as unknown as Uint8Array), {
      message: 'Expected a Uint8Array for model but received [1, 2]',
    });
  });

  test('info counts lowered models; clear removes them by backbone, age, or all', async () => {
    const cache = fresh();
    const body = LOWERED;
    const prefix = { ...LOWERED, cut: 'block_15_add' };
    const other = { ...LOWERED, backboneId: 'tiny' };
    await cache.putLowered(body, new Uint8Array(1000));
    await cache.putLowered(prefix, new Uint8Array(500));
    await cache.putLowered(other, new Uint8Array(200));
    await cache.put(NS, cache.key(new Uint8Array([0])), values(0));
    // The first lowering cache's files (no header, no checksum) are counted and cleared too.
    const legacy = path.join(cache.dir, 'onnx', `${'a'.repeat(64)}-lowering1.onnx`);
    await writeFile(legacy, 'x'.repeat(50));
    const size = async (k: LoweredModelKey) => (await stat(cache.loweredPath(k))).size;
    const [sb, sp, so] = [await size(body), await size(prefix), await size(other)];
    assert.ok(sb > 1000 && sp > 500 && so > 200);
    const info = await cache.info();
    assert.equal(info.entries, 1);
    assert.equal(info.lowered.count, 4);
    assert.equal(info.lowered.bytes, sb + sp + so + 50);
    assert.deepEqual(
      info.lowered.models.map((m) => [m.backboneId, m.cut, m.lowering, m.bytes]),
      [
        ['mobilenet-v2', null, 1, sb],
        ['mobilenet-v2', 'block_15_add', 1, sp],
        ['tiny', null, 1, so],
        ['unknown', null, 0, 50],
      ],
    );
    assert.deepEqual(await cache.clear({ backbone: 'tiny' }), {
      removed: 0,
      lowered: 1,
      temp: 0,
      bytes: so,
    });
    const old = new Date(Date.now() - 40 * DAY);
    await utimes(cache.loweredPath(prefix), old, old);
    assert.deepEqual(await cache.clear({ olderThanMs: 30 * DAY }), {
      removed: 0,
      lowered: 1,
      temp: 0,
      bytes: sp,
    });
    assert.ok(await cache.getLowered(body));
    assert.equal(await cache.getLowered(prefix), null);
    assert.deepEqual(await cache.clear(), {
      removed: 1,
      lowered: 2,
      temp: 0,
      bytes: 20 + 64 * 4 + sb + 50,
    });
    assert.deepEqual(await readdir(cache.dir), ['embeddings']);
  });

  test('two processes writing while this one reads never expose a partial entry', async () => {
    const cache = fresh();
    const length = 16384; // 64 KB entries, so a non-atomic write would be caught mid-way
    const module = new URL('../../src/data/cache.js', import.meta.url).href;
    // Shared keys 0..9 (both writers, same values: content-addressed), own keys per writer.
    const script = `
      const { EmbeddingCache } = await import(${JSON.stringify(module)});
      const [dir, writer, length] = process.argv.slice(1);
      const cache = new EmbeddingCache(dir);
      const ns = JSON.parse(process.env.NS);
      const val = (seed) => Float32Array.from({ length: +length }, (_, i) => Math.sin(seed * 1000 + i) * 10);
      for (let i = 0; i < 200; i++) {
        const seed = (i % 2 ? 0 : 100 * (+writer + 1)) + ((i >> 1) % 10);
        await cache.put(ns, cache.key(new Uint8Array([seed & 255, seed >> 8])), val(seed));
      }`;
    const seeds = [
      ...Array.from({ length: 10 }, (_, i) => i),
      ...Array.from({ length: 10 }, (_, i) => 100 + i),
      ...Array.from({ length: 10 }, (_, i) => 200 + i),
    ];
    const expected = new Map(
      seeds.map((s) => [cache.key(new Uint8Array([s & 255, s >> 8])), values(s, length)]),
    );
    const children = [0, 1].map(
      (w) =>
        new Promise<number | null>((resolve, reject) => {
          const child = spawn(
            process.execPath,
            ['--input-type=module', '-e', script, cache.dir, String(w), String(length)],
            {
              env: { ...process.env, NS: JSON.stringify(NS) },
              stdio: ['ignore', 'ignore', 'pipe'],
            },
          );
          let err = '';
          child.stderr.on('data', (d) => {
            err += d;
          });
          child.on('error', reject);
          child.on('exit', (code) => (code === 0 ? resolve(code) : reject(new Error(err))));
        }),
    );
    let running = true;
    const done = Promise.all(children).finally(() => {
      running = false;
    });
    let reads = 0;
    let hits = 0;
    // With rename-into-place an entry, once visible, stays complete: a later miss would mean
    // a torn read that get() caught by its checksum and deleted.
    const seen = new Set<string>();
    while (running) {
      for (const [key, want] of expected) {
        const got = await cache.get(NS, key, length);
        reads++;
        if (got) {
          hits++;
          seen.add(key);
          assert.deepEqual(got, want);
        } else {
          assert.ok(!seen.has(key), `entry ${key.slice(0, 8)} vanished after a hit`);
        }
      }
    }
    await done;
    for (const [key, want] of expected) assert.deepEqual(await cache.get(NS, key, length), want);
    assert.ok(reads > 0 && hits > 0, `reads ${reads}, hits ${hits}`);
    const info = await cache.info();
    assert.equal(info.entries, 30);
    assert.equal(info.namespaces.length, 1);
    // No temp files left behind by writers that finished.
    const shards = await readdir(path.join(cache.dir, 'embeddings', cache.namespaceId(NS)));
    for (const s of shards) {
      if (s === 'namespace.json') continue;
      for (const f of await readdir(path.join(cache.dir, 'embeddings', cache.namespaceId(NS), s))) {
        assert.ok(f.endsWith('.bin'), f);
      }
    }
  });
});

describe('defaultCacheDir', () => {
  const saved = process.env['XDG_CACHE_HOME'];
  after(() => {
    if (saved === undefined) delete process.env['XDG_CACHE_HOME'];
    else process.env['XDG_CACHE_HOME'] = saved;
  });

  test('honours an absolute XDG_CACHE_HOME, ignores a relative one', async () => {
    const xdg = path.join(root, 'xdg');
    await mkdir(xdg, { recursive: true });
    process.env['XDG_CACHE_HOME'] = xdg;
    assert.equal(defaultCacheDir(), path.join(xdg, 'tfjs-finetune'));
    process.env['XDG_CACHE_HOME'] = 'relative/cache';
    assert.equal(defaultCacheDir(), path.join(homedir(), '.cache', 'tfjs-finetune'));
    delete process.env['XDG_CACHE_HOME'];
    assert.equal(defaultCacheDir(), path.join(homedir(), '.cache', 'tfjs-finetune'));
  });
});
