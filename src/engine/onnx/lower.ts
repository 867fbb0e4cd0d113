import type * as tf from '@tensorflow/tfjs';
import onnxProto from 'onnx-proto';
import { FinetuneError } from '../../errors.js';

/**
 * Lowers a tfjs LayersModel to an ONNX graph at run time, so frozen forward passes can
 * run on ONNX Runtime (MobileNetV2: over 10x faster than tfjs-wasm on a 2-core machine).
 *
 * Layout: every 4-D Keras tensor [N, H, W, C] lives in the graph as [N, C, H, W]; tensors
 * of other ranks keep the Keras layout. The graph input is therefore NCHW (no Transpose at
 * the input) and a 4-D output is NCHW too. Weights are rewritten once at lowering time.
 */

// onnx-proto is CommonJS: its root object is the default export under Node's ESM loader.
const { onnx } = onnxProto;
type NodeProto = onnxProto.onnx.INodeProto;
type TensorProto = onnxProto.onnx.ITensorProto;
type AttributeProto = onnxProto.onnx.IAttributeProto;
type ValueInfoProto = onnxProto.onnx.IValueInfoProto;
type ModelProto = onnxProto.onnx.IModelProto;

/** Opset 13: Clip takes min/max as inputs, Softmax works on one axis, Reduce* take `axes` as an attribute. */
const OPSET = 13;
/** onnx-proto 8.0.1 carries the IR 8 schema; ORT rejects a model without irVersion. */
const IR_VERSION = 8;
const FLOAT = onnx.TensorProto.DataType.FLOAT;
const INT64 = onnx.TensorProto.DataType.INT64;
const ATTR = onnx.AttributeProto.AttributeType;

/** Name of the graph input: raw pixels, float32 [N, 3, H, W] for an image model. */
export const ONNX_INPUT = 'pixels';
/** Name of the graph output: [N, ...]; a 4-D output is NCHW. */
export const ONNX_OUTPUT = 'output';

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

export interface LowerToOnnxOptions {
  /** Cut the graph at this layer's output; default the model's output. */
  readonly output?: string;
}

/**
 * Lowers `model` to a serialized ONNX ModelProto (opset 13).
 *
 * Input `pixels`: float32 [N, C, H, W] (NCHW, symbolic batch). Output `output`: the output
 * layer's tensor with a symbolic batch; when it is 4-D it is NCHW ([N, C, H, W]), not the
 * NHWC tfjs gives. BatchNormalization after a conv/dense is folded into its weights and
 * ZeroPadding2D is merged into the next conv's pads. Allocates no tfjs tensors.
 *
 * @throws UnsupportedLayerError for a layer type or configuration it cannot lower.
 */
export function lowerToOnnx(model: tf.LayersModel, options: LowerToOnnxOptions = {}): Uint8Array {
  return onnx.ModelProto.encode(buildModel(model, options.output)).finish();
}

/**
 * Whether {@link lowerToOnnx} would succeed, and why not. Runs the lowering (reads the
 * weights, skips serialization): tens of milliseconds for a MobileNetV2.
 */
export function canLowerToOnnx(
  model: tf.LayersModel,
  output?: string,
): { ok: true } | { ok: false; reason: string } {
  try {
    buildModel(model, output);
    return { ok: true };
  } catch (err) {
    // Any failure means "use the tfjs engine": the caller wants a decision, not a crash.
    return { ok: false, reason: err instanceof Error ? err.message : String(err) };
  }
}

// ---------------------------------------------------------------------------------------
// Graph building

