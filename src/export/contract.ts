import { copyFile, readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import onnxProto from 'onnx-proto';
import { PREPROCESS_CONTRACT } from '../data/preprocess.js';
import { fileError } from '../errors.js';

/**
 * The preprocessing contract as data: what an image file must become before it enters an
 * exported model. The toolkit trains, predicts and evaluates with exactly this (data/decode.ts
 * and data/preprocess.ts), and both exports carry it, so a client that follows it gets the
 * toolkit's predictions. model/preprocess.js is the reference code for JavaScript clients.
 */
export interface PreprocessingContract {
  /** Changes whenever the arithmetic does (`PREPROCESS_CONTRACT`). */
  readonly id: string;
  readonly decode: {
    readonly orientation: 'exif';
    readonly colourSpace: 'srgb';
    /** An embedded ICC profile is converted to sRGB (relative colorimetric); none means sRGB. */
    readonly iccProfile: 'convert-to-srgb';
    readonly bitsPerChannel: 8;
    readonly frames: 'first';
    /** Each channel becomes floor(c · a / 255 + 0.5), c and a unpremultiplied 0–255. */
    readonly alpha: 'flatten-onto-black';
  };
  readonly resize: {
    /** Stretched to size × size, aspect ratio not kept, nothing cropped. */
    readonly fit: 'fill';
    readonly kernel: 'bilinear';
    /** Output pixel o samples input coordinate (o + 0.5) · in / out − 0.5. */
    readonly pixelCentres: 'half-pixel';
    /** When shrinking, the triangle widens by in / out (Pillow BILINEAR taps). */
    readonly antialias: true;
    readonly order: 'horizontal-then-vertical-float64';
    readonly rounding: 'floor(v + 0.5), clamped to 0..255';
  };
  /** Reference implementation, beside model.json. */
  readonly reference: typeof PREPROCESS_FILE;
}

/** The reference preprocessing code copied into every model folder. */
export const PREPROCESS_FILE = 'preprocess.js';

export const CONTRACT: PreprocessingContract = Object.freeze({
  id: PREPROCESS_CONTRACT,
  decode: Object.freeze({
    orientation: 'exif',
    colourSpace: 'srgb',
    iccProfile: 'convert-to-srgb',
    bitsPerChannel: 8,
    frames: 'first',
    alpha: 'flatten-onto-black',
  }),
  resize: Object.freeze({
    fit: 'fill',
    kernel: 'bilinear',
    pixelCentres: 'half-pixel',
    antialias: true,
    order: 'horizontal-then-vertical-float64',
    rounding: 'floor(v + 0.5), clamped to 0..255',
  }),
  reference: PREPROCESS_FILE,
} as const);

/**
 * Copies the compiled data/preprocess.js (an ES module without imports) into `dir`, without
 * its source-map comment, so the exported model ships the exact code it was trained with.
 */
export async function writePreprocessModule(dir: string): Promise<string> {
  const source = fileURLToPath(new URL('../data/preprocess.js', import.meta.url));
  const target = path.join(dir, PREPROCESS_FILE);
  const text = await readFile(source, 'utf8');
  const body = text.replace(/\n\/\/# sourceMappingURL=.*\n?$/, '\n');
  if (body === text) await copyFile(source, target);
  else await writeFile(target, body);
  return target;
}

// onnx-proto is CommonJS: its root object is the default export under Node's ESM loader.
const { onnx } = onnxProto;

/** Keys of model.onnx's metadata_props (ONNX Runtime's `custom_metadata_map`). */
export const ONNX_METADATA_KEYS = Object.freeze({
  labels: 'labels',
  input: 'input',
  output: 'output',
  preprocessing: 'preprocessing',
  runId: 'run_id',
  weightsSha256: 'weights_sha256',
  metadata: 'tfjs_finetune',
});

/** The metadata_props of serialized ONNX model bytes, as a plain object. */
export function readOnnxMetadata(bytes: Uint8Array, file: string): Record<string, string> {
  let props: onnxProto.onnx.IStringStringEntryProto[];
  try {
    props = onnx.ModelProto.decode(bytes).metadataProps ?? [];
  } catch (err) {
    throw fileError(file, `is not a readable ONNX model (${(err as Error).message})`, err);
  }
  const out: Record<string, string> = {};
  for (const p of props) if (p.key) out[p.key] = p.value ?? '';
  return out;
}
