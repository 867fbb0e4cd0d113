import * as tf from '@tensorflow/tfjs';
import { FinetuneError } from '../errors.js';
import { seededRandom, shuffleInPlace } from '../util/random.js';
import { CallbackList, type EpochLogs, type TrainingCallback } from './callbacks.js';

/** Rows of inputs with integer labels, served as tensors in batches. */
export interface Batches {
  readonly size: number;
  readonly labels: Int32Array;
  /** The inputs for these rows, as one tensor (the caller disposes it). */
  take(rows: ArrayLike<number>): tf.Tensor;
}

/** Feature rows held in one Float32Array (`size × rowShape`). */
export class ArrayBatches implements Batches {
  readonly size: number;
  private readonly rowLength: number;
  constructor(
    private readonly data: Float32Array,
    private readonly rowShape: readonly number[],
    readonly labels: Int32Array,
  ) {
    this.rowLength = rowShape.reduce((a, b) => a * b, 1);
    this.size = labels.length;
    if (data.length !== this.size * this.rowLength) {
      throw new Error(
        `ArrayBatches: ${data.length} values for ${this.size} rows of ${this.rowLength}`,
      );
    }
  }
  take(rows: ArrayLike<number>): tf.Tensor {
    const out = new Float32Array(rows.length * this.rowLength);
    for (let i = 0; i < rows.length; i++) {
      const r = rows[i]!;
      out.set(this.data.subarray(r * this.rowLength, (r + 1) * this.rowLength), i * this.rowLength);
    }
    return tf.tensor(out, [rows.length, ...this.rowShape]);
  }
}

/** Logits for a batch; `training` turns dropout (and only what the caller allows) on. */
export type Forward = (x: tf.Tensor, training: boolean) => tf.Tensor;

export interface FitOptions {
  readonly stage: string;
  readonly epochs: number;
  readonly batchSize: number;
  readonly optimizer: tf.Optimizer;
  /** The variables the optimizer updates (the trainable set of this stage). */
  readonly variables: readonly tf.Variable[];
  readonly forward: Forward;
  readonly numClasses: number;
  readonly labelSmoothing: number;
  /** Loss weight of each class (Keras class_weight); null for none. */
  readonly classWeights: readonly number[] | null;
  readonly seed: number;
  /** Called before every training step with a fresh seed, so dropout masks differ per step yet repeat per run. */
  readonly reseed?: (seed: number) => void;
  /** Current learning rate, for the logs. */
  readonly lr: () => number;
  readonly callbacks: readonly TrainingCallback[];
}

/** Mean loss and accuracy over a data set, plus each row's probabilities. */
export interface Evaluation {
  loss: number;
  acc: number;
  probs: Float32Array;
}

function lossOf(
  logits: tf.Tensor,
  labels: tf.Tensor1D,
  numClasses: number,
  labelSmoothing: number,
  weights: tf.Tensor1D | null,
): tf.Scalar {
  const onehot = tf.oneHot(labels, numClasses);
  return tf.losses.softmaxCrossEntropy(
    onehot,
    logits as tf.Tensor2D,
    weights ?? undefined,
    labelSmoothing,
  ) as tf.Scalar;
}

/**
 * Evaluates `forward` (inference mode) over `data` in batches. The loss has no label
 * smoothing and no class weights: it is the plain cross-entropy of the predictions.
 */
export async function evaluateBatches(
  forward: Forward,
  data: Batches,
  batchSize: number,
  numClasses: number,
): Promise<Evaluation> {
  const probs = new Float32Array(data.size * numClasses);
  let lossSum = 0;
  let correct = 0;
  for (let start = 0; start < data.size; start += batchSize) {
    const rows = Array.from(
      { length: Math.min(batchSize, data.size - start) },
      (_, i) => start + i,
    );
    const [p, l] = tf.tidy(() => {
      const x = data.take(rows);
      const logits = forward(x, false);
      const labels = tf.tensor1d(
        rows.map((r) => data.labels[r]!),
        'int32',
      );
      const loss = tf.losses.softmaxCrossEntropy(
        tf.oneHot(labels, numClasses),
        logits as tf.Tensor2D,
        undefined,
        0,
        tf.Reduction.SUM,
      );
      return [tf.softmax(logits), loss];
    });
    const pv = (await p.data()) as Float32Array;
    lossSum += (await l.data())[0]!;
    tf.dispose([p, l]);
    probs.set(pv, start * numClasses);
    rows.forEach((r, i) => {
      if (argmax(pv, i * numClasses, numClasses) === data.labels[r]) correct++;
    });
  }
  return {
    loss: data.size ? lossSum / data.size : Number.NaN,
    acc: data.size ? correct / data.size : Number.NaN,
    probs,
  };
}

