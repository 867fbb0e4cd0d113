import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { before, test } from 'node:test';
import * as tf from '@tensorflow/tfjs';
import '@tensorflow/tfjs-backend-wasm';
import { loadBackbone } from '../../src/backbones/load.js';
import {
  canLowerToOnnx,
  LOWERABLE_ACTIVATIONS,
  LOWERABLE_LAYERS,
  lowerToOnnx,
  UnsupportedLayerError,
} from '../../src/engine/onnx/lower.js';
import { OnnxFrozenModel } from '../../src/engine/onnx/session.js';
import { FinetuneError } from '../../src/errors.js';

const TOLERANCE = 1e-4;

/**
 * sha256 of lowerToOnnx's bytes, recorded before the lowering became a table of rows: a
 * change to the lowering that changes the graph must show up here.
 */
const GOLDEN_SHA256 = {
  backbone224: '899967ec98ecb32ff1c2e9e712b2b6eae2ae0a93b5e83ce08e284fa1c01b76d5',
  backbone224Cut: 'e9f6a6e94ae1b65d90452c65dc8166876cdd819aeb3921530ae54fa810519720',
  backbone160: 'ded09e22e626f27869e6c0bd384186b7b0f033f8a6841639384eded62ba12b0d',
  everyLayer: '444915c6d1ad7c8ea789cc1df62cb0e769f44d6cdca85fb3700380da2a95a2bc',
};

before(async () => {
  await tf.setBackend('wasm');
});

/** Raw pixels 0–255, NHWC, reproducible. */
function pixels(n: number, size: number, seed: number): tf.Tensor4D {
  return tf.randomUniform([n, size, size, 3], 0, 255, 'float32', seed);
}

/**
 * Lowers `model` (cut at `output`), runs it on ONNX Runtime with NCHW pixels, and runs
 * tfjs on the same NHWC pixels; a 4-D tfjs result is transposed to NCHW to match.
 */
async function compare(
  model: tf.LayersModel,
  x: tf.Tensor4D,
  output?: string,
): Promise<{ maxDiff: number; size: number; sha256: string }> {
  const before = tf.memory().numTensors;
  const bytes = lowerToOnnx(model, output === undefined ? {} : { output });
  const sha256 = createHash('sha256').update(bytes).digest('hex');
  assert.equal(tf.memory().numTensors, before, 'lowering must not allocate tensors');
  const [n, size] = x.shape;
  const frozen = await OnnxFrozenModel.create(bytes, { inputSize: size, threads: 2 });
  try {
    const nchw = tf.tidy(() => x.transpose([0, 3, 1, 2]).dataSync() as Float32Array);
    const actual = await frozen.run(nchw, n);
    const expected = tf.tidy(() => {
      const net =
        output === undefined
          ? model
          : tf.model({
              inputs: model.inputs,
              outputs: model.getLayer(output).output as tf.SymbolicTensor,
            });
      let y = net.predict(x) as tf.Tensor;
      if (y.rank === 4) y = y.transpose([0, 3, 1, 2]);
      return y.dataSync() as Float32Array;
    });
    assert.equal(actual.length, expected.length);
    assert.equal(frozen.outputSize * n, expected.length);
    let maxDiff = 0;
    for (let i = 0; i < expected.length; i++) {
      const d = Math.abs(actual[i]! - expected[i]!);
      // NaN fails the comparison below through maxDiff = NaN.
      maxDiff = Number.isNaN(d) ? Number.NaN : Math.max(maxDiff, d);
    }
    return { maxDiff, size: frozen.outputSize, sha256 };
  } finally {
    await frozen.dispose();
  }
}

