import type * as tf from '@tensorflow/tfjs';
import onnxProto from 'onnx-proto';
import { FinetuneError } from '../../errors.js';

/**
 * How each Keras layer becomes ONNX nodes: one row per Keras class name in
 * {@link LAYER_LOWERINGS}, one per activation name in {@link ACTIVATION_LOWERINGS}, and
 * what the rows share (the graph builder, the NHWC→NCHW layout rules, weight rewriting).
 * A new layer is a new row plus its case in test/engine/onnx-lower.test.ts.
 *
 * Layout: every 4-D Keras tensor [N, H, W, C] lives in the graph as [N, C, H, W]; tensors
 * of other ranks keep the Keras layout.
 */

// onnx-proto is CommonJS: its root object is the default export under Node's ESM loader.
const { onnx } = onnxProto;
type NodeProto = onnxProto.onnx.INodeProto;
type TensorProto = onnxProto.onnx.ITensorProto;
type AttributeProto = onnxProto.onnx.IAttributeProto;

const FLOAT = onnx.TensorProto.DataType.FLOAT;
const INT64 = onnx.TensorProto.DataType.INT64;
const ATTR = onnx.AttributeProto.AttributeType;

/** A layer (or a configuration of it) the lowering does not cover. */
export class UnsupportedLayerError extends FinetuneError {
  readonly layerName: string;
  readonly className: string;
  constructor(layerName: string, className: string, reason = 'unsupported layer type') {
    // Exit code 1: a limit of the toolkit, not bad input.
    super(`Cannot lower layer '${layerName}' (${className}) to ONNX: ${reason}`, { exitCode: 1 });
    this.name = 'UnsupportedLayerError';
    this.layerName = layerName;
    this.className = className;
  }
}

// ---------------------------------------------------------------------------------------
// Graph building

/** A lowered tensor. */
export interface Value {
  readonly name: string;
  /** Keras shape without the batch dimension (so [H, W, C] for an image tensor). */
  readonly dims: readonly number[];
  /**
   * ZeroPadding2D pads [top, left, bottom, right] not yet applied: the consumer (a conv or
   * a valid average pool) adds them to its own pads instead of running a Pad node.
   */
  readonly pads?: readonly [number, number, number, number];
}

type Attr =
  | { readonly i: number }
  | { readonly f: number }
  | { readonly ints: readonly number[] }
  | { readonly s: string };

export class GraphBuilder {
  readonly nodes: NodeProto[] = [];
  readonly initializers: TensorProto[] = [];
  private readonly used: Set<string>;

  /** `reserved`: names no node or initializer may take (the graph's input and output). */
  constructor(reserved: readonly string[]) {
    this.used = new Set(reserved);
  }

  unique(base: string): string {
    let name = base;
    for (let k = 1; this.used.has(name); k++) name = `${base}_${k}`;
    this.used.add(name);
    return name;
  }

  floats(base: string, data: Float32Array, dims: readonly number[]): string {
    const name = this.unique(base);
    // rawData is little-endian float32, which is what a typed array holds on x86 and ARM.
    const raw = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
    this.initializers.push({ name, dataType: FLOAT, dims: [...dims], rawData: raw });
    return name;
  }

  scalar(base: string, value: number): string {
    return this.floats(base, Float32Array.of(value), []);
  }

  int64s(base: string, values: readonly number[]): string {
    const name = this.unique(base);
    const data = BigInt64Array.from(values, (v) => BigInt(v));
    const raw = new Uint8Array(data.buffer);
    this.initializers.push({ name, dataType: INT64, dims: [values.length], rawData: raw });
    return name;
  }

  /** Adds a one-output node; returns the output name. */
  op(
    type: string,
    inputs: readonly string[],
    attrs: Record<string, Attr> = {},
    base = type,
  ): string {
    const out = this.unique(base);
    this.opTo(out, type, inputs, attrs);
    return out;
  }

  opTo(
    out: string,
    type: string,
    inputs: readonly string[],
    attrs: Record<string, Attr> = {},
  ): void {
    const attribute: AttributeProto[] = Object.entries(attrs).map(([name, a]) => {
      // ORT rejects an attribute without its type, so every branch sets it.
      if ('i' in a) return { name, type: ATTR.INT, i: a.i };
      if ('f' in a) return { name, type: ATTR.FLOAT, f: a.f };
      if ('ints' in a) return { name, type: ATTR.INTS, ints: [...a.ints] };
      // `s` is a bytes field: protobufjs would read a JS string as base64.
      return { name, type: ATTR.STRING, s: new TextEncoder().encode(a.s) };
    });
    this.nodes.push({ opType: type, name: out, input: [...inputs], output: [out], attribute });
  }
}

/** Shape of a Keras tensor (dims without batch) in the graph: 4-D tensors are channels-first. */
export function onnxDims(dims: readonly number[]): number[] {
  return dims.length === 3 ? [dims[2]!, dims[0]!, dims[1]!] : [...dims];
}

/** Graph axis of Keras axis `axis` of a rank-`rank` tensor (batch included). */
function onnxAxis(axis: number, rank: number): number {
  const a = axis < 0 ? axis + rank : axis;
  return rank === 4 ? ([0, 2, 3, 1] as const)[a]! : a;
}

