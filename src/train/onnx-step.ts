import type * as tf from '@tensorflow/tfjs';
import onnxProto from 'onnx-proto';
import type * as ort from 'onnxruntime-node';
import { GraphBuilder } from '../engine/onnx/lowerings.js';
import { float32Tensor, openOrtSession } from '../engine/onnx/session.js';
import { HEAD_LOGITS } from '../head/build.js';
import { seededRandom } from '../util/random.js';
import type { PartOutcome, StepPart } from './fit.js';

/**
 * The fine-tune stage's training step as one ONNX graph, for ONNX Runtime: the forward
 * pass of the unfrozen layers and the head, the gradient of the softmax cross-entropy, and
 * the backward pass down to every trainable weight. The same arithmetic as the tfjs step
 * (`partGradients`) in another engine, whose matrix products use the CPU's full vector
 * width on every core (see `OnnxSteps`).
 *
 * The weights stay tfjs variables, updated by the stage's tfjs optimizer: each step feeds
 * their values to the graph and takes their gradients back. Values that do not train in the
 * stage (BN's moving statistics; BN's γ and β with `freezeBn`) are constants of the graph,
 * read when it is built. Dropout masks are inputs.
 *
 * Layers covered (`buildGradGraph` throws GradGraphUnsupported for any other, and the stage
 * keeps the tfjs step): Conv2D 1×1 with stride 1; DepthwiseConv2D with depth multiplier 1,
 * any kernel and stride, 'same' or 'valid', after a ZeroPadding2D or not; BatchNormalization
 * on the last axis in inference mode (folded into a convolution without bias before it:
 * see Fold); ReLU (capped or not); Activation relu, relu6 and linear; Add;
 * GlobalAveragePooling2D; Dense (linear or relu); Dropout.
 *
 * Layout: a 4-D tensor [N, H, W, C] lives in the graph as the matrix [N·H·W, C], the same
 * memory as tfjs's NHWC, so a 1×1 convolution and both its gradients are single matrix
 * products; a depthwise convolution goes to NCHW and back around its Conv nodes.
 */

const { onnx } = onnxProto;
type ValueInfoProto = onnxProto.onnx.IValueInfoProto;
const FLOAT = onnx.TensorProto.DataType.FLOAT;
/** Opset 13, as the frozen passes' graphs. */
const OPSET = 13;
const IR_VERSION = 8;
const MS_DOMAIN = 'com.microsoft';

/** Graph input: the rows at the cut, NHWC [N, H, W, C]. */
export const GRAD_INPUT = 'x';
/** Graph input: each row's (smoothed) one-hot target [N, classes]. */
export const GRAD_TARGET = 'target';
/** Graph input: each row's share of the loss [N, 1]: its class weight over the batch's divisor. */
export const GRAD_ROW_SCALE = 'row_scale';
/** Graph output: the logits [N, classes]. */
export const GRAD_LOGITS = 'logits';

type Layer = tf.layers.Layer;
type SymbolicTensor = tf.SymbolicTensor;
type Config = Record<string, unknown>;

/** A value of the graph: [rows, channels], rows = N·H·W for a map (spatial null: [N, C]). */
interface Val {
  readonly name: string;
  readonly channels: number;
  readonly spatial: readonly [number, number] | null;
  /** ZeroPadding2D's [top, bottom, left, right], left for the depthwise conv after it. */
  readonly pads?: readonly [number, number, number, number];
}

/** A dropout mask input [N, width]: each value 0 or 1 / (1 − rate). */
export interface MaskInput {
  readonly name: string;
  readonly width: number;
  readonly rate: number;
}

/** A built step graph and the names of its inputs and outputs. */
export interface GradGraph {
  readonly bytes: Uint8Array;
  /** Graph input of each variable, in the order given to buildGradGraph. */
  readonly weightInputs: readonly string[];
  /** Graph output of each variable's gradient, in the same order. */
  readonly gradOutputs: readonly string[];
  readonly masks: readonly MaskInput[];
  readonly numClasses: number;
  /** BatchNormalization layers folded into the convolution before them (see Fold). */
  readonly folded: readonly string[];
}

/** The step has a layer (or weight) the graph does not cover; the message says which. */
export class GradGraphUnsupported extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'GradGraphUnsupported';
  }
}

class Builder {
  readonly b = new GraphBuilder([GRAD_INPUT, GRAD_TARGET, GRAD_ROW_SCALE, GRAD_LOGITS]);
  readonly inputs: ValueInfoProto[] = [];
  readonly outputs: ValueInfoProto[] = [];
  readonly weightInput = new Map<tf.Variable, string>();
  readonly gradOf = new Map<tf.Variable, string>();
  readonly masks: MaskInput[] = [];
  /** d(value) contributions, summed when the value's producer runs backward. */
  private readonly grads = new Map<string, string[]>();
  private readonly tape: { out: string; back: (dy: string) => void }[] = [];
  private readonly consts = new Map<string, string>();
  /** Kernels a BatchNormalization is folded into (see Fold, convWithBatchNorm), by kernel. */
  readonly folds = new Map<tf.Variable, Fold>();
  /** Names of the BN layers folded. */
  readonly folded: string[] = [];

  constructor(
    private readonly trainable: ReadonlySet<tf.Variable>,
    readonly matmulDepthwiseMax: number,
    /** Forward pass in inference mode only: no dropout, no backward pass. */
    readonly inference: boolean,
  ) {}

  op(type: string, inputs: readonly string[], attrs: Parameters<GraphBuilder['op']>[2] = {}) {
    return this.b.op(type, inputs, attrs);
  }

  /** A node of ONNX Runtime's own operators (domain com.microsoft, in every CPU build). */
  contrib(type: string, inputs: readonly string[], attrs: Parameters<GraphBuilder['op']>[2] = {}) {
    const out = this.b.op(type, inputs, attrs);
    this.b.nodes[this.b.nodes.length - 1]!.domain = MS_DOMAIN;
    return out;
  }

