import { FinetuneError } from '../errors.js';

/**
 * Per-channel normalisation applied to pixels scaled to [0, 1]:
 * `x = (p / 255 - mean[c]) / std[c]`. A model trained on [-1, 1] inputs has
 * mean 0.5 and std 0.5; one that wants raw [0, 255] has mean 0 and std 1/255.
 */
export interface Preprocessing {
  readonly mean: readonly [number, number, number];
  readonly std: readonly [number, number, number];
  /** How images reach the input size: squashed (aspect ignored), as Keras and nsfwjs do. */
  readonly resize: 'fill';
}

export type BackboneSource =
  /** A Keras LayersModel bundled as JS modules inside the npm package nsfwjs. */
  | { readonly kind: 'nsfwjs'; readonly model: 'mobilenet_v2' }
  /** A GraphModel from TF Hub through @tensorflow-models/mobilenet (needs the network). */
  | { readonly kind: 'tfjs-models-mobilenet'; readonly version: 1 | 2; readonly alpha: number }
  /** Any tfjs model.json, on disk or at an http(s) URL. */
  | { readonly kind: 'model-json'; readonly location: string };

/**
 * A backbone as data: where its weights come from, what input it wants and where
 * its body ends. The registry below lists the built-in ones; `--backbone PATH/model.json`
 * makes an ad-hoc spec of the same shape.
 */
export interface BackboneSpec {
  readonly id: string;
  readonly description: string;
  readonly source: BackboneSource;
  /** 'layers' models have variables and can be fine-tuned; 'graph' models cannot. */
  readonly format: 'layers' | 'graph';
  /** Native square input size in pixels. */
  readonly inputSize: number;
  readonly preprocessing: Preprocessing;
  /** Name of the layer where the body is cut (layers format); its output is pooled if 4-D. */
  readonly featureLayer?: string;
  /**
   * First layer of each block, in order (for `--unfreeze blocks:K`); layers after the
   * last block's start (e.g. a final 1×1 conv) belong to the last block.
   */
  readonly blocks?: readonly string[];
  readonly offline: boolean;
  readonly licence: string;
  readonly provenance: string;
}

const RANGE_0_1: Preprocessing = { mean: [0, 0, 0], std: [1, 1, 1], resize: 'fill' };
/** @tensorflow-models/mobilenet takes raw pixels and normalises inside its graph. */
const RANGE_0_255: Preprocessing = {
  mean: [0, 0, 0],
  std: [1 / 255, 1 / 255, 1 / 255],
  resize: 'fill',
};

const MOBILENET_V2_BLOCKS: readonly string[] = [
  'expanded_conv_depthwise',
  ...Array.from({ length: 16 }, (_, i) => `block_${i + 1}_expand`),
];

function hubMobileNet(version: 1 | 2, alpha: number): BackboneSpec {
  return {
    id: `mobilenet_v${version}${alpha === 1 ? '' : `_${alpha}`}`,
    description: `MobileNetV${version} (alpha ${alpha}) ImageNet features from TF Hub, via @tensorflow-models/mobilenet`,
    source: { kind: 'tfjs-models-mobilenet', version, alpha },
    format: 'graph',
    inputSize: 224,
    preprocessing: RANGE_0_255,
    offline: false,
    licence: 'Apache-2.0',
    provenance: 'Google, ImageNet-trained; downloaded from TF Hub at run time',
  };
}

/** Alphas that @tensorflow-models/mobilenet publishes for each version. */
export const HUB_ALPHAS: Readonly<Record<1 | 2, readonly number[]>> = Object.freeze({
  1: [0.25, 0.5, 0.75, 1],
  2: [0.5, 0.75, 1],
});

/** The built-in backbones, by id. The first is the default. */
export const BACKBONES: Readonly<Record<string, BackboneSpec>> = Object.freeze({
  nsfwjs_mobilenet_v2: {
    id: 'nsfwjs_mobilenet_v2',
    description:
      'Keras MobileNetV2 (224×224) shipped inside the npm package nsfwjs; body cut at out_relu + global average pooling (1280-d)',
    source: { kind: 'nsfwjs', model: 'mobilenet_v2' },
    format: 'layers',
    inputSize: 224,
    preprocessing: RANGE_0_1,
    featureLayer: 'out_relu',
    blocks: MOBILENET_V2_BLOCKS,
    offline: true,
    licence: 'MIT (nsfwjs)',
    provenance:
      'ImageNet-initialised MobileNetV2 further trained by nsfwjs on its own 5-class data; uint8-quantised weights',
  },
  mobilenet_v1: hubMobileNet(1, 1),
  mobilenet_v2: hubMobileNet(2, 1),
});

export const DEFAULT_BACKBONE = 'nsfwjs_mobilenet_v2';

/**
 * Resolves `--backbone` (+ `--alpha`) to a spec: a registered id, or a path/URL
 * ending in model.json.
 */
export function resolveBackboneSpec(
  backbone: string,
  options: { alpha?: number; featureLayer?: string } = {},
): BackboneSpec {
  if (/model\.json$/i.test(backbone) || /^https?:\/\//i.test(backbone)) {
    return {
      id: backbone,
      description: `tfjs model at ${backbone}`,
      source: { kind: 'model-json', location: backbone },
      format: 'layers', // settled when the file is read
      inputSize: 0, // read from the model
      preprocessing: RANGE_0_1,
      ...(options.featureLayer ? { featureLayer: options.featureLayer } : {}),
      offline: !/^https?:\/\//i.test(backbone),
      licence: 'unknown (user-supplied)',
      provenance: backbone,
    };
  }
  const spec = BACKBONES[backbone];
  if (!spec) {
    throw new FinetuneError(
      `Expected one of ${Object.keys(BACKBONES).join(', ')} or a path/URL to a model.json for backbone but received '${backbone}'`,
    );
  }
  if (options.alpha !== undefined && options.alpha !== 1) {
    if (spec.source.kind !== 'tfjs-models-mobilenet') {
      throw new FinetuneError(
        `Expected no alpha for backbone ${spec.id} (only mobilenet_v1 and mobilenet_v2 take one) but received ${options.alpha}`,
      );
    }
    const allowed = HUB_ALPHAS[spec.source.version];
    if (!allowed.includes(options.alpha)) {
      throw new FinetuneError(
        `Expected one of ${allowed.join(', ')} for alpha of ${spec.id} but received ${options.alpha}`,
      );
    }
    return hubMobileNet(spec.source.version, options.alpha);
  }
  if (options.featureLayer) return { ...spec, featureLayer: options.featureLayer };
  return spec;
}
