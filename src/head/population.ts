import * as tf from '@tensorflow/tfjs';
import { seededRandom } from '../util/random.js';
import { buildHead, HEAD_LOGITS } from './build.js';

type GradFunc = Parameters<typeof tf.customGrad>[0];

/**
 * Each member's slice of a stacked tensor, copied through JavaScript: on wasm, Slice,
 * Unpack and Gather of a large tensor run element by element and cost about 40× the copy.
 */
function memberSlices(t: tf.Tensor): tf.Tensor[] {
  const [k, ...rest] = t.shape;
  const size = rest.reduce((a, b) => a * b, 1);
  const data = t.dataSync() as Float32Array;
  return Array.from({ length: k! }, (_, i) =>
    tf.tensor(data.subarray(i * size, (i + 1) * size), rest),
  );
}

/**
 * y[k] = x[k] · w[k] for every member k, as K plain 2-D MatMuls: for these shapes wasm's
 * batched MatMul runs several times slower than its 2-D one, and its gradient's
 * transposed-A MatMul slower still, so the gradient is written with 2-D MatMuls too
 * (dW[k] = (dy[k]ᵀ · x[k])ᵀ). `inputGrad`: also the gradient of x (not for the features).
 */
function memberMatMul(x: tf.Tensor, w: tf.Tensor, inputGrad: boolean): tf.Tensor {
  const op = tf.customGrad(((a: tf.Tensor, b: tf.Tensor, save: tf.GradSaveFunc) => {
    const xs = memberSlices(a);
    const ws = memberSlices(b);
    // Saved: the gradient runs after the forward pass has freed its own tensors.
    save([...xs, ...ws]);
    return {
      value: tf.stack(xs.map((xi, i) => tf.matMul(xi as tf.Tensor2D, ws[i] as tf.Tensor2D))),
      gradFunc: (dy: tf.Tensor, saved: tf.Tensor[]) => {
        const k = xs.length;
        const sx = saved.slice(0, k);
        const sw = saved.slice(k);
        const dys = memberSlices(dy);
        const dw = tf.stack(
          dys.map((d, i) =>
            tf.transpose(tf.matMul(tf.transpose(d) as tf.Tensor2D, sx[i] as tf.Tensor2D)),
          ),
        );
        const dx = inputGrad
          ? tf.stack(
              dys.map((d, i) => tf.matMul(d as tf.Tensor2D, sw[i] as tf.Tensor2D, false, true)),
            )
          : tf.zerosLike(a);
        return [dx, dw];
      },
    };
  }) as unknown as GradFunc);
  return op(x, w);
}

/** What may differ between heads trained side by side. */
export interface HeadMember {
  /** Seed of the initialisers (as buildHead's). */
  readonly seed: number;
  /** Dropout rate before the classifier (and after the hidden layer). */
  readonly dropout: number;
}

/**
 * Classification heads of one shape, trained side by side: member k's weights sit at
 * index k of the first axis of every variable, so a step costs about what one head's
 * does whatever the number of members (a sweep's head-only runs share every kernel
 * launch). Each member computes exactly what buildHead's model computes: [Dense(hidden,
 * relu)] → Dropout → Dense; its initial weights are buildHead's for its seed, its
 * dropout masks drawn from the seed its step gets.
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
  private seeds: readonly number[];

  constructor(
    readonly featureSize: number,
    readonly numClasses: number,
    readonly hidden: number,
    readonly members: readonly HeadMember[],
  ) {
    this.seeds = members.map(() => Number.NaN);
    const stack = (make: (m: HeadMember) => tf.Tensor, name: string) =>
      tf.tidy(() => tf.variable(tf.stack(members.map(make)), true, name));
    const id = `${Date.now().toString(36)}_${Math.floor(Math.random() * 1e9).toString(36)}`;
    const inner = hidden > 0 ? hidden : featureSize;
    this.hiddenLayer =
      hidden > 0
        ? {
            kernel: stack(
              (m) => tf.initializers.heNormal({ seed: m.seed }).apply([featureSize, hidden]),
              `heads_${id}/hidden_kernel`,
            ),
            bias: stack(() => tf.zeros([1, hidden]), `heads_${id}/hidden_bias`),
          }
        : null;
    this.kernel = stack(
      (m) => tf.initializers.glorotUniform({ seed: m.seed + 1 }).apply([inner, numClasses]),
      `heads_${id}/logits_kernel`,
    );
    this.bias = stack(() => tf.zeros([1, numClasses]), `heads_${id}/logits_bias`);
    this.variables = [
      ...(this.hiddenLayer ? [this.hiddenLayer.kernel, this.hiddenLayer.bias] : []),
      this.kernel,
      this.bias,
    ];
  }

  /** Dropout seeds for the next training step, one per member (NaN: none). */
  reseed(seeds: readonly number[]): void {
    this.seeds = seeds;
  }

  /** Logits [K, B, C] of inputs [K, B, featureSize]; `training` applies dropout. */
  forward(x: tf.Tensor, training: boolean): tf.Tensor {
    let h = x;
    if (this.hiddenLayer)
      h = tf.relu(tf.add(memberMatMul(h, this.hiddenLayer.kernel, false), this.hiddenLayer.bias));
    if (training) h = this.dropout(h);
    return tf.add(memberMatMul(h, this.kernel, this.hiddenLayer !== null), this.bias);
  }

  /**
   * Inverted dropout with each member's own mask: a kept unit is scaled by 1/keep, and
   * the mask comes from the member's seed for this step (mulberry32, drawn in JavaScript:
   * tf.randomUniform costs about 15× as much). The same seed gives the same mask whatever
   * the other members, so a head trains alike alone or beside others.
   */
  private dropout(h: tf.Tensor): tf.Tensor {
    if (!this.members.some((m) => m.dropout > 0)) return h;
    const [k, ...rowShape] = h.shape;
    const size = rowShape.reduce((a, b) => a * b, 1);
    const multipliers = new Float32Array(k! * size);
    this.members.forEach((m, i) => {
      const out = multipliers.subarray(i * size, (i + 1) * size);
      if (!(m.dropout > 0)) {
        out.fill(1);
        return;
      }
      const keep = 1 - m.dropout;
      const scale = 1 / keep;
      const seed = this.seeds[i]!;
      const random = seededRandom(Number.isNaN(seed) ? Math.floor(Math.random() * 2 ** 31) : seed);
      for (let j = 0; j < size; j++) out[j] = random() < keep ? scale : 0;
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
  }
}
