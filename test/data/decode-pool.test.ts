import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { writeFile } from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { promisify } from 'node:util';
import sharp from 'sharp';
import { decodeImage, toModelInput } from '../../src/data/decode.js';
import { DecodePool } from '../../src/data/decode-pool.js';
import { embedFiles } from '../../src/data/embed.js';
import type { FrozenModel } from '../../src/engine/types.js';
import { ROOT, tempDir } from '../helpers.js';

const GUARD = { timeout: 60_000 };
const RAW = { mean: [0, 0, 0], std: [1 / 255, 1 / 255, 1 / 255] };
const SIZE = 24;

let dir: string;
let cleanup: () => Promise<void>;
let files: string[];

/** Noisy images of several sizes and formats (alpha, greyscale, JPEG), so rounding matters. */
async function writeNoise(file: string, i: number): Promise<void> {
  const width = [5, 24, 61, 130, 24, 300][i % 6]!;
  const height = [7, 24, 40, 97, 3, 211][i % 6]!;
  const channels = i % 4 === 1 ? 4 : 3;
  let img = sharp({
    create: {
      width,
      height,
      channels,
      background: { r: (i * 53) % 256, g: (i * 97) % 256, b: 90, alpha: 0.6 },
      noise: { type: 'gaussian', mean: 128, sigma: 70 },
    },
  });
  if (i % 7 === 3) img = img.greyscale();
  await writeFile(file, await (i % 3 === 2 ? img.jpeg() : img.png()).toBuffer());
}

/** A frozen model whose output row is its input: features equal means inputs equal. */
function echo(layout: 'nhwc' | 'nchw'): FrozenModel {
  const per = 3 * SIZE * SIZE;
  return {
    engine: 'onnx',
    layout,
    inputSize: SIZE,
    outputSize: per,
    async run(batch, n) {
      return batch.slice(0, n * per);
    },
    async dispose() {},
  };
}

before(async () => {
  ({ dir, cleanup } = await tempDir('decode-pool'));
  files = [];
  for (let i = 0; i < 30; i++) {
    const file = path.join(dir, `${String(i).padStart(2, '0')}.img`);
    if (i === 11) await writeFile(file, 'not an image at all');
    else if (i === 19) {
      // A JPEG cut in half: sharp refuses it ('truncated').
      await writeNoise(file, 2);
      const bytes = await sharp(file).jpeg().toBuffer();
      await writeFile(file, bytes.subarray(0, bytes.length >> 1));
    } else await writeNoise(file, i);
    files.push(file);
  }
});

after(() => cleanup());

describe('embedFiles with decode workers', () => {
  for (const layout of ['nchw', 'nhwc'] as const) {
    test(
      `the same features bit for bit as on the calling thread (${layout}); bad files skipped`,
      GUARD,
      async () => {
        // The reason's tail is libvips's message, which varies between calls ("Unknown error").
        const skipped = (r: { skipped: readonly { path: string; reason: string }[] }) =>
          r.skipped.map((s) => [path.basename(s.path), s.reason.split(':')[0]]);
        const single = await embedFiles(files, echo(layout), { batchSize: 4, decodeWorkers: 0 });
        assert.deepEqual(skipped(single), [
          ['11.img', 'not an image (unrecognised content)'],
          ['19.img', 'corrupt or truncated jpeg'],
        ]);
        for (const decodeWorkers of [1, 2]) {
          const pooled = await embedFiles(files, echo(layout), {
            batchSize: 4,
            concurrency: 3,
            decodeWorkers,
          });
          assert.deepEqual(pooled.rows, single.rows);
          assert.deepEqual(skipped(pooled), skipped(single));
          assert.equal(
            Buffer.compare(
              Buffer.from(
                pooled.features.buffer,
                pooled.features.byteOffset,
                pooled.features.byteLength,
              ),
              Buffer.from(
                single.features.buffer,
                single.features.byteOffset,
                single.features.byteLength,
              ),
            ),
            0,
            `${decodeWorkers} workers: features differ`,
          );
        }
      },
    );
  }

  test(
    'an engine failing while workers decode: thrown after everything settled',
    GUARD,
    async () => {
      let active = 0;
      const unhandled: unknown[] = [];
      const onUnhandled = (reason: unknown): void => {
        unhandled.push(reason);
      };
      process.on('unhandledRejection', onUnhandled);
      try {
        const model: FrozenModel = {
          ...echo('nchw'),
          async run() {
            active++;
            await sleep(10);
            active--;
            throw new Error('the engine broke');
          },
        };
        await assert.rejects(embedFiles(files, model, { batchSize: 2, decodeWorkers: 1 }), {
          message: 'the engine broke',
        });
        assert.equal(active, 0);
        await sleep(50);
        assert.deepEqual(unhandled, []);
      } finally {
        process.off('unhandledRejection', onUnhandled);
      }
    },
  );

  test('the workers end with the call: a process that embeds exits by itself', GUARD, async () => {
    const script = `
      import { embedFiles } from ${JSON.stringify(path.join(ROOT, 'dist', 'src', 'data', 'embed.js'))};
      const files = ${JSON.stringify(files.slice(0, 6))};
      const model = { engine: 'onnx', layout: 'nchw', inputSize: 8, outputSize: 1,
        async run(batch, n) { return new Float32Array(n); }, async dispose() {} };
      const r = await embedFiles(files, model, { batchSize: 2, decodeWorkers: 2 });
      console.log(r.rows.length);`;
    const { stdout } = await promisify(execFile)(
      process.execPath,
      ['--input-type=module', '-e', script],
      { timeout: 30_000 },
    );
    assert.equal(stdout.trim(), '6');
  });
});