/** For each Keras axis, the graph axis holding it. */
function kerasToOnnxAxes(rank: number): number[] {
  return Array.from({ length: rank }, (_, a) => onnxAxis(a, rank));
}

/** Graph axis order that turns a graph tensor of rank `rank` into its Keras order. */
function toKerasPerm(rank: number): number[] {
  return kerasToOnnxAxes(rank);
}

/** Graph axis order that turns a Keras-ordered tensor into the graph layout. */
function fromKerasPerm(rank: number): number[] {
  return rank === 4 ? [0, 3, 1, 2] : Array.from({ length: rank }, (_, a) => a);
}

/** True when transposing `shape` by `perm` keeps the data order (only size-1 axes move). */
function isDataNoop(shape: readonly number[], perm: readonly number[]): boolean {
  const moving = perm.filter((a) => shape[a] !== 1);
  return moving.every((a, i) => i === 0 || a > moving[i - 1]!);
}

// ---------------------------------------------------------------------------------------
// The tfjs graph as the rows see it

export type Layer = tf.layers.Layer;
export type SymbolicTensor = tf.SymbolicTensor;
export interface GraphNode {
  readonly inputTensors: SymbolicTensor[];
  readonly outputTensors: SymbolicTensor[];
}
export interface Use {
  readonly layer: Layer;
  readonly node: GraphNode;
}

/** What a row may ask of the (sub)graph being lowered around its layer. */
export interface GraphContext {
  /** The one layer reading `t`, if exactly one does (a graph output counts as a reader). */
  soleUse(t: SymbolicTensor): Use | null;
  /** Applies pending ZeroPadding2D pads with a Pad node. */
  materialize(v: Value): Value;
  /** Marks the BatchNormalization `node` as folded into the op whose output is `value`. */
  absorb(node: GraphNode, value: Value): void;
  /** Lowers the graph from `inputs` (given as `ins`) to `outputs`: a nested model. */
  lowerSubgraph(
    inputs: readonly SymbolicTensor[],
    ins: readonly Value[],
    outputs: readonly SymbolicTensor[],
  ): Value[];
}

/** One application of a layer, as its row receives it. */
export interface LayerContext {
  readonly layer: Layer;
  readonly node: GraphNode;
  readonly cfg: Config;
  /** `layer.name`: the base of the names of the nodes and initializers it emits. */
  readonly name: string;
  /** The lowered inputs; pending pads are already applied unless the row takes them. */
  readonly ins: readonly Value[];
  /** The first input. */
  readonly x: Value;
  /** Rank of `x`, batch included. */
  readonly rank: number;
  /** Static Keras shape of the (first) output, without the batch dimension. */
  readonly dims: number[];
  readonly b: GraphBuilder;
  readonly graph: GraphContext;
  /** `[{ name, dims }]`: the layer's one output, named `name`. */
  out(name: string): Value[];
  /** Throws the {@link UnsupportedLayerError} for this layer. */
  fail(reason?: string): never;
}

/** How one Keras layer class becomes ONNX nodes. */
export interface LayerLowering {
  /** Emits the nodes of one application of the layer; returns its outputs. */
  readonly lower: (c: LayerContext) => Value[];
  /** Whether the layer adds a ZeroPadding2D's pads to its own instead of a Pad node. */
  readonly takesPads?: (cfg: Config) => boolean;
}

// ---------------------------------------------------------------------------------------
// Layer configs and weights

export type Config = Record<string, unknown>;

/** A layer's config; {} for a custom layer whose getConfig throws (it is unsupported anyway). */
export function config(layer: Layer): Config {
  try {
    return layer.getConfig() as Config;
  } catch {
    return {};
  }
}

function pair(v: unknown, fallback: number): [number, number] {
  if (v == null) return [fallback, fallback];
  if (typeof v === 'number') return [v, v];
  const a = v as number[];
  return [a[0]!, a[1] ?? a[0]!];
}

/** A copy of a weight, found by its Keras name ('kernel', 'bias', 'gamma', ...). */
function weight(layer: Layer, key: string): Float32Array | null {
  // getWeights() returns the layer's live variables: read them, never dispose them.
  const values = layer.getWeights();
  const i = layer.weights.findIndex((w) => w.originalName.split('/').pop() === key);
  if (i < 0) return null;
  // Copy: on the cpu backend dataSync() hands out the variable's own buffer, and
  // folding rewrites the array in place.
  return (values[i]!.dataSync() as Float32Array).slice();
}

function requireWeight(layer: Layer, key: string): Float32Array {
  const w = weight(layer, key);
  if (!w) throw new UnsupportedLayerError(layer.name, layer.getClassName(), `no '${key}' weight`);
  return w;
}

/** Per-channel inference BatchNormalization as y = x * scale + shift. */
function bnAffine(layer: Layer): { scale: Float32Array; shift: Float32Array } {
  const cfg = config(layer);
  const mean = requireWeight(layer, 'moving_mean');
  const variance = requireWeight(layer, 'moving_variance');
  const gamma = cfg['scale'] === false ? null : requireWeight(layer, 'gamma');
  const beta = cfg['center'] === false ? null : requireWeight(layer, 'beta');
  const eps = (cfg['epsilon'] as number | undefined) ?? 1e-3;
  const scale = new Float32Array(mean.length);
  const shift = new Float32Array(mean.length);
  for (let c = 0; c < mean.length; c++) {
    // In float64, rounded to float32 once.
    const s = (gamma ? gamma[c]! : 1) / Math.sqrt(variance[c]! + eps);
    scale[c] = s;
    shift[c] = (beta ? beta[c]! : 0) - mean[c]! * s;
  }
  return { scale, shift };
}

