import assert from 'node:assert/strict';
import { test } from 'node:test';
import * as tf from '@tensorflow/tfjs';
import { initBackend } from '../../src/backend/index.js';
import { Scratch } from '../../src/util/scratch.js';

test('on wasm a Scratch array is reused, and tensors made from it keep their values', async () => {
  await initBackend('wasm');
  const before = tf.memory().numTensors;
  const s = new Scratch();
  const a = s.take(4);
  a.set([1, 2, 3, 4]);
  const t = tf.tensor(a, [2, 2]);
  const b = s.take(3);
  assert.equal(b.buffer, a.buffer, 'the same space again');
  b.fill(9);
  // The premise of the reuse: wasm copied the values into its heap when t was made.
  assert.deepEqual(Array.from(t.dataSync()), [1, 2, 3, 4]);
  // read: the values from the heap, into the scratch.
  const u = tf.tensor([5, 6, 7], [3]);
  const r = s.read(u);
  assert.deepEqual(Array.from(r), [5, 6, 7]);
  assert.equal(r.buffer, a.buffer);
  // Larger than before: new space, then reused.
  const big = s.take(10);
  assert.equal(big.length, 10);
  assert.equal(s.take(8).buffer, big.buffer);
  tf.dispose([t, u]);
  assert.equal(tf.memory().numTensors, before);
});

test('on cpu, which keeps the array a tensor is made from, every take is fresh', async () => {
  await initBackend('cpu');
  try {
    const s = new Scratch();
    const a = s.take(4);
    a.set([1, 2, 3, 4]);
    const t = tf.tensor(a, [4]);
    const b = s.take(4);
    assert.notEqual(b.buffer, a.buffer);
    b.fill(9);
    assert.deepEqual(Array.from(t.dataSync()), [1, 2, 3, 4]);
    assert.deepEqual(Array.from(s.read(t)), [1, 2, 3, 4]);
    t.dispose();
  } finally {
    await initBackend('wasm');
  }
});
