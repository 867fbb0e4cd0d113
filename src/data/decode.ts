import type { Stats } from 'node:fs';
import { constants } from 'node:fs';
import { type FileHandle, open, stat } from 'node:fs/promises';
import { availableParallelism } from 'node:os';
import sharp from 'sharp';
import { invalidOption } from '../errors.js';
import { positiveInteger } from '../util/is.js';
import { decodeSmallPng } from './png.js';
import { flattenAlpha, resizeRgb } from './preprocess.js';

/**
 * Image decoding for training and prediction: any supported file becomes exactly
 * `height × width × 3` 8-bit sRGB pixels, and any file that cannot be used becomes a
 * reason string instead of an exception, so one bad file never stops a whole run.
 */

/**
 * Formats recognised by their content. Prebuilt sharp decodes only AV1-coded HEIF (AVIF),
 * so other `heif` files are named in the reason rather than called "not an image".
 */
export type ImageType = 'jpeg' | 'png' | 'webp' | 'gif' | 'tiff' | 'avif' | 'heif';

export interface DecodeOptions {
  /** Output width in pixels. */
  width: number;
  /** Output height in pixels. */
  height: number;
  /** Largest accepted input size in pixels (width × height); default 100_000_000. */
  maxPixels?: number;
  /** Largest accepted file in bytes; default DEFAULT_MAX_BYTES (256 MiB). */
  maxBytes?: number;
}

export type DecodeResult = { ok: true; pixels: Uint8Array } | { ok: false; reason: string };

/** Per-channel normalisation applied by `toModelInput`. */
export interface Preprocess {
  mean: readonly number[];
  std: readonly number[];
}

export type Layout = 'nhwc' | 'nchw';

export const DEFAULT_MAX_PIXELS = 100_000_000;

/**
 * Largest image file read, in bytes (256 MiB): far above any real photo (a 100-megapixel
 * JPEG is about 50 MB), yet a bound, so a file that never ends (a symlink to /dev/zero, a
 * growing log named .jpg) is refused instead of filling memory.
 */
export const DEFAULT_MAX_BYTES = 256 * 1024 * 1024;

/**
 * Images decoded at once. Each sharp call uses one libvips thread here
 * (`sharp.concurrency()` is 1), so throughput comes from several images in flight; more
 * than the libuv pool (4 threads by default, shared with file reads) only queues.
 */
export const DEFAULT_DECODE_CONCURRENCY = Math.max(2, Math.min(4, availableParallelism()));

const HEIF_BRANDS = new Set([
  'heic',
  'heix',
  'hevc',
  'hevx',
  'heim',
  'heis',
  'hevm',
  'hevs',
  'mif1',
  'msf1',
]);
const AVIF_BRANDS = new Set(['avif', 'avis']);

function ascii(head: Uint8Array, start: number, end: number): string {
  return String.fromCharCode(...head.subarray(start, end));
}

function startsWith(head: Uint8Array, bytes: readonly number[], at = 0): boolean {
  if (head.length < at + bytes.length) return false;
  for (let i = 0; i < bytes.length; i++) if (head[at + i] !== bytes[i]) return false;
  return true;
}

/**
 * Recognises an image format from its first bytes, ignoring the file name.
 * Give at least 12 bytes; HEIF/AVIF files whose major brand is generic (`mif1`) are told
 * apart by their compatible brands, so up to the first 64 bytes help there.
 */
