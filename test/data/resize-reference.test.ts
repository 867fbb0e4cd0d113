import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { resizeRgb } from '../../src/data/preprocess.js';

/*
 * The resize as it was before its loops were rearranged for speed (taps per call, the
 * vertical pass scattered row by row into a ring of sums, rounding with Math.floor), kept
 * verbatim as a reference: the rearranged resizeRgb must give the same bytes.
 */

/**
 * Taps of one axis, as Pillow's `Image.resize(..., BILINEAR)` computes them: pixel centres
 * at i + 0.5 (half-pixel), the triangle filter widened by the scale when shrinking
 * (antialiasing: every source pixel contributes), taps outside the image dropped and the
 * rest renormalised. `(int)` in C truncates towards zero, hence Math.trunc.
 */
function axisTaps(
  inSize: number,
  outSize: number,
): { start: Int32Array; count: Int32Array; weights: Float64Array; width: number } {
  const scale = inSize / outSize;
  const filterScale = Math.max(scale, 1);
  const support = filterScale;
  const width = Math.ceil(support) * 2 + 1;
  const start = new Int32Array(outSize);
  const count = new Int32Array(outSize);
  const weights = new Float64Array(outSize * width);
  for (let o = 0; o < outSize; o++) {
    const centre = (o + 0.5) * scale;
    const lo = Math.max(Math.trunc(centre - support + 0.5), 0);
    const hi = Math.min(Math.trunc(centre + support + 0.5), inSize);
    let total = 0;
    for (let x = lo; x < hi; x++) {
      const w = Math.max(0, 1 - Math.abs((x - centre + 0.5) / filterScale));
      weights[o * width + x - lo] = w;
      total += w;
    }
    for (let x = lo; x < hi; x++) weights[o * width + x - lo]! /= total;
    start[o] = lo;
    count[o] = hi - lo;
  }
  return { start, count, weights, width };
}

/**
 * The input positions of one axis in runs where the same outputs read them: run `r` covers
 * positions `start[r]` to `start[r + 1] - 1`, each read by the `count[r]` outputs from
 * `first[r]` on. Windows start and end in output order, so the outputs reading a position
 * are always consecutive.
 */
function axisRuns(
  taps: ReturnType<typeof axisTaps>,
  inSize: number,
): { start: Int32Array; first: Int32Array; count: Int32Array; most: number } {
  const outSize = taps.start.length;
  const start: number[] = [];
  const first: number[] = [];
  const count: number[] = [];
  let most = 0;
  let done = 0; // outputs whose window ended at or before x
  let begun = 0; // outputs whose window starts at or before x
  for (let x = 0; x < inSize; ) {
    while (done < outSize && taps.start[done]! + taps.count[done]! <= x) done++;
    while (begun < outSize && taps.start[begun]! <= x) begun++;
    let end = begun < outSize ? taps.start[begun]! : inSize;
    for (let o = done; o < begun; o++) end = Math.min(end, taps.start[o]! + taps.count[o]!);
    start.push(x);
    first.push(done);
    count.push(begun - done);
    most = Math.max(most, begun - done);
    x = end;
  }
  start.push(inSize);
  return {
    start: Int32Array.from(start),
    first: Int32Array.from(first),
    count: Int32Array.from(count),
    most,
  };
}

/**
 * One row of the horizontal pass: `acc[o · 3 + c]` becomes Σ src · weight over output o's
 * taps, summed in index order from 0, exactly as the formula reads. The row is swept once,
 * left to right, adding each pixel into every output whose window holds it, so a pixel is
 * read once rather than once per window; shrinking, that is two windows almost everywhere,
 * which gets a loop of its own.
 */
function horizontalRow(
  src: Uint8Array,
  row: number,
  acc: Float64Array,
  taps: ReturnType<typeof axisTaps>,
  runs: ReturnType<typeof axisRuns>,
): void {
  const { weights, width: tw, start: lo } = taps;
  acc.fill(0);
  for (let r = 0; r < runs.count.length; r++) {
    const n = runs.count[r]!;
    const o = runs.first[r]!;
    const x0 = runs.start[r]!;
    const x1 = runs.start[r + 1]!;
    let i = row + x0 * 3;
    if (n === 2) {
      const a = o * 3;
      const w0 = o * tw - lo[o]!;
      const w1 = (o + 1) * tw - lo[o + 1]!;
      let r0 = acc[a]!;
      let g0 = acc[a + 1]!;
      let b0 = acc[a + 2]!;
      let r1 = acc[a + 3]!;
      let g1 = acc[a + 4]!;
      let b1 = acc[a + 5]!;
      for (let x = x0; x < x1; x++, i += 3) {
        const pr = src[i]!;
        const pg = src[i + 1]!;
        const pb = src[i + 2]!;
        const v0 = weights[w0 + x]!;
        const v1 = weights[w1 + x]!;
        r0 += pr * v0;
        g0 += pg * v0;
        b0 += pb * v0;
        r1 += pr * v1;
        g1 += pg * v1;
        b1 += pb * v1;
      }
      acc[a] = r0;
      acc[a + 1] = g0;
      acc[a + 2] = b0;
      acc[a + 3] = r1;
      acc[a + 4] = g1;
      acc[a + 5] = b1;
    } else {
      for (let x = x0; x < x1; x++, i += 3) {
        const pr = src[i]!;
        const pg = src[i + 1]!;
        const pb = src[i + 2]!;
        for (let k = o, a = o * 3; k < o + n; k++, a += 3) {
          const v = weights[k * tw + x - lo[k]!]!;
          acc[a]! += pr * v;
          acc[a + 1]! += pg * v;
          acc[a + 2]! += pb * v;
        }
      }
    }
  }
}