test('the default backbone at 224 lowers within 1e-4 of tfjs', async () => {
  const bb = await loadBackbone();
  const x = pixels(2, 224, 1);
  try {
    assert.deepEqual(canLowerToOnnx(bb.model!), { ok: true });
    const { maxDiff, size, sha256 } = await compare(bb.model!, x);
    assert.equal(size, 1280);
    assert.ok(maxDiff <= TOLERANCE, `max abs diff ${maxDiff}`);
    assert.equal(sha256, GOLDEN_SHA256.backbone224);
    // Cut mid-network: a 4-D NCHW output [192, 28, 28].
    const cut = await compare(bb.model!, x, 'block_6_expand_relu');
    assert.equal(cut.size, 192 * 28 * 28);
    assert.equal(cut.sha256, GOLDEN_SHA256.backbone224Cut);
    assert.ok(cut.maxDiff <= TOLERANCE, `max abs diff ${cut.maxDiff} at block_6_expand_relu`);
  } finally {
    x.dispose();
    bb.dispose();
  }
});

test('the default backbone at 160 lowers within 1e-4 of tfjs', async () => {
  const bb = await loadBackbone('nsfwjs_mobilenet_v2', { inputSize: 160 });
  const x = pixels(2, 160, 2);
  try {
    const { maxDiff, size, sha256 } = await compare(bb.model!, x);
    assert.equal(size, 1280);
    assert.ok(maxDiff <= TOLERANCE, `max abs diff ${maxDiff}`);
    assert.equal(sha256, GOLDEN_SHA256.backbone160);
  } finally {
    x.dispose();
    bb.dispose();
  }
});

type T = tf.SymbolicTensor;
const L = tf.layers;
const apply = (layer: tf.layers.Layer, x: T | T[]): T => layer.apply(x) as T;

/** The layers of `model` and of the models nested in it, depth first. */
function allLayers(model: tf.LayersModel): tf.layers.Layer[] {
  return model.layers.flatMap((l) => (l instanceof tf.LayersModel ? [l, ...allLayers(l)] : [l]));
}

/**
 * Gives every weight a seeded random value (kernels LeCun-uniform, BN statistics and
 * PReLU slopes in their ranges), so the model and its lowered bytes are the same each run.
 */
function randomizeWeights(model: tf.LayersModel): void {
  let seed = 100;
  for (const layer of allLayers(model)) {
    if (layer instanceof tf.LayersModel || layer.weights.length === 0) continue;
    const values = layer.weights.map((w) => {
      const shape = w.shape as number[];
      const key = w.originalName.split('/').pop()!;
      seed++;
      if (key === 'gamma' || key === 'moving_variance')
        return tf.randomUniform(shape, 0.5, 1.5, 'float32', seed);
      if (key === 'alpha') return tf.randomUniform(shape, 0, 0.4, 'float32', seed);
      if (key.endsWith('kernel')) {
        const limit = Math.sqrt(3 / shape.slice(0, -1).reduce((a, d) => a * d, 1));
        return tf.randomUniform(shape, -limit, limit, 'float32', seed);
      }
      return tf.randomNormal(shape, 0, 0.2, 'float32', seed);
    });
    layer.setWeights(values);
    tf.dispose(values);
  }
}

/**
 * A layer of a Keras class tfjs has no class for, as it appears once a Keras model using
 * it is loaded with a class registered under that name: the identity at inference.
 */
function kerasOnlyLayer(className: string, name: string): tf.layers.Layer {
  class KerasOnly extends tf.layers.Layer {
    static className = className;
  }
  return new KerasOnly({ name });
}

/** Keras's 'silu' (x·sigmoid(x)), which tfjs lacks, registered as a Keras model would need. */
class Silu extends tf.serialization.Serializable {
  static className = 'silu';
  apply(x: tf.Tensor): tf.Tensor {
    return tf.mul(x, tf.sigmoid(x));
  }
  override getConfig(): tf.serialization.ConfigDict {
    return {};
  }
}
tf.serialization.registerClass(Silu);

/** tfjs's Functional class (what Keras ≥ 2.4 files name a nested model), not exported by tfjs. */
function functional(inputs: T, outputs: T, name: string): tf.LayersModel {
  const [Functional] = tf.serialization.SerializationMap.getMap().classNameMap['Functional']!;
  return new (
    Functional as unknown as new (args: {
      inputs: T;
      outputs: T;
      name: string;
    }) => tf.LayersModel
  )({
    inputs,
    outputs,
    name,
  });
}