/** Keras/sklearn 'balanced': n / (k · n_c) per class. */
export function balancedWeights(labels: Int32Array, numClasses: number): number[] {
  const counts = new Array<number>(numClasses).fill(0);
  for (const l of labels) counts[l]!++;
  const present = counts.filter((c) => c > 0).length;
  return counts.map((c) => (c ? labels.length / (present * c) : 0));
}

export function argmax(values: ArrayLike<number>, offset: number, length: number): number {
  let best = 0;
  for (let k = 1; k < length; k++) if (values[offset + k]! > values[offset + best]!) best = k;
  return best;
}

/** Training diverged: the data and settings gave no model (exit code 3, see EXIT_CODES). */
export function divergedError(
  stage: string,
  epoch: number,
  batch: number,
  loss: number,
): FinetuneError {
  return new FinetuneError(
    `training diverged: the ${stage} stage's loss became ${loss} at epoch ${epoch}, batch ${batch}; nothing was exported (try a lower learning rate)`,
    { kind: 'data' },
  );
}

/**
 * The one training loop: seeded shuffles, a step per batch, validation at every epoch
 * end, named callback events. Every batch's tensors are freed inside the step.
 */
export async function fit(
  train: Batches,
  val: Batches | null,
  options: FitOptions,
): Promise<EpochLogs[]> {
  const { epochs, batchSize, optimizer, variables, forward, numClasses, labelSmoothing } = options;
  const callbacks = new CallbackList(options.callbacks);
  const random = seededRandom(options.seed);
  const classWeights = options.classWeights;
  const history: EpochLogs[] = [];
  const order = Array.from({ length: train.size }, (_, i) => i);
  await callbacks.trainBegin();
  for (let epoch = 0; epoch < epochs; epoch++) {
    const started = performance.now();
    await callbacks.epochBegin(epoch);
    shuffleInPlace(order, random);
    let lossSum = 0;
    let correct = 0;
    let batch = 0;
    for (let start = 0; start < train.size; start += batchSize, batch++) {
      const rows = order.slice(start, start + batchSize);
      await callbacks.batchBegin(batch);
      options.reseed?.(Math.floor(random() * 2 ** 31));
      const [lossT, correctT] = tf.tidy(() => {
        const x = train.take(rows);
        const labelValues = rows.map((r) => train.labels[r]!);
        const labels = tf.tensor1d(labelValues, 'int32');
        const weights = classWeights ? tf.tensor1d(labelValues.map((c) => classWeights[c]!)) : null;
        let hits: tf.Tensor | null = null;
        const { value, grads } = tf.variableGrads(() => {
          const logits = forward(x, true);
          hits = tf.keep(tf.equal(tf.argMax(logits, 1), labels).sum());
          return lossOf(logits, labels, numClasses, labelSmoothing, weights);
        }, variables as tf.Variable[]);
        optimizer.applyGradients(grads);
        return [value, hits as unknown as tf.Tensor];
      });
      const loss = (await lossT.data())[0]!;
      correct += (await correctT.data())[0]!;
      tf.dispose([lossT, correctT]);
      // A NaN or infinite loss never comes back: the weights are already poisoned, and
      // carrying on would export a model that predicts NaN.
      if (!Number.isFinite(loss)) throw divergedError(options.stage, epoch + 1, batch + 1, loss);
      lossSum += loss * rows.length;
      await callbacks.batchEnd(batch, { batch, size: rows.length, loss });
      // On wasm every await above resolves as a microtask, so without this the loop never
      // lets the event loop run: signals (Ctrl-C), timers and I/O would wait for the end.
      await new Promise<void>((resolve) => setImmediate(resolve));
    }
    const logs: EpochLogs = {
      stage: options.stage,
      epoch: epoch + 1,
      loss: lossSum / train.size,
      acc: correct / train.size,
      lr: options.lr(),
      seconds: 0,
    };
    if (val && val.size > 0) {
      const ev = await evaluateBatches(forward, val, Math.max(batchSize, 64), numClasses);
      logs.val_loss = ev.loss;
      logs.val_acc = ev.acc;
    }
    logs.seconds = (performance.now() - started) / 1000;
    await callbacks.epochEnd(epoch, logs);
    history.push(logs);
  }
  options.reseed?.(Number.NaN);
  await callbacks.trainEnd();
  return history;
}
