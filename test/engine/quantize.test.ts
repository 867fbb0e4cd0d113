import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { test } from 'node:test';
import onnxProto from 'onnx-proto';
import * as ort from 'onnxruntime-node';
import { GraphBuilder } from '../../src/engine/onnx/lowerings.js';
import {
  activationParams,
  Calibrator,
  quantizedTensors,
  quantizeQdq,
  quantizeWeights,
  type WeightFormat,
} from '../../src/engine/onnx/quantize.js';
import { FinetuneError } from '../../src/errors.js';
import { tempDir } from '../helpers.js';

const { onnx } = onnxProto;
const DT = onnx.TensorProto.DataType;
const SIZE = 8;
const CHANNELS = 4;
const QMAX: Readonly<Record<WeightFormat, number>> = { int8: 127, int7: 63, uint8: 127 };

function valueInfo(name: string, dims: readonly number[]): onnxProto.onnx.IValueInfoProto {
  return {
    name,
    type: {
      tensorType: {
        elemType: DT.FLOAT,
        shape: { dim: [{ dimParam: 'N' }, ...dims.map((d) => ({ dimValue: d }))] },
      },
    },
  };
}

/**
 * `pixels` [N, 3, 8, 8] → Conv 3×3 (4 channels, pads 1, weights `w`, bias `b`) → `output`;
 * with `pooled`, the Conv is followed by Clip(0, 6), GlobalAveragePool and Flatten, as at
 * the end of MobileNetV2.
 */
function convModel(w: Float32Array, b: Float32Array, pooled = false): Uint8Array {
  const g = new GraphBuilder(['pixels', 'output']);
  const attrs = { kernel_shape: { ints: [3, 3] }, pads: { ints: [1, 1, 1, 1] } };
  const wName = g.floats('conv_W', w, [CHANNELS, 3, 3, 3]);
  const bName = g.floats('conv_B', b, [CHANNELS]);
  let outDims = [CHANNELS, SIZE, SIZE];
  if (pooled) {
    const y = g.op('Conv', ['pixels', wName, bName], attrs, 'conv');
    const clip = g.op('Clip', [y, g.scalar('min', 0), g.scalar('max', 6)], {}, 'relu6');
    const pool = g.op('GlobalAveragePool', [clip], {}, 'pool');
    g.opTo('output', 'Flatten', [pool], { axis: { i: 1 } });
    outDims = [CHANNELS];
  } else {
    g.opTo('output', 'Conv', ['pixels', wName, bName], attrs);
  }
  return onnx.ModelProto.encode({
    irVersion: 8,
    opsetImport: [{ domain: '', version: 13 }],
    graph: {
      name: 'one_conv',
      node: g.nodes,
      initializer: g.initializers,
      input: [valueInfo('pixels', [3, SIZE, SIZE])],
      output: [valueInfo('output', outDims)],
    },
  }).finish();
}

/** A reproducible generator of integers in [lo, hi]. */
function integers(seed: number): (lo: number, hi: number) => number {
  let s = seed >>> 0;
  return (lo, hi) => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return lo + (s % (hi - lo + 1));
  };
}

/**
 * Weights on the grid of a format: integers k·scale_c with |k| ≤ qmax and one k = ±qmax
 * per channel (so the quantiser finds scale_c exactly). Most |k| stay small, so a pair of
 * products of uint8 inputs ≤ 128 with them cannot saturate a 16-bit sum on AVX2.
 */
function gridWeights(qmax: number, scales: readonly number[], seed: number): Float32Array {
  const next = integers(seed);
  const per = 3 * 3 * 3;
  const w = new Float32Array(CHANNELS * per);
  for (let c = 0; c < CHANNELS; c++) {
    for (let i = 0; i < per; i++) {
      const k = i === 13 ? (c % 2 ? -qmax : qmax) : next(-20, 20);
      w[c * per + i] = k * scales[c]!;
    }
  }
  return w;
}

/** Pixels: integers in [lo, hi], NCHW. */
function pixels(n: number, lo: number, hi: number, seed: number): Float32Array {
  const next = integers(seed);
  return Float32Array.from({ length: n * 3 * SIZE * SIZE }, () => next(lo, hi));
}

async function runOnce(bytes: Uint8Array, x: Float32Array, n: number): Promise<Float32Array> {
  const session = await ort.InferenceSession.create(bytes, { graphOptimizationLevel: 'all' });
  try {
    const out = await session.run({
      pixels: new ort.Tensor('float32', x, [n, 3, SIZE, SIZE]),
    });
    return out['output']!.data as Float32Array;
  } finally {
    await session.release();
  }
}

