import assert from 'node:assert/strict';
import { availableParallelism } from 'node:os';
import { after, before, test } from 'node:test';
import * as tf from '@tensorflow/tfjs';
import { type Backbone, loadBackbone } from '../../src/backbones/load.js';
import { type BackendInfo, initBackend } from '../../src/backend/index.js';
import {
  createFrozenModel,
  type FrozenModelSource,
  resolveEngineContext,
} from '../../src/engine/index.js';
import { tempDir, writeTinyBackbone } from '../helpers.js';

let dir: string;
let cleanup: () => Promise<void>;
let backend: BackendInfo;
let tiny: Backbone;

before(async () => {
  backend = await initBackend('wasm');
  ({ dir, cleanup } = await tempDir('engine'));
  tiny = await loadBackbone(await writeTinyBackbone(dir));
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
    hash: null,
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
});
