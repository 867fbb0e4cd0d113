/**
 * Gradient kernels missing from @tensorflow/tfjs-backend-wasm 4.22.
 *
 * The wasm backend ships the forward convolutions but not the kernels that
 * backpropagate into a conv filter or through a depthwise conv, and tfjs does
 * not fall back to another backend for a missing kernel: training a conv
 * backbone on wasm throws. These kernels are compositions of ops the wasm
 * backend runs natively (mostly on XNNPACK), which keeps training on wasm far
 * faster than on the pure-JS cpu backend.
 *
 * Supported: NHWC, any strides, 'same' / 'valid' / numeric / explicit padding,
 * any depthwise channel multiplier. Unsupported (throws): NCHW, dilations > 1
 * (tfjs' own conv gradients reject those before reaching a kernel anyway).
 */
import * as tf from '@tensorflow/tfjs';

type Conv2DInfo = tf.backend_util.Conv2DInfo;
type Pad = 'valid' | 'same' | number | tf.backend_util.ExplicitPadding;
type RoundingMode = 'floor' | 'round' | 'ceil';
type KernelArgs = Parameters<tf.KernelFunc>[0];

export const WASM_GRADIENT_KERNELS: readonly string[] = Object.freeze([
  tf.Conv2DBackpropFilter,
  tf.DepthwiseConv2dNativeBackpropInput,
  tf.DepthwiseConv2dNativeBackpropFilter,
]);

const BACKEND = 'wasm';

export function registerWasmGradientKernels(): void {
  const kernels: Record<string, tf.KernelFunc> = {
    [tf.Conv2DBackpropFilter]: conv2DBackpropFilter,
    [tf.DepthwiseConv2dNativeBackpropInput]: depthwiseBackpropInput,
    [tf.DepthwiseConv2dNativeBackpropFilter]: depthwiseBackpropFilter,
  };
  for (const kernelName of WASM_GRADIENT_KERNELS) {
    // A native kernel from a newer tfjs-backend-wasm (or an earlier call)
    // wins; registering over it would also make tfjs log a warning.
    if (tf.getKernel(kernelName, BACKEND) !== undefined) continue;
    tf.registerKernel({ kernelName, backendName: BACKEND, kernelFunc: kernels[kernelName]! });
  }
  wrapNative(tf.Conv2DBackpropInput, pointwiseBackpropInput);
  overrideClipGradient();
  wrapNative(tf.Identity, sharedIdentity);
  wrapNative(tf.Sum, leadingSum);
}

const wrapped = new Set<string>();

/**
 * Puts `wrap(native)` in place of wasm's own `kernelName`, once: the wrapper takes the
 * cases it speeds up and hands the rest to the native kernel. Nothing happens without a
 * native kernel to wrap.
 */
function wrapNative(kernelName: string, wrap: (native: tf.KernelFunc) => tf.KernelFunc): void {
  if (wrapped.has(kernelName)) return;
  const native = tf.getKernel(kernelName, BACKEND);
  if (!native) return;
  tf.unregisterKernel(kernelName, BACKEND);
  tf.registerKernel({ ...native, kernelFunc: wrap(native.kernelFunc) });
  wrapped.add(kernelName);
}

/**
 * wasm's Identity kernel copies its input, and tfjs runs it on every tensor an op saves
 * for its gradient (the engine keeps a clone of each): 264 MB copied, and held until the
 * step ends, in a three-block MobileNetV2 fine-tune step at batch 32. It now shares the
 * input's memory by reference count, as wasm's own Reshape does and as the cpu backend's
 * Identity does; no wasm kernel writes into its inputs, so a shared buffer never changes.
 * Strings keep the native kernel.
 */
function sharedIdentity(native: tf.KernelFunc): tf.KernelFunc {
  return (args) => {
    const x = (args.inputs as tf.IdentityInputs).x as tf.TensorInfo | undefined;
    if (!x || x.dtype === 'string') return native(args);
    (args.backend as unknown as { incRef(dataId: tf.DataId): void }).incRef(x.dataId);
    return { dataId: x.dataId, shape: x.shape, dtype: x.dtype };
  };
}

/**
 * wasm's Sum over leading axes of a rank-3+ tensor (a bias's or a BatchNorm's gradient: a
 * sum over batch, height and width) transposes the whole tensor in 4-D before adding:
 * 1.6 ms for [8, 7, 7, 960]. Seen as the 2-D [rows, cols] it is (a free reshape), the same
 * kernel takes 0.8 ms; a three-block MobileNetV2 fine-tune step of 8 rows sums 12 such
 * gradients. (A matMul by ones is no faster: wasm packs its right operand on every call.)
 * Other reductions keep the native kernel as they are.
 */
