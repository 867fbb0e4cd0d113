import onnxProto from 'onnx-proto';
import type * as ort from 'onnxruntime-node';
import { FinetuneError, invalidOption } from '../../errors.js';
import type { FrozenModel } from '../types.js';
import { checkBatch, float32Tensor, openOrtSession, sessionSize } from './session.js';

/**
 * Static int8 quantisation of a lowered float graph, in the QDQ form ONNX Runtime's CPU
 * provider fuses into integer kernels (checked for MobileNetV2: every Conv becomes a
 * QLinearConv and every residual Add a QLinearAdd; Gemm/MatMul get the same treatment,
 * which ORT's selectors map to QGemm/QLinearMatMul, but no lowered backbone here has one):
 *
 * - weights of Conv, Gemm and MatMul: symmetric integers (int8 with zero point 0 by
 *   default; see {@link WeightFormat}), one scale per output channel, stored as
 *   initializers that feed a DequantizeLinear (axis = the output channels);
 * - biases: int32 with scale input-scale × weight-scale of their channel (ORT fuses a Conv
 *   only when every input, the bias included, comes out of a DequantizeLinear);
 * - activations read or written by those ops: uint8 asymmetric (the U8S8 pair ORT's x86
 *   kernels take; int8 activations fuse only where ORT allows S8S8), as
 *   QuantizeLinear → DequantizeLinear pairs whose ranges are min/max over calibration
 *   images. A Relu or Clip right after a Conv keeps its QuantizeLinear after it, where
 *   ORT folds the clipping into the quantised range.
 *
 * Everything else (the input rescaling, pooling, Flatten) stays float between a
 * DequantizeLinear and the next QuantizeLinear; the graph's output is always float.
 */

// onnx-proto is CommonJS: its root object is the default export under Node's ESM loader.
const { onnx } = onnxProto;
type ModelProto = onnxProto.onnx.IModelProto;
type GraphProto = onnxProto.onnx.IGraphProto;
type NodeProto = onnxProto.onnx.INodeProto;
type TensorProto = onnxProto.onnx.ITensorProto;

const DT = onnx.TensorProto.DataType;
const ATTR = onnx.AttributeProto.AttributeType;

/** Observed range of one activation tensor over the calibration images. */
export interface ActivationRange {
  readonly min: number;
  readonly max: number;
}

export type ActivationRanges = ReadonlyMap<string, ActivationRange>;

/**
 * How weights are stored. All three are symmetric per output channel (the stored zero
 * point is the integer for 0.0):
 * - `int8`: −127…127, zero point 0: ORT's U8S8 kernels. On AVX2 (and AVX-512 without VNNI)
 *   those sum pairs of u8·s8 products in 16 bits with saturation (vpmaddubsw), which
 *   full-range weights overflow;
 * - `int7`: −63…63, zero point 0: ORT's `reduce_range`, the documented cure for that;
 * - `uint8`: −127…127 stored as 1…255 with zero point 128: ORT's U8U8 kernels, which widen
 *   to 16 bits before multiplying and cannot saturate.
 */
export type WeightFormat = 'int8' | 'int7' | 'uint8';

const WEIGHT_FORMATS: Readonly<
  Record<
    WeightFormat,
    { readonly qmax: number; readonly dataType: number; readonly zeroPoint: number }
  >
> = Object.freeze({
  int8: { qmax: 127, dataType: DT.INT8, zeroPoint: 0 },
  int7: { qmax: 63, dataType: DT.INT8, zeroPoint: 0 },
  uint8: { qmax: 127, dataType: DT.UINT8, zeroPoint: 128 },
});

export const WEIGHT_FORMAT_NAMES: readonly WeightFormat[] = Object.freeze(
  Object.keys(WEIGHT_FORMATS) as WeightFormat[],
);

export interface QuantizeOptions {
  /** Default `int8`; see {@link WeightFormat}. */
  readonly weights?: WeightFormat;
  /**
   * Format of depthwise convs' weights (group = channels > 1); default `weights`. ORT runs
   * them with a direct kernel rather than the matrix product that can saturate.
   */
  readonly depthwise?: WeightFormat;
  /**
   * Format of the other weighted ops whose output is not clipped by a Relu/Clip (in
   * MobileNetV2 the linear-bottleneck "project" convs, the layers int7 hurts most);
   * default `weights`.
   */
  readonly linear?: WeightFormat;
}

