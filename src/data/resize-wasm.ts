import { readFileSync } from 'node:fs';
import { invalidOption } from '../errors.js';
import {
  checkModelInputOffset,
  type Layout,
  modelInputTables,
  type Preprocess,
  toModelInput,
} from './decode.js';
import { axisTaps, resizeRgb, rgbView } from './preprocess.js';

/**
 * The contract's resize (`resizeRgb`), and with it `toModelInput`'s conversion, in
 * WebAssembly (resize.as.ts, SIMD): the same float64 operations in the same order, then the
 * same rounding and table lookups, so the same bytes and float32 values bit for bit
 * (test/data/resize-wasm.test.ts compares them over many sizes), in a quarter to a half of
 * the JavaScript's time.
 */

type Taps = ReturnType<typeof axisTaps>;

// WebAssembly's types are in lib.dom, which this project does not compile with.
declare const WebAssembly: {
  Module: new (bytes: Uint8Array) => object;
  Instance: new (module: object, imports: object) => { exports: unknown };
};

interface Kernel {
  memory: { readonly buffer: ArrayBuffer; grow(pages: number): number };
  resize(...args: number[]): void;
}

// Resolved next to this file: dist/src/data/resize.wasm, built by `npm run build:wasm`.
const WASM_URL = new URL('./resize.wasm', import.meta.url);

let module: object | null = null;
let kernel: Kernel | null = null;

function instance(): Kernel {
  if (!kernel) {
    module ??= new WebAssembly.Module(readFileSync(WASM_URL));
    const abort = (): never => {
      throw new Error('resize.wasm aborted');
    };
    kernel = new WebAssembly.Instance(module, { env: { abort } }).exports as Kernel;
  }
  return kernel;
}

/**
 * Largest image the kernel takes, in bytes of its memory (the source, a few rows of the
 * horizontal pass and the output): a 12-megapixel photo needs about 37 MB. Larger images
 * are resized by the JavaScript.
 */
export const WASM_RESIZE_MAX_BYTES = 64 * 1024 * 1024;

/**
 * Memory kept between calls. A module's memory never shrinks, so after a larger image the
 * instance is dropped (and its memory with it); the next call makes a new one, which costs
 * microseconds.
 */
const KEEP_BYTES = 8 * 1024 * 1024;

const tapsCache = new Map<string, Taps>();

function taps(inSize: number, outSize: number): Taps {
  const key = `${inSize}>${outSize}`;
  let t = tapsCache.get(key);
  if (!t) {
    t = axisTaps(inSize, outSize);
    if (tapsCache.size >= 64) tapsCache.clear();
    tapsCache.set(key, t);
  }
  return t;
}

const MODES = { bytes: 0, nhwc: 1, nchw: 2 } as const;

/**
 * Runs the kernel; the result is `length` values at byte `at` of `buffer` (the kernel's
 * memory). Null (nothing done) when the image is past WASM_RESIZE_MAX_BYTES.
 */
function run(
  rgb: Uint8Array,
  width: number,
  height: number,
  outWidth: number,
  outHeight: number,
  mode: keyof typeof MODES,
  tables: readonly Float32Array[] | null,
): { buffer: ArrayBuffer; at: number } | null {
  const h = taps(width, outWidth);
  const v = taps(height, outHeight);
  let ringRows = 1;
  for (let o = 0; o < outHeight; o++) ringRows = Math.max(ringRows, v.count[o]!);
  const stride = outWidth * 3;
  // Byte offsets, each 16-aligned (SIMD loads).
  let end = 0;
  const place = (bytes: number): number => {
    const at = end;
    end += Math.ceil(bytes / 16) * 16;
    return at;
  };
  const lut = place(3 * 256 * 4);
  const hStart = place(outWidth * 4);
  const hCount = place(outWidth * 4);
  const hWeights = place(h.weights.length * 8);
  const vStart = place(outHeight * 4);
  const vCount = place(outHeight * 4);
  const vWeights = place(v.weights.length * 8);
  const ring = place(ringRows * stride * 8);
  const row = place(stride * 8);
  const out = place(outWidth * outHeight * 3 * (mode === 'bytes' ? 1 : 4));
  const src = place(rgb.length);
  if (end > WASM_RESIZE_MAX_BYTES) return null;
  const k = instance();
  const have = k.memory.buffer.byteLength;
  if (end > have) k.memory.grow(Math.ceil((end - have) / 65536));
  const buffer = k.memory.buffer;
  if (tables)
    for (let c = 0; c < 3; c++) new Float32Array(buffer, lut + c * 1024, 256).set(tables[c]!);
  new Int32Array(buffer, hStart, outWidth).set(h.start);
  new Int32Array(buffer, hCount, outWidth).set(h.count);
  new Float64Array(buffer, hWeights, h.weights.length).set(h.weights);
  new Int32Array(buffer, vStart, outHeight).set(v.start);
  new Int32Array(buffer, vCount, outHeight).set(v.count);
  new Float64Array(buffer, vWeights, v.weights.length).set(v.weights);
  new Uint8Array(buffer, src, rgb.length).set(rgb);
  // biome-ignore format: the kernel's argument list, grouped as it reads
  k.resize(
    src, width,
    hStart, hCount, hWeights, h.width, outWidth,
    vStart, vCount, vWeights, v.width, outHeight,
    ring, ringRows, row, MODES[mode], lut, out,
  );
  // The result stays readable through `buffer` after the instance is dropped.
  if (buffer.byteLength > KEEP_BYTES) kernel = null;
  return { buffer, at: out };
}

/**
 * Exactly `resizeRgb(rgb, width, height, outWidth, outHeight)` (8-bit RGB in and out), in
 * WebAssembly when the image fits WASM_RESIZE_MAX_BYTES.
 *
 * @example const pixels = resizeRgbFast(decoded.rgb, decoded.width, decoded.height, 224, 224);
 */
export function resizeRgbFast(
  rgb: Uint8Array,
  width: number,
  height: number,
  outWidth: number,
  outHeight: number,
): Uint8Array {
  const src = rgbView(rgb, width, height);
  const done = run(src, width, height, outWidth, outHeight, 'bytes', null);
  return done
    ? new Uint8Array(done.buffer, done.at, outWidth * outHeight * 3).slice()
    : resizeRgb(src, width, height, outWidth, outHeight);
}

/**
 * Resizes `rgb` (`width × height`, interleaved 8-bit RGB) to `size × size` and writes it into
 * `out` at `offset` as `toModelInput` would: exactly
 * `toModelInput(resizeRgb(rgb, width, height, size, size), pre, layout, out, offset)`,
 * without the resized bytes in between.
 *
 * @example resizeToModelInput(decoded.rgb, decoded.width, decoded.height, 224, RAW, 'nchw', batch, i * 150528);
 */
export function resizeToModelInput(
  rgb: Uint8Array,
  width: number,
  height: number,
  size: number,
  pre: Preprocess,
  layout: Layout,
  out: Float32Array,
  offset: number,
): void {
  if (layout !== 'nhwc' && layout !== 'nchw') {
    throw invalidOption('layout', "'nhwc' or 'nchw'", layout);
  }
  const src = rgbView(rgb, width, height);
  const n = size * size * 3;
  checkModelInputOffset(out, offset, n);
  const done = run(src, width, height, size, size, layout, modelInputTables(pre));
  if (done) out.set(new Float32Array(done.buffer, done.at, n), offset);
  else toModelInput(resizeRgb(src, width, height, size, size), pre, layout, out, offset);
}
