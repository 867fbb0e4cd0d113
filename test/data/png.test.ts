import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { deflateSync } from 'node:zlib';
import sharp from 'sharp';
import { DEFAULT_MAX_PIXELS, decodeRgb, decodeWithSharp } from '../../src/data/decode.js';
import { decodeSmallPng, SMALL_PNG_MAX_PIXELS } from '../../src/data/png.js';

// The JavaScript path must give sharp's bytes for every PNG it takes, and leave every
// other PNG to sharp: decodeWithSharp is the oracle.

const CHANNELS: Record<number, number> = { 0: 1, 2: 3, 3: 1, 4: 2, 6: 4 };

function random(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s * 1103515245 + 12345) >>> 0;
    return s >>> 24;
  };
}

/** Samples with flat runs and noise, so every filter type has work that matters. */
function samples(n: number, seed: number, below = 256): Uint8Array {
  const next = random(seed);
  const out = new Uint8Array(n);
  for (let i = 0; i < n; i++) out[i] = (i % 7 < 3 ? (i * 37) & 255 : next()) % below;
  return out;
}

function crc32(bytes: Uint8Array): number {
  let c = 0xffffffff;
  for (const b of bytes) {
    c ^= b;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  }
  return (c ^ 0xffffffff) >>> 0;
}

function chunk(type: string, data: Uint8Array = new Uint8Array(0)): Buffer {
  const out = Buffer.alloc(12 + data.length);
  out.writeUInt32BE(data.length, 0);
  out.write(type, 4, 'latin1');
  out.set(data, 8);
  out.writeUInt32BE(crc32(out.subarray(4, 8 + data.length)), 8 + data.length);
  return out;
}

function paeth(a: number, b: number, c: number): number {
  const p = a + b - c;
  const pa = Math.abs(p - a);
  const pb = Math.abs(p - b);
  const pc = Math.abs(p - c);
  return pa <= pb && pa <= pc ? a : pb <= pc ? b : c;
}

interface PngSpec {
  width: number;
  height: number;
  colourType: number;
  /** Unfiltered samples, rows of width × channels bytes. */
  pixels: Uint8Array;
  /** Filter type of row y: filters[y % filters.length]. */
  filters?: readonly number[];
  palette?: Uint8Array;
  /** Chunks between IHDR (and PLTE) and IDAT. */
  before?: Buffer[];
  /** IDAT chunks the stream is cut into. */
  idatParts?: number;
}

/** A PNG written here, filter by filter, so all five filter types are exercised. */
function encodePng(spec: PngSpec): Buffer {
  const { width, height, colourType, pixels } = spec;
  const bpp = CHANNELS[colourType]!;
  const stride = width * bpp;
  const filters = spec.filters ?? [0, 1, 2, 3, 4];
  const raw = new Uint8Array(height * (stride + 1));
  for (let y = 0; y < height; y++) {
    const f = filters[y % filters.length]!;
    raw[y * (stride + 1)] = f;
    for (let i = 0; i < stride; i++) {
      const x = pixels[y * stride + i]!;
      const a = i >= bpp ? pixels[y * stride + i - bpp]! : 0;
      const b = y > 0 ? pixels[(y - 1) * stride + i]! : 0;
      const c = y > 0 && i >= bpp ? pixels[(y - 1) * stride + i - bpp]! : 0;
      const predicted = [0, a, b, (a + b) >> 1, paeth(a, b, c)][f] ?? 0;
      raw[y * (stride + 1) + 1 + i] = (x - predicted) & 255;
    }
  }
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(width, 0);
  ihdr.writeUInt32BE(height, 4);
  ihdr[8] = 8;
  ihdr[9] = colourType;
  const stream = deflateSync(raw);
  const parts = spec.idatParts ?? 1;
  const step = Math.ceil(stream.length / parts);
  const idat: Buffer[] = [];
  for (let at = 0; at < stream.length; at += step)
    idat.push(chunk('IDAT', stream.subarray(at, at + step)));
  return Buffer.concat([
    Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    chunk('IHDR', ihdr),
    ...(spec.palette ? [chunk('PLTE', spec.palette)] : []),
    ...(spec.before ?? []),
    ...idat,
    chunk('IEND'),
  ]);
}

function plain(colourType: number, width = 23, height = 17, seed = 1): PngSpec {
  const spec: PngSpec = {
    width,
    height,
    colourType,
    pixels: samples(width * height * CHANNELS[colourType]!, seed, colourType === 3 ? 40 : 256),
  };
  if (colourType === 3) spec.palette = samples(40 * 3, seed + 99);
  return spec;
}

async function oracle(bytes: Buffer) {
  return decodeWithSharp(bytes, 'png', DEFAULT_MAX_PIXELS);
}

/** Asserts the JavaScript path takes `bytes` and gives sharp's pixels. */
async function takenAlike(bytes: Buffer): Promise<void> {
  const fast = decodeSmallPng(bytes, DEFAULT_MAX_PIXELS);
  assert.ok(fast, 'the JavaScript path left a plain PNG to sharp');
  const ref = await oracle(bytes);
  if (!ref.ok) assert.fail(`sharp refused it: ${ref.reason}`);
  assert.equal(fast.width, ref.width);
  assert.equal(fast.height, ref.height);
  assert.deepEqual(Buffer.from(fast.rgb), Buffer.from(ref.rgb));
}

