import { spawn } from 'node:child_process';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before } from 'node:test';
import { fileURLToPath } from 'node:url';
import * as tf from '@tensorflow/tfjs';
import sharp from 'sharp';
import { initBackend } from '../src/backend/index.js';
import { fileSaveHandler } from '../src/io/files.js';
import { seededRandom } from '../src/util/random.js';

/** The repository root (tests run from dist/test). */
export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
export const SAMPLE = path.join(ROOT, 'datasets', 'fashion-mnist-mini');
export const CLI = path.join(ROOT, 'dist', 'src', 'cli', 'main.js');

export async function tempDir(
  prefix: string,
): Promise<{ dir: string; cleanup: () => Promise<void> }> {
  const dir = await mkdtemp(path.join(tmpdir(), `finetune-${prefix}-`));
  return { dir, cleanup: () => rm(dir, { recursive: true, force: true }) };
}

/** A small image: a solid colour with a contrasting square whose place depends on `variant`. */
export async function writeImage(
  file: string,
  rgb: [number, number, number],
  options: { size?: number; format?: 'png' | 'jpeg' | 'webp'; variant?: number } = {},
): Promise<void> {
  const size = options.size ?? 32;
  const v = options.variant ?? 0;
  await mkdir(path.dirname(file), { recursive: true });
  const square = await sharp({
    create: {
      width: 8,
      height: 8,
      channels: 3,
      background: { r: 255 - rgb[0], g: 255 - rgb[1], b: 255 - rgb[2] },
    },
  })
    .png()
    .toBuffer();
  const img = sharp({
    create: {
      width: size,
      height: size,
      channels: 3,
      background: { r: rgb[0], g: rgb[1], b: rgb[2] },
    },
  }).composite([{ input: square, left: (v * 5) % (size - 8), top: (v * 3) % (size - 8) }]);
  const format = options.format ?? 'png';
  await writeFile(
    file,
    await (format === 'png' ? img.png() : format === 'jpeg' ? img.jpeg() : img.webp()).toBuffer(),
  );
}

/**
 * A tiny random conv backbone (32×32 in) saved as model.json, for fast tests of the
 * whole pipeline: conv → BN → ReLU6 → depthwise → BN → conv, cut at the last 4-D layer.
 */
export async function writeTinyBackbone(dir: string, seed = 1): Promise<string> {
  const input = tf.input({ shape: [32, 32, 3], name: 'image' });
  let x = tf.layers
    .conv2d({
      filters: 8,
      kernelSize: 3,
      strides: 2,
      padding: 'same',
      name: 'conv1',
      kernelInitializer: tf.initializers.glorotUniform({ seed }),
    })
    .apply(input) as tf.SymbolicTensor;
  x = tf.layers.batchNormalization({ name: 'bn1' }).apply(x) as tf.SymbolicTensor;
  x = tf.layers.reLU({ maxValue: 6, name: 'relu1' }).apply(x) as tf.SymbolicTensor;
  x = tf.layers
    .depthwiseConv2d({
      kernelSize: 3,
      padding: 'same',
      name: 'dw1',
      depthwiseInitializer: tf.initializers.glorotUniform({ seed: seed + 1 }),
    })
    .apply(x) as tf.SymbolicTensor;
  x = tf.layers.batchNormalization({ name: 'bn2' }).apply(x) as tf.SymbolicTensor;
  x = tf.layers
    .conv2d({
      filters: 16,
      kernelSize: 1,
      activation: 'relu',
      name: 'conv2',
      kernelInitializer: tf.initializers.glorotUniform({ seed: seed + 2 }),
    })
    .apply(x) as tf.SymbolicTensor;
  const model = tf.model({ inputs: input, outputs: x, name: 'tiny' });
  const file = path.join(dir, 'tiny-backbone');
  await model.save(fileSaveHandler(file));
  model.dispose();
  return path.join(file, 'model.json');
}

/** A two-or-more-class folder of distinct solid-colour images. */
export async function writeColourDataset(
  dir: string,
  perClass: number,
  colours: Record<string, [number, number, number]>,
): Promise<void> {
  for (const [name, rgb] of Object.entries(colours)) {
    for (let i = 0; i < perClass; i++)
      await writeImage(path.join(dir, name, `${i}.png`), rgb, { variant: i });
  }
}

export interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
}

/**
 * Runs the real CLI in `cwd`, with its cache under `cwd/.cache` (never the user's);
 * `nodeArgs` go to node itself, before the CLI's path.
 */
