import assert from 'node:assert/strict';
import { before, describe, test } from 'node:test';
import * as tf from '@tensorflow/tfjs';
import '@tensorflow/tfjs-backend-wasm';
import {
  registerWasmGradientKernels,
  WASM_GRADIENT_KERNELS,
} from '../../src/backend/wasm-grad-kernels.js';

type Shape4 = [number, number, number, number];
type Pad = 'same' | 'valid' | number | tf.backend_util.ExplicitPadding;
type Backend = 'cpu' | 'wasm';

/** Deterministic values in [-1, 1), identical on both backends. */
function values(size: number, seed: number): Float32Array {
  let state = seed >>> 0;
  const out = new Float32Array(size);
  for (let i = 0; i < size; i++) {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    out[i] = ((t ^ (t >>> 14)) >>> 0) / 2 ** 31 - 1;
  }
  return out;
}

/** A variable that does not leave its initial-value tensor behind. */
function variable<R extends tf.Rank>(
  initial: tf.Tensor<R>,
  trainable = true,
  name?: string,
): tf.Variable<R> {
  const v = tf.variable(initial, trainable, name);
  initial.dispose();
  return v;
}

function sizeOf(shape: number[]): number {
  return shape.reduce((a, b) => a * b, 1);
}

/** Max abs difference, scaled down when the reference values are large. */
function maxError(actual: Float32Array, expected: Float32Array): number {
  assert.equal(actual.length, expected.length);
  let diff = 0;
  let magnitude = 0;
  for (let i = 0; i < expected.length; i++) {
    diff = Math.max(diff, Math.abs(actual[i]! - expected[i]!));
    magnitude = Math.max(magnitude, Math.abs(expected[i]!));
  }
  return diff / Math.max(1, magnitude);
}

interface Inputs {
  [name: string]: { shape: number[]; data: Float32Array };
}

/**
 * Runs `fn` with the engine checking after every kernel call that the backend
 * holds no more data than before plus the outputs, i.e. that the composed
 * kernels free their intermediates. Not left on globally because some tfjs
 * custom-gradient ops (softmaxCrossEntropy) trip it on their own.
 */
function withLeakCheck<T>(fn: () => T): T {
  tf.env().set('IS_TEST', true);
  try {
    return fn();
  } finally {
    tf.env().set('IS_TEST', false);
  }
}

/** Runs one kernel on the given backend, returning its output values. */
async function runOn(
  backend: Backend,
  kernelName: string,
  inputs: Inputs,
  attrs: tf.NamedAttrMap,
): Promise<{ shape: number[]; data: Float32Array }> {
  await tf.setBackend(backend);
  const tensors: tf.NamedTensorMap = {};
  for (const [name, { shape, data }] of Object.entries(inputs)) {
    tensors[name] = tf.tensor(data, shape);
  }
  const out = withLeakCheck(() => tf.engine().runKernel(kernelName, tensors, attrs) as tf.Tensor);
  const result = { shape: out.shape, data: out.dataSync() as Float32Array };
  out.dispose();
  for (const t of Object.values(tensors)) t.dispose();
  return result;
}

async function compareWithCpu(kernelName: string, inputs: Inputs, attrs: tf.NamedAttrMap) {
  const expected = await runOn('cpu', kernelName, inputs, attrs);
  const actual = await runOn('wasm', kernelName, inputs, attrs);
  assert.deepEqual(actual.shape, expected.shape);
  const error = maxError(actual.data, expected.data);
  assert.ok(error <= 1e-4, `${kernelName} ${JSON.stringify(attrs)}: error ${error}`);
}

interface Case {
  batch: number;
  height: number;
  width: number;
  kernel: number;
  stride: number;
  pad: Pad;
  multiplier: number;
}

function convCases(): Case[] {
  const cases: Case[] = [];
  for (const kernel of [1, 3, 5]) {
    for (const stride of [1, 2]) {
      for (const pad of ['same', 'valid'] as const) {
        // Odd and even sizes, non-square so that H and W mix-ups show.
        for (const [height, width] of [
          [7, 9],
          [8, 6],
        ] as const) {
          cases.push({ batch: 2, height, width, kernel, stride, pad, multiplier: 1 });
        }
      }
    }
  }
  cases.push({ batch: 3, height: 10, width: 11, kernel: 3, stride: 3, pad: 'same', multiplier: 1 });
  cases.push({ batch: 2, height: 9, width: 8, kernel: 3, stride: 2, pad: 1, multiplier: 1 });
  cases.push({
    batch: 2,
    height: 8,
    width: 9,
    kernel: 3,
    stride: 2,
    pad: [
      [0, 0],
      [2, 0],
      [1, 3],
      [0, 0],
    ],
    multiplier: 1,
  });
  cases.push({ batch: 2, height: 8, width: 7, kernel: 2, stride: 1, pad: 'same', multiplier: 1 });
  return cases;
}

