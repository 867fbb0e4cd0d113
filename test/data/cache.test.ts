import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import {
  mkdir,
  mkdtemp,
  readdir,
  readFile,
  rm,
  stat,
  truncate,
  utimes,
  writeFile,
} from 'node:fs/promises';
import { homedir, tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { setImmediate as yieldToLoop } from 'node:timers/promises';
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

/** A pack record's size: 48-byte header + the floats. */
const RECORD = 48 + 64 * 4;

/** The pack files of a namespace folder. */
async function packs(cache: EmbeddingCache, ns = NS): Promise<string[]> {
  const dir = path.join(cache.dir, 'embeddings', cache.namespaceId(ns));
  return (await readdir(dir)).filter((f) => f.endsWith('.pack')).map((f) => path.join(dir, f));
}

/** An entry file of the earlier format, written by hand from its documented layout. */
function legacyEntry(v: Float32Array): Buffer {
  const payload = Buffer.from(v.buffer, v.byteOffset, v.byteLength);
  const header = Buffer.alloc(20);
  header.write('TFEC', 0, 'latin1');
  header.writeUInt32LE(1, 4);
  header.writeUInt32LE(v.length, 8);
  createHash('sha256').update(payload).digest().copy(header, 12, 0, 8);
  return Buffer.concat([header, payload]);
}

before(async () => {
  root = await mkdtemp(path.join(tmpdir(), 'finetune-cache-'));
});
after(async () => {
  await rm(root, { recursive: true, force: true });
});

/** `b` with byte `at` inverted. */
function flip(b: Buffer, at: number): Buffer {
  b[at] = b[at]! ^ 0xff;
  return b;
}

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
    // One pack of this object's, beside namespace.json, with one record.
    const pack = cache.packPath(NS)!;
    assert.equal(path.dirname(pack), path.join(cache.dir, 'embeddings', id));
    assert.match(
      path.basename(pack),
      new RegExp(`^[0-9a-z]{9}-${process.pid}-0-[0-9a-f]{8}\\.pack$`),
    );
    assert.deepEqual((await readdir(path.dirname(pack))).sort(), [
      path.basename(pack),
      'namespace.json',
    ]);
    assert.equal((await stat(pack)).size, RECORD);
    // Another cache object (another process, later) finds it by scanning the pack.
    assert.deepEqual(await new EmbeddingCache(cache.dir).get(NS, key, 64), v);
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

  test('a damaged record is a miss, stored again by put; nothing after bad bytes is read', async () => {
    const key = new EmbeddingCache(root).key(new Uint8Array([4, 4]));
    const next = new EmbeddingCache(root).key(new Uint8Array([5, 5]));
    const v = values(4);
    const damage: [string, (b: Buffer) => Buffer][] = [
      ['flipped payload byte', (b) => flip(b, 60)],
      ['flipped key byte', (b) => flip(b, 10)],
      ['flipped checksum byte', (b) => flip(b, 44)],
      ['wrong magic', (b) => flip(b, 0)],
      [
        'a length past the end',
        (b) => {
          b.writeUInt32LE(65, 4);
          return b;
        },
      ],
      ['cut short in the payload', (b) => b.subarray(0, RECORD - 6)],
      ['cut short in the header', (b) => b.subarray(0, 10)],
      ['empty', () => Buffer.alloc(0)],
    ];
    for (const [label, hurt] of damage) {
      const writer = fresh();
      await writer.put(NS, key, v);
      const pack = writer.packPath(NS)!;
      await writeFile(pack, hurt(await readFile(pack)));
      const reader = new EmbeddingCache(writer.dir);
      assert.equal(await reader.get(NS, key, 64), null, label);
      await reader.put(NS, key, v);
      assert.deepEqual(await reader.get(NS, key, 64), v, label);
      // A later reader finds the good record in the second pack.
      assert.deepEqual(await new EmbeddingCache(writer.dir).get(NS, key, 64), v, label);
    }
    // A wrong magic stops the scan of its pack: the whole record after it is not read.
    const writer = fresh();
    await writer.putMany(NS, [
      { key, values: v },
      { key: next, values: values(5) },
    ]);
    const pack = writer.packPath(NS)!;
    assert.deepEqual(await new EmbeddingCache(writer.dir).get(NS, next, 64), values(5));
    await writeFile(pack, flip(await readFile(pack), 0));
    assert.equal(await new EmbeddingCache(writer.dir).get(NS, next, 64), null);
    // Asking for another length is a mismatch too (e.g. a different head input width).
    assert.equal(await writer.get(NS, key, 65), null);
  });

  test('a record cut short at the end (a killed writer) is skipped; earlier ones are read', async () => {
    const writer = fresh();
    const keys = [1, 2, 3].map((i) => writer.key(new Uint8Array([i])));
    for (const [i, k] of keys.entries()) await writer.put(NS, k, values(i));
    const pack = writer.packPath(NS)!;
    await truncate(pack, 3 * RECORD - 100);
    const reader = new EmbeddingCache(writer.dir);
    assert.deepEqual(await reader.get(NS, keys[0]!, 64), values(0));
    assert.deepEqual(await reader.get(NS, keys[1]!, 64), values(1));
    assert.equal(await reader.get(NS, keys[2]!, 64), null);
    assert.equal((await reader.info()).entries, 2);
  });

  test("another writer's records are found on a miss, at most a second after the last scan", async () => {
    const reader = fresh();
    const writer = new EmbeddingCache(reader.dir);
    const key = reader.key(new Uint8Array([7]));
    assert.equal(await reader.get(NS, key, 64), null); // indexes the (empty) namespace
    await writer.put(NS, key, values(7));
    assert.equal(await reader.get(NS, key, 64), null, 'scanned again within the second');
    await new Promise((r) => setTimeout(r, 1100));
    assert.deepEqual(await reader.get(NS, key, 64), values(7));
    // It goes on from where it stopped: a second record appended to the same pack.
    const more = reader.key(new Uint8Array([8]));
    await writer.put(NS, more, values(8));
    await new Promise((r) => setTimeout(r, 1100));
    assert.deepEqual(await reader.get(NS, more, 64), values(8));
    assert.equal((await packs(reader)).length, 1);
  });

  test('putMany stores a batch in one write at the end of the pack', async () => {
    const cache = fresh();
    const batch = [0, 1, 2, 3].map((i) => ({
      key: cache.key(new Uint8Array([i])),
      values: values(i),
    }));
    await cache.putMany(NS, batch.slice(0, 1));
    await cache.putMany(NS, batch.slice(1));
    await cache.putMany(NS, []);
    assert.equal((await stat(cache.packPath(NS)!)).size, 4 * RECORD);
    const reader = new EmbeddingCache(cache.dir);
    for (const { key, values: v } of batch) assert.deepEqual(await reader.get(NS, key, 64), v);
    await assert.rejects(cache.putMany(NS, [{ key: 'x', values: values(0) }]), {
      message: /^Expected a sha256 hex digest .* for key but received 'x'$/,
    });
    // Concurrent calls are written one after the other, each whole.
    const other = fresh();
    await Promise.all(batch.map((e) => other.putMany(NS, [e])));
    const again = new EmbeddingCache(other.dir);
    for (const { key, values: v } of batch) assert.deepEqual(await again.get(NS, key, 64), v);
  });

  test('entry files of the earlier format are still read; a damaged one is deleted', async () => {
    const cache = fresh();
    const key = cache.key(new Uint8Array([6]));
    const file = cache.entryPath(NS, key);
    assert.equal(
      file,
      path.join(cache.dir, 'embeddings', cache.namespaceId(NS), key.slice(0, 2), `${key}.bin`),
    );
    await mkdir(path.dirname(file), { recursive: true });
    await writeFile(file, legacyEntry(values(6)));
    assert.deepEqual(await new EmbeddingCache(cache.dir).get(NS, key, 64), values(6));
    const info = await cache.info();
    assert.equal(info.entries, 1);
    assert.equal(info.bytes, 20 + 64 * 4);
    await writeFile(file, flip(legacyEntry(values(6)), 40));
    assert.equal(await new EmbeddingCache(cache.dir).get(NS, key, 64), null);
    await assert.rejects(stat(file), { code: 'ENOENT' });
    // New entries go to a pack, never to entry files.
    await cache.put(NS, key, values(6));
    await assert.rejects(stat(file), { code: 'ENOENT' });
    assert.equal((await packs(cache)).length, 1);
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
    // A killed writer's leftover (of namespace.json).
    const nsDir = path.join(cache.dir, 'embeddings', cache.namespaceId(NS));
    await writeFile(path.join(nsDir, 'namespace.json.999.0.abcdef.tmp'), 'half');
    const info = await cache.info();
    assert.equal(info.entries, 9);
    assert.equal(info.bytes, 8 * RECORD + (48 + 128 * 4));
    assert.deepEqual(info.temp, { count: 1, bytes: 4 });
    assert.deepEqual(
      info.namespaces.map((x) => [x.backboneId, x.view, x.inputSize, x.entries, x.bytes]),
      [
        ['efficientnet-b0', 'plain', 240, 1, 48 + 128 * 4],
        ['mobilenet-v2', 'flip', 224, 3, 3 * RECORD],
        ['mobilenet-v2', 'plain', 224, 5, 5 * RECORD],
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
      bytes: 4 * RECORD,
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
      bytes: 5 * RECORD,
    });
    assert.deepEqual(await readdir(path.join(cache.dir, 'embeddings')), []);
  });

  test('clear --older-than removes packs by last use (mtime); a read refreshes it; old *.tmp too', async () => {
    const dir = path.join(root, `c${n++}`);
    const keys = [0, 1, 2, 3, 4].map((i) => new EmbeddingCache(dir).key(new Uint8Array([i])));
    // Three writers, three packs: keys 0–1, 2–3 and 4.
    const writers = [keys.slice(0, 2), keys.slice(2, 4), keys.slice(4)].map((ks) => {
      const w = new EmbeddingCache(dir);
      return { w, ks };
    });
    for (const { w, ks } of writers)
      for (const k of ks) await w.put(NS, k, values(keys.indexOf(k)));
    const [first, second] = writers.map(({ w }) => w.packPath(NS)!);
    const old = new Date(Date.now() - 40 * DAY);
    await utimes(first!, old, old);
    await utimes(second!, old, old);
    // Reading key 2 marks its whole pack used now.
    assert.ok(await new EmbeddingCache(dir).get(NS, keys[2]!, 64));
    assert.ok(Date.now() - (await stat(second!)).mtimeMs < 60_000);
    const nsDir = path.dirname(first!);
    const stray = path.join(nsDir, 'namespace.json.123.0.0a0b0c.tmp');
    const fresher = path.join(nsDir, 'namespace.json.124.0.0a0b0d.tmp');
    await writeFile(stray, 'x'.repeat(10));
    await writeFile(fresher, 'y');
    await utimes(stray, old, old);
    const cache = new EmbeddingCache(dir);
    assert.deepEqual(await cache.clear({ olderThanMs: 30 * DAY }), {
      removed: 2,
      lowered: 0,
      temp: 1,
      bytes: 2 * RECORD + 10,
    });
    assert.equal(await cache.get(NS, keys[0]!, 64), null);
    assert.equal(await cache.get(NS, keys[1]!, 64), null);
    for (const k of keys.slice(2)) assert.ok(await cache.get(NS, k, 64));
    await assert.rejects(stat(stray), { code: 'ENOENT' });
    await stat(fresher); // may belong to a running writer
    assert.equal((await cache.info()).entries, 3);
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
      bytes: RECORD + sb + 50,
    });
    assert.deepEqual(await readdir(cache.dir), ['embeddings']);
  });

  test('two processes appending while this one reads never expose a partial record', async () => {
    const cache = fresh();
    const length = 16384; // 64 KB records, so a read would catch one mid-write
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
    // A pack only grows by whole records: a record, once read, stays readable. Each round
    // is a fresh reader, so each scans the packs as they are being appended to.
    const seen = new Set<string>();
    while (running) {
      const reader = new EmbeddingCache(cache.dir);
      for (const [key, want] of expected) {
        const got = await reader.get(NS, key, length);
        reads++;
        if (got) {
          hits++;
          seen.add(key);
          assert.deepEqual(got, want);
        } else {
          assert.ok(!seen.has(key), `entry ${key.slice(0, 8)} vanished after a hit`);
        }
      }
      await yieldToLoop(); // the reads are synchronous: let the children's exits through
    }
    await done;
    const reader = new EmbeddingCache(cache.dir);
    for (const [key, want] of expected) assert.deepEqual(await reader.get(NS, key, length), want);
    assert.ok(reads > 0 && hits > 0, `reads ${reads}, hits ${hits}`);
    const info = await cache.info();
    assert.equal(info.entries, 400); // one record a put, the shared keys twice
    assert.equal(info.namespaces.length, 1);
    assert.equal(info.temp.count, 0);
    // One pack per writer beside namespace.json.
    const files = await readdir(path.join(cache.dir, 'embeddings', cache.namespaceId(NS)));
    assert.equal(files.filter((f) => f.endsWith('.pack')).length, 2);
    assert.deepEqual(
      files.filter((f) => !f.endsWith('.pack')),
      ['namespace.json'],
    );
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