/** TF 'same' padding of one spatial dim: the extra pixel goes after (bottom/right). */
function samePads(size: number, k: number, stride: number, dilation: number): [number, number] {
  const effective = (k - 1) * dilation + 1;
  const total = Math.max((Math.ceil(size / stride) - 1) * stride + effective - size, 0);
  const before = Math.floor(total / 2);
  return [before, total - before];
}

// ---------------------------------------------------------------------------------------
// What the rows share

interface ConvSpec {
  readonly kernel: [number, number];
  readonly strides: [number, number];
  readonly dilations: [number, number];
  readonly padding: string;
  readonly group: number;
}

/** A 1×1 conv: the pointwise half of SeparableConv2D, Dense on an image tensor. */
const POINTWISE: ConvSpec = {
  kernel: [1, 1],
  strides: [1, 1],
  dilations: [1, 1],
  padding: 'valid',
  group: 1,
};

/** The conv geometry in the layer's config; `group` is ONNX's. */
function convSpec(c: LayerContext, group: number): ConvSpec {
  const { cfg } = c;
  const padding = (cfg['padding'] as string | undefined) ?? 'valid';
  if (padding !== 'same' && padding !== 'valid') c.fail(`'${padding}' padding is not supported`);
  return {
    kernel: pair(cfg['kernelSize'], 1),
    strides: pair(cfg['strides'], 1),
    dilations: pair(cfg['dilationRate'], 1),
    padding,
    group,
  };
}

/** Conv/pool attributes, with 'same' pads made explicit and pending ZeroPadding2D pads added. */
function convAttrs(x: Value, spec: ConvSpec): Record<string, Attr> {
  const [t0, l0, b0, r0] = x.pads ?? [0, 0, 0, 0];
  let ph: [number, number] = [0, 0];
  let pw: [number, number] = [0, 0];
  if (spec.padding === 'same') {
    // x.dims is the (padded) input size Keras used for its own 'same' arithmetic.
    ph = samePads(x.dims[0]!, spec.kernel[0], spec.strides[0], spec.dilations[0]);
    pw = samePads(x.dims[1]!, spec.kernel[1], spec.strides[1], spec.dilations[1]);
  }
  // ONNX pads: [top, left, bottom, right]; asymmetric is fine (TF puts the extra one last).
  return {
    kernel_shape: { ints: spec.kernel },
    strides: { ints: spec.strides },
    dilations: { ints: spec.dilations },
    pads: { ints: [t0 + ph[0], l0 + pw[0], b0 + ph[1], r0 + pw[1]] },
    group: { i: spec.group },
  };
}

function conv(
  c: LayerContext,
  x: Value,
  spec: ConvSpec,
  w: Float32Array,
  wDims: readonly number[],
  bias: Float32Array | null,
  activation: string,
): Value {
  const attrs = convAttrs(x, spec);
  return affine(c, w, wDims, bias, activation, (wn, bn) =>
    c.b.op('Conv', bn ? [x.name, wn, bn] : [x.name, wn], attrs, c.name),
  );
}

/**
 * Emits a linear op whose weights have output channels first (Conv, Gemm with transB),
 * folding a following BatchNormalization into them when the op is its only input.
 */
function affine(
  c: LayerContext,
  w: Float32Array,
  wDims: readonly number[],
  bias: Float32Array | null,
  activation: string,
  emit: (w: string, b: string | null) => string,
): Value {
  const { b, dims, name } = c;
  const bn = activation === 'linear' ? foldableBn(c.graph, c.node.outputTensors[0]!) : null;
  if (bn) {
    const { scale, shift } = bnAffine(bn.layer);
    bias = foldScale(w, wDims[0]!, bias, scale, shift);
  }
  const wName = b.floats(`${name}_W`, w, wDims);
  const bName = bias ? b.floats(`${name}_B`, bias, [bias.length]) : null;
  const y = emitActivation(b, emit(wName, bName), activation, dims.length + 1, name);
  const value: Value = { name: y, dims };
  if (bn) c.graph.absorb(bn.node, value);
  return value;
}

function foldableBn(graph: GraphContext, t: SymbolicTensor): Use | null {
  const use = graph.soleUse(t);
  if (use?.layer.getClassName() !== 'BatchNormalization') return null;
  const rank = t.shape.length;
  const axis = config(use.layer)['axis'] as number;
  // Only a BN over the channels (the conv's output axis) folds into the weights.
  return axis === -1 || axis === rank - 1 ? use : null;
}

function clip(b: GraphBuilder, x: string, min: number, max: number, base: string): string {
  // Opset 13: min and max are inputs, not attributes.
  return b.op('Clip', [x, b.scalar(`${base}_min`, min), b.scalar(`${base}_max`, max)], {}, base);
}