function describeCase(c: Case): string {
  return `${c.batch}x${c.height}x${c.width} k${c.kernel} s${c.stride} pad ${JSON.stringify(c.pad)} m${c.multiplier}`;
}

const IN_CHANNELS = 3;
const OUT_CHANNELS = 4;

before(async () => {
  registerWasmGradientKernels();
  await tf.setBackend('wasm');
});

describe('registerWasmGradientKernels', () => {
  test('registers the three kernels for wasm and is idempotent', () => {
    assert.deepEqual(
      [...WASM_GRADIENT_KERNELS].sort(),
      [
        'Conv2DBackpropFilter',
        'DepthwiseConv2dNativeBackpropFilter',
        'DepthwiseConv2dNativeBackpropInput',
      ].sort(),
    );
    const before = WASM_GRADIENT_KERNELS.map((name) => tf.getKernel(name, 'wasm'));
    for (const config of before) assert.ok(config !== undefined);
    const warn = console.warn;
    const warnings: unknown[] = [];
    console.warn = (...args: unknown[]) => warnings.push(args);
    try {
      registerWasmGradientKernels();
    } finally {
      console.warn = warn;
    }
    assert.deepEqual(warnings, []);
    assert.deepEqual(
      WASM_GRADIENT_KERNELS.map((name) => tf.getKernel(name, 'wasm')),
      before,
    );
  });
});

describe('kernels match the cpu backend', () => {
  for (const c of convCases()) {
    test(`Conv2DBackpropFilter ${describeCase(c)}`, async () => {
      const xShape: Shape4 = [c.batch, c.height, c.width, IN_CHANNELS];
      const filterShape: Shape4 = [c.kernel, c.kernel, IN_CHANNELS, OUT_CHANNELS];
      const info = tf.backend_util.computeConv2DInfo(xShape, filterShape, c.stride, 1, c.pad);
      await compareWithCpu(
        tf.Conv2DBackpropFilter,
        {
          x: { shape: xShape, data: values(sizeOf(xShape), 1) },
          dy: { shape: info.outShape, data: values(sizeOf(info.outShape), 2) },
        },
        { strides: c.stride, pad: c.pad, dataFormat: 'NHWC', filterShape },
      );
    });
  }

  // The matMul override for 1×1 stride-1 convs, and shapes it hands back to the native kernel.
  for (const c of convCases()) {
    test(`Conv2DBackpropInput ${describeCase(c)}`, async () => {
      const xShape: Shape4 = [c.batch, c.height, c.width, IN_CHANNELS];
      const filterShape: Shape4 = [c.kernel, c.kernel, IN_CHANNELS, OUT_CHANNELS];
      const info = tf.backend_util.computeConv2DInfo(xShape, filterShape, c.stride, 1, c.pad);
      await compareWithCpu(
        tf.Conv2DBackpropInput,
        {
          dy: { shape: info.outShape, data: values(sizeOf(info.outShape), 7) },
          filter: { shape: filterShape, data: values(sizeOf(filterShape), 8) },
        },
        { strides: c.stride, pad: c.pad, dataFormat: 'NHWC', inputShape: xShape },
      );
    });
  }

  const depthwiseCases = [
    ...convCases(),
    { batch: 2, height: 7, width: 8, kernel: 3, stride: 2, pad: 'same', multiplier: 2 },
    { batch: 2, height: 8, width: 7, kernel: 3, stride: 1, pad: 'valid', multiplier: 3 },
  ] satisfies Case[];
  for (const c of depthwiseCases) {
    const xShape: Shape4 = [c.batch, c.height, c.width, IN_CHANNELS];
    const filterShape: Shape4 = [c.kernel, c.kernel, IN_CHANNELS, c.multiplier];
    const dyShapeOf = () =>
      tf.backend_util.computeConv2DInfo(xShape, filterShape, c.stride, 1, c.pad, undefined, true)
        .outShape;

    test(`DepthwiseConv2dNativeBackpropFilter ${describeCase(c)}`, async () => {
      const dyShape = dyShapeOf();
      await compareWithCpu(
        tf.DepthwiseConv2dNativeBackpropFilter,
        {
          x: { shape: xShape, data: values(sizeOf(xShape), 3) },
          dy: { shape: dyShape, data: values(sizeOf(dyShape), 4) },
        },
        { strides: c.stride, pad: c.pad, dilations: 1, filterShape },
      );
    });

    test(`DepthwiseConv2dNativeBackpropInput ${describeCase(c)}`, async () => {
      const dyShape = dyShapeOf();
      await compareWithCpu(
        tf.DepthwiseConv2dNativeBackpropInput,
        {
          dy: { shape: dyShape, data: values(sizeOf(dyShape), 5) },
          filter: { shape: filterShape, data: values(sizeOf(filterShape), 6) },
        },
        { strides: c.stride, pad: c.pad, dilations: 1, inputShape: xShape },
      );
    });
  }
});

