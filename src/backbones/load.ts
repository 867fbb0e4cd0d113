import { createRequire } from 'node:module';
import path from 'node:path';
import * as tf from '@tensorflow/tfjs';
import * as mobilenet from '@tensorflow-models/mobilenet';
import { FinetuneError, invalidOption } from '../errors.js';
import { loadClassifierModel } from '../export/model-dir.js';
import { concatBuffers, fileLoadHandler } from '../io/files.js';
import { sha256 } from '../io/hash.js';
import * as is from '../util/is.js';
import {
  type BackboneSource,
  type BackboneSpec,
  HUB_ALPHAS,
  type Preprocessing,
  resolveBackboneSpec,
} from './registry.js';
import { editTopology } from './topology.js';

/** A loaded backbone: raw RGB pixels (NHWC, 0–255) in, a feature vector out. */
export interface Backbone {
  readonly spec: BackboneSpec;
  readonly format: 'layers' | 'graph';
  readonly inputSize: number;
  readonly featureSize: number;
  readonly preprocessing: Preprocessing;
  /** sha256 over the body's topology and weights: keys embedding caches and lowered models. */
  readonly weightsHash: string;
  /**
   * Layers format only: the body as one functional model (normalisation inside, cut,
   * pooled). Frozen (`trainable = false`) as loaded.
   */
  readonly model: tf.LayersModel | null;
  /**
   * The model.json of an exported classifier whose body weights replaced the source's
   * (`LoadBackboneOptions.body`); absent when the weights are the source's own.
   */
  readonly bodyFrom?: string;
  /** Features for a batch of raw pixels; the caller disposes the result. */
  embed(pixels: tf.Tensor4D): tf.Tensor2D;
  dispose(): void;
}

export interface LoadBackboneOptions {
  /** Square input size; default the backbone's native size. */
  inputSize?: number;
  /** For tfjs-models MobileNets: width multiplier. */
  alpha?: number;
  /** For model.json backbones: where to cut (default: the last layer with a 4-D output). */
  featureLayer?: string;
  /**
   * model.json of a classifier exported by the toolkit on this backbone: its body's weights
   * replace the source's, layer by layer (the fine-tuned body of an earlier run, `--init`).
   */
  body?: string;
}

const require = createRequire(import.meta.url);

interface Artifacts {
  modelTopology: unknown;
  weightSpecs: tf.io.WeightsManifestEntry[];
  weightData: ArrayBuffer;
  userDefinedMetadata?: Record<string, unknown>;
}

/** Reads the nsfwjs MobileNetV2 (topology and uint8 weights live base64 inside JS modules). */
export function nsfwjsArtifacts(model: 'mobilenet_v2'): Artifacts {
  let dir: string;
  try {
    dir = path.join(path.dirname(require.resolve('nsfwjs')), '..', 'models', model);
  } catch (err) {
    throw new FinetuneError('The default backbone needs the npm package nsfwjs: run npm install', {
      cause: err,
    });
  }
  const json = require(path.join(dir, 'model.min.js')) as tf.io.ModelJSON;
  const shards: Buffer[] = [];
  const groups = json.weightsManifest ?? [];
  const n = groups.reduce((k, g) => k + g.paths.length, 0);
  for (let i = 1; i <= n; i++) {
    shards.push(
      Buffer.from(require(path.join(dir, `group1-shard${i}of${n}.min.js`)) as string, 'base64'),
    );
  }
  return {
    modelTopology: json.modelTopology,
    weightSpecs: groups.flatMap((g) => g.weights),
    weightData: concatBuffers(shards),
  };
}

async function modelJsonArtifacts(location: string): Promise<Artifacts & { format?: string }> {
  if (/^https?:\/\//i.test(location)) {
    let a: tf.io.ModelArtifacts | undefined;
    try {
      a = await tf.io.http(location).load!();
    } catch (err) {
      throw new FinetuneError(
        `Could not download the backbone at ${location} (${(err as Error).message}). Offline, copy the model into models/ and pass --backbone models/NAME/model.json`,
        { cause: err },
      );
    }
    return toArtifacts(a);
  }
  return toArtifacts(await fileLoadHandler(location).load!());
}