/** Transposes a graph tensor by `perm` unless that keeps the data order. */
function transpose(b: GraphBuilder, x: Value, perm: readonly number[], base: string): string {
  if (isDataNoop([1, ...onnxDims(x.dims)], perm)) return x.name;
  return b.op('Transpose', [x.name], { perm: { ints: perm } }, base);
}

/** The layer's `activation` (default 'linear'), checked against the activation table. */
function activationOf(c: LayerContext): string {
  const name = (c.cfg['activation'] as string | undefined) ?? 'linear';
  if (!Object.hasOwn(ACTIVATION_LOWERINGS, name)) c.fail(`unsupported activation '${name}'`);
  return name;
}

/** Applies the activation `name` (one {@link activationOf} admitted) to graph tensor `x`. */
function emitActivation(
  b: GraphBuilder,
  x: string,
  name: string,
  rank: number,
  base: string,
): string {
  return ACTIVATION_LOWERINGS[name]!({
    b,
    x,
    rank,
    base,
    mul: (p, q) => b.op('Mul', [p, q], {}, base),
    k: (v) => b.scalar(`${base}_c`, v),
  });
}

// ---------------------------------------------------------------------------------------
// Activations

/** One activation applied to graph tensor `x` of rank `rank`; nodes are named after `base`. */
export interface ActivationContext {
  readonly b: GraphBuilder;
  readonly x: string;
  readonly rank: number;
  readonly base: string;
  /** Emits `p · q`. */
  mul(p: string, q: string): string;
  /** A float scalar initializer. */
  k(v: number): string;
}

export type ActivationLowering = (a: ActivationContext) => string;

function swish({ b, x, base, mul }: ActivationContext): string {
  return mul(x, b.op('Sigmoid', [x], {}, base));
}

/** Keras activation names (as tfjs serializes them) → their nodes. */
export const ACTIVATION_LOWERINGS: Readonly<Record<string, ActivationLowering>> = Object.freeze({
  linear: ({ x }) => x,
  relu: ({ b, x, base }) => b.op('Relu', [x], {}, base),
  relu6: ({ b, x, base }) => clip(b, x, 0, 6, base),
  elu: ({ b, x, base }) => b.op('Elu', [x], { alpha: { f: 1 } }, base),
  // tfjs constants; ONNX's defaults differ in the last float digits.
  selu: ({ b, x, base }) =>
    b.op('Selu', [x], { alpha: { f: 1.6732632423543772 }, gamma: { f: 1.0507009873554805 } }, base),
  sigmoid: ({ b, x, base }) => b.op('Sigmoid', [x], {}, base),
  // tfjs: clip(0.2x + 0.5, 0, 1), the ONNX defaults.
  hardSigmoid: ({ b, x, base }) =>
    b.op('HardSigmoid', [x], { alpha: { f: 0.2 }, beta: { f: 0.5 } }, base),
  tanh: ({ b, x, base }) => b.op('Tanh', [x], {}, base),
  softplus: ({ b, x, base }) => b.op('Softplus', [x], {}, base),
  softsign: ({ b, x, base }) => b.op('Softsign', [x], {}, base),
  softmax: ({ b, x, rank, base }) =>
    b.op('Softmax', [x], { axis: { i: onnxAxis(-1, rank) } }, base),
  logSoftmax: ({ b, x, rank, base }) =>
    b.op('LogSoftmax', [x], { axis: { i: onnxAxis(-1, rank) } }, base),
  swish,
  silu: swish,
  mish: ({ b, x, base, mul }) => mul(x, b.op('Tanh', [b.op('Softplus', [x], {}, base)], {}, base)),
  gelu: ({ b, x, base, mul, k }) => {
    // x · ½(1 + erf(x/√2)), as tfjs computes it.
    const erf = b.op('Erf', [mul(x, k(Math.SQRT1_2))], {}, base);
    return mul(x, mul(k(0.5), b.op('Add', [erf, k(1)], {}, base)));
  },
  gelu_new: ({ b, x, base, mul, k }) => {
    // ½x(1 + tanh(√(2/π)(x + 0.044715x³))).
    const cube = mul(mul(x, x), x);
    const inner = b.op('Add', [x, mul(cube, k(0.044715))], {}, base);
    const t = b.op('Tanh', [mul(inner, k(Math.sqrt(2 / Math.PI)))], {}, base);
    return mul(mul(x, k(0.5)), b.op('Add', [t, k(1)], {}, base));
  },
});

/** The activation names the lowering covers, sorted. */
export const LOWERABLE_ACTIVATIONS: readonly string[] = Object.freeze(
  Object.keys(ACTIVATION_LOWERINGS).sort(),
);

// ---------------------------------------------------------------------------------------
// Layers

function lowerNestedModel({ layer, ins, graph, fail }: LayerContext): Value[] {
  const inner = layer as unknown as tf.LayersModel;
  if (!Array.isArray(inner.inputs) || !Array.isArray(inner.outputs)) fail();
  return graph.lowerSubgraph(inner.inputs, ins, inner.outputs);
}

/** Layers that only act in training: the identity at inference. */
function passThrough({ x }: LayerContext): Value[] {
  return [x];
}

