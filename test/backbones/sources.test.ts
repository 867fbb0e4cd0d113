import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import * as tf from '@tensorflow/tfjs';
import {
  BACKBONE_SOURCES,
  type BackboneRecord,
  backboneFromRecord,
  backboneRecipe,
  type LoadBackboneOptions,
  loadBackbone,
} from '../../src/backbones/load.js';
import { type BackboneSpec, resolveBackboneSpec } from '../../src/backbones/registry.js';
import { initBackend } from '../../src/backend/index.js';
import { tempDir, writeTinyBackbone } from '../helpers.js';

let dir: string;
let cleanup: () => Promise<void>;
let tiny: string;

before(async () => {
  await initBackend('wasm');
  ({ dir, cleanup } = await tempDir('sources'));
  tiny = await writeTinyBackbone(dir);
});
after(async () => {
  await cleanup();
});

interface Sample {
  readonly spec: () => BackboneSpec;
  readonly options: LoadBackboneOptions;
  /** Loads without the network (else: checked up to the network boundary). */
  readonly offline: boolean;
  /** Sources of this kind that metadata may hold but a row must refuse, with the message. */
  readonly bad: readonly [Record<string, unknown>, string][];
}

// One sample per source kind: a new row in BACKBONE_SOURCES needs one here.
const SAMPLES: Readonly<Record<string, Sample>> = {
  nsfwjs: {
    spec: () => resolveBackboneSpec('nsfwjs_mobilenet_v2'),
    options: { inputSize: 96 },
    offline: true,
    bad: [
      [
        { kind: 'nsfwjs', model: 'resnet' },
        "Expected one of mobilenet_v2 for backbone.source.model but received 'resnet'",
      ],
    ],
  },
  'tfjs-models-mobilenet': {
    spec: () => resolveBackboneSpec('mobilenet_v2', { alpha: 0.5 }),
    options: {},
    offline: false,
    bad: [
      [
        { kind: 'tfjs-models-mobilenet', version: 3, alpha: 1 },
        'Expected 1 or 2 for backbone.source.version but received 3',
      ],
      [
        { kind: 'tfjs-models-mobilenet', version: 2, alpha: 0.25 },
        'Expected one of 0.5, 0.75, 1 for backbone.source.alpha but received 0.25',
      ],
    ],
  },
  'model-json': {
    spec: () => resolveBackboneSpec(tiny, { featureLayer: 'dw1' }),
    options: {},
    offline: true,
    bad: [
      [
        { kind: 'model-json' },
        'Expected a non-empty string for backbone.source.location but received undefined',
      ],
    ],
  },
};

/** What tfjs asks the network for while `load` runs, answered as an unreachable host would. */
async function askedFor(load: () => Promise<unknown>): Promise<string[]> {
  const asked: string[] = [];
  const realFetch = globalThis.fetch;
  globalThis.fetch = (async (url: string | URL | Request) => {
    asked.push(String(url));
    throw new TypeError('fetch failed');
  }) as typeof fetch;
  try {
    await assert.rejects(load(), /Could not download/);
  } finally {
    globalThis.fetch = realFetch;
  }
  return asked;
}

test('every backbone source row: a run’s record and a worker recipe load the same backbone', async () => {
  assert.deepEqual(Object.keys(SAMPLES).sort(), Object.keys(BACKBONE_SOURCES).sort());
  assert.ok(Object.isFrozen(BACKBONE_SOURCES));
  for (const [kind, sample] of Object.entries(SAMPLES)) {
    const spec = sample.spec();
    assert.equal(spec.source.kind, kind);
    if (!sample.offline) {
      // The record an export writes, read back: the same model is asked for.
      const record: BackboneRecord = JSON.parse(
        JSON.stringify({ id: spec.id, source: spec.source, inputSize: spec.inputSize }),
      );
      const ref = backboneFromRecord(record);
      const original = await askedFor(() => loadBackbone(spec, sample.options));
      const again = await askedFor(() => loadBackbone(ref.backbone, ref.options));
      assert.equal(original.length, 1, kind);
      assert.deepEqual(again, original, kind);
      continue;
    }
    const before = tf.memory().numTensors;
    const bb = await loadBackbone(spec, sample.options);
    const recipe = backboneRecipe(bb);
    const record: BackboneRecord = JSON.parse(
      JSON.stringify({
        id: bb.spec.id,
        source: bb.spec.source,
        inputSize: bb.inputSize,
        ...(bb.spec.featureLayer ? { featureLayer: bb.spec.featureLayer } : {}),
      }),
    );
    const ref = backboneFromRecord(record);
    assert.deepEqual(ref, { backbone: recipe.backbone, options: recipe.options }, kind);
    assert.equal(backboneRecipe(bb, 'x').firstUnfrozen, 'x');
    const again = await loadBackbone(ref.backbone, ref.options);
    assert.equal(again.weightsHash, bb.weightsHash, kind);
    assert.equal(again.inputSize, bb.inputSize, kind);
    assert.equal(again.featureSize, bb.featureSize, kind);
    again.dispose();
    bb.dispose();
    assert.equal(tf.memory().numTensors, before);
  }
});

test('a record read back from metadata is checked by its row, in the one wording', () => {
  const record = (source: unknown): BackboneRecord => ({ id: 'x', source, inputSize: 224 });
  for (const sample of Object.values(SAMPLES)) {
    for (const [source, message] of sample.bad) {
      assert.throws(() => backboneFromRecord(record(source)), { message });
    }
  }
  assert.throws(() => backboneFromRecord(record({ kind: 'onnx-zoo' })), {
    message: `Expected one of ${Object.keys(BACKBONE_SOURCES).join(', ')} for backbone.source.kind but received 'onnx-zoo'`,
  });
  assert.throws(() => backboneFromRecord(record('nsfwjs')), {
    message: "Expected an object for backbone.source but received 'nsfwjs'",
  });
  assert.throws(
    () =>
      backboneFromRecord({
        id: 'nsfwjs_mobilenet_v2',
        source: { kind: 'nsfwjs', model: 'mobilenet_v2' },
        inputSize: 0,
      }),
    { message: 'Expected a positive integer for backbone.inputSize but received 0' },
  );
});
