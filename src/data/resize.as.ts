// AssemblyScript, compiled by `asc` (see package.json's build) to resize.wasm, not by tsc.
// resizeRgb's arithmetic (preprocess.ts), optionally followed by toModelInput's conversion,
// for resize-wasm.ts: the same float64 operations in the same order, so the same bytes and
// floats. Pointers are byte offsets into linear memory, laid out by the caller; taps are
// those of preprocess.ts's axisTaps (start and count as int32, weights as float64 rows of
// `hWidth` / `vWidth`).

/** What `resize` writes (`mode`): bytes as resizeRgb (0), float32 table values interleaved (1, NHWC) or as planes (2, NCHW). */
const BYTES = 0;
const NCHW = 2;

/**
 * Source row y (`width × 3` bytes) summed horizontally into `dst` (`outWidth × 3` float64),
 * each output over its taps in index order from 0.
 */
function horizontalRow(
  src: usize,
  width: i32,
  y: i32,
  start: usize,
  count: usize,
  weights: usize,
  tapWidth: i32,
  outWidth: i32,
  dst: usize,
): void {
  const row = src + <usize>y * <usize>width * 3;
  for (let o = 0; o < outWidth; o++) {
    const lo = load<i32>(start + <usize>o * 4);
    const n = load<i32>(count + <usize>o * 4);
    const w = weights + <usize>(o * tapWidth) * 8;
    let r = 0.0;
    let g = 0.0;
    let b = 0.0;
    let p = row + <usize>(lo * 3);
    for (let k = 0; k < n; k++) {
      const wk = load<f64>(w + <usize>k * 8);
      r += <f64>load<u8>(p) * wk;
      g += <f64>load<u8>(p, 1) * wk;
      b += <f64>load<u8>(p, 2) * wk;
      p += 3;
    }
    const d = dst + <usize>(o * 3) * 8;
    store<f64>(d, r);
    store<f64>(d, g, 8);
    store<f64>(d, b, 16);
  }
}

/**
 * The whole resize. Horizontal sums of the source rows in the current output row's window
 * are kept in `ring` (`ringRows` rows of `outWidth × 3` float64; windows only move down);
 * output row o sums its taps' rows into `row` (in tap order; the first tap's 0 + a · w0 is
 * a · w0 exactly), rounds each value as floor(v + 0.5) clamped to 255, and writes the byte
 * (mode BYTES) or `lut[c · 256 + byte]` as float32 (NHWC interleaved, NCHW planes) to `out`.
 */
export function resize(
  src: usize,
  width: i32,
  hStart: usize,
  hCount: usize,
  hWeights: usize,
  hWidth: i32,
  outWidth: i32,
  vStart: usize,
  vCount: usize,
  vWeights: usize,
  vWidth: i32,
  outHeight: i32,
  ring: usize,
  ringRows: i32,
  row: usize,
  mode: i32,
  lut: usize,
  out: usize,
): void {
  const stride = outWidth * 3;
  const bytes = <usize>stride * 8;
  const plane = <usize>(outWidth * outHeight) * 4;
  const pairs = stride >> 1;
  let summed = 0;
  for (let o = 0; o < outHeight; o++) {
    const lo = load<i32>(vStart + <usize>o * 4);
    const n = load<i32>(vCount + <usize>o * 4);
    for (; summed < lo + n; summed++) {
      const dst = ring + <usize>(summed % ringRows) * bytes;
      horizontalRow(src, width, summed, hStart, hCount, hWeights, hWidth, outWidth, dst);
    }
    const w = vWeights + <usize>(o * vWidth) * 8;
    for (let k = 0; k < n; k++) {
      const from = ring + <usize>((lo + k) % ringRows) * bytes;
      const wk = load<f64>(w + <usize>k * 8);
      const wv = f64x2.splat(wk);
      if (k === 0) {
        for (let i = 0; i < pairs; i++) {
          const at = <usize>i * 16;
          v128.store(row + at, f64x2.mul(v128.load(from + at), wv));
        }
      } else {
        for (let i = 0; i < pairs; i++) {
          const at = <usize>i * 16;
          v128.store(row + at, f64x2.add(v128.load(row + at), f64x2.mul(v128.load(from + at), wv)));
        }
      }
      if (stride & 1) {
        const at = <usize>(stride - 1) * 8;
        const term = load<f64>(from + at) * wk;
        store<f64>(row + at, k === 0 ? term : load<f64>(row + at) + term);
      }
    }
    const first = o * outWidth;
    for (let x = 0; x < outWidth; x++) {
      const q = row + <usize>(x * 3) * 8;
      const r = min<i32>(<i32>(load<f64>(q) + 0.5), 255);
      const g = min<i32>(<i32>(load<f64>(q, 8) + 0.5), 255);
      const b = min<i32>(<i32>(load<f64>(q, 16) + 0.5), 255);
      if (mode === BYTES) {
        const p = out + <usize>((first + x) * 3);
        store<u8>(p, r);
        store<u8>(p, g, 1);
        store<u8>(p, b, 2);
        continue;
      }
      const vr = load<f32>(lut + <usize>r * 4);
      const vg = load<f32>(lut + <usize>(256 + g) * 4);
      const vb = load<f32>(lut + <usize>(512 + b) * 4);
      if (mode === NCHW) {
        const p = out + <usize>(first + x) * 4;
        store<f32>(p, vr);
        store<f32>(p + plane, vg);
        store<f32>(p + plane * 2, vb);
      } else {
        const p = out + <usize>((first + x) * 3) * 4;
        store<f32>(p, vr);
        store<f32>(p, vg, 4);
        store<f32>(p, vb, 8);
      }
    }
  }
}
