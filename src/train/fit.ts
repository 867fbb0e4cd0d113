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
  /**
   * Each step's gradient as the sum of its two halves' (one member only), the second
   * perhaps computed in a worker thread meanwhile. The figures do not depend on where the
   * second half runs. Not for BatchNorm in training mode: its statistics would be the halves'.
   */
  readonly halves?: HalvedSteps;
  /**
   * Computes each step's loss, correct rows and gradients elsewhere (one member only), from
   * the variables' current values: the fine-tune stage's steps on ONNX Runtime. The
   * gradients are applied here, by `optimizer`.
   */
  readonly external?: ExternalSteps;
}

/** Where a step's gradients come from instead of this thread's tfjs (see FitOptions.external). */
export interface ExternalSteps {
  gradients(part: StepPart): Promise<PartOutcome<Float32Array>>;
  /** Logits [n, classes] of rows [n, ...] in inference mode: validation runs there too. */
  logits?(x: Float32Array, shape: readonly number[]): Promise<Float32Array>;
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
 * weight and divided by the rows of non-zero weight, or 0 when there are none), with every
 * setting per member.
 */
function memberLosses(
  logits: tf.Tensor,
  labels: tf.Tensor,
  numClasses: number,
  s: LossSettings,
  divisor?: number,
): tf.Tensor1D {
  let onehot = tf.oneHot(labels, numClasses);
  if (s.smoothing)
    onehot = tf.add(tf.mul(onehot, tf.sub(1, s.smoothing)), tf.div(s.smoothing, numClasses));
  const losses = tf.losses.softmaxCrossEntropy(onehot, logits, undefined, 0, tf.Reduction.NONE);
  const summed = s.weights ? tf.sum(tf.mul(losses, s.weights), -1) : tf.sum(losses, -1);
  if (divisor !== undefined) return tf.div(summed, divisor) as tf.Tensor1D;
  if (!s.weights) return tf.div(summed, losses.shape[1]!) as tf.Tensor1D;
  // No row of non-zero weight: the loss is 0, as TensorFlow's safe mean gives it (not 0 / 0).
  const nonZero = tf.maximum(tf.cast(tf.sum(tf.notEqual(s.weights, 0), -1), 'float32'), 1);
  return tf.div(summed, nonZero) as tf.Tensor1D;
}

/**
 * One part of a training step's batch, as plain arrays (what a worker thread is sent): its
 * rows' inputs and labels, and what makes its loss that part's share of the batch's.
 */
export interface StepPart {
  readonly x: Float32Array;
  /** [rows, ...row shape]. */
  readonly shape: readonly number[];
  readonly labels: Int32Array;
  /** Each row's class weight (null: no class weights). */
  readonly rowWeights: Float32Array | null;
  readonly labelSmoothing: number;
  /** What the part's summed loss is divided by: the whole batch's rows (of non-zero weight). */
  readonly divisor: number;
  /** The dropout seed of the part (of its first chunk, see halfGradients). */
  readonly seed: number;
}

/** A part's share of a step: its loss (summed over its rows ÷ divisor), correct rows, gradients. */
export interface PartOutcome<G = tf.Tensor> {
  readonly loss: number;
  readonly hits: number;
  /** One per variable, in the order of the variables. */
  readonly grads: readonly G[];
}

/**
 * The gradient of one part of a batch (see StepPart) at the variables' current values:
 * the loss is the part's rows' summed softmax cross-entropy (label smoothing, class
 * weights) divided by `part.divisor`, so the parts' gradients add up to the whole batch's.
 * The gradients are the caller's to dispose. The same function serves this thread and a
 * step worker, so a part comes out bit for bit the same wherever it runs.
 */
export function partGradients(
  forward: Forward,
  variables: readonly tf.Variable[],
  numClasses: number,
  x: tf.Tensor,
  part: Omit<StepPart, 'x' | 'shape' | 'seed'>,
): { loss: tf.Scalar; hits: tf.Scalar; grads: tf.Tensor[] } {
  return tf.tidy(() => {
    const labels = tf.tensor2d(part.labels, [1, part.labels.length], 'int32');
    const settings: LossSettings = {
      smoothing: part.labelSmoothing > 0 ? tf.tensor([part.labelSmoothing], [1, 1, 1]) : null,
      weights: part.rowWeights ? tf.tensor2d(part.rowWeights, [1, part.labels.length]) : null,
    };
    let hits: tf.Scalar | null = null;
    const { value, grads } = tf.variableGrads(() => {
      const logits = tf.expandDims(forward(x, true), 0);
      hits = tf.keep(tf.sum(tf.equal(tf.argMax(logits, -1), labels)) as tf.Scalar);
      return tf.sum(memberLosses(logits, labels, numClasses, settings, part.divisor)) as tf.Scalar;
    }, variables as tf.Variable[]);
    return {
      loss: value as tf.Scalar,
      hits: hits as unknown as tf.Scalar,
      grads: variables.map((v) => grads[v.name]!),
    };
  });
}