function lowerRescaling({ cfg, x, name, b, out, fail }: LayerContext): Value[] {
  const scale = cfg['scale'];
  const offset = cfg['offset'] ?? 0;
  if (typeof scale !== 'number' || typeof offset !== 'number') {
    fail('only scalar scale and offset are supported');
  }
  let y = x.name;
  if (scale !== 1) y = b.op('Mul', [y, b.scalar(`${name}_scale`, scale as number)], {}, name);
  if (offset !== 0) {
    y = b.op('Add', [y, b.scalar(`${name}_offset`, offset as number)], {}, name);
  }
  return out(y);
}

function lowerConv2D(c: LayerContext): Value[] {
  const { layer, cfg, x, fail } = c;
  const spec = convSpec(c, 1);
  const [kh, kw] = spec.kernel;
  const inC = x.dims[2]!;
  const outC = cfg['filters'] as number;
  if ((cfg['groups'] ?? 1) !== 1) fail('grouped Conv2D is not supported');
  const k = requireWeight(layer, 'kernel');
  const w = convWeights(k, kh, kw, inC, outC);
  const bias = cfg['useBias'] === false ? null : weight(layer, 'bias');
  return [conv(c, x, spec, w, [outC, inC, kh, kw], bias, activationOf(c))];
}

function lowerDepthwiseConv2D(c: LayerContext): Value[] {
  const { layer, cfg, x } = c;
  const inC = x.dims[2]!;
  const spec = convSpec(c, inC);
  const [kh, kw] = spec.kernel;
  const mult = (cfg['depthMultiplier'] as number | undefined) ?? 1;
  const w = depthwiseWeights(requireWeight(layer, 'depthwise_kernel'), kh, kw, inC, mult);
  const bias = cfg['useBias'] === false ? null : weight(layer, 'bias');
  const d = [inC * mult, 1, kh, kw];
  return [conv(c, x, spec, w, d, bias, activationOf(c))];
}

function lowerSeparableConv2D(c: LayerContext): Value[] {
  const { layer, cfg, x, dims, name, b } = c;
  const inC = x.dims[2]!;
  const spec = convSpec(c, inC);
  const [kh, kw] = spec.kernel;
  const mult = (cfg['depthMultiplier'] as number | undefined) ?? 1;
  const dw = depthwiseWeights(requireWeight(layer, 'depthwise_kernel'), kh, kw, inC, mult);
  const dwName = b.floats(`${name}_depthwise_W`, dw, [inC * mult, 1, kh, kw]);
  const mid = b.op('Conv', [x.name, dwName], convAttrs(x, spec), `${name}_depthwise`);
  // Pointwise kernel [1, 1, in·mult, out] → [out, in·mult, 1, 1].
  const pk = requireWeight(layer, 'pointwise_kernel');
  const m = inC * mult;
  const outC = cfg['filters'] as number;
  const pw = transpose2d(pk, m, outC);
  const bias = cfg['useBias'] === false ? null : weight(layer, 'bias');
  const midValue: Value = { name: mid, dims: [dims[0]!, dims[1]!, m] };
  return [conv(c, midValue, POINTWISE, pw, [outC, m, 1, 1], bias, activationOf(c))];
}

function lowerDense(c: LayerContext): Value[] {
  const { layer, cfg, x, rank, name, b, out } = c;
  const k = requireWeight(layer, 'kernel');
  const inC = x.dims[x.dims.length - 1]!;
  const units = cfg['units'] as number;
  const bias = cfg['useBias'] === false ? null : weight(layer, 'bias');
  if (rank === 2 || rank === 4) {
    // Keras kernel [in, units] → [units, in]: output channels first, like a conv.
    const wt = transpose2d(k, inC, units);
    if (rank === 4) {
      // Dense on [N, H, W, C] acts on channels: a 1×1 conv on NCHW.
      return [conv(c, x, POINTWISE, wt, [units, inC, 1, 1], bias, activationOf(c))];
    }
    return [
      affine(c, wt, [units, inC], bias, activationOf(c), (w, bn) =>
        b.op('Gemm', bn ? [x.name, w, bn] : [x.name, w], { transB: { i: 1 } }, name),
      ),
    ];
  }
  const kName = b.floats(`${name}_W`, k, [inC, units]);
  let y = b.op('MatMul', [x.name, kName], {}, name);
  if (bias) y = b.op('Add', [y, b.floats(`${name}_B`, bias, [units])], {}, name);
  return out(emitActivation(b, y, activationOf(c), rank, name));
}

/** A BatchNormalization not folded into the conv or dense before it. */
function lowerBatchNormalization({ layer, cfg, x, rank, name, b, out }: LayerContext): Value[] {
  const axis = onnxAxis(cfg['axis'] as number, rank);
  const { scale, shift } = bnAffine(layer);
  // Broadcast [C] along the graph axis: shape over the non-batch axes, C at `axis`.
  const shape = onnxDims(x.dims).map((_, i) => (i + 1 === axis ? scale.length : 1));
  const y = b.op('Mul', [x.name, b.floats(`${name}_scale`, scale, shape)], {}, name);
  return out(b.op('Add', [y, b.floats(`${name}_shift`, shift, shape)], {}, name));
}

function lowerActivation(c: LayerContext): Value[] {
  const { x, rank, name, b, out } = c;
  return out(emitActivation(b, x.name, activationOf(c), rank, name));
}