function toArtifacts(a: tf.io.ModelArtifacts): Artifacts & { format?: string } {
  return {
    modelTopology: a.modelTopology,
    weightSpecs: a.weightSpecs ?? [],
    weightData: a.weightData
      ? tf.io.concatenateArrayBuffers(a.weightData as ArrayBuffer | ArrayBuffer[])
      : new ArrayBuffer(0),
    ...(a.userDefinedMetadata
      ? { userDefinedMetadata: a.userDefinedMetadata as Record<string, unknown> }
      : {}),
    ...(a.format ? { format: a.format } : {}),
  };
}

function rescaleFor(p: Preprocessing): { scale: number; offset: number } {
  const [m0, m1, m2] = p.mean;
  const [s0, s1, s2] = p.std;
  if (m0 !== m1 || m1 !== m2 || s0 !== s1 || s1 !== s2) {
    throw new FinetuneError(
      'Expected the same mean and std for every channel in preprocessing (per-channel normalisation is not supported yet)',
    );
  }
  // (p/255 - mean)/std == p * scale + offset
  return { scale: 1 / (255 * s0), offset: -m0 / s0 };
}

/** Builds the layers body from artifacts: cut, resized, normalisation inside, pooled. */
async function layersBody(
  spec: BackboneSpec,
  a: Artifacts,
  inputSize: number | undefined,
  featureLayer: string,
): Promise<{ model: tf.LayersModel; topology: unknown }> {
  const topology = editTopology(a.modelTopology, {
    cutAt: featureLayer,
    ...(inputSize !== undefined ? { inputSize } : {}),
    rescale: rescaleFor(spec.preprocessing),
  });
  const cut = await tf.loadLayersModel(
    {
      load: async () => ({
        modelTopology: topology as object,
        weightSpecs: a.weightSpecs,
        weightData: a.weightData,
      }),
    },
    { strict: false },
  );
  const out = cut.outputs[0]!;
  let model = cut;
  if (out.shape.length === 4) {
    const pooled = tf.layers
      .globalAveragePooling2d({ name: 'backbone_pool' })
      .apply(out) as tf.SymbolicTensor;
    model = tf.model({ inputs: cut.inputs, outputs: pooled, name: 'backbone' });
  } else if (out.shape.length !== 2) {
    throw new FinetuneError(
      `Expected the feature layer '${featureLayer}' to output a 2-D or 4-D tensor but its shape is [${out.shape.join(', ')}]`,
    );
  }
  model.trainable = false;
  return { model, topology };
}

function layersBackbone(spec: BackboneSpec, model: tf.LayersModel, hash: string): Backbone {
  const shape = model.inputs[0]!.shape;
  return {
    spec,
    format: 'layers',
    inputSize: shape[1] as number,
    featureSize: model.outputs[0]!.shape[1] as number,
    preprocessing: spec.preprocessing,
    weightsHash: hash,
    model,
    embed: (pixels) => model.predict(pixels) as tf.Tensor2D,
    dispose: () => model.dispose(),
  };
}

/** The last layer with a 4-D output: the conv trunk's end, before any pooling or classifier. */
function defaultFeatureLayer(model: tf.LayersModel): string {
  for (let i = model.layers.length - 1; i >= 0; i--) {
    const l = model.layers[i]!;
    const shape = l.outputShape as number[];
    if (Array.isArray(shape) && shape.length === 4 && l.getClassName() !== 'InputLayer')
      return l.name;
  }
  throw new FinetuneError(
    'Expected the backbone to have a layer with a 4-D output; pass --feature-layer NAME',
  );
}

/**
 * Loads a backbone by registry id or model.json path/URL.
 *
 * @example
 *   const bb = await loadBackbone('nsfwjs_mobilenet_v2');        // offline default
 *   const bb = await loadBackbone('models/my_net/model.json', { featureLayer: 'conv5' });
 */
export async function loadBackbone(
  backbone: string | BackboneSpec = 'nsfwjs_mobilenet_v2',
  options: LoadBackboneOptions = {},
): Promise<Backbone> {
  const spec = typeof backbone === 'string' ? resolveBackboneSpec(backbone, options) : backbone;
  const loaded = await sourceRow(spec.source).load(spec, spec.source, options);
  if (options.body === undefined) return loaded;
  try {
    const { model } = await loadClassifierModel(options.body);
    try {
      return withBody(loaded, layerWeights(model), options.body);
    } finally {
      model.dispose();
    }
  } catch (err) {
    loaded.dispose();
    throw err;
  }
}

/** One layer's weights as plain values, in the layer's own order. */
export interface LayerWeight {
  readonly shape: readonly number[];
  readonly values: Float32Array;
}

