import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { access, mkdir, readdir, readFile } from 'node:fs/promises';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import { after, before, test } from 'node:test';
import * as tf from '@tensorflow/tfjs';
import { type Browser, chromium } from 'playwright-core';
import sharp from 'sharp';
import { initBackend } from '../../src/backend/index.js';
import { train } from '../../src/train/train.js';
import { CLI, ROOT, SAMPLE, tempDir } from '../helpers.js';

// The README's client examples (scripts/clients/) against `finetune predict` on the same
// export: each must give the same top label for ≥ 99% of the images and probabilities
// within 0.01. Images: the sample test set (28×28 PNGs, enlarged) and large photo-like
// JPEGs and PNGs (shrunk), one with EXIF orientation and one with alpha.
const CHROMIUM = '/usr/bin/chromium';
const CLIENTS = path.join(ROOT, 'scripts', 'clients');
const TFJS_CDN = 'https://cdn.jsdelivr.net/npm/@tensorflow/tfjs@4.22.0/dist/tf.min.js';
const TFJS_LOCAL = path.join(ROOT, 'node_modules', '@tensorflow', 'tfjs', 'dist', 'tf.min.js');

let dir: string;
let cleanup: () => Promise<void>;
let modelDir: string;
let labels: string[];
let images: string[];
/** finetune predict --engine onnx: image → probabilities in label order. */
let reference: Map<string, number[]>;

function run(
  args: readonly string[],
): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, args, { cwd: ROOT });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => {
      stdout += d;
    });
    child.stderr.on('data', (d) => {
      stderr += d;
    });
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, stdout, stderr }));
  });
}

async function predictCli(engine: 'onnx' | 'tfjs'): Promise<Map<string, number[]>> {
  const out = await run([
    CLI,
    'predict',
    '--model',
    path.dirname(modelDir),
    '--engine',
    engine,
    '--format',
    'json',
    '--top-k',
    String(labels.length),
    ...images,
  ]);
  assert.equal(out.code, 0, out.stderr);
  const { predictions } = JSON.parse(out.stdout) as {
    predictions: { path: string; top: { label: string; probability: number }[] }[];
  };
  const byFile = new Map<string, number[]>();
  for (const p of predictions) {
    const probs = labels.map((l) => p.top.find((t) => t.label === l)!.probability);
    byFile.set(p.path, probs);
  }
  assert.equal(byFile.size, images.length);
  return byFile;
}

/** Top-1 agreement and the largest probability difference against `reference`, as figures. */
function agreement(got: Map<string, number[]>, label: string): string {
  assert.equal(got.size, images.length, `${label}: one answer per image`);
  let same = 0;
  let worst = 0;
  const argmax = (p: number[]) => p.indexOf(Math.max(...p));
  for (const [file, want] of reference) {
    const p = got.get(file);
    assert.ok(p, `${label}: no answer for ${file}`);
    if (argmax(p) === argmax(want)) same++;
    for (let i = 0; i < want.length; i++) worst = Math.max(worst, Math.abs(p[i]! - want[i]!));
  }
  const rate = same / images.length;
  assert.ok(rate >= 0.99, `${label}: top-1 agreement ${same}/${images.length}`);
  assert.ok(worst <= 0.01, `${label}: max |Δp| ${worst}`);
  return `${label}: top-1 ${same}/${images.length}, max |Δp| ${worst.toExponential(2)}`;
}

/** A client script's JSON lines as image → probabilities. */
function parseLines(stdout: string): Map<string, number[]> {
  const out = new Map<string, number[]>();
  for (const line of stdout.trim().split('\n')) {
    const { file, probabilities } = JSON.parse(line) as { file: string; probabilities: number[] };
    out.set(file, probabilities);
  }
  return out;
}

/** Large photo-like images: smooth shapes plus noise, so shrinking has detail to alias. */
async function writePhotos(into: string, sources: readonly string[]): Promise<string[]> {
  await mkdir(into, { recursive: true });
  const written: string[] = [];
  for (const [i, src] of sources.entries()) {
    const [w, h] = i % 2 ? [1280, 960] : [900, 1200];
    const noise = await sharp({
      create: {
        width: w,
        height: h,
        channels: 3,
        background: '#000',
        noise: { type: 'gaussian', mean: 128, sigma: 40 },
      },
    })
      .png()
      .toBuffer();
    const base = sharp(src)
      .resize(w, h, { kernel: 'cubic' })
      .composite([{ input: noise, blend: 'soft-light' }]);
    const file = path.join(into, `photo-${i}.${i === 3 ? 'png' : 'jpg'}`);
    if (i === 2) {
      // Stored sideways with EXIF orientation 6: every client must turn it upright.
      const raw = await base.raw().toBuffer({ resolveWithObject: true });
      await sharp(raw.data, { raw: raw.info })
        .rotate(-90)
        .jpeg({ quality: 88 })
        .withMetadata({ orientation: 6 })
        .toFile(file);
    } else if (i === 3) {
      await base.ensureAlpha(0.75).png().toFile(file);
    } else {
      await base.jpeg({ quality: 85 }).toFile(file);
    }
    written.push(file);
  }
  return written;
}

