import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { constants, readFileSync } from 'node:fs';
import { mkdir, open, symlink, writeFile } from 'node:fs/promises';
import { createServer, type Server } from 'node:net';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import type { EmbeddingCache } from '../../src/data/cache.js';
import { DEFAULT_MAX_BYTES, decodeImage, readImageFile } from '../../src/data/decode.js';
import { embedFiles } from '../../src/data/embed.js';
import { listFiles, scanClassFolders } from '../../src/data/scan.js';
import type { FrozenModel } from '../../src/engine/types.js';
import { tempDir, writeImage } from '../helpers.js';

// A regression here reads /dev/zero until memory runs out or waits on a FIFO forever: the
// timeout turns that into a failure, and `after` opens every FIFO's write end so that a
// reader stuck in open() returns and the process can exit.
const GUARD = { timeout: 60_000 };
const posix = process.platform !== 'win32';

let dir: string;
let cleanup: () => Promise<void>;
let socket: Server | null = null;
const fifos: string[] = [];
const f = (name: string): string => path.join(dir, name);

async function mkfifo(file: string): Promise<void> {
  await mkdir(path.dirname(file), { recursive: true });
  execFileSync('mkfifo', [file]);
  fifos.push(file);
}

before(async () => {
  ({ dir, cleanup } = await tempDir('hostile'));
  await writeImage(f('good.png'), [200, 30, 30]);
  await writeFile(f('1000.bin'), Buffer.alloc(1000, 7));
  if (!posix) return;
  await symlink('/dev/zero', f('zero.jpg'));
  await symlink('/dev/urandom', f('urandom.jpg'));
  await mkfifo(f('fifo.jpg'));
  await symlink(f('fifo.jpg'), f('fifo-link.jpg'));
  socket = createServer();
  await new Promise<void>((resolve) => socket!.listen(f('socket.jpg'), resolve));
});

after(async () => {
  for (const fifo of fifos) {
    try {
      const h = await open(fifo, constants.O_WRONLY | constants.O_NONBLOCK);
      await h.close();
    } catch {
      // no reader waiting: nothing to release
    }
  }
  await new Promise<void>((resolve) => (socket ? socket.close(() => resolve()) : resolve()));
  await cleanup();
});

describe('readImageFile and decodeImage', { skip: !posix && 'needs FIFOs and /dev' }, () => {
  const size = { width: 8, height: 8 };

  test('devices, FIFOs and sockets are refused from stat, never read', GUARD, async () => {
    const cases: [string, string][] = [
      ['zero.jpg', 'not a regular file (a character device)'],
      ['urandom.jpg', 'not a regular file (a character device)'],
      ['fifo.jpg', 'not a regular file (a FIFO)'],
      ['fifo-link.jpg', 'not a regular file (a FIFO)'],
      ['socket.jpg', 'not a regular file (a socket)'],
    ];
    for (const [name, reason] of cases) {
      assert.deepEqual(await readImageFile(f(name)), { ok: false, reason }, name);
      assert.deepEqual(await decodeImage(f(name), size), { ok: false, reason }, name);
    }
  });

  test('at most maxBytes are accepted, exactly maxBytes is fine', GUARD, async () => {
    assert.equal(DEFAULT_MAX_BYTES, 256 * 1024 * 1024);
    const exact = await readImageFile(f('1000.bin'), 1000);
    assert.ok(exact.ok && exact.bytes.length === 1000 && exact.bytes.every((b) => b === 7));
    assert.deepEqual(await readImageFile(f('1000.bin'), 999), {
      ok: false,
      reason: 'too large (more than 999 bytes)',
    });
    const png = await readImageFile(f('good.png'));
    assert.ok(png.ok);
    const small = { ...size, maxBytes: png.bytes.length - 1 };
    const tooLarge = `too large (more than ${png.bytes.length - 1} bytes)`;
    assert.deepEqual(await decodeImage(f('good.png'), small), { ok: false, reason: tooLarge });
    assert.deepEqual(await decodeImage(png.bytes, small), { ok: false, reason: tooLarge });
    assert.ok((await decodeImage(f('good.png'), { ...size, maxBytes: png.bytes.length })).ok);
    await assert.rejects(readImageFile(f('good.png'), 0), {
      message: 'Expected a positive integer for maxBytes but received 0',
    });
    await assert.rejects(decodeImage(f('good.png'), { ...size, maxBytes: 1.5 }), {
      message: 'Expected a positive integer for maxBytes but received 1.5',
    });
  });

  test('a file without a size in stat (procfs) is still capped while read', GUARD, async () => {
    // /proc files report size 0 but have content: the cap holds while reading.
    const r = await readImageFile('/proc/self/maps', 16);
    assert.deepEqual(r, { ok: false, reason: 'too large (more than 16 bytes)' });
  });
});

