import assert from 'node:assert/strict';
import { readFile, rm, stat, writeFile } from 'node:fs/promises';
import { availableParallelism } from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';
import * as tf from '@tensorflow/tfjs';
import { type Backbone, loadBackbone } from '../../src/backbones/load.js';
import { cutPrefix } from '../../src/backbones/prefix.js';
import { type BackendInfo, initBackend } from '../../src/backend/index.js';
import { EmbeddingCache } from '../../src/data/cache.js';
import {
  createFrozenModel,
  type FrozenModelSource,
  resolveEngineContext,
} from '../../src/engine/index.js';
import { lowerToOnnx } from '../../src/engine/onnx/lower.js';
import { OnnxFrozenModel } from '../../src/engine/onnx/session.js';
import { WorkerPoolFrozenModel } from '../../src/engine/pool.js';
import { train } from '../../src/train/train.js';
import { tempDir, writeColourDataset, writeTinyBackbone } from '../helpers.js';

let dir: string;
let cleanup: () => Promise<void>;
let backend: BackendInfo;
let tiny: Backbone;
let tinyFile: string;

before(async () => {
  backend = await initBackend('wasm');
  ({ dir, cleanup } = await tempDir('engine'));
  tinyFile = await writeTinyBackbone(dir);
  tiny = await loadBackbone(tinyFile);
});
after(async () => {
  tiny?.dispose();
  await cleanup();
});

/** Raw pixels 0–255 (NHWC), reproducible: a 32-bit LCG. */
function pixels(n: number, size: number, seed: number): Float32Array {
  const out = new Float32Array(n * size * size * 3);
  let s = seed >>> 0;
  for (let i = 0; i < out.length; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    out[i] = s >>> 24;
  }
  return out;
}

/** The same pixels in the layout a frozen model asks for. */
function inLayout(x: Float32Array, n: number, size: number, layout: 'nhwc' | 'nchw'): Float32Array {
  if (layout === 'nhwc') return x;
  return tf.tidy(
    () => tf.tensor4d(x, [n, size, size, 3]).transpose([0, 3, 1, 2]).dataSync() as Float32Array,
  );
}

test('the engine context: defaults filled in, each field checked once at resolve time', () => {
  const c = resolveEngineContext({ backend });
  assert.deepEqual(
    { engine: c.engine, threads: c.threads, workers: c.workers, cacheDir: c.cacheDir },
    {
      engine: 'auto',
      threads: availableParallelism(),
      workers: availableParallelism(),
      cacheDir: null,
    },
  );
  assert.ok(Object.isFrozen(c));
  const given = resolveEngineContext({
    engine: 'tfjs',
    backend,
    threads: 1,
    workers: 3,
    cacheDir: dir,
  });
  assert.deepEqual(
    [given.engine, given.threads, given.workers, given.cacheDir],
    ['tfjs', 1, 3, dir],
  );
  const bogus = { engine: 'tpu' } as unknown as { engine: 'auto' };
  assert.throws(() => resolveEngineContext({ ...bogus, backend }), {
    message: "Expected one of auto, onnx, tfjs for engine but received 'tpu'",
  });
  assert.throws(() => resolveEngineContext({ backend, threads: 0 }), {
    message: 'Expected a positive integer for threads but received 0',
  });
  assert.throws(() => resolveEngineContext({ backend, workers: 1.5 }), {
    message: 'Expected a positive integer for workers but received 1.5',
  });
  assert.throws(() => resolveEngineContext({ backend, cacheDir: '' }), {
    message: "Expected a non-empty string for cache-dir but received ''",
  });
  assert.throws(
    () => resolveEngineContext({ backend: null as unknown as BackendInfo }),
    /Expected the result of initBackend for backend but received null/,
  );
});