  i64(values: readonly number[]): string {
    const key = `i64:${values.join(',')}`;
    let name = this.consts.get(key);
    if (!name) {
      name = this.b.int64s('c', values);
      this.consts.set(key, name);
    }
    return name;
  }

  f32(value: number): string {
    const key = `f32:${value}`;
    let name = this.consts.get(key);
    if (!name) {
      name = this.b.scalar('c', value);
      this.consts.set(key, name);
    }
    return name;
  }

  /** Sum over `axes`, which go (opset 13 ReduceSum takes them as an input). */
  reduceSum(x: string, axes: readonly number[]): string {
    return this.op('ReduceSum', [x, this.i64(axes)], { keepdims: { i: 0 } });
  }

  /** Whether `v`'s gradient is wanted: it trains, or a folded BN's γ needs it (see Fold). */
  trains(v: tf.Variable): boolean {
    return this.trainable.has(v) || (this.folds.get(v)?.needsKernelGrad ?? false);
  }

  /**
   * A weight: a graph input when it trains, else a constant of its current value; for a
   * kernel with a BN folded in, the scaled kernel.
   */
  weight(v: tf.Variable): string {
    const fold = this.folds.get(v);
    if (fold) return fold.scaled;
    if (!this.trainable.has(v))
      return this.b.floats('const', v.dataSync() as Float32Array, v.shape);
    let name = this.weightInput.get(v);
    if (!name) {
      name = this.b.unique(`w_${v.name.replace(/[^A-Za-z0-9_]/g, '_')}`);
      this.weightInput.set(v, name);
      this.inputs.push(valueInfo(name, v.shape));
    }
    return name;
  }

  weightGrad(v: tf.Variable, grad: string): void {
    const fold = this.folds.get(v);
    if (fold) fold.kernelGrad(grad);
    else this.ownGrad(v, grad);
  }

  /** Whether `v` itself is one of the variables that train. */
  isVariable(v: tf.Variable): boolean {
    return this.trainable.has(v);
  }

  /** Records `v`'s gradient (a folded kernel's included: see Fold). */
  ownGrad(v: tf.Variable, grad: string): void {
    if (this.gradOf.has(v)) throw new GradGraphUnsupported(`weight ${v.name} is used twice`);
    this.gradOf.set(v, grad);
  }

  record(out: string, back: (dy: string) => void): void {
    this.tape.push({ out, back });
  }

  /** Adds a contribution to d(value); none for the graph input (the prefix is frozen). */
  addGrad(value: string, grad: string): void {
    if (value === GRAD_INPUT) return;
    const list = this.grads.get(value);
    if (list) list.push(grad);
    else this.grads.set(value, [grad]);
  }

  /** Runs the recorded layers backward from d(output) = `seed`. */
  backward(output: string, seed: string): void {
    this.addGrad(output, seed);
    for (let i = this.tape.length - 1; i >= 0; i--) {
      const { out, back } = this.tape[i]!;
      const parts = this.grads.get(out);
      if (!parts) continue;
      back(parts.length === 1 ? parts[0]! : this.op('Sum', parts));
    }
  }
}

function valueInfo(name: string, dims: readonly (number | string)[]): ValueInfoProto {
  return {
    name,
    type: {
      tensorType: {
        elemType: FLOAT,
        shape: {
          dim: dims.map((d) => (typeof d === 'string' ? { dimParam: d } : { dimValue: d })),
        },
      },
    },
  };
}

function cfg(layer: Layer): Config {
  return layer.getConfig() as Config;
}

function pair(v: unknown): [number, number] {
  return Array.isArray(v) ? [Number(v[0]), Number(v[1])] : [Number(v), Number(v)];
}

function unsupported(layer: Layer, why: string): never {
  throw new GradGraphUnsupported(`${layer.name} (${layer.getClassName()}): ${why}`);
}

/** The layer's weight whose name ends in `/suffix`, as its variable. */
function weightOf(layer: Layer, suffix: string): tf.Variable | null {
  const w = layer.weights.find((x) => x.originalName.endsWith(`/${suffix}`));
  return w ? (w.read() as tf.Variable) : null;
}

function needMap(layer: Layer, x: Val): readonly [number, number] {
  if (!x.spatial) unsupported(layer, 'expects a 4-D input');
  return x.spatial;
}

function noPads(layer: Layer, x: Val): void {
  if (x.pads) unsupported(layer, 'after a ZeroPadding2D (only a depthwise conv takes one)');
}

function checkDilation(layer: Layer): void {
  const d = cfg(layer)['dilationRate'];
  if (d !== undefined && pair(d).some((v) => v !== 1)) unsupported(layer, 'dilation');
}

function checkLastAxis(layer: Layer): void {
  const format = cfg(layer)['dataFormat'];
  if (format !== undefined && format !== 'channelsLast') unsupported(layer, String(format));
}

/**
 * relu, capped at `max` unless null. d: dy where 0 < x (≤ max), as tfjs's gradients give it
 * (relu6's, and the ReLU layer's relu then clip).
 */
function relu(g: Builder, x: Val, max: number | null): Val {
  const y = max === null ? g.op('Relu', [x.name]) : g.op('Clip', [x.name, g.f32(0), g.f32(max)]);
  g.record(y, (dy) => {
    const mask =
      max === null
        ? g.op('Greater', [x.name, g.f32(0)])
        : g.op('And', [
            g.op('Greater', [x.name, g.f32(0)]),
            g.op('LessOrEqual', [x.name, g.f32(max)]),
          ]);
    // Mul by the mask as 0/1: ONNX Runtime's Where is 5–10× slower here.
    g.addGrad(x.name, g.op('Mul', [dy, g.op('Cast', [mask], { to: { i: FLOAT } })]));
  });
  return { name: y, channels: x.channels, spatial: x.spatial };
}