/**
 * A small model using every layer type the lowering supports (every row of its tables, as
 * the test 'every lowering row is exercised' checks), with seeded weights.
 */
function everyLayerModel(): tf.LayersModel {
  const input = tf.input({ shape: [16, 16, 3], name: 'image' });
  const r = apply(L.rescaling({ scale: 1 / 127.5, offset: -1, name: 'rescale' }), input);
  // ZeroPadding2D merged into a conv's pads; BN folded into that conv.
  const zp1 = apply(
    L.zeroPadding2d({
      padding: [
        [1, 1],
        [1, 1],
      ],
      name: 'zp_conv',
    }),
    r,
  );
  const c1 = apply(L.conv2d({ filters: 8, kernelSize: 3, name: 'conv1' }), zp1);
  const b1 = apply(L.batchNormalization({ name: 'bn1' }), c1);
  const a1 = apply(L.reLU({ maxValue: 6, name: 'relu6' }), b1); // [16, 16, 8]

  // Stride-2 branches, each [8, 8, 16] or [8, 8, 8].
  const dw = apply(
    L.depthwiseConv2d({
      kernelSize: 3,
      strides: 2,
      padding: 'same',
      depthMultiplier: 2,
      activation: 'relu6',
      name: 'dw',
    }),
    a1,
  );
  const sep = apply(
    L.separableConv2d({ filters: 16, kernelSize: 3, strides: 2, padding: 'same', name: 'sep' }),
    a1,
  );
  const sepBn = apply(L.batchNormalization({ name: 'sep_bn' }), sep);
  const maxSame = apply(
    L.maxPooling2d({ poolSize: 3, strides: 2, padding: 'same', name: 'max_same' }),
    a1,
  );
  // A ZeroPadding2D feeding a max pool: a real Pad node (ONNX pool pads act as -inf).
  const zpMax = apply(
    L.zeroPadding2d({
      padding: [
        [0, 1],
        [0, 1],
      ],
      name: 'zp_max',
    }),
    a1,
  );
  const maxValid = apply(
    L.maxPooling2d({ poolSize: 3, strides: 2, padding: 'valid', name: 'max_valid' }),
    zpMax,
  );
  const avgSame = apply(
    L.averagePooling2d({ poolSize: 3, strides: 2, padding: 'same', name: 'avg_same' }),
    a1,
  );
  // A ZeroPadding2D merged into a valid average pool (the zeros count).
  const zpAvg = apply(
    L.zeroPadding2d({
      padding: [
        [1, 1],
        [1, 1],
      ],
      name: 'zp_avg',
    }),
    a1,
  );
  const avgValid = apply(
    L.averagePooling2d({ poolSize: 3, strides: 2, padding: 'valid', name: 'avg_valid' }),
    zpAvg,
  );
  const dil = apply(
    L.conv2d({
      filters: 8,
      kernelSize: 3,
      dilationRate: 2,
      padding: 'same',
      activation: 'elu',
      name: 'dilated',
    }),
    a1,
  );
  const dilPool = apply(L.averagePooling2d({ poolSize: 2, name: 'avg_2x2' }), dil);

  const prod = apply(L.multiply({ name: 'mul' }), [dw, sepBn]);
  const sum = apply(L.add({ name: 'add3' }), [maxSame, maxValid, avgSame]);
  const hi = apply(L.maximum({ name: 'max' }), [avgValid, dilPool]);
  const lo = apply(L.minimum({ name: 'min' }), [avgValid, dilPool]);
  const mean = apply(L.average({ name: 'mean' }), [avgValid, dilPool, maxSame]);
  const cat = apply(L.concatenate({ name: 'cat' }), [prod, sum, hi, lo, mean]); // [8, 8, 48]
  // BN after a non-conv layer: Mul + Add.
  const catBn = apply(L.batchNormalization({ name: 'cat_bn' }), cat);
  // A conv with two readers: its BN cannot be folded.
  const c2 = apply(L.conv2d({ filters: 16, kernelSize: 1, name: 'conv2' }), catBn);
  const c2Bn = apply(L.batchNormalization({ name: 'conv2_bn' }), c2);
  const res = apply(L.add({ name: 'residual' }), [c2, c2Bn]);
  const act4 = apply(L.leakyReLU({ alpha: 0.2, name: 'leaky' }), res);
  const pr = apply(L.prelu({ name: 'prelu_full' }), act4); // alpha [8, 8, 16]
  const pr2 = apply(L.prelu({ sharedAxes: [1, 2], name: 'prelu_shared' }), pr);
  const drop = apply(L.dropout({ rate: 0.5, name: 'drop' }), pr2);
  const noise = apply(L.gaussianNoise({ stddev: 1, name: 'noise' }), drop);
  const spatial2d = apply(kerasOnlyLayer('SpatialDropout2D', 'spatial_drop_2d'), noise);
  const crop = apply(
    L.cropping2D({
      cropping: [
        [1, 3],
        [2, 2],
      ],
      name: 'crop',
    }),
    spatial2d,
  ); // [4, 4, 16]

  // Heads, all 2-D.
  const flat = apply(L.flatten({ name: 'flatten' }), crop); // NHWC order on a 4×4 map
  const fc = apply(L.dense({ units: 10, activation: 'softmax', name: 'fc_softmax' }), flat);
  const fcBn = apply(
    L.batchNormalization({ name: 'fc_bn' }),
    apply(L.dense({ units: 6, name: 'fc' }), flat),
  );
  const reshaped = apply(L.reshape({ targetShape: [16, 16], name: 'to_seq' }), crop);
  const seq = apply(L.dense({ units: 5, activation: 'tanh', name: 'seq_dense' }), reshaped); // MatMul on 3-D
  const seqDrop = apply(L.spatialDropout1d({ rate: 0.5, name: 'spatial_drop_1d' }), seq);
  const seqAvg = apply(L.globalAveragePooling1d({ name: 'seq_avg' }), seqDrop);
  const seqMax = apply(L.globalMaxPooling1d({ name: 'seq_max' }), seq);
  const back = apply(L.reshape({ targetShape: [2, 8, 16], name: 'to_image' }), reshaped);
  const perm = apply(L.permute({ dims: [2, 1, 3], name: 'permute' }), back); // [8, 2, 16]
  const up = apply(L.upSampling2d({ size: [2, 2], name: 'up_nearest' }), perm);
  const upBi = apply(
    L.upSampling2d({ size: [2, 1], interpolation: 'bilinear', name: 'up_bilinear' }),
    perm,
  );
  const upPool = apply(L.globalMaxPooling2d({ name: 'gmax' }), up);
  const upBiPool = apply(L.globalAveragePooling2d({ name: 'gavg_bilinear' }), upBi);
  const pixelDense = apply(L.dense({ units: 4, activation: 'sigmoid', name: 'pixel_dense' }), crop); // 1×1 conv
  const pixelFlat = apply(L.flatten({ name: 'pixel_flatten' }), pixelDense);
  const soft4 = apply(L.softmax({ axis: -1, name: 'softmax_c' }), crop);
  const softPool = apply(L.globalAveragePooling2d({ name: 'gavg_soft' }), soft4);
  const logSoft = apply(
    L.activation({ activation: 'logSoftmax' as 'softmax', name: 'log_softmax_4d' }),
    crop,
  );
  const logPool = apply(L.globalMaxPooling2d({ name: 'gmax_log' }), logSoft);
  const gap = apply(L.globalAveragePooling2d({ name: 'gap' }), crop); // [16]
  const onePixel = apply(L.reshape({ targetShape: [1, 1, 16], name: 'to_1x1' }), gap);
  const onePixelFlat = apply(L.flatten({ name: 'flatten_1x1' }), onePixel);
  const acts = [
    'relu',
    'elu',
    'selu',
    'sigmoid',
    'hardSigmoid',
    'tanh',
    'softplus',
    'softsign',
    'swish',
    'mish',
    'gelu',
    'gelu_new',
    'relu6',
    'softmax',
    'silu',
    'linear',
  ].map((a) => apply(L.activation({ activation: a as 'relu', name: `act_${a}` }), gap));
  const elu = apply(L.elu({ name: 'elu_layer' }), gap);
  const thr = apply(L.thresholdedReLU({ theta: 0.1, name: 'thresholded' }), gap);
  const relu = apply(L.reLU({ name: 'relu_layer' }), gap);
  // tfjs's Softmax layer defaults to axis 1 (and softmaxes only the last axis): 2-D here.
  const softLayer = apply(L.softmax({ name: 'softmax_default' }), gap);
  const inner = tf.sequential({
    name: 'nested',
    layers: [
      L.dense({ inputShape: [16], units: 6, activation: 'relu', name: 'nested_a' }),
      L.dense({ units: 3, name: 'nested_b' }),
    ],
  });
  const nested = apply(inner, gap);
  const modelIn = tf.input({ shape: [16], name: 'nested_model_in' });
  const nestedModel = tf.model({
    inputs: modelIn,
    outputs: apply(L.dense({ units: 2, name: 'nested_model_dense' }), modelIn),
    name: 'nested_model',
  });
  const functionalIn = tf.input({ shape: [16], name: 'nested_functional_in' });
  const nestedFunctional = functional(
    functionalIn,
    apply(L.dense({ units: 2, activation: 'relu', name: 'nested_functional_dense' }), functionalIn),
    'nested_functional',
  );
  const regularized = apply(kerasOnlyLayer('ActivityRegularization', 'activity_reg'), gap);
  const gaussDrop = apply(L.gaussianDropout({ rate: 0.5, name: 'gauss_drop' }), regularized);
  const alphaDrop = apply(L.alphaDropout({ rate: 0.5, name: 'alpha_drop' }), gaussDrop);
  const outputs = [
    fc,
    fcBn,
    seqAvg,
    seqMax,
    upPool,
    upBiPool,
    pixelFlat,
    softPool,
    logPool,
    onePixelFlat,
    ...acts,
    elu,
    thr,
    relu,
    softLayer,
    nested,
    apply(nestedModel, alphaDrop),
    apply(nestedFunctional, gap),
  ];
  const out = apply(L.concatenate({ name: 'features' }), outputs);
  const model = tf.model({ inputs: input, outputs: out, name: 'every_layer' });
  randomizeWeights(model);
  return model;
}

