import type * as tf from '@tensorflow/tfjs';
import onnxProto from 'onnx-proto';
import { FinetuneError } from '../../errors.js';
import {
  config,
  GraphBuilder,
  type GraphContext,
  type GraphNode,
  type LayerContext,
  loweringOf,
  onnxDims,
  type SymbolicTensor,
  takesPads,
  UnsupportedLayerError,
  type Use,
  type Value,
} from './lowerings.js';

/**
 * Lowers a tfjs LayersModel to an ONNX graph at run time, so frozen forward passes can
 * run on ONNX Runtime (MobileNetV2: over 10x faster than tfjs-wasm on a 2-core machine).
 *
 * Layout: every 4-D Keras tensor [N, H, W, C] lives in the graph as [N, C, H, W]; tensors
 * of other ranks keep the Keras layout. The graph input is therefore NCHW (no Transpose at
 * the input) and a 4-D output is NCHW too. Weights are rewritten once at lowering time.
 * This file walks the model; how each layer becomes nodes is a row of the tables in
 * lowerings.ts.
 */

export {
  LOWERABLE_ACTIVATIONS,
  LOWERABLE_LAYERS,
  UnsupportedLayerError,
} from './lowerings.js';

// onnx-proto is CommonJS: its root object is the default export under Node's ESM loader.
const { onnx } = onnxProto;
type ValueInfoProto = onnxProto.onnx.IValueInfoProto;
type ModelProto = onnxProto.onnx.IModelProto;

/** Opset 13: Clip takes min/max as inputs, Softmax works on one axis, Reduce* take `axes` as an attribute. */
const OPSET = 13;
/** onnx-proto 8.0.1 carries the IR 8 schema; ORT rejects a model without irVersion. */
const IR_VERSION = 8;
const FLOAT = onnx.TensorProto.DataType.FLOAT;

/** Name of the graph input: raw pixels, float32 [N, 3, H, W] for an image model. */
export const ONNX_INPUT = 'pixels';
/** Name of the graph output: [N, ...]; a 4-D output is NCHW. */
export const ONNX_OUTPUT = 'output';

export interface LowerToOnnxOptions {
  /** Cut the graph at this layer's output; default the model's output. */
  readonly output?: string;
  /**
   * Written as the model's `metadata_props` (key → string value), which ONNX Runtime shows
   * as `custom_metadata_map`. Default none: the bytes are then as without this option.
   */
  readonly metadata?: Readonly<Record<string, string>>;
}

/**
 * Lowers `model` to a serialized ONNX ModelProto (opset 13).
 *
 * Input `pixels`: float32 [N, C, H, W] (NCHW, symbolic batch). Output `output`: the output
 * layer's tensor with a symbolic batch; when it is 4-D it is NCHW ([N, C, H, W]), not the
 * NHWC tfjs gives. BatchNormalization after a conv/dense is folded into its weights and
 * ZeroPadding2D is merged into the next conv's pads. Allocates no tfjs tensors.
 * The Keras classes it covers are {@link LOWERABLE_LAYERS}.
 *
 * @throws UnsupportedLayerError for a layer type or configuration it cannot lower.
 */
export function lowerToOnnx(model: tf.LayersModel, options: LowerToOnnxOptions = {}): Uint8Array {
  const proto = buildModel(model, options.output);
  const props = Object.entries(options.metadata ?? {});
  if (props.length) proto.metadataProps = props.map(([key, value]) => ({ key, value }));
  return onnx.ModelProto.encode(proto).finish();
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
  const b = new GraphBuilder([ONNX_INPUT, ONNX_OUTPUT]);
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
// Lowering one (sub)graph

class GraphLowering implements GraphContext {
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

  soleUse(t: SymbolicTensor): Use | null {
    const list = this.uses.get(t.id) ?? [];
    const use = list.length === 1 ? list[0]! : 'output';
    return use === 'output' ? null : use;
  }

  absorb(node: GraphNode, value: Value): void {
    this.absorbed.set(node, value);
  }

  lowerSubgraph(
    inputs: readonly SymbolicTensor[],
    ins: readonly Value[],
    outputs: readonly SymbolicTensor[],
  ): Value[] {
    return new GraphLowering(this.b, inputs, ins, outputs).run();
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

  materialize(v: Value): Value {
    if (!v.pads) return v;
    const [t, l, bo, r] = v.pads;
    const pads = this.b.int64s(`${v.name}_pads`, [0, 0, t, l, 0, 0, bo, r]);
    return { name: this.b.op('Pad', [v.name, pads], {}, `${v.name}_pad`), dims: v.dims };
  }

  /** Checks what every row relies on, then hands the layer to its row. */
  private lowerLayer(layer: tf.layers.Layer, node: GraphNode, ins: Value[]): Value[] {
    const row = loweringOf(layer);
    const fail = (reason?: string): never => {
      throw new UnsupportedLayerError(layer.name, layer.getClassName(), reason);
    };
    const cfg = config(layer);
    if (cfg['dataFormat'] === 'channelsFirst') fail('channelsFirst data format is not supported');
    if (!takesPads(layer)) ins = ins.map((v) => this.materialize(v));
    const outDims = node.outputTensors[0]!.shape.slice(1);
    if (outDims.some((d) => d == null)) fail('its output shape is not static');
    const dims = outDims as number[];
    const x = ins[0]!;
    const context: LayerContext = {
      layer,
      node,
      cfg,
      name: layer.name,
      ins,
      x,
      rank: x.dims.length + 1,
      dims,
      b: this.b,
      graph: this,
      out: (name) => [{ name, dims }],
      fail,
    };
    return row.lower(context);
  }
}
