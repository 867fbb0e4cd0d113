import * as tf from '@tensorflow/tfjs';
import { type BatchNormState, MomentAccumulator, passBatches } from '../swa/bn-refresh.js';
import type { Batches } from '../train/fit.js';
import { seededRandom } from '../util/random.js';
import { Scratch } from '../util/scratch.js';
import { buildHead, HEAD_BN_EPSILON, HEAD_BN_MOMENTUM, HEAD_LOGITS, headBnName } from './build.js';

type GradFunc = Parameters<typeof tf.customGrad>[0];

/** Where memberSlices reads a stacked tensor, and dropout draws its masks (see Scratch). */
const SLICES = new Scratch();
const MASKS = new Scratch();

/**
 * Each member's slice of a stacked tensor, copied through JavaScript: on wasm, Slice,
 * Unpack and Gather of a large tensor run element by element and cost about 40× the copy.
 * With `transposed`, also each 2-D slice transposed (for a gradient's xᵀ · dy).
 */
function memberSlices(t: tf.Tensor): tf.Tensor[];
function memberSlices(t: tf.Tensor, transposed: true): [tf.Tensor[], tf.Tensor[]];
function memberSlices(t: tf.Tensor, transposed = false): tf.Tensor[] | [tf.Tensor[], tf.Tensor[]] {
  const [k, ...rest] = t.shape;
  const size = rest.reduce((a, b) => a * b, 1);
  // Read into reused space: each slice below is copied into its tensor at once.
  const data = SLICES.read(t);
  const slices = Array.from({ length: k! }, (_, i) =>
    tf.tensor(data.subarray(i * size, (i + 1) * size), rest),
  );
  if (!transposed) return slices;
  const [rows, cols] = rest as [number, number];
  // Transposed by wasm's Transpose, which beats a strided loop in JavaScript (a 12-head step's
  // rows: 3.5 ms against 6 ms).
  const t2 = tf.transpose(t, [0, 2, 1]);
  const flippedData = SLICES.read(t2);
  t2.dispose();
  const flipped = Array.from({ length: k! }, (_, i) =>
    tf.tensor(flippedData.subarray(i * size, (i + 1) * size), [cols, rows]),
  );
  return [slices, flipped];
}

/**
 * y[k] = x[k] · w[k] for every member k, as K plain 2-D MatMuls: for these shapes wasm's
 * batched MatMul runs several times slower than its 2-D one, and any MatMul with a
 * transpose flag slower still, so the gradient is written with 2-D MatMuls too: dW[k] =
 * x[k]ᵀ · dy[k], x[k]ᵀ transposed in JavaScript while the slices are copied. `inputGrad`:
 * also the gradient of x (not for the features).
 */
function memberMatMul(x: tf.Tensor, w: tf.Tensor, inputGrad: boolean): tf.Tensor {
  // x without the member axis: the same rows for every member (validation), used as it is.
  const shared = x.rank < w.rank;
  if (shared && inputGrad) throw new Error('memberMatMul: shared rows take no input gradient');
  const op = tf.customGrad(((a: tf.Tensor, b: tf.Tensor, save: tf.GradSaveFunc) => {
    const ws = memberSlices(b);
    const k = ws.length;
    if (shared) {
      save([a, ...ws]);
      return {
        value: tf.stack(ws.map((wi) => tf.matMul(a as tf.Tensor2D, wi as tf.Tensor2D))),
        gradFunc: (dy: tf.Tensor, saved: tf.Tensor[]) => {
          const xT = tf.transpose(saved[0]!);
          const dys = memberSlices(dy);
          return [
            tf.zeros(a.shape),
            tf.stack(dys.map((d) => tf.matMul(xT as tf.Tensor2D, d as tf.Tensor2D))),
          ];
        },
      };
    }
    // Each member's rows, and transposed for its weight gradient (xᵀ · dy, one MatMul).
    const [xs, xTs] = memberSlices(a, true);
    // Saved: the gradient runs after the forward pass has freed its own tensors.
    save([...xTs, ...ws]);
    return {
      value: tf.stack(xs.map((xi, i) => tf.matMul(xi as tf.Tensor2D, ws[i] as tf.Tensor2D))),
      gradFunc: (dy: tf.Tensor, saved: tf.Tensor[]) => {
        const sxT = saved.slice(0, k);
        const sw = saved.slice(k);
        const dys = memberSlices(dy);
        const dw = tf.stack(dys.map((d, i) => tf.matMul(sxT[i] as tf.Tensor2D, d as tf.Tensor2D)));
        const dx = inputGrad
          ? tf.stack(
              // An explicit transpose: a MatMul with a transpose flag misses XNNPACK.
              dys.map((d, i) => tf.matMul(d as tf.Tensor2D, tf.transpose(sw[i]!) as tf.Tensor2D)),
            )
          : // Its shape only: `a` is freed by now, and tfjs-node's ZerosLike reads its input.
            tf.zeros(a.shape);
        return [dx, dw];
      },
    };
  }) as unknown as GradFunc);
  return op(x, w);
}

