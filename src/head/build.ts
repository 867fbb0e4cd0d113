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