describe('DecodePool', () => {
  test('writes what decodeImage + toModelInput give; reasons for bad files', GUARD, async () => {
    const pool = DecodePool.start(1);
    try {
      const target = new Float32Array(new SharedArrayBuffer(2 * 3 * SIZE * SIZE * 4));
      const job = {
        size: SIZE,
        maxPixels: 1e8,
        maxBytes: 1 << 20,
        pre: RAW,
        layout: 'nchw',
      } as const;
      const bytes = await sharp(files[3]!).toBuffer();
      const r = await pool.decodeInto(bytes, job, target, 3 * SIZE * SIZE);
      assert.deepEqual(r, { ok: true });
      const d = await decodeImage(bytes, { width: SIZE, height: SIZE });
      assert.ok(d.ok);
      const want = new Float32Array(2 * 3 * SIZE * SIZE);
      toModelInput(d.pixels, RAW, 'nchw', want, 3 * SIZE * SIZE);
      assert.deepEqual(target, want);
      assert.deepEqual(await pool.decodeInto(Buffer.from('nope'), job, target, 0), {
        ok: false,
        reason: 'not an image (unrecognised content)',
      });
    } finally {
      await pool.close();
    }
    await assert.rejects(
      pool.decodeInto(
        Buffer.from('x'),
        { size: 1, maxPixels: 1, maxBytes: 1, pre: RAW, layout: 'nchw' },
        new Float32Array(new SharedArrayBuffer(12)),
        0,
      ),
      { message: 'The decode pool was used after close()' },
    );
  });

  test('close() rejects the jobs in flight and ends the workers', GUARD, async () => {
    const pool = DecodePool.start(1);
    const target = new Float32Array(new SharedArrayBuffer(3 * SIZE * SIZE * 4));
    const job = {
      size: SIZE,
      maxPixels: 1e8,
      maxBytes: 1 << 20,
      pre: RAW,
      layout: 'nhwc',
    } as const;
    const bytes = await sharp(files[5]!).toBuffer();
    const inFlight = assert.rejects(pool.decodeInto(bytes, job, target, 0), {
      message: 'The decode pool was closed with jobs in flight',
    });
    await pool.close();
    await inFlight;
  });

  test('an invalid job is an error, not a skipped file', GUARD, async () => {
    const pool = DecodePool.start(1);
    try {
      const target = new Float32Array(new SharedArrayBuffer(3 * SIZE * SIZE * 4));
      const bytes = await sharp(files[1]!).toBuffer();
      await assert.rejects(
        pool.decodeInto(
          bytes,
          {
            size: SIZE,
            maxPixels: 1e8,
            maxBytes: 1 << 20,
            pre: { mean: [0], std: [1] },
            layout: 'nhwc',
          },
          target,
          0,
        ),
        { message: 'Decoding failed: Expected 3 numbers (R, G, B) for mean but received [0]' },
      );
    } finally {
      await pool.close();
    }
  });
});
