import assert from 'node:assert/strict';
import { access, readFile } from 'node:fs/promises';
import path from 'node:path';
import { after, before, test } from 'node:test';
import * as tf from '@tensorflow/tfjs';
import { initBackend } from '../../src/backend/index.js';
import { FinetuneError } from '../../src/errors.js';
import { fileSaveHandler } from '../../src/io/files.js';
import { resolveTrainOptions, type TrainOptions } from '../../src/train/options.js';
import { train } from '../../src/train/train.js';
import { tempDir, writeColourDataset, writeTinyBackbone } from '../helpers.js';

let dir: string;
let cleanup: () => Promise<void>;
let backbone: string;
let data: string;
let n = 0;

before(async () => {
  await initBackend('wasm');
  ({ dir, cleanup } = await tempDir('bounds'));
  backbone = await writeTinyBackbone(dir);
  data = path.join(dir, 'data');
  await writeColourDataset(data, 5, { red: [220, 30, 30], blue: [20, 40, 230] });
});
after(async () => {
  await cleanup();
});

const exists = (p: string) =>
  access(p).then(
    () => true,
    () => false,
  );

test('upper bounds: one wording, before any work', () => {
  const cases: [Partial<TrainOptions>, string][] = [
    [{ epochs: 1e9 }, 'Expected an integer from 1 to 100000 for epochs but received 1000000000'],
    [{ epochs: 0 }, 'Expected an integer from 1 to 100000 for epochs but received 0'],
    [
      { finetuneEpochs: 100001 },
      'Expected an integer from 0 to 100000 for finetuneEpochs but received 100001',
    ],
    [{ lr: 1e308 }, 'Expected a number above 0 and at most 10 for lr but received 1e+308'],
    [{ lr: 0 }, 'Expected a number above 0 and at most 10 for lr but received 0'],
    [{ swaLr: 11 }, 'Expected a number above 0 and at most 10 for swaLr but received 11'],
    [
      { finetuneEpochs: 2, finetuneLr: 50 },
      'Expected a number above 0 and at most 10 for finetuneLr but received 50',
    ],
    [
      { finetuneEpochs: 2, finetuneSwaLr: Number.POSITIVE_INFINITY },
      'Expected a number above 0 and at most 10 for finetuneSwaLr but received Infinity',
    ],
    [{ inputSize: 3 }, 'Expected an integer from 32 to 2048 for inputSize but received 3'],
    [
      { inputSize: 100000 },
      'Expected an integer from 32 to 2048 for inputSize but received 100000',
    ],
  ];
  for (const [given, message] of cases) {
    assert.throws(
      () => resolveTrainOptions({ data: 'x', ...given }),
      (err: unknown) =>
        err instanceof FinetuneError && err.message === message && err.exitCode === 2,
      message,
    );
  }
  // the bounds themselves are allowed
  const r = resolveTrainOptions({ data: 'x', epochs: 100000, lr: 10, inputSize: 2048 });
  assert.deepEqual([r.epochs, r.lr, r.inputSize], [100000, 10, 2048]);
});

test('sizes that cannot fit in memory fail once the feature size is known, before embedding', async () => {
  // The tiny backbone: 32×32 input (3072 floats per image), 16 features.
  const cases: [Partial<TrainOptions>, string][] = [
    [{ hidden: 1e9 }, 'Expected an integer from 0 to 16777216 for hidden but received 1000000000'],
    [
      { embedBatchSize: 100000 },
      'Expected an integer from 1 to 87381 for embedBatchSize but received 100000',
    ],
    [
      { batchSize: 2 ** 25 },
      'Expected an integer from 1 to 16777216 for batchSize but received 33554432',
    ],
    [
      { batchSize: 100000, finetuneEpochs: 1 },
      'Expected an integer from 1 to 87381 for batchSize but received 100000',
    ],
  ];
  for (const [given, message] of cases) {
    const tensors = tf.memory().numTensors;
    const out = path.join(dir, `size-${n++}`);
    const events: string[] = [];
    await assert.rejects(
      train({ data, out, backbone, ...given, onEvent: (e) => events.push(e.type) }),
      { message },
    );
    assert.ok(!events.includes('embed-progress'), 'nothing was embedded');
    assert.equal(await exists(out), false);
    assert.equal(tf.memory().numTensors, tensors);
  }
});

/** A backbone whose features are about 1e19 or more: an allowed learning rate still diverges on them. */
async function writeLoudBackbone(): Promise<string> {
  const input = tf.input({ shape: [32, 32, 3], name: 'image' });
  const x = tf.layers
    .conv2d({
      filters: 8,
      kernelSize: 1,
      name: 'loud',
      kernelInitializer: tf.initializers.constant({ value: 1e19 }),
    })
    .apply(input) as tf.SymbolicTensor;
  const model = tf.model({ inputs: input, outputs: x });
  const folder = path.join(dir, 'loud');
  await model.save(fileSaveHandler(folder));
  model.dispose();
  return path.join(folder, 'model.json');
}

test('a loss that becomes NaN or infinite stops the run; the previous run folder stays', async () => {
  const out = path.join(dir, 'diverge');
  await train({ data, out, backbone, epochs: 2, cache: false });
  const before = await readFile(path.join(out, 'summary.json'), 'utf8');
  const loud = await writeLoudBackbone();
  const tensors = tf.memory().numTensors;
  await assert.rejects(
    train({ data, out, backbone: loud, optimizer: 'sgd', lr: 9, epochs: 5, cache: false }),
    (err: unknown) => {
      assert.ok(err instanceof FinetuneError);
      assert.match(
        err.message,
        /^training diverged: the head stage's loss became (NaN|Infinity) at epoch \d+, batch \d+; nothing was exported \(try a lower learning rate\)$/,
      );
      assert.equal(err.exitCode, 3);
      return true;
    },
  );
  assert.equal(tf.memory().numTensors, tensors);
  assert.equal(await readFile(path.join(out, 'summary.json'), 'utf8'), before);
});

test('no validation set (one image per class) is a warning', async () => {
  const single = path.join(dir, 'single');
  await writeColourDataset(single, 1, { red: [220, 30, 30], blue: [20, 40, 230] });
  const tensors = tf.memory().numTensors;
  const warnings: string[] = [];
  const summary = await train({
    data: single,
    out: path.join(dir, 'single-run'),
    backbone,
    epochs: 2,
    cache: false,
    onEvent: (e) => {
      if (e.type === 'warning') warnings.push(e.message);
    },
  });
  assert.equal(tf.memory().numTensors, tensors);
  assert.equal(summary.val, null);
  const noVal = warnings.filter((w) => w.startsWith('no validation images'));
  assert.equal(noVal.length, 1, warnings.join('\n'));
  assert.deepEqual(summary.warnings, warnings);

  // with a validation set there is no such warning
  const normal = await train({
    data,
    out: path.join(dir, 'normal'),
    backbone,
    epochs: 1,
    cache: false,
  });
  assert.ok(!normal.warnings.some((w) => w.startsWith('no validation images')));
});