describe('scanning', { skip: !posix && 'needs FIFOs' }, () => {
  test(
    'a bare FIFO in a class folder is listed, so that it is skipped with a reason',
    GUARD,
    async () => {
      const data = f('data');
      await writeImage(path.join(data, 'a', '1.png'), [10, 200, 10]);
      await mkfifo(path.join(data, 'a', 'pipe'));
      await writeImage(path.join(data, 'b', '1.png'), [10, 10, 200]);
      assert.deepEqual(await listFiles(path.join(data, 'a')), [
        path.join(data, 'a', '1.png'),
        path.join(data, 'a', 'pipe'),
      ]);
      const scanned = await scanClassFolders(data);
      assert.deepEqual(scanned.files.get('a'), [
        path.join(data, 'a', '1.png'),
        path.join(data, 'a', 'pipe'),
      ]);
    },
  );
});

/** A real frozen model: the mean of each channel, as NHWC. Optionally slow or failing. */
function channelMeans(options: { delayMs?: number; failOnCall?: number } = {}) {
  const state = { calls: 0, active: 0 };
  const model: FrozenModel = {
    engine: 'tfjs',
    layout: 'nhwc',
    inputSize: 8,
    outputSize: 3,
    async run(batch, n) {
      const call = ++state.calls;
      state.active++;
      try {
        await sleep(options.delayMs ?? 0);
        if (call === options.failOnCall) throw new Error('ENOSPC: no space left on device');
        const out = new Float32Array(n * 3);
        const per = 8 * 8 * 3;
        for (let i = 0; i < n; i++) {
          for (let p = 0; p < per; p++) out[i * 3 + (p % 3)]! += batch[i * per + p]! / 64;
        }
        return out;
      } finally {
        state.active--;
      }
    },
    async dispose() {},
  };
  return { model, state };
}