export function sniffImageType(head: Uint8Array): ImageType | null {
  if (startsWith(head, [0xff, 0xd8, 0xff])) return 'jpeg';
  if (startsWith(head, [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a])) return 'png';
  if (head.length >= 12 && ascii(head, 0, 4) === 'RIFF' && ascii(head, 8, 12) === 'WEBP') {
    return 'webp';
  }
  if (head.length >= 6 && (ascii(head, 0, 6) === 'GIF87a' || ascii(head, 0, 6) === 'GIF89a')) {
    return 'gif';
  }
  // Classic TIFF (42) and BigTIFF (43), both byte orders.
  if (
    startsWith(head, [0x49, 0x49, 0x2a, 0x00]) ||
    startsWith(head, [0x4d, 0x4d, 0x00, 0x2a]) ||
    startsWith(head, [0x49, 0x49, 0x2b, 0x00]) ||
    startsWith(head, [0x4d, 0x4d, 0x00, 0x2b])
  ) {
    return 'tiff';
  }
  if (head.length >= 12 && ascii(head, 4, 8) === 'ftyp') {
    const major = ascii(head, 8, 12);
    if (AVIF_BRANDS.has(major)) return 'avif';
    // Compatible brands follow the minor version, up to the end of the ftyp box.
    const boxEnd = Math.min(
      head.length,
      ((head[0]! << 24) | (head[1]! << 16) | (head[2]! << 8) | head[3]!) >>> 0,
    );
    const brands: string[] = [];
    for (let at = 16; at + 4 <= boxEnd; at += 4) brands.push(ascii(head, at, at + 4));
    if (brands.some((b) => AVIF_BRANDS.has(b))) return 'avif';
    if (HEIF_BRANDS.has(major) || brands.some((b) => HEIF_BRANDS.has(b))) return 'heif';
  }
  return null;
}

/** Common image formats sharp cannot read, named so the reason is not a bare "not an image". */
function sniffUnsupported(head: Uint8Array): string | null {
  // BMP's 4 reserved bytes after the file size are zero; that keeps text starting with "BM" out.
  if (startsWith(head, [0x42, 0x4d]) && startsWith(head, [0, 0, 0, 0], 6)) return 'bmp';
  if (startsWith(head, [0x00, 0x00, 0x01, 0x00])) return 'ico';
  if (startsWith(head, [0x38, 0x42, 0x50, 0x53])) return 'psd';
  return null;
}

function errorText(err: unknown): string {
  const message = err instanceof Error ? err.message : String(err);
  return message.trim().split('\n')[0]!.trim();
}

export type ReadResult = { ok: true; bytes: Buffer } | { ok: false; reason: string };

/** What a file that is not a regular file is, for the reason string; null for a regular file. */
function specialKind(st: Stats): string | null {
  if (st.isFile()) return null;
  if (st.isFIFO()) return 'a FIFO';
  if (st.isSocket()) return 'a socket';
  if (st.isCharacterDevice()) return 'a character device';
  if (st.isBlockDevice()) return 'a block device';
  return 'a special file';
}

const tooLarge = (maxBytes: number): string => `too large (more than ${maxBytes} bytes)`;

// Opening a FIFO without O_NONBLOCK waits for a writer, possibly forever; with it the open
// returns at once, so a file swapped for a FIFO after the stat below is caught by fstat
// instead of hanging. (Windows has neither flag; it has no FIFOs in the file system either.)
const OPEN_FLAGS = constants.O_RDONLY | (constants.O_NONBLOCK ?? 0) | (constants.O_NOCTTY ?? 0);

/**
 * Reads an image file's bytes, or says why not; never throws and never waits on the file.
 *
 * Only regular files are read (symlinks followed): FIFOs, sockets and devices are refused
 * from `stat` alone, before any open, so `/dev/zero` or a FIFO named `x.jpg` cannot stall a
 * run. At most `maxBytes + 1` bytes are read, so a file over the cap, even one that grows
 * while being read, is detected without reading it all.
 *
 * @param maxBytes default DEFAULT_MAX_BYTES
 * @example const r = await readImageFile('photo.jpg'); if (r.ok) use(r.bytes); else warn(r.reason);
 */