/** Weights of a model's layers by layer name, copied out of its tensors (the model can go). */
export type LayerWeights = ReadonlyMap<string, readonly LayerWeight[]>;

export function layerWeights(model: tf.LayersModel): LayerWeights {
  const out = new Map<string, LayerWeight[]>();
  for (const layer of model.layers) {
    const weights = layer.getWeights();
    if (!weights.length) continue;
    out.set(
      layer.name,
      weights.map((w) => ({ shape: w.shape, values: (w.dataSync() as Float32Array).slice() })),
    );
  }
  return out;
}

const sameValues = (a: Float32Array, b: Float32Array): boolean =>
  a.length === b.length &&
  Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(
    Buffer.from(b.buffer, b.byteOffset, b.byteLength),
  );

/**
 * The backbone with its body's weights taken from `weights` (the layers of a classifier
 * exported on it; `source` names that classifier's model.json), or the backbone itself
 * when every weight is already the same (a run without a fine-tune stage exports the body
 * as loaded, so its cache entries stay valid). Otherwise the weights hash covers the new
 * values, so embedding caches and lowered models never mix the two bodies, and the
 * backbone remembers `source` so worker threads load the same body. The body model is
 * changed in place: use only the returned backbone.
 */
export function withBody(backbone: Backbone, weights: LayerWeights, source: string): Backbone {
  const model = backbone.model;
  if (!model) {
    throw new FinetuneError(
      `${source}: backbone ${backbone.spec.id} is a graph model, whose weights cannot be replaced`,
    );
  }
  const layers = model.layers.filter((l) => l.weights.length > 0);
  let differs = false;
  for (const layer of layers) {
    const from = weights.get(layer.name);
    const own = layer.getWeights();
    if (!from || from.length !== own.length) {
      throw new FinetuneError(
        `${source}: has no weights for layer '${layer.name}' of backbone ${backbone.spec.id} (not a classifier trained on it)`,
      );
    }
    own.forEach((w, i) => {
      const f = from[i]!;
      if (w.shape.join() !== f.shape.join()) {
        throw new FinetuneError(
          `${source}: layer '${layer.name}' has a weight of shape [${f.shape.join(', ')}] where backbone ${backbone.spec.id} has [${w.shape.join(', ')}]`,
        );
      }
      differs ||= !sameValues(w.dataSync() as Float32Array, f.values);
    });
  }
  if (!differs) return backbone;
  const parts: (string | Uint8Array)[] = [backbone.weightsHash, 'body'];
  for (const layer of layers) {
    const from = weights.get(layer.name)!;
    tf.tidy(() => layer.setWeights(from.map((w) => tf.tensor(w.values, [...w.shape]))));
    parts.push(layer.name);
    for (const w of from) {
      parts.push(
        w.shape.join('x'),
        new Uint8Array(w.values.buffer, w.values.byteOffset, w.values.byteLength),
      );
    }
  }
  return { ...backbone, weightsHash: sha256(...parts), bodyFrom: source };
}

async function nsfwjsBackbone(
  spec: BackboneSpec,
  which: 'mobilenet_v2',
  options: LoadBackboneOptions,
): Promise<Backbone> {
  const a = nsfwjsArtifacts(which);
  const size = options.inputSize ?? spec.inputSize;
  const { model, topology } = await layersBody(spec, a, size, spec.featureLayer!);
  return layersBackbone(
    spec,
    model,
    sha256(JSON.stringify(topology), new Uint8Array(a.weightData)),
  );
}

async function modelJsonBackbone(
  spec: BackboneSpec,
  location: string,
  options: LoadBackboneOptions,
): Promise<Backbone> {
  const a = await modelJsonArtifacts(location);
  const meta = a.userDefinedMetadata?.['preprocessing'] as Preprocessing | undefined;
  const isGraph =
    a.format === 'graph-model' || (a.modelTopology as { node?: unknown })?.node !== undefined;
  if (isGraph) {
    const resolved: BackboneSpec = {
      ...spec,
      format: 'graph',
      ...(meta ? { preprocessing: meta } : {}),
    };
    return graphBackbone(resolved, a, options);
  }
  let featureLayer = options.featureLayer ?? spec.featureLayer;
  if (!featureLayer) {
    const full = await tf.loadLayersModel({ load: async () => a as tf.io.ModelArtifacts });
    featureLayer = defaultFeatureLayer(full);
    full.dispose();
  }
  const resolved: BackboneSpec = {
    ...spec,
    format: 'layers',
    featureLayer,
    ...(meta ? { preprocessing: meta } : {}),
  };
  const { model, topology } = await layersBody(resolved, a, options.inputSize, featureLayer);
  const size = model.inputs[0]!.shape[1] as number;
  return layersBackbone(
    { ...resolved, inputSize: size },
    model,
    sha256(JSON.stringify(topology), new Uint8Array(a.weightData)),
  );
}

