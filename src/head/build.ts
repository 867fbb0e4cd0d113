import * as tf from '@tensorflow/tfjs';

export interface HeadOptions {
  /** Units of an optional hidden Dense+ReLU layer; 0 (the default) means none. */
  hidden?: number;
  /** Dropout before the classifier (and after the hidden layer). Default 0.2. */
  dropout?: number;
  /** Seed of the kernel initialisers. */
  seed?: number;
  /**
   * `--head-bn`: a BatchNormalization before each Dense (fastai's create_head), on the
   * features and, with a hidden layer, on its activations. Default false.
   */
  bn?: boolean;
}

/** Keras's (and tfjs's) BatchNormalization defaults, which the head's BN layers use. */
export const HEAD_BN_MOMENTUM = 0.99;
export const HEAD_BN_EPSILON = 1e-3;

/** The name of the head's i-th BatchNormalization (0: on the features, 1: on the hidden layer). */
export const headBnName = (i: number): string => `head_bn_${i}`;

/** Layer names the rest of the toolkit relies on. */
export const HEAD_LOGITS = 'head_logits';
export const HEAD_PROBS = 'head_probs';

/**
 * Applies the classification head to `input`: [BN] → [Dense(hidden, relu) → [BN]] →
 * Dropout → Dense (logits) → Softmax, the BN layers with `bn` (named head_bn_0, head_bn_1). Returns both the logits (what training differentiates, so the
 * loss can use the numerically stable softmax cross-entropy) and the probabilities
 * (what the exported model outputs).
 */
export function applyHead(
  input: tf.SymbolicTensor,
  numClasses: number,
  options: HeadOptions = {},
): { logits: tf.SymbolicTensor; probs: tf.SymbolicTensor } {
  const { hidden = 0, dropout = 0.2, seed = 42, bn = false } = options;
  let x = input;
  let bns = 0;
  const batchNorm = () => {
    x = tf.layers
      .batchNormalization({
        momentum: HEAD_BN_MOMENTUM,
        epsilon: HEAD_BN_EPSILON,
        name: headBnName(bns++),
      })
      .apply(x) as tf.SymbolicTensor;
  };
  if (bn) batchNorm();
  if (hidden > 0) {
    x = tf.layers
      .dense({
        units: hidden,
        activation: 'relu',
        name: 'head_hidden',
        kernelInitializer: tf.initializers.heNormal({ seed }),
      })
      .apply(x) as tf.SymbolicTensor;
    if (bn) batchNorm();
  }
  if (dropout > 0)
    x = tf.layers
      .dropout({ rate: dropout, name: 'head_dropout', seed })
      .apply(x) as tf.SymbolicTensor;
  const logits = tf.layers
    .dense({
      units: numClasses,
      name: HEAD_LOGITS,
      kernelInitializer: tf.initializers.glorotUniform({ seed: seed + 1 }),
    })
    .apply(x) as tf.SymbolicTensor;
  const probs = tf.layers
    .activation({ activation: 'softmax', name: HEAD_PROBS })
    .apply(logits) as tf.SymbolicTensor;
  return { logits, probs };
}

/** A head on its own: features [N, featureSize] in, probabilities out. */
export function buildHead(
  featureSize: number,
  numClasses: number,
  options: HeadOptions = {},
): tf.LayersModel {
  const input = tf.input({ shape: [featureSize], name: 'features' });
  const { probs } = applyHead(input, numClasses, options);
  return tf.model({ inputs: input, outputs: probs, name: 'head' });
}

/** The same model with its logits as output (shares every layer and variable). */
export function logitsView(model: tf.LayersModel): tf.LayersModel {
  return tf.model({
    inputs: model.inputs,
    outputs: model.getLayer(HEAD_LOGITS).output as tf.SymbolicTensor,
  });
}

/**
 * tfjs's Dropout reuses its configured seed on every call (the same mask each batch);
 * the loop hands it a fresh seed per step instead (the model is the loop's only member), and NaN (no seed) when done so the
 * saved config carries none.
 */
export function dropoutSeeder(model: tf.LayersModel): (seeds: readonly number[]) => void {
  const layers = model.layers.filter((l) => l.getClassName() === 'Dropout') as unknown as {
    seed?: number;
  }[];
  return ([seed = Number.NaN]) => {
    for (const l of layers) l.seed = Number.isNaN(seed) ? undefined : seed;
  };
}

/** A head's logits for a stage that trains it with its own dropout rate (see `stageHead`). */
export interface StageHead {
  /** Logits of features; `training` applies the stage's dropout. */
  readonly forward: (x: tf.Tensor, training: boolean) => tf.Tensor;
  /** Fresh dropout seeds for the next step, as `dropoutSeeder`'s. */
  readonly reseed: (seeds: readonly number[]) => void;
  /** Rate of the dropout added before the classifier, outside the head's graph (0: none added). */
  readonly addedDropout: number;
  /** Gives the head back its own rate. */
  restore(): void;
}

/**
 * The head's logits with dropout `rate` before the classifier, for a later stage that
 * trains the head on (`--finetune-dropout`; undefined: the head's own rate). A head built
 * with its Dropout layer trains with that layer at `rate` until `restore`. One built
 * without (`dropout: 0`) gets a Dropout between its layers and the classifier, applied
 * outside its graph: its layers, variables and saved config stay as built, and with
 * `rate` 0 (or undefined) nothing is added, so it computes exactly what `logitsView` does.
 *
 * @example const s = stageHead(head, 0.5); s.forward(features, true); s.restore();
 */
export function stageHead(model: tf.LayersModel, rate?: number): StageHead {
  const logits = logitsView(model);
  const own = model.layers.find((l) => l.getClassName() === 'Dropout') as
    | (tf.layers.Layer & { rate: number })
    | undefined;
  const kept = own?.rate;
  if (own && rate !== undefined) own.rate = rate;
  const restore = () => {
    if (own) own.rate = kept!;
  };
  if (own || !(rate !== undefined && rate > 0))
    return {
      forward: (x, training) => logits.apply(x, { training }) as tf.Tensor,
      reseed: dropoutSeeder(model),
      addedDropout: 0,
      restore,
    };
  const classifier = model.getLayer(HEAD_LOGITS);
  const inner = classifier.input as tf.SymbolicTensor;
  // The features straight into the classifier (no hidden layer, no BN) need no model in between.
  const before =
    inner === model.inputs[0] ? null : tf.model({ inputs: model.inputs, outputs: inner });
  // Seeded per step by `reseed`, as dropoutSeeder seeds a built-in one.
  const dropout = tf.layers.dropout({ rate, name: 'head_dropout' }) as unknown as {
    seed?: number;
    apply: tf.layers.Layer['apply'];
  };
  return {
    // tidy inside a gradient is safe: the tape keeps its own copies of what backprop needs.
    forward: (x, training) =>
      tf.tidy(() => {
        const h = before ? (before.apply(x, { training }) as tf.Tensor) : x;
        return classifier.apply(dropout.apply(h, { training }) as tf.Tensor) as tf.Tensor;
      }),
    reseed: ([seed = Number.NaN]) => {
      dropout.seed = Number.isNaN(seed) ? undefined : seed;
    },
    addedDropout: rate,
    restore,
  };
}
