import * as tf from '@tensorflow/tfjs';
import type { Batches } from '../train/fit.js';

/**
 * Exact running moments, element by element, of row sets folded in one at a time (Chan,
 * Golub and LeVeque's pairwise update, in float64): after any sequence of `add`s, `mean`
 * and `variance` equal the mean and the biased (÷N) variance of every row seen together.
 */
export class MomentAccumulator {
  private readonly sum: Float64Array;
  private readonly m2: Float64Array;
  private n = 0;

  constructor(readonly size: number) {
    this.sum = new Float64Array(size);
    this.m2 = new Float64Array(size);
  }

  /** Rows seen so far. */
  get count(): number {
    return this.n;
  }

  /** Folds in `rows` rows whose mean and biased variance are given (element by element). */
  add(mean: ArrayLike<number>, variance: ArrayLike<number>, rows: number): void {
    if (mean.length !== this.size || variance.length !== this.size)
      throw new Error(`MomentAccumulator: ${mean.length} values for ${this.size}`);
    if (rows <= 0) return;
    const total = this.n + rows;
    for (let i = 0; i < this.size; i++) {
      const before = this.n ? this.sum[i]! / this.n : 0;
      const delta = mean[i]! - before;
      this.m2[i]! += variance[i]! * rows + ((delta * delta * this.n) / total) * rows;
      this.sum[i]! += mean[i]! * rows;
    }
    this.n = total;
  }

  mean(): Float32Array {
    return Float32Array.from(this.sum, (s) => (this.n ? s / this.n : 0));
  }

  /** The biased variance (÷N), tfjs's BatchNormalization convention (tf.moments). */
  variance(): Float32Array {
    return Float32Array.from(this.m2, (s) => (this.n ? s / this.n : 0));
  }
}

/**
 * Row ranges of one pass over `size` rows in batches of about `batchSize`: as many batches
 * as `batchSize` gives, their sizes differing by at most one, so no batch is left with a
 * row or two (whose batch statistics, which the layers after it see in the pass, would be
 * degenerate).
 */
export function passBatches(size: number, batchSize: number): number[][] {
  const count = Math.max(1, Math.ceil(size / batchSize));
  const out: number[][] = [];
  let start = 0;
  for (let b = 0; b < count; b++) {
    const end = Math.round(((b + 1) * size) / count);
    if (end > start) out.push(Array.from({ length: end - start }, (_, i) => start + i));
    start = end;
  }
  return out;
}

/**
 * BatchNormalization layers of a stage that run in training mode (batch statistics, moving
 * statistics updated each step), downstream of the variables the stage averages: their
 * moving statistics belong to the weights (early stopping and `--keep best` copy them
 * with the variables) and are recomputed for averaged weights.
 */
export interface BatchNormState {
  /** The layers' names (what the summary lists as refreshed). */
  readonly layers: readonly string[];
  /** Their moving means and variances (stacked models: member axis first). */
  readonly variables: readonly tf.Variable[];
  /** Stacked models: stop updating these members' statistics (their training has ended). */
  hold?(members: readonly number[]): void;
  /**
   * Resets the statistics of `members` and recomputes them from one pass over `train`
   * with the weights as they are now (see `refreshBatchNorm`).
   */
  refresh(train: Batches, batchSize: number, members: readonly number[]): Promise<void>;
}

/** The parts of a tfjs BatchNormalization layer the refresh (and the fine-tune stage's inference-mode call) reads and writes. */
export interface BatchNormLayer {
  readonly name: string;
  call: (
    inputs: tf.Tensor | tf.Tensor[],
    kwargs: Record<string, unknown>,
  ) => tf.Tensor | tf.Tensor[];
  axis: number;
  epsilon: number;
  gamma: { read(): tf.Tensor } | null;
  beta: { read(): tf.Tensor } | null;
  movingMean: { read(): tf.Tensor; write(t: tf.Tensor): void };
  movingVariance: { read(): tf.Tensor; write(t: tf.Tensor): void };
}