async function graphBackbone(
  spec: BackboneSpec,
  a: Artifacts,
  options: LoadBackboneOptions,
): Promise<Backbone> {
  const graph = await tf.loadGraphModel({ load: async () => a as tf.io.ModelArtifacts });
  const inShape = graph.inputs[0]?.shape ?? [];
  const native = typeof inShape[1] === 'number' && inShape[1] > 0 ? inShape[1] : 224;
  const inputSize = options.inputSize ?? native;
  const { scale, offset } = rescaleFor(spec.preprocessing);
  const output = options.featureLayer ?? spec.featureLayer;
  const run = (pixels: tf.Tensor4D): tf.Tensor2D =>
    tf.tidy(() => {
      const x = pixels.mul(scale).add(offset);
      let y = (output ? graph.execute(x, output) : graph.predict(x)) as tf.Tensor;
      if (y.rank === 4) y = y.mean([1, 2]);
      return y.reshape([pixels.shape[0], -1]) as tf.Tensor2D;
    });
  const probe = tf.tidy(() => run(tf.zeros([1, inputSize, inputSize, 3])));
  const featureSize = probe.shape[1];
  probe.dispose();
  return {
    spec: { ...spec, inputSize },
    format: 'graph',
    inputSize,
    featureSize,
    preprocessing: spec.preprocessing,
    weightsHash: sha256(
      JSON.stringify(a.modelTopology),
      new Uint8Array(a.weightData),
      output ?? '',
    ),
    model: null,
    embed: run,
    dispose: () => graph.dispose(),
  };
}

async function hubBackbone(
  spec: BackboneSpec,
  version: 1 | 2,
  alpha: number,
  inputSize?: number,
): Promise<Backbone> {
  if (inputSize !== undefined && inputSize !== 224) {
    throw new FinetuneError(
      `Expected input size 224 for ${spec.id} (TF Hub MobileNets resize internally) but received ${inputSize}`,
    );
  }
  let net: mobilenet.MobileNet;
  try {
    net = await mobilenet.load({ version, alpha: alpha as mobilenet.MobileNetAlpha });
  } catch (err) {
    throw new FinetuneError(
      `Could not download backbone ${spec.id} from TF Hub (${(err as Error).message}). ` +
        'Without network access use the offline default (--backbone nsfwjs_mobilenet_v2) ' +
        'or a local model (--backbone models/NAME/model.json; see models/README.md)',
      { cause: err },
    );
  }
  const embed = (pixels: tf.Tensor4D): tf.Tensor2D =>
    tf.tidy(() => net.infer(pixels, true) as tf.Tensor2D);
  const probe = embed(tf.zeros([1, 224, 224, 3]));
  const featureSize = probe.shape[1];
  probe.dispose();
  return {
    spec,
    format: 'graph',
    inputSize: 224,
    featureSize,
    preprocessing: spec.preprocessing,
    weightsHash: sha256(`tfhub:mobilenet_v${version}_${alpha}`),
    model: null,
    embed,
    dispose: () => undefined,
  };
}

/** A backbone named so that `loadBackbone(backbone, options)` loads it again. */
export interface BackboneReference {
  readonly backbone: string;
  readonly options: LoadBackboneOptions;
}

/** What a run records about its backbone (an exported model's `metadata.backbone`). */
export interface BackboneRecord<S = unknown> {
  readonly id: string;
  readonly source: S;
  readonly inputSize: number;
  readonly featureLayer?: string;
}

/** One kind of backbone source: how it loads, and how it is named again elsewhere. */
export interface BackboneSourceRow<S extends BackboneSource = BackboneSource> {
  /** Loads the backbone of a spec whose source is `source`. */
  load(spec: BackboneSpec, source: S, options: LoadBackboneOptions): Promise<Backbone>;
  /** What a worker thread, or a later run, passes to `loadBackbone` for the same backbone. */
  reference(record: BackboneRecord<S>): BackboneReference;
  /** Checks a source read back from a model's metadata (JSON from disk), in the one wording. */
  parse(source: Readonly<Record<string, unknown>>): S;
}