test('a model with every supported layer type lowers within 1e-4 of tfjs', async () => {
  const model = everyLayerModel();
  const x = pixels(3, 16, 3);
  try {
    const whole = await compare(model, x);
    assert.ok(whole.maxDiff <= TOLERANCE, `max abs diff ${whole.maxDiff}`);
    assert.equal(whole.sha256, GOLDEN_SHA256.everyLayer);
    // Cuts: a folded BN, a pending-pad layer's consumer, a Pad node, 4-D outputs, Reshape back to 4-D.
    for (const cut of [
      'bn1',
      'conv1',
      'max_valid',
      'avg_valid',
      'sep_bn',
      'cat_bn',
      'conv2_bn',
      'residual',
      'crop',
      'to_image',
      'permute',
      'up_bilinear',
      'fc_bn',
    ]) {
      const { maxDiff } = await compare(model, x, cut);
      assert.ok(maxDiff <= TOLERANCE, `max abs diff ${maxDiff} at ${cut}`);
    }
  } finally {
    x.dispose();
    model.dispose();
  }
});

test('every lowering row is exercised by the model compared with tfjs', () => {
  const model = everyLayerModel();
  try {
    const layers = allLayers(model);
    const classes = new Set(layers.map((l) => l.getClassName()));
    classes.add(model.getClassName());
    const activations = new Set(layers.map((l) => l.getConfig()['activation']));
    assert.deepEqual(
      LOWERABLE_LAYERS.filter((c) => !classes.has(c)),
      [],
      'layer rows without a case in everyLayerModel',
    );
    assert.deepEqual(
      LOWERABLE_ACTIVATIONS.filter((a) => !activations.has(a)),
      [],
      'activation rows without a case in everyLayerModel',
    );
  } finally {
    model.dispose();
  }
});