describe('kernel contract', () => {
  test('accepts plain TensorInfo inputs and leaves them alive', async () => {
    await tf.setBackend('wasm');
    const x = tf.tensor(values(2 * 6 * 6 * 3, 7), [2, 6, 6, 3]);
    const dy = tf.tensor(values(2 * 3 * 3 * 3, 8), [2, 3, 3, 3]);
    const attrs = { strides: 2, pad: 'same', dilations: 1, filterShape: [3, 3, 3, 1] };
    const viaEngine = tf
      .engine()
      .runKernel(tf.DepthwiseConv2dNativeBackpropFilter, { x, dy }, attrs);
    const config = tf.getKernel(tf.DepthwiseConv2dNativeBackpropFilter, 'wasm');
    const info = (t: tf.Tensor): tf.TensorInfo => ({
      dataId: t.dataId,
      shape: t.shape,
      dtype: t.dtype,
    });
    const direct = config.kernelFunc({
      inputs: { x: info(x), dy: info(dy) },
      attrs,
      backend: tf.backend(),
    }) as tf.Tensor;
    assert.deepEqual(direct.dataSync(), (viaEngine as tf.Tensor).dataSync());
    assert.equal(x.dataSync().length, 2 * 6 * 6 * 3);
    assert.equal(dy.dataSync().length, 2 * 3 * 3 * 3);
    tf.dispose([x, dy, direct, viaEngine as tf.Tensor]);
  });

  test('rejects NCHW and dilations other than 1 with a clear message', async () => {
    await tf.setBackend('wasm');
    const x = tf.zeros([1, 4, 4, 2]);
    const dy = tf.zeros([1, 4, 4, 2]);
    const filter = tf.zeros([3, 3, 2, 1]);
    assert.throws(
      () =>
        tf
          .engine()
          .runKernel(
            tf.Conv2DBackpropFilter,
            { x, dy },
            { strides: 1, pad: 'same', dataFormat: 'NCHW', filterShape: [3, 3, 4, 2] },
          ),
      /supports only dataFormat 'NHWC'/,
    );
    assert.throws(
      () =>
        tf
          .engine()
          .runKernel(
            tf.DepthwiseConv2dNativeBackpropFilter,
            { x, dy },
            { strides: 1, pad: 'same', dilations: 2, filterShape: [3, 3, 2, 1] },
          ),
      /supports only dilations 1/,
    );
    assert.throws(
      () =>
        tf
          .engine()
          .runKernel(
            tf.DepthwiseConv2dNativeBackpropInput,
            { dy, filter },
            { strides: 1, pad: 'same', dilations: [1, 2], inputShape: [1, 4, 4, 2] },
          ),
      /supports only dilations 1/,
    );
    tf.dispose([x, dy, filter]);
  });
});

