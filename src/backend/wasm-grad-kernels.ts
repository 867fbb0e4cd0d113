/**
 * Gradient kernels missing from @tensorflow/tfjs-backend-wasm 4.22.
 *
 * The wasm backend ships the forward convolutions but not the kernels that
 * backpropagate into a conv filter or through a depthwise conv, and tfjs does
 * not fall back to another backend for a missing kernel: training any conv
 * backbone on wasm throws. These implementations are compositions of kernels
 * wasm does have (XNNPACK matmul, depthwise conv, pad, slice, multiply, sum),
 * which keeps training on wasm roughly an order of magnitude faster than on
 * the pure-JS cpu backend.
 *
 * Supported: NHWC, any strides, 'same' / 'valid' / numeric / explicit padding,
 * any depthwise channel multiplier. Unsupported (throws): NCHW, dilations > 1.
 */
import * as tf from '@tensorflow/tfjs';

type Conv2DInfo = tf.backend_util.Conv2DInfo;
type Pad = 'valid' | 'same' | number | tf.backend_util.ExplicitPadding;
type RoundingMode = 'floor' | 'round' | 'ceil';

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
    // wins; re-registering would also make tfjs log a warning.
    if (tf.getKernel(kernelName, BACKEND) !== undefined) continue;
    tf.registerKernel({ kernelName, backendName: BACKEND, kernelFunc: kernels[kernelName]! });
  }
}

/**
 * Runs `body` as the kernel's implementation. Ops called from inside a kernel
 * are not recorded on the gradient tape (the engine is at kernel depth > 0),
 * and the tidy frees every intermediate. The returned tensor goes to the
 * engine as the kernel output unchanged: a Tensor is a TensorInfo whose data
 * the backend already owns, so the engine adopts it rather than wrapping it.
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
  // A wrapper does not add a backend reference by itself, yet disposing it
  // (the tidy will) drops one: take one for it so the caller's data survives.
  backend.incRef(info.dataId);
  return tf.engine().makeTensorFromTensorInfo(info, backend) as tf.Tensor4D;
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

/**
 * Pads (positive amounts) or crops (negative amounts) the two spatial axes of
 * an NHWC tensor.
 */
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
    out = tf.slice(
      out,
      [0, t, l, 0],
      [n, h - t - Math.max(-bottom, 0), w - l - Math.max(-right, 0), c],
    );
  }
  return out;
}

/**
 * Pads the input so that every kernel tap's window of output positions lies
 * inside it, and transposes it channel-first: [C, N, H, W]. In that layout one
 * tap's window, reshaped to [C, N * outH * outW], is the left operand of a
 * plain (untransposed) matMul, the only form the wasm backend runs on XNNPACK.
 */
function paddedChannelsFirst(x: tf.Tensor4D, info: Conv2DInfo): tf.Tensor4D {
  const { padInfo, outHeight, outWidth, strideHeight, strideWidth } = info;
  const needH = (outHeight - 1) * strideHeight + info.filterHeight;
  const needW = (outWidth - 1) * strideWidth + info.filterWidth;
  const padded = padOrCrop(
    x,
    padInfo.top,
    needH - info.inHeight - padInfo.top,
    padInfo.left,
    needW - info.inWidth - padInfo.left,
  );
  return tf.transpose(padded, [3, 0, 1, 2]);
}

/** The [C, N * outH * outW] input window seen by kernel tap (r, c). */
function tapWindow(xCNHW: tf.Tensor4D, info: Conv2DInfo, r: number, c: number): tf.Tensor2D {
  const { outHeight, outWidth, strideHeight, strideWidth } = info;
  const [channels, n] = xCNHW.shape;
  const window =
    strideHeight === 1 && strideWidth === 1
      ? tf.slice(xCNHW, [0, 0, r, c], [channels, n, outHeight, outWidth])
      : tf.stridedSlice(
          xCNHW,
          [0, 0, r, c],
          [
            channels,
            n,
            r + (outHeight - 1) * strideHeight + 1,
            c + (outWidth - 1) * strideWidth + 1,
          ],
          [1, 1, strideHeight, strideWidth],
        );
  return tf.reshape(window, [channels, n * outHeight * outWidth]);
}

type KernelArgs = Parameters<tf.KernelFunc>[0];

function requireInputs(
  kernelName: string,
  ...infos: (tf.TensorInfo | undefined)[]
): tf.TensorInfo[] {
  return infos.map((info) => {
    if (info == null) throw new Error(`${kernelName}: missing input tensor.`);
    return info;
  });
}

function as4D(shape: number[]): [number, number, number, number] {
  return [shape[0]!, shape[1]!, shape[2]!, shape[3]!];
}

