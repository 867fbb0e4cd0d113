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
import { VERSION } from '../version.js';
import { CONTRACT, ONNX_METADATA_KEYS, writePreprocessModule } from './contract.js';
import { type ClassifierMetadata, ONNX_FILE, saveClassifier } from './model-dir.js';

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
 * its output `output` in both files.
 *
 * @param runId identifies this export in both files; default a fresh UUID
 */
export async function exportClassifier(
  out: string,
  backbone: Backbone,
  head: tf.LayersModel,
  headOptions: HeadOptions,
  classes: readonly string[],
  weights: string,
  runId: string = randomUUID(),
): Promise<ExportResult> {
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
  };
  if (!backbone.model) {
    const saved = await saveClassifier(head, out, {
      ...metadataBase,
      contents: 'head',
    } satisfies ClassifierMetadata);
    await writePreprocessModule(saved.dir);
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
    const inputLayer = full.inputLayers[0]!.name;
    const { dir, metadata } = await saveClassifier(
      full,
      out,
      { ...metadataBase, contents: 'full' } satisfies ClassifierMetadata,
      { [inputLayer]: ONNX_INPUT, [HEAD_PROBS]: ONNX_OUTPUT },
    );
    await writePreprocessModule(dir);
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