/** Ops whose weights become int8, with the input that holds them and its output-channel axis. */
const WEIGHTED_OPS: Readonly<Record<string, (node: NodeProto) => number>> = Object.freeze({
  Conv: () => 0,
  // Gemm computes A·Bᵀ when transB = 1: B is [N, K], output channels on axis 0.
  Gemm: (node) => (attrInt(node, 'transB', 0) === 1 ? 0 : 1),
  MatMul: () => 1,
});

/** Activations that ORT folds into the QuantizeLinear after a quantised op. */
const CLIPS: ReadonlySet<string> = new Set(['Relu', 'Clip']);

// ---------------------------------------------------------------------------------------
// Reading the graph

/** Decodes a serialized model; int64 fields (dims, attribute ints) become plain numbers. */
function decodeModel(bytes: Uint8Array): ModelProto {
  try {
    return onnx.ModelProto.decode(bytes);
  } catch (err) {
    throw new FinetuneError(
      `Expected a serialized ONNX model to quantize: ${(err as Error).message}`,
      {
        cause: err,
        exitCode: 1,
      },
    );
  }
}

function num(v: unknown): number {
  return typeof v === 'number' ? v : Number((v as { toString(): string }).toString());
}

function attrInt(node: NodeProto, name: string, fallback: number): number {
  const a = node.attribute?.find((x) => x.name === name);
  return a?.i == null ? fallback : num(a.i);
}

function dimsOf(t: TensorProto): number[] {
  return (t.dims ?? []).map(num);
}

/** The float values of an initializer (raw little-endian bytes or `floatData`). */
function floatsOf(t: TensorProto): Float32Array {
  if (t.dataType !== DT.FLOAT)
    throw new FinetuneError(`Expected float initializer '${t.name}'`, { exitCode: 1 });
  const raw = t.rawData;
  if (raw?.length) {
    // Copied into a buffer of its own: decoded rawData is a view (a Node Buffer's slice()
    // would be one too) at an offset that need not be a multiple of 4.
    return new Float32Array(Uint8Array.from(raw).buffer);
  }
  return Float32Array.from(t.floatData ?? []);
}

interface GraphIndex {
  readonly graph: GraphProto;
  readonly nodes: readonly NodeProto[];
  readonly initializers: ReadonlyMap<string, TensorProto>;
  readonly consumers: ReadonlyMap<string, NodeProto[]>;
  readonly inputs: ReadonlySet<string>;
  readonly outputs: ReadonlySet<string>;
}

function indexGraph(model: ModelProto): GraphIndex {
  const graph = model.graph;
  if (!graph?.node?.length)
    throw new FinetuneError('Expected an ONNX model with a graph to quantize', { exitCode: 1 });
  const initializers = new Map((graph.initializer ?? []).map((t) => [t.name!, t]));
  const consumers = new Map<string, NodeProto[]>();
  for (const node of graph.node) {
    for (const name of node.input ?? []) {
      if (!name) continue;
      const list = consumers.get(name);
      if (list) list.push(node);
      else consumers.set(name, [node]);
    }
  }
  return {
    graph,
    nodes: graph.node,
    initializers,
    consumers,
    inputs: new Set((graph.input ?? []).map((v) => v.name!).filter((n) => !initializers.has(n))),
    outputs: new Set((graph.output ?? []).map((v) => v.name!)),
  };
}

/** What the quantised graph changes: the ops that get int8 weights and the tensors that get Q/DQ. */
interface QuantPlan {
  /** Weighted ops, by node, with their weights' output-channel axis. */
  readonly weighted: ReadonlyMap<NodeProto, number>;
  /** Weighted ops whose output goes on unclipped (no Relu/Clip folded after them). */
  readonly linear: ReadonlySet<NodeProto>;
  /** Activation tensors that pass through uint8, in graph order. */
  readonly tensors: readonly string[];
}

