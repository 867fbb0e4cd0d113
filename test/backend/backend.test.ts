import assert from 'node:assert/strict';
import { createRequire } from 'node:module';
import { test } from 'node:test';
import * as tf from '@tensorflow/tfjs';
import { initBackend } from '../../src/backend/index.js';

/** Whether an optional package is installed here (its install step needs libtensorflow's download). */
function installed(name: string): boolean {
  try {
    createRequire(import.meta.url).resolve(name);
    return true;
  } catch {
    return false;
  }
}
const NATIVE = {
  'node-gpu': installed('@tensorflow/tfjs-node-gpu'),
  node: installed('@tensorflow/tfjs-node'),
};

test('auto takes the first backend that loads and says why it passed the others over', async () => {
  const info = await initBackend('auto');
  assert.equal(info.gpu, info.option === 'node-gpu');
  assert.equal(tf.getBackend(), info.tfBackend);
  assert.notEqual(info.option, 'cpu', 'auto never picks the pure-JS backend');
  const order = ['node-gpu', 'node', 'wasm'];
  // every candidate before the chosen one is listed with its reason, in order
  assert.deepEqual(
    info.skipped.map((s) => s.split(':')[0]),
    order.slice(0, order.indexOf(info.option)),
  );
  for (const reason of info.skipped) {
    const option = reason.split(':')[0] as keyof typeof NATIVE;
    if (!NATIVE[option]) assert.equal(reason, `${option}: not installed`);
  }
  if (!NATIVE['node-gpu'] && !NATIVE.node) {
    assert.equal(info.option, 'wasm');
    assert.equal(info.tfBackend, 'wasm');
  }
});

test('an explicit backend that cannot load is an error that says how to get it', async () => {
  if (!NATIVE.node) {
    await assert.rejects(initBackend('node'), (err: Error) => {
      assert.match(
        err.message,
        /^Backend node could not be loaded \(Cannot find package '@tensorflow\/tfjs-node'/,
      );
      assert.match(err.message, /npm install @tensorflow\/tfjs-node .* or use --backend wasm$/);
      return true;
    });
  }
  await assert.rejects(initBackend('tpu' as never), {
    message: "Expected one of auto, node-gpu, node, wasm, cpu for backend but received 'tpu'",
  });
  const cpu = await initBackend('cpu');
  assert.equal(tf.getBackend(), 'cpu');
  assert.equal(cpu.option, 'cpu');
  await initBackend('wasm');
  assert.equal(tf.getBackend(), 'wasm');
});
