import * as tf from '@tensorflow/tfjs';
import { FinetuneError } from '../errors.js';
import { seededRandom, shuffleInPlace } from '../util/random.js';
import { Scratch } from '../util/scratch.js';
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
  private readonly scratch = new Scratch();
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
    // Every element is written below, and the tensor copies the values (see Scratch).
    const out = this.scratch.take(rows.length * this.rowLength);
    for (let i = 0; i < rows.length; i++) {
      const r = rows[i]!;
      out.set(this.data.subarray(r * this.rowLength, (r + 1) * this.rowLength), i * this.rowLength);
    }
    return tf.tensor(out, [rows.length, ...this.rowShape]);
  }
}

/**
 * Logits for a batch; `training` turns dropout (and only what the caller allows) on. When
 * members are stacked, inputs are [K, B, …] and logits [K, B, C].
 */
export type Forward = (x: tf.Tensor, training: boolean) => tf.Tensor;

/** What a training step needs of an optimizer (StageOptimizer keeps a learning rate per member). */
export interface StepOptimizer {
  applyGradients(grads: tf.NamedTensorMap): void;
}

/** One of the models a fit trains side by side (usually the only one). */
export interface FitMember {
  /** Seeds its shuffles and, through `reseed`, its dropout masks. */
  readonly seed: number;
  readonly labelSmoothing: number;
  /** Loss weight of each class (Keras class_weight); null for none. */
  readonly classWeights: readonly number[] | null;
  readonly callbacks: readonly TrainingCallback[];
  /** Current learning rate, for the logs. */
  readonly lr: () => number;
}

export interface FitOptions {
  readonly stage: string;
  readonly epochs: number;
  readonly batchSize: number;
  readonly optimizer: StepOptimizer;
  /** The variables the optimizer updates (the trainable set of this stage). */
  readonly variables: readonly tf.Variable[];
  readonly forward: Forward;
  readonly numClasses: number;
  /**
   * The models trained: one, or several stacked on the first axis of every variable (all
   * see the same data and batch size, each in its own order with its own settings).
   */
  readonly members: readonly FitMember[];
  /**
   * Inputs and logits carry the member axis (required with more than one member). For
   * validation, a stacked forward gets the rows once, without that axis: every member
   * sees all of them.
   */
  readonly stacked?: boolean;
  /** Called before every training step with a fresh seed per member, so dropout masks differ per step yet repeat per run. */
  readonly reseed?: (seeds: readonly number[]) => void;
  /** The stage's own work between steps and epochs (averaging, early stopping). */
  readonly hooks?: FitHooks;
  /** Continue a fit from the state `hooks.epochDone` was given (the variables are the caller's to restore). */
  readonly resume?: FitLoopState;
}

/**
 * Where the loop stands after an epoch, enough to continue it exactly: the epochs done,
 * the logs so far, which members stopped or diverged, and each member's random source as
 * its shuffled order and the numbers drawn from it since its seed.
 */
export interface FitLoopState {
  readonly epochs: number;
  readonly histories: readonly (readonly EpochLogs[])[];
  readonly stopped: readonly boolean[];
  /** Why a member stopped counting (its divergence message), or null. */
  readonly diverged: readonly (string | null)[];
  readonly draws: readonly number[];
  readonly orders: readonly (readonly number[])[];
}

/** Stage-level hooks of the loop: they see every member still training at once. */
export interface FitHooks {
  /** After each optimizer step, before the members' batch-end callbacks. */
  afterStep?(epoch: number, step: number, stepsPerEpoch: number, active: readonly number[]): void;
  /**
   * After each epoch's validation, before the members' epoch-end callbacks (which see what
   * it adds to the logs). Returns the members that stop training after this epoch.
   */
  afterEpoch?(
    epoch: number,
    logs: readonly (EpochLogs | null)[],
    active: readonly number[],
  ): Promise<readonly number[]>;
  /** After every epoch has fully ended (the members' callbacks included): where the loop stands. */
  epochDone?(epoch: number, state: FitLoopState): Promise<void>;
}