function leadingSum(native: tf.KernelFunc): tf.KernelFunc {
  return (args) => {
    const x = (args.inputs as tf.SumInputs).x as tf.TensorInfo | undefined;
    if (!x || x.shape.length < 3) return native(args);
    const { axis, keepDims } = args.attrs as unknown as tf.SumAttrs;
    const axes = tf.util.parseAxisParam(axis, x.shape).sort((a, b) => a - b);
    const k = axes.length;
    if (k === 0 || k === x.shape.length || axes.some((a, i) => a !== i)) return native(args);
    const rows = tf.util.sizeFromShape(x.shape.slice(0, k));
    const cols = tf.util.sizeFromShape(x.shape.slice(k));
    const shape = keepDims ? x.shape.map((d, i) => (i < k ? 1 : d)) : x.shape.slice(k);
    return compose(args.backend as tf.KernelBackend, [x], (t) =>
      tf.reshape(tf.sum(tf.reshape(t, [rows, cols]), 0), shape),
    );
  };
}

/** The one-pass gradient kernel of ClipByValue (ReLU6 in MobileNetV2) on wasm. */
export const CLIP_GRAD_KERNEL = 'FinetuneClipByValueGrad';

let clipOverride = false;

/**
 * tfjs's ClipByValue gradient (MobileNetV2's ReLU6 on every layer) is five kernels,
 * GreaterEqual, LessEqual, LogicalAnd, ZerosLike and Select, each a full pass over the
 * activation: about 7% of a three-block fine-tune step. On wasm it becomes one pass in
 * JavaScript over the backend's own memory, with the same result: dy where
 * min ≤ x ≤ max, else 0 (NaN included). Other backends keep tfjs's gradient.
 */
function overrideClipGradient(): void {
  if (clipOverride) return;
  const original = tf.getGradient(tf.ClipByValue);
  if (!original) return;
  tf.registerKernel({ kernelName: CLIP_GRAD_KERNEL, backendName: BACKEND, kernelFunc: clipGrad });
  tf.registerGradient({
    ...original,
    gradFunc: (dy, saved, attrs) => {
      const [x] = saved;
      if (tf.getBackend() !== BACKEND || x?.dtype !== 'float32' || !(dy instanceof tf.Tensor))
        return original.gradFunc(dy, saved, attrs);
      return {
        x: () => tf.engine().runKernel(CLIP_GRAD_KERNEL, { dy, x }, attrs) as tf.Tensor,
      };
    },
  });
  clipOverride = true;
}

interface WasmMemory {
  makeOutput(shape: number[], dtype: tf.DataType): tf.TensorInfo;
  typedArrayFromHeap(info: tf.TensorInfo): Float32Array;
}

function clipGrad({ inputs, attrs, backend }: KernelArgs): tf.TensorInfo {
  const [dy, x] = requireInputs(CLIP_GRAD_KERNEL, inputs['dy'], inputs['x']);
  const { clipValueMin: lo, clipValueMax: hi } = attrs as unknown as tf.ClipByValueAttrs;
  const wasm = backend as unknown as WasmMemory;
  const out = wasm.makeOutput(x.shape, 'float32');
  // Views after makeOutput: growing the heap detaches the earlier ones.
  const o = wasm.typedArrayFromHeap(out);
  const d = wasm.typedArrayFromHeap(dy);
  const v = wasm.typedArrayFromHeap(x);
  for (let i = 0; i < o.length; i++) {
    const xi = v[i]!;
    o[i] = xi >= lo && xi <= hi ? d[i]! : 0;
  }
  return out;
}

/**
 * wasm's own Conv2DBackpropInput is a plain C++ loop, not XNNPACK: 718 ms of a 1.7 s
 * three-block MobileNetV2 training step (batch 16). For the 1×1 stride-1 convolutions
 * that make up most of MobileNetV2 it is one matMul, dx = dy · Wᵀ (measured: that step
 * 1.70 s → 1.02 s). Every other shape still goes to the native kernel.
 */
