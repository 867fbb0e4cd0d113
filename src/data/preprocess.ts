// The preprocessing contract's pixel arithmetic: decoded 8-bit pixels → model-sized 8-bit RGB.
// This file has no imports on purpose: its compiled JavaScript is copied beside every
// exported model as model/preprocess.js, a plain ES module that browsers, Node and bundlers
// load as it is, so every client resizes exactly as training did.

/** Identifies the arithmetic below; stored in the export's metadata and the cache keys. */
export const PREPROCESS_CONTRACT = 'rgb8-fill-bilinear-aa-v1';

/**
 * Flattens interleaved RGBA onto black: each channel becomes `floor(c · a / 255 + 0.5)`.
 * (c · a / 255 is never exactly a half, so any rounding of halves agrees.)
 *
 * @example const rgb = flattenAlpha(imageData.data); // canvas getImageData is unpremultiplied
 */
export function flattenAlpha(rgba: ArrayLike<number>): Uint8Array {
  const n = Math.floor(rgba.length / 4);
  const out = new Uint8Array(n * 3);
  for (let p = 0, i = 0, o = 0; p < n; p++, i += 4, o += 3) {
    const a = rgba[i + 3]!;
    out[o] = Math.floor((rgba[i]! * a) / 255 + 0.5);
    out[o + 1] = Math.floor((rgba[i + 1]! * a) / 255 + 0.5);
    out[o + 2] = Math.floor((rgba[i + 2]! * a) / 255 + 0.5);
  }
  return out;
}

/**
 * Taps of one axis, as Pillow's `Image.resize(..., BILINEAR)` computes them: pixel centres
 * at i + 0.5 (half-pixel), the triangle filter widened by the scale when shrinking
 * (antialiasing: every source pixel contributes), taps outside the image dropped and the
 * rest renormalised. `(int)` in C truncates towards zero, hence Math.trunc. Output o reads
 * inputs start[o] … start[o] + count[o] − 1 with weights[o · width …].
 */
