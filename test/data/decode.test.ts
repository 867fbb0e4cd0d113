import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import sharp, { type Sharp } from 'sharp';
import {
  type DecodeResult,
  decodeImage,
  mapConcurrent,
  sniffImageType,
  toModelInput,
} from '../../src/data/decode.js';
import { flattenAlpha, resizeRgb } from '../../src/data/preprocess.js';

type RGB = readonly [number, number, number];
const COLOUR: RGB = [200, 40, 90];
// Prebuilt sharp writes AVIF; a build against a system libvips might not.
const canWriteAvif = sharp.format.heif.output.buffer;

let dir: string;
const file = (name: string): string => path.join(dir, name);

function solid(width: number, height: number, [r, g, b]: RGB = COLOUR): Sharp {
  return sharp({ create: { width, height, channels: 3, background: { r, g, b } } });
}

/** Smooth-ish noise, so lossy codecs spend real bytes and truncation loses real data. */
function photoLike(width: number, height: number): Sharp {
  const raw = Buffer.alloc(width * height * 3);
  let seed = 12345;
  for (let i = 0; i < raw.length; i++) {
    seed = (seed * 1103515245 + 12345) >>> 0;
    raw[i] = (Math.sin(i * 0.013) * 90 + 128 + ((seed >>> 16) % 60) - 30) & 255;
  }
  return sharp(raw, { raw: { width, height, channels: 3 } });
}

function ok(result: DecodeResult): Uint8Array {
  if (!result.ok) assert.fail(`expected a decoded image, got: ${result.reason}`);
  return result.pixels;
}

function reason(result: DecodeResult): string {
  if (result.ok) assert.fail('expected a rejection');
  return result.reason;
}

function pixelAt(pixels: Uint8Array, width: number, x: number, y: number): RGB {
  const i = (y * width + x) * 3;
  return [pixels[i]!, pixels[i + 1]!, pixels[i + 2]!];
}

function assertSolid(pixels: Uint8Array, expected: RGB, tolerance: number, label: string): void {
  for (let i = 0; i < pixels.length; i++) {
    const diff = Math.abs(pixels[i]! - expected[i % 3]!);
    if (diff > tolerance) {
      assert.fail(`${label}: byte ${i} is ${pixels[i]}, expected ${expected[i % 3]} ±${tolerance}`);
    }
  }
}

before(async () => {
  dir = await mkdtemp(path.join(tmpdir(), 'decode-test-'));
  const base = solid(16, 12);
  await base.clone().jpeg({ quality: 95 }).toFile(file('solid.jpg'));
  await base.clone().png().toFile(file('solid.png'));
  await base.clone().webp({ quality: 95 }).toFile(file('solid.webp'));
  await base.clone().gif().toFile(file('solid.gif'));
  await base.clone().tiff({ compression: 'lzw' }).toFile(file('solid.tiff'));
  if (canWriteAvif) await base.clone().avif({ quality: 90 }).toFile(file('solid.avif'));
  await sharp(Buffer.alloc(10 * 10, 90), { raw: { width: 10, height: 10, channels: 1 } })
    .toColourspace('b-w')
    .png()
    .toFile(file('grey.png'));
  await sharp(Buffer.from(new Array(8 * 8).fill([200, 100, 50, 128]).flat()), {
    raw: { width: 8, height: 8, channels: 4 },
  })
    .png()
    .toFile(file('rgba-half.png'));
  // Left half fully transparent (with a hidden colour), right half opaque.
  const split = Buffer.alloc(8 * 4 * 4);
  for (let p = 0; p < 32; p++) split.set(p % 8 < 4 ? [200, 100, 50, 0] : [10, 20, 30, 255], p * 4);
  await sharp(split, { raw: { width: 8, height: 4, channels: 4 } })
    .png()
    .toFile(file('rgba-split.png'));
  const deep = new Uint16Array(6 * 6 * 3).map((_, i) => COLOUR[i % 3]! * 257);
  await sharp(deep, { raw: { width: 6, height: 6, channels: 3 } })
    .toColourspace('rgb16')
    .png()
    .toFile(file('deep.png'));
  await base.clone().png({ palette: true }).toFile(file('palette.png'));
  await solid(16, 16, [200, 40, 40]).toColourspace('cmyk').jpeg().toFile(file('cmyk.jpg'));
  // 64×32 stored, left half red, right half blue; orientation 6 shows it rotated 90° clockwise.
  const halves = Buffer.alloc(64 * 32 * 3);
  for (let p = 0; p < 64 * 32; p++) halves.set(p % 64 < 32 ? [255, 0, 0] : [0, 0, 255], p * 3);
  await sharp(halves, { raw: { width: 64, height: 32, channels: 3 } })
    .jpeg({ quality: 95, chromaSubsampling: '4:4:4' })
    .withMetadata({ orientation: 6 })
    .toFile(file('exif6.jpg'));
  await writeFile(file('really-jpeg.png'), await readFile(file('solid.jpg')));
  await writeFile(file('empty.jpg'), Buffer.alloc(0));
  await writeFile(file('text.jpg'), 'this is not an image\n');
  const photo = await photoLike(256, 256).jpeg({ quality: 90 }).toBuffer();
  await writeFile(file('truncated.jpg'), photo.subarray(0, photo.length >> 1));
  const png = await photoLike(128, 128).png().toBuffer();
  const idat = png.indexOf('IDAT');
  const idatLength = png.readUInt32BE(idat - 4);
  const corrupt = Buffer.from(png);
  for (let k = 0; k < 16; k++) corrupt[idat + 4 + (idatLength >> 1) + k]! ^= 0xff;
  await writeFile(file('corrupt.png'), corrupt);
  await solid(200, 100).png().toFile(file('large.png'));
});