function planQuantization(g: GraphIndex): QuantPlan {
  const weighted = new Map<NodeProto, number>();
  const linear = new Set<NodeProto>();
  const quantized: NodeProto[] = [];
  const isInit = (name: string | undefined): boolean =>
    !!name && g.initializers.get(name)?.dataType === DT.FLOAT;
  for (const node of g.nodes) {
    const ins = node.input ?? [];
    const axis = WEIGHTED_OPS[node.opType ?? ''];
    if (axis) {
      const w = g.initializers.get(ins[1] ?? '');
      const rank = w ? dimsOf(w).length : 0;
      const okWeight = isInit(ins[1]) && !isInit(ins[0]) && rank >= 2;
      const okBias =
        !ins[2] || (isInit(ins[2]) && dimsOf(g.initializers.get(ins[2])!).length === 1);
      const plain =
        node.opType !== 'Gemm' ||
        (attrInt(node, 'transA', 0) === 0 &&
          (node.attribute ?? []).every(
            (a) => (a.name !== 'alpha' && a.name !== 'beta') || a.f === 1,
          ));
      if (okWeight && okBias && plain && (node.opType !== 'MatMul' || rank === 2)) {
        weighted.set(node, axis(node));
        quantized.push(node);
      }
    } else if (node.opType === 'Add' && ins.length === 2 && !ins.some(isInit)) {
      quantized.push(node);
    }
  }
  const tensors = new Set<string>();
  for (const node of quantized) {
    const ins = node.input ?? [];
    const activations = node.opType === 'Add' ? ins : [ins[0]!];
    for (const name of activations) tensors.add(name);
    const out = node.output![0]!;
    const next = g.consumers.get(out) ?? [];
    const clip = next.length === 1 && !g.outputs.has(out) ? next[0]! : null;
    const folds =
      clip &&
      CLIPS.has(clip.opType ?? '') &&
      (clip.input ?? []).slice(1).every((n) => !n || g.initializers.has(n));
    tensors.add(folds ? clip.output![0]! : out);
    if (!folds && weighted.has(node)) linear.add(node);
  }
  // Graph order: each tensor's Q/DQ pair goes right after its producer.
  const order = new Map<string, number>();
  for (const name of g.inputs) order.set(name, -1);
  g.nodes.forEach((node, i) => {
    for (const out of node.output ?? []) order.set(out, i);
  });
  return {
    weighted,
    linear,
    tensors: [...tensors].sort((a, b) => (order.get(a) ?? 0) - (order.get(b) ?? 0)),
  };
}

// ---------------------------------------------------------------------------------------
// Calibration

/**
 * The activation tensors {@link quantizeQdq} will quantise, in graph order: what a
 * calibration pass must observe.
 */
export function quantizedTensors(floatModel: Uint8Array): string[] {
  return [...planQuantization(indexGraph(decodeModel(floatModel))).tensors];
}

export interface CalibratorOptions {
  /** Square input size in pixels (the graph input is [N, 3, size, size]). */
  readonly inputSize: number;
  /** ONNX Runtime intra-op threads; default os.availableParallelism(). */
  readonly threads?: number;
}

/**
 * Runs the float graph with every tensor to be quantised added as a graph output, and
 * keeps each one's min/max over all images it sees. It is a {@link FrozenModel} (its rows
 * are the float graph's own output), so `embedFiles` can feed it training images with the
 * toolkit's decoding and preprocessing.
 *
 * @example
 *   const calibrator = await Calibrator.create(floatBytes, { inputSize: 224 });
 *   await embedFiles(trainPaths.slice(0, 300), calibrator);
 *   const int8 = quantizeQdq(floatBytes, calibrator.ranges());
 *   await calibrator.dispose();
 */
export class Calibrator implements FrozenModel {
  readonly engine = 'onnx' as const;
  readonly layout = 'nchw' as const;
  readonly inputSize: number;
  readonly outputSize: number;
  private readonly observed = new Map<string, { min: number; max: number }>();
  private disposed = false;

  private constructor(
    private readonly session: ort.InferenceSession,
    private readonly tensors: readonly string[],
    private readonly input: string,
    private readonly output: string,
    inputSize: number,
    outputSize: number,
  ) {
    this.inputSize = inputSize;
    this.outputSize = outputSize;
  }

  static async create(floatModel: Uint8Array, options: CalibratorOptions): Promise<Calibrator> {
    const { inputSize, threads } = sessionSize(options);
    const model = decodeModel(floatModel);
    const g = indexGraph(model);
    const tensors = planQuantization(g).tensors;
    const input = [...g.inputs][0];
    const output = model.graph!.output?.[0]?.name;
    if (g.inputs.size !== 1 || !input || !output) {
      throw new FinetuneError('Expected an ONNX model with one input and an output to calibrate', {
        exitCode: 1,
      });
    }
    // A graph input cannot also be a graph output: its range is taken from the batch itself.
    const extra = tensors.filter((t) => !g.inputs.has(t) && !g.outputs.has(t));
    model.graph!.output = [
      ...(model.graph!.output ?? []),
      ...extra.map((name) => ({ name, type: { tensorType: { elemType: DT.FLOAT } } })),
    ];
    const session = await openOrtSession(onnx.ModelProto.encode(model).finish(), threads);
    const probe = await session.run({
      [input]: float32Tensor(new Float32Array(3 * inputSize ** 2), [1, 3, inputSize, inputSize]),
    });
    const outputSize = probe[output]!.dims.slice(1).reduce((a, d) => a * d, 1);
    return new Calibrator(session, tensors, input, output, inputSize, outputSize);
  }

