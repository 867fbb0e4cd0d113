import { inflateSync } from 'node:zlib';
import { flattenAlpha } from './preprocess.js';

/**
 * Small PNGs decoded in JavaScript. A sharp call costs about 0.8 ms of CPU whatever the
 * image (pipeline set-up, a libvips thread, a hop to the libuv pool), which is most of the
 * cost of a 28- or 32-pixel image (MNIST, CIFAR); inflate and unfilter here take about
 * 0.05 ms for one. Only the plain case is taken: anything that could make sharp's pixels
 * differ (colour or gamma chunks, transparency chunks, Exif, 16-bit, interlacing, a bad
 * CRC, trailing bytes, an odd zlib stream) returns null and goes to sharp, so the pixels are
 * the same bytes either way (test/data/png.test.ts compares the two).
 */

/**
 * Largest image taken here, in pixels (128 × 128). Past it, sharp's per-call cost no
 * longer dominates, and its C decoder runs off the main thread.
 */
export const SMALL_PNG_MAX_PIXELS = 128 * 128;

const SIGNATURE = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a];

/** Chunks that do not change decoded pixels, in sharp or anywhere else. */
const INERT_CHUNKS = new Set(['tEXt', 'zTXt', 'iTXt', 'pHYs', 'tIME']);

/** Samples per pixel by colour type: grey, RGB, palette, grey + alpha, RGBA. */
const CHANNELS = new Map([
  [0, 1],
  [2, 3],
  [3, 1],
  [4, 2],
  [6, 4],
]);

let crcTable: Uint32Array | null = null;