function activation(g: Builder, layer: Layer, x: Val, name: unknown): Val {
  const a = name ?? 'linear';
  if (a === 'linear') return x;
  if (a === 'relu') return relu(g, x, null);
  if (a === 'relu6') return relu(g, x, 6);
  return unsupported(layer, `activation ${String(a)}`);
}

/** y = x · w (+ b) on [rows, ci]: a 1×1 convolution or a dense layer. */
function matmul(
  g: Builder,
  x: Val,
  kernel: tf.Variable,
  bias: tf.Variable | null,
  ci: number,
  co: number,
): Val {
  const kIn = g.weight(kernel);
  const w = kernel.shape.length === 2 ? kIn : g.op('Reshape', [kIn, g.i64([ci, co])]);
  const bIn = bias ? g.weight(bias) : null;
  const y = bIn ? g.op('Gemm', [x.name, w, bIn]) : g.op('MatMul', [x.name, w]);
  g.record(y, (dy) => {
    if (g.trains(kernel)) {
      const dw = g.op('Gemm', [x.name, dy], { transA: { i: 1 } });
      g.weightGrad(
        kernel,
        kernel.shape.length === 2 ? dw : g.op('Reshape', [dw, g.i64(kernel.shape)]),
      );
    }
    if (bias && g.trains(bias)) g.weightGrad(bias, g.reduceSum(dy, [0]));
    g.addGrad(x.name, g.op('Gemm', [dy, w], { transB: { i: 1 } }));
  });
  return { name: y, channels: co, spatial: x.spatial };
}

function conv2d(g: Builder, layer: Layer, x: Val): Val {
  const c = cfg(layer);
  checkLastAxis(layer);
  checkDilation(layer);
  noPads(layer, x);
  needMap(layer, x);
  if (pair(c['kernelSize']).some((k) => k !== 1)) unsupported(layer, 'kernel other than 1×1');
  if (pair(c['strides']).some((s) => s !== 1)) unsupported(layer, 'stride other than 1');
  const kernel = weightOf(layer, 'kernel')!;
  const bias = c['useBias'] ? weightOf(layer, 'bias') : null;
  const [, , ci, co] = kernel.shape as [number, number, number, number];
  if (ci !== x.channels) unsupported(layer, 'input channels differ from its kernel');
  return activation(g, layer, matmul(g, x, kernel, bias, ci, co), c['activation']);
}

function dense(g: Builder, layer: Layer, x: Val): Val {
  const c = cfg(layer);
  if (x.spatial) unsupported(layer, 'on a 4-D input');
  const kernel = weightOf(layer, 'kernel')!;
  const bias = c['useBias'] === false ? null : weightOf(layer, 'bias');
  const [ci, co] = kernel.shape as [number, number];
  return activation(g, layer, matmul(g, x, kernel, bias, ci, co), c['activation']);
}

/** [rows, C] of N maps H×W → NCHW, and back. */
function toNchw(g: Builder, name: string, [h, w]: readonly [number, number], c: number): string {
  return g.op('Transpose', [g.op('Reshape', [name, g.i64([-1, h, w, c])])], {
    perm: { ints: [0, 3, 1, 2] },
  });
}

function fromNchw(g: Builder, name: string, c: number): string {
  return g.op('Reshape', [
    g.op('Transpose', [name], { perm: { ints: [0, 2, 3, 1] } }),
    g.i64([-1, c]),
  ]);
}