/** Weights of one Dense layer: kernel [in, out] and bias [out], row-major. */
export interface DenseWeights {
  readonly kernel: Float32Array;
  readonly bias: Float32Array;
}

/**
 * Initial weights of a head taken from an earlier one (`--init`), in place of the
 * initialisers. The classifier may have other classes: `columns[c]` is the column of
 * `logits` that class c of this head starts from, or -1 for a class the earlier head did
 * not have, which starts as the member's initialiser makes it (so its seed decides it).
 */
export interface HeadInit {
  /** The hidden layer ([featureSize, hidden]); given exactly when the head has one. */
  readonly hidden?: DenseWeights;
  /** The earlier classifier: kernel [inner, n], bias [n]. */
  readonly logits: DenseWeights;
  /** One entry per class of this head: a column of `logits`, or -1 (fresh). */
  readonly columns: readonly number[];
}

/** What may differ between heads trained side by side. */
export interface HeadMember {
  /** Seed of the initialisers (as buildHead's). */
  readonly seed: number;
  /** Dropout rate before the classifier (and after the hidden layer). */
  readonly dropout: number;
  /** Start from these weights instead of the initialisers. */
  readonly init?: HeadInit;
}

/** Checks a member's initial weights against the population's shape (a caller's mistake throws). */
function checkInit(init: HeadInit, featureSize: number, numClasses: number, hidden: number): void {
  const inner = hidden > 0 ? hidden : featureSize;
  const fail = (what: string) => {
    throw new Error(`HeadPopulation: member init ${what}`);
  };
  if (hidden > 0 !== (init.hidden !== undefined))
    fail(`has ${init.hidden ? 'a' : 'no'} hidden layer but the heads have ${hidden} hidden units`);
  if (init.hidden) {
    if (init.hidden.kernel.length !== featureSize * hidden || init.hidden.bias.length !== hidden)
      fail(`hidden layer is not [${featureSize}, ${hidden}]`);
  }
  const n = init.logits.bias.length;
  if (init.logits.kernel.length !== inner * n) fail(`logits kernel is not [${inner}, ${n}]`);
  if (init.columns.length !== numClasses)
    fail(`maps ${init.columns.length} classes, not ${numClasses}`);
  for (const c of init.columns) {
    if (!Number.isInteger(c) || c < -1 || c >= n) fail(`maps a class to column ${c} of ${n}`);
  }
}

/** `fresh` [rows, numClasses] with column c replaced by column columns[c] of `from` [rows, n] where ≥ 0. */
function withColumns(
  fresh: Float32Array,
  from: Float32Array,
  columns: readonly number[],
  rows: number,
): Float32Array {
  const out = fresh.slice();
  const k = columns.length;
  const n = from.length / rows;
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < k; c++) {
      const j = columns[c]!;
      if (j >= 0) out[r * k + c] = from[r * n + j]!;
    }
  }
  return out;
}

/** One member-stacked BatchNormalization ([K, 1, d] each): what buildHead's head_bn_i holds per member. */
interface StackedBatchNorm {
  readonly gamma: tf.Variable;
  readonly beta: tf.Variable;
  readonly movingMean: tf.Variable;
  readonly movingVariance: tf.Variable;
}

/** What a BatchNormalization does with its input: training (batch statistics, moving ones updated), inference, or a refresh pass. */
type BnMode =
  | { readonly kind: 'train' }
  | { readonly kind: 'infer' }
  | { readonly kind: 'collect'; readonly into: MomentAccumulator[] };