test('4-D rows come back in tfjs order (NHWC) from both engines', async () => {
  const body = tiny.model!;
  const cut = body.getLayer('dw1').output as tf.SymbolicTensor;
  const prefix = tf.model({ inputs: body.inputs, outputs: cut });
  const shape = cut.shape.slice(1) as number[];
  const row = shape.reduce((a, b) => a * b, 1);
  const source: FrozenModelSource = {
    layersModel: prefix,
    inputSize: 32,
    outputSize: row,
    forward: (x) => prefix.predict(x) as tf.Tensor,
  };
  const n = 3;
  const x = pixels(n, 32, 11);
  const expected = tf.tidy(
    () => (prefix.predict(tf.tensor4d(x, [n, 32, 32, 3])) as tf.Tensor).dataSync() as Float32Array,
  );
  for (const engine of ['onnx', 'tfjs'] as const) {
    const choice = await createFrozenModel(
      source,
      resolveEngineContext({ engine, backend, threads: 1, workers: 1 }),
    );
    assert.equal(choice.engine, engine);
    try {
      const got = await choice.model.run(inLayout(x, n, 32, choice.model.layout), n);
      assert.equal(got.length, n * row);
      let diff = 0;
      for (let i = 0; i < got.length; i++) diff = Math.max(diff, Math.abs(got[i]! - expected[i]!));
      assert.ok(diff <= 1e-4, `${engine}: max abs diff ${diff}`);
    } finally {
      await choice.model.dispose();
    }
  }
  // 'nchw' rows are the graph's own order, which only ONNX Runtime computes.
  const nchw = await createFrozenModel(
    { ...source, rows: 'nchw' },
    resolveEngineContext({ engine: 'onnx', backend, threads: 1 }),
  );
  const [c, h, w] = [shape[2]!, shape[0]!, shape[1]!];
  const got = await nchw.model.run(inLayout(x, n, 32, 'nchw'), n);
  await nchw.model.dispose();
  // channel 1 of pixel (0, 2): NCHW index c·h·w-plane, NHWC index (0·w + 2)·c + 1
  assert.ok(Math.abs(got[1 * h * w + 2]! - expected[2 * c + 1]!) <= 1e-4);
  await assert.rejects(
    createFrozenModel(
      { ...source, rows: 'nchw' },
      resolveEngineContext({ engine: 'tfjs', backend }),
    ),
    /Cannot give 'nchw' rows on the tfjs engine/,
  );
  await assert.rejects(
    createFrozenModel(
      { ...source, rows: 'chw' as 'nchw' },
      resolveEngineContext({ engine: 'onnx', backend }),
    ),
    { message: "Expected one of nhwc, nchw for rows but received 'chw'" },
  );
});

test('with 2 threads, onnx runs as 2 single-threaded workers: the rows of one 2-thread session', async () => {
  const body = tiny.model!;
  const cut = body.getLayer('dw1').output as tf.SymbolicTensor;
  const prefix = tf.model({ inputs: body.inputs, outputs: cut });
  const row = (cut.shape.slice(1) as number[]).reduce((a, b) => a * b, 1);
  const n = 5; // odd: chunks of 3 and 2
  const x = inLayout(pixels(n, 32, 17), n, 32, 'nchw');
  const copy = x.slice();
  for (const [model, outputSize] of [
    [body, tiny.featureSize],
    [prefix, row],
  ] as const) {
    for (const rows of ['nhwc', 'nchw'] as const) {
      const source: FrozenModelSource = {
        layersModel: model,
        inputSize: 32,
        outputSize,
        forward: (p) => model.predict(p) as tf.Tensor,
        rows,
      };
      const pooled = await createFrozenModel(
        source,
        resolveEngineContext({ engine: 'onnx', backend, threads: 2 }),
      );
      const one = await OnnxFrozenModel.create(lowerToOnnx(model), {
        inputSize: 32,
        threads: 2,
        rows,
      });
      try {
        assert.ok(pooled.model instanceof WorkerPoolFrozenModel);
        assert.equal(pooled.model.workers, 2);
        assert.deepEqual(
          [pooled.engine, pooled.model.engine, pooled.model.layout],
          ['onnx', 'onnx', 'nchw'],
        );
        assert.equal(pooled.model.outputSize, outputSize);
        const got = await pooled.model.run(x, n);
        assert.deepEqual(x, copy, 'run must not detach or change the caller’s batch');
        assert.deepEqual(got, await one.run(x, n));
      } finally {
        await pooled.model.dispose();
        await one.dispose();
      }
    }
  }
  // One thread: one session, in this thread.
  const single = await createFrozenModel(
    {
      layersModel: body,
      inputSize: 32,
      outputSize: tiny.featureSize,
      forward: (p) => tiny.embed(p),
    },
    resolveEngineContext({ engine: 'onnx', backend, threads: 1 }),
  );
  assert.ok(single.model instanceof OnnxFrozenModel);
  await single.model.dispose();
});