/** Calibrates on a batch holding the full range 0–255 (so the input scale is exactly 1). */
async function calibrate(bytes: Uint8Array): Promise<ReturnType<Calibrator['ranges']>> {
  const calibrator = await Calibrator.create(bytes, { inputSize: SIZE, threads: 1 });
  try {
    const x = pixels(4, 0, 255, 7);
    x[0] = 0;
    x[1] = 255;
    const rows = await calibrator.run(x, 4);
    assert.equal(rows.length, 4 * calibrator.outputSize);
    return calibrator.ranges();
  } finally {
    await calibrator.dispose();
  }
}

/** A serialized model's nodes and initializers, decoded. */
function decoded(bytes: Uint8Array): {
  nodes: onnxProto.onnx.NodeProto[];
  initializer(name: string): onnxProto.onnx.TensorProto;
  has(name: string): boolean;
} {
  const graph = onnx.ModelProto.decode(bytes).graph as onnxProto.onnx.GraphProto;
  const inits = graph.initializer as onnxProto.onnx.TensorProto[];
  return {
    nodes: graph.node as onnxProto.onnx.NodeProto[],
    initializer(name) {
      const t = inits.find((i) => i.name === name);
      assert.ok(t, `initializer ${name}`);
      return t;
    },
    has: (name) => inits.some((i) => i.name === name),
  };
}

function rawOf(t: onnxProto.onnx.ITensorProto): Uint8Array {
  return Uint8Array.from(t.rawData!);
}

for (const format of ['int8', 'int7', 'uint8'] as const) {
  test(`one Conv, ${format} weights: ORT's int8 output is within half an output step of float`, async () => {
    const qmax = QMAX[format];
    const wScales = [0.01, 0.02, 0.005, 0.03];
    const w = gridWeights(qmax, wScales, 3);
    // Bias on the int32 grid (input scale 1 × weight scale).
    const b = Float32Array.from(wScales, (s, c) => (c - 2) * 50 * s);
    const floatModel = convModel(w, b);
    const ranges = await calibrate(floatModel);
    assert.deepEqual(ranges.get('pixels'), { min: 0, max: 255 });
    const qdq = quantizeQdq(floatModel, ranges, { weights: format });

    // Inputs ≤ 128: see gridWeights.
    const x = pixels(3, 0, 128, 11);
    const want = await runOnce(floatModel, x, 3);
    const got = await runOnce(qdq, x, 3);
    const step = activationParams(ranges.get('output')!).scale;
    let worst = 0;
    for (let i = 0; i < want.length; i++) worst = Math.max(worst, Math.abs(got[i]! - want[i]!));
    assert.ok(worst <= step / 2 + 1e-4, `max error ${worst} > half a step ${step / 2}`);
    assert.ok(worst > 0, 'the output went through uint8');
  });
}

test('weights: one symmetric scale per output channel, int8 values on it, zero point 0', async () => {
  const w = new Float32Array(CHANNELS * 27).map((_, i) => Math.sin(i) * (1 + Math.floor(i / 27)));
  const b = Float32Array.of(0.5, -0.25, 1, 0);
  const floatModel = convModel(w, b);
  const ranges = await calibrate(floatModel);
  const model = decoded(quantizeQdq(floatModel, ranges));
  const { nodes } = model;
  const conv = nodes.find((n) => n.opType === 'Conv')!;
  const dq = nodes.find((n) => n.opType === 'DequantizeLinear' && n.output[0] === conv.input[1])!;
  assert.equal(String(dq.attribute.find((a) => a.name === 'axis')?.i), '0');
  const [qName, sName, zName] = dq.input;
  const q = model.initializer(qName!);
  assert.equal(q.dataType, DT.INT8);
  const scales = new Float32Array(rawOf(model.initializer(sName!)).buffer);
  const values = new Int8Array(rawOf(q).buffer);
  assert.deepEqual([...new Int8Array(rawOf(model.initializer(zName!)).buffer)], [0, 0, 0, 0]);
  for (let c = 0; c < CHANNELS; c++) {
    const slice = w.subarray(c * 27, (c + 1) * 27);
    const absMax = Math.max(...slice.map(Math.abs));
    assert.equal(scales[c], Math.fround(absMax / 127), `scale of channel ${c}`);
    for (let i = 0; i < 27; i++) {
      assert.equal(values[c * 27 + i], Math.round(slice[i]! / scales[c]!));
    }
  }
  // The float weights are gone; the bias is int32 with scale input scale × weight scale.
  assert.equal(model.has('conv_W'), false);
  const biasDq = nodes.find((n) => n.output[0] === conv.input[2])!;
  const bias = model.initializer(biasDq.input[0]!);
  assert.equal(bias.dataType, DT.INT32);
  const biasScales = new Float32Array(rawOf(model.initializer(biasDq.input[1]!)).buffer);
  const xScale = activationParams(ranges.get('pixels')!).scale;
  for (let c = 0; c < CHANNELS; c++) assert.equal(biasScales[c], Math.fround(xScale * scales[c]!));
});