function depthwise(g: Builder, layer: Layer, x: Val): Val {
  const c = cfg(layer);
  checkLastAxis(layer);
  checkDilation(layer);
  const [paddedH, paddedW] = needMap(layer, x);
  // The map as it is in the graph (a ZeroPadding2D before leaves its pads to this conv).
  const h = paddedH - (x.pads ? x.pads[0] + x.pads[1] : 0);
  const w = paddedW - (x.pads ? x.pads[2] + x.pads[3] : 0);
  if ((c['depthMultiplier'] ?? 1) !== 1) unsupported(layer, 'depth multiplier other than 1');
  const [kh, kw] = pair(c['kernelSize']);
  const [sh, sw] = pair(c['strides']);
  const ch = x.channels;
  // [top, bottom, left, right], as tfjs pads: 'same' puts the odd pixel at the end.
  let pads: [number, number, number, number] = [0, 0, 0, 0];
  if (x.pads) {
    if (c['padding'] !== 'valid') unsupported(layer, "'same' padding after a ZeroPadding2D");
    pads = [...x.pads];
  } else if (c['padding'] === 'same') {
    const total = (size: number, k: number, s: number) =>
      Math.max((Math.ceil(size / s) - 1) * s + k - size, 0);
    const ph = total(h, kh, sh);
    const pw = total(w, kw, sw);
    pads = [
      Math.floor(ph / 2),
      ph - Math.floor(ph / 2),
      Math.floor(pw / 2),
      pw - Math.floor(pw / 2),
    ];
  }
  const [pt, pb, pl, pr] = pads;
  const oh = Math.floor((h + pt + pb - kh) / sh) + 1;
  const ow = Math.floor((w + pl + pr - kw) / sw) + 1;
  const kernel = weightOf(layer, 'depthwise_kernel')!;
  const bias = c['useBias'] ? weightOf(layer, 'bias') : null;
  const geometry: DepthwiseGeometry = { h, w, oh, ow, kh, kw, sh, sw, pt, pl, ch };
  if (h * w * oh * ow * ch <= g.matmulDepthwiseMax) {
    let y = depthwiseAsMatMul(g, x, kernel, geometry);
    if (bias) y = biasAdd(g, y, bias);
    return { name: y, channels: ch, spatial: [oh, ow] };
  }
  const xn = toNchw(g, x.name, [h, w], ch);
  // [kh, kw, C, 1] → [C, 1, kh, kw]
  const wd = g.op('Transpose', [g.weight(kernel)], { perm: { ints: [2, 3, 0, 1] } });
  const conv = {
    group: { i: ch },
    kernel_shape: { ints: [kh, kw] },
    strides: { ints: [sh, sw] },
  };
  const out = fromNchw(
    g,
    g.op('Conv', [xn, wd], { ...conv, pads: { ints: [pt, pl, pb, pr] } }),
    ch,
  );
  g.record(out, (dy) => {
    const dyn = toNchw(g, dy, [oh, ow], ch);
    if (g.trains(kernel)) {
      // Each tap's gradient: the input window it reads (strided) times dy, summed per channel.
      const xp = pt || pb || pl || pr ? g.op('Pad', [xn, g.i64([0, 0, pt, pl, 0, 0, pb, pr])]) : xn;
      const taps: string[] = [];
      for (let i = 0; i < kh; i++) {
        for (let j = 0; j < kw; j++) {
          const window = g.op('Slice', [
            xp,
            g.i64([i, j]),
            g.i64([i + (oh - 1) * sh + 1, j + (ow - 1) * sw + 1]),
            g.i64([2, 3]),
            g.i64([sh, sw]),
          ]);
          taps.push(g.reduceSum(g.op('Mul', [window, dyn]), [0, 2, 3]));
        }
      }
      g.weightGrad(
        kernel,
        g.op('Reshape', [g.op('Concat', taps, { axis: { i: 0 } }), g.i64(kernel.shape)]),
      );
    }
    let dxn: string;
    if (sh === 1 && sw === 1) {
      // Stride 1: a correlation of dy with the flipped kernel, padded to give back H × W.
      const flipped = g.op('Slice', [
        wd,
        g.i64([kh - 1, kw - 1]),
        g.i64([-kh - 1, -kw - 1]),
        g.i64([2, 3]),
        g.i64([-1, -1]),
      ]);
      dxn = g.op('Conv', [dyn, flipped], {
        ...conv,
        pads: { ints: [kh - 1 - pt, kw - 1 - pl, kh - 1 - pb, kw - 1 - pr] },
      });
    } else {
      // The conv's transpose; output_padding gives back the rows a stride dropped.
      const extraH = (h + pt + pb - kh) % sh;
      const extraW = (w + pl + pr - kw) % sw;
      dxn = g.op('ConvTranspose', [dyn, wd], {
        ...conv,
        pads: { ints: [pt, pl, pb, pr] },
        output_padding: { ints: [extraH, extraW] },
      });
    }
    g.addGrad(x.name, fromNchw(g, dxn, ch));
  });
  return { name: bias ? biasAdd(g, out, bias) : out, channels: ch, spatial: [oh, ow] };
}

/** y + b on [rows, C], with b's gradient. */
function biasAdd(g: Builder, y: string, bias: tf.Variable): string {
  const out = g.op('Add', [y, g.weight(bias)]);
  g.record(out, (dy) => {
    if (g.trains(bias)) g.weightGrad(bias, g.reduceSum(dy, [0]));
    g.addGrad(y, dy);
  });
  return out;
}

interface DepthwiseGeometry {
  readonly h: number;
  readonly w: number;
  readonly oh: number;
  readonly ow: number;
  readonly kh: number;
  readonly kw: number;
  readonly sh: number;
  readonly sw: number;
  readonly pt: number;
  readonly pl: number;
  readonly ch: number;
}

/**
 * Largest H·W·oH·oW·C for which a depthwise conv runs as matrix products (see
 * depthwiseAsMatMul): 2.3 M for MobileNetV2's 7×7 blocks at 224 (960 channels), 22 M for
 * its 14×14 ones, which keep the Conv nodes.
 */
export const TOEPLITZ_MAX = 8_000_000;

/**
 * A depthwise conv on a small map as one batched matrix product per pass: each channel's
 * map (H·W values) times its own [H·W, oH·oW] matrix T_c = Σ_taps k[tap, c] · S_tap, where
 * S_tap is the constant 0/1 matrix of which input pixel a tap reads for each output pixel
 * (padding and stride included). ONNX Runtime's grouped Conv and strided Slice are slow
 * with weights that change every step (about 60 ms a layer for 32 rows of 7×7×960 going
 * forward and back); these are three batched products of [N, H·W] by [H·W, oH·oW].
 */
