import { randomUUID } from 'node:crypto';
import { writeFile } from 'node:fs/promises';
import path from 'node:path';
import * as tf from '@tensorflow/tfjs';
import type { Backbone } from '../backbones/load.js';
import {
  lowerToOnnx,
  ONNX_INPUT,
  ONNX_OUTPUT,
  UnsupportedLayerError,
} from '../engine/onnx/lower.js';
import { applyHead, HEAD_PROBS, type HeadOptions } from '../head/build.js';
import { sha256 } from '../io/hash.js';
import {
  encodeSwag,
  SWAG_DATA_FILE,
  SWAG_MANIFEST_FILE,
  type SwagManifest,
  type SwagState,
} from '../swa/swag.js';
import { VERSION } from '../version.js';
import { CONTRACT, ONNX_METADATA_KEYS, writePreprocessModule } from './contract.js';
import { type ClassifierMetadata, MODEL_DIR, ONNX_FILE, saveClassifier } from './model-dir.js';

/** What an export wrote. */
export interface ExportResult {
  /** The model/ folder. */
  readonly dir: string;
  /** model/model.onnx when the classifier could be lowered (not for graph backbones). */
  readonly onnx: string | null;
  /** The metadata in model.json (model.onnx carries the same, its input NCHW). */
  readonly metadata: ClassifierMetadata;
}

/**
 * Writes `out/model/`: backbone + head as one tfjs layers model (or the head alone, plus a
 * reference to the backbone, for graph-model backbones), with labels, input spec, the
 * preprocessing contract, a run id and the weights' sha256 in its metadata; the same
 * classifier as model.onnx when it can be lowered, carrying the same in its metadata_props;
 * and preprocess.js, the contract's reference code. The full model's input is `pixels` and
 * its output `output` in both files. With `swag`, its state goes beside the model as
 * swag.json (names, shapes, rank, the sha256 of swag.bin) and swag.bin (float32 mean,
 * second moment, deviations), and model.json's metadata records swag.json's sha256; the
 * model's own weights stay what `weights` says (the SWA mean, for SWAG).
 *
 * @param runId identifies this export in both files; default a fresh UUID
 * @param swag a SWAG state named by the exported model's weights (see `exportedSwag`)
 */