export function runCli(
  args: readonly string[],
  cwd: string,
  nodeArgs: readonly string[] = [],
): Promise<Run> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [...nodeArgs, CLI, ...args], {
      cwd,
      env: { ...process.env, FINETUNE_DEBUG: '', XDG_CACHE_HOME: path.join(cwd, '.cache') },
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, stdout, stderr }));
  });
}

/**
 * A tiny graph model (the format of TF Hub models: no layers, no variables) saved as
 * model.json + one shard: 32×32 RGB in, `relu(x · scale)` per channel out (4-D, so the
 * loader pools it to 3 features).
 */
export async function writeTinyGraphModel(dir: string): Promise<string> {
  const folder = path.join(dir, 'tiny-graph');
  await mkdir(folder, { recursive: true });
  const float = { type: 'DT_FLOAT' };
  const dims = (...sizes: number[]) => ({ dim: sizes.map((s) => ({ size: String(s) })) });
  const json = {
    format: 'graph-model',
    generatedBy: 'test',
    convertedBy: 'test',
    modelTopology: {
      node: [
        {
          name: 'image',
          op: 'Placeholder',
          attr: { dtype: float, shape: { shape: dims(-1, 32, 32, 3) } },
        },
        {
          name: 'scale',
          op: 'Const',
          attr: { dtype: float, value: { tensor: { dtype: 'DT_FLOAT', tensorShape: dims(3) } } },
        },
        { name: 'scaled', op: 'Mul', input: ['image', 'scale'], attr: { T: float } },
        { name: 'features', op: 'Relu', input: ['scaled'], attr: { T: float } },
      ],
      library: {},
      versions: { producer: 1 },
    },
    weightsManifest: [
      {
        paths: ['group1-shard1of1.bin'],
        weights: [{ name: 'scale', shape: [3], dtype: 'float32' }],
      },
    ],
  };
  await writeFile(path.join(folder, 'model.json'), JSON.stringify(json));
  await writeFile(
    path.join(folder, 'group1-shard1of1.bin'),
    Buffer.from(Float32Array.from([1, 2, 3]).buffer),
  );
  return path.join(folder, 'model.json');
}

/**
 * Linearly separable Gaussian-ish blobs: row i has class i mod `classes`, and feature d is
 * `centre` when d mod `classes` is that class, else 0, plus seeded uniform noise of width
 * `noise`. Small data a head must learn, the same on every machine.
 */
export function blobs(
  n: number,
  seed: number,
  { dim, classes, centre, noise }: { dim: number; classes: number; centre: number; noise: number },
): { x: Float32Array; y: Int32Array } {
  const random = seededRandom(seed);
  const x = new Float32Array(n * dim);
  const y = new Int32Array(n);
  for (let i = 0; i < n; i++) {
    const c = i % classes;
    y[i] = c;
    for (let d = 0; d < dim; d++)
      x[i * dim + d] = (d % classes === c ? centre : 0) + (random() - 0.5) * noise;
  }
  return { x, y };
}

/** Red, green and blue: three classes any backbone tells apart. */
export const RGB_CLASSES: Record<string, [number, number, number]> = {
  red: [220, 30, 30],
  green: [30, 200, 40],
  blue: [20, 40, 230],
};

/**
 * A temp folder with the tiny backbone and an RGB colour dataset of `perClass` images a
 * class, for tests that train: `{ dir, cleanup, backbone, data }`.
 */
export async function colourWorkspace(
  name: string,
  perClass = 8,
): Promise<{ dir: string; cleanup: () => Promise<void>; backbone: string; data: string }> {
  const { dir, cleanup } = await tempDir(name);
  const backbone = await writeTinyBackbone(dir);
  const data = path.join(dir, 'data');
  await writeColourDataset(data, perClass, RGB_CLASSES);
  return { dir, cleanup, backbone, data };
}

/**
 * A test file's colour workspace on the wasm backend: made before its tests, removed after.
 * Its fields are filled in by the time a test runs: `dir`, `backbone` (the tiny one), `data`.
 */
export function useColourWorkspace(
  name: string,
  perClass = 8,
): { dir: string; backbone: string; data: string } {
  const ws = { dir: '', backbone: '', data: '' };
  let cleanup: (() => Promise<void>) | null = null;
  before(async () => {
    await initBackend('wasm');
    const made = await colourWorkspace(name, perClass);
    Object.assign(ws, { dir: made.dir, backbone: made.backbone, data: made.data });
    cleanup = made.cleanup;
  });
  after(async () => {
    await cleanup?.();
  });
  return ws;
}
