import * as tf from '@tensorflow/tfjs';

/**
 * Float32 space reused from one training step to the next, for values that only pass
 * through JavaScript on their way into a tensor. A head population's step made and freed
 * several arrays of about a megabyte (the batch's rows, their per-member copies, the
 * dropout masks); glibc maps each one afresh and unmaps it when it is freed, and the page
 * faults cost more than the copies: six heads over 600 steps took 245k–530k minor faults
 * and 1.1–2.1 s of system time, against 42k and 0.3 s with malloc's thresholds raised.
 *
 * Reuse is safe only where making a tensor copies the values at once: the wasm backend
 * copies them into its heap (`move`), while cpu and tfjs-node keep the array itself, so
 * there every call gets a fresh one. A Scratch's array is valid until its next `take`.
 */
export class Scratch {
  private buffer = new Float32Array(0);

  /** An array of `length` values holding whatever the last use left: the caller writes them all. */
  take(length: number): Float32Array {
    if (!copiesOnWrite()) return new Float32Array(length);
    if (this.buffer.length < length) this.buffer = new Float32Array(length);
    return this.buffer.subarray(0, length);
  }

  /**
   * `t`'s float32 values: on wasm copied from its heap into this scratch (valid until the
   * next `take` or `read`), elsewhere `dataSync`'s own copy.
   */
  read(t: tf.Tensor): Float32Array {
    const heap = heapView(t);
    if (!heap) return t.dataSync() as Float32Array;
    const out = this.take(heap.length);
    out.set(heap);
    return out;
  }
}

/** Whether the backend copies a new tensor's values at once (wasm: into its heap). */
function copiesOnWrite(): boolean {
  return tf.getBackend() === 'wasm';
}

type HeapBackend = { typedArrayFromHeap?: (t: tf.TensorInfo) => ArrayBufferView };

/** A view of a float32 tensor's values in the wasm heap (no copy), or null on other backends. */
function heapView(t: tf.Tensor): Float32Array | null {
  if (t.dtype !== 'float32' || !copiesOnWrite()) return null;
  const backend = tf.backend() as unknown as HeapBackend;
  if (typeof backend.typedArrayFromHeap !== 'function') return null;
  const view = backend.typedArrayFromHeap({ dataId: t.dataId, shape: t.shape, dtype: t.dtype });
  return view instanceof Float32Array ? view : null;
}