function conv2DBackpropFilter({ inputs, attrs, backend }: KernelArgs): tf.TensorInfo {
  const { strides, pad, dataFormat, dimRoundingMode, filterShape } =
    attrs as unknown as tf.Conv2DBackpropFilterAttrs;
  checkDataFormat(tf.Conv2DBackpropFilter, dataFormat);
  const [x, dy] = requireInputs(tf.Conv2DBackpropFilter, inputs['x'], inputs['dy']);
  const info = tf.backend_util.computeConv2DInfo(
    as4D(x!.shape),
    filterShape,
    strides,
    1,
    pad as Pad,
    dimRoundingMode as RoundingMode | undefined,
    false,
    'channelsLast',
  );
  const { filterHeight, filterWidth, inChannels, outChannels, padInfo } = info;
  const rows = info.batchSize * info.outHeight * info.outWidth;
  return compose(backend as tf.KernelBackend, [x!, dy!], (x4, dy4) => {
    const dy2d = tf.reshape(dy4, [rows, outChannels]);
    const pointwise =
      filterHeight === 1 &&
      filterWidth === 1 &&
      info.strideHeight === 1 &&
      info.strideWidth === 1 &&
      padInfo.top === 0 &&
      padInfo.left === 0;
    if (pointwise) {
      // One product over all positions; transpose whichever operand is
      // smaller so that XNNPACK runs the matMul (it declines transposed ones).
      const x2d = tf.reshape(x4, [rows, inChannels]);
      const dw =
        outChannels < inChannels
          ? tf.transpose(tf.matMul(tf.transpose(dy2d), x2d))
          : tf.matMul(tf.transpose(x2d), dy2d);
      return tf.reshape(dw, filterShape);
    }
    const xCNHW = paddedChannelsFirst(x4, info);
    // dy2d is the right operand of every tap's matMul, so XNNPACK packs it once
    // and reuses the packed copy (its operator cache is keyed by tensor id).
    const taps: tf.Tensor2D[] = [];
    for (let r = 0; r < filterHeight; r++) {
      for (let c = 0; c < filterWidth; c++) {
        taps.push(tf.matMul(tapWindow(xCNHW, info, r, c), dy2d));
      }
    }
    return tf.reshape(tf.stack(taps), filterShape);
  });
}

function depthwiseBackpropFilter({ inputs, attrs, backend }: KernelArgs): tf.TensorInfo {
  const { strides, dilations, pad, dimRoundingMode, filterShape } =
    attrs as unknown as tf.DepthwiseConv2dNativeBackpropFilterAttrs;
  checkDilations(tf.DepthwiseConv2dNativeBackpropFilter, dilations);
  const [x, dy] = requireInputs(tf.DepthwiseConv2dNativeBackpropFilter, inputs['x'], inputs['dy']);
  const info = tf.backend_util.computeConv2DInfo(
    as4D(x!.shape),
    filterShape,
    strides,
    1,
    pad as Pad,
    dimRoundingMode as RoundingMode | undefined,
    true,
  );
  const { filterHeight, filterWidth, inChannels, outChannels } = info;
  const multiplier = outChannels / inChannels;
  const rows = info.batchSize * info.outHeight * info.outWidth;
  return compose(backend as tf.KernelBackend, [x!, dy!], (x4, dy4) => {
    // Channel-first layouts make each per-channel reduction run over the
    // innermost axis, which wasm's Sum does without an extra transpose.
    const xCNHW = paddedChannelsFirst(x4, info);
    const dyT = tf.reshape(tf.transpose(dy4, [3, 0, 1, 2]), [inChannels, multiplier, rows]);
    const taps: tf.Tensor[] = [];
    for (let r = 0; r < filterHeight; r++) {
      for (let c = 0; c < filterWidth; c++) {
        const window = tf.reshape(tapWindow(xCNHW, info, r, c), [inChannels, 1, rows]);
        taps.push(tf.sum(tf.mul(window, dyT), 2));
      }
    }
    return tf.reshape(tf.stack(taps), filterShape);
  });
}

/**
 * Zero-stuffs dy so that a stride-1 convolution over it visits exactly the
 * positions the strided forward convolution produced.
 */
function dilate(dy: tf.Tensor4D, strideHeight: number, strideWidth: number): tf.Tensor4D {
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
  const info = tf.backend_util.computeConv2DInfo(
    inputShape,
    as4D(filter!.shape),
    strides,
    1,
    pad as Pad,
    dimRoundingMode as RoundingMode | undefined,
    true,
  );
  const { filterHeight, filterWidth, inChannels, outChannels, padInfo } = info;
  const multiplier = outChannels / inChannels;
  return compose(backend as tf.KernelBackend, [dy!, filter!], (dy4, filter4) => {
    // dx is the full correlation of zero-stuffed dy with the flipped filter:
    // a stride-1 depthwise conv, which wasm runs natively on XNNPACK.
    const stuffed = dilate(dy4, info.strideHeight, info.strideWidth);
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
    const flipped = tf.reshape(tf.reverse(filter4, [0, 1]), [
      filterHeight,
      filterWidth,
      outChannels,
      1,
    ]) as tf.Tensor4D;
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