test('the tables are frozen and their keys sorted', () => {
  assert.ok(Object.isFrozen(LOWERABLE_LAYERS));
  assert.deepEqual(LOWERABLE_LAYERS, [...LOWERABLE_LAYERS].sort());
  assert.ok(LOWERABLE_LAYERS.includes('Conv2D') && !LOWERABLE_LAYERS.includes('InputLayer'));
  assert.ok(Object.isFrozen(LOWERABLE_ACTIVATIONS));
  assert.ok(LOWERABLE_ACTIVATIONS.includes('relu6'));
});

test('an unsupported layer is named in the error, with the supported classes', () => {
  const input = tf.input({ shape: [5, 3] });
  const y = apply(L.lstm({ units: 4, name: 'rnn' }), input);
  const model = tf.model({ inputs: input, outputs: y });
  const message = `Cannot lower layer 'rnn' (LSTM) to ONNX: unsupported layer type; expected one of ${LOWERABLE_LAYERS.join(', ')}`;
  assert.match(
    message,
    /; expected one of Activation, ActivityRegularization, Add, AlphaDropout, /,
  );
  assert.throws(
    () => lowerToOnnx(model),
    (err: unknown) =>
      err instanceof UnsupportedLayerError &&
      err instanceof FinetuneError &&
      err.message === message,
  );
  assert.deepEqual(canLowerToOnnx(model), { ok: false, reason: message });
  assert.throws(
    () => lowerToOnnx(model, { output: 'nope' }),
    /Expected the name of a layer of the model for output but received 'nope'/,
  );
  model.dispose();
});