function crc32(bytes: Uint8Array): number {
  if (!crcTable) {
    crcTable = new Uint32Array(256);
    for (let n = 0; n < 256; n++) {
      let c = n;
      for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
      crcTable[n] = c >>> 0;
    }
  }
  let c = 0xffffffff;
  for (let i = 0; i < bytes.length; i++) c = crcTable[(c ^ bytes[i]!) & 0xff]! ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

/**
 * Undoes PNG's per-row filters (types 0–4) of `height` rows of `stride` bytes, `bpp`
 * bytes a pixel, each row led by its filter byte. Null for an unknown filter type.
 */
function unfilter(raw: Uint8Array, height: number, stride: number, bpp: number): Uint8Array | null {
  const px = new Uint8Array(height * stride);
  for (let y = 0; y < height; y++) {
    const s = y * (stride + 1) + 1;
    const o = y * stride;
    const u = o - stride;
    const filter = raw[s - 1]!;
    // Uint8Array stores modulo 256, as the filters' arithmetic is defined.
    if (filter === 0 || (filter === 2 && y === 0)) {
      px.set(raw.subarray(s, s + stride), o);
    } else if (filter === 1) {
      for (let i = 0; i < bpp; i++) px[o + i] = raw[s + i]!;
      for (let i = bpp; i < stride; i++) px[o + i] = raw[s + i]! + px[o + i - bpp]!;
    } else if (filter === 2) {
      for (let i = 0; i < stride; i++) px[o + i] = raw[s + i]! + px[u + i]!;
    } else if (filter === 3) {
      if (y === 0) {
        for (let i = 0; i < bpp; i++) px[o + i] = raw[s + i]!;
        for (let i = bpp; i < stride; i++) px[o + i] = raw[s + i]! + (px[o + i - bpp]! >> 1);
      } else {
        for (let i = 0; i < bpp; i++) px[o + i] = raw[s + i]! + (px[u + i]! >> 1);
        for (let i = bpp; i < stride; i++)
          px[o + i] = raw[s + i]! + ((px[o + i - bpp]! + px[u + i]!) >> 1);
      }
    } else if (filter === 4) {
      if (y === 0) {
        // Up and up-left are 0: Paeth picks left.
        for (let i = 0; i < bpp; i++) px[o + i] = raw[s + i]!;
        for (let i = bpp; i < stride; i++) px[o + i] = raw[s + i]! + px[o + i - bpp]!;
      } else {
        // Left and up-left are 0: Paeth picks up.
        for (let i = 0; i < bpp; i++) px[o + i] = raw[s + i]! + px[u + i]!;
        for (let i = bpp; i < stride; i++) {
          const a = px[o + i - bpp]!;
          const b = px[u + i]!;
          const c = px[u + i - bpp]!;
          const pa = Math.abs(b - c);
          const pb = Math.abs(a - c);
          const pc = Math.abs(a + b - 2 * c);
          px[o + i] = raw[s + i]! + (pa <= pb && pa <= pc ? a : pb <= pc ? b : c);
        }
      }
    } else {
      return null;
    }
  }
  return px;
}

/**
 * Decodes a small plain PNG (8-bit grey, RGB, palette, grey + alpha or RGBA; not
 * interlaced; no colour, gamma, transparency or Exif chunks; at most
 * {@link SMALL_PNG_MAX_PIXELS} and `maxPixels` pixels) to interleaved 8-bit RGB, alpha
 * flattened onto black as `decodeRgb` does. Null for anything else, left to sharp, which
 * decodes these same files to the same bytes.
 */
export function decodeSmallPng(
  bytes: Uint8Array,
  maxPixels: number,
): { rgb: Uint8Array; width: number; height: number } | null {
  if (bytes.length < 8 + 25 + 12) return null;
  for (let i = 0; i < 8; i++) if (bytes[i] !== SIGNATURE[i]) return null;
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let width = 0;
  let height = 0;
  let colourType = -1;
  let palette: Uint8Array | null = null;
  const idat: Uint8Array[] = [];
  let idatEnded = false;
  let p = 8;
  for (;;) {
    if (p + 12 > bytes.length) return null;
    const length = view.getUint32(p);
    if (length > bytes.length - p - 12) return null;
    const type = String.fromCharCode(bytes[p + 4]!, bytes[p + 5]!, bytes[p + 6]!, bytes[p + 7]!);
    if (crc32(bytes.subarray(p + 4, p + 8 + length)) !== view.getUint32(p + 8 + length))
      return null;
    const at = p + 8;
    const data = bytes.subarray(at, at + length);
    p = at + length + 4;
    if (colourType < 0) {
      if (type !== 'IHDR' || length !== 13) return null;
      width = view.getUint32(at);
      height = view.getUint32(at + 4);
      colourType = data[9]!;
      if (width === 0 || height === 0 || width * height > Math.min(maxPixels, SMALL_PNG_MAX_PIXELS))
        return null;
      // 8-bit samples, deflate, adaptive filtering, not interlaced.
      if (data[8] !== 8 || !CHANNELS.has(colourType) || data[10] || data[11] || data[12])
        return null;
    } else if (type === 'IDAT') {
      if (idatEnded) return null;
      idat.push(data);
    } else {
      if (idat.length) idatEnded = true;
      if (type === 'IEND') break;
      if (type === 'PLTE') {
        if (colourType !== 3 || palette || idat.length || length === 0 || length % 3) return null;
        palette = data;
      } else if (!INERT_CHUNKS.has(type)) {
        return null;
      }
    }
  }
  if (p !== bytes.length || !idat.length || (colourType === 3 && !palette)) return null;

  const channels = CHANNELS.get(colourType)!;
  const stride = width * channels;
  const expected = height * (stride + 1);
  let raw: Uint8Array;
  try {
    const stream = idat.length === 1 ? idat[0]! : Buffer.concat(idat);
    raw = inflateSync(stream, { maxOutputLength: expected + 1 });
  } catch {
    return null;
  }
  if (raw.length !== expected) return null;
  const px = unfilter(raw, height, stride, channels);
  if (!px) return null;

  const n = width * height;
  let rgb: Uint8Array;
  if (colourType === 2) {
    rgb = px;
  } else if (colourType === 6) {
    rgb = flattenAlpha(px);
  } else if (colourType === 0) {
    rgb = new Uint8Array(n * 3);
    for (let i = 0, o = 0; i < n; i++, o += 3) rgb[o] = rgb[o + 1] = rgb[o + 2] = px[i]!;
  } else if (colourType === 4) {
    const rgba = new Uint8Array(n * 4);
    for (let i = 0, o = 0; i < n; i++, o += 4) {
      rgba[o] = rgba[o + 1] = rgba[o + 2] = px[2 * i]!;
      rgba[o + 3] = px[2 * i + 1]!;
    }
    rgb = flattenAlpha(rgba);
  } else {
    const entries = palette!.length / 3;
    rgb = new Uint8Array(n * 3);
    for (let i = 0, o = 0; i < n; i++, o += 3) {
      const e = px[i]!;
      if (e >= entries) return null;
      rgb[o] = palette![3 * e]!;
      rgb[o + 1] = palette![3 * e + 1]!;
      rgb[o + 2] = palette![3 * e + 2]!;
    }
  }
  return { rgb, width, height };
}
