import { readFileSync } from 'node:fs';
import { invalidOption } from '../errors.js';
import { type Layout, modelInputTables, type Preprocess, toModelInput } from './decode.js';
import { axisTaps, resizeRgb } from './preprocess.js';

/**
 * `toModelInput(resizeRgb(rgb, …), …)` in WebAssembly (resize.as.ts, SIMD): the contract's
 * float64 operations in the same order, then the same table lookups, so the same float32
 * values bit for bit (test/data/resize-wasm.test.ts compares them over many sizes), in
 * about a third of the JavaScript's time, without the resized bytes in between.
 */

type Taps = ReturnType<typeof axisTaps>;

// WebAssembly's types are in lib.dom, which this project does not compile with.
declare const WebAssembly: {
  Module: new (bytes: Uint8Array) => object;
  Instance: new (module: object, imports: object) => { exports: unknown };
};

interface Kernel {
  memory: { readonly buffer: ArrayBuffer; grow(pages: number): number };
  horizontal(...args: number[]): void;
  vertical(...args: number[]): void;
}

// Resolved next to this file: dist/src/data/resize.wasm, built by `npm run build:wasm`.
const WASM_URL = new URL('./resize.wasm', import.meta.url);

let kernel: Kernel | null = null;

function instance(): Kernel {
  if (!kernel) {
    const module = new WebAssembly.Module(readFileSync(WASM_URL));
    const exports = new WebAssembly.Instance(module, {
      env: {
        abort: () => {
          throw new Error('resize.wasm aborted');
        },
      },
    }).exports;
    kernel = exports as unknown as Kernel;
  }
  return kernel;
}

/**
 * Largest source plus horizontal pass (`height × size × 3` float64) the kernel takes, in
 * bytes; larger images go through the JavaScript, so the module's memory, which never
 * shrinks, stays under about this size.
 */
export const WASM_RESIZE_MAX_BYTES = 32 * 1024 * 1024;

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

/**
 * Resizes `rgb` (`width × height`, interleaved 8-bit RGB) to `size × size` by the
 * contract's kernel and writes it into `out` at `offset` as `toModelInput` would: exactly
 * `toModelInput(resizeRgb(rgb, width, height, size, size), pre, layout, out, offset)`.
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
  if (rgb.length !== width * height * 3) {
    throw new RangeError(
      `Expected ${width}×${height}×3 = ${width * height * 3} values for pixels but received ${rgb.length}`,
    );
  }
  const n = size * size * 3;
  if (!Number.isInteger(offset) || offset < 0 || offset + n > out.length) {
    throw invalidOption('offset', `an integer from 0 to ${out.length - n}`, offset);
  }
  const stride = size * 3;
  const tmpBytes = height * stride * 8;
  if (rgb.length + tmpBytes > WASM_RESIZE_MAX_BYTES) {
    toModelInput(resizeRgb(rgb, width, height, size, size), pre, layout, out, offset);
    return;
  }
  const tables = modelInputTables(pre);
  const h = taps(width, size);
  const v = taps(height, size);
  // Byte offsets, each 16-aligned (SIMD loads).
  let end = 0;
  const place = (bytes: number): number => {
    const at = end;
    end += Math.ceil(bytes / 16) * 16;
    return at;
  };
  const lut = place(3 * 256 * 4);
  const hStart = place(size * 4);
  const hCount = place(size * 4);
  const hWeights = place(h.weights.length * 8);
  const vStart = place(size * 4);
  const vCount = place(size * 4);
  const vWeights = place(v.weights.length * 8);
  const row = place(stride * 8);
  const target = place(n * 4);
  const tmp = place(tmpBytes);
  const src = place(rgb.length);
  const k = instance();
  const have = k.memory.buffer.byteLength;
  if (end > have) k.memory.grow(Math.ceil((end - have) / 65536));
  const buffer = k.memory.buffer;
  for (let c = 0; c < 3; c++) new Float32Array(buffer, lut + c * 1024, 256).set(tables[c]!);
  new Int32Array(buffer, hStart, size).set(h.start);
  new Int32Array(buffer, hCount, size).set(h.count);
  new Float64Array(buffer, hWeights, h.weights.length).set(h.weights);
  new Int32Array(buffer, vStart, size).set(v.start);
  new Int32Array(buffer, vCount, size).set(v.count);
  new Float64Array(buffer, vWeights, v.weights.length).set(v.weights);
  new Uint8Array(buffer, src, rgb.length).set(rgb);
  k.horizontal(src, width, height, hStart, hCount, hWeights, h.width, size, tmp);
  k.vertical(
    tmp,
    vStart,
    vCount,
    vWeights,
    v.width,
    size,
    size,
    lut,
    layout === 'nchw' ? 1 : 0,
    target,
    row,
  );
  out.set(new Float32Array(buffer, target, n), offset);
}