function depthwiseAsMatMul(g: Builder, x: Val, kernel: tf.Variable, d: DepthwiseGeometry): string {
  const { h, w, oh, ow, kh, kw, sh, sw, pt, pl, ch } = d;
  const area = h * w;
  const outArea = oh * ow;
  const taps = kh * kw;
  // reads[t][q] = p: the input pixel tap t reads for output pixel q (−1: padding).
  const select = new Float32Array(taps * area * outArea); // [t, p, q]
  const selectT = new Float32Array(taps * outArea * area); // [t, q, p]
  for (let i = 0; i < kh; i++) {
    for (let j = 0; j < kw; j++) {
      const t = i * kw + j;
      for (let oy = 0; oy < oh; oy++) {
        const iy = oy * sh - pt + i;
        if (iy < 0 || iy >= h) continue;
        for (let ox = 0; ox < ow; ox++) {
          const ix = ox * sw - pl + j;
          if (ix < 0 || ix >= w) continue;
          const p = iy * w + ix;
          const q = oy * ow + ox;
          select[(t * area + p) * outArea + q] = 1;
          selectT[(t * outArea + q) * area + p] = 1;
        }
      }
    }
  }
  const flatSelect = g.b.floats('dw_select', select, [taps, area * outArea]);
  // [kh, kw, C, 1] → [C, taps]
  const k = g.op('Transpose', [g.op('Reshape', [g.weight(kernel), g.i64([taps, ch])])], {
    perm: { ints: [1, 0] },
  });
  const forward = g.op('Reshape', [g.op('MatMul', [k, flatSelect]), g.i64([ch, area, outArea])]);
  const x3 = g.op('Reshape', [x.name, g.i64([-1, area, ch])]);
  const xc = g.op('Transpose', [x3], { perm: { ints: [2, 0, 1] } }); // [C, N, H·W]
  const yc = g.op('MatMul', [xc, forward]); // [C, N, oH·oW]
  const y = g.op('Reshape', [
    g.op('Transpose', [yc], { perm: { ints: [1, 2, 0] } }),
    g.i64([-1, ch]),
  ]);
  g.record(y, (dy) => {
    const dyc = g.op('Transpose', [g.op('Reshape', [dy, g.i64([-1, outArea, ch])])], {
      perm: { ints: [2, 0, 1] },
    }); // [C, N, oH·oW]
    if (g.trains(kernel)) {
      // Xcᵀ · dYc per channel: ONNX Runtime's FusedMatMul reads xc transposed in place (a
      // Transpose node before a MatMul would be merged with the one making xc, into a slow one).
      const dT = g.op('Reshape', [
        g.contrib('FusedMatMul', [xc, dyc], { transA: { i: 1 } }),
        g.i64([ch, area * outArea]),
      ]);
      // d k[c, t] = Σ_{p,q} dT[c, p, q] · S[t, p, q]
      const dk = g.op('Gemm', [dT, flatSelect], { transB: { i: 1 } }); // [C, taps]
      g.weightGrad(
        kernel,
        g.op('Reshape', [g.op('Transpose', [dk], { perm: { ints: [1, 0] } }), g.i64(kernel.shape)]),
      );
    }
    // Made here: a graph without the backward pass would carry it unused.
    const flatSelectT = g.b.floats('dw_select_t', selectT, [taps, outArea * area]);
    const back = g.op('Reshape', [g.op('MatMul', [k, flatSelectT]), g.i64([ch, outArea, area])]);
    const dxc = g.op('MatMul', [dyc, back]); // [C, N, H·W]
    g.addGrad(
      x.name,
      g.op('Reshape', [g.op('Transpose', [dxc], { perm: { ints: [1, 2, 0] } }), g.i64([-1, ch])]),
    );
  });
  return y;
}

function batchNorm(g: Builder, layer: Layer, x: Val): Val {
  noPads(layer, x);
  const { mean, rstd, s, t, gamma, beta } = bnTerms(g, layer, x.spatial !== null);
  const y = g.op('Add', [g.op('Mul', [x.name, s]), t]);
  g.record(y, (dy) => {
    const sum = (v: string) => g.reduceSum(v, [0]);
    if (gamma && g.trains(gamma)) {
      const xhat = g.op('Mul', [g.op('Sub', [x.name, mean]), rstd]);
      g.weightGrad(gamma, sum(g.op('Mul', [dy, xhat])));
    }
    if (beta && g.trains(beta)) g.weightGrad(beta, sum(dy));
    g.addGrad(x.name, g.op('Mul', [dy, s]));
  });
  return { name: y, channels: x.channels, spatial: x.spatial };
}

/**
 * A BatchNormalization (inference mode) folded into the convolution before it: the conv runs
 * with K' = K · s (s per output channel) and t is added after, so the map never goes
 * through BN's two elementwise passes forward nor its five backward. From d(K') = the conv's
 * kernel gradient and Σ dy (over the rows, at BN's output):
 *
 *     dK = dK' · s,   dβ = Σ dy,   dγ = (Σ K · dK' − μ · Σ dy) / √(σ² + ε)
 *
 * the last because Σ_rows dy · conv(x, K) = Σ K · dK' (the conv is linear in K), and
 * x̂ = (conv(x, K) − μ) / √(σ² + ε). Only these weight-sized terms remain.
 */
interface Fold {
  /** The scaled kernel K', in the kernel's shape. */
  readonly scaled: string;
  /** Whether the conv must compute dK' when K itself does not train (γ trains). */
  readonly needsKernelGrad: boolean;
  /** Takes dK' from the conv's backward pass. */
  kernelGrad(dScaled: string): void;
}

/** A BatchNormalization layer's scale s, shift t and 1/√(σ² + ε), with its weights, on a map or rows. */
function bnTerms(g: Builder, layer: Layer, spatial: boolean) {
  const c = cfg(layer);
  const axis = Number(c['axis'] ?? -1);
  const rank = spatial ? 4 : 2;
  if (axis !== -1 && axis !== rank - 1) unsupported(layer, `axis ${axis}`);
  const eps = Number(c['epsilon'] ?? 1e-3);
  const mean = g.weight(weightOf(layer, 'moving_mean')!);
  const variance = g.weight(weightOf(layer, 'moving_variance')!);
  const gamma = c['scale'] === false ? null : weightOf(layer, 'gamma');
  const beta = c['center'] === false ? null : weightOf(layer, 'beta');
  // As inferenceModeBatchNorm computes it: y = x·s + t, s = γ/√(σ² + ε), t = β − μ·s.
  const rstd = g.op('Reciprocal', [g.op('Sqrt', [g.op('Add', [variance, g.f32(eps)])])]);
  const s = gamma ? g.op('Mul', [rstd, g.weight(gamma)]) : rstd;
  const ms = g.op('Mul', [mean, s]);
  const t = beta ? g.op('Sub', [g.weight(beta), ms]) : g.op('Neg', [ms]);
  return { mean, rstd, s, t, gamma, beta };
}

/**
 * Whether `bn` can fold into `conv` (see Fold): a Conv2D or DepthwiseConv2D without bias or
 * activation whose output only `bn` reads.
 */
function foldable(conv: Layer, bn: Layer | undefined, readers: number): bn is Layer {
  const kind = conv.getClassName();
  if (kind !== 'Conv2D' && kind !== 'DepthwiseConv2D') return false;
  if (bn?.getClassName() !== 'BatchNormalization' || readers !== 1) return false;
  const c = cfg(conv);
  return !c['useBias'] && (c['activation'] ?? 'linear') === 'linear';
}

