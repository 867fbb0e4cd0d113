import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { type Preprocess, toModelInput } from '../../src/data/decode.js';
import { resizeRgb } from '../../src/data/preprocess.js';
import {
  resizeRgbFast,
  resizeToModelInput,
  WASM_RESIZE_MAX_BYTES,
} from '../../src/data/resize-wasm.js';
import { seededRandom } from '../../src/util/random.js';

const RAW: Preprocess = { mean: [0, 0, 0], std: [1 / 255, 1 / 255, 1 / 255] };
const IMAGENET: Preprocess = { mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225] };

function noise(width: number, height: number, seed: number): Uint8Array {
  const random = seededRandom(seed);
  const out = new Uint8Array(width * height * 3);
  // Runs of equal bytes and sharp edges as well as noise, so sums that round near x.5 occur;
  // a multiplicative hash past the first 64k values keeps multi-megapixel images quick.
  for (let i = 0; i < out.length; i++) {
    out[i] =
      i % 7 === 0
        ? 255
        : i % 11 === 0
          ? 0
          : i < 65536
            ? Math.floor(random() * 256)
            : Math.imul(i, 2654435761) >>> 24;
  }
  return out;
}

/** Bit patterns, so -0, NaN or a last-bit difference would show. */
function bits(x: Float32Array): Uint32Array {
  return new Uint32Array(x.buffer, x.byteOffset, x.length);
}

describe('resizeRgbFast equals resizeRgb byte for byte', () => {
  const sizes: [number, number, number, number][] = [
    [28, 28, 224, 224],
    [1, 1, 3, 5],
    [500, 375, 224, 224],
    [640, 480, 320, 96], // a different factor per axis
    [37, 301, 224, 100],
    [7, 3, 7, 3], // same size
    [3000, 2000, 224, 224], // a photo: several megabytes in the kernel's memory
  ];
  for (const [w, h, ow, oh] of sizes) {
    test(`${w}×${h} → ${ow}×${oh}`, () => {
      const rgb = noise(w, h, w + 7 * h);
      assert.deepEqual(resizeRgbFast(rgb, w, h, ow, oh), resizeRgb(rgb, w, h, ow, oh));
    });
  }
});

describe('resizeToModelInput equals toModelInput(resizeRgb(…)) bit for bit', () => {
  const sizes: [number, number, number][] = [
    [28, 28, 224], // enlarging 8×, the sample set
    [1, 1, 224],
    [3, 2, 7],
    [224, 224, 224], // same size
    [500, 375, 224], // shrinking, antialiased
    [37, 301, 224], // one axis each way
    [1000, 10, 224],
    [641, 479, 96],
    [224, 223, 225],
    [5, 5, 3],
  ];
  for (const [w, h, size] of sizes) {
    test(`${w}×${h} → ${size}`, () => {
      const rgb = noise(w, h, w * 1000 + h);
      for (const pre of [RAW, IMAGENET]) {
        for (const layout of ['nchw', 'nhwc'] as const) {
          const n = size * size * 3;
          // At an offset into a larger batch, as the embedding pass writes.
          const want = new Float32Array(2 * n + 5);
          const got = new Float32Array(2 * n + 5).fill(Number.NaN);
          want.fill(Number.NaN);
          toModelInput(resizeRgb(rgb, w, h, size, size), pre, layout, want, n + 5);
          resizeToModelInput(rgb, w, h, size, pre, layout, got, n + 5);
          assert.deepEqual(bits(got), bits(want), `${layout}, mean ${pre.mean[0]}`);
        }
      }
    });
  }

  test('an image past the kernel bound (resized in JavaScript) gives the same values', () => {
    // 25 megapixels in one row: 75 MB of source, over the bound.
    const [w, h] = [25_000_000, 1];
    assert.ok(w * h * 3 > WASM_RESIZE_MAX_BYTES);
    const rgb = noise(w, h, 7);
    const want = new Float32Array(224 * 224 * 3);
    const got = new Float32Array(224 * 224 * 3);
    const pixels = resizeRgb(rgb, w, h, 224, 224);
    toModelInput(pixels, RAW, 'nchw', want, 0);
    resizeToModelInput(rgb, w, h, 224, RAW, 'nchw', got, 0);
    assert.deepEqual(bits(got), bits(want));
    assert.deepEqual(resizeRgbFast(rgb, w, h, 224, 224), pixels);
  });

  test('bad arguments are refused, naming them', () => {
    const rgb = noise(4, 4, 1);
    const out = new Float32Array(8 * 8 * 3);
    assert.throws(() => resizeToModelInput(rgb, 4, 4, 8, RAW, 'chw' as 'nchw', out, 0), /layout/);
    assert.throws(() => resizeToModelInput(rgb, 4, 5, 8, RAW, 'nchw', out, 0), /4×5×3 = 60/);
    assert.throws(() => resizeToModelInput(rgb, 4, 4, 8, RAW, 'nchw', out, 1), /offset/);
    assert.throws(
      () => resizeToModelInput(rgb, 4, 4, 8, { mean: [0, 0], std: [1, 1, 1] }, 'nchw', out, 0),
      /mean/,
    );
  });
});
