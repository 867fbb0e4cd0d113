import assert from 'node:assert/strict';
import { test } from 'node:test';
import * as tf from '@tensorflow/tfjs';
import { initBackend } from '../../src/backend/index.js';

test('auto takes the first backend that loads and says why it passed the others over', async () => {
  const info = await initBackend('auto');
  // Here libtensorflow cannot be downloaded, so tfjs-node(-gpu) are not installed.
  assert.equal(info.option, 'wasm');
  assert.equal(info.tfBackend, 'wasm');
  assert.equal(tf.getBackend(), 'wasm');
  assert.equal(info.gpu, false);
  assert.deepEqual(info.skipped, ['node-gpu: not installed', 'node: not installed']);
});

test('an explicit backend that cannot load is an error that says how to get it', async () => {
  await assert.rejects(initBackend('node'), (err: Error) => {
    assert.match(
      err.message,
      /^Backend node could not be loaded \(Cannot find package '@tensorflow\/tfjs-node'/,
    );
    assert.match(err.message, /npm install @tensorflow\/tfjs-node .* or use --backend wasm$/);
    return true;
  });
  await assert.rejects(initBackend('tpu' as never), {
    message: "Expected one of auto, node-gpu, node, wasm, cpu for backend but received 'tpu'",
  });
  const cpu = await initBackend('cpu');
  assert.equal(tf.getBackend(), 'cpu');
  assert.equal(cpu.option, 'cpu');
  await initBackend('wasm');
  assert.equal(tf.getBackend(), 'wasm');
});