/** Asserts the JavaScript path leaves `bytes` to sharp, and decodeRgb answers as sharp does. */
async function leftToSharp(bytes: Buffer, maxPixels = DEFAULT_MAX_PIXELS): Promise<void> {
  assert.equal(decodeSmallPng(bytes, maxPixels), null);
  const ref = await decodeWithSharp(bytes, 'png', maxPixels);
  const got = await decodeRgb(bytes, { maxPixels });
  assert.deepEqual(
    got.ok ? { ...got, rgb: Buffer.from(got.rgb) } : got,
    ref.ok ? { ...ref, rgb: Buffer.from(ref.rgb) } : ref,
  );
}

/** sharp tasks queued while `run` runs (sharp emits 'change' on queueing and on finishing). */
async function sharpCalls(run: () => Promise<unknown>): Promise<number> {
  let n = 0;
  const count = () => n++;
  sharp.queue.on('change', count);
  try {
    await run();
  } finally {
    sharp.queue.off('change', count);
  }
  return n;
}

describe('small PNGs decoded in JavaScript', () => {
  for (const colourType of [0, 2, 3, 4, 6]) {
    test(`colour type ${colourType}, all five filter types: sharp's bytes`, async () => {
      await takenAlike(encodePng(plain(colourType)));
      for (const f of [0, 1, 2, 3, 4]) {
        await takenAlike(encodePng({ ...plain(colourType, 9, 5, f + 7), filters: [f] }));
      }
    });
  }

  test('PNGs as sharp writes them (adaptive filters, palette, 1×1, largest taken)', async () => {
    const raw = (w: number, h: number, channels: 1 | 2 | 3 | 4, seed: number) =>
      sharp(Buffer.from(samples(w * h * channels, seed)), {
        raw: { width: w, height: h, channels },
      });
    for (const channels of [1, 2, 3, 4] as const) {
      await takenAlike(
        await raw(31, 29, channels, channels).png({ adaptiveFiltering: true }).toBuffer(),
      );
      await takenAlike(await raw(1, 1, channels, 5).png().toBuffer());
    }
    await takenAlike(await raw(30, 20, 3, 8).png({ palette: true, colours: 64 }).toBuffer());
    const side = Math.sqrt(SMALL_PNG_MAX_PIXELS);
    await takenAlike(await raw(side, side, 3, 9).png().toBuffer());
  });

  test('IDAT split across chunks, and text chunks, are taken', async () => {
    await takenAlike(encodePng({ ...plain(2), idatParts: 4 }));
    const text = chunk('tEXt', Buffer.from('Comment\0a note', 'latin1'));
    await takenAlike(encodePng({ ...plain(6), before: [text] }));
  });

  test('decodeRgb uses it for a small plain PNG and sharp for the rest', async () => {
    const small = encodePng(plain(2));
    const calls = await sharpCalls(() => decodeRgb(small));
    assert.equal(calls, 0, 'a small plain PNG went to sharp');
    const gamma = encodePng({
      ...plain(2),
      before: [chunk('gAMA', Buffer.from([0, 0, 0xb1, 0x8f]))],
    });
    assert.ok((await sharpCalls(() => decodeRgb(gamma))) > 0, 'a PNG with gAMA skipped sharp');
  });

  test('PNGs whose pixels could differ go to sharp', async () => {
    const tRNS = chunk('tRNS', Buffer.from([0, 10, 0, 20, 0, 30]));
    const sRGB = chunk('sRGB', Buffer.from([0]));
    const gAMA = chunk('gAMA', Buffer.from([0, 0, 0xb1, 0x8f]));
    const exif = chunk(
      'eXIf',
      Buffer.from('MM\0*\0\0\0\x08\0\x01\x01\x12\0\x03\0\0\0\x01\0\x06\0\0\0\0\0\0', 'latin1'),
    );
    for (const extra of [tRNS, sRGB, gAMA, exif])
      await leftToSharp(encodePng({ ...plain(2), before: [extra] }));
    const pixels = sharp(Buffer.from(samples(20 * 10 * 3, 3)), {
      raw: { width: 20, height: 10, channels: 3 },
    });
    // Interlaced, 16-bit, 4-bit palette, an ICC profile: checked to be what they claim.
    const interlaced = await pixels.clone().png({ progressive: true }).toBuffer();
    const deep = await pixels.clone().toColourspace('rgb16').png().toBuffer();
    const fourBit = await pixels.clone().png({ palette: true, colours: 8 }).toBuffer();
    const icc = await pixels.clone().withIccProfile('p3').png().toBuffer();
    assert.deepEqual([interlaced[28], deep[24], fourBit[24]], [1, 16, 4]);
    assert.ok(icc.includes('iCCP'));
    for (const bytes of [interlaced, deep, fourBit, icc]) await leftToSharp(bytes);
    // Larger than the JavaScript path takes, or than the caller allows.
    const side = Math.sqrt(SMALL_PNG_MAX_PIXELS) + 1;
    await leftToSharp(encodePng(plain(2, side, side)));
    await leftToSharp(encodePng(plain(2, 10, 10)), 99);
  });

  test('damaged PNGs go to sharp, which decides', async () => {
    const good = encodePng(plain(2));
    const badCrc = Buffer.from(good);
    badCrc[40] = badCrc[40]! ^ 0xff; // inside IDAT
    await leftToSharp(badCrc);
    await leftToSharp(good.subarray(0, good.length - 20));
    await leftToSharp(Buffer.concat([good, Buffer.from('trailing')]));
    await leftToSharp(encodePng({ ...plain(0), filters: [1, 5] }));
    const outOfRange = plain(3);
    outOfRange.pixels[7] = 45; // the palette has 40 entries
    await leftToSharp(encodePng(outOfRange));
    const noPalette = plain(3);
    delete noPalette.palette;
    await leftToSharp(encodePng(noPalette));
  });
});
