import assert from 'node:assert/strict';
import { cp, mkdir, readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { after, before, test } from 'node:test';
import * as tf from '@tensorflow/tfjs';
import { initBackend } from '../../src/backend/index.js';
import { FinetuneError } from '../../src/errors.js';
import { lrFind } from '../../src/experiments/lr-find.js';
import { HEAD_LOGITS } from '../../src/head/build.js';
import { HeadPopulation } from '../../src/head/population.js';
import { fileLoadHandler } from '../../src/io/files.js';
import type { TrainSummary } from '../../src/train/events.js';
import { headInit, readInitRun } from '../../src/train/init.js';
import type { TrainOptions } from '../../src/train/options.js';
import { prepareRun } from '../../src/train/run.js';
import { train } from '../../src/train/train.js';
import { runCli, tempDir, writeColourDataset, writeTinyBackbone } from '../helpers.js';

let dir: string;
let cleanup: () => Promise<void>;
let tiny: string;
let data: string;
/** The same classes plus `yellow`. */
let more: string;
let cacheDir: string;
/** A head-only run and a run with a fine-tune stage, both on `data`. */
let headRun: string;
let ftRun: string;
let headSummary: TrainSummary;
let ftSummary: TrainSummary;

const COLOURS: Record<string, [number, number, number]> = {
  red: [220, 30, 30],
  green: [30, 200, 40],
  blue: [20, 40, 230],
};

/** What every run here shares: the tiny backbone on wasm, the embedding cache in the temp folder. */
function base(o: Partial<TrainOptions> = {}): TrainOptions {
  return {
    data,
    backbone: tiny,
    backend: 'wasm',
    engine: 'onnx',
    batchSize: 8,
    cacheDir,
    ...o,
  } as TrainOptions;
}

async function weights(modelJson: string): Promise<Map<string, Float32Array>> {
  const m = await tf.loadLayersModel(fileLoadHandler(modelJson));
  const out = new Map(m.weights.map((w) => [w.originalName, w.read().dataSync() as Float32Array]));
  m.dispose();
  return out;
}

const json = async (file: string) => JSON.parse(await readFile(file, 'utf8'));

before(async () => {
  await initBackend('wasm');
  ({ dir, cleanup } = await tempDir('init'));
  tiny = await writeTinyBackbone(dir);
  data = path.join(dir, 'data');
  more = path.join(dir, 'more');
  cacheDir = path.join(dir, 'cache');
  await writeColourDataset(data, 10, COLOURS);
  await writeColourDataset(more, 10, { ...COLOURS, yellow: [230, 220, 20] });
  headRun = path.join(dir, 'head-run');
  ftRun = path.join(dir, 'ft-run');
  headSummary = await train(base({ out: headRun, epochs: 15, lr: 0.05 }));
  ftSummary = await train(
    base({
      out: ftRun,
      epochs: 10,
      lr: 0.05,
      finetuneEpochs: 3,
      unfreeze: 'from:dw1',
      finetuneLr: 0.01,
    }),
  );
  assert.equal(ftSummary.exported, 'finetune-swa');
});
after(async () => {
  await cleanup();
});

test('--init on the same classes starts at the exported weights: a tiny step keeps its validation figures', async () => {
  const before = tf.memory().numTensors;
  const tinyStep = { epochs: 1, lr: 1e-7, swa: false };
  const fresh = await train(base({ out: path.join(dir, 'fresh'), ...tinyStep }));
  const resumed = await train(base({ out: path.join(dir, 'resumed'), init: headRun, ...tinyStep }));
  assert.equal(tf.memory().numTensors, before);
  const old = headSummary.val!;
  assert.ok(
    Math.abs(resumed.val!.loss - old.loss) < 1e-4,
    `val loss ${resumed.val!.loss} vs the exported run's ${old.loss}`,
  );
  assert.equal(resumed.val!.acc, old.acc);
  // A fresh head after the same step is nowhere near (the check can fail).
  assert.ok(Math.abs(fresh.val!.loss - old.loss) > 0.1, `fresh ${fresh.val!.loss} vs ${old.loss}`);

  const meta = (await json(path.join(headRun, 'model', 'model.json'))).userDefinedMetadata;
  const record = resumed.stages['head']!.init!;
  assert.deepEqual(record, {
    run: headRun,
    runId: meta.runId,
    weightsSha256: meta.weightsSha256,
    weights: 'head-swa',
    body: 'backbone',
    kept: ['blue', 'green', 'red'],
    added: [],
  });
  const onDisk = await json(path.join(dir, 'resumed', 'summary.json'));
  assert.deepEqual(onDisk.stages.head.init, record);
  assert.equal((await json(path.join(dir, 'resumed', 'config.json'))).init, headRun);
  // The body is the backbone's own: the cached embeddings of the first run serve this one.
  assert.equal(resumed.cachedEmbeddings, 30);
});

test('--init with an added class: old rows are the export, exactly; the new row is the seed initialiser', async () => {
  const before = tf.memory().numTensors;
  const classes = ['blue', 'green', 'red', 'yellow'];
  const exported = await readInitRun(path.join(headRun, 'model'));
  assert.equal(exported.run, headRun);
  const init = headInit(headRun, exported, 0, classes);
  assert.deepEqual(init.columns, [0, 1, 2, -1]);
  const dim = exported.featureSize;
  const started = new HeadPopulation(dim, 4, 0, [{ seed: 7, dropout: 0.2, init }]);
  const plain = new HeadPopulation(dim, 4, 0, [{ seed: 7, dropout: 0.2 }]);
  const a = started.toModel(0);
  const b = plain.toModel(0);
  const [kernel, bias] = a
    .getLayer(HEAD_LOGITS)
    .getWeights()
    .map((w) => w.dataSync());
  const [freshKernel, freshBias] = b
    .getLayer(HEAD_LOGITS)
    .getWeights()
    .map((w) => w.dataSync());
  for (let r = 0; r < dim; r++) {
    for (let c = 0; c < 3; c++)
      assert.equal(kernel![r * 4 + c], exported.logits.kernel[r * 3 + c], `kernel [${r}, ${c}]`);
    assert.equal(kernel![r * 4 + 3], freshKernel![r * 4 + 3], `new kernel [${r}, 3]`);
  }
  assert.deepEqual([...bias!.slice(0, 3)], [...exported.logits.bias]);
  assert.equal(bias![3], freshBias![3]);
  // The new column is the initialiser's (non-zero) and none of the old ones.
  const column = (k: ArrayLike<number>, c: number, n: number) =>
    Array.from({ length: dim }, (_, r) => k[r * n + c]!);
  assert.ok(column(kernel!, 3, 4).some((v) => v !== 0));
  for (let c = 0; c < 3; c++)
    assert.notDeepEqual(column(kernel!, 3, 4), column(exported.logits.kernel, c, 3));
  // Another seed, another new column; the old ones stay.
  const other = new HeadPopulation(dim, 4, 0, [{ seed: 8, dropout: 0.2, init }]);
  const c = other.toModel(0);
  const otherKernel = c.getLayer(HEAD_LOGITS).getWeights()[0]!.dataSync();
  assert.notDeepEqual(column(otherKernel, 3, 4), column(kernel!, 3, 4));
  assert.deepEqual(column(otherKernel, 0, 4), column(kernel!, 0, 4));
  for (const m of [a, b, c]) m.dispose();
  for (const p of [started, plain, other]) p.dispose();
  assert.equal(tf.memory().numTensors, before);

  // The whole run: the yellow images start fresh and are learned.
  const summary = await train(
    base({
      data: more,
      out: path.join(dir, 'more-run'),
      init: headRun,
      epochs: 15,
      lr: 0.05,
    }),
  );
  assert.equal(tf.memory().numTensors, before);
  assert.deepEqual(summary.classes, classes);
  assert.deepEqual(summary.stages['head']!.init!.added, ['yellow']);
  assert.deepEqual(summary.stages['head']!.init!.kept, ['blue', 'green', 'red']);
  assert.ok(summary.val!.acc >= 0.75, `val acc ${summary.val!.acc}`);
});

test('--init of a fine-tuned run: the backbone carries its body, embeddings are not the cached ones of the original body', async () => {
  const before = tf.memory().numTensors;
  const tinyStep = { epochs: 1, lr: 1e-7, swa: false };
  const first = await train(base({ out: path.join(dir, 'from-ft'), init: ftRun, ...tinyStep }));
  assert.equal(tf.memory().numTensors, before);
  const record = first.stages['head']!.init!;
  assert.equal(record.body, 'export');
  assert.equal(record.weights, 'finetune-swa');
  // The original body's features are in the cache (the runs before); none may serve this body.
  assert.equal(first.cachedEmbeddings, 0);
  const hashOf = async (run: string) => (await json(path.join(run, 'config.json'))).weightsHash;
  assert.notEqual(await hashOf(path.join(dir, 'from-ft')), await hashOf(headRun));
  // Same body, same head: the figures of the fine-tuned export.
  assert.ok(
    Math.abs(first.val!.loss - ftSummary.val!.loss) < 1e-4,
    `val loss ${first.val!.loss} vs the fine-tuned run's ${ftSummary.val!.loss}`,
  );
  // The export holds that body again.
  const theirs = await weights(path.join(ftRun, 'model', 'model.json'));
  const ours = await weights(path.join(dir, 'from-ft', 'model', 'model.json'));
  for (const name of ['conv1/kernel', 'dw1/depthwise_kernel', 'bn2/gamma', 'conv2/kernel'])
    assert.deepEqual(ours.get(name), theirs.get(name), name);

  // Its own cache entries serve the next run from the same body.
  const again = await train(base({ out: path.join(dir, 'from-ft-2'), init: ftRun, ...tinyStep }));
  assert.equal(again.cachedEmbeddings, 30);
  assert.equal(await hashOf(path.join(dir, 'from-ft-2')), await hashOf(path.join(dir, 'from-ft')));

  // tfjs worker threads load the same body (the recipe names the export).
  const pooled = await train(
    base({
      out: path.join(dir, 'from-ft-pool'),
      init: ftRun,
      engine: 'tfjs',
      workers: 2,
      cache: false,
      ...tinyStep,
    }),
  );
  assert.equal(pooled.engine, 'tfjs');
  assert.ok(
    Math.abs(pooled.val!.loss - ftSummary.val!.loss) < 1e-4,
    `pooled val loss ${pooled.val!.loss} vs ${ftSummary.val!.loss}`,
  );
  assert.equal(tf.memory().numTensors, before);
});

test('lr-find --init ramps from the head the run would start from', async () => {
  const before = tf.memory().numTensors;
  const ramp = { startLr: 1e-7, endLr: 1e-5, steps: 10 };
  const fresh = await lrFind(base({ out: path.join(dir, 'lr-fresh') }), ramp);
  const started = await lrFind(base({ out: path.join(dir, 'lr-init'), init: headRun }), ramp);
  assert.equal(tf.memory().numTensors, before);
  const first = (r: typeof fresh) => r.points[0]!.loss;
  assert.ok(first(started) < first(fresh) - 0.2, `${first(started)} vs fresh ${first(fresh)}`);
});

async function refused(
  options: Partial<TrainOptions>,
  message: string,
  kind: 'usage' | 'data' = 'usage',
): Promise<void> {
  const before = tf.memory().numTensors;
  await assert.rejects(
    async () => (await prepareRun(base(options))).dispose(),
    (err: unknown) => {
      assert.ok(err instanceof FinetuneError, String(err));
      assert.equal(err.message, message);
      assert.equal(err.kind, kind);
      return true;
    },
  );
  assert.equal(tf.memory().numTensors, before);
}

test('--init is refused, with the reason, when the run does not fit', async () => {
  const other = await writeTinyBackbone(path.join(dir, 'other'), 5);
  await refused(
    { backbone: other, init: headRun },
    `init ${headRun}: its backbone is ${tiny} but this run's is ${other} (backbone)`,
  );
  await refused(
    { inputSize: 48, init: headRun },
    `init ${headRun}: it was trained at input size 32 but this run's is 48 (inputSize)`,
  );
  await refused(
    { featureLayer: 'relu1', init: headRun },
    `init ${headRun}: its backbone is cut at conv2 but this run's at relu1 (featureLayer)`,
  );
  await refused(
    { hidden: 8, init: headRun },
    `init ${headRun}: its head has no hidden layer but hidden is 8; pass hidden 0`,
  );
  const fewer = path.join(dir, 'fewer');
  await writeColourDataset(fewer, 4, {
    red: COLOURS['red']!,
    green: COLOURS['green']!,
  });
  await refused(
    { data: fewer, init: headRun },
    `init ${headRun}: its class 'blue' is not in the data (a run started from it keeps every class it has)`,
    'data',
  );
  // A model/ folder without the run's records beside it, and a folder without a model.
  const loose = path.join(dir, 'loose');
  await cp(path.join(headRun, 'model'), path.join(loose, 'model'), {
    recursive: true,
  });
  await refused(
    { init: loose },
    `init ${loose}: not a finished run (no summary.json beside model/)`,
  );
  const empty = path.join(dir, 'empty');
  await mkdir(empty);
  await refused(
    { init: empty },
    `init ${empty}: no model/model.json there (expected a run folder from finetune train, or its model/ folder)`,
  );
  // A head with BatchNorm: its statistics have nowhere to go.
  const bnRun = path.join(dir, 'bn-run');
  await train(base({ out: bnRun, epochs: 2, headBn: true, swa: false }));
  await refused(
    { init: bnRun },
    `init ${bnRun}: ${path.join(bnRun, 'model', 'model.json')} has a BatchNorm head (--head-bn), whose statistics --init cannot carry over; train without --init`,
  );
  // Another preprocessing contract in the export's metadata.
  const oldContract = path.join(dir, 'old-contract');
  await cp(headRun, oldContract, { recursive: true });
  const file = path.join(oldContract, 'model', 'model.json');
  const model = await json(file);
  model.userDefinedMetadata.contract.id = 'rgb8-fill-bilinear-v0';
  await writeFile(file, JSON.stringify(model));
  await refused(
    { init: oldContract },
    `init ${oldContract}: its preprocessing contract is rgb8-fill-bilinear-v0 but this toolkit's is rgb8-fill-bilinear-aa-v1`,
  );
});

test('finetune train --init: a refusal is one line naming --init, exit code 2', async () => {
  const other = await writeTinyBackbone(path.join(dir, 'cli-other'), 9);
  const r = await runCli(
    ['train', '--data', data, '--backbone', other, '--init', headRun, '--backend', 'wasm'],
    dir,
  );
  assert.equal(r.code, 2, r.stderr);
  assert.equal(
    r.stderr.trim().split('\n').at(-1),
    `finetune: --init ${headRun}: its backbone is ${tiny} but this run's is ${other} (--backbone)`,
  );
});
