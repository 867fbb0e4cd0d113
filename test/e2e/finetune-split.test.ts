import assert from 'node:assert/strict';
import { before, test } from 'node:test';
import * as tf from '@tensorflow/tfjs';
import { loadBackbone } from '../../src/backbones/load.js';
import { initBackend } from '../../src/backend/index.js';
import {
  bytesPerImage,
  firstUnfrozenLayer,
  fittingBatchSize,
  inferenceModeBatchNorm,
  splitBody,
  stepBatchSize,
  WASM_STEP_BUDGET,
} from '../../src/train/finetune.js';

before(async () => {
  await initBackend('wasm');
});

test('the default backbone: --unfreeze picks its blocks, the cut is exact, big batches are lowered', async () => {
  const before = tf.memory().numTensors;
  const bb = await loadBackbone();
  assert.equal(firstUnfrozenLayer(bb, { kind: 'blocks', count: 1 }), 'block_16_expand');
  assert.equal(firstUnfrozenLayer(bb, { kind: 'blocks', count: 3 }), 'block_14_expand');
  assert.equal(firstUnfrozenLayer(bb, { kind: 'all' }), 'Conv1_pad');
  assert.throws(
    () => firstUnfrozenLayer(bb, { kind: 'blocks', count: 18 }),
    /blocks:1 to blocks:17/,
  );
  assert.throws(
    () => firstUnfrozenLayer(bb, { kind: 'from', layer: 'nope' }),
    /from: followed by a layer of backbone/,
  );

  // prefix then suffix is the body, bit for bit, and BN in the suffix ignores training mode
  const split = splitBody(bb.model!, 'block_16_expand');
  assert.equal(split.cutLayer, 'block_15_add');
  assert.deepEqual(split.cutShape, [7, 7, 160]);
  const undo = inferenceModeBatchNorm(split.layers);
  const diffs = tf.tidy(() => {
    const x = tf.randomUniform([2, 224, 224, 3], 0, 255, 'float32', 7);
    const whole = bb.model!.predict(x) as tf.Tensor;
    const mid = split.prefix.predict(x) as tf.Tensor;
    const parts = split.suffix.predict(mid) as tf.Tensor;
    const trainingMode = split.suffix.apply(mid, { training: true }) as tf.Tensor;
    return [
      whole.sub(parts).abs().max().dataSync()[0],
      whole.sub(trainingMode).abs().max().dataSync()[0],
    ];
  });
  undo();
  split.release();
  assert.deepEqual(diffs, [0, 0]);
  // a batch that would overflow the 4 GiB wasm heap is lowered: the whole body at 224
  // trains at batch 12 and aborts at 16; the top three blocks fit 32
  const whole = splitBody(bb.model!, firstUnfrozenLayer(bb, { kind: 'all' }));
  const top = splitBody(bb.model!, firstUnfrozenLayer(bb, { kind: 'blocks', count: 3 }));
  const lowered = fittingBatchSize(whole.layers, 32, WASM_STEP_BUDGET);
  assert.ok(lowered >= 4 && lowered <= 12, `lowered to ${lowered}`);
  assert.equal(fittingBatchSize(top.layers, 32, WASM_STEP_BUDGET), 32);
  // Steps in halves hold a chunk of 8 rows at a time: the whole body keeps batch 32.
  assert.equal(stepBatchSize(whole.layers, 32, false, WASM_STEP_BUDGET), lowered);
  assert.equal(stepBatchSize(whole.layers, 32, true, WASM_STEP_BUDGET), 32);
  // A budget for 3 rows at a time: halves of 3, so a batch of 6.
  const three = 3 * bytesPerImage(whole.layers);
  assert.equal(stepBatchSize(whole.layers, 32, true, three), 6);
  assert.equal(stepBatchSize(whole.layers, 32, false, three), 3);
  whole.release();
  top.release();
  bb.dispose();
  assert.equal(tf.memory().numTensors, before);
});