test('quantizeWeights: channels along any axis, and an all-zero channel gets scale 1', () => {
  // [2, 3] with channels on axis 1 (MatMul's B): columns are channels.
  const { q, scales } = quantizeWeights(Float32Array.of(1, 0, -4, -2, 0, 3), [2, 3], 1);
  assert.deepEqual(
    [...scales],
    [2 / 127, 1, 4 / 127].map((x) => Math.fround(x)),
  );
  assert.deepEqual([...q], [64, 0, -127, -127, 0, 95]);
  // 7 bits (int7): −63…63.
  assert.deepEqual([...quantizeWeights(Float32Array.of(0.25, -1), [1, 2], 0, 63).q], [16, -63]);
});

test('ORT fuses the QDQ graph: QLinearConv with the ReLU6 folded, a float pooled output', async () => {
  const w = gridWeights(127, [0.01, 0.02, 0.005, 0.03], 5);
  const floatModel = convModel(w, new Float32Array(CHANNELS), true);
  assert.deepEqual(quantizedTensors(floatModel), ['pixels', 'relu6']);
  const ranges = await calibrate(floatModel);
  const qdq = quantizeQdq(floatModel, ranges);
  const { dir, cleanup } = await tempDir('quantize');
  try {
    const optimized = path.join(dir, 'optimized.onnx');
    const session = await ort.InferenceSession.create(qdq, {
      graphOptimizationLevel: 'all',
      optimizedModelFilePath: optimized,
    });
    assert.deepEqual(session.outputNames, ['output']);
    const meta = session.outputMetadata[0]!;
    assert.ok(meta.isTensor && meta.type === 'float32', 'the embedding stays float');
    await session.release();
    const ops = decoded(await readFile(optimized)).nodes.map((n) => n.opType);
    assert.ok(ops.includes('QLinearConv'), `QLinearConv in ${ops.join(', ')}`);
    assert.ok(
      !ops.includes('Conv') && !ops.includes('Clip'),
      `no float Conv or Clip in ${ops.join(', ')}`,
    );
  } finally {
    await cleanup();
  }
  // The pooled output is the mean of the dequantised activations: within half a step.
  const x = pixels(2, 0, 128, 13);
  const want = await runOnce(floatModel, x, 2);
  const got = await runOnce(qdq, x, 2);
  const step = activationParams(ranges.get('relu6')!).scale;
  for (let i = 0; i < want.length; i++) assert.ok(Math.abs(got[i]! - want[i]!) <= step / 2 + 1e-4);
});

test('weight formats: depthwise and unclipped (linear) ops can take their own', async () => {
  const w = gridWeights(127, [0.01, 0.02, 0.005, 0.03], 9);
  const b = new Float32Array(CHANNELS);
  const weightType = async (floatModel: Uint8Array): Promise<number | null | undefined> => {
    const model = decoded(
      quantizeQdq(floatModel, await calibrate(floatModel), { weights: 'int7', linear: 'uint8' }),
    );
    const conv = model.nodes.find((n) => n.opType === 'Conv')!;
    const dq = model.nodes.find((n) => n.output[0] === conv.input[1])!;
    return model.initializer(dq.input[0]!).dataType;
  };
  // A Conv straight to the output is linear; one followed by ReLU6 is not.
  assert.equal(await weightType(convModel(w, b)), DT.UINT8);
  assert.equal(await weightType(convModel(w, b, true)), DT.INT8);
});

test('activationParams: the range is widened to hold 0, and 0 is exact', () => {
  assert.deepEqual(activationParams({ min: 0, max: 255 }), { scale: 1, zeroPoint: 0 });
  const p = activationParams({ min: -1, max: 3 });
  assert.equal(p.zeroPoint, Math.round(1 / p.scale));
  assert.deepEqual(activationParams({ min: 2, max: 2 + 255 * 0.5 }).zeroPoint, 0);
  assert.deepEqual(activationParams({ min: 0, max: 0 }), { scale: 1, zeroPoint: 0 });
});

test('bad input: a missing range names the tensor, an unknown weight format lists the valid ones', async () => {
  const floatModel = convModel(
    new Float32Array(CHANNELS * 27).fill(0.1),
    new Float32Array(CHANNELS),
  );
  assert.throws(
    () => quantizeQdq(floatModel, new Map([['pixels', { min: 0, max: 255 }]])),
    (err: unknown) =>
      err instanceof FinetuneError &&
      err.message === "Expected a calibrated range for tensor 'output' but none was given",
  );
  const ranges = await calibrate(floatModel);
  assert.throws(
    () => quantizeQdq(floatModel, ranges, { weights: 'int4' as WeightFormat }),
    /one of int8, int7, uint8/,
  );
  assert.throws(() => quantizeQdq(Uint8Array.of(1, 2, 3), ranges), FinetuneError);
});