export async function readImageFile(
  file: string,
  maxBytes: number = DEFAULT_MAX_BYTES,
): Promise<ReadResult> {
  positiveInteger('maxBytes', maxBytes);
  const unreadable = (err: unknown): ReadResult => ({
    ok: false,
    reason: `unreadable file (${(err as NodeJS.ErrnoException).code ?? errorText(err)})`,
  });
  let st: Stats;
  try {
    st = await stat(file);
  } catch (err) {
    return unreadable(err);
  }
  // The reason a read of a folder gives.
  if (st.isDirectory()) return { ok: false, reason: 'unreadable file (EISDIR)' };
  const kind = specialKind(st);
  if (kind) return { ok: false, reason: `not a regular file (${kind})` };
  if (st.size > maxBytes) return { ok: false, reason: tooLarge(maxBytes) };
  let handle: FileHandle | null = null;
  try {
    handle = await open(file, OPEN_FLAGS);
    const opened = specialKind(await handle.stat());
    if (opened) return { ok: false, reason: `not a regular file (${opened})` };
    // The size from stat is a hint (the file may change): read until EOF or the cap + 1.
    let buffer = Buffer.allocUnsafe(Math.min(st.size, maxBytes) + 1);
    let length = 0;
    for (;;) {
      if (length === buffer.length) {
        if (length > maxBytes) return { ok: false, reason: tooLarge(maxBytes) };
        const grown = Buffer.allocUnsafe(Math.min(2 * buffer.length, maxBytes + 1));
        buffer.copy(grown, 0, 0, length);
        buffer = grown;
      }
      const { bytesRead } = await handle.read(buffer, length, buffer.length - length, null);
      if (bytesRead === 0) break;
      length += bytesRead;
    }
    if (length > maxBytes) return { ok: false, reason: tooLarge(maxBytes) };
    return { ok: true, bytes: buffer.subarray(0, length) };
  } catch (err) {
    return unreadable(err);
  } finally {
    await handle?.close().catch(() => {});
  }
}

/**
 * Decodes one image to `height × width × 3` interleaved 8-bit sRGB.
 *
 * - EXIF orientation is applied before resizing.
 * - Greyscale, CMYK, 16-bit and palette images become 8-bit sRGB; embedded ICC profiles
 *   are honoured.
 * - Alpha is flattened onto black: each channel becomes round(c · a / 255). PIL's
 *   `convert('RGB')` instead keeps whatever colour hides under alpha 0, but that colour is
 *   arbitrary.
 * - The image is decoded at full size, then stretched to exactly `width × height`
 *   (`fill`: aspect ratio ignored, as Keras `image_dataset_from_directory` and nsfwjs do)
 *   by `resizeRgb`: half-pixel bilinear, antialiased when shrinking (Pillow's BILINEAR
 *   taps). This is the preprocessing contract `PREPROCESS_CONTRACT`, which the export
 *   carries and ships as model/preprocess.js so that every client computes the same pixels.
 * - Animated and multi-page images give their first frame.
 *
 * Never throws for a bad file: empty, unrecognised, corrupt, truncated, oversized (more
 * than `maxPixels`, default 100_000_000, or `maxBytes`, default 256 MiB), unreadable or
 * non-regular (FIFO, device, socket) input gives `{ ok: false, reason }`; see
 * `readImageFile`. Invalid options do throw.
 *
 * @param input a file path (read once, only if a regular file) or the file's bytes
 */
export async function decodeImage(
  input: string | Buffer,
  opts: DecodeOptions,
): Promise<DecodeResult> {
  const width = positiveInteger('width', opts.width);
  const height = positiveInteger('height', opts.height);
  const decoded = await decodeRgb(input, opts);
  if (!decoded.ok) return decoded;
  return { ok: true, pixels: resizeRgb(decoded.rgb, decoded.width, decoded.height, width, height) };
}

export type DecodedRgb =
  | { ok: true; rgb: Uint8Array; width: number; height: number }
  | { ok: false; reason: string };

/**
 * `decodeImage` up to the resize: the image at its decoded size, `height × width × 3`
 * interleaved 8-bit sRGB (orientation applied, alpha flattened), or why not.
 */