before(async () => {
  await initBackend('wasm');
  ({ dir, cleanup } = await tempDir('clients'));
  const out = path.join(dir, 'run');
  const before = tf.memory().numTensors;
  await train({
    data: path.join(SAMPLE, 'train'),
    out,
    backend: 'wasm',
    epochs: 4,
    inputSize: 128,
    cache: false,
  });
  assert.equal(tf.memory().numTensors, before);
  modelDir = path.join(out, 'model');
  labels = JSON.parse(await readFile(path.join(out, 'labels.json'), 'utf8')) as string[];
  const test = path.join(SAMPLE, 'test');
  images = [];
  for (const cls of (await readdir(test)).sort()) {
    for (const f of (await readdir(path.join(test, cls))).sort()) {
      images.push(path.join(test, cls, f));
    }
  }
  const sources = [0, 40, 80, 120, 160, 199].map((i) => images[i]!);
  images.push(...(await writePhotos(path.join(dir, 'photos'), sources)));
  reference = await predictCli('onnx');
});
after(async () => {
  await cleanup?.();
});

test('finetune predict: the tfjs and onnx engines agree', async (t) => {
  t.diagnostic(agreement(await predictCli('tfjs'), 'predict --engine tfjs'));
});

test('onnxruntime-node client (scripts/clients/onnxruntime-node.mjs) agrees with predict', async (t) => {
  const out = await run([path.join(CLIENTS, 'onnxruntime-node.mjs'), modelDir, ...images]);
  assert.equal(out.code, 0, out.stderr);
  t.diagnostic(agreement(parseLines(out.stdout), 'onnxruntime-node'));
});

test('plain Node @tensorflow/tfjs client (scripts/clients/node-tfjs.mjs) agrees with predict', async (t) => {
  const out = await run([path.join(CLIENTS, 'node-tfjs.mjs'), modelDir, ...images]);
  assert.equal(out.code, 0, out.stderr);
  t.diagnostic(agreement(parseLines(out.stdout), 'node @tensorflow/tfjs'));
});

/** Serves /clients/ (scripts/clients), /model/ (the export) and /images/ (by index) on 127.0.0.1. */
async function serve(): Promise<{ server: Server; base: string }> {
  const roots: Record<string, string> = { '/clients/': CLIENTS, '/model/': modelDir };
  const types: Record<string, string> = {
    '.html': 'text/html',
    '.mjs': 'text/javascript',
    '.js': 'text/javascript',
    '.json': 'application/json',
  };
  const server = createServer((req, res) => {
    const url = new URL(req.url ?? '/', 'http://127.0.0.1');
    let file: string | undefined;
    if (url.pathname.startsWith('/images/')) file = images[Number(url.pathname.slice(8))];
    else {
      const prefix = Object.keys(roots).find((p) => url.pathname.startsWith(p));
      const rel = prefix ? decodeURIComponent(url.pathname.slice(prefix.length)) : '';
      if (prefix && !rel.split('/').includes('..')) file = path.join(roots[prefix]!, rel);
    }
    if (!file) {
      res.writeHead(404).end();
      return;
    }
    readFile(file).then(
      (body) => {
        const type = types[path.extname(file)] ?? 'application/octet-stream';
        res.writeHead(200, { 'content-type': type }).end(body);
      },
      () => res.writeHead(404).end(),
    );
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return { server, base: `http://127.0.0.1:${(server.address() as AddressInfo).port}` };
}

test('browser client (scripts/clients/browser.html) in headless Chromium agrees with predict', async (t) => {
  try {
    await access(CHROMIUM);
  } catch {
    assert.fail(
      `${CHROMIUM} is missing: this test needs Debian's chromium (apt-get install -y chromium)`,
    );
  }
  const { server, base } = await serve();
  let browser: Browser | null = null;
  try {
    browser = await chromium.launch({
      executablePath: CHROMIUM,
      headless: true,
      args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking'],
    });
    const page = await browser.newPage();
    const errors: string[] = [];
    page.on('pageerror', (e) => errors.push(e.message));
    // No network here: the page's CDN script is answered with the same file from node_modules.
    await page.route(TFJS_CDN, (route) =>
      route.fulfill({ path: TFJS_LOCAL, contentType: 'text/javascript' }),
    );
    await page.route(
      (url) => !url.href.startsWith(base) && url.href !== TFJS_CDN,
      (route) => route.abort(),
    );
    await page.goto(`${base}/clients/browser.html?model=/model/`);
    const results = await page.evaluate(async (count) => {
      const w = globalThis as unknown as {
        classifier: Promise<{ classify(b: Blob): Promise<{ probabilities: number[] }> }>;
      };
      const { classify } = await w.classifier;
      const out: number[][] = [];
      for (let i = 0; i < count; i++) {
        const blob = await (await fetch(`/images/${i}`)).blob();
        out.push((await classify(blob)).probabilities);
      }
      return out;
    }, images.length);
    assert.deepEqual(errors, []);
    t.diagnostic(agreement(new Map(images.map((f, i) => [f, results[i]!])), 'browser'));
  } finally {
    await browser?.close();
    await new Promise((resolve) => server.close(resolve));
  }
});

test('the README points at every client example', async () => {
  const readme = await readFile(path.join(ROOT, 'README.md'), 'utf8');
  for (const f of await readdir(CLIENTS)) {
    assert.ok(
      readme.includes(`scripts/clients/${f}`),
      `README does not mention scripts/clients/${f}`,
    );
  }
});