test('a layer class whose name is an Object.prototype key is unsupported, not a crash', () => {
  const input = tf.input({ shape: [4] });
  const model = tf.model({
    inputs: input,
    outputs: apply(kerasOnlyLayer('toString', 'odd'), input),
  });
  assert.throws(() => lowerToOnnx(model), {
    message: `Cannot lower layer 'odd' (toString) to ONNX: unsupported layer type; expected one of ${LOWERABLE_LAYERS.join(', ')}`,
  });
  model.dispose();
});

test('a supported class in a configuration the lowering does not cover says which', () => {
  // An activation tfjs knows (registered) but the lowering has no row for.
  tf.serialization.registerClass(
    class HardSilu extends Silu {
      static override className = 'hard_silu';
    },
  );
  const cases: [tf.layers.Layer, number[], string][] = [
    [
      L.conv2d({ filters: 2, kernelSize: 1, dataFormat: 'channelsFirst', name: 'nchw' }),
      [3, 4, 4],
      "Cannot lower layer 'nchw' (Conv2D) to ONNX: channelsFirst data format is not supported",
    ],
    [
      L.dense({ units: 2, activation: 'hard_silu' as 'relu', name: 'odd_act' }),
      [4],
      "Cannot lower layer 'odd_act' (Dense) to ONNX: unsupported activation 'hard_silu'",
    ],
  ];
  for (const [layer, shape, message] of cases) {
    const input = tf.input({ shape });
    const model = tf.model({ inputs: input, outputs: apply(layer, input) });
    assert.throws(() => lowerToOnnx(model), { message });
    assert.deepEqual(canLowerToOnnx(model), { ok: false, reason: message });
    model.dispose();
  }
});

test('ONNX Runtime providers come from FINETUNE_ORT_PROVIDERS, checked', async () => {
  const { executionProviders } = await import('../../src/engine/onnx/session.js');
  assert.deepEqual(executionProviders(undefined), ['cpu']);
  assert.deepEqual(executionProviders('cuda, cpu'), ['cuda', 'cpu']);
  assert.throws(() => executionProviders('gpu'), {
    message:
      "Expected a comma-separated list of cpu, cuda, tensorrt, dml, coreml, webgpu for FINETUNE_ORT_PROVIDERS but received 'gpu'",
  });
});