export async function decodeRgb(
  input: string | Buffer,
  opts: Pick<DecodeOptions, 'maxPixels' | 'maxBytes'> = {},
): Promise<DecodedRgb> {
  const maxPixels = positiveInteger('maxPixels', opts.maxPixels ?? DEFAULT_MAX_PIXELS);
  const maxBytes = positiveInteger('maxBytes', opts.maxBytes ?? DEFAULT_MAX_BYTES);

  let bytes: Buffer;
  if (typeof input === 'string') {
    const read = await readImageFile(input, maxBytes);
    if (!read.ok) return read;
    bytes = read.bytes;
  } else {
    bytes = input;
    if (bytes.length > maxBytes) return { ok: false, reason: tooLarge(maxBytes) };
  }
  if (bytes.length === 0) return { ok: false, reason: 'empty file' };

  const type = sniffImageType(bytes.subarray(0, 64));
  if (type === null) {
    const unsupported = sniffUnsupported(bytes.subarray(0, 16));
    return {
      ok: false,
      reason: unsupported
        ? `unsupported image format (${unsupported})`
        : 'not an image (unrecognised content)',
    };
  }

  if (type === 'png') {
    const small = decodeSmallPng(bytes, maxPixels);
    if (small) return { ok: true, ...small };
  }
  return decodeWithSharp(bytes, type, maxPixels);
}

/**
 * `decodeRgb`'s decoder for all formats (and every PNG `decodeSmallPng` leaves): sharp at
 * full size, orientation applied, sRGB, alpha flattened onto black.
 */
export async function decodeWithSharp(
  bytes: Buffer,
  type: ImageType,
  maxPixels: number,
): Promise<DecodedRgb> {
  try {
    // Decoded at full size (no shrink-on-load, whose DCT scaling no client reproduces), then
    // resized by the contract's own kernel (preprocess.ts), which every client can run.
    const { data, info } = await sharp(bytes, {
      // 'truncated' rejects cut-off files (otherwise the missing part decodes as grey) and
      // hard decode errors, but tolerates libjpeg's recoverable warnings such as extraneous
      // bytes, which many real-world photos trigger yet decode fine.
      failOn: 'truncated',
      limitInputPixels: maxPixels,
      autoOrient: true,
    })
      .toColourspace('srgb')
      .raw({ depth: 'uchar' })
      .toBuffer({ resolveWithObject: true });
    if (info.channels !== 3 && info.channels !== 4) {
      return {
        ok: false,
        reason: `unexpected decoder output (${info.width}×${info.height}×${info.channels})`,
      };
    }
    const rgb = info.channels === 4 ? flattenAlpha(data) : data;
    return { ok: true, rgb, width: info.width, height: info.height };
  } catch (err) {
    const message = errorText(err);
    if (/pixel limit/i.test(message))
      return { ok: false, reason: await tooManyPixels(bytes, maxPixels) };
    if (type === 'heif') return { ok: false, reason: `unsupported or corrupt heif: ${message}` };
    return { ok: false, reason: `corrupt or truncated ${type}: ${message}` };
  }
}

/** Only runs on the rejection path, so the header is not parsed twice for good files. */
async function tooManyPixels(bytes: Buffer, maxPixels: number): Promise<string> {
  try {
    const { width, height } = await sharp(bytes, { limitInputPixels: false }).metadata();
    return `too many pixels (${width}×${height} > ${maxPixels})`;
  } catch {
    return `too many pixels (> ${maxPixels})`;
  }
}

/**
 * Writes one decoded image into a float32 batch buffer as `(p / 255 - mean[c]) / std[c]`.
 *
 * @param pixels `height × width × 3` interleaved RGB, as from `decodeImage`
 * @param layout `'nhwc'` keeps channels interleaved; `'nchw'` writes three planes
 * @param offset element index in `out` where this image starts (image index × h × w × 3)
 */