/** Lowers `conv` with `bn` folded in (see Fold); the value is BN's output. */
function convWithBatchNorm(g: Builder, conv: Layer, bn: Layer, x: Val): Val {
  const depthwiseKind = conv.getClassName() === 'DepthwiseConv2D';
  const kernel = weightOf(conv, depthwiseKind ? 'depthwise_kernel' : 'kernel')!;
  const channels = kernel.shape[depthwiseKind ? 2 : 3]!;
  // The conv's output has no pads: only BN's axis is checked.
  const { mean, rstd, s, t, gamma, beta } = bnTerms(g, bn, x.spatial !== null);
  const k = g.weight(kernel);
  // s on the kernel's channel axis: the last of [1, 1, ci, co]; the third of [kh, kw, C, 1].
  const sk = depthwiseKind ? g.op('Reshape', [s, g.i64([channels, 1])]) : s;
  const otherAxes = depthwiseKind ? [0, 1, 3] : [0, 1, 2];
  let dySum: string | null = null;
  const gammaTrains = gamma !== null && g.trains(gamma);
  g.folds.set(kernel, {
    scaled: g.op('Mul', [k, sk]),
    needsKernelGrad: gammaTrains,
    kernelGrad: (dScaled) => {
      if (g.isVariable(kernel)) g.ownGrad(kernel, g.op('Mul', [dScaled, sk]));
      if (gammaTrains) {
        const kdk = g.reduceSum(g.op('Mul', [k, dScaled]), otherAxes);
        g.ownGrad(gamma!, g.op('Mul', [g.op('Sub', [kdk, g.op('Mul', [mean, dySum!])]), rstd]));
      }
    },
  });
  g.folded.push(bn.name);
  const y = lowerLayer(g, conv, [x]);
  const out = g.op('Add', [y.name, t]);
  g.record(out, (dy) => {
    const betaTrains = beta !== null && g.trains(beta);
    if (betaTrains || gammaTrains) dySum = g.reduceSum(dy, [0]);
    if (betaTrains) g.weightGrad(beta, dySum!);
    g.addGrad(y.name, dy);
  });
  return { ...y, name: out };
}

function globalAverage(g: Builder, layer: Layer, x: Val): Val {
  checkLastAxis(layer);
  noPads(layer, x);
  const [h, w] = needMap(layer, x);
  if (cfg(layer)['keepDims']) unsupported(layer, 'keepDims');
  const area = h * w;
  const ch = x.channels;
  const y = g.op('ReduceMean', [g.op('Reshape', [x.name, g.i64([-1, area, ch])])], {
    axes: { ints: [1] },
    keepdims: { i: 0 },
  });
  g.record(y, (dy) => {
    const spread = g.op('Expand', [
      g.op('Unsqueeze', [g.op('Mul', [dy, g.f32(1 / area)]), g.i64([1])]),
      g.i64([1, area, ch]),
    ]);
    g.addGrad(x.name, g.op('Reshape', [spread, g.i64([-1, ch])]));
  });
  return { name: y, channels: ch, spatial: null };
}

function dropout(g: Builder, x: Val, rate: number): Val {
  if (!(rate > 0) || g.inference) return x;
  if (x.spatial) throw new GradGraphUnsupported('dropout on a 4-D tensor');
  const mask = g.b.unique('dropout_mask');
  g.masks.push({ name: mask, width: x.channels, rate });
  g.inputs.push(valueInfo(mask, ['N', x.channels]));
  const y = g.op('Mul', [x.name, mask]);
  g.record(y, (dy) => g.addGrad(x.name, g.op('Mul', [dy, mask])));
  return { name: y, channels: x.channels, spatial: null };
}

function add(g: Builder, layer: Layer, xs: readonly Val[]): Val {
  if (xs.length !== 2) unsupported(layer, `${xs.length} inputs`);
  const [a, b] = xs as [Val, Val];
  noPads(layer, a);
  noPads(layer, b);
  if (a.channels !== b.channels || String(a.spatial) !== String(b.spatial))
    unsupported(layer, 'inputs of different shapes');
  const y = g.op('Add', [a.name, b.name]);
  g.record(y, (dy) => {
    g.addGrad(a.name, dy);
    g.addGrad(b.name, dy);
  });
  return { name: y, channels: a.channels, spatial: a.spatial };
}

function zeroPadding(layer: Layer, x: Val): Val {
  noPads(layer, x);
  const [h, w] = needMap(layer, x);
  checkLastAxis(layer);
  const p = cfg(layer)['padding'];
  const [[t, b], [l, r]] = (Array.isArray(p) && Array.isArray(p[0]) ? p : [pair(p), pair(p)]) as [
    [number, number],
    [number, number],
  ];
  return { ...x, spatial: [h + t + b, w + l + r], pads: [t, b, l, r] };
}

/** One layer's nodes, forward, with its backward recorded (a Dropout layer at its rate in the stage). */
function lowerLayer(g: Builder, layer: Layer, xs: readonly Val[]): Val {
  const kind = layer.getClassName();
  const x = xs[0]!;
  if (kind !== 'Add' && xs.length !== 1) unsupported(layer, `${xs.length} inputs`);
  switch (kind) {
    case 'Conv2D':
      return conv2d(g, layer, x);
    case 'DepthwiseConv2D':
      return depthwise(g, layer, x);
    case 'BatchNormalization':
      return batchNorm(g, layer, x);
    case 'ReLU': {
      const c = cfg(layer);
      if (c['negativeSlope'] || c['threshold']) unsupported(layer, 'leaky or thresholded');
      noPads(layer, x);
      const max = c['maxValue'];
      return relu(g, x, max === null || max === undefined ? null : Number(max));
    }
    case 'Activation':
      noPads(layer, x);
      return activation(g, layer, x, cfg(layer)['activation']);
    case 'Add':
      return add(g, layer, xs);
    case 'GlobalAveragePooling2D':
      return globalAverage(g, layer, x);
    case 'ZeroPadding2D':
      return zeroPadding(layer, x);
    case 'Dense':
      return dense(g, layer, x);
    case 'Dropout':
      return dropout(g, x, Number((layer as unknown as { rate: number }).rate));
    default:
      return unsupported(layer, 'not covered by the ONNX step');
  }
}