export function axisTaps(
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
): { start: Int32Array; first: Int32Array; count: Int32Array } {
  const outSize = taps.start.length;
  const start: number[] = [];
  const first: number[] = [];
  const count: number[] = [];
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
    x = end;
  }
  start.push(inSize);
  return {
    start: Int32Array.from(start),
    first: Int32Array.from(first),
    count: Int32Array.from(count),
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

type AxisTaps = ReturnType<typeof axisTaps>;
type AxisRuns = ReturnType<typeof axisRuns>;

// Taps and runs depend only on the two sizes, and a data set's images mostly share one
// size: computed once per pair, not once per image. Bounded so odd sizes cannot pile up.
const axisPlans = new Map<string, { taps: AxisTaps; runs: AxisRuns }>();

function axisPlan(inSize: number, outSize: number): { taps: AxisTaps; runs: AxisRuns } {
  const key = `${inSize}>${outSize}`;
  let plan = axisPlans.get(key);
  if (!plan) {
    const taps = axisTaps(inSize, outSize);
    plan = { taps, runs: axisRuns(taps, inSize) };
    if (axisPlans.size >= 64) axisPlans.clear();
    axisPlans.set(key, plan);
  }
  return plan;
}

/**
 * `rgb` checked to hold `width × height × 3` values, as a plain Uint8Array view (not a
 * Buffer or an Array), which keeps the loops monomorphic; other array-likes are copied.
 */
export function rgbView(rgb: ArrayLike<number>, width: number, height: number): Uint8Array {
  if (rgb.length !== width * height * 3) {
    throw new RangeError(
      `Expected ${width}×${height}×3 = ${width * height * 3} values for pixels but received ${rgb.length}`,
    );
  }
  return rgb instanceof Uint8Array
    ? new Uint8Array(rgb.buffer, rgb.byteOffset, rgb.length)
    : Uint8Array.from(rgb, (v) => Math.min(255, Math.max(0, Math.round(v))));
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
 * The loops compute exactly these float64 operations in this order, only arranged for
 * speed: each source row is read once (`horizontalRow`), the taps of a pair of sizes are
 * computed once, and each output row is summed and rounded in one loop.
 *
 * @example const rgb = resizeRgb(pixels, 28, 28, 224, 224);
 */
export function resizeRgb(
  rgb: ArrayLike<number>,
  width: number,
  height: number,
  outWidth: number,
  outHeight: number,
): Uint8Array {
  const src = rgbView(rgb, width, height);
  const { taps: h, runs: hRuns } = axisPlan(width, outWidth);
  const { taps: v } = axisPlan(height, outHeight);
  const stride = outWidth * 3;
  // Horizontal sums of the input rows in the current output row's window, kept in a ring:
  // windows only move down, so each input row is summed once and no full-height
  // intermediate image is kept.
  let most = 1;
  for (let o = 0; o < outHeight; o++) most = Math.max(most, v.count[o]!);
  const ring = Array.from({ length: most }, () => new Float64Array(stride));
  const sum = new Float64Array(stride);
  const out = new Uint8Array(outWidth * outHeight * 3);
  let summed = 0; // input rows horizontally summed so far
  for (let o = 0; o < outHeight; o++) {
    const lo = v.start[o]!;
    const n = v.count[o]!;
    for (; summed < lo + n; summed++) {
      horizontalRow(src, summed * width * 3, ring[summed % most]!, h, hRuns);
    }
    const w = o * v.width;
    const at = o * stride;
    // Rounding is floor(v + 0.5) clamped to 0–255; every product is ≥ 0, so the sums are,
    // and truncation (| 0) is the floor. 0 + a · w0 is exactly a · w0, so the first tap
    // starts the sum. One or two taps (every row when enlarging) sum and round in one loop.
    if (n === 2) {
      const a = ring[lo % most]!;
      const b = ring[(lo + 1) % most]!;
      const w0 = v.weights[w]!;
      const w1 = v.weights[w + 1]!;
      for (let c = 0; c < stride; c++) {
        const r = (a[c]! * w0 + b[c]! * w1 + 0.5) | 0;
        out[at + c] = Math.min(r, 255);
      }
    } else if (n === 1) {
      const a = ring[lo % most]!;
      const w0 = v.weights[w]!;
      for (let c = 0; c < stride; c++) {
        const r = (a[c]! * w0 + 0.5) | 0;
        out[at + c] = Math.min(r, 255);
      }
    } else {
      sum.fill(0);
      for (let k = 0; k < n; k++) {
        const a = ring[(lo + k) % most]!;
        const wk = v.weights[w + k]!;
        for (let c = 0; c < stride; c++) sum[c]! += a[c]! * wk;
      }
      for (let c = 0; c < stride; c++) {
        const r = (sum[c]! + 0.5) | 0;
        out[at + c] = Math.min(r, 255);
      }
    }
  }
  return out;
}

/**
 * The whole contract from decoded RGBA (EXIF orientation applied, sRGB, 8-bit, alpha not
 * premultiplied — what canvas `getImageData` gives): flatten onto black, then `resizeRgb`
 * to `size × size`.
 *
 * @example const rgb = preprocessRgba(imageData.data, imageData.width, imageData.height, 224);
 */
export function preprocessRgba(
  rgba: ArrayLike<number>,
  width: number,
  height: number,
  size: number,
): Uint8Array {
  return resizeRgb(flattenAlpha(rgba), width, height, size, size);
}

/** 8-bit RGB as float32 NHWC values 0–255 (model.json's input `pixels`, one image). */
export function toNhwc(rgb: ArrayLike<number>): Float32Array {
  return Float32Array.from(rgb);
}

/** 8-bit RGB as float32 NCHW values 0–255 (model.onnx's input `pixels`, one image). */
export function toNchw(rgb: ArrayLike<number>): Float32Array {
  const plane = rgb.length / 3;
  const out = new Float32Array(rgb.length);
  for (let p = 0; p < plane; p++) {
    out[p] = rgb[p * 3]!;
    out[plane + p] = rgb[p * 3 + 1]!;
    out[2 * plane + p] = rgb[p * 3 + 2]!;
  }
  return out;
}
