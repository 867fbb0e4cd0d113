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
 * Resizes interleaved 8-bit RGB to `outWidth × outHeight` (aspect ratio not kept: `fill`).
 *
 * The kernel: separable half-pixel bilinear with antialiasing when shrinking (the taps of
 * Pillow's BILINEAR), horizontal pass first into float64, then the vertical pass, each tap
 * summed in index order; the result is clamped to 0–255 and rounded as floor(v + 0.5).
 * Enlarging, it is textbook half-pixel bilinear with edge pixels repeated.
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
  if (rgb.length !== width * height * 3) {
    throw new RangeError(
      `Expected ${width}×${height}×3 = ${width * height * 3} values for pixels but received ${rgb.length}`,
    );
  }
  // A plain Uint8Array view (not a Buffer or an Array) keeps the loop below monomorphic.
  const src =
    rgb instanceof Uint8Array
      ? new Uint8Array(rgb.buffer, rgb.byteOffset, rgb.length)
      : Uint8Array.from(rgb, (v) => Math.min(255, Math.max(0, Math.round(v))));
  const h = axisTaps(width, outWidth);
  const { start, count, weights, width: taps } = h;
  const tmp = new Float64Array(height * outWidth * 3);
  for (let y = 0; y < height; y++) {
    const row = y * width * 3;
    for (let o = 0; o < outWidth; o++) {
      const n = count[o]!;
      const wo = o * taps;
      let i = row + start[o]! * 3;
      let r = 0;
      let g = 0;
      let b = 0;
      for (let k = 0; k < n; k++, i += 3) {
        const w = weights[wo + k]!;
        r += src[i]! * w;
        g += src[i + 1]! * w;
        b += src[i + 2]! * w;
      }
      const t = (y * outWidth + o) * 3;
      tmp[t] = r;
      tmp[t + 1] = g;
      tmp[t + 2] = b;
    }
  }
  const v = axisTaps(height, outHeight);
  const out = new Uint8Array(outWidth * outHeight * 3);
  const stride = outWidth * 3;
  for (let o = 0; o < outHeight; o++) {
    const lo = v.start[o]!;
    const n = v.count[o]!;
    const wo = o * v.width;
    for (let c = 0; c < stride; c++) {
      let s = 0;
      for (let k = 0; k < n; k++) s += tmp[(lo + k) * stride + c]! * v.weights[wo + k]!;
      out[o * stride + c] = Math.min(255, Math.max(0, Math.floor(s + 0.5)));
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