/** The layers computing `output` from `input`, in execution order, with their inputs. */
function walk(
  input: SymbolicTensor,
  output: SymbolicTensor,
): { layer: Layer; ins: SymbolicTensor[]; out: SymbolicTensor }[] {
  const seen = new Set<unknown>();
  const order: { layer: Layer; ins: SymbolicTensor[]; out: SymbolicTensor }[] = [];
  const visit = (t: SymbolicTensor): void => {
    if (t.id === input.id) return;
    const node = t.sourceLayer.inboundNodes[t.nodeIndex]!;
    if (seen.has(node)) return;
    seen.add(node);
    if (t.sourceLayer.getClassName() === 'InputLayer')
      throw new GradGraphUnsupported(`${t.sourceLayer.name}: a second input`);
    const ins = node.inputTensors as SymbolicTensor[];
    for (const i of ins) visit(i);
    order.push({ layer: t.sourceLayer, ins, out: t });
  };
  visit(output);
  return order;
}

export interface GradGraphModel {
  /** The body after the cut: [N, H, W, C] in, features [N, F] out. */
  readonly suffix: tf.LayersModel;
  /** The head (features in); its logits are HEAD_LOGITS's output. */
  readonly head: tf.LayersModel;
  /** Rate of a dropout the stage adds before the classifier, outside the head's graph (0: none). */
  readonly addedDropout: number;
  /** What trains, in the order gradients are wanted. */
  readonly variables: readonly tf.Variable[];
  readonly numClasses: number;
  /** Largest H·W·oH·oW·C of a depthwise conv run as matrix products (default TOEPLITZ_MAX). */
  readonly matmulDepthwiseMax?: number;
}

/**
 * Builds the step graph of a stage's model, or with `mode: 'forward'` its inference pass
 * alone (logits only: no dropout, no loss, no gradients). Reads the frozen values now:
 * build it when the stage starts, after its BN and trainable settings are in place.
 *
 * @throws GradGraphUnsupported when a layer or a trainable weight is not covered.
 */
export function buildGradGraph(m: GradGraphModel, mode: 'step' | 'forward' = 'step'): GradGraph {
  const trainable = new Set(m.variables);
  const inference = mode === 'forward';
  const g = new Builder(trainable, m.matmulDepthwiseMax ?? TOEPLITZ_MAX, inference);
  const input = m.suffix.inputs[0]!;
  const rowShape = input.shape.slice(1) as number[];
  if (rowShape.length !== 3 || rowShape.some((d) => !(d > 0)))
    throw new GradGraphUnsupported(`the cut's shape [${input.shape}] is not a static map`);
  const [h, w, c] = rowShape as [number, number, number];
  g.inputs.push(valueInfo(GRAD_INPUT, ['N', h, w, c]));
  if (!inference) {
    g.inputs.push(valueInfo(GRAD_TARGET, ['N', m.numClasses]));
    g.inputs.push(valueInfo(GRAD_ROW_SCALE, ['N', 1]));
  }

  const run = (from: SymbolicTensor, to: SymbolicTensor, start: Val, stopAt?: string): Val => {
    const values = new Map<number, Val>([[from.id, start]]);
    const order = walk(from, to);
    const readers = new Map<number, number>();
    for (const { ins } of order)
      for (const t of ins) readers.set(t.id, (readers.get(t.id) ?? 0) + 1);
    let last = start;
    for (let i = 0; i < order.length; i++) {
      const { layer, ins, out } = order[i]!;
      if (layer.name === stopAt) return values.get(ins[0]!.id)!;
      // The suffix's BN is in inference mode in the stage (inferenceModeBatchNorm); a head's is not.
      if (stopAt && layer.getClassName() === 'BatchNormalization')
        unsupported(layer, 'BatchNorm in the head trains on batch statistics');
      const xs = ins.map((t) => values.get(t.id)!);
      const next = order[i + 1];
      if (
        !stopAt &&
        next?.ins[0]?.id === out.id &&
        foldable(layer, next.layer, readers.get(out.id) ?? 0)
      ) {
        last = convWithBatchNorm(g, layer, next.layer, xs[0]!);
        values.set(next.out.id, last);
        i++;
        continue;
      }
      last = lowerLayer(g, layer, xs);
      values.set(out.id, last);
    }
    return last;
  };
  const start = g.op('Reshape', [GRAD_INPUT, g.i64([-1, c])]);
  const features = run(input, m.suffix.outputs[0]!, { name: start, channels: c, spatial: [h, w] });
  if (features.spatial) throw new GradGraphUnsupported('the body does not end in [N, F] features');
  const classifier = m.head.getLayer(HEAD_LOGITS);
  const logitsOut = classifier.output as SymbolicTensor;
  let hidden = run(m.head.inputs[0]!, logitsOut, features, HEAD_LOGITS);
  hidden = dropout(g, hidden, m.addedDropout);
  const logits = lowerLayer(g, classifier, [hidden]);
  g.b.opTo(GRAD_LOGITS, 'Identity', [logits.name]);
  g.outputs.push(valueInfo(GRAD_LOGITS, ['N', m.numClasses]));
  if (!inference) {
    // d(loss)/d(logits) of the rows' weighted softmax cross-entropy: (softmax − target) · scale.
    const seed = g.op('Mul', [
      g.op('Sub', [g.op('Softmax', [logits.name], { axis: { i: 1 } }), GRAD_TARGET]),
      GRAD_ROW_SCALE,
    ]);
    g.backward(logits.name, seed);
  }

  const gradOutputs = (inference ? [] : m.variables).map((v) => {
    const grad = g.gradOf.get(v);
    if (!grad) throw new GradGraphUnsupported(`no gradient reaches ${v.name}`);
    const name = g.b.unique(`grad_${g.weightInput.get(v)}`);
    g.b.opTo(name, 'Identity', [grad]);
    g.outputs.push(valueInfo(name, v.shape));
    return name;
  });
  const bytes = onnx.ModelProto.encode({
    irVersion: IR_VERSION,
    opsetImport: [
      { domain: '', version: OPSET },
      { domain: MS_DOMAIN, version: 1 },
    ],
    producerName: 'tfjs-finetune',
    graph: {
      name: 'finetune_step',
      node: g.b.nodes,
      initializer: g.b.initializers,
      input: g.inputs,
      output: g.outputs,
    },
  }).finish();
  return {
    bytes,
    weightInputs: m.variables.map((v) => g.weightInput.get(v)!),
    gradOutputs,
    masks: g.masks,
    numClasses: m.numClasses,
    folded: g.folded,
  };
}

