import { access, writeFile } from 'node:fs/promises';
import path from 'node:path';
import * as tf from '@tensorflow/tfjs';
import type { Preprocessing } from '../backbones/registry.js';
import { dataError, FinetuneError, fileError } from '../errors.js';
import { fileLoadHandler, fileSaveHandler } from '../io/files.js';
import { sha256 } from '../io/hash.js';
import type { PreprocessingContract } from './contract.js';

/** What the model takes: the contract's pixels as float32 0–255. */
export interface InputSpec {
  /** `raw-rgb`: float32 pixels in 0–255, normalisation inside the model. */
  readonly format: 'raw-rgb';
  readonly size: number;
  readonly resize: 'fill';
  /** Name of the input (the same in model.json and model.onnx). */
  readonly name?: string;
  /** model.json takes NHWC, model.onnx NCHW. */
  readonly layout?: 'nhwc' | 'nchw';
  readonly dtype?: 'float32';
  /** null: any batch size. */
  readonly shape?: readonly (number | null)[];
  readonly range?: readonly [number, number];
}

/**
 * What travels inside model.json (`userDefinedMetadata`), so that a user of plain tfjs
 * knows the labels and the input without reading anything else.
 */
export interface ClassifierMetadata {
  readonly toolkit: 'tfjs-finetune';
  readonly version: string;
  readonly labels: readonly string[];
  readonly input: InputSpec;
  /** The output's name and shape: [batch, labels] probabilities. */
  readonly output?: { readonly name: string; readonly shape: readonly (number | null)[] };
  /** How an image file becomes the input's pixels; absent in exports before it existed. */
  readonly contract?: PreprocessingContract;
  /** Identifies one export; model.onnx carries the same id. */
  readonly runId?: string;
  /** sha256 of weights.bin, set when saving; model.onnx carries the same hash. */
  readonly weightsSha256?: string;
  /** The normalisation the model applies internally (for reference). */
  readonly preprocessing: Preprocessing;
  /** 'full': backbone + head in this model; 'head': features in, the backbone is `backbone`. */
  readonly contents: 'full' | 'head';
  readonly backbone: {
    readonly id: string;
    readonly source: unknown;
    readonly inputSize: number;
    readonly featureLayer?: string;
  };
  /** Which weights were exported (the last stage's SWA average, its raw weights, …). */
  readonly weights: string;
  /** SWAG state beside the model (`--swag`): its manifest file and that file's sha256. */
  readonly swag?: {
    readonly manifest: string;
    readonly manifestSha256: string;
    readonly rank: number;
    readonly snapshots: number;
  };
}

export const MODEL_DIR = 'model';
/** The weights of model.json, as `saveClassifier` writes them (one shard). */
export const WEIGHTS_FILE = 'weights.bin';
/** The ONNX copy of a full classifier, beside model.json. */
export const ONNX_FILE = 'model.onnx';

/**
 * Saves a classifier into `outDir/model/` (model.json + weights.bin) with its metadata, the
 * sha256 of weights.bin added to it, and layers renamed as `rename` says (old → new name;
 * for layers without weights, such as the input and the output activation, so that
 * model.json and model.onnx name their input and output alike). Returns the folder and the
 * metadata as written.
 */
export async function saveClassifier(
  model: tf.LayersModel,
  outDir: string,
  metadata: ClassifierMetadata,
  rename: Readonly<Record<string, string>> = {},
): Promise<{ dir: string; metadata: ClassifierMetadata }> {
  const dir = path.join(outDir, MODEL_DIR);
  const inner = fileSaveHandler(dir);
  let written = metadata;
  await model.save(
    tf.io.withSaveHandler(async (artifacts) => {
      const data = artifacts.weightData
        ? new Uint8Array(
            tf.io.concatenateArrayBuffers(artifacts.weightData as ArrayBuffer | ArrayBuffer[]),
          )
        : new Uint8Array(0);
      written = { ...metadata, weightsSha256: sha256(data) };
      return inner.save!({
        ...artifacts,
        modelTopology: renameLayers(
          artifacts.modelTopology as tf.io.ModelJSON['modelTopology'],
          rename,
        ),
        weightData: data.buffer as ArrayBuffer,
        userDefinedMetadata: written as unknown as tf.io.ModelArtifacts['userDefinedMetadata'],
      });
    }),
  );
  return { dir, metadata: written };
}

