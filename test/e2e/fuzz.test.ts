import assert from 'node:assert/strict';
import { mkdir, readdir, readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { after, before, test } from 'node:test';
import * as tf from '@tensorflow/tfjs';
import sharp from 'sharp';
import { initBackend } from '../../src/backend/index.js';
import { predict } from '../../src/export/predict.js';
import { train } from '../../src/train/train.js';
import { seededRandom } from '../../src/util/random.js';
import { SAMPLE, tempDir, writeTinyBackbone } from '../helpers.js';

// 500 damaged copies of the shipped sample images through train and predict: nothing may
// crash or hang, and every file is either used or listed as skipped.

const SEED = 20261130;
const PER_CLASS = 50;

let dir: string;
let cleanup: () => Promise<void>;
let data: string;
let backbone: string;
let files: string[];

type Mutation = (bytes: Buffer, other: Buffer, random: () => number) => Buffer;
const int = (random: () => number, n: number): number => Math.floor(random() * n);

/** Each mutation is named in the file name, so a failure says which kind broke. */
const MUTATIONS: Readonly<Record<string, Mutation>> = Object.freeze({
  intact: (b) => Buffer.from(b),
  bitflip: (b, _o, random) => {
    const out = Buffer.from(b);
    const flips = 1 + int(random, 24);
    for (let i = 0; i < flips; i++) out[int(random, out.length)]! ^= 1 << int(random, 8);
    return out;
  },
  truncate: (b, _o, random) => b.subarray(0, int(random, b.length)),
  // The other format's header on this body: a PNG signature on JPEG data and vice versa.
  splice: (b, o, random) =>
    Buffer.concat([o.subarray(0, 8 + int(random, 64)), b.subarray(8 + int(random, 64))]),
  zeros: (b, _o, random) => {
    const out = Buffer.from(b);
    const at = int(random, out.length);
    out.fill(0, at, Math.min(out.length, at + 1 + int(random, 256)));
    return out;
  },
  repeat: (b, _o, random) => {
    const at = int(random, b.length);
    const chunk = b.subarray(at, at + 1 + int(random, 512));
    return Buffer.concat([b.subarray(0, at), chunk, chunk, chunk, b.subarray(at)]);
  },
  garbage: (b, _o, random) => {
    const head = b.subarray(0, 16 + int(random, 48));
    const tail = Buffer.alloc(int(random, 2048));
    for (let i = 0; i < tail.length; i++) tail[i] = int(random, 256);
    return Buffer.concat([head, tail]);
  },
});

before(async () => {
  await initBackend('wasm');
  ({ dir, cleanup } = await tempDir('fuzz'));
  backbone = await writeTinyBackbone(dir);
  data = path.join(dir, 'data');
  const random = seededRandom(SEED);
  const kinds = Object.keys(MUTATIONS);
  const classes = (await readdir(path.join(SAMPLE, 'train'))).sort();
  files = [];
  for (const c of classes) {
    const names = (await readdir(path.join(SAMPLE, 'train', c))).sort().slice(0, 5);
    const pngs = await Promise.all(names.map((n) => readFile(path.join(SAMPLE, 'train', c, n))));
    const jpegs = await Promise.all(pngs.map((p) => sharp(p).jpeg({ quality: 90 }).toBuffer()));
    await mkdir(path.join(data, c), { recursive: true });
    for (let i = 0; i < PER_CLASS; i++) {
      const jpeg = i % 2 === 1;
      const source = (jpeg ? jpegs : pngs)[i % pngs.length]!;
      const other = (jpeg ? pngs : jpegs)[int(random, pngs.length)]!;
      // One in five intact keeps every class trainable.
      const kind = i % 5 === 0 ? 'intact' : kinds[1 + int(random, kinds.length - 1)]!;
      const file = path.join(
        data,
        c,
        `${String(i).padStart(2, '0')}-${kind}.${jpeg ? 'jpg' : 'png'}`,
      );
      await writeFile(file, MUTATIONS[kind]!(source, other, random));
      files.push(file);
    }
  }
  assert.equal(files.length, 500);
});

after(async () => {
  await cleanup();
});

test('500 mutated sample images through train and predict: every file used or skipped', {
  timeout: 300_000,
}, async (t) => {
  const before = tf.memory().numTensors;
  const out = path.join(dir, 'run');
  const summary = await train({
    data,
    out,
    backbone,
    epochs: 2,
    batchSize: 32,
    cache: false,
    seed: SEED,
  });
  assert.equal(tf.memory().numTensors, before);
  const used = (counts: Record<string, number>) => Object.values(counts).reduce((a, n) => a + n, 0);
  const trained = used(summary.counts.train) + used(summary.counts.val);
  assert.equal(trained + summary.skipped.length, files.length);
  const trainSkipped = summary.skipped.map((s) => s.path).sort();
  assert.equal(new Set(trainSkipped).size, trainSkipped.length);
  for (const s of summary.skipped) assert.ok(s.reason.length > 0, s.path);
  // Intact files are always used; the mutations give a mix.
  assert.ok(!trainSkipped.some((p) => p.includes('-intact.')));
  assert.ok(
    summary.skipped.length > 50 && trained > 150,
    `${trained} used, ${trainSkipped.length} skipped`,
  );

  t.diagnostic(`${trained} files used, ${summary.skipped.length} skipped`);
  const result = await predict({ model: out, inputs: [data], topK: 1 });
  const predicted = result.predictions.map((p) => p.path);
  const skipped = result.skipped.map((s) => s.path);
  assert.deepEqual([...predicted, ...skipped].sort(), [...files].sort());
  // The same decoder on the same bytes: the same files are unusable in both.
  assert.deepEqual(skipped.sort(), trainSkipped);
  for (const p of result.predictions) {
    const top = p.top[0]!;
    assert.ok(Number.isFinite(top.probability) && summary.classes.includes(top.label), p.path);
  }
  assert.equal(tf.memory().numTensors, before);
});