function pointwiseBackpropInput(native: tf.KernelFunc): tf.KernelFunc {
  return (args) => {
    const { inputs, attrs, backend } = args;
    const { strides, pad, dataFormat, dimRoundingMode, inputShape, dilations } =
      attrs as unknown as tf.Conv2DBackpropInputAttrs & { dilations?: number | [number, number] };
    const dy = inputs['dy'];
    const filter = inputs['filter'];
    if (!dy || !filter || dataFormat === 'NCHW' || filter.shape[0] !== 1 || filter.shape[1] !== 1)
      return native(args);
    const dilated =
      dilations !== undefined &&
      (Array.isArray(dilations) ? dilations.some((d) => d !== 1) : dilations !== 1);
    const info = convInfo(inputShape, filter.shape, strides, pad, dimRoundingMode);
    if (dilated || !isPointwise(info)) return native(args);
    return compose(backend as tf.KernelBackend, [dy, filter], (dy4, w4) => {
      const rows = info.batchSize * info.inHeight * info.inWidth;
      // Explicit transposes: wasm hands a matMul to XNNPACK only without transpose flags.
      const w2d = tf.transpose(tf.reshape(w4, [info.inChannels, info.outChannels]));
      return tf.reshape(tf.matMul(tf.reshape(dy4, [rows, info.outChannels]), w2d), inputShape);
    });
  };
}

/**
 * Ops called from inside a kernel are not recorded on the gradient tape (the
 * engine is at kernel depth > 0), and the tidy frees every intermediate. The
 * resulting tensor goes to the engine as the kernel output unchanged: a Tensor
 * is a TensorInfo whose data the backend already holds, so the engine adopts
 * it instead of wrapping it a second time.
 */
function compose(
  backend: tf.KernelBackend,
  inputs: tf.TensorInfo[],
  body: (...ts: tf.Tensor4D[]) => tf.Tensor,
): tf.Tensor {
  return tf.tidy(() => body(...inputs.map((info) => asTensor(backend, info))));
}

function asTensor(backend: tf.KernelBackend, info: tf.TensorInfo): tf.Tensor4D {
  if (info instanceof tf.Tensor) return info as tf.Tensor4D;
  // A wrapper adds no backend reference, but disposing it (the tidy will)
  // drops one; take one for it so that the caller's data survives.
  backend.incRef(info.dataId);
  return tf.engine().makeTensorFromTensorInfo(info, backend) as tf.Tensor4D;
}

function requireInputs(kernelName: string, ...infos: (tf.TensorInfo | undefined)[]) {
  return infos.map((info) => {
    if (info == null) throw new Error(`${kernelName}: missing input tensor.`);
    return info;
  });
}

function as4D(shape: number[]): [number, number, number, number] {
  if (shape.length !== 4) throw new Error(`Expected a rank-4 tensor, got shape [${shape}].`);
  return [shape[0]!, shape[1]!, shape[2]!, shape[3]!];
}

function checkDataFormat(kernelName: string, dataFormat: string | undefined): void {
  if (dataFormat != null && dataFormat !== 'NHWC') {
    throw new Error(
      `${kernelName} on the wasm backend supports only dataFormat 'NHWC', got '${dataFormat}'.`,
    );
  }
}

function checkDilations(kernelName: string, dilations: number | [number, number] | undefined) {
  if (dilations == null) return;
  const [dh, dw] = typeof dilations === 'number' ? [dilations, dilations] : dilations;
  if (dh !== 1 || dw !== 1) {
    throw new Error(
      `${kernelName} on the wasm backend supports only dilations 1, got [${dh}, ${dw}].`,
    );
  }
}

/** Pads (positive amounts) or crops (negative amounts) the spatial axes of NHWC. */
function padOrCrop(
  x: tf.Tensor4D,
  top: number,
  bottom: number,
  left: number,
  right: number,
): tf.Tensor4D {
  let out = x;
  if (top > 0 || bottom > 0 || left > 0 || right > 0) {
    out = tf.pad(out, [
      [0, 0],
      [Math.max(top, 0), Math.max(bottom, 0)],
      [Math.max(left, 0), Math.max(right, 0)],
      [0, 0],
    ]);
  }
  if (top < 0 || bottom < 0 || left < 0 || right < 0) {
    const [n, h, w, c] = out.shape;
    const t = Math.max(-top, 0);
    const l = Math.max(-left, 0);
    const newH = h - t - Math.max(-bottom, 0);
    const newW = w - l - Math.max(-right, 0);
    // Sliced as [N, H, W*C] so that wasm's JS Slice copies whole row segments
    // rather than one C-sized chunk per pixel.
    const rows = tf.slice(tf.reshape(out, [n, h, w * c]), [0, t, l * c], [n, newH, newW * c]);
    out = tf.reshape(rows, [n, newH, newW, c]);
  }
  return out;
}

