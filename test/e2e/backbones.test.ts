import assert from 'node:assert/strict';
import { before, test } from 'node:test';
import * as tf from '@tensorflow/tfjs';
import { loadBackbone } from '../../src/backbones/load.js';
import { BACKBONES } from '../../src/backbones/registry.js';
import { initBackend } from '../../src/backend/index.js';

// The registered backbones themselves (the full MobileNetV2 included): end to end.
before(async () => {
  await initBackend('wasm');
});

test('every registered backbone: offline ones load and embed; online ones fail offline with a way out', async () => {
  for (const spec of Object.values(BACKBONES)) {
    assert.ok(spec.id && spec.licence && spec.provenance && spec.inputSize > 0, spec.id);
    if (!spec.offline) {
      await assert.rejects(loadBackbone(spec.id), (err: Error) => {
        assert.match(
          err.message,
          new RegExp(`^Could not download backbone ${spec.id} from TF Hub`),
        );
        assert.match(err.message, /--backbone nsfwjs_mobilenet_v2/);
        assert.match(err.message, /models\/NAME\/model\.json/);
        return true;
      });
      continue;
    }
    const before = tf.memory().numTensors;
    const bb = await loadBackbone(spec.id);
    assert.equal(bb.format, 'layers');
    assert.equal(bb.inputSize, spec.inputSize);
    assert.equal(bb.model!.trainableWeights.length, 0, 'frozen as loaded');
    const shape = tf.tidy(() => bb.embed(tf.zeros([1, spec.inputSize, spec.inputSize, 3])).shape);
    assert.deepEqual(shape, [1, bb.featureSize]);
    bb.dispose();
    assert.equal(tf.memory().numTensors, before);
  }
});

test('the default backbone at another input size, and its weights hash', async () => {
  const a = await loadBackbone('nsfwjs_mobilenet_v2');
  const b = await loadBackbone('nsfwjs_mobilenet_v2', { inputSize: 160 });
  assert.equal(a.featureSize, 1280);
  assert.equal(b.inputSize, 160);
  assert.equal(b.featureSize, 1280);
  assert.notEqual(a.weightsHash, b.weightsHash);
  assert.equal(a.model!.layers[1]!.getClassName(), 'Rescaling');
  a.dispose();
  b.dispose();
});