  async run(batch: Float32Array, n: number): Promise<Float32Array> {
    const per = checkBatch(batch, n, this.inputSize, this.disposed, 'The calibrator');
    const s = this.inputSize;
    const pixels = batch.subarray(0, n * per);
    const out = await this.session.run({
      [this.input]: float32Tensor(pixels, [n, 3, s, s]),
    });
    for (const name of this.tensors) {
      this.observe(name, name === this.input ? pixels : (out[name]!.data as Float32Array));
    }
    return (out[this.output]!.data as Float32Array).slice(0, n * this.outputSize);
  }

  private observe(name: string, data: Float32Array): void {
    let lo = Infinity;
    let hi = -Infinity;
    for (let i = 0; i < data.length; i++) {
      const v = data[i]!;
      if (v < lo) lo = v;
      if (v > hi) hi = v;
    }
    const seen = this.observed.get(name);
    if (!seen) this.observed.set(name, { min: lo, max: hi });
    else {
      seen.min = Math.min(seen.min, lo);
      seen.max = Math.max(seen.max, hi);
    }
  }

  /** Min/max of each tensor over every image run so far. */
  ranges(): ActivationRanges {
    if (!this.observed.size) {
      throw new FinetuneError('Expected the calibrator to have run on at least one image', {
        exitCode: 1,
      });
    }
    return new Map([...this.observed].map(([k, v]) => [k, { min: v.min, max: v.max }]));
  }

  async dispose(): Promise<void> {
    if (this.disposed) return;
    this.disposed = true;
    await this.session.release();
  }
}

// ---------------------------------------------------------------------------------------
// Quantisation parameters

/** uint8 scale and zero point for a range; the range is widened to hold 0, so zero pads stay exact. */
export function activationParams(range: ActivationRange): { scale: number; zeroPoint: number } {
  const lo = Math.min(0, range.min);
  const hi = Math.max(0, range.max);
  if (!Number.isFinite(lo) || !Number.isFinite(hi)) {
    throw new FinetuneError(
      `Expected a finite activation range but received [${range.min}, ${range.max}]`,
      {
        exitCode: 1,
      },
    );
  }
  if (hi === lo) return { scale: 1, zeroPoint: 0 };
  // Math.fround: ORT computes with the float32 scale, so the zero point must fit that one.
  const scale = Math.fround((hi - lo) / 255);
  return { scale, zeroPoint: Math.min(255, Math.max(0, Math.round(-lo / scale))) };
}

/**
 * Symmetric per-channel integer weights in −qmax…qmax: `values` laid out as `dims`,
 * channels along `axis`; scale of a channel = max |w| / qmax (1 for an all-zero channel).
 */
export function quantizeWeights(
  values: Float32Array,
  dims: readonly number[],
  axis: number,
  qmax = 127,
): { q: Int8Array; scales: Float32Array } {
  const channels = dims[axis]!;
  const inner = dims.slice(axis + 1).reduce((a, d) => a * d, 1);
  const channelOf = (i: number): number => Math.floor(i / inner) % channels;
  const absMax = new Float32Array(channels);
  for (let i = 0; i < values.length; i++) {
    const c = channelOf(i);
    absMax[c] = Math.max(absMax[c]!, Math.abs(values[i]!));
  }
  const scales = absMax.map((m) => (m > 0 ? m / qmax : 1));
  const q = new Int8Array(values.length);
  for (let i = 0; i < values.length; i++) {
    const v = Math.round(values[i]! / scales[channelOf(i)]!);
    q[i] = Math.max(-qmax, Math.min(qmax, v));
  }
  return { q, scales };
}

// ---------------------------------------------------------------------------------------
// Writing the QDQ graph

class Names {
  private readonly used = new Set<string>();
  constructor(g: GraphIndex) {
    for (const n of g.initializers.keys()) this.used.add(n);
    for (const n of g.inputs) this.used.add(n);
    for (const node of g.nodes) {
      for (const n of [...(node.input ?? []), ...(node.output ?? []), node.name ?? ''])
        this.used.add(n);
    }
  }
  unique(base: string): string {
    let name = base;
    for (let k = 1; this.used.has(name); k++) name = `${base}_${k}`;
    this.used.add(name);
    return name;
  }
}

