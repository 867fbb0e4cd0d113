import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { cp, mkdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { pathToFileURL } from 'node:url';
import * as tf from '@tensorflow/tfjs';
import * as ort from 'onnxruntime-node';
import { initBackend } from '../../src/backend/index.js';
import { preprocessRgba } from '../../src/data/preprocess.js';
import type { FinetuneError } from '../../src/errors.js';
import { CONTRACT, readOnnxMetadata } from '../../src/export/contract.js';
import { evaluate, predict } from '../../src/export/predict.js';
import { train } from '../../src/train/train.js';
import { tempDir, writeColourDataset, writeTinyBackbone, writeTinyGraphModel } from '../helpers.js';

let dir: string;
let cleanup: () => Promise<void>;
let run: string;
let data: string;

before(async () => {
  await initBackend('wasm');
  ({ dir, cleanup } = await tempDir('predict'));
  const backbone = await writeTinyBackbone(dir);
  data = path.join(dir, 'data');
  await writeColourDataset(data, 8, {
    cyan: [20, 200, 200],
    magenta: [200, 20, 200],
    yellow: [220, 220, 30],
  });
  run = path.join(dir, 'run');
  const summary = await train({
    data,
    out: run,
    backbone,
    backend: 'wasm',
    epochs: 15,
    lr: 0.05,
    batchSize: 8,
    cache: false,
  });
  assert.equal(summary.onnx, path.join(run, 'model', 'model.onnx'));
});
after(async () => {
  await cleanup();
});

test('model.onnx and the tfjs export give the same probabilities', async () => {
  const before = tf.memory().numTensors;
  const viaTfjs = await predict({
    model: run,
    inputs: [data],
    topK: 3,
    engine: 'tfjs',
    backend: 'wasm',
  });
  const viaOnnx = await predict({
    model: run,
    inputs: [data],
    topK: 3,
    engine: 'onnx',
    backend: 'wasm',
  });
  assert.equal(tf.memory().numTensors, before);
  assert.equal(viaTfjs.engine, 'tfjs');
  assert.equal(viaOnnx.engine, 'onnx');
  assert.equal(viaTfjs.predictions.length, 24);
  let worst = 0;
  viaTfjs.predictions.forEach((p, i) => {
    const q = viaOnnx.predictions[i]!;
    assert.equal(q.path, p.path);
    assert.equal(q.top[0]!.label, p.top[0]!.label);
    for (const t of p.top) {
      const other = q.top.find((x) => x.label === t.label)!;
      worst = Math.max(worst, Math.abs(other.probability - t.probability));
    }
  });
  assert.ok(worst <= 1e-4, `max abs difference ${worst}`);
});

test('without a usable model.onnx the classifier still runs and says why', async () => {
  const before = tf.memory().numTensors;
  const used = await predict({ model: run, inputs: [data], engine: 'onnx' });
  assert.equal(used.onnxFallback, null);
  const viaTfjs = await predict({ model: run, inputs: [data], engine: 'tfjs' });
  assert.equal(viaTfjs.onnxFallback, null); // not wanted, so not a fallback
  // None exported: the normal fallback, lowered again here.
  const none = path.join(dir, 'run-no-onnx');
  await cp(run, none, { recursive: true });
  await rm(path.join(none, 'model', 'model.onnx'));
  const lowered = await predict({ model: none, inputs: [data] });
  assert.deepEqual(lowered.onnxFallback, { reason: 'no model.onnx', error: false });
  assert.equal(lowered.engine, 'onnx');
  // One that cannot be read: reported as an error, and the run goes on.
  const broken = path.join(dir, 'run-bad-onnx');
  await cp(none, broken, { recursive: true });
  const file = path.join(broken, 'model', 'model.onnx');
  await mkdir(file);
  const report = await evaluate({ model: broken, data });
  assert.deepEqual(report.onnxFallback, { reason: `${file}: not a regular file`, error: true });
  assert.equal(report.count, 24);
  lowered.predictions.forEach((p, i) => {
    assert.equal(p.top[0]!.label, used.predictions[i]!.top[0]!.label);
    assert.ok(Math.abs(p.top[0]!.probability - used.predictions[i]!.top[0]!.probability) <= 1e-5);
  });
  assert.equal(tf.memory().numTensors, before);
});

test('evaluate reports per-class figures on labelled folders; unknown classes are named', async () => {
  const report = await evaluate({ model: run, data, backend: 'wasm' });
  assert.equal(report.count, 24);
  assert.deepEqual(report.labels, ['cyan', 'magenta', 'yellow']);
  assert.ok(report.accuracy >= 0.9, `accuracy ${report.accuracy}`);
  const other = path.join(dir, 'other');
  await writeColourDataset(other, 1, { black: [0, 0, 0] });
  await assert.rejects(evaluate({ model: run, data: other }), {
    message: `${path.join(other, 'black')}: class 'black' is not one of the training classes (cyan, magenta, yellow)`,
  });
});

test('predict: bad inputs are named', async () => {
  await assert.rejects(predict({ model: run, inputs: [path.join(dir, 'missing.png')] }), {
    message: `${path.join(dir, 'missing.png')}: no such file or folder`,
  });
  await assert.rejects(predict({ model: run, inputs: [data], topK: 0 }), {
    message: 'Expected a positive integer for topK but received 0',
  });
  await assert.rejects(predict({ model: dir, inputs: [data] }), /no model found/);
});

test('a graph-model backbone exports the head alone plus a reference to the backbone, which predict follows', async () => {
  const own = path.join(dir, 'graph');
  const graph = await writeTinyGraphModel(own);
  const out = path.join(own, 'run');
  const summary = await train({
    data,
    out,
    backbone: graph,
    backend: 'wasm',
    // in this thread: a worker pool would load tfjs again in every worker, for 24 tiny images
    workers: 1,
    epochs: 30,
    lr: 0.05,
    batchSize: 8,
    cache: false,
  });
  assert.equal(summary.onnx, null, 'a head without its backbone is not a classifier to lower');
  const modelJson = JSON.parse(await readFile(path.join(out, 'model', 'model.json'), 'utf8'));
  const meta = modelJson.userDefinedMetadata;
  assert.equal(meta.contents, 'head');
  assert.deepEqual(meta.backbone.source, { kind: 'model-json', location: graph });
  assert.equal(meta.backbone.inputSize, 32);
  const names: string[] = modelJson.weightsManifest.flatMap((g: { weights: { name: string }[] }) =>
    g.weights.map((w) => w.name),
  );
  assert.ok(names.length > 0 && names.every((n) => n.startsWith('head_')), names.join(', '));

  const before = tf.memory().numTensors;
  const result = await predict({ model: out, inputs: [data], topK: 1, backend: 'wasm' });
  assert.equal(tf.memory().numTensors, before);
  assert.equal(result.predictions.length, 24);
  const right = result.predictions.filter(
    (p) => path.basename(path.dirname(p.path)) === p.top[0]!.label,
  );
  assert.ok(right.length >= 22, `${right.length}/24 right`);
  // the backbone really is read from the reference: without it predict says which file is missing
  await rename(path.dirname(graph), `${path.dirname(graph)}-moved`);
  await assert.rejects(predict({ model: out, inputs: [data] }), (err: Error) =>
    err.message.includes(graph),
  );
});

test('both exports carry labels, input spec, contract, run id and weights hash, with the same names', async () => {
  const model = path.join(run, 'model');
  const json = JSON.parse(await readFile(path.join(model, 'model.json'), 'utf8'));
  const meta = json.userDefinedMetadata;
  const weights = await readFile(path.join(model, 'weights.bin'));
  assert.equal(meta.weightsSha256, createHash('sha256').update(weights).digest('hex'));
  assert.match(meta.runId, /^[0-9a-f-]{36}$/);
  assert.deepEqual(meta.contract, CONTRACT);
  assert.deepEqual(meta.input, {
    format: 'raw-rgb',
    size: 32,
    resize: 'fill',
    name: 'pixels',
    layout: 'nhwc',
    dtype: 'float32',
    shape: [null, 32, 32, 3],
    range: [0, 255],
  });
  assert.deepEqual(meta.output, { name: 'output', shape: [null, 3] });
  const topology = json.modelTopology.config;
  assert.deepEqual(topology.input_layers, [['pixels', 0, 0]]);
  assert.deepEqual(topology.output_layers, [['output', 0, 0]]);

  const bytes = await readFile(path.join(model, 'model.onnx'));
  const props = readOnnxMetadata(bytes, 'model.onnx');
  assert.deepEqual(JSON.parse(props['labels']!), ['cyan', 'magenta', 'yellow']);
  assert.deepEqual(JSON.parse(props['input']!), {
    ...meta.input,
    layout: 'nchw',
    shape: [null, 3, 32, 32],
  });
  assert.deepEqual(JSON.parse(props['output']!), meta.output);
  assert.deepEqual(JSON.parse(props['preprocessing']!), CONTRACT);
  assert.equal(props['run_id'], meta.runId);
  assert.equal(props['weights_sha256'], meta.weightsSha256);
  assert.deepEqual(JSON.parse(props['tfjs_finetune']!).labels, meta.labels);
  const session = await ort.InferenceSession.create(bytes);
  assert.deepEqual([session.inputNames, session.outputNames], [['pixels'], ['output']]);
  await session.release();
  // The reference preprocessing code ships beside the model, and is the toolkit's.
  const shipped = await import(pathToFileURL(path.join(model, 'preprocess.js')).href);
  assert.equal(shipped.PREPROCESS_CONTRACT, CONTRACT.id);
  const pixels = Uint8Array.from({ length: 7 * 5 * 4 }, (_, i) => (i * 37) % 256);
  assert.deepEqual(shipped.preprocessRgba(pixels, 7, 5, 3), preprocessRgba(pixels, 7, 5, 3));
});

test('a model.onnx from another export is refused, naming the file, whatever the engine', async () => {
  const other = path.join(dir, 'run-other');
  await train({
    data,
    out: other,
    backbone: await writeTinyBackbone(path.join(dir, 'other-bb'), 2),
    backend: 'wasm',
    epochs: 2,
    batchSize: 8,
    cache: false,
  });
  const stale = path.join(dir, 'run-stale');
  await cp(run, stale, { recursive: true });
  const file = path.join(stale, 'model', 'model.onnx');
  await cp(path.join(other, 'model', 'model.onnx'), file);
  const before = tf.memory().numTensors;
  for (const engine of ['onnx', 'tfjs'] as const) {
    await assert.rejects(
      predict({ model: stale, inputs: [data], engine }),
      (err: FinetuneError) => {
        assert.match(
          err.message,
          new RegExp(
            `^${file.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}: was not exported with model.json beside it \\(run id [0-9a-f-]{36}, model.json has [0-9a-f-]{36}\\); export again or delete it$`,
          ),
        );
        assert.equal(err.exitCode, 3);
        return true;
      },
    );
  }
  await assert.rejects(
    evaluate({ model: stale, data }),
    /was not exported with model.json beside it/,
  );
  assert.equal(tf.memory().numTensors, before);
});

test('weights changed after export are refused, naming weights.bin', async () => {
  const changed = path.join(dir, 'run-changed');
  await cp(run, changed, { recursive: true });
  const file = path.join(changed, 'model', 'weights.bin');
  const bytes = await readFile(file);
  bytes[bytes.length - 1] ^= 0x01;
  await writeFile(file, bytes);
  const before = tf.memory().numTensors;
  await assert.rejects(predict({ model: changed, inputs: [data], engine: 'tfjs' }), {
    message: new RegExp(
      `^${file.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}: does not match the weights sha256 in model.json \\([0-9a-f]{64}, model.json has [0-9a-f]{64}\\); the model folder was changed after export$`,
    ),
  });
  assert.equal(tf.memory().numTensors, before);
});