/**
 * The input, padded or cropped to exactly the rows and columns that some
 * kernel tap reads: (out - 1) * stride + kernel along each spatial axis.
 */
function inputWindow(x: tf.Tensor4D, info: Conv2DInfo): tf.Tensor4D {
  const { padInfo } = info;
  const needH = (info.outHeight - 1) * info.strideHeight + info.filterHeight;
  const needW = (info.outWidth - 1) * info.strideWidth + info.filterWidth;
  return padOrCrop(
    x,
    padInfo.top,
    needH - info.inHeight - padInfo.top,
    padInfo.left,
    needW - info.inWidth - padInfo.left,
  );
}

/** An NHWC conv's geometry (regular or depthwise). */
function convInfo(
  xShape: number[],
  filterShape: number[],
  strides: number | [number, number],
  pad: unknown,
  dimRoundingMode: unknown,
  depthwise = false,
): Conv2DInfo {
  return tf.backend_util.computeConv2DInfo(
    as4D(xShape),
    as4D(filterShape),
    strides,
    1,
    pad as Pad,
    dimRoundingMode as RoundingMode | undefined,
    depthwise,
    'channelsLast',
  );
}

/** A 1×1, stride-1, unpadded conv: each of its gradients is a single matMul. */
function isPointwise(info: Conv2DInfo): boolean {
  const p = info.padInfo;
  return (
    info.filterHeight === 1 &&
    info.filterWidth === 1 &&
    info.strideHeight === 1 &&
    info.strideWidth === 1 &&
    p.top === 0 &&
    p.left === 0 &&
    p.bottom === 0 &&
    p.right === 0
  );
}

function conv2DBackpropFilter({ inputs, attrs, backend }: KernelArgs): tf.TensorInfo {
  const { strides, pad, dataFormat, dimRoundingMode, filterShape } =
    attrs as unknown as tf.Conv2DBackpropFilterAttrs;
  checkDataFormat(tf.Conv2DBackpropFilter, dataFormat);
  const [x, dy] = requireInputs(tf.Conv2DBackpropFilter, inputs['x'], inputs['dy']);
  const info = convInfo(x.shape, filterShape, strides, pad, dimRoundingMode);
  const { inChannels, outChannels } = info;
  return compose(backend as tf.KernelBackend, [x, dy], (x4, dy4) => {
    if (isPointwise(info)) {
      // dW = x^T dy over all positions. wasm hands a matMul to XNNPACK only
      // without transpose flags, so transpose the narrower operand explicitly.
      const rows = info.batchSize * info.outHeight * info.outWidth;
      const x2d = tf.reshape(x4, [rows, inChannels]);
      const dy2d = tf.reshape(dy4, [rows, outChannels]);
      const dw =
        outChannels < inChannels
          ? tf.transpose(tf.matMul(tf.transpose(dy2d), x2d))
          : tf.matMul(tf.transpose(x2d), dy2d);
      return tf.reshape(dw, filterShape);
    }
    // With batch and channels swapped, the filter gradient is itself a
    // convolution: input x as [Ci, H, W, N], filter dy as [outH, outW, N, Co]
    // dilated by the stride, output [Ci, kh, kw, Co]. That runs as a single
    // XNNPACK conv, whereas slicing out each tap's strided window would go
    // through wasm's per-element StridedSlice, which is very slow.
    const xT = tf.transpose(inputWindow(x4, info), [3, 1, 2, 0]);
    const dyT = tf.transpose(dy4, [1, 2, 0, 3]);
    const dw = tf.conv2d(xT, dyT, 1, 'valid', 'NHWC', [info.strideHeight, info.strideWidth]);
    return tf.transpose(dw, [1, 2, 0, 3]);
  });
}