/**
 * Classification heads of one shape, trained side by side: member k's weights sit at
 * index k of the first axis of every variable, so a step costs about what one head's
 * does whatever the number of members (a sweep's head-only runs share every kernel
 * launch). Each member computes exactly what buildHead's model computes: [Dense(hidden,
 * relu)] → Dropout → Dense; its initial weights are buildHead's for its seed (or its
 * `init`'s, see HeadInit), its dropout masks drawn from the seed its step gets.
 *
 * @example
 *   const heads = new HeadPopulation(1280, 5, 0, [{ seed: 1, dropout: 0.2 }, { seed: 2, dropout: 0 }]);
 *   const logits = heads.forward(x, true); // x [2, B, 1280] → [2, B, 5]
 *   const model = heads.toModel(1);        // a plain tfjs head with member 1's weights
 */
export class HeadPopulation {
  readonly variables: tf.Variable[];
  private readonly hiddenLayer: { kernel: tf.Variable; bias: tf.Variable } | null;
  private readonly kernel: tf.Variable;
  private readonly bias: tf.Variable;
  /** With `bn`: on the features, then (with a hidden layer) on its activations. */
  private readonly bns: StackedBatchNorm[];
  /** Members whose moving statistics no longer update (their training has ended). */
  private readonly held: boolean[];
  private seeds: readonly number[];
  readonly bn: boolean;

  constructor(
    readonly featureSize: number,
    readonly numClasses: number,
    readonly hidden: number,
    readonly members: readonly HeadMember[],
    options: { readonly bn?: boolean } = {},
  ) {
    this.bn = options.bn ?? false;
    this.held = members.map(() => false);
    this.seeds = members.map(() => Number.NaN);
    for (const m of members) if (m.init) checkInit(m.init, featureSize, numClasses, hidden);
    const stack = (make: (m: HeadMember) => tf.Tensor, name: string) =>
      tf.tidy(() => tf.variable(tf.stack(members.map(make)), true, name));
    const id = `${Date.now().toString(36)}_${Math.floor(Math.random() * 1e9).toString(36)}`;
    const inner = hidden > 0 ? hidden : featureSize;
    this.hiddenLayer =
      hidden > 0
        ? {
            kernel: stack(
              (m) =>
                m.init?.hidden
                  ? tf.tensor(m.init.hidden.kernel, [featureSize, hidden])
                  : tf.initializers.heNormal({ seed: m.seed }).apply([featureSize, hidden]),
              `heads_${id}/hidden_kernel`,
            ),
            bias: stack(
              (m) =>
                m.init?.hidden ? tf.tensor(m.init.hidden.bias, [1, hidden]) : tf.zeros([1, hidden]),
              `heads_${id}/hidden_bias`,
            ),
          }
        : null;
    // Classes of an earlier head keep its columns; the others get what the initialiser
    // gives a fresh head of this shape (glorot's scale counts every class, old and new).
    this.kernel = stack((m) => {
      const fresh = tf.initializers.glorotUniform({ seed: m.seed + 1 }).apply([inner, numClasses]);
      if (!m.init) return fresh;
      const { kernel } = m.init.logits;
      const values = withColumns(fresh.dataSync() as Float32Array, kernel, m.init.columns, inner);
      return tf.tensor(values, [inner, numClasses]);
    }, `heads_${id}/logits_kernel`);
    this.bias = stack(
      (m) =>
        m.init
          ? tf.tensor(
              withColumns(new Float32Array(numClasses), m.init.logits.bias, m.init.columns, 1),
              [1, numClasses],
            )
          : tf.zeros([1, numClasses]),
      `heads_${id}/logits_bias`,
    );
    const bnOf = (i: number, d: number): StackedBatchNorm => {
      const fill = (value: number, name: string, trainable: boolean) =>
        tf.tidy(() =>
          tf.variable(
            tf.fill([members.length, 1, d], value),
            trainable,
            `heads_${id}/bn_${i}_${name}`,
          ),
        );
      return {
        gamma: fill(1, 'gamma', true),
        beta: fill(0, 'beta', true),
        movingMean: fill(0, 'moving_mean', false),
        movingVariance: fill(1, 'moving_variance', false),
      };
    };
    this.bns = this.bn ? [bnOf(0, featureSize), ...(hidden > 0 ? [bnOf(1, hidden)] : [])] : [];
    const affine = (i: number) => (this.bns[i] ? [this.bns[i]!.gamma, this.bns[i]!.beta] : []);
    this.variables = [
      ...affine(0),
      ...(this.hiddenLayer ? [this.hiddenLayer.kernel, this.hiddenLayer.bias] : []),
      ...affine(1),
      this.kernel,
      this.bias,
    ];
  }