describe('training on wasm', () => {
  const shapes = {
    conv: [3, 3, 3, 8],
    depthwise: [3, 3, 8, 1],
    pointwise: [1, 1, 8, 6],
    dense: [6, 4],
  } as const;
  const inputShape: Shape4 = [4, 9, 10, 3];

  /**
   * One SGD step of conv(s2) -> relu6 -> depthwise -> relu6 -> 1x1 conv ->
   * global average pool -> dense on `backend`; returns the updated weights.
   */
  async function trainStep(backend: Backend): Promise<Float32Array[]> {
    await tf.setBackend(backend);
    const before = tf.memory().numTensors;
    const weights = Object.entries(shapes).map(([name, shape], i) =>
      variable(
        tf.tensor(values(sizeOf([...shape]), 10 + i), [...shape]),
        true,
        `${name}_${backend}`,
      ),
    );
    const [conv, depthwise, pointwise, dense] = weights as [
      tf.Variable<tf.Rank.R4>,
      tf.Variable<tf.Rank.R4>,
      tf.Variable<tf.Rank.R4>,
      tf.Variable<tf.Rank.R2>,
    ];
    const x = tf.tensor4d(values(sizeOf(inputShape), 20), inputShape);
    const labels = tf.tidy(() => tf.oneHot(tf.tensor1d([0, 1, 2, 3], 'int32'), 4));
    const optimizer = tf.train.sgd(0.1);
    const loss = optimizer.minimize(() => {
      let h = tf.relu6(tf.conv2d(x, conv, 2, 'same'));
      h = tf.relu6(tf.depthwiseConv2d(h, depthwise, 1, 'same'));
      h = tf.conv2d(h, pointwise, 1, 'valid');
      const logits = tf.matMul(tf.mean(h, [1, 2]), dense);
      return tf.losses.softmaxCrossEntropy(labels, logits);
    }, true);
    assert.ok(loss !== null && Number.isFinite(loss.dataSync()[0]));
    const updated = weights.map((w) => w.dataSync() as Float32Array);
    tf.dispose([x, labels, loss!, ...weights]);
    optimizer.dispose();
    assert.equal(tf.memory().numTensors, before, `tensors leaked on ${backend}`);
    return updated;
  }

  test('an SGD step runs on wasm, matches cpu and leaks no tensors', async () => {
    const expected = await trainStep('cpu');
    const actual = await trainStep('wasm');
    for (let i = 0; i < expected.length; i++) {
      const error = maxError(actual[i]!, expected[i]!);
      assert.ok(error <= 1e-4, `weight ${Object.keys(shapes)[i]}: error ${error}`);
    }
  });

  test('tf.variableGrads through the kernels leaves tensor and buffer counts unchanged', async () => {
    await tf.setBackend('wasm');
    const x = tf.tensor4d(values(sizeOf(inputShape), 30), inputShape);
    const conv = variable(tf.tensor4d(values(3 * 3 * 3 * 5, 31), [3, 3, 3, 5]));
    const depthwise = variable(tf.tensor4d(values(5 * 5 * 5 * 1, 32), [5, 5, 5, 1]));
    const f = (): tf.Scalar =>
      tf.sum(tf.depthwiseConv2d(tf.conv2d(x, conv, 1, 'same'), depthwise, 2, 'same'));
    const tensors = tf.memory().numTensors;
    const buffers = tf.memory().numDataBuffers;
    withLeakCheck(() => {
      for (let i = 0; i < 3; i++) {
        const { value, grads } = tf.variableGrads(f);
        assert.equal(Object.keys(grads).length, 2);
        tf.dispose([value, ...Object.values(grads)]);
      }
    });
    assert.equal(tf.memory().numTensors, tensors);
    assert.equal(tf.memory().numDataBuffers, buffers);
    tf.dispose([x, conv, depthwise]);
  });
});

describe('ClipByValue gradient (ReLU6) on wasm', () => {
  test('one pass, the same values as tfjs gradient on cpu: edges, outside and NaN', async () => {
    const xs = new Float32Array([-1, 0, 0.5, 6, 6.5, Number.NaN, 3, -0]);
    const dys = new Float32Array([1, 2, 3, 4, 5, 6, 7, 8]);
    const grad = async (backend: Backend) => {
      await tf.setBackend(backend);
      const x = tf.tensor1d(xs);
      const dy = tf.tensor1d(dys);
      const tensors = tf.memory().numTensors;
      const g = tf.grad((t: tf.Tensor) => tf.clipByValue(t, 0, 6))(x, dy);
      const out = Array.from(await g.data());
      g.dispose();
      assert.equal(tf.memory().numTensors, tensors);
      tf.dispose([x, dy]);
      return out;
    };
    const cpu = await grad('cpu');
    assert.deepEqual(cpu, [0, 2, 3, 4, 0, 0, 7, 8]);
    assert.deepEqual(await grad('wasm'), cpu);
    // it is the toolkit's kernel that ran on wasm (tfjs's would run five)
    await tf.setBackend('wasm');
    const x = tf.tensor4d(
      values(2 * 3 * 3 * 4, 40).map((v) => v * 8),
      [2, 3, 3, 4],
    );
    const profile = await tf.profile(() => {
      const g = tf.grad((t: tf.Tensor) => tf.clipByValue(t, 0, 6))(x);
      g.dispose();
    });
    const names = profile.kernels.map((k) => k.name);
    assert.ok(names.includes('FinetuneClipByValueGrad'), names.join(','));
    assert.ok(!names.includes('LogicalAnd'), names.join(','));
    x.dispose();
  });
});