after(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('sniffImageType', () => {
  test('recognises formats by content', async () => {
    const cases: [string, string][] = [
      ['solid.jpg', 'jpeg'],
      ['solid.png', 'png'],
      ['solid.webp', 'webp'],
      ['solid.gif', 'gif'],
      ['solid.tiff', 'tiff'],
      ['really-jpeg.png', 'jpeg'],
    ];
    if (canWriteAvif) cases.push(['solid.avif', 'avif']);
    for (const [name, type] of cases) {
      assert.equal(sniffImageType(await readFile(file(name))), type, name);
    }
    assert.equal(sniffImageType(Buffer.from('this is not an image')), null);
    assert.equal(sniffImageType(new Uint8Array(0)), null);
    assert.equal(sniffImageType(new Uint8Array([0xff, 0xd8])), null);
  });

  test('tells AVIF from other HEIF by brands', () => {
    const ftyp = (major: string, ...compatible: string[]): Buffer => {
      const body = Buffer.from(`ftyp${major}\0\0\0\0${compatible.join('')}`, 'latin1');
      const size = Buffer.alloc(4);
      size.writeUInt32BE(body.length + 4);
      return Buffer.concat([size, body, Buffer.alloc(8)]);
    };
    assert.equal(sniffImageType(ftyp('avif', 'mif1')), 'avif');
    assert.equal(sniffImageType(ftyp('mif1', 'miaf', 'avif')), 'avif');
    assert.equal(sniffImageType(ftyp('heic', 'mif1')), 'heif');
    assert.equal(sniffImageType(ftyp('mif1', 'heic')), 'heif');
    assert.equal(sniffImageType(ftyp('isom', 'mp41')), null, 'an MP4 is not an image');
  });
});

describe('decodeImage', () => {
  test('solid colours in every format', async () => {
    const cases: [string, number][] = [
      ['solid.png', 0],
      ['solid.tiff', 0],
      ['solid.gif', 0],
      ['solid.jpg', 2],
      ['solid.webp', 2],
      ['solid.avif', 2],
    ];
    for (const [name, tolerance] of cases) {
      if (name === 'solid.avif' && !canWriteAvif) continue;
      // Both shrinking and enlarging, non-square output.
      for (const [width, height] of [
        [8, 6],
        [40, 24],
      ] as const) {
        const pixels = ok(await decodeImage(file(name), { width, height }));
        assert.equal(pixels.length, width * height * 3);
        assertSolid(pixels, COLOUR, tolerance, `${name} at ${width}×${height}`);
      }
    }
  });

  test('greyscale, 16-bit and palette become 8-bit RGB', async () => {
    const meta = await sharp(file('grey.png')).metadata();
    assert.equal(meta.channels, 1, 'fixture is single-channel');
    assertSolid(
      ok(await decodeImage(file('grey.png'), { width: 5, height: 5 })),
      [90, 90, 90],
      0,
      'grey',
    );

    assert.equal((await sharp(file('deep.png')).metadata()).depth, 'ushort', 'fixture is 16-bit');
    assertSolid(
      ok(await decodeImage(file('deep.png'), { width: 3, height: 3 })),
      COLOUR,
      0,
      '16-bit',
    );

    assert.equal(
      (await sharp(file('palette.png')).metadata()).isPalette,
      true,
      'fixture is paletted',
    );
    assertSolid(
      ok(await decodeImage(file('palette.png'), { width: 4, height: 4 })),
      COLOUR,
      0,
      'palette',
    );
  });

  test('CMYK jpeg becomes RGB', async () => {
    assert.equal((await sharp(file('cmyk.jpg')).metadata()).space, 'cmyk', 'fixture is CMYK');
    const pixels = ok(await decodeImage(file('cmyk.jpg'), { width: 4, height: 4 }));
    assert.equal(pixels.length, 4 * 4 * 3);
    // The CMYK round trip goes through a colour profile, so only the hue is checked.
    const [r, g, b] = pixelAt(pixels, 4, 2, 2);
    assert.ok(r > 170 && g < 80 && b < 80, `expected red, got ${[r, g, b]}`);
  });

  test('alpha is flattened onto black', async () => {
    const half = ok(await decodeImage(file('rgba-half.png'), { width: 4, height: 4 }));
    assertSolid(half, [100, 50, 25], 1, 'alpha 128');
    const split = ok(await decodeImage(file('rgba-split.png'), { width: 8, height: 4 }));
    assert.deepEqual(pixelAt(split, 8, 1, 1), [0, 0, 0]);
    assert.deepEqual(pixelAt(split, 8, 6, 2), [10, 20, 30]);
  });

  test('applies EXIF orientation before resizing', async () => {
    assert.equal((await sharp(file('exif6.jpg')).metadata()).orientation, 6);
    const pixels = ok(await decodeImage(file('exif6.jpg'), { width: 32, height: 64 }));
    const isRed = ([r, g, b]: RGB) => r > 200 && g < 50 && b < 50;
    const isBlue = ([r, g, b]: RGB) => b > 200 && r < 50 && g < 50;
    // Rotated: top half red, bottom half blue. Unrotated it would be red left, blue right.
    assert.ok(isRed(pixelAt(pixels, 32, 24, 8)), 'top right is red');
    assert.ok(isRed(pixelAt(pixels, 32, 8, 8)), 'top left is red');
    assert.ok(isBlue(pixelAt(pixels, 32, 8, 56)), 'bottom left is blue');
    assert.ok(isBlue(pixelAt(pixels, 32, 24, 56)), 'bottom right is blue');
  });

  test('recognises content regardless of extension, and accepts a Buffer', async () => {
    const fromPath = ok(await decodeImage(file('really-jpeg.png'), { width: 8, height: 6 }));
    assertSolid(fromPath, COLOUR, 2, 'jpeg named .png');
    const fromBuffer = ok(
      await decodeImage(await readFile(file('solid.jpg')), { width: 8, height: 6 }),
    );
    assert.deepEqual(fromBuffer, fromPath);
  });

  test('rejects unusable files with a reason', async () => {
    const size = { width: 8, height: 8 };
    assert.equal(reason(await decodeImage(file('empty.jpg'), size)), 'empty file');
    assert.equal(reason(await decodeImage(Buffer.alloc(0), size)), 'empty file');
    assert.equal(
      reason(await decodeImage(file('text.jpg'), size)),
      'not an image (unrecognised content)',
    );
    const bmp = Buffer.concat([Buffer.from('BM'), Buffer.alloc(60)]);
    assert.equal(reason(await decodeImage(bmp, size)), 'unsupported image format (bmp)');
    const truncated = reason(await decodeImage(file('truncated.jpg'), size));
    assert.match(truncated, /^corrupt or truncated jpeg: \S/);
    const corrupt = reason(await decodeImage(file('corrupt.png'), size));
    assert.match(corrupt, /^corrupt or truncated png: \S/);
    assert.equal(
      reason(await decodeImage(file('large.png'), { ...size, maxPixels: 10_000 })),
      'too many pixels (200×100 > 10000)',
    );
    ok(await decodeImage(file('large.png'), { ...size, maxPixels: 20_000 }));
    assert.equal(reason(await decodeImage(file('missing.jpg'), size)), 'unreadable file (ENOENT)');
    assert.equal(reason(await decodeImage(dir, size)), 'unreadable file (EISDIR)');
  });

  test('throws for invalid options', async () => {
    await assert.rejects(decodeImage(file('solid.png'), { width: 0, height: 8 }), /width/);
    await assert.rejects(
      decodeImage(file('solid.png'), { width: 8, height: 8, maxPixels: -1 }),
      /maxPixels/,
    );
  });
});

describe('toModelInput', () => {
  const pixels = new Uint8Array([0, 128, 255, 10, 20, 30]);
  const pre = { mean: [0.5, 0.4, 0.3], std: [0.2, 0.25, 0.5] };
  const value = (p: number, c: number) => Math.fround((p / 255 - pre.mean[c]!) / pre.std[c]!);

  test('nhwc writes interleaved values at the offset', () => {
    const out = new Float32Array(14).fill(-99);
    toModelInput(pixels, pre, 'nhwc', out, 6);
    assert.deepEqual([...out.subarray(0, 6)], new Array(6).fill(-99));
    assert.deepEqual(
      [...out.subarray(6, 12)],
      [...pixels].map((p, i) => value(p, i % 3)),
    );
    assert.deepEqual([...out.subarray(12)], [-99, -99]);
  });

  test('nchw writes one plane per channel', () => {
    const out = new Float32Array(12).fill(-99);
    toModelInput(pixels, pre, 'nchw', out, 6);
    assert.deepEqual([...out.subarray(0, 6)], new Array(6).fill(-99));
    assert.deepEqual(
      [...out.subarray(6)],
      [value(0, 0), value(10, 0), value(128, 1), value(20, 1), value(255, 2), value(30, 2)],
    );
  });

  test('[0, 1] scaling and [-1, 1] scaling', () => {
    const out = new Float32Array(3);
    toModelInput(new Uint8Array([0, 51, 255]), { mean: [0, 0, 0], std: [1, 1, 1] }, 'nhwc', out, 0);
    assert.deepEqual([...out], [0, Math.fround(0.2), 1]);
    toModelInput(
      new Uint8Array([0, 255, 0]),
      { mean: [0.5, 0.5, 0.5], std: [0.5, 0.5, 0.5] },
      'nchw',
      out,
      0,
    );
    assert.deepEqual([...out], [-1, 1, -1]);
  });

  test('rejects a buffer too small for the image', () => {
    assert.throws(() => toModelInput(pixels, pre, 'nhwc', new Float32Array(10), 6), /offset/);
    assert.throws(
      () => toModelInput(pixels, { mean: [0], std: [1] }, 'nhwc', new Float32Array(6), 0),
      /mean/,
    );
  });
});

describe('mapConcurrent', () => {
  const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

  test('yields in input order with at most `limit` in flight', async () => {
    let inFlight = 0;
    let maxInFlight = 0;
    const items = Array.from({ length: 20 }, (_, i) => i);
    const results: number[] = [];
    for await (const r of mapConcurrent(items, 3, async (item, i) => {
      assert.equal(item, i);
      inFlight++;
      maxInFlight = Math.max(maxInFlight, inFlight);
      // Later items often finish first, so order has to be restored.
      await sleep((item * 7) % 5);
      inFlight--;
      return item * 10;
    })) {
      results.push(r);
    }
    assert.deepEqual(
      results,
      items.map((i) => i * 10),
    );
    assert.equal(maxInFlight, 3);
  });

  test('reads items lazily, so an endless source works', async () => {
    let pulled = 0;
    function* endless() {
      for (let i = 0; ; i++) {
        pulled++;
        yield i;
      }
    }
    const results: number[] = [];
    for await (const r of mapConcurrent(endless(), 4, async (x) => x)) {
      results.push(r);
      // Items pulled never run more than `limit` ahead of those consumed.
      assert.ok(pulled <= results.length + 4, `pulled ${pulled} after ${results.length}`);
      if (results.length === 10) break;
    }
    assert.deepEqual(results, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
  });

  test('throws a failure in its turn, after earlier results', async () => {
    const results: number[] = [];
    await assert.rejects(async () => {
      for await (const r of mapConcurrent([0, 1, 2, 3, 4], 3, async (x) => {
        if (x === 2 || x === 3) throw new Error(`boom ${x}`);
        return x;
      })) {
        results.push(r);
      }
    }, /boom 2/);
    assert.deepEqual(results, [0, 1]);
  });

  test('limit 1 runs sequentially; a bad limit throws', async () => {
    const order: string[] = [];
    for await (const _ of mapConcurrent([1, 2], 1, async (x) => {
      order.push(`start ${x}`);
      await sleep(1);
      order.push(`end ${x}`);
    })) {
      // results are not needed
    }
    assert.deepEqual(order, ['start 1', 'end 1', 'start 2', 'end 2']);
    await assert.rejects(async () => {
      for await (const _ of mapConcurrent([1], 0, async (x) => x)) {
        // never reached
      }
    }, /limit/);
  });
});

describe('the preprocessing contract (resizeRgb, flattenAlpha)', () => {
  /** One row of grey pixels as RGB. */
  const row = (values: readonly number[]): Uint8Array =>
    Uint8Array.from(values.flatMap((v) => [v, v, v]));
  const greys = (rgb: Uint8Array): number[] => Array.from(rgb.filter((_, i) => i % 3 === 0));

  test('enlarging is half-pixel bilinear with edge pixels repeated', () => {
    // 2 → 8: output o samples (o + 0.5) / 4 − 0.5 = −0.375, −0.125, 0.125, …
    const out = resizeRgb(row([0, 160]), 2, 1, 8, 1);
    assert.deepEqual(greys(out), [0, 0, 20, 60, 100, 140, 160, 160]);
    // Both axes, 2×2 → 4×4: weights per axis [1 0] [.75 .25] [.25 .75] [0 1], e.g. the
    // second row's second pixel is .75·(.75·0 + .25·64) + .25·(.75·128 + .25·255) = 51.94.
    const square = resizeRgb(row([0, 64, 128, 255]), 2, 2, 4, 4);
    assert.deepEqual(
      greys(square),
      [0, 16, 48, 64, 32, 52, 92, 112, 96, 124, 179, 207, 128, 160, 223, 255],
    );
  });

  test('shrinking antialiases: the triangle widens by the scale (Pillow BILINEAR taps)', () => {
    // 4 → 2, scale 2: output 0 is centred on 1 with taps 0..2 weighted .75 .75 .25;
    // output 1 on 3 with taps 1..3 weighted .25 .75 .75 (tap 4 is outside and dropped).
    const out = resizeRgb(row([0, 100, 200, 40]), 4, 1, 2, 1);
    assert.deepEqual(greys(out), [Math.round(125 / 1.75), Math.round(205 / 1.75)]);
    // A constant image stays constant whatever the ratio.
    const flat = resizeRgb(new Uint8Array(37 * 23 * 3).fill(77), 37, 23, 5, 11);
    assert.ok(flat.every((v) => v === 77));
  });

  test('channels stay apart and a wrong length is named', () => {
    const rgb = Uint8Array.from([10, 20, 30, 50, 60, 70]);
    assert.deepEqual(Array.from(resizeRgb(rgb, 2, 1, 1, 1)), [30, 40, 50]);
    assert.throws(() => resizeRgb(rgb, 3, 1, 1, 1), {
      message: 'Expected 3×1×3 = 9 values for pixels but received 6',
    });
  });

  test('alpha: each channel becomes round(c · a / 255)', () => {
    const out = flattenAlpha(Uint8Array.from([255, 128, 3, 128, 200, 10, 0, 0, 9, 9, 9, 255]));
    assert.deepEqual(Array.from(out), [128, 64, 2, 0, 0, 0, 9, 9, 9]);
  });

  test('decodeImage is full-size decoding followed by the contract, for PNG and JPEG', async () => {
    for (const [name, image] of [
      ['up.png', photoLike(19, 13).png()],
      ['down.jpg', photoLike(640, 480).jpeg({ quality: 90 })],
      ['alpha.png', photoLike(50, 40).ensureAlpha(0.5).png()],
    ] as const) {
      const bytes = await image.toBuffer();
      const { data, info } = await sharp(bytes)
        .toColourspace('srgb')
        .raw({ depth: 'uchar' })
        .toBuffer({ resolveWithObject: true });
      const rgb = info.channels === 4 ? flattenAlpha(data) : data;
      const want = resizeRgb(rgb, info.width, info.height, 24, 16);
      const got = (await decodeImage(bytes, { width: 24, height: 16 })) as DecodeResult & {
        ok: true;
      };
      assert.ok(got.ok, name);
      assert.deepEqual(got.pixels, want, name);
    }
  });
});