/**
 * Training steps on ONNX Runtime (see buildGradGraph): one session, opened once per stage,
 * computes each step's loss, correct rows and gradients from the variables' current values.
 */
export class OnnxSteps {
  private closed = false;
  private constructor(
    private readonly session: ort.InferenceSession,
    private readonly forwardSession: ort.InferenceSession,
    private readonly graph: GradGraph,
    private readonly forwardGraph: GradGraph,
    private readonly variables: readonly tf.Variable[],
    readonly threads: number,
  ) {}

  /**
   * Builds the step and inference graphs and opens their sessions; GradGraphUnsupported
   * when the model is not covered.
   */
  static async open(m: GradGraphModel, threads: number): Promise<OnnxSteps> {
    const graph = buildGradGraph(m);
    const forward = buildGradGraph(m, 'forward');
    const session = await openOrtSession(graph.bytes, threads);
    const forwardSession = await openOrtSession(forward.bytes, threads).catch(async (err) => {
      await session.release();
      throw err;
    });
    return new OnnxSteps(session, forwardSession, graph, forward, m.variables, threads);
  }

  /** Each variable's current value, fed to its input of `graph`. */
  private weightFeeds(
    graph: GradGraph,
    feeds: Record<string, ort.Tensor>,
  ): Record<string, ort.Tensor> {
    this.variables.forEach((v, i) => {
      const name = graph.weightInputs[i]!;
      feeds[name] = float32Tensor(v.dataSync() as Float32Array, v.shape);
    });
    return feeds;
  }

  /** Logits [n, classes] of rows [n, H, W, C] at the cut in inference mode, at the variables' current values. */
  async logits(x: Float32Array, shape: readonly number[]): Promise<Float32Array> {
    const feeds = this.weightFeeds(this.forwardGraph, {
      [GRAD_INPUT]: float32Tensor(x, [...shape]),
    });
    const out = await this.forwardSession.run(feeds);
    return out[GRAD_LOGITS]!.data as Float32Array;
  }

  /**
   * One step's part (all its rows): the loss of its rows' weighted softmax cross-entropy
   * divided by `part.divisor`, as partGradients computes it, their correct rows, and each
   * variable's gradient. Dropout masks are drawn from `part.seed`.
   */
  async gradients(part: StepPart): Promise<PartOutcome<Float32Array>> {
    const { graph } = this;
    const n = part.labels.length;
    const k = graph.numClasses;
    const smooth = part.labelSmoothing;
    const target = new Float32Array(n * k);
    // As memberLosses: onehot·(1 − ε) + ε/K, in float32.
    for (let r = 0; r < n; r++) {
      for (let c = 0; c < k; c++) {
        const hot = c === part.labels[r] ? 1 : 0;
        target[r * k + c] = Math.fround(hot * Math.fround(1 - smooth)) + Math.fround(smooth / k);
      }
    }
    const weights = part.rowWeights ?? new Float32Array(n).fill(1);
    const scale = Float32Array.from(weights, (w) => w / part.divisor);
    const feeds: Record<string, ort.Tensor> = {
      [GRAD_INPUT]: float32Tensor(part.x, [...part.shape]),
      [GRAD_TARGET]: float32Tensor(target, [n, k]),
      [GRAD_ROW_SCALE]: float32Tensor(scale, [n, 1]),
    };
    const random = seededRandom(part.seed);
    for (const mask of graph.masks) {
      const keep = 1 / (1 - mask.rate);
      const values = new Float32Array(n * mask.width);
      for (let i = 0; i < values.length; i++) values[i] = random() < mask.rate ? 0 : keep;
      feeds[mask.name] = float32Tensor(values, [n, mask.width]);
    }
    const out = await this.session.run(this.weightFeeds(graph, feeds));
    const logits = out[GRAD_LOGITS]!.data as Float32Array;
    let loss = 0;
    let hits = 0;
    for (let r = 0; r < n; r++) {
      const row = logits.subarray(r * k, (r + 1) * k);
      let best = 0;
      for (let c = 1; c < k; c++) if (row[c]! > row[best]!) best = c;
      if (best === part.labels[r]) hits++;
      const top = row[best]!;
      let sum = 0;
      for (let c = 0; c < k; c++) sum += Math.exp(row[c]! - top);
      const lse = top + Math.log(sum);
      let ce = 0;
      for (let c = 0; c < k; c++) ce += target[r * k + c]! * (lse - row[c]!);
      loss += (weights[r]! * ce) / part.divisor;
    }
    return {
      loss,
      hits,
      grads: graph.gradOutputs.map((name) => out[name]!.data as Float32Array),
    };
  }

  /** Releases the session; again is a no-op. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await Promise.all([this.session.release(), this.forwardSession.release()]);
  }
}