export function toModelInput(
  pixels: Uint8Array,
  pre: Preprocess,
  layout: Layout,
  out: Float32Array,
  offset: number,
): void {
  const [lut0, lut1, lut2] = modelInputTables(pre);
  const n = pixels.length;
  if (n % 3 !== 0) throw invalidOption('pixels', 'a length divisible by 3', n);
  checkModelInputOffset(out, offset, n);
  if (layout === 'nhwc') {
    for (let i = 0, o = offset; i < n; i += 3, o += 3) {
      out[o] = lut0[pixels[i]!]!;
      out[o + 1] = lut1[pixels[i + 1]!]!;
      out[o + 2] = lut2[pixels[i + 2]!]!;
    }
  } else if (layout === 'nchw') {
    const plane = n / 3;
    const o1 = offset + plane;
    const o2 = offset + 2 * plane;
    for (let p = 0, i = 0; p < plane; p++, i += 3) {
      out[offset + p] = lut0[pixels[i]!]!;
      out[o1 + p] = lut1[pixels[i + 1]!]!;
      out[o2 + p] = lut2[pixels[i + 2]!]!;
    }
  } else {
    throw invalidOption('layout', "'nhwc' or 'nchw'", layout);
  }
}

/** Checks that an image of `n` values fits in `out` from `offset` (toModelInput's `offset`). */
export function checkModelInputOffset(out: Float32Array, offset: number, n: number): void {
  if (!Number.isInteger(offset) || offset < 0 || offset + n > out.length) {
    throw invalidOption('offset', `an integer from 0 to ${out.length - n}`, offset);
  }
}

/**
 * `toModelInput`'s value of each byte, one 256-entry table per channel (`pre` checked): the
 * exact formula computed once per value rather than once per pixel.
 */
export function modelInputTables(
  pre: Preprocess,
): readonly [Float32Array, Float32Array, Float32Array] {
  if (pre.mean.length !== 3) throw invalidOption('mean', '3 numbers (R, G, B)', pre.mean);
  if (pre.std.length !== 3 || pre.std.some((s) => s === 0)) {
    throw invalidOption('std', '3 non-zero numbers (R, G, B)', pre.std);
  }
  return [
    channelTable(pre.mean[0]!, pre.std[0]!),
    channelTable(pre.mean[1]!, pre.std[1]!),
    channelTable(pre.mean[2]!, pre.std[2]!),
  ];
}

const tableCache = new Map<string, Float32Array>();

function channelTable(mean: number, std: number): Float32Array {
  const key = `${mean}/${std}`;
  let table = tableCache.get(key);
  if (!table) {
    table = new Float32Array(256);
    for (let v = 0; v < 256; v++) table[v] = (v / 255 - mean) / std;
    // Callers use a handful of presets; the bound only guards against misuse.
    if (tableCache.size >= 64) tableCache.clear();
    tableCache.set(key, table);
  }
  return table;
}

/**
 * Runs `fn` over `items` with at most `limit` calls in flight and yields the results in
 * input order; a finished result waits for the ones before it and keeps its slot until
 * then, so memory stays bounded by `limit` whatever the number of items, and `items` is
 * read lazily (a generator works). A rejection is thrown when its turn comes. Stopping
 * (a rejection, or the consumer's `break` or throw) first waits for the calls still in
 * flight to settle, dropping their results, so no work outlives the loop that asked for it.
 */
export async function* mapConcurrent<T, R>(
  items: Iterable<T>,
  limit: number,
  fn: (item: T, i: number) => Promise<R>,
): AsyncGenerator<R> {
  positiveInteger('limit', limit);
  const iterator = items[Symbol.iterator]();
  const pending: Promise<R>[] = [];
  let index = 0;
  let done = false;
  const startNext = (): void => {
    const next = iterator.next();
    if (next.done) {
      done = true;
      return;
    }
    const i = index++;
    const promise = Promise.resolve().then(() => fn(next.value, i));
    // Marks the rejection handled so a failure further down the queue does not crash the
    // process before (or if never) its turn comes; awaiting below still sees it.
    promise.catch(() => {});
    pending.push(promise);
  };
  try {
    while (!done && pending.length < limit) startNext();
    while (pending.length > 0) {
      const result = await pending.shift()!;
      if (!done) startNext();
      yield result;
    }
  } finally {
    await Promise.allSettled(pending);
  }
}