  /**
   * Member-stacked BatchNormalization i of x ([K, B, d], or [B, d] shared by every member).
   * Training normalises each member's rows by their own batch mean and biased variance
   * (tf.moments, as tfjs's layer) and moves each member's moving statistics by tfjs's
   * rule, m ← m − (m − batch)·(1 − momentum), except held members'; inference uses the
   * moving statistics; a refresh pass normalises by batch statistics and records them.
   */
  private batchNorm(i: number, x: tf.Tensor, mode: BnMode): tf.Tensor {
    const bn = this.bns[i]!;
    const k = this.members.length;
    if (mode.kind === 'infer') {
      const scale = tf.mul(tf.rsqrt(tf.add(bn.movingVariance, HEAD_BN_EPSILON)), bn.gamma);
      return tf.add(tf.mul(tf.sub(x, bn.movingMean), scale), bn.beta);
    }
    const rows = x.rank === 3 ? x : tf.broadcastTo(tf.expandDims(x, 0), [k, ...x.shape]);
    const { mean, variance } = tf.moments(rows, 1, true);
    if (mode.kind === 'collect') {
      mode.into[i]!.add(mean.dataSync(), variance.dataSync(), rows.shape[1]!);
    } else {
      const decay = 1 - HEAD_BN_MOMENTUM;
      const active = this.held.some(Boolean)
        ? tf.tensor(
            this.held.map((h) => !h),
            [k, 1, 1],
            'bool',
          )
        : null;
      for (const [moving, batch] of [
        [bn.movingMean, mean],
        [bn.movingVariance, variance],
      ] as const) {
        const next = tf.sub(moving, tf.mul(tf.sub(moving, batch), decay));
        moving.assign(active ? tf.where(active, next, moving) : next);
      }
    }
    const scale = tf.mul(tf.rsqrt(tf.add(variance, HEAD_BN_EPSILON)), bn.gamma);
    return tf.add(tf.mul(tf.sub(rows, mean), scale), bn.beta);
  }

  /** The layers up to the classifier's input: [BN] → [Dense(hidden, relu) → [BN]]. */
  private body(x: tf.Tensor, mode: BnMode): tf.Tensor {
    let h = x;
    if (this.bn) h = this.batchNorm(0, h, mode);
    if (this.hiddenLayer) {
      // With BN before it, its input carries trainable variables (gamma, beta): it needs a gradient.
      h = tf.relu(tf.add(memberMatMul(h, this.hiddenLayer.kernel, this.bn), this.hiddenLayer.bias));
      if (this.bn) h = this.batchNorm(1, h, mode);
    }
    return h;
  }

  /**
   * With `bn`, the moving statistics as a stage's BatchNormState (see bn-refresh.ts):
   * members held when their training ends, refreshed from one pass with the weights as
   * they are (each member's own, every member seeing every row); null without `bn`.
   */
  batchNormState(): BatchNormState | null {
    if (!this.bn) return null;
    return {
      layers: this.bns.map((_, i) => headBnName(i)),
      variables: this.bns.flatMap((b) => [b.movingMean, b.movingVariance]),
      hold: (members) => {
        for (const m of members) this.held[m] = true;
      },
      refresh: (train, batchSize, members) => this.refresh(train, batchSize, members),
    };
  }

  /** Recomputes `members`' moving statistics (see BatchNormState.refresh); the others keep theirs. */
  private async refresh(train: Batches, batchSize: number, members: readonly number[]) {
    if (!this.bn || !members.length || !train.size) return;
    const k = this.members.length;
    const into = this.bns.map((b) => new MomentAccumulator(b.movingMean.size));
    for (const rows of passBatches(train.size, batchSize)) {
      tf.tidy(() => {
        this.body(train.take(rows), { kind: 'collect', into });
      });
      await new Promise<void>((resolve) => setImmediate(resolve));
    }
    const on = new Array<boolean>(k).fill(false);
    for (const m of members) on[m] = true;
    tf.tidy(() => {
      const mask = tf.tensor(on, [k, 1, 1], 'bool');
      this.bns.forEach((b, i) => {
        const shape = b.movingMean.shape;
        b.movingMean.assign(tf.where(mask, tf.tensor(into[i]!.mean(), shape), b.movingMean));
        b.movingVariance.assign(
          tf.where(mask, tf.tensor(into[i]!.variance(), shape), b.movingVariance),
        );
      });
    });
  }