/**
 * PyTorch's `update_bn` for tfjs layers: the moving mean and variance of every
 * BatchNormalization in `layers` recomputed from one pass over `train` (in order, batches
 * of about `batchSize`) through `forward`, with the weights as they are. During the pass
 * those layers normalise with their batch's statistics, as in training (so the layers
 * after one see what training showed them); `forward` should run everything else in
 * inference mode: dropout off, since it only adds noise to the statistics of the layers
 * after it (PyTorch runs it in its pass; here the statistics are those of the inputs
 * inference will see), and any other BN on its moving statistics.
 *
 * The result is exact, not a moving average: the mean and the biased variance of each
 * channel over every row (and position) the layer saw in the pass, as if the batches were
 * one, the ÷N variance being tfjs's own convention for moving statistics (tf.moments).
 * `update_bn` instead averages per-batch unbiased variances; with equal batches the means
 * agree exactly and the variances differ by the spread of the batch means.
 *
 * @example
 *   await refreshBatchNorm(suffix.layers, (x) => model.apply(x, { training: false }) as tf.Tensor, train, 32);
 */
export async function refreshBatchNorm(
  layers: readonly tf.layers.Layer[],
  forward: (x: tf.Tensor) => tf.Tensor,
  train: Batches,
  batchSize: number,
): Promise<void> {
  const bns = layers.filter(
    (l) => l.getClassName() === 'BatchNormalization',
  ) as unknown as BatchNormLayer[];
  if (!bns.length || !train.size) return;
  const accs = new Map<BatchNormLayer, MomentAccumulator>();
  const originals = bns.map((l) => l.call);
  bns.forEach((layer) => {
    layer.call = function (this: BatchNormLayer, inputs) {
      const x = Array.isArray(inputs) ? inputs[0]! : inputs;
      const axis = this.axis < 0 ? this.axis + x.rank : this.axis;
      if (axis !== x.rank - 1)
        throw new Error(
          `refreshBatchNorm: ${this.name} normalises axis ${this.axis}, not the last`,
        );
      return tf.tidy(() => {
        const axes = Array.from({ length: x.rank - 1 }, (_, i) => i);
        const { mean, variance } = tf.moments(x, axes);
        const channels = x.shape[axis]!;
        let acc = accs.get(layer);
        if (!acc) {
          acc = new MomentAccumulator(channels);
          accs.set(layer, acc);
        }
        acc.add(mean.dataSync(), variance.dataSync(), x.size / channels);
        return tf.batchNorm(
          x,
          mean,
          variance,
          this.beta?.read() as tf.Tensor1D | undefined,
          this.gamma?.read() as tf.Tensor1D | undefined,
          this.epsilon,
        );
      });
    };
  });
  try {
    for (const rows of passBatches(train.size, batchSize)) {
      tf.tidy(() => {
        forward(train.take(rows));
      });
      // Let signals and timers run between batches, as the training loop does.
      await new Promise<void>((resolve) => setImmediate(resolve));
    }
  } finally {
    bns.forEach((l, i) => {
      l.call = originals[i]!;
    });
  }
  for (const l of bns) {
    const acc = accs.get(l);
    if (!acc) throw new Error(`refreshBatchNorm: ${l.name} was not on the forward pass`);
    tf.tidy(() => {
      l.movingMean.write(tf.tensor1d(acc.mean()));
      l.movingVariance.write(tf.tensor1d(acc.variance()));
    });
  }
}

/**
 * The training-mode BatchNormalization layers among `layers` as a stage's BatchNormState
 * (one model, not stacked); `forward` is the stage's forward in inference mode.
 */
export function layersBatchNorm(
  layers: readonly tf.layers.Layer[],
  forward: (x: tf.Tensor) => tf.Tensor,
): BatchNormState {
  const bns = layers.filter((l) => l.getClassName() === 'BatchNormalization');
  const internals = bns as unknown as BatchNormLayer[];
  return {
    layers: bns.map((l) => l.name),
    variables: internals.flatMap((l) => [
      l.movingMean.read() as tf.Variable,
      l.movingVariance.read() as tf.Variable,
    ]),
    refresh: async (train, batchSize, members) => {
      if (!members.includes(0)) return;
      await refreshBatchNorm(bns, forward, train, batchSize);
    },
  };
}
