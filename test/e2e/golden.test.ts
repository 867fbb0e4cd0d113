import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { after, before, test } from 'node:test';
import * as tf from '@tensorflow/tfjs';
import { initBackend } from '../../src/backend/index.js';
import { train } from '../../src/train/train.js';
import { ROOT, SAMPLE, tempDir } from '../helpers.js';

// A fixed run on the shipped sample set, recorded once and compared on every change: the
// figures within 1e-6 and the exported weights byte for byte. Frozen passes run on the tfjs
// engine and training on wasm, whose arithmetic does not depend on the host CPU (ONNX
// Runtime picks kernels by CPU, so its last bits may differ between machines).
// GOLDEN_RECORD=1 writes the fixture again: only for a change that is meant to alter results,
// and say so in the commit.
const FIXTURE = path.join(ROOT, 'test', 'fixtures', 'golden-run.json');

interface Golden {
  figures: Record<string, number>;
  weightsSha256: string;
  weightNames: string[];
}

let dir: string;
let cleanup: () => Promise<void>;
before(async () => {
  await initBackend('wasm');
  ({ dir, cleanup } = await tempDir('golden'));
});
after(async () => {
  await cleanup();
});

function flatten(prefix: string, value: unknown, out: Record<string, number>): void {
  if (typeof value === 'number') out[prefix] = value;
  else if (value && typeof value === 'object')
    for (const [k, v] of Object.entries(value)) flatten(prefix ? `${prefix}.${k}` : k, v, out);
}

test('the golden run: same figures (1e-6) and the same exported weights as recorded', async () => {
  const before = tf.memory().numTensors;
  const out = path.join(dir, 'run');
  const summary = await train({
    data: SAMPLE,
    out,
    backend: 'wasm',
    engine: 'tfjs',
    cache: false,
    seed: 7,
    epochs: 8,
    swaStart: 0.5,
    inputSize: 96,
    finetuneEpochs: 3,
    unfreeze: 'blocks:1',
    finetuneSwaStart: 1,
    // Recorded in the figures; the default follows the cores.
    finetuneThreads: 2,
  });
  assert.equal(tf.memory().numTensors, before);
  const figures: Record<string, number> = {};
  flatten('stages', summary.stages, figures);
  flatten('val', summary.val, figures);
  flatten('test', summary.test, figures);
  const modelJson = JSON.parse(await readFile(path.join(out, 'model', 'model.json'), 'utf8'));
  const weightNames = modelJson.weightsManifest.flatMap((g: { weights: { name: string }[] }) =>
    g.weights.map((w) => w.name),
  );
  const bin = await readFile(path.join(out, 'model', 'weights.bin'));
  const got: Golden = {
    figures,
    weightsSha256: createHash('sha256').update(bin).digest('hex'),
    weightNames,
  };
  if (process.env['GOLDEN_RECORD'] === '1') {
    await writeFile(FIXTURE, `${JSON.stringify(got, null, 2)}\n`);
    return;
  }
  const want = JSON.parse(await readFile(FIXTURE, 'utf8')) as Golden;
  assert.deepEqual(Object.keys(got.figures).sort(), Object.keys(want.figures).sort());
  for (const [k, v] of Object.entries(want.figures)) {
    assert.ok(Math.abs(got.figures[k]! - v) <= 1e-6, `${k}: ${got.figures[k]} vs recorded ${v}`);
  }
  assert.deepEqual(got.weightNames, want.weightNames);
  assert.equal(got.weightsSha256, want.weightsSha256, 'exported weights differ from the record');
});