  /** Dropout seeds for the next training step, one per member (NaN: none). */
  reseed(seeds: readonly number[]): void {
    this.seeds = seeds;
  }

  /**
   * Logits [K, B, C] of inputs [K, B, featureSize], or of [B, featureSize]: the same rows
   * for every member (how validation runs, with no copies); `training` applies dropout.
   */
  forward(x: tf.Tensor, training: boolean): tf.Tensor {
    let h = this.body(x, { kind: training ? 'train' : 'infer' });
    if (training) h = this.dropout(h);
    return tf.add(memberMatMul(h, this.kernel, this.hiddenLayer !== null || this.bn), this.bias);
  }

  /**
   * Inverted dropout with each member's own mask: a kept unit is scaled by 1/keep, and
   * the mask comes from the member's seed for this step (xorshift32 seeded through
   * mulberry32, drawn in JavaScript: tf.randomUniform costs about 50× as much). The same
   * seed gives the same mask whatever the other members, so a head trains alike alone or
   * beside others.
   */
  private dropout(h: tf.Tensor): tf.Tensor {
    if (!this.members.some((m) => m.dropout > 0)) return h;
    const [k, ...rowShape] = h.shape;
    const size = rowShape.reduce((a, b) => a * b, 1);
    const multipliers = MASKS.take(k! * size);
    this.members.forEach((m, i) => {
      const out = multipliers.subarray(i * size, (i + 1) * size);
      if (!(m.dropout > 0)) {
        out.fill(1);
        return;
      }
      const keep = 1 - m.dropout;
      const scale = 1 / keep;
      const seed = this.seeds[i]!;
      // xorshift32 from a mulberry32-mixed seed: a kept unit when the state is below keep·2³².
      let x =
        Math.floor(
          seededRandom(Number.isNaN(seed) ? Math.floor(Math.random() * 2 ** 31) : seed)() * 2 ** 32,
        ) || 1;
      const threshold = keep * 2 ** 32;
      for (let j = 0; j < size; j++) {
        x ^= x << 13;
        x ^= x >>> 17;
        x ^= x << 5;
        out[j] = x >>> 0 < threshold ? scale : 0;
      }
    });
    return tf.mul(h, tf.tensor(multipliers, h.shape));
  }

  /** Member k's weights in a plain head model (buildHead's layers; the caller disposes it). */
  toModel(k: number): tf.LayersModel {
    const m = this.members[k]!;
    const model = buildHead(this.featureSize, this.numClasses, {
      hidden: this.hidden,
      dropout: m.dropout,
      seed: m.seed,
      bn: this.bn,
    });
    tf.tidy(() => {
      // Fresh tensors from the values: a slice or reshape would share a buffer whose
      // backend-side shape is the stacked one (wasm's fused MatMul checks that shape).
      const slice = (v: tf.Variable, shape: number[]) => {
        const size = shape.reduce((a, b) => a * b, 1);
        return tf.tensor((v.dataSync() as Float32Array).slice(k * size, (k + 1) * size), shape);
      };
      if (this.hiddenLayer) {
        model
          .getLayer('head_hidden')
          .setWeights([
            slice(this.hiddenLayer.kernel, [this.featureSize, this.hidden]),
            slice(this.hiddenLayer.bias, [this.hidden]),
          ]);
      }
      this.bns.forEach((b, i) => {
        const d = b.gamma.shape[2]!;
        model
          .getLayer(headBnName(i))
          .setWeights([
            slice(b.gamma, [d]),
            slice(b.beta, [d]),
            slice(b.movingMean, [d]),
            slice(b.movingVariance, [d]),
          ]);
      });
      const inner = this.hidden > 0 ? this.hidden : this.featureSize;
      model
        .getLayer(HEAD_LOGITS)
        .setWeights([
          slice(this.kernel, [inner, this.numClasses]),
          slice(this.bias, [this.numClasses]),
        ]);
    });
    return model;
  }

  dispose(): void {
    tf.dispose(this.variables);
    tf.dispose(this.bns.flatMap((b) => [b.movingMean, b.movingVariance]));
  }
}
