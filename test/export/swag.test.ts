import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { cp, readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { after, before, test } from 'node:test';
import * as tf from '@tensorflow/tfjs';
import { initBackend } from '../../src/backend/index.js';
import { evaluate, predict } from '../../src/export/predict.js';
import { decodeSwag, encodeSwag, type SwagManifest } from '../../src/swa/swag.js';
import type { TrainSummary } from '../../src/train/events.js';
import { resolveTrainOptions } from '../../src/train/options.js';
import { train } from '../../src/train/train.js';
import { runCli, tempDir, writeColourDataset, writeTinyBackbone } from '../helpers.js';

let dir: string;
let cleanup: () => Promise<void>;
let backbone: string;
let data: string;
let run: string;
let summary: TrainSummary;

const sha = (bytes: string | Uint8Array) => createHash('sha256').update(bytes).digest('hex');

before(async () => {
  await initBackend('wasm');
  ({ dir, cleanup } = await tempDir('swag'));
  backbone = await writeTinyBackbone(dir);
  data = path.join(dir, 'data');
  await writeColourDataset(data, 8, {
    cyan: [20, 200, 200],
    magenta: [200, 20, 200],
    yellow: [220, 220, 30],
  });
  run = path.join(dir, 'run');
  const before = tf.memory().numTensors;
  summary = await train({
    data,
    out: run,
    backbone,
    backend: 'wasm',
    epochs: 8,
    swaStart: 0.5,
    swaLr: 0.05,
    lr: 0.05,
    batchSize: 8,
    swag: 3,
    cache: false,
  });
  assert.equal(tf.memory().numTensors, before);
});
after(async () => {
  await cleanup();
});

/** The model folder's model.json, swag.json and swag.bin. */
async function readExport(folder: string) {
  const model = path.join(folder, 'model');
  const json = JSON.parse(await readFile(path.join(model, 'model.json'), 'utf8'));
  const manifestText = await readFile(path.join(model, 'swag.json'), 'utf8');
  const bin = new Uint8Array(await readFile(path.join(model, 'swag.bin')));
  return { model, json, manifestText, bin };
}

test('--swag K writes swag.json and swag.bin beside the model, their hashes recorded', async () => {
  assert.equal(summary.exported, 'head-swa');
  // Snapshots after epochs 5…8: four, of which the last three deviations are kept.
  assert.equal(summary.stages.head!.snapshots, 4);
  assert.deepEqual(summary.stages.head!.swag, { rank: 3, deviations: 3 });
  const { json, manifestText, bin } = await readExport(run);
  const meta = json.userDefinedMetadata;
  assert.deepEqual(meta.swag, {
    manifest: 'swag.json',
    manifestSha256: sha(manifestText),
    rank: 3,
    snapshots: 4,
  });
  const manifest = JSON.parse(manifestText) as SwagManifest;
  assert.equal(manifest.sha256, sha(bin));
  assert.deepEqual(
    manifest.variables.map((v) => v.name),
    ['head_logits/kernel', 'head_logits/bias'],
  );
  // The exported weights are the SWA mean, which is SWAG's first moment.
  const state = decodeSwag(manifest, bin, { manifest: 'swag.json', data: 'swag.bin' });
  const weights = new Float32Array(
    new Uint8Array(await readFile(path.join(run, 'model', 'weights.bin'))).buffer,
  );
  const names = json.weightsManifest[0].weights.map((w: { name: string }) => w.name);
  const kernelAt = names.indexOf('head_logits/kernel');
  let offset = 0;
  for (const w of json.weightsManifest[0].weights.slice(0, kernelAt))
    offset += w.shape.reduce((a: number, b: number) => a * b, 1);
  const n = state.mean.length;
  const exported = weights.subarray(offset, offset + n);
  for (let i = 0; i < n; i++)
    assert.ok(Math.abs(exported[i]! - state.mean[i]!) < 1e-5, `mean ${i}`);
});

test('evaluate --samples 4 averages sampled weight sets: it differs from --samples 1', async () => {
  const before = tf.memory().numTensors;
  const one = await evaluate({ model: run, data, backend: 'wasm', engine: 'tfjs' });
  const four = await evaluate({ model: run, data, backend: 'wasm', samples: 4 });
  const again = await evaluate({ model: run, data, backend: 'wasm', samples: 4 });
  const seeded = await evaluate({ model: run, data, backend: 'wasm', samples: 4, seed: 9 });
  // The layers before the sampled ones run once per batch, here on tfjs instead of ONNX.
  const viaTfjs = await evaluate({ model: run, data, backend: 'wasm', samples: 4, engine: 'tfjs' });
  assert.equal(tf.memory().numTensors, before);
  assert.equal(one.samples, 1);
  assert.equal(four.samples, 4);
  assert.equal(four.engine, 'onnx');
  assert.equal(viaTfjs.engine, 'tfjs');
  assert.ok(
    Math.abs(viaTfjs.calibration!.nll - four.calibration!.nll) < 1e-4,
    `nll ${viaTfjs.calibration!.nll} vs ${four.calibration!.nll}`,
  );
  assert.equal(four.count, 24);
  assert.ok(
    Math.abs(four.calibration!.nll - one.calibration!.nll) > 1e-6,
    `nll ${four.calibration!.nll} vs ${one.calibration!.nll}`,
  );
  // Seeded: the same samples every time, other ones for another seed.
  assert.equal(again.calibration!.nll, four.calibration!.nll);
  assert.notEqual(seeded.calibration!.nll, four.calibration!.nll);
});

test('with zero variance every sample is the mean: --samples 1 and 5 give the SWA predictions', async () => {
  // The same export with every snapshot equal: second moment mean², no deviation.
  const flat = path.join(dir, 'run-zero');
  await cp(run, flat, { recursive: true });
  const { model, json, manifestText, bin } = await readExport(flat);
  const files = { manifest: 'swag.json', data: 'swag.bin' };
  const state = decodeSwag(JSON.parse(manifestText), bin, files);
  const zero = encodeSwag({
    ...state,
    sqMean: state.mean.map((m) => Math.fround(m * m)),
    deviations: state.deviations.map((d) => new Float32Array(d.length)),
  });
  const text = `${JSON.stringify(zero.manifest, null, 2)}\n`;
  await writeFile(path.join(model, 'swag.json'), text);
  await writeFile(path.join(model, 'swag.bin'), zero.data);
  json.userDefinedMetadata.swag.manifestSha256 = sha(text);
  await writeFile(path.join(model, 'model.json'), JSON.stringify(json));
  const before = tf.memory().numTensors;
  const swa = await predict({ model: run, inputs: [data], topK: 3, engine: 'tfjs' });
  const one = await predict({ model: flat, inputs: [data], topK: 3, samples: 1 });
  const five = await predict({ model: flat, inputs: [data], topK: 3, samples: 5 });
  assert.equal(tf.memory().numTensors, before);
  for (const other of [one, five]) {
    other.predictions.forEach((p, i) => {
      const q = swa.predictions[i]!;
      assert.equal(p.top[0]!.label, q.top[0]!.label);
      for (const t of p.top) {
        const same = q.top.find((x) => x.label === t.label)!;
        assert.ok(Math.abs(same.probability - t.probability) < 1e-5, `${p.path} ${t.label}`);
      }
    });
  }
});

test('--samples above 1 on a model without SWAG state, a changed swag.bin and bad flags are refused', async () => {
  const plain = path.join(dir, 'run-plain');
  await cp(run, plain, { recursive: true });
  const file = path.join(plain, 'model', 'model.json');
  const json = JSON.parse(await readFile(file, 'utf8'));
  delete json.userDefinedMetadata.swag;
  await writeFile(file, JSON.stringify(json));
  const before = tf.memory().numTensors;
  await assert.rejects(evaluate({ model: plain, data, samples: 4 }), {
    message: `samples 4 needs SWAG state beside the model (train with --swag K), and ${path.join(plain, 'model')} has none`,
  });
  const cli = await runCli(['evaluate', '--model', plain, '--data', data, '--samples', '4'], dir);
  assert.equal(cli.code, 2, cli.stderr);
  assert.match(cli.stderr, /--samples 4 needs SWAG state beside the model/);
  // swag.bin changed after export.
  const changed = path.join(dir, 'run-changed');
  await cp(run, changed, { recursive: true });
  const binFile = path.join(changed, 'model', 'swag.bin');
  const bin = new Uint8Array(await readFile(binFile));
  bin[0] = bin[0]! ^ 1;
  await writeFile(binFile, bin);
  await assert.rejects(predict({ model: changed, inputs: [data], samples: 2 }), {
    message: `${binFile}: does not match the sha256 in ${path.join(changed, 'model', 'swag.json')}; the model folder was changed after export`,
  });
  await assert.rejects(evaluate({ model: run, data, seed: 3 }), {
    message: 'seed seeds SWAG samples and needs samples above 1',
  });
  await assert.rejects(evaluate({ model: run, data, samples: 0 }), {
    message: 'Expected an integer from 1 to 10000 for samples but received 0',
  });
  assert.equal(tf.memory().numTensors, before);
});

test('--swag takes 0 or an integer of at least 2, and needs --average swa', () => {
  assert.equal(resolveTrainOptions({ data: 'x' }).swag, 0);
  assert.equal(resolveTrainOptions({ data: 'x', swag: 5 }).swag, 5);
  assert.throws(() => resolveTrainOptions({ data: 'x', swag: 1 }), {
    message: 'Expected 0 (off) or an integer from 2 to 1000 for swag but received 1',
  });
  assert.throws(() => resolveTrainOptions({ data: 'x', swag: 3, average: 'ema' }), {
    message: 'swag needs average swa (it is collected at the SWA snapshots)',
  });
});

test('a fine-tune stage with --swag exports its SWAG state over the unfrozen layers and the head', async () => {
  const ft = path.join(dir, 'ft');
  const before = tf.memory().numTensors;
  const s = await train({
    data,
    out: ft,
    backbone,
    backend: 'wasm',
    epochs: 6,
    lr: 0.05,
    batchSize: 8,
    finetuneEpochs: 4,
    finetuneSwaStart: 0.5,
    unfreeze: 'from:dw1',
    finetuneLr: 0.01,
    swag: 2,
    cache: false,
  });
  assert.equal(tf.memory().numTensors, before);
  assert.equal(s.exported, 'finetune-swa');
  assert.deepEqual(s.stages.finetune!.swag, { rank: 2, deviations: 2 });
  const { manifestText } = await readExport(ft);
  const names = (JSON.parse(manifestText) as SwagManifest).variables.map((v) => v.name);
  assert.ok(names.includes('head_logits/kernel'), names.join(', '));
  assert.ok(
    names.some((n) => n.startsWith('dw1/')),
    names.join(', '),
  );
  const three = await evaluate({ model: ft, data, backend: 'wasm', samples: 3 });
  assert.equal(three.count, 24);
  assert.equal(tf.memory().numTensors, before);
});