function tensor(
  name: string,
  dataType: number,
  dims: readonly number[],
  data: ArrayBufferView,
): TensorProto {
  // rawData is little-endian, which is what typed arrays hold on x86 and ARM.
  const rawData = new Uint8Array(
    data.buffer.slice(data.byteOffset, data.byteOffset + data.byteLength),
  );
  return { name, dataType, dims: [...dims], rawData };
}

function qdqNode(
  names: Names,
  type: 'QuantizeLinear' | 'DequantizeLinear',
  inputs: string[],
  output: string,
  axis?: number,
): NodeProto {
  return {
    opType: type,
    name: names.unique(`${output}_${type}`),
    input: inputs,
    output: [output],
    attribute: axis === undefined ? [] : [{ name: 'axis', type: ATTR.INT, i: axis }],
  };
}

/**
 * Returns the QDQ copy of a lowered float model (see the top of this file) for the
 * activation ranges of {@link Calibrator.ranges}. The input and output keep their names,
 * types and shapes: it is a drop-in for `OnnxFrozenModel.create`.
 *
 * @throws FinetuneError when a tensor to quantise has no range.
 * @example
 *   const int8 = quantizeQdq(lowerToOnnx(backbone.model!), calibrator.ranges());
 *   const frozen = await OnnxFrozenModel.create(int8, { inputSize: 224 });
 */
export function quantizeQdq(
  floatModel: Uint8Array,
  ranges: ActivationRanges,
  options: QuantizeOptions = {},
): Uint8Array {
  const format = weightFormat('weights', options.weights ?? 'int8');
  const depthwise = weightFormat('depthwise', options.depthwise ?? options.weights ?? 'int8');
  const linear = weightFormat('linear', options.linear ?? options.weights ?? 'int8');
  const model = decodeModel(floatModel);
  const g = indexGraph(model);
  const plan = planQuantization(g);
  const names = new Names(g);
  const initializers: TensorProto[] = [];
  /** Per quantised tensor: the name its consumers read (float, dequantised) and its scale. */
  const params = new Map<string, { scale: number; dq: string }>();
  const before = new Map<string, NodeProto[]>(); // graph input → its Q/DQ (at the start)
  const after = new Map<string, NodeProto[]>(); // node output → its Q/DQ
  const renamed = new Map<string, string>(); // a producer's float output, renamed

  for (const t of plan.tensors) {
    const range = ranges.get(t);
    if (!range) {
      throw new FinetuneError(`Expected a calibrated range for tensor '${t}' but none was given`, {
        exitCode: 1,
      });
    }
    const { scale, zeroPoint } = activationParams(range);
    const s = names.unique(`${t}_scale`);
    const z = names.unique(`${t}_zero_point`);
    initializers.push(tensor(s, DT.FLOAT, [], Float32Array.of(scale)));
    initializers.push(tensor(z, DT.UINT8, [], Uint8Array.of(zeroPoint)));
    const q = names.unique(`${t}_quantized`);
    if (g.inputs.has(t)) {
      // A graph input keeps its name: its consumers read a new dequantised tensor.
      const dq = names.unique(`${t}_dequantized`);
      before.set(t, [
        qdqNode(names, 'QuantizeLinear', [t, s, z], q),
        qdqNode(names, 'DequantizeLinear', [q, s, z], dq),
      ]);
      params.set(t, { scale, dq });
    } else {
      // A node output keeps its name for its consumers (and the graph output): the producer
      // writes a renamed float tensor that the Q/DQ pair turns back into `t`.
      const raw = names.unique(`${t}_float`);
      renamed.set(t, raw);
      after.set(t, [
        qdqNode(names, 'QuantizeLinear', [raw, s, z], q),
        qdqNode(names, 'DequantizeLinear', [q, s, z], t),
      ]);
      params.set(t, { scale, dq: t });
    }
  }

  const readName = (name: string): string =>
    g.inputs.has(name) ? (params.get(name)?.dq ?? name) : name;
  const nodes: NodeProto[] = [...before.values()].flat();
  const dropped = new Set<string>();
  for (const node of g.nodes) {
    const input = (node.input ?? []).map(readName);
    const axis = plan.weighted.get(node);
    if (axis !== undefined) {
      const f =
        node.opType === 'Conv' && isDepthwise(node, g)
          ? depthwise
          : plan.linear.has(node)
            ? linear
            : format;
      nodes.push(...quantizeWeightInputs(node, input, axis, f, g, params, names, initializers));
      for (const n of (node.input ?? []).slice(1)) if (n) dropped.add(n);
    }
    const output = (node.output ?? []).map((o) => renamed.get(o) ?? o);
    const attribute =
      node.opType === 'Gemm' && axis !== undefined && input[2]
        ? // ORT's QDQ Gemm selector reads `beta` and requires 1.
          [
            ...(node.attribute ?? []).filter((a) => a.name !== 'beta'),
            { name: 'beta', type: ATTR.FLOAT, f: 1 },
          ]
        : node.attribute;
    nodes.push({ ...node, input, output, attribute: attribute ?? [] });
    for (const o of node.output ?? []) nodes.push(...(after.get(o) ?? []));
  }
  // Float weights no node reads any more are left out.
  const stillRead = new Set(nodes.flatMap((n) => n.input ?? []));
  const kept = (model.graph!.initializer ?? []).filter(
    (t) => !dropped.has(t.name!) || stillRead.has(t.name!),
  );
  model.graph!.node = nodes;
  model.graph!.initializer = [...kept, ...initializers];
  return onnx.ModelProto.encode(model).finish();
}