/** Mean loss and accuracy over a data set, plus each row's probabilities. */
export interface Evaluation {
  loss: number;
  acc: number;
  probs: Float32Array;
}

/** Per-member settings as tensors for the loss: label smoothing [K, 1, 1] and row weights [K, B]. */
interface LossSettings {
  readonly smoothing: tf.Tensor | null;
  readonly weights: tf.Tensor | null;
}

/**
 * Each member's training loss [K] from logits [K, B, C] and labels [K, B]: the arithmetic of
 * tf.losses.softmaxCrossEntropy (label smoothing, then the mean over rows weighted by class
 * weight and divided by the rows of non-zero weight), with every setting per member.
 */
function memberLosses(
  logits: tf.Tensor,
  labels: tf.Tensor,
  numClasses: number,
  s: LossSettings,
): tf.Tensor1D {
  let onehot = tf.oneHot(labels, numClasses);
  if (s.smoothing)
    onehot = tf.add(tf.mul(onehot, tf.sub(1, s.smoothing)), tf.div(s.smoothing, numClasses));
  const losses = tf.losses.softmaxCrossEntropy(onehot, logits, undefined, 0, tf.Reduction.NONE);
  if (!s.weights) return tf.div(tf.sum(losses, -1), losses.shape[1]!) as tf.Tensor1D;
  const nonZero = tf.cast(tf.sum(tf.notEqual(s.weights, 0), -1), 'float32');
  return tf.div(tf.sum(tf.mul(losses, s.weights), -1), nonZero) as tf.Tensor1D;
}

/**
 * Evaluates `forward` (inference mode) over `data` in batches for each of `members`
 * stacked models (every member sees every row). The loss has no label smoothing and no
 * class weights: it is the plain cross-entropy of the predictions.
 */
export async function evaluateMembers(
  forward: Forward,
  data: Batches,
  batchSize: number,
  numClasses: number,
  members: number,
  stacked: boolean,
): Promise<Evaluation[]> {
  const probs = Array.from({ length: members }, () => new Float32Array(data.size * numClasses));
  const lossSum = new Float64Array(members);
  const correct = new Float64Array(members);
  for (let start = 0; start < data.size; start += batchSize) {
    const rows = Array.from(
      { length: Math.min(batchSize, data.size - start) },
      (_, i) => start + i,
    );
    const [p, l] = tf.tidy(() => {
      // Every member sees the same rows: a stacked forward takes them without the member axis.
      const x = data.take(rows);
      let logits = forward(x, false);
      if (!stacked) logits = tf.expandDims(logits, 0);
      const labels = tf.tensor1d(
        rows.map((r) => data.labels[r]!),
        'int32',
      );
      const onehot = tf.tile(tf.expandDims(tf.oneHot(labels, numClasses), 0), [members, 1, 1]);
      const losses = tf.losses.softmaxCrossEntropy(onehot, logits, undefined, 0, tf.Reduction.NONE);
      return [tf.softmax(logits), tf.sum(losses, -1)];
    });
    const pv = (await p.data()) as Float32Array;
    const lv = await l.data();
    tf.dispose([p, l]);
    const per = rows.length * numClasses;
    for (let m = 0; m < members; m++) {
      lossSum[m]! += lv[m]!;
      const mp = pv.subarray(m * per, (m + 1) * per);
      probs[m]!.set(mp, start * numClasses);
      rows.forEach((r, i) => {
        if (argmax(mp, i * numClasses, numClasses) === data.labels[r]) correct[m]!++;
      });
    }
  }
  return probs.map((p, m) => ({
    loss: data.size ? lossSum[m]! / data.size : Number.NaN,
    acc: data.size ? correct[m]! / data.size : Number.NaN,
    probs: p,
  }));
}

