// AssemblyScript, compiled by `asc` (see package.json's build) to resize.wasm, not by tsc.
// resizeRgb's arithmetic (preprocess.ts) followed by toModelInput's conversion, for
// resize-wasm.ts: the same float64 operations in the same order, so the same floats.
// Pointers are byte offsets into linear memory, laid out by the caller; taps are those of
// preprocess.ts's axisTaps (start and count as int32, weights as float64, `tapWidth` a row).

/**
 * The horizontal pass: row y of the source (`width × 3` bytes) into row y of `tmp`
 * (`outWidth × 3` float64), each output summed over its taps in index order from 0.
 */
export function horizontal(
  src: usize,
  width: i32,
  height: i32,
  start: usize,
  count: usize,
  weights: usize,
  tapWidth: i32,
  outWidth: i32,
  tmp: usize,
): void {
  const stride = outWidth * 3;
  for (let y = 0; y < height; y++) {
    const row = src + <usize>(y * width * 3);
    const dst = tmp + <usize>(y * stride) * 8;
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
}

/**
 * The vertical pass, rounding and conversion: output row o sums its taps' rows of `tmp`
 * into `row` (float64, in tap order; the first tap's 0 + a · w0 is a · w0 exactly), rounds
 * each value as floor(v + 0.5) clamped to 255, and writes `lut[c · 256 + byte]` (float32)
 * to `out`, as three planes (nchw = 1) or interleaved.
 */
export function vertical(
  tmp: usize,
  start: usize,
  count: usize,
  weights: usize,
  tapWidth: i32,
  outWidth: i32,
  outHeight: i32,
  lut: usize,
  nchw: i32,
  out: usize,
  row: usize,
): void {
  const stride = outWidth * 3;
  const bytes = <usize>stride * 8;
  const plane = <usize>(outWidth * outHeight) * 4;
  const pairs = stride >> 1;
  for (let o = 0; o < outHeight; o++) {
    const lo = load<i32>(start + <usize>o * 4);
    const n = load<i32>(count + <usize>o * 4);
    const w = weights + <usize>(o * tapWidth) * 8;
    const base = tmp + <usize>lo * bytes;
    const w0 = load<f64>(w);
    const w0v = f64x2.splat(w0);
    for (let i = 0; i < pairs; i++) {
      const at = <usize>i * 16;
      v128.store(row + at, f64x2.mul(v128.load(base + at), w0v));
    }
    if (stride & 1) {
      const at = <usize>(stride - 1) * 8;
      store<f64>(row + at, load<f64>(base + at) * w0);
    }
    for (let k = 1; k < n; k++) {
      const src = base + <usize>k * bytes;
      const wk = load<f64>(w + <usize>k * 8);
      const wv = f64x2.splat(wk);
      for (let i = 0; i < pairs; i++) {
        const at = <usize>i * 16;
        v128.store(row + at, f64x2.add(v128.load(row + at), f64x2.mul(v128.load(src + at), wv)));
      }
      if (stride & 1) {
        const at = <usize>(stride - 1) * 8;
        store<f64>(row + at, load<f64>(row + at) + load<f64>(src + at) * wk);
      }
    }
    const first = o * outWidth;
    for (let x = 0; x < outWidth; x++) {
      const q = row + <usize>(x * 3) * 8;
      const r = min<i32>(<i32>(load<f64>(q) + 0.5), 255);
      const g = min<i32>(<i32>(load<f64>(q, 8) + 0.5), 255);
      const b = min<i32>(<i32>(load<f64>(q, 16) + 0.5), 255);
      const vr = load<f32>(lut + <usize>r * 4);
      const vg = load<f32>(lut + <usize>(256 + g) * 4);
      const vb = load<f32>(lut + <usize>(512 + b) * 4);
      if (nchw) {
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