export async function exportClassifier(
  out: string,
  backbone: Backbone,
  head: tf.LayersModel,
  headOptions: HeadOptions,
  classes: readonly string[],
  weights: string,
  runId: string = randomUUID(),
  swag: SwagState | null = null,
): Promise<ExportResult> {
  const swagFiles = swag ? swagExport(swag) : null;
  const size = backbone.inputSize;
  const metadataBase = {
    toolkit: 'tfjs-finetune' as const,
    version: VERSION,
    labels: classes,
    input: {
      format: 'raw-rgb' as const,
      size,
      resize: 'fill' as const,
      name: ONNX_INPUT,
      layout: 'nhwc' as const,
      dtype: 'float32' as const,
      shape: [null, size, size, 3],
      range: [0, 255] as const,
    },
    output: { name: ONNX_OUTPUT, shape: [null, classes.length] },
    contract: CONTRACT,
    preprocessing: backbone.preprocessing,
    backbone: {
      id: backbone.spec.id,
      source: backbone.spec.source,
      inputSize: size,
      ...(backbone.spec.featureLayer ? { featureLayer: backbone.spec.featureLayer } : {}),
    },
    weights,
    runId,
    ...(swagFiles ? { swag: swagFiles.record } : {}),
  };
  const writeSwag = async (model: tf.LayersModel) => {
    if (!swag || !swagFiles) return;
    checkSwagNames(swag, model);
    const dir = path.join(out, MODEL_DIR);
    await writeFile(path.join(dir, SWAG_MANIFEST_FILE), swagFiles.text);
    await writeFile(path.join(dir, SWAG_DATA_FILE), swagFiles.data);
  };
  if (!backbone.model) {
    if (swag) checkSwagNames(swag, head);
    const saved = await saveClassifier(head, out, {
      ...metadataBase,
      contents: 'head',
    } satisfies ClassifierMetadata);
    await writePreprocessModule(saved.dir);
    await writeSwag(head);
    return { dir: saved.dir, onnx: null, metadata: saved.metadata };
  }
  const body = backbone.model;
  const { probs } = applyHead(body.outputs[0]!, classes.length, headOptions);
  const full = tf.model({ inputs: body.inputs, outputs: probs, name: 'classifier' });
  try {
    for (const layer of head.layers) {
      if (layer.getClassName() === 'InputLayer' || layer.weights.length === 0) continue;
      full.getLayer(layer.name).setWeights(layer.getWeights());
    }
    if (swag) checkSwagNames(swag, full);
    const inputLayer = full.inputLayers[0]!.name;
    const { dir, metadata } = await saveClassifier(
      full,
      out,
      { ...metadataBase, contents: 'full' } satisfies ClassifierMetadata,
      { [inputLayer]: ONNX_INPUT, [HEAD_PROBS]: ONNX_OUTPUT },
    );
    await writePreprocessModule(dir);
    await writeSwag(full);
    // The same classifier for onnxruntime in any language: NCHW raw pixels in, probabilities out.
    let onnx: string | null = null;
    try {
      await writeFile(
        path.join(dir, ONNX_FILE),
        lowerToOnnx(full, { metadata: onnxMetadata(metadata) }),
      );
      onnx = path.join(dir, ONNX_FILE);
    } catch (err) {
      if (!(err instanceof UnsupportedLayerError)) throw err;
    }
    return { dir, onnx, metadata };
  } finally {
    // The body's layers are shared with `backbone`; only the new head layers belong to `full`.
    for (const layer of full.layers) if (layer.name.startsWith('head_')) layer.dispose();
  }
}

/** model.onnx's metadata_props: model.json's metadata with the input as ONNX takes it (NCHW). */
function onnxMetadata(metadata: ClassifierMetadata): Record<string, string> {
  const size = metadata.input.size;
  const input = { ...metadata.input, layout: 'nchw', shape: [null, 3, size, size] };
  const k = ONNX_METADATA_KEYS;
  return {
    [k.labels]: JSON.stringify(metadata.labels),
    [k.input]: JSON.stringify(input),
    [k.output]: JSON.stringify(metadata.output),
    [k.preprocessing]: JSON.stringify(metadata.contract),
    [k.runId]: metadata.runId ?? '',
    [k.weightsSha256]: metadata.weightsSha256 ?? '',
    [k.metadata]: JSON.stringify({ ...metadata, input }),
  };
}

/** swag.json's text and swag.bin's bytes, and what model.json's metadata says of them. */
function swagExport(state: SwagState): {
  text: string;
  data: Uint8Array;
  record: NonNullable<ClassifierMetadata['swag']>;
} {
  const { manifest, data } = encodeSwag(state);
  const text = `${JSON.stringify(manifest satisfies SwagManifest, null, 2)}\n`;
  return {
    text,
    data,
    record: {
      manifest: SWAG_MANIFEST_FILE,
      manifestSha256: sha256(text),
      rank: manifest.rank,
      snapshots: manifest.count,
    },
  };
}

/** Every SWAG variable must be a weight of the exported model with as many values. */
function checkSwagNames(state: SwagState, model: tf.LayersModel): void {
  const weights = new Map(model.weights.map((w) => [w.originalName, w.shape]));
  state.names.forEach((name, i) => {
    const shape = weights.get(name);
    const n = state.shapes[i]!.reduce((a, b) => a * b, 1);
    if (!shape || shape.reduce<number>((a, b) => a * (b ?? 1), 1) !== n)
      throw new Error(
        `exportClassifier: SWAG variable ${name} [${state.shapes[i]}] is not a weight of the exported model`,
      );
  });
}