describe('Identity on wasm', () => {
  test('a clone shares its buffer, keeps its values when the original goes, and frees it last', async () => {
    await tf.setBackend('wasm');
    registerWasmGradientKernels();
    const backend = tf.backend() as unknown as { numDataIds(): number };
    const x = tf.tensor2d(values(6, 50), [2, 3]);
    const expected = Array.from(await x.data());
    const ids = backend.numDataIds();
    const y = tf.clone(x);
    // shared, not copied: no new buffer in the backend
    assert.equal(backend.numDataIds(), ids);
    x.dispose();
    assert.deepEqual(Array.from(await y.data()), expected);
    assert.equal(backend.numDataIds(), ids);
    y.dispose();
    assert.equal(backend.numDataIds(), ids - 1);
    // strings keep the native kernel
    const s = tf.tensor1d(['a', 'b'], 'string');
    const t = tf.clone(s);
    assert.deepEqual(await t.data(), ['a', 'b']);
    tf.dispose([s, t]);
  });

  test('a training step saves its tensors for the gradient without copying them', async () => {
    await tf.setBackend('wasm');
    registerWasmGradientKernels();
    const backend = tf.backend() as unknown as { numDataIds(): number };
    const x = tf.tensor4d(values(2 * 5 * 5 * 4, 51), [2, 5, 5, 4]);
    const w = variable(tf.tensor4d(values(4 * 8, 52), [1, 1, 4, 8]));
    const tensors = tf.memory().numTensors;
    let buffersAdded = -1;
    const { grads, value } = tf.variableGrads(() => {
      const ids = backend.numDataIds();
      // conv2d keeps x and the filter for its gradient: clones that share their buffers
      const y = tf.conv2d(x, w, 1, 'same');
      buffersAdded = backend.numDataIds() - ids;
      return tf.sum(y) as tf.Scalar;
    }, [w]);
    assert.equal(buffersAdded, 1, 'only the output is a new buffer');
    assert.equal(
      (await grads[w.name]!.data()).length,
      4 * 8,
      'the gradient comes out of the shared tensors',
    );
    tf.dispose([value, ...Object.values(grads)]);
    assert.equal(tf.memory().numTensors, tensors);
    tf.dispose([x, w]);
  });
});

describe('Sum over leading axes on wasm', () => {
  test('the same values as on cpu, with keepDims or not; other reductions keep the native kernel', async () => {
    const shape = [2, 3, 4, 5];
    const x = values(2 * 3 * 4 * 5, 60);
    const cases: { axes: number[]; keepDims: boolean; dtype: 'float32' | 'int32' }[] = [
      { axes: [0], keepDims: false, dtype: 'float32' },
      { axes: [0, 1], keepDims: false, dtype: 'float32' },
      { axes: [1, 0, 2], keepDims: true, dtype: 'float32' },
      { axes: [-4, -3], keepDims: true, dtype: 'float32' },
      { axes: [1], keepDims: false, dtype: 'float32' },
      { axes: [0, 2], keepDims: false, dtype: 'float32' },
      { axes: [0, 1, 2, 3], keepDims: false, dtype: 'float32' },
      { axes: [0, 1], keepDims: false, dtype: 'int32' },
    ];
    const sum = async (backend: Backend, c: (typeof cases)[number]) => {
      await tf.setBackend(backend);
      const t = tf.tensor(
        c.dtype === 'int32' ? x.map((v) => Math.round(v * 10)) : x,
        shape,
        c.dtype,
      );
      const tensors = tf.memory().numTensors;
      const s = tf.sum(t, c.axes, c.keepDims);
      const out = { shape: s.shape, data: Array.from(await s.data()) };
      s.dispose();
      assert.equal(tf.memory().numTensors, tensors);
      t.dispose();
      return out;
    };
    for (const c of cases) {
      const cpu = await sum('cpu', c);
      const wasm = await sum('wasm', c);
      assert.deepEqual(wasm.shape, cpu.shape, JSON.stringify(c));
      wasm.data.forEach((v, i) => {
        assert.ok(
          Math.abs(v - cpu.data[i]!) < 1e-5,
          `${JSON.stringify(c)}[${i}]: ${v} vs ${cpu.data[i]}`,
        );
      });
    }
    // Leading axes of a rank-3+ tensor are summed as the 2-D [rows, cols] they are.
    await tf.setBackend('wasm');
    registerWasmGradientKernels();
    const t = tf.tensor(x, shape);
    const profile = await tf.profile(() => {
      tf.sum(t, [0, 1]).dispose();
    });
    assert.ok(
      profile.kernels.some((k) => k.name === 'Sum' && JSON.stringify(k.inputShapes) === '[[6,20]]'),
      JSON.stringify(profile.kernels.map((k) => [k.name, k.inputShapes])),
    );
    t.dispose();
  });
});