function depthwiseBackpropFilter({ inputs, attrs, backend }: KernelArgs): tf.TensorInfo {
  const { strides, dilations, pad, dimRoundingMode, filterShape } =
    attrs as unknown as tf.DepthwiseConv2dNativeBackpropFilterAttrs;
  checkDilations(tf.DepthwiseConv2dNativeBackpropFilter, dilations);
  const [x, dy] = requireInputs(tf.DepthwiseConv2dNativeBackpropFilter, inputs['x'], inputs['dy']);
  const info = convInfo(x.shape, filterShape, strides, pad, dimRoundingMode, true);
  const { batchSize, filterHeight, filterWidth, inChannels, outChannels } = info;
  const multiplier = outChannels / inChannels;
  return compose(backend as tf.KernelBackend, [x, dy], (x4, dy4) => {
    // Folding the batch into the channels turns the filter gradient into a
    // depthwise conv: input x as [1, H, W, N*C], filter dy as
    // [outH, outW, N*C, multiplier] dilated by the stride, output
    // [1, kh, kw, N*C*multiplier]; then sum over N. On 7x7 to 28x28 maps this
    // one native conv is 5-40x faster than per-tap slice/multiply/sum, whose
    // slices go through slow JS or per-element wasm copies.
    const window = inputWindow(x4, info);
    const [, height, width] = window.shape;
    const xFolded = tf.reshape<tf.Rank.R4>(tf.transpose(window, [1, 2, 0, 3]), [
      1,
      height,
      width,
      batchSize * inChannels,
    ]);
    const dyFolded = tf.reshape<tf.Rank.R4>(tf.transpose(dy4, [1, 2, 0, 3]), [
      info.outHeight,
      info.outWidth,
      batchSize * inChannels,
      multiplier,
    ]);
    const perSample = tf.depthwiseConv2d(xFolded, dyFolded, 1, 'valid', 'NHWC', [
      info.strideHeight,
      info.strideWidth,
    ]);
    const taps = filterHeight * filterWidth;
    const summed = tf.sum(tf.reshape(perSample, [taps, batchSize, outChannels]), 1);
    return tf.reshape(summed, filterShape);
  });
}

/**
 * Zero-stuffs dy (stride - 1 zeros after each element along H and W) so that a
 * stride-1 convolution over it visits exactly the strided forward positions.
 */
function zeroStuff(dy: tf.Tensor4D, strideHeight: number, strideWidth: number): tf.Tensor4D {
  if (strideHeight === 1 && strideWidth === 1) return dy;
  const [n, h, w, c] = dy.shape;
  const spread = tf.pad(tf.reshape(dy, [n, h, 1, w, 1, c]), [
    [0, 0],
    [0, 0],
    [0, strideHeight - 1],
    [0, 0],
    [0, strideWidth - 1],
    [0, 0],
  ]);
  return tf.reshape(spread, [n, h * strideHeight, w * strideWidth, c]);
}

function depthwiseBackpropInput({ inputs, attrs, backend }: KernelArgs): tf.TensorInfo {
  const { strides, dilations, pad, dimRoundingMode, inputShape } =
    attrs as unknown as tf.DepthwiseConv2dNativeBackpropInputAttrs;
  checkDilations(tf.DepthwiseConv2dNativeBackpropInput, dilations);
  const [dy, filter] = requireInputs(
    tf.DepthwiseConv2dNativeBackpropInput,
    inputs['dy'],
    inputs['filter'],
  );
  const info = convInfo(inputShape, filter.shape, strides, pad, dimRoundingMode, true);
  const { filterHeight, filterWidth, inChannels, outChannels, padInfo } = info;
  const multiplier = outChannels / inChannels;
  return compose(backend as tf.KernelBackend, [dy, filter], (dy4, filter4) => {
    // dx is the full correlation of zero-stuffed dy with the spatially flipped
    // filter: a stride-1 depthwise conv, which wasm runs on XNNPACK. Padding
    // is passed to the conv (no copy) unless some side needs cropping.
    const stuffed = zeroStuff(dy4, info.strideHeight, info.strideWidth);
    const top = filterHeight - 1 - padInfo.top;
    const left = filterWidth - 1 - padInfo.left;
    const bottom = info.inHeight + filterHeight - 1 - top - stuffed.shape[1];
    const right = info.inWidth + filterWidth - 1 - left - stuffed.shape[2];
    const cropped = padOrCrop(
      stuffed,
      Math.min(top, 0),
      Math.min(bottom, 0),
      Math.min(left, 0),
      Math.min(right, 0),
    );
    const flipped = tf.reshape<tf.Rank.R4>(tf.reverse(filter4, [0, 1]), [
      filterHeight,
      filterWidth,
      outChannels,
      1,
    ]);
    const dx = tf.depthwiseConv2d(cropped, flipped, 1, [
      [0, 0],
      [Math.max(top, 0), Math.max(bottom, 0)],
      [Math.max(left, 0), Math.max(right, 0)],
      [0, 0],
    ]);
    if (multiplier === 1) return dx;
    const [n, h, w] = dx.shape;
    return tf.sum(tf.reshape(dx, [n, h, w, inChannels, multiplier]), 4);
  });
}