function lowerReLU({ cfg, x, name, b, out }: LayerContext): Value[] {
  // tfjs's ReLU layer reads only maxValue (negative_slope/threshold from a Keras
  // file are dropped by tfjs), so this matches what tfjs computes.
  const max = cfg['maxValue'] as number | null | undefined;
  if (max == null) return out(b.op('Relu', [x.name], {}, name));
  return out(clip(b, x.name, 0, max, name));
}

function lowerLeakyReLU({ cfg, x, name, b, out }: LayerContext): Value[] {
  return out(b.op('LeakyRelu', [x.name], { alpha: { f: (cfg['alpha'] as number) ?? 0.3 } }, name));
}

function lowerELU({ cfg, x, name, b, out }: LayerContext): Value[] {
  return out(b.op('Elu', [x.name], { alpha: { f: (cfg['alpha'] as number) ?? 1 } }, name));
}

function lowerThresholdedReLU({ cfg, x, name, b, out }: LayerContext): Value[] {
  return out(
    b.op('ThresholdedRelu', [x.name], { alpha: { f: (cfg['theta'] as number) ?? 1 } }, name),
  );
}

function lowerPReLU({ layer, x, name, b, out }: LayerContext): Value[] {
  const alpha = requireWeight(layer, 'alpha');
  const kerasShape = layer.weights.find((w) => w.originalName.endsWith('/alpha'))!
    .shape as number[];
  const slope = kerasShape.length === 3 ? hwcToChw(alpha, kerasShape) : alpha;
  const slopeName = b.floats(`${name}_slope`, slope, onnxDims(kerasShape));
  return out(b.op('PRelu', [x.name, slopeName], {}, name));
}

function lowerSoftmax({ cfg, x, rank, name, b, out, fail }: LayerContext): Value[] {
  let axis = cfg['axis'] as number | number[];
  if (Array.isArray(axis)) {
    if (axis.length !== 1) fail('softmax over several axes is not supported');
    axis = axis[0]!;
  }
  return out(b.op('Softmax', [x.name], { axis: { i: onnxAxis(axis, rank) } }, name));
}

/** A Keras merge layer as the elementwise ONNX op `op` over all its inputs. */
function elementwise(op: 'Add' | 'Mul' | 'Mean' | 'Max' | 'Min'): LayerLowering {
  return {
    lower: ({ ins, x, name, b, out, fail }) => {
      if (ins.some((v) => v.dims.length !== x.dims.length)) {
        fail('inputs of different ranks are not supported');
      }
      const names = ins.map((v) => v.name);
      if (op !== 'Add' && op !== 'Mul') return out(b.op(op, names, {}, name));
      // Binary Add rather than Sum: ORT's fusions (e.g. Conv+Add) look for Add.
      let y = names[0]!;
      for (const n of names.slice(1)) y = b.op(op, [y, n], {}, name);
      return out(y);
    },
  };
}

function lowerConcatenate({ cfg, ins, x, rank, name, b, out, fail }: LayerContext): Value[] {
  if (ins.some((v) => v.dims.length !== x.dims.length)) {
    fail('inputs of different ranks are not supported');
  }
  const axis = onnxAxis((cfg['axis'] as number | undefined) ?? -1, rank);
  const names = ins.map((v) => v.name);
  return out(b.op('Concat', names, { axis: { i: axis } }, name));
}

/** Hands its pads to the one layer reading it when that layer takes pads; else a Pad node. */
function lowerZeroPadding2D({ cfg, node, x, dims, graph }: LayerContext): Value[] {
  const [[t, bo], [l, r]] = cfg['padding'] as [[number, number], [number, number]];
  const next = graph.soleUse(node.outputTensors[0]!);
  if (next && takesPads(next.layer)) return [{ name: x.name, dims, pads: [t, l, bo, r] }];
  return [graph.materialize({ name: x.name, dims, pads: [t, l, bo, r] })];
}

function lowerCropping2D({ cfg, x, name, b, out }: LayerContext): Value[] {
  const [[t, bo], [l, r]] = cfg['cropping'] as [[number, number], [number, number]];
  const [h, w] = x.dims as [number, number];
  const starts = b.int64s(`${name}_starts`, [t, l]);
  const ends = b.int64s(`${name}_ends`, [h - bo, w - r]);
  const axes = b.int64s(`${name}_axes`, [2, 3]);
  return out(b.op('Slice', [x.name, starts, ends, axes], {}, name));
}

function lowerUpSampling2D({ cfg, x, name, b, out }: LayerContext): Value[] {
  const [sh, sw] = pair(cfg['size'], 2);
  const scales = b.floats(`${name}_scales`, Float32Array.of(1, 1, sh, sw), [4]);
  // tfjs resizes with alignCorners=false, halfPixelCenters=false: 'asymmetric'.
  const attrs: Record<string, Attr> =
    cfg['interpolation'] === 'bilinear'
      ? { mode: { s: 'linear' }, coordinate_transformation_mode: { s: 'asymmetric' } }
      : {
          mode: { s: 'nearest' },
          coordinate_transformation_mode: { s: 'asymmetric' },
          nearest_mode: { s: 'floor' },
        };
  return out(b.op('Resize', [x.name, '', scales], attrs, name));
}

