/**
 * Builds the small Fashion-MNIST sample set used by examples and tests: the first N images
 * of each class, in file order, written as 28×28 greyscale PNGs in class folders.
 *
 * Usage: node dist/datasets/make-fashion-mnist-mini.js [--source DIR] [--out DIR]
 *          [--train-per-class 50] [--test-per-class 20]
 *
 * The source is the Debian package `dataset-fashion-mnist` (IDX files, gzipped or not).
 * Output is byte-for-byte reproducible: fixed selection, fixed names, no PNG metadata.
 */
import { access, mkdir, readFile, rm } from 'node:fs/promises';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { gunzipSync } from 'node:zlib';
import sharp from 'sharp';
import { FinetuneError, fileError } from '../src/errors.js';
import { positiveInteger } from '../src/util/is.js';

/** Folder names in label order (label 0 is 'T-shirt/top'; '/' cannot be in a folder name). */
export const CLASS_NAMES = [
  't-shirt_top',
  'trouser',
  'pullover',
  'dress',
  'coat',
  'sandal',
  'shirt',
  'sneaker',
  'bag',
  'ankle_boot',
] as const;

const IDX_UBYTE_IMAGES = 0x00000803;
const IDX_UBYTE_LABELS = 0x00000801;

interface Split {
  name: 'train' | 'test';
  images: string;
  labels: string;
  perClass: number;
}

/** Reads an IDX file, gunzipping when it starts with the gzip magic bytes. */
async function readIdx(file: string): Promise<Buffer> {
  let bytes: Buffer;
  try {
    bytes = await readFile(file);
  } catch (err) {
    throw fileError(file, `cannot read (${(err as NodeJS.ErrnoException).code ?? err})`, err);
  }
  if (bytes[0] === 0x1f && bytes[1] === 0x8b) {
    try {
      bytes = gunzipSync(bytes);
    } catch (err) {
      throw fileError(file, `is not valid gzip (${(err as Error).message})`, err);
    }
  }
  return bytes;
}

/** The package ships `.gz` files; an unpacked copy works too. */
async function findIdx(dir: string, base: string): Promise<string> {
  for (const name of [`${base}.gz`, base]) {
    const candidate = path.join(dir, name);
    try {
      await access(candidate);
      return candidate;
    } catch {
      // try the next name
    }
  }
  throw fileError(
    path.join(dir, `${base}.gz`),
    'not found (install it with: apt-get install dataset-fashion-mnist, or pass --source DIR)',
  );
}

function parseImages(
  file: string,
  bytes: Buffer,
): { count: number; rows: number; cols: number; data: Buffer } {
  if (bytes.length < 16 || bytes.readUInt32BE(0) !== IDX_UBYTE_IMAGES) {
    throw fileError(file, 'is not an IDX image file (expected magic 0x00000803)');
  }
  const count = bytes.readUInt32BE(4);
  const rows = bytes.readUInt32BE(8);
  const cols = bytes.readUInt32BE(12);
  if (bytes.length !== 16 + count * rows * cols) {
    throw fileError(file, `has ${bytes.length} bytes, expected ${16 + count * rows * cols}`);
  }
  return { count, rows, cols, data: bytes.subarray(16) };
}

function parseLabels(file: string, bytes: Buffer): Buffer {
  if (bytes.length < 8 || bytes.readUInt32BE(0) !== IDX_UBYTE_LABELS) {
    throw fileError(file, 'is not an IDX label file (expected magic 0x00000801)');
  }
  const count = bytes.readUInt32BE(4);
  if (bytes.length !== 8 + count)
    throw fileError(file, `has ${bytes.length} bytes, expected ${8 + count}`);
  return bytes.subarray(8);
}

async function writeSplit(source: string, out: string, split: Split): Promise<number> {
  const imagesFile = await findIdx(source, split.images);
  const labelsFile = await findIdx(source, split.labels);
  const images = parseImages(imagesFile, await readIdx(imagesFile));
  const labels = parseLabels(labelsFile, await readIdx(labelsFile));
  if (labels.length !== images.count) {
    throw fileError(labelsFile, `has ${labels.length} labels for ${images.count} images`);
  }

  // Replace the split wholesale so a rerun with smaller counts leaves no stale files.
  const splitDir = path.join(out, split.name);
  await rm(splitDir, { recursive: true, force: true });
  for (const name of CLASS_NAMES) await mkdir(path.join(splitDir, name), { recursive: true });

  const size = images.rows * images.cols;
  const digits = String(images.count - 1).length;
  const written = new Array<number>(CLASS_NAMES.length).fill(0);
  let total = 0;
  for (let i = 0; i < images.count && total < split.perClass * CLASS_NAMES.length; i++) {
    const label = labels[i]!;
    const className = CLASS_NAMES[label];
    if (className === undefined) throw fileError(labelsFile, `has label ${label} at index ${i}`);
    if (written[label]! >= split.perClass) continue;
    // Named by index in the source file, zero-padded so names sort in file order.
    const target = path.join(splitDir, className, `${String(i).padStart(digits, '0')}.png`);
    await sharp(images.data.subarray(i * size, (i + 1) * size), {
      raw: { width: images.cols, height: images.rows, channels: 1 },
    })
      .toColourspace('b-w')
      .png({ compressionLevel: 9, adaptiveFiltering: false })
      .toFile(target);
    written[label]!++;
    total++;
  }
  const short = written.findIndex((n) => n < split.perClass);
  if (short !== -1) {
    throw new FinetuneError(
      `${split.name}: only ${written[short]} images of class ${CLASS_NAMES[short]}, asked for ${split.perClass}`,
    );
  }
  return total;
}

/** Reports the text as typed when it is not a number at all. */
function countOption(name: string, text: string): number {
  const n = Number(text);
  return positiveInteger(name, text.trim() === '' || Number.isNaN(n) ? text : n);
}

async function main(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    options: {
      source: { type: 'string', default: '/usr/share/datasets/fashion-mnist' },
      out: { type: 'string', default: 'datasets/fashion-mnist-mini' },
      'train-per-class': { type: 'string', default: '50' },
      'test-per-class': { type: 'string', default: '20' },
    },
    strict: true,
  });
  const trainPerClass = countOption('--train-per-class', values['train-per-class']);
  const testPerClass = countOption('--test-per-class', values['test-per-class']);
  const splits: Split[] = [
    {
      name: 'train',
      images: 'train-images-idx3-ubyte',
      labels: 'train-labels-idx1-ubyte',
      perClass: trainPerClass,
    },
    {
      name: 'test',
      images: 't10k-images-idx3-ubyte',
      labels: 't10k-labels-idx1-ubyte',
      perClass: testPerClass,
    },
  ];
  for (const split of splits) {
    const count = await writeSplit(values.source, values.out, split);
    console.log(`${split.name}: wrote ${count} images to ${path.join(values.out, split.name)}`);
  }
}

main(process.argv.slice(2)).catch((err: unknown) => {
  console.error(err instanceof Error ? err.message : err);
  process.exitCode = err instanceof FinetuneError ? err.exitCode : 1;
});