describe('embedFiles', () => {
  let files: string[];
  const unhandled: unknown[] = [];
  const onUnhandled = (reason: unknown): void => {
    unhandled.push(reason);
  };
  before(async () => {
    files = [];
    for (let i = 0; i < 40; i++) {
      const file = f(`many/${String(i).padStart(2, '0')}.png`);
      await writeImage(file, [(i * 37) % 256, (i * 91) % 256, 128], { variant: i });
      files.push(file);
    }
    process.on('unhandledRejection', onUnhandled);
  });
  after(() => {
    process.off('unhandledRejection', onUnhandled);
  });

  test('hostile files are skipped with their reason; the rest is used', {
    ...GUARD,
    skip: !posix,
  }, async () => {
    const { model } = channelMeans();
    const list = [
      f('good.png'),
      f('zero.jpg'),
      f('urandom.jpg'),
      f('fifo.jpg'),
      f('fifo-link.jpg'),
      f('socket.jpg'),
      f('1000.bin'),
      f('missing.png'),
    ];
    const r = await embedFiles(list, model, { batchSize: 2, maxBytes: 999 });
    assert.deepEqual(r.rows, [0]);
    assert.deepEqual(
      r.skipped.map((s) => [path.basename(s.path), s.reason]),
      [
        ['zero.jpg', 'not a regular file (a character device)'],
        ['urandom.jpg', 'not a regular file (a character device)'],
        ['fifo.jpg', 'not a regular file (a FIFO)'],
        ['fifo-link.jpg', 'not a regular file (a FIFO)'],
        ['socket.jpg', 'not a regular file (a socket)'],
        ['1000.bin', 'too large (more than 999 bytes)'],
        ['missing.png', 'unreadable file (ENOENT)'],
      ],
    );
    await assert.rejects(embedFiles(list, model, { maxBytes: -1 }), {
      message: 'Expected a positive integer for maxBytes but received -1',
    });
  });

  test(
    'an engine failing mid-embedding: thrown after all work in flight settled, nothing unhandled',
    GUARD,
    async () => {
      const { model, state } = channelMeans({ delayMs: 15, failOnCall: 2 });
      let gets = 0;
      let activeGets = 0;
      // A slow cache lookup keeps reads in flight while the engine fails.
      const store = {
        async get() {
          gets++;
          activeGets++;
          await sleep(5);
          activeGets--;
          return null;
        },
        async putMany() {},
      } as unknown as EmbeddingCache;
      const cache = { store, namespace: {} as never };
      await assert.rejects(embedFiles(files, model, { batchSize: 4, cache }), (err: Error) => {
        assert.equal(err.message, 'ENOSPC: no space left on device');
        assert.equal(state.active, 0, 'engine calls still running');
        assert.equal(activeGets, 0, 'reads still running');
        return true;
      });
      assert.ok(gets < files.length, 'stopped early');
      await sleep(50);
      assert.deepEqual(unhandled, []);
    },
  );

  test(
    'a cache write failing (a full disk): every write settles first, nothing unhandled',
    GUARD,
    async () => {
      const { model } = channelMeans();
      let puts = 0;
      let activePuts = 0;
      const store = {
        async get() {
          return null;
        },
        async putMany() {
          const call = ++puts;
          activePuts++;
          try {
            await sleep(call === 2 ? 1 : 20);
            if (call === 2) throw new Error('ENOSPC: no space left on device, write');
          } finally {
            activePuts--;
          }
        },
      } as unknown as EmbeddingCache;
      const cache = { store, namespace: {} as never };
      await assert.rejects(embedFiles(files, model, { batchSize: 4, cache }), (err: Error) => {
        assert.equal(err.message, 'ENOSPC: no space left on device, write');
        assert.equal(activePuts, 0, 'cache writes still running');
        return true;
      });
      assert.ok(puts < files.length / 4, 'stopped early');
      await sleep(50);
      assert.deepEqual(unhandled, []);
    },
  );

  test(
    "two batches with the engine at once; a batch's cache write goes on while it runs the next",
    GUARD,
    async () => {
      const { model, state } = channelMeans({ delayMs: 10 });
      const events: string[] = [];
      let runs = 0;
      const run = model.run.bind(model);
      model.run = async (batch, n) => {
        events.push(`run ${state.calls + 1}`);
        const out = run(batch, n);
        runs = Math.max(runs, state.active);
        return out;
      };
      let writes = 0;
      let active = 0;
      let most = 0;
      const stored = new Map<string, number[]>();
      const store = {
        async get() {
          return null;
        },
        async putMany(_ns: unknown, rows: { key: string; values: Float32Array }[]) {
          const call = ++writes;
          active++;
          most = Math.max(most, active);
          // The rows are the caller's to reuse once this returns: copied before any await.
          for (const r of rows) stored.set(r.key, Array.from(r.values));
          await sleep(60);
          active--;
          events.push(`written ${call}`);
        },
      } as unknown as EmbeddingCache;
      const cache = { store, namespace: {} as never };
      const r = await embedFiles(files, model, { batchSize: 4, cache });
      assert.equal(r.rows.length, files.length);
      assert.equal(runs, 2, 'batches with the engine at once');
      assert.equal(writes, files.length / 4);
      assert.equal(active, 0, 'returned before its writes ended');
      assert.ok(events.indexOf('run 2') < events.indexOf('written 1'), events.join(', '));
      // A write per finished batch, and the next batch waits for all but the newest one.
      assert.ok(most >= 2 && most <= 3, `${most} writes at once: ${events.join(', ')}`);
      // What was stored for each file is its row of the result.
      for (const [i, file] of files.entries()) {
        const key = createHash('sha256').update(readFileSync(file)).digest('hex');
        assert.deepEqual(stored.get(key), Array.from(r.features.subarray(i * 3, i * 3 + 3)));
      }
    },
  );
});
