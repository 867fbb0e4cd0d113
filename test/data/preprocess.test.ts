import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { flattenAlpha, preprocessRgba, resizeRgb } from '../../src/data/preprocess.js';

/**
 * The contract's resize written the slow, direct way, as the README states it: Pillow's
 * BILINEAR taps per axis, a full float64 horizontal pass, then the vertical pass, each sum
 * taken in tap order from 0, then floor(v + 0.5) clamped to 0–255. resizeRgb arranges the
 * same operations for speed; this oracle is what it must equal byte for byte.
 */
function oracleResize(
  rgb: Uint8Array,
  width: number,
  height: number,
  outWidth: number,
  outHeight: number,
): Uint8Array {
  const taps = (inSize: number, outSize: number): { lo: number; w: number[] }[] => {
    const scale = inSize / outSize;
    const filterScale = Math.max(scale, 1);
    return Array.from({ length: outSize }, (_, o) => {
      const centre = (o + 0.5) * scale;
      const lo = Math.max(Math.trunc(centre - filterScale + 0.5), 0);
      const hi = Math.min(Math.trunc(centre + filterScale + 0.5), inSize);
      const w: number[] = [];
      for (let x = lo; x < hi; x++)
        w.push(Math.max(0, 1 - Math.abs((x - centre + 0.5) / filterScale)));
      const total = w.reduce((a, b) => a + b, 0);
      return { lo, w: w.map((v) => v / total) };
    });
  };
  const across = taps(width, outWidth);
  const down = taps(height, outHeight);
  const tmp = new Float64Array(height * outWidth * 3);
  for (let y = 0; y < height; y++) {
    for (let o = 0; o < outWidth; o++) {
      for (let c = 0; c < 3; c++) {
        let s = 0;
        const { lo, w } = across[o]!;
        for (let k = 0; k < w.length; k++) s += rgb[(y * width + lo + k) * 3 + c]! * w[k]!;
        tmp[(y * outWidth + o) * 3 + c] = s;
      }
    }
  }
  const out = new Uint8Array(outWidth * outHeight * 3);
  for (let o = 0; o < outHeight; o++) {
    for (let x = 0; x < outWidth * 3; x++) {
      let s = 0;
      const { lo, w } = down[o]!;
      for (let k = 0; k < w.length; k++) s += tmp[(lo + k) * outWidth * 3 + x]! * w[k]!;
      out[o * outWidth * 3 + x] = Math.min(255, Math.max(0, Math.floor(s + 0.5)));
    }
  }
  return out;
}

/** Deterministic bytes (a 32-bit LCG), so a failure reproduces. */
function noise(length: number, seed: number): Uint8Array {
  const out = new Uint8Array(length);
  let s = seed >>> 0;
  for (let i = 0; i < length; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    out[i] = s >>> 24;
  }
  return out;
}

/** Content that puts sums on the rounding edge: hard 0/255 edges, flat runs, gradients. */
function structured(width: number, height: number): Uint8Array {
  const out = new Uint8Array(width * height * 3);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const i = (y * width + x) * 3;
      out[i] = ((x >> 1) + (y >> 1)) % 2 === 0 ? 255 : 0;
      out[i + 1] = (x * 255) / Math.max(1, width - 1);
      out[i + 2] = x < width / 2 ? 1 : 2;
    }
  }
  return out;
}

function firstDifference(got: Uint8Array, want: Uint8Array): string {
  if (got.length !== want.length) return `length ${got.length} vs ${want.length}`;
  const i = got.findIndex((v, j) => v !== want[j]);
  return i < 0 ? 'none' : `byte ${i}: ${got[i]} vs ${want[i]}`;
}

function assertSameAsOracle(width: number, height: number, outW: number, outH: number): void {
  for (const [kind, rgb] of [
    ['noise', noise(width * height * 3, width * 7919 + height * 104729 + outW * 31 + outH)],
    ['structured', structured(width, height)],
  ] as const) {
    const got = resizeRgb(rgb, width, height, outW, outH);
    const want = oracleResize(rgb, width, height, outW, outH);
    const label = `${kind} ${width}×${height} → ${outW}×${outH}`;
    assert.ok(
      got.length === want.length && got.every((v, i) => v === want[i]),
      `${label}: ${firstDifference(got, want)}`,
    );
  }
}

describe('resizeRgb equals the contract formula byte for byte', () => {
  test('shrinking by non-integer and integer factors, both axes and mixed', () => {
    for (const [w, h, ow, oh] of [
      [1000, 750, 224, 224], // a photo-like shrink, ×4.46 and ×3.35
      [613, 411, 97, 53],
      [448, 448, 224, 224], // exactly ×2
      [300, 200, 299, 201], // shrink by a hair across, enlarge by a hair down
      [225, 224, 224, 225],
      [4001, 9, 224, 3],
      [37, 23, 5, 11],
      [90, 60, 1, 1], // every pixel in one output
    ] as const) {
      assertSameAsOracle(w, h, ow, oh);
    }
  });

  test('enlarging, tiny images and 1-pixel-wide or -high ones', () => {
    for (const [w, h, ow, oh] of [
      [28, 28, 224, 224],
      [224, 224, 230, 231],
      [2, 2, 4, 4],
      [1, 1, 1, 1],
      [1, 1, 7, 5],
      [1, 9, 4, 3],
      [9, 1, 3, 5],
      [1, 300, 1, 224],
      [300, 1, 224, 1],
      [3, 2, 200, 1],
    ] as const) {
      assertSameAsOracle(w, h, ow, oh);
    }
  });

  test('300 random sizes from 1 to 70 pixels each way', () => {
    const dims = noise(300 * 4, 99);
    for (let t = 0; t < 300; t++) {
      const [w, h, ow, oh] = [0, 1, 2, 3].map((k) => 1 + (dims[t * 4 + k]! % 70)) as [
        number,
        number,
        number,
        number,
      ];
      assertSameAsOracle(w, h, ow, oh);
    }
  });

  test('alpha images: preprocessRgba is flatten, then the same resize', () => {
    for (const [w, h, size] of [
      [61, 47, 16],
      [5, 3, 32],
      [1, 40, 8],
    ] as const) {
      const rgba = noise(w * h * 4, w * h);
      // Some fully transparent and fully opaque pixels among the partial ones.
      for (let i = 3; i < rgba.length; i += 4 * 5) rgba[i] = i % 3 === 0 ? 0 : 255;
      const want = oracleResize(flattenAlpha(rgba), w, h, size, size);
      assert.deepEqual(preprocessRgba(rgba, w, h, size), want, `${w}×${h} → ${size}`);
    }
  });

  test('a Buffer, an offset view and a plain array give the same bytes', () => {
    const rgb = noise(40 * 30 * 3, 5);
    const want = oracleResize(rgb, 40, 30, 11, 7);
    const padded = Buffer.alloc(rgb.length + 13);
    padded.set(rgb, 13);
    assert.deepEqual(resizeRgb(padded.subarray(13), 40, 30, 11, 7), want);
    assert.deepEqual(resizeRgb(Array.from(rgb), 40, 30, 11, 7), want);
  });
});