function weightFormat(name: string, value: unknown): (typeof WEIGHT_FORMATS)[WeightFormat] {
  if (typeof value !== 'string' || !Object.hasOwn(WEIGHT_FORMATS, value)) {
    throw invalidOption(name, `one of ${WEIGHT_FORMAT_NAMES.join(', ')}`, value);
  }
  return WEIGHT_FORMATS[value as WeightFormat];
}

/** A Conv with one input channel per group and more than one group. */
function isDepthwise(node: NodeProto, g: GraphIndex): boolean {
  const group = attrInt(node, 'group', 1);
  const w = g.initializers.get(node.input![1]!)!;
  return group > 1 && dimsOf(w)[1] === 1;
}

/** DequantizeLinear nodes for a weighted op's int8 weight and int32 bias; rewrites `input`. */
function quantizeWeightInputs(
  node: NodeProto,
  input: string[],
  axis: number,
  format: (typeof WEIGHT_FORMATS)[WeightFormat],
  g: GraphIndex,
  params: ReadonlyMap<string, { scale: number }>,
  names: Names,
  initializers: TensorProto[],
): NodeProto[] {
  const base = node.name || node.output![0]!;
  const w = g.initializers.get(node.input![1]!)!;
  const dims = dimsOf(w);
  const { q, scales } = quantizeWeights(floatsOf(w), dims, axis, format.qmax);
  const channels = scales.length;
  const wq = names.unique(`${base}_W_quantized`);
  const ws = names.unique(`${base}_W_scale`);
  const wz = names.unique(`${base}_W_zero_point`);
  const wdq = names.unique(`${base}_W_dequantized`);
  const shift = format.zeroPoint;
  const stored = shift ? Uint8Array.from(q, (v) => v + shift) : q;
  const zero = shift ? new Uint8Array(channels).fill(shift) : new Int8Array(channels);
  initializers.push(tensor(wq, format.dataType, dims, stored));
  initializers.push(tensor(ws, DT.FLOAT, [channels], scales));
  initializers.push(tensor(wz, format.dataType, [channels], zero));
  const out = [qdqNode(names, 'DequantizeLinear', [wq, ws, wz], wdq, axis)];
  input[1] = wdq;
  const biasName = node.input![2];
  if (biasName) {
    const bias = floatsOf(g.initializers.get(biasName)!);
    const xScale = params.get(node.input![0]!)!.scale;
    const bs = scales.map((s) => Math.fround(xScale * s));
    const bq = Int32Array.from(bias, (b, c) =>
      Math.max(-2147483647, Math.min(2147483647, Math.round(b / bs[c]!))),
    );
    const bqName = names.unique(`${base}_B_quantized`);
    const bsName = names.unique(`${base}_B_scale`);
    const bzName = names.unique(`${base}_B_zero_point`);
    const bdq = names.unique(`${base}_B_dequantized`);
    initializers.push(tensor(bqName, DT.INT32, [bias.length], bq));
    initializers.push(tensor(bsName, DT.FLOAT, [bias.length], bs));
    initializers.push(tensor(bzName, DT.INT32, [bias.length], new Int32Array(bias.length)));
    out.push(qdqNode(names, 'DequantizeLinear', [bqName, bsName, bzName], bdq, 0));
    input[2] = bdq;
  }
  return out;
}
