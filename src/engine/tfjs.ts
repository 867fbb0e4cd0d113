import * as tf from '@tensorflow/tfjs';
import type { FrozenModel } from './types.js';

/**
 * The tfjs engine: runs `embed` (a frozen forward pass on raw NHWC pixels) in this
 * thread on the current tfjs backend.
 */
export class TfjsFrozenModel implements FrozenModel {
  readonly engine = 'tfjs' as const;
  readonly layout = 'nhwc' as const;
  constructor(
    readonly inputSize: number,
    readonly outputSize: number,
    private readonly embed: (pixels: tf.Tensor4D) => tf.Tensor,
  ) {}

  async run(batch: Float32Array, n: number): Promise<Float32Array> {
    const s = this.inputSize;
    const y = tf.tidy(() => {
      const x = tf.tensor4d(batch.subarray(0, n * s * s * 3), [n, s, s, 3]);
      return this.embed(x);
    });
    try {
      return (await y.data()) as Float32Array;
    } finally {
      y.dispose();
    }
  }

  async dispose(): Promise<void> {}
}