/** A lowered tensor. */
interface Value {
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

class GraphBuilder {
  readonly nodes: NodeProto[] = [];
  readonly initializers: TensorProto[] = [];
  private readonly used = new Set<string>([ONNX_INPUT, ONNX_OUTPUT]);

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
function onnxDims(dims: readonly number[]): number[] {
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

function valueInfo(name: string, dims: readonly number[]): ValueInfoProto {
  return {
    name,
    type: {
      tensorType: {
        elemType: FLOAT,
        shape: { dim: [{ dimParam: 'N' }, ...onnxDims(dims).map((d) => ({ dimValue: d }))] },
      },
    },
  };
}

function buildModel(model: tf.LayersModel, output: string | undefined): ModelProto {
  if (model.inputs.length !== 1) {
    throw new FinetuneError(
      `Expected a model with one input to lower to ONNX but it has ${model.inputs.length}`,
    );
  }
  const input = model.inputs[0]!;
  const inDims = input.shape.slice(1);
  if (input.dtype !== 'float32' || inDims.some((d) => d == null)) {
    throw new FinetuneError(
      `Expected a float32 model input with a static shape to lower to ONNX but it is ${input.dtype} [${input.shape.map(String).join(', ')}]`,
    );
  }
  const outTensor = resolveOutput(model, output);
  const b = new GraphBuilder();
  const x: Value = { name: ONNX_INPUT, dims: inDims as number[] };
  const [y] = new GraphLowering(b, [input], [x], [outTensor]).run();
  // An Identity gives the output a fixed name whatever produced it (ORT removes it).
  b.opTo(ONNX_OUTPUT, 'Identity', [y!.name]);
  return {
    irVersion: IR_VERSION,
    opsetImport: [{ domain: '', version: OPSET }],
    producerName: 'tfjs-finetune',
    graph: {
      name: model.name,
      node: b.nodes,
      initializer: b.initializers,
      input: [valueInfo(ONNX_INPUT, x.dims)],
      output: [valueInfo(ONNX_OUTPUT, y!.dims)],
    },
  };
}

// ---------------------------------------------------------------------------------------
// Walking the tfjs graph

type Layer = tf.layers.Layer;
type SymbolicTensor = tf.SymbolicTensor;
interface GraphNode {
  readonly inputTensors: SymbolicTensor[];
  readonly outputTensors: SymbolicTensor[];
}
interface Use {
  readonly layer: Layer;
  readonly node: GraphNode;
}

function producer(t: SymbolicTensor): GraphNode {
  return t.sourceLayer.inboundNodes[t.nodeIndex]! as unknown as GraphNode;
}

/** The nodes computing `outputs` from `stop` (ids of tensors given), in execution order. */
function topoOrder(outputs: readonly SymbolicTensor[], stop: ReadonlySet<number>): Use[] {
  const seen = new Set<GraphNode>();
  const order: Use[] = [];
  const visit = (t: SymbolicTensor): void => {
    if (stop.has(t.id)) return;
    const node = producer(t);
    if (seen.has(node)) return;
    seen.add(node);
    if (t.sourceLayer.getClassName() === 'InputLayer') {
      throw new FinetuneError(`Expected the model output to depend only on its declared input`);
    }
    for (const x of node.inputTensors) visit(x);
    order.push({ layer: t.sourceLayer, node });
  };
  for (const t of outputs) visit(t);
  return order;
}

function resolveOutput(model: tf.LayersModel, name: string | undefined): SymbolicTensor {
  if (name === undefined) {
    if (model.outputs.length !== 1) {
      throw new FinetuneError(
        `Expected a model with one output to lower to ONNX but it has ${model.outputs.length}; pass the output layer`,
      );
    }
    return model.outputs[0]!;
  }
  const layer = model.layers.find((l) => l.name === name);
  if (!layer) {
    throw new FinetuneError(
      `Expected the name of a layer of the model for output but received '${name}'`,
    );
  }
  let nodes = layer.inboundNodes as unknown as GraphNode[];
  if (nodes.length > 1) {
    // A shared layer: keep the application that belongs to this model's graph.
    const inModel = new Set(
      topoOrder(model.outputs, new Set(model.inputs.map((t) => t.id))).map((u) => u.node),
    );
    nodes = nodes.filter((n) => inModel.has(n));
  }
  const outs = nodes.length === 1 ? nodes[0]!.outputTensors : [];
  if (outs.length !== 1) {
    throw new FinetuneError(`Expected layer '${name}' to have exactly one output in the model`);
  }
  return outs[0]!;
}

// ---------------------------------------------------------------------------------------
// Layer configs and weights

type Config = Record<string, unknown>;

/** A layer's config; {} for a custom layer whose getConfig throws (it is unsupported anyway). */
function config(layer: Layer): Config {
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

const ACTIVATIONS = new Set([
  'linear',
  'relu',
  'relu6',
  'elu',
  'selu',
  'sigmoid',
  'hardSigmoid',
  'tanh',
  'softplus',
  'softsign',
  'softmax',
  'logSoftmax',
  'swish',
  'silu',
  'mish',
  'gelu',
  'gelu_new',
]);

const ELEMENTWISE: Record<string, string> = {
  Add: 'Add',
  Multiply: 'Mul',
  Average: 'Mean',
  Maximum: 'Max',
  Minimum: 'Min',
};

const IDENTITY_LAYERS = new Set([
  'Dropout',
  'SpatialDropout1D',
  'SpatialDropout2D',
  'GaussianNoise',
  'GaussianDropout',
  'AlphaDropout',
  'ActivityRegularization',
]);

/** Layers whose input pads a ZeroPadding2D may hand over instead of a Pad node. */
function takesPads(layer: Layer): boolean {
  const cls = layer.getClassName();
  const cfg = config(layer);
  if (cfg['dataFormat'] === 'channelsFirst') return false;
  if (cls === 'Conv2D' || cls === 'DepthwiseConv2D' || cls === 'SeparableConv2D') return true;
  // Only a valid average pool: ONNX pads count as zeros there (count_include_pad=1), as
  // the padded zeros do in Keras. A max pool treats pads as -inf, unlike zeros.
  return cls === 'AveragePooling2D' && cfg['padding'] !== 'same';
}

interface ConvSpec {
  readonly kernel: [number, number];
  readonly strides: [number, number];
  readonly dilations: [number, number];
  readonly padding: string;
  readonly group: number;
}

// ---------------------------------------------------------------------------------------
// Lowering one (sub)graph

class GraphLowering {
  private readonly values = new Map<number, Value>();
  private readonly uses = new Map<number, (Use | 'output')[]>();
  /** BatchNormalization nodes folded into the conv before them, with that conv's output. */
  private readonly absorbed = new Map<GraphNode, Value>();
  private readonly order: Use[];

  constructor(
    private readonly b: GraphBuilder,
    inputs: readonly SymbolicTensor[],
    inputValues: readonly Value[],
    private readonly outputs: readonly SymbolicTensor[],
  ) {
    inputs.forEach((t, i) => {
      this.values.set(t.id, inputValues[i]!);
    });
    this.order = topoOrder(outputs, new Set(inputs.map((t) => t.id)));
    for (const use of this.order) {
      for (const t of use.node.inputTensors) this.addUse(t.id, use);
    }
    for (const t of outputs) this.addUse(t.id, 'output');
  }

  private addUse(id: number, use: Use | 'output'): void {
    const list = this.uses.get(id);
    if (list) list.push(use);
    else this.uses.set(id, [use]);
  }

  /** The one layer reading `t`, if exactly one does (a graph output counts as a reader). */
  private soleUse(t: SymbolicTensor): Use | null {
    const list = this.uses.get(t.id) ?? [];
    const use = list.length === 1 ? list[0]! : 'output';
    return use === 'output' ? null : use;
  }

  run(): Value[] {
    for (const { layer, node } of this.order) {
      const folded = this.absorbed.get(node);
      const outs = folded
        ? [folded]
        : this.lowerLayer(
            layer,
            node,
            node.inputTensors.map((t) => this.values.get(t.id)!),
          );
      node.outputTensors.forEach((t, i) => {
        this.values.set(t.id, outs[i]!);
      });
    }
    return this.outputs.map((t) => this.materialize(this.values.get(t.id)!));
  }

  /** Applies pending ZeroPadding2D pads with a Pad node. */
  private materialize(v: Value): Value {
    if (!v.pads) return v;
    const [t, l, bo, r] = v.pads;
    const pads = this.b.int64s(`${v.name}_pads`, [0, 0, t, l, 0, 0, bo, r]);
    return { name: this.b.op('Pad', [v.name, pads], {}, `${v.name}_pad`), dims: v.dims };
  }

  private lowerLayer(layer: Layer, node: GraphNode, ins: Value[]): Value[] {
    const cls = layer.getClassName();
    const fail = (reason?: string): never => {
      throw new UnsupportedLayerError(layer.name, cls, reason);
    };
    const cfg = config(layer);
    if (cfg['dataFormat'] === 'channelsFirst') fail('channelsFirst data format is not supported');
    if (!takesPads(layer)) ins = ins.map((v) => this.materialize(v));
    const outT = node.outputTensors[0]!;
    const outDims = outT.shape.slice(1);
    if (outDims.some((d) => d == null)) fail('its output shape is not static');
    const dims = outDims as number[];
    const x = ins[0]!;
    const rank = x.dims.length + 1;
    const name = layer.name;
    const b = this.b;
    const out = (n: string): Value[] => [{ name: n, dims }];

    if (IDENTITY_LAYERS.has(cls)) return [x];
    switch (cls) {
      case 'Functional':
      case 'Model':
      case 'Sequential': {
        const inner = layer as unknown as tf.LayersModel;
        if (!Array.isArray(inner.inputs) || !Array.isArray(inner.outputs)) fail();
        return new GraphLowering(b, inner.inputs, ins, inner.outputs).run();
      }
      case 'Rescaling': {
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
      case 'Conv2D': {
        const spec = this.convSpec(layer, cfg, 1);
        const [kh, kw] = spec.kernel;
        const inC = x.dims[2]!;
        const outC = cfg['filters'] as number;
        if ((cfg['groups'] ?? 1) !== 1) fail('grouped Conv2D is not supported');
        const k = requireWeight(layer, 'kernel');
        const w = convWeights(k, kh, kw, inC, outC);
        const bias = cfg['useBias'] === false ? null : weight(layer, 'bias');
        return [
          this.conv(layer, node, x, spec, w, [outC, inC, kh, kw], bias, this.act(layer, cfg)),
        ];
      }
      case 'DepthwiseConv2D': {
        const inC = x.dims[2]!;
        const spec = this.convSpec(layer, cfg, inC);
        const [kh, kw] = spec.kernel;
        const mult = (cfg['depthMultiplier'] as number | undefined) ?? 1;
        const w = depthwiseWeights(requireWeight(layer, 'depthwise_kernel'), kh, kw, inC, mult);
        const bias = cfg['useBias'] === false ? null : weight(layer, 'bias');
        const d = [inC * mult, 1, kh, kw];
        return [this.conv(layer, node, x, spec, w, d, bias, this.act(layer, cfg))];
      }
      case 'SeparableConv2D': {
        const inC = x.dims[2]!;
        const spec = this.convSpec(layer, cfg, inC);
        const [kh, kw] = spec.kernel;
        const mult = (cfg['depthMultiplier'] as number | undefined) ?? 1;
        const dw = depthwiseWeights(requireWeight(layer, 'depthwise_kernel'), kh, kw, inC, mult);
        const dwName = b.floats(`${name}_depthwise_W`, dw, [inC * mult, 1, kh, kw]);
        const mid = b.op('Conv', [x.name, dwName], this.convAttrs(x, spec), `${name}_depthwise`);
        // Pointwise kernel [1, 1, in·mult, out] → [out, in·mult, 1, 1].
        const pk = requireWeight(layer, 'pointwise_kernel');
        const m = inC * mult;
        const outC = cfg['filters'] as number;
        const pw = transpose2d(pk, m, outC);
        const bias = cfg['useBias'] === false ? null : weight(layer, 'bias');
        const point: ConvSpec = {
          kernel: [1, 1],
          strides: [1, 1],
          dilations: [1, 1],
          padding: 'valid',
          group: 1,
        };
        const midValue: Value = { name: mid, dims: [dims[0]!, dims[1]!, m] };
        return [
          this.conv(layer, node, midValue, point, pw, [outC, m, 1, 1], bias, this.act(layer, cfg)),
        ];
      }
      case 'Dense': {
        const k = requireWeight(layer, 'kernel');
        const inC = x.dims[x.dims.length - 1]!;
        const units = cfg['units'] as number;
        const bias = cfg['useBias'] === false ? null : weight(layer, 'bias');
        if (rank === 2 || rank === 4) {
          // Keras kernel [in, units] → [units, in]: output channels first, like a conv.
          const wt = transpose2d(k, inC, units);
          if (rank === 4) {
            // Dense on [N, H, W, C] acts on channels: a 1×1 conv on NCHW.
            const spec: ConvSpec = {
              kernel: [1, 1],
              strides: [1, 1],
              dilations: [1, 1],
              padding: 'valid',
              group: 1,
            };
            return [
              this.conv(layer, node, x, spec, wt, [units, inC, 1, 1], bias, this.act(layer, cfg)),
            ];
          }
          return [
            this.affine(layer, node, wt, [units, inC], bias, this.act(layer, cfg), (w, bn) =>
              b.op('Gemm', bn ? [x.name, w, bn] : [x.name, w], { transB: { i: 1 } }, name),
            ),
          ];
        }
        const kName = b.floats(`${name}_W`, k, [inC, units]);
        let y = b.op('MatMul', [x.name, kName], {}, name);
        if (bias) y = b.op('Add', [y, b.floats(`${name}_B`, bias, [units])], {}, name);
        return out(this.activation(y, this.act(layer, cfg), rank, name));
      }
      case 'BatchNormalization': {
        const axis = onnxAxis(cfg['axis'] as number, rank);
        const { scale, shift } = bnAffine(layer);
        // Broadcast [C] along the graph axis: shape over the non-batch axes, C at `axis`.
        const shape = onnxDims(x.dims).map((_, i) => (i + 1 === axis ? scale.length : 1));
        const y = b.op('Mul', [x.name, b.floats(`${name}_scale`, scale, shape)], {}, name);
        return out(b.op('Add', [y, b.floats(`${name}_shift`, shift, shape)], {}, name));
      }
      case 'Activation':
        return out(this.activation(x.name, this.act(layer, cfg), rank, name));
      case 'ReLU': {
        // tfjs's ReLU layer reads only maxValue (negative_slope/threshold from a Keras
        // file are dropped by tfjs), so this matches what tfjs computes.
        const max = cfg['maxValue'] as number | null | undefined;
        if (max == null) return out(b.op('Relu', [x.name], {}, name));
        return out(this.clip(x.name, 0, max, name));
      }
      case 'LeakyReLU':
        return out(
          b.op('LeakyRelu', [x.name], { alpha: { f: (cfg['alpha'] as number) ?? 0.3 } }, name),
        );
      case 'ELU':
        return out(b.op('Elu', [x.name], { alpha: { f: (cfg['alpha'] as number) ?? 1 } }, name));
      case 'ThresholdedReLU':
        return out(
          b.op('ThresholdedRelu', [x.name], { alpha: { f: (cfg['theta'] as number) ?? 1 } }, name),
        );
      case 'PReLU': {
        const alpha = requireWeight(layer, 'alpha');
        const kerasShape = layer.weights.find((w) => w.originalName.endsWith('/alpha'))!
          .shape as number[];
        const slope = kerasShape.length === 3 ? hwcToChw(alpha, kerasShape) : alpha;
        const slopeName = b.floats(`${name}_slope`, slope, onnxDims(kerasShape));
        return out(b.op('PRelu', [x.name, slopeName], {}, name));
      }
      case 'Softmax': {
        let axis = cfg['axis'] as number | number[];
        if (Array.isArray(axis)) {
          if (axis.length !== 1) fail('softmax over several axes is not supported');
          axis = axis[0]!;
        }
        return out(b.op('Softmax', [x.name], { axis: { i: onnxAxis(axis, rank) } }, name));
      }
      case 'Add':
      case 'Multiply':
      case 'Average':
      case 'Maximum':
      case 'Minimum': {
        if (ins.some((v) => v.dims.length !== x.dims.length)) {
          fail('inputs of different ranks are not supported');
        }
        const names = ins.map((v) => v.name);
        const op = ELEMENTWISE[cls]!;
        if (op !== 'Add' && op !== 'Mul') return out(b.op(op, names, {}, name));
        // Binary Add rather than Sum: ORT's fusions (e.g. Conv+Add) look for Add.
        let y = names[0]!;
        for (const n of names.slice(1)) y = b.op(op, [y, n], {}, name);
        return out(y);
      }
      case 'Concatenate': {
        if (ins.some((v) => v.dims.length !== x.dims.length)) {
          fail('inputs of different ranks are not supported');
        }
        const axis = onnxAxis((cfg['axis'] as number | undefined) ?? -1, rank);
        const names = ins.map((v) => v.name);
        return out(b.op('Concat', names, { axis: { i: axis } }, name));
      }
      case 'ZeroPadding2D': {
        const [[t, bo], [l, r]] = cfg['padding'] as [[number, number], [number, number]];
        const next = this.soleUse(outT);
        if (next && takesPads(next.layer)) return [{ name: x.name, dims, pads: [t, l, bo, r] }];
        return [this.materialize({ name: x.name, dims, pads: [t, l, bo, r] })];
      }
      case 'Cropping2D': {
        const [[t, bo], [l, r]] = cfg['cropping'] as [[number, number], [number, number]];
        const [h, w] = x.dims as [number, number];
        const starts = b.int64s(`${name}_starts`, [t, l]);
        const ends = b.int64s(`${name}_ends`, [h - bo, w - r]);
        const axes = b.int64s(`${name}_axes`, [2, 3]);
        return out(b.op('Slice', [x.name, starts, ends, axes], {}, name));
      }
      case 'UpSampling2D': {
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
      case 'MaxPooling2D':
      case 'AveragePooling2D': {
        const kernel = pair(cfg['poolSize'], 2);
        const strides = pair(cfg['strides'] ?? kernel, 1);
        const spec: ConvSpec = {
          ...this.convSpec(layer, cfg, 1),
          kernel,
          strides,
          dilations: [1, 1],
        };
        const { pads } = this.convAttrs(x, spec) as { pads: { ints: number[] } };
        const attrs: Record<string, Attr> = {
          kernel_shape: { ints: kernel },
          strides: { ints: strides },
          pads,
        };
        if (cls === 'AveragePooling2D') {
          // TF 'same' averages over the real pixels only; merged ZeroPadding2D zeros count.
          attrs['count_include_pad'] = { i: x.pads ? 1 : 0 };
        }
        return out(b.op(cls === 'MaxPooling2D' ? 'MaxPool' : 'AveragePool', [x.name], attrs, name));
      }
      case 'GlobalAveragePooling2D':
      case 'GlobalMaxPooling2D': {
        const op = cls === 'GlobalAveragePooling2D' ? 'GlobalAveragePool' : 'GlobalMaxPool';
        const y = b.op(op, [x.name], {}, name);
        // [N, C, 1, 1] is already the keepDims layout; otherwise drop the 1×1.
        return out(dims.length === 3 ? y : b.op('Flatten', [y], { axis: { i: 1 } }, name));
      }
      case 'GlobalAveragePooling1D':
      case 'GlobalMaxPooling1D': {
        const op = cls === 'GlobalAveragePooling1D' ? 'ReduceMean' : 'ReduceMax';
        const keep = dims.length === 2 ? 1 : 0;
        return out(b.op(op, [x.name], { axes: { ints: [1] }, keepdims: { i: keep } }, name));
      }
      case 'Flatten': {
        // Keras flattens in NHWC order: put the graph tensor back in Keras order first
        // (skipped when only size-1 axes move, e.g. a 1×1 map).
        const perm = toKerasPerm(rank);
        return out(
          b.op('Flatten', [this.transpose(x, perm, `${name}_nhwc`)], { axis: { i: 1 } }, name),
        );
      }
      case 'Reshape': {
        const keras = this.transpose(x, toKerasPerm(rank), `${name}_nhwc`);
        const back = fromKerasPerm(dims.length + 1);
        if (isDataNoop([1, ...dims], back)) {
          const shape = b.int64s(`${name}_shape`, [0, ...onnxDims(dims)]);
          return out(b.op('Reshape', [keras, shape], {}, name));
        }
        const shape = b.int64s(`${name}_shape`, [0, ...dims]);
        const y = b.op('Reshape', [keras, shape], {}, name);
        return out(b.op('Transpose', [y], { perm: { ints: back } }, name));
      }
      case 'Permute': {
        // Output graph axis j holds Keras output axis back[j] = Keras input axis
        // p[back[j]], which sits at graph input axis toK[p[back[j]]].
        const p = [0, ...(cfg['dims'] as number[])];
        const toK = toKerasPerm(rank);
        const back = fromKerasPerm(rank);
        const perm = back.map((a) => toK[p[a]!]!);
        return out(b.op('Transpose', [x.name], { perm: { ints: perm } }, name));
      }
      default:
        return fail();
    }
  }

  private act(layer: Layer, cfg: Config): string {
    const name = (cfg['activation'] as string | undefined) ?? 'linear';
    if (!ACTIVATIONS.has(name)) {
      throw new UnsupportedLayerError(
        layer.name,
        layer.getClassName(),
        `unsupported activation '${name}'`,
      );
    }
    return name;
  }

  private convSpec(layer: Layer, cfg: Config, group: number): ConvSpec {
    const padding = (cfg['padding'] as string | undefined) ?? 'valid';
    if (padding !== 'same' && padding !== 'valid') {
      throw new UnsupportedLayerError(
        layer.name,
        layer.getClassName(),
        `'${padding}' padding is not supported`,
      );
    }
    return {
      kernel: pair(cfg['kernelSize'], 1),
      strides: pair(cfg['strides'], 1),
      dilations: pair(cfg['dilationRate'], 1),
      padding,
      group,
    };
  }

  /** Conv/pool attributes, with 'same' pads made explicit and pending ZeroPadding2D pads added. */
  private convAttrs(x: Value, spec: ConvSpec): Record<string, Attr> {
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

  private conv(
    layer: Layer,
    node: GraphNode,
    x: Value,
    spec: ConvSpec,
    w: Float32Array,
    wDims: readonly number[],
    bias: Float32Array | null,
    activation: string,
  ): Value {
    const attrs = this.convAttrs(x, spec);
    return this.affine(layer, node, w, wDims, bias, activation, (wn, bn) =>
      this.b.op('Conv', bn ? [x.name, wn, bn] : [x.name, wn], attrs, layer.name),
    );
  }

  /**
   * Emits a linear op whose weights have output channels first (Conv, Gemm with transB),
   * folding a following BatchNormalization into them when the op is its only input.
   */
  private affine(
    layer: Layer,
    node: GraphNode,
    w: Float32Array,
    wDims: readonly number[],
    bias: Float32Array | null,
    activation: string,
    emit: (w: string, b: string | null) => string,
  ): Value {
    const outT = node.outputTensors[0]!;
    const dims = outT.shape.slice(1) as number[];
    const bn = activation === 'linear' ? this.foldableBn(outT) : null;
    if (bn) {
      const { scale, shift } = bnAffine(bn.layer);
      const folded = foldScale(w, wDims[0]!, bias, scale, shift);
      bias = folded;
    }
    const wName = this.b.floats(`${layer.name}_W`, w, wDims);
    const bName = bias ? this.b.floats(`${layer.name}_B`, bias, [bias.length]) : null;
    const y = this.activation(emit(wName, bName), activation, dims.length + 1, layer.name);
    const value: Value = { name: y, dims };
    if (bn) this.absorbed.set(bn.node, value);
    return value;
  }

  private foldableBn(t: SymbolicTensor): Use | null {
    const use = this.soleUse(t);
    if (use?.layer.getClassName() !== 'BatchNormalization') return null;
    const rank = t.shape.length;
    const axis = config(use.layer)['axis'] as number;
    // Only a BN over the channels (the conv's output axis) folds into the weights.
    return axis === -1 || axis === rank - 1 ? use : null;
  }

  private clip(x: string, min: number, max: number, base: string): string {
    // Opset 13: min and max are inputs, not attributes.
    return this.b.op(
      'Clip',
      [x, this.b.scalar(`${base}_min`, min), this.b.scalar(`${base}_max`, max)],
      {},
      base,
    );
  }

  /** Transposes a graph tensor by `perm` unless that keeps the data order. */
  private transpose(x: Value, perm: readonly number[], base: string): string {
    if (isDataNoop([1, ...onnxDims(x.dims)], perm)) return x.name;
    return this.b.op('Transpose', [x.name], { perm: { ints: perm } }, base);
  }

  private activation(x: string, name: string, rank: number, base: string): string {
    const b = this.b;
    const mul = (p: string, q: string): string => b.op('Mul', [p, q], {}, base);
    const k = (v: number): string => b.scalar(`${base}_c`, v);
    switch (name) {
      case 'linear':
        return x;
      case 'relu':
        return b.op('Relu', [x], {}, base);
      case 'relu6':
        return this.clip(x, 0, 6, base);
      case 'elu':
        return b.op('Elu', [x], { alpha: { f: 1 } }, base);
      case 'selu':
        // tfjs constants; ONNX's defaults differ in the last float digits.
        return b.op(
          'Selu',
          [x],
          { alpha: { f: 1.6732632423543772 }, gamma: { f: 1.0507009873554805 } },
          base,
        );
      case 'sigmoid':
        return b.op('Sigmoid', [x], {}, base);
      case 'hardSigmoid':
        // tfjs: clip(0.2x + 0.5, 0, 1), the ONNX defaults.
        return b.op('HardSigmoid', [x], { alpha: { f: 0.2 }, beta: { f: 0.5 } }, base);
      case 'tanh':
        return b.op('Tanh', [x], {}, base);
      case 'softplus':
        return b.op('Softplus', [x], {}, base);
      case 'softsign':
        return b.op('Softsign', [x], {}, base);
      case 'softmax':
        return b.op('Softmax', [x], { axis: { i: onnxAxis(-1, rank) } }, base);
      case 'logSoftmax':
        return b.op('LogSoftmax', [x], { axis: { i: onnxAxis(-1, rank) } }, base);
      case 'swish':
      case 'silu':
        return mul(x, b.op('Sigmoid', [x], {}, base));
      case 'mish':
        return mul(x, b.op('Tanh', [b.op('Softplus', [x], {}, base)], {}, base));
      case 'gelu': {
        // x · ½(1 + erf(x/√2)), as tfjs computes it.
        const erf = b.op('Erf', [mul(x, k(Math.SQRT1_2))], {}, base);
        return mul(x, mul(k(0.5), b.op('Add', [erf, k(1)], {}, base)));
      }
      case 'gelu_new': {
        // ½x(1 + tanh(√(2/π)(x + 0.044715x³))).
        const cube = mul(mul(x, x), x);
        const inner = b.op('Add', [x, mul(cube, k(0.044715))], {}, base);
        const t = b.op('Tanh', [mul(inner, k(Math.sqrt(2 / Math.PI)))], {}, base);
        return mul(mul(x, k(0.5)), b.op('Add', [t, k(1)], {}, base));
      }
      default:
        // act() admits only the names above.
        throw new Error(`unreachable activation '${name}'`);
    }
  }
}

/** Keras conv kernel [kh, kw, in, out] → ONNX [out, in, kh, kw]. */
function convWeights(
  k: Float32Array,
  kh: number,
  kw: number,
  inC: number,
  outC: number,
): Float32Array {
  // Loops live in small functions: inside the big dispatcher V8 left them unoptimised
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