test('lowered body and prefix are found again in the cache; a damaged copy is lowered again', async () => {
  const cacheDir = path.join(dir, 'lowered-cache');
  const context = resolveEngineContext({ engine: 'onnx', backend, threads: 1, cacheDir });
  const body = tiny.model!;
  const { model: prefixModel, cutLayer, cutShape } = cutPrefix(body, 'dw1');
  const key = { backboneId: tiny.spec.id, weightsHash: tiny.weightsHash };
  const sources: FrozenModelSource[] = [
    {
      layersModel: body,
      inputSize: 32,
      outputSize: tiny.featureSize,
      forward: (x) => tiny.embed(x),
      cacheKey: { ...key, cut: null },
    },
    {
      layersModel: prefixModel,
      inputSize: 32,
      outputSize: cutShape.reduce((a, b) => a * b, 1),
      forward: (x) => prefixModel.predict(x) as tf.Tensor,
      cacheKey: { ...key, cut: cutLayer },
    },
  ];
  const x = inLayout(pixels(2, 32, 3), 2, 32, 'nchw');
  const runOnce = async (source: FrozenModelSource) => {
    const choice = await createFrozenModel(source, context);
    try {
      return { lowered: choice.lowered, out: await choice.model.run(x, 2) };
    } finally {
      await choice.model.dispose();
    }
  };
  const first = await Promise.all(sources.map(runOnce));
  assert.deepEqual(
    first.map((r) => r.lowered),
    ['now', 'now'],
  );
  const cache = new EmbeddingCache(cacheDir);
  const info = await cache.info();
  assert.deepEqual(
    info.lowered.models.map((m) => m.cut),
    [null, cutLayer],
  );
  const second = await Promise.all(sources.map(runOnce));
  assert.deepEqual(
    second.map((r) => r.lowered),
    ['cache', 'cache'],
  );
  second.forEach((r, i) => {
    assert.deepEqual(r.out, first[i]!.out);
  });
  // A damaged copy is neither fatal nor used: lowered again and rewritten.
  const file = cache.loweredPath({ ...key, cut: cutLayer, lowering: 1 });
  const bytes = await readFile(file);
  bytes[bytes.length - 10]! ^= 0xff;
  await writeFile(file, bytes);
  const again = await runOnce(sources[1]!);
  assert.equal(again.lowered, 'now');
  assert.deepEqual(again.out, first[1]!.out);
  assert.equal((await runOnce(sources[1]!)).lowered, 'cache');
  // Without a cache folder nothing is kept.
  const uncached = await createFrozenModel(
    sources[0]!,
    resolveEngineContext({ engine: 'onnx', backend, threads: 1 }),
  );
  assert.equal(uncached.lowered, 'now');
  await uncached.model.dispose();
});

test('a second training run finds the lowered body and fine-tune prefix of the first', async () => {
  const before = tf.memory().numTensors;
  const data = path.join(dir, 'data');
  await writeColourDataset(data, 4, { red: [220, 30, 30], blue: [30, 30, 220] });
  const cacheDir = path.join(dir, 'run-cache');
  const run = (out: string) =>
    train({
      data,
      out: path.join(dir, out),
      backbone: tinyFile,
      engine: 'onnx',
      threads: 1,
      epochs: 2,
      batchSize: 4,
      finetuneEpochs: 1,
      unfreeze: 'from:dw1',
      cacheDir,
    });
  await run('r1');
  const cache = new EmbeddingCache(cacheDir);
  const first = (await cache.info()).lowered.models;
  assert.deepEqual(
    first.map((m) => m.cut),
    [null, 'relu1'],
  );
  const stats = async () =>
    Promise.all(
      first.map(async (m) => {
        const st = await stat(
          cache.loweredPath({
            backboneId: m.backboneId,
            weightsHash: tiny.weightsHash,
            cut: m.cut,
            lowering: m.lowering,
          }),
        );
        return [st.ino, st.mtimeMs];
      }),
    );
  const before2 = await stats();
  // Clear the embeddings only, so the second run needs the body's engine again.
  await rm(path.join(cacheDir, 'embeddings'), { recursive: true });
  await run('r2');
  assert.equal((await cache.info()).lowered.count, 2);
  assert.deepEqual(await stats(), before2);
  assert.equal(tf.memory().numTensors, before);
});