/** `evaluateMembers` for one model. */
export async function evaluateBatches(
  forward: Forward,
  data: Batches,
  batchSize: number,
  numClasses: number,
): Promise<Evaluation> {
  return (await evaluateMembers(forward, data, batchSize, numClasses, 1, false))[0]!;
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

/** Per-member loss settings as tensors (null where every member has none). */
function lossSettings(members: readonly FitMember[], rowLabels: readonly number[][]): LossSettings {
  const k = members.length;
  const smoothing = members.some((m) => m.labelSmoothing > 0)
    ? tf.tensor(
        members.map((m) => m.labelSmoothing),
        [k, 1, 1],
      )
    : null;
  const weights = members.some((m) => m.classWeights)
    ? tf.tensor2d(
        members.map((m, i) => rowLabels[i]!.map((c) => (m.classWeights ? m.classWeights[c]! : 1))),
      )
    : null;
  return { smoothing, weights };
}

/** What a fit leaves: each member's epoch logs, and why a member stopped counting (null: it did not). */
export interface FitResult {
  readonly histories: EpochLogs[][];
  /** A member whose loss became NaN or infinite (stacked members only; one member throws). */
  readonly diverged: (FinetuneError | null)[];
}

/**
 * The one training loop: seeded shuffles, a step per batch, validation at every epoch
 * end, named callback events. Every batch's tensors are freed inside the step. Members
 * (models stacked side by side) each have their own order, settings, callbacks and logs;
 * one step updates them all. A member whose loss diverges drops out of the callbacks and
 * logs (its slice cannot touch the others'); with one member, or when all diverge, the
 * fit throws.
 */
export async function fit(
  train: Batches,
  val: Batches | null,
  options: FitOptions,
): Promise<FitResult> {
  const { epochs, batchSize, optimizer, variables, forward, numClasses, members } = options;
  const k = members.length;
  const stacked = options.stacked ?? false;
  if (k > 1 && !stacked) throw new Error('fit: several members must be stacked');
  const callbacks = members.map((m) => new CallbackList(m.callbacks));
  const resume = options.resume;
  if (
    resume &&
    (resume.histories.length !== k || resume.orders.some((o) => o.length !== train.size))
  )
    throw new Error('fit: the state to resume is of another fit');
  // Each member's random source counts its draws, so a checkpoint can bring it back.
  const draws = members.map((_, m) => resume?.draws[m] ?? 0);
  const randoms = members.map((member, m) => {
    const next = seededRandom(member.seed);
    for (let i = 0; i < draws[m]!; i++) next();
    return () => {
      draws[m]!++;
      return next();
    };
  });
  const histories: EpochLogs[][] = members.map((_, m) => [...(resume?.histories[m] ?? [])]);
  const diverged: (FinetuneError | null)[] = members.map((_, m) => {
    const message = resume?.diverged[m];
    return message ? new FinetuneError(message, { kind: 'data' }) : null;
  });
  const stopped = members.map((_, m) => resume?.stopped[m] ?? false);
  const isActive = (m: number) => !diverged[m] && !stopped[m];
  const activeList = () => members.flatMap((_, m) => (isActive(m) ? [m] : []));
  const orders = members.map((_, m) =>
    resume ? [...resume.orders[m]!] : Array.from({ length: train.size }, (_, i) => i),
  );
  const stepsPerEpoch = Math.ceil(train.size / batchSize);
  const each = async (f: (c: CallbackList, m: number) => Promise<void>) => {
    for (let m = 0; m < k; m++) if (isActive(m)) await f(callbacks[m]!, m);
  };
  await each((c) => c.trainBegin());
  for (let epoch = resume?.epochs ?? 0; epoch < epochs && activeList().length; epoch++) {
    const started = performance.now();
    await each((c) => c.epochBegin(epoch));
    orders.forEach((order, m) => {
      shuffleInPlace(order, randoms[m]!);
    });
    const lossSum = new Float64Array(k);
    const correct = new Float64Array(k);
    let batch = 0;
    for (let start = 0; start < train.size; start += batchSize, batch++) {
      const rows = orders.map((order) => order.slice(start, start + batchSize));
      const size = rows[0]!.length;
      await each((c) => c.batchBegin(batch));
      options.reseed?.(randoms.map((random) => Math.floor(random() * 2 ** 31)));
      const [lossT, correctT] = tf.tidy(() => {
        const flat = rows.flat();
        const taken = train.take(flat);
        const x = stacked ? taken.reshape([k, size, ...taken.shape.slice(1)]) : taken;
        const rowLabels = rows.map((r) => r.map((i) => train.labels[i]!));
        const labels = tf.tensor2d(rowLabels, [k, size], 'int32');
        const settings = lossSettings(members, rowLabels);
        let hits: tf.Tensor | null = null;
        let perMember: tf.Tensor | null = null;
        const { grads } = tf.variableGrads(() => {
          let logits = forward(x, true);
          if (!stacked) logits = tf.expandDims(logits, 0);
          hits = tf.keep(tf.sum(tf.equal(tf.argMax(logits, -1), labels), -1));
          const losses = memberLosses(logits, labels, numClasses, settings);
          perMember = tf.keep(losses);
          return tf.sum(losses) as tf.Scalar;
        }, variables as tf.Variable[]);
        optimizer.applyGradients(grads);
        return [perMember as unknown as tf.Tensor, hits as unknown as tf.Tensor];
      });
      const losses = await lossT.data();
      const hitCounts = await correctT.data();
      tf.dispose([lossT, correctT]);
      for (let m = 0; m < k; m++) {
        const loss = losses[m]!;
        // A NaN or infinite loss never comes back: the weights are already poisoned, and
        // carrying on would export a model that predicts NaN.
        if (!Number.isFinite(loss) && !diverged[m]) {
          diverged[m] = divergedError(options.stage, epoch + 1, batch + 1, loss);
          if (diverged.every(Boolean)) throw diverged[0]!;
        }
        correct[m]! += hitCounts[m]!;
        lossSum[m]! += loss * size;
      }
      options.hooks?.afterStep?.(epoch, batch, stepsPerEpoch, activeList());
      await each((c, m) => c.batchEnd(batch, { batch, size, loss: losses[m]! }));
      // On wasm every await above resolves as a microtask, so without this the loop never
      // lets the event loop run: signals (Ctrl-C), timers and I/O would wait for the end.
      await new Promise<void>((resolve) => setImmediate(resolve));
    }
    const evals =
      val && val.size > 0
        ? await evaluateMembers(forward, val, Math.max(batchSize, 64), numClasses, k, stacked)
        : null;
    const seconds = (performance.now() - started) / 1000;
    const logs = members.map((member, m): EpochLogs | null => {
      if (!isActive(m)) return null;
      const l: EpochLogs = {
        stage: options.stage,
        epoch: epoch + 1,
        loss: lossSum[m]! / train.size,
        acc: correct[m]! / train.size,
        lr: member.lr(),
        seconds,
      };
      if (evals) {
        l.val_loss = evals[m]!.loss;
        l.val_acc = evals[m]!.acc;
      }
      return l;
    });
    const stopping = (await options.hooks?.afterEpoch?.(epoch, logs, activeList())) ?? [];
    await each(async (c, m) => {
      await c.epochEnd(epoch, logs[m]!);
      histories[m]!.push(logs[m]!);
    });
    for (const m of stopping) stopped[m] = true;
    await options.hooks?.epochDone?.(epoch, {
      epochs: epoch + 1,
      histories,
      stopped,
      diverged: diverged.map((d) => d?.message ?? null),
      draws,
      orders,
    });
  }
  options.reseed?.(members.map(() => Number.NaN));
  for (let m = 0; m < k; m++) if (!diverged[m]) await callbacks[m]!.trainEnd();
  return { histories, diverged };
}