type SourceTable = {
  readonly [K in BackboneSource['kind']]: BackboneSourceRow<Extract<BackboneSource, { kind: K }>>;
};

const sizeAndLayer = (r: BackboneRecord): LoadBackboneOptions => ({
  inputSize: r.inputSize,
  ...(r.featureLayer ? { featureLayer: r.featureLayer } : {}),
});

/**
 * Backbone sources by kind: a new kind of source is one row here (and its case in
 * `BackboneSource`), never another branch in the code that loads or exports backbones.
 */
export const BACKBONE_SOURCES: SourceTable = Object.freeze({
  nsfwjs: {
    load: (spec, source, options) => nsfwjsBackbone(spec, source.model, options),
    reference: (r) => ({ backbone: r.id, options: sizeAndLayer(r) }),
    parse: (s) => ({
      kind: 'nsfwjs' as const,
      model: is.oneOfValues('backbone.source.model', s['model'], ['mobilenet_v2'] as const),
    }),
  },
  'tfjs-models-mobilenet': {
    load: (spec, source, options) =>
      hubBackbone(spec, source.version, source.alpha, options.inputSize),
    reference: (r) => ({
      backbone: `mobilenet_v${r.source.version}`,
      options: { inputSize: r.inputSize, alpha: r.source.alpha },
    }),
    parse: (s) => {
      const version = s['version'];
      if (version !== 1 && version !== 2)
        throw invalidOption('backbone.source.version', '1 or 2', version);
      const alphas = HUB_ALPHAS[version];
      if (!alphas.includes(s['alpha'] as number))
        throw invalidOption('backbone.source.alpha', `one of ${alphas.join(', ')}`, s['alpha']);
      return { kind: 'tfjs-models-mobilenet' as const, version, alpha: s['alpha'] as number };
    },
  },
  'model-json': {
    load: (spec, source, options) => modelJsonBackbone(spec, source.location, options),
    reference: (r) => ({ backbone: r.source.location, options: sizeAndLayer(r) }),
    parse: (s) => ({
      kind: 'model-json' as const,
      location: is.nonEmptyString('backbone.source.location', s['location']),
    }),
  },
});

/** The row of a source; the one place its kind is looked up. */
function sourceRow(source: BackboneSource): BackboneSourceRow {
  return is.oneOf('backbone source', source.kind, BACKBONE_SOURCES) as BackboneSourceRow;
}

/**
 * How another thread loads the same backbone (only the frozen prefix before
 * `firstUnfrozen` if given): the recipe of a tfjs worker pool.
 */
export function backboneRecipe(
  backbone: Backbone,
  firstUnfrozen?: string,
): { kind: 'backbone'; backbone: string; options: LoadBackboneOptions; firstUnfrozen?: string } {
  const { spec } = backbone;
  const ref = sourceRow(spec.source).reference({
    id: spec.id,
    source: spec.source,
    inputSize: backbone.inputSize,
    ...(spec.featureLayer ? { featureLayer: spec.featureLayer } : {}),
  });
  const options = backbone.bodyFrom ? { ...ref.options, body: backbone.bodyFrom } : ref.options;
  return { kind: 'backbone', ...ref, options, ...(firstUnfrozen ? { firstUnfrozen } : {}) };
}

/**
 * The backbone an exported model's metadata names, checked, as `loadBackbone` arguments.
 *
 * @example
 *   const { backbone, options } = backboneFromRecord(metadata.backbone);
 *   const bb = await loadBackbone(backbone, options);
 */
export function backboneFromRecord(record: BackboneRecord): BackboneReference {
  const raw = record?.source;
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw))
    throw invalidOption('backbone.source', 'an object', raw);
  const kind = (raw as { kind?: unknown }).kind;
  const row = is.oneOf('backbone.source.kind', kind, BACKBONE_SOURCES) as BackboneSourceRow;
  const source = row.parse(raw as Record<string, unknown>);
  return row.reference({
    id: is.nonEmptyString('backbone.id', record.id),
    source,
    inputSize: is.positiveInteger('backbone.inputSize', record.inputSize),
    ...(record.featureLayer !== undefined
      ? { featureLayer: is.nonEmptyString('backbone.featureLayer', record.featureLayer) }
      : {}),
  });
}