/**
 * Resizes interleaved 8-bit RGB to `outWidth × outHeight` (aspect ratio not kept: `fill`).
 *
 * The kernel: separable half-pixel bilinear with antialiasing when shrinking (the taps of
 * Pillow's BILINEAR), horizontal pass first into float64, then the vertical pass, each tap
 * summed in index order; the result is clamped to 0–255 and rounded as floor(v + 0.5).
 * Enlarging, it is textbook half-pixel bilinear with edge pixels repeated. In formulas,
 * with the taps of `axisTaps` (window lo…hi − 1 and weights w per output):
 *
 *     h[y][o] = (…((0 + src[y][lo] · w[o][0]) + src[y][lo + 1] · w[o][1]) + …)
 *     v[o][x] = (…((0 + h[lo][x] · w[o][0]) + h[lo + 1][x] · w[o][1]) + …)
 *     out     = min(255, max(0, floor(v + 0.5)))
 *
 * The loops below compute exactly these float64 operations in this order, only arranged
 * for speed: each source row is read once (`horizontalRow`) and added at once into the
 * output rows whose window holds it, so no full-height intermediate image is kept.
 *
 * @example const rgb = resizeRgb(pixels, 28, 28, 224, 224);
 */
function referenceResize(
  rgb: ArrayLike<number>,
  width: number,
  height: number,
  outWidth: number,
  outHeight: number,
): Uint8Array {
  if (rgb.length !== width * height * 3) {
    throw new RangeError(
      `Expected ${width}×${height}×3 = ${width * height * 3} values for pixels but received ${rgb.length}`,
    );
  }
  // A plain Uint8Array view (not a Buffer or an Array) keeps the loops monomorphic.
  const src =
    rgb instanceof Uint8Array
      ? new Uint8Array(rgb.buffer, rgb.byteOffset, rgb.length)
      : Uint8Array.from(rgb, (v) => Math.min(255, Math.max(0, Math.round(v))));
  const h = axisTaps(width, outWidth);
  const hRuns = axisRuns(h, width);
  const v = axisTaps(height, outHeight);
  const stride = outWidth * 3;
  // Output rows being summed: a window of consecutive rows, kept in a ring.
  const live = Math.max(1, axisRuns(v, height).most);
  const sums = Array.from({ length: live }, () => new Float64Array(stride));
  const hRow = new Float64Array(stride);
  const out = new Uint8Array(outWidth * outHeight * 3);
  let done = 0; // output rows written
  let begun = 0; // output rows whose window starts at or before y
  for (let y = 0; y < height; y++) {
    horizontalRow(src, y * width * 3, hRow, h, hRuns);
    while (begun < outHeight && v.start[begun]! <= y) begun++;
    for (let o = done; o < begun; o++) {
      const w = v.weights[o * v.width + y - v.start[o]!]!;
      const sum = sums[o % live]!;
      for (let c = 0; c < stride; c++) sum[c]! += hRow[c]! * w;
    }
    while (done < begun && v.start[done]! + v.count[done]! <= y + 1) {
      const sum = sums[done % live]!;
      const at = done * stride;
      for (let c = 0; c < stride; c++)
        out[at + c] = Math.min(255, Math.max(0, Math.floor(sum[c]! + 0.5)));
      sum.fill(0);
      done++;
    }
  }
  return out;
}

/** Deterministic values (a 32-bit LCG), so a failure reproduces. */
function lcg(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s / 2 ** 32;
  };
}

describe('resizeRgb equals the implementation it replaced, byte for byte', () => {
  test('random sizes and content, enlarging and shrinking, sizes repeated and mixed', () => {
    const next = lcg(20251130);
    const pick = (max: number): number => 1 + Math.floor(next() * max);
    for (let t = 0; t < 400; t++) {
      // Small and medium sizes, a few large shrink factors, and repeats of one pair (as a
      // data set's images share a size) interleaved with others.
      const repeat = t % 4 === 0;
      const w = repeat ? 28 : t % 25 === 1 ? pick(1200) : pick(90);
      const h = repeat ? 28 : t % 25 === 2 ? pick(900) : pick(90);
      const ow = repeat ? 224 : pick(t % 3 === 0 ? 300 : 60);
      const oh = repeat ? 224 : pick(t % 3 === 0 ? 300 : 60);
      const rgb = new Uint8Array(w * h * 3);
      // Half the images noise, half flat runs with hard 0/255 edges (sums on the rounding edge).
      if (t % 2 === 0) for (let i = 0; i < rgb.length; i++) rgb[i] = Math.floor(next() * 256);
      else
        for (let i = 0; i < rgb.length; i++)
          rgb[i] = (Math.floor(i / (3 * (1 + (t % 7)))) % 3) * 127.5;
      const got = resizeRgb(rgb, w, h, ow, oh);
      const want = referenceResize(rgb, w, h, ow, oh);
      const at = got.findIndex((v, i) => v !== want[i]);
      assert.equal(got.length, want.length, `${w}×${h} → ${ow}×${oh}: length`);
      assert.equal(at, -1, `${w}×${h} → ${ow}×${oh}: byte ${at}: ${got[at]} vs ${want[at]}`);
    }
  });
});