/** MaxPooling2D / AveragePooling2D as the ONNX pool `op`. */
function pooling(op: 'MaxPool' | 'AveragePool'): LayerLowering['lower'] {
  return (c) => {
    const { cfg, x, name, b, out } = c;
    const kernel = pair(cfg['poolSize'], 2);
    const strides = pair(cfg['strides'] ?? kernel, 1);
    const spec: ConvSpec = { ...convSpec(c, 1), kernel, strides, dilations: [1, 1] };
    const { pads } = convAttrs(x, spec) as { pads: { ints: number[] } };
    const attrs: Record<string, Attr> = {
      kernel_shape: { ints: kernel },
      strides: { ints: strides },
      pads,
    };
    if (op === 'AveragePool') {
      // TF 'same' averages over the real pixels only; merged ZeroPadding2D zeros count.
      attrs['count_include_pad'] = { i: x.pads ? 1 : 0 };
    }
    return out(b.op(op, [x.name], attrs, name));
  };
}

/** GlobalAveragePooling2D / GlobalMaxPooling2D as the ONNX global pool `op`. */
function globalPooling2D(op: 'GlobalAveragePool' | 'GlobalMaxPool'): LayerLowering {
  return {
    lower: ({ x, dims, name, b, out }) => {
      const y = b.op(op, [x.name], {}, name);
      // [N, C, 1, 1] is already the keepDims layout; otherwise drop the 1×1.
      return out(dims.length === 3 ? y : b.op('Flatten', [y], { axis: { i: 1 } }, name));
    },
  };
}

/** GlobalAveragePooling1D / GlobalMaxPooling1D as the ONNX reduction `op` over the steps. */
function globalPooling1D(op: 'ReduceMean' | 'ReduceMax'): LayerLowering {
  return {
    lower: ({ x, dims, name, b, out }) => {
      const keep = dims.length === 2 ? 1 : 0;
      return out(b.op(op, [x.name], { axes: { ints: [1] }, keepdims: { i: keep } }, name));
    },
  };
}

function lowerFlatten({ x, rank, name, b, out }: LayerContext): Value[] {
  // Keras flattens in NHWC order: put the graph tensor back in Keras order first
  // (skipped when only size-1 axes move, e.g. a 1×1 map).
  const perm = toKerasPerm(rank);
  return out(b.op('Flatten', [transpose(b, x, perm, `${name}_nhwc`)], { axis: { i: 1 } }, name));
}

function lowerReshape({ x, rank, dims, name, b, out }: LayerContext): Value[] {
  const keras = transpose(b, x, toKerasPerm(rank), `${name}_nhwc`);
  const back = fromKerasPerm(dims.length + 1);
  if (isDataNoop([1, ...dims], back)) {
    const shape = b.int64s(`${name}_shape`, [0, ...onnxDims(dims)]);
    return out(b.op('Reshape', [keras, shape], {}, name));
  }
  const shape = b.int64s(`${name}_shape`, [0, ...dims]);
  const y = b.op('Reshape', [keras, shape], {}, name);
  return out(b.op('Transpose', [y], { perm: { ints: back } }, name));
}

function lowerPermute({ cfg, x, rank, name, b, out }: LayerContext): Value[] {
  // Output graph axis j holds Keras output axis back[j] = Keras input axis
  // p[back[j]], which sits at graph input axis toK[p[back[j]]].
  const p = [0, ...(cfg['dims'] as number[])];
  const toK = toKerasPerm(rank);
  const back = fromKerasPerm(rank);
  const perm = back.map((a) => toK[p[a]!]!);
  return out(b.op('Transpose', [x.name], { perm: { ints: perm } }, name));
}

const always = (): boolean => true;
const NESTED_MODEL: LayerLowering = { lower: lowerNestedModel };
const PASS_THROUGH: LayerLowering = { lower: passThrough };

/**
 * Keras class name → how its layers are lowered. Every row is exercised by
 * test/engine/onnx-lower.test.ts, which fails when one is not.
 */
export const LAYER_LOWERINGS: Readonly<Record<string, LayerLowering>> = Object.freeze({
  Functional: NESTED_MODEL,
  Model: NESTED_MODEL,
  Sequential: NESTED_MODEL,

  Dropout: PASS_THROUGH,
  SpatialDropout1D: PASS_THROUGH,
  SpatialDropout2D: PASS_THROUGH,
  GaussianNoise: PASS_THROUGH,
  GaussianDropout: PASS_THROUGH,
  AlphaDropout: PASS_THROUGH,
  ActivityRegularization: PASS_THROUGH,

  Rescaling: { lower: lowerRescaling },
  Conv2D: { lower: lowerConv2D, takesPads: always },
  DepthwiseConv2D: { lower: lowerDepthwiseConv2D, takesPads: always },
  SeparableConv2D: { lower: lowerSeparableConv2D, takesPads: always },
  Dense: { lower: lowerDense },
  BatchNormalization: { lower: lowerBatchNormalization },

  Activation: { lower: lowerActivation },
  ReLU: { lower: lowerReLU },
  LeakyReLU: { lower: lowerLeakyReLU },
  ELU: { lower: lowerELU },
  ThresholdedReLU: { lower: lowerThresholdedReLU },
  PReLU: { lower: lowerPReLU },
  Softmax: { lower: lowerSoftmax },

  Add: elementwise('Add'),
  Multiply: elementwise('Mul'),
  Average: elementwise('Mean'),
  Maximum: elementwise('Max'),
  Minimum: elementwise('Min'),
  Concatenate: { lower: lowerConcatenate },

  ZeroPadding2D: { lower: lowerZeroPadding2D },
  Cropping2D: { lower: lowerCropping2D },
  UpSampling2D: { lower: lowerUpSampling2D },
  MaxPooling2D: { lower: pooling('MaxPool') },
  AveragePooling2D: {
    lower: pooling('AveragePool'),
    // Only a valid average pool: ONNX pads count as zeros there (count_include_pad=1), as
    // the padded zeros do in Keras. A max pool treats pads as -inf, unlike zeros.
    takesPads: (cfg) => cfg['padding'] !== 'same',
  },
  GlobalAveragePooling2D: globalPooling2D('GlobalAveragePool'),
  GlobalMaxPooling2D: globalPooling2D('GlobalMaxPool'),
  GlobalAveragePooling1D: globalPooling1D('ReduceMean'),
  GlobalMaxPooling1D: globalPooling1D('ReduceMax'),

  Flatten: { lower: lowerFlatten },
  Reshape: { lower: lowerReshape },
  Permute: { lower: lowerPermute },
});