/**
 * Most rows one forward and backward pass of a half takes (see halfGradients): a pass's
 * live tensors grow with its rows, and each thread's wasm heap keeps its peak for good.
 * The bench's fine-tune recipe (`blocks:3`) peaked at 272 MB for 16 rows, 146 MB for 8, at the same
 * speed per row (4 rows: 15% slower).
 */
export const CHUNK_ROWS = 8;

/**
 * One half of a step (see FitOptions.halves): its rows in chunks of CHUNK_ROWS, each
 * chunk's dropout seeded from the half's seed and its place, the chunks' gradients added
 * in order. `xOf(a, b)` gives the half's rows a to b as a tensor (the caller's to make,
 * this function's to dispose). The step's thread and its worker both compute a half with
 * this function, so a half is bit for bit the same wherever it runs.
 */
export function halfGradients(
  forward: Forward,
  variables: readonly tf.Variable[],
  numClasses: number,
  reseed: (seeds: readonly number[]) => void,
  half: Omit<StepPart, 'x' | 'shape'>,
  xOf: (a: number, b: number) => tf.Tensor,
): PartOutcome {
  const rows = half.labels.length;
  let loss = 0;
  let hits = 0;
  let sum: tf.Tensor[] | null = null;
  try {
    for (let a = 0, chunk = 0; a < rows; a += CHUNK_ROWS, chunk++) {
      const b = Math.min(rows, a + CHUNK_ROWS);
      reseed([chunkSeed(half.seed, chunk)]);
      const x = xOf(a, b);
      let r: ReturnType<typeof partGradients>;
      try {
        r = partGradients(forward, variables, numClasses, x, {
          labels: half.labels.subarray(a, b),
          rowWeights: half.rowWeights?.subarray(a, b) ?? null,
          labelSmoothing: half.labelSmoothing,
          divisor: half.divisor,
        });
      } finally {
        x.dispose();
      }
      loss += r.loss.dataSync()[0]!;
      hits += r.hits.dataSync()[0]!;
      tf.dispose([r.loss, r.hits]);
      const before: tf.Tensor[] | null = sum;
      sum = before ? r.grads.map((g, i) => tf.add(before[i]!, g)) : r.grads;
      if (before) tf.dispose([...before, ...r.grads]);
    }
  } catch (err) {
    tf.dispose(sum ?? []);
    throw err;
  }
  return { loss, hits, grads: sum ?? [] };
}

/** The dropout seed of a half's chunk: the half's own for its first. */
export function chunkSeed(seed: number, chunk: number): number {
  return (seed + chunk * 0x6a09e667) % 2 ** 31;
}

/**
 * A step taken as the sum of two halves' gradients (see FitOptions.halves): the batch's
 * first ⌈n/2⌉ rows, then the rest, each with its own dropout seed.
 */
export interface HalvedSteps {
  /**
   * Computes the second half elsewhere (a step worker) at the variables' current values;
   * null, or a promise of null (the worker failed), computes it here after the first.
   */
  readonly second: ((part: StepPart) => Promise<PartOutcome<Float32Array> | null>) | null;
}