type Topology = {
  config?: {
    layers?: { name?: string; config?: { name?: string }; inbound_nodes?: unknown[] }[];
    input_layers?: unknown[];
    output_layers?: unknown[];
  };
};

/**
 * Renames layers in a Keras functional topology: the layer entries and every reference to
 * them ([name, node, tensor, kwargs] lists in inbound nodes, input and output layers).
 * Weight names are not touched, so only layers without weights may be renamed.
 */
export function renameLayers(
  topology: tf.io.ModelJSON['modelTopology'],
  rename: Readonly<Record<string, string>>,
): tf.io.ModelJSON['modelTopology'] {
  if (Object.keys(rename).length === 0) return topology;
  const copy = structuredClone(topology) as Topology;
  const config = copy.config;
  if (!config?.layers)
    throw new FinetuneError('Expected a functional model topology to rename layers in');
  const ref = (entry: unknown): void => {
    if (Array.isArray(entry) && typeof entry[0] === 'string') {
      entry[0] = rename[entry[0]] ?? entry[0];
    } else if (Array.isArray(entry)) for (const e of entry) ref(e);
  };
  const found = new Set<string>();
  for (const layer of config.layers) {
    const to = layer.name !== undefined ? rename[layer.name] : undefined;
    if (to !== undefined) {
      found.add(layer.name!);
      layer.name = to;
      if (layer.config) layer.config.name = to;
    }
    for (const node of layer.inbound_nodes ?? []) ref(node);
  }
  ref(config.input_layers);
  ref(config.output_layers);
  for (const from of Object.keys(rename)) {
    if (!found.has(from)) throw new FinetuneError(`Expected a layer named '${from}' to rename`);
  }
  return copy as tf.io.ModelJSON['modelTopology'];
}

/**
 * Finds model.json from what the user passed: a run folder, its model/ folder, or the
 * model.json itself.
 */
export async function locateModelJson(location: string): Promise<string> {
  const candidates = location.endsWith('.json')
    ? [location]
    : [path.join(location, MODEL_DIR, 'model.json'), path.join(location, 'model.json')];
  for (const c of candidates) {
    try {
      await access(c);
      return c;
    } catch {
      // try the next
    }
  }
  throw fileError(
    location,
    'no model found (expected a run folder from finetune train, its model/ folder or a model.json)',
  );
}

/** Loads a classifier saved by `saveClassifier` and its metadata. */
export async function loadClassifierModel(
  location: string,
): Promise<{ model: tf.LayersModel; metadata: ClassifierMetadata; file: string }> {
  const file = await locateModelJson(location);
  const inner = fileLoadHandler(file);
  let weightsSha256 = '';
  const model = await tf.loadLayersModel({
    load: async () => {
      const artifacts = await inner.load!();
      const data = artifacts.weightData as ArrayBuffer | ArrayBuffer[] | undefined;
      weightsSha256 = sha256(new Uint8Array(data ? tf.io.concatenateArrayBuffers(data) : []));
      return artifacts;
    },
  });
  const metadata = model.getUserDefinedMetadata() as ClassifierMetadata | undefined;
  if (metadata?.toolkit !== 'tfjs-finetune' || !Array.isArray(metadata.labels)) {
    model.dispose();
    throw fileError(file, 'is not a tfjs-finetune classifier (no labels in its metadata)');
  }
  const outputs = model.outputs[0]?.shape.at(-1);
  if (model.outputs.length !== 1 || metadata.labels.length !== outputs) {
    model.dispose();
    throw dataError(
      `has ${metadata.labels.length} labels in its metadata but the model has ${outputs} outputs`,
      { path: file },
    );
  }
  // Exports since the preprocessing contract carry the hash of the weights they were saved with.
  if (metadata.weightsSha256 !== undefined && metadata.weightsSha256 !== weightsSha256) {
    model.dispose();
    throw dataError(
      `does not match the weights sha256 in model.json (${weightsSha256}, model.json has ${metadata.weightsSha256}); the model folder was changed after export`,
      { path: path.join(path.dirname(file), WEIGHTS_FILE) },
    );
  }
  return { model, metadata, file };
}

export async function writeJson(file: string, value: unknown): Promise<void> {
  await writeFile(file, `${JSON.stringify(value, null, 2)}\n`);
}