/** The Keras class names the lowering covers, sorted. */
export const LOWERABLE_LAYERS: readonly string[] = Object.freeze(
  Object.keys(LAYER_LOWERINGS).sort(),
);

/** The row for `layer`'s class; an unknown class fails with the list of known ones. */
export function loweringOf(layer: Layer): LayerLowering {
  const cls = layer.getClassName();
  if (Object.hasOwn(LAYER_LOWERINGS, cls)) return LAYER_LOWERINGS[cls]!;
  throw new UnsupportedLayerError(
    layer.name,
    cls,
    `unsupported layer type; expected one of ${LOWERABLE_LAYERS.join(', ')}`,
  );
}

/** Whether `layer` adds a ZeroPadding2D's pads to its own pads instead of a Pad node. */
export function takesPads(layer: Layer): boolean {
  const cls = layer.getClassName();
  const cfg = config(layer);
  if (cfg['dataFormat'] === 'channelsFirst') return false;
  const row = Object.hasOwn(LAYER_LOWERINGS, cls) ? LAYER_LOWERINGS[cls]! : null;
  return row?.takesPads?.(cfg) ?? false;
}

// ---------------------------------------------------------------------------------------
// Weight rewriting

/** Keras conv kernel [kh, kw, in, out] → ONNX [out, in, kh, kw]. */
function convWeights(
  k: Float32Array,
  kh: number,
  kw: number,
  inC: number,
  outC: number,
): Float32Array {
  // Loops live in small functions: inside one large function V8 left them unoptimised
  // (measured: the first lowering of MobileNetV2 took ~470 ms instead of ~80).
  const w = new Float32Array(k.length);
  for (let i = 0; i < kh; i++)
    for (let j = 0; j < kw; j++)
      for (let c = 0; c < inC; c++)
        for (let o = 0; o < outC; o++)
          w[((o * inC + c) * kh + i) * kw + j] = k[((i * kw + j) * inC + c) * outC + o]!;
  return w;
}

/** A row-major [rows, cols] matrix → [cols, rows]. */
function transpose2d(k: Float32Array, rows: number, cols: number): Float32Array {
  const w = new Float32Array(k.length);
  for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) w[c * rows + r] = k[r * cols + c]!;
  return w;
}

/**
 * Folds y = x·scale + shift (per output channel o) into weights with output channels
 * first: BN(Wx + b) = (s·W)x + (s·b + shift). Scales `w` in place; returns the new bias.
 */
function foldScale(
  w: Float32Array,
  outC: number,
  bias: Float32Array | null,
  scale: Float32Array,
  shift: Float32Array,
): Float32Array {
  const per = w.length / outC;
  const folded = new Float32Array(outC);
  for (let o = 0; o < outC; o++) {
    const s = scale[o]!;
    for (let k = o * per; k < (o + 1) * per; k++) w[k] = w[k]! * s;
    folded[o] = (bias ? bias[o]! : 0) * s + shift[o]!;
  }
  return folded;
}

/** Keras depthwise kernel [kh, kw, in, mult] → ONNX group-conv weights [in·mult, 1, kh, kw]. */
function depthwiseWeights(
  k: Float32Array,
  kh: number,
  kw: number,
  inC: number,
  mult: number,
): Float32Array {
  // Keras output channel c·mult + m is ONNX group c's m-th output: the same index.
  const w = new Float32Array(k.length);
  for (let i = 0; i < kh; i++)
    for (let j = 0; j < kw; j++)
      for (let c = 0; c < inC; c++)
        for (let m = 0; m < mult; m++)
          w[((c * mult + m) * kh + i) * kw + j] = k[((i * kw + j) * inC + c) * mult + m]!;
  return w;
}

/** [H, W, C] values → [C, H, W]. */
function hwcToChw(v: Float32Array, [h, w, c]: readonly number[]): Float32Array {
  const out = new Float32Array(v.length);
  for (let i = 0; i < h!; i++)
    for (let j = 0; j < w!; j++)
      for (let k = 0; k < c!; k++) out[(k * h! + i) * w! + j] = v[(i * w! + j) * c! + k]!;
  return out;
}