/** The second half's dropout seed, from the step's seed (the first half's). */
export function secondHalfSeed(seed: number): number {
  return (seed + 0x9e3779b1) % 2 ** 31;
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
  external?: ExternalSteps,
): Promise<Evaluation[]> {
  const outside = members === 1 && !stacked ? external?.logits?.bind(external) : undefined;
  const probs = Array.from({ length: members }, () => new Float32Array(data.size * numClasses));
  const lossSum = new Float64Array(members);
  const correct = new Float64Array(members);
  for (let start = 0; start < data.size; start += batchSize) {
    const rows = Array.from(
      { length: Math.min(batchSize, data.size - start) },
      (_, i) => start + i,
    );
    let computed: Float32Array | null = null;
    if (outside) {
      const x = data.take(rows);
      try {
        computed = await outside(x.dataSync() as Float32Array, x.shape);
      } finally {
        x.dispose();
      }
    }
    const [p, l] = tf.tidy(() => {
      // Every member sees the same rows: a stacked forward takes them without the member axis.
      let logits = computed
        ? tf.tensor(computed, [rows.length, numClasses])
        : forward(data.take(rows), false);
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

/**
 * One step on the whole batch (every member's rows stacked when there are several): each
 * member's loss and correct rows.
 */
async function wholeStep(
  train: Batches,
  rows: readonly number[][],
  seeds: readonly number[],
  options: FitOptions,
): Promise<{ losses: ArrayLike<number>; hitCounts: ArrayLike<number> }> {
  const { forward, variables, numClasses, members, optimizer } = options;
  const k = members.length;
  const stacked = options.stacked ?? false;
  const size = rows[0]!.length;
  options.reseed?.(seeds);
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
  return { losses, hitCounts };
}

/**
 * One step of a one-member fit in two halves (see FitOptions.halves): the second half is
 * sent out first (when there is somewhere to send it), the first computed here, then the
 * gradients are added, first half plus second, and applied. Returns the batch's loss (the
 * halves' shares added) and its correct rows.
 */
async function halvedStep(
  train: Batches,
  rows: readonly number[],
  seed: number,
  options: FitOptions,
): Promise<{ loss: number; hits: number }> {
  const { forward, variables, numClasses, members } = options;
  if (members.length !== 1 || options.stacked) throw new Error('fit: halves need one member');
  const half = stepParts(train, rows, members[0]!);
  const reseed = options.reseed ?? (() => undefined);
  const here = (r: readonly number[], halfSeed: number) =>
    halfGradients(forward, variables, numClasses, reseed, half(r, halfSeed), (a, b) =>
      train.take(r.slice(a, b)),
    );
  const mid = Math.ceil(rows.length / 2);
  const firstRows = rows.slice(0, mid);
  const secondRows = rows.slice(mid);
  const seed2 = secondHalfSeed(seed);
  let sent: Promise<PartOutcome<Float32Array> | null> | null = null;
  if (secondRows.length && options.halves?.second) {
    const x = train.take(secondRows);
    const values = x.dataSync().slice() as Float32Array;
    x.dispose();
    sent = options.halves.second({ ...half(secondRows, seed2), x: values, shape: x.shape });
  }
  const outcomes: PartOutcome[] = [here(firstRows, seed)];
  try {
    if (secondRows.length) {
      const got = sent ? await sent : null;
      outcomes.push(got ? asTensors(got, variables) : here(secondRows, seed2));
    }
    applyParts(options, outcomes);
    return {
      loss: outcomes.reduce((t, o) => t + o.loss, 0),
      hits: outcomes.reduce((t, o) => t + o.hits, 0),
    };
  } finally {
    for (const o of outcomes) tf.dispose(o.grads as tf.Tensor[]);
  }
}

/**
 * The parts of a one-member step over `rows`: each part's labels, row weights and seed,
 * with the whole batch's divisor (its rows, or its rows of non-zero class weight).
 */
function stepParts(
  train: Batches,
  rows: readonly number[],
  member: FitMember,
): (part: readonly number[], seed: number) => Omit<StepPart, 'x' | 'shape'> {
  const cw = member.classWeights;
  // At least 1: a batch with no row of non-zero weight has loss 0 (see memberLosses).
  const divisor = Math.max(
    1,
    cw ? rows.filter((i) => cw[train.labels[i]!] !== 0).length : rows.length,
  );
  return (part, seed) => {
    const labels = Int32Array.from(part, (i) => train.labels[i]!);
    return {
      labels,
      rowWeights: cw ? Float32Array.from(labels, (c) => cw[c]!) : null,
      labelSmoothing: member.labelSmoothing,
      divisor,
      seed,
    };
  };
}

/**
 * One step of a one-member fit computed by `options.external` (see FitOptions.external):
 * the batch goes out whole with the step's seed, and the gradients that come back are
 * applied here. Returns the batch's loss and correct rows.
 */
async function externalStep(
  train: Batches,
  rows: readonly number[],
  seed: number,
  options: FitOptions,
): Promise<{ loss: number; hits: number }> {
  const { members } = options;
  if (members.length !== 1 || options.stacked)
    throw new Error('fit: external steps need one member');
  const x = train.take(rows);
  let got: PartOutcome<Float32Array>;
  try {
    // x stays alive until the step is back: on the cpu backend dataSync is its own storage.
    got = await options.external!.gradients({
      ...stepParts(train, rows, members[0]!)(rows, seed),
      x: x.dataSync() as Float32Array,
      shape: x.shape,
    });
  } finally {
    x.dispose();
  }
  const outcome = asTensors(got, options.variables);
  try {
    applyParts(options, [outcome]);
  } finally {
    tf.dispose(outcome.grads as tf.Tensor[]);
  }
  return { loss: got.loss, hits: got.hits };
}

/** A part computed elsewhere with its gradients as tensors (the caller's to dispose). */
function asTensors(got: PartOutcome<Float32Array>, variables: readonly tf.Variable[]): PartOutcome {
  return { ...got, grads: got.grads.map((g, i) => tf.tensor(g, variables[i]!.shape)) };
}

/** Adds the parts' gradients variable by variable, in the parts' order, and applies the sums. */
function applyParts(options: FitOptions, parts: readonly PartOutcome[]): void {
  tf.tidy(() => {
    const grads: tf.NamedTensorMap = {};
    options.variables.forEach((v, i) => {
      grads[v.name] = parts
        .slice(1)
        .reduce((sum, p) => tf.add(sum, p.grads[i]!), parts[0]!.grads[i]!);
    });
    options.optimizer.applyGradients(grads);
  });
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
  const { epochs, batchSize, forward, numClasses, members } = options;
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
      const seeds = randoms.map((random) => Math.floor(random() * 2 ** 31));
      const oneMember = options.external
        ? externalStep(train, rows[0]!, seeds[0]!, options)
        : options.halves
          ? halvedStep(train, rows[0]!, seeds[0]!, options)
          : null;
      const { losses, hitCounts } = oneMember
        ? await oneMember.then((r) => ({ losses: [r.loss], hitCounts: [r.hits] }))
        : await wholeStep(train, rows, seeds, options);
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
        ? await evaluateMembers(
            forward,
            val,
            Math.max(batchSize, 64),
            numClasses,
            k,
            stacked,
            options.external,
          )
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
