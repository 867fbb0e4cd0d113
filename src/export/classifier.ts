import { writeFile } from 'node:fs/promises';
import path from 'node:path';
import * as tf from '@tensorflow/tfjs';
import type { Backbone } from '../backbones/load.js';
import { lowerToOnnx, UnsupportedLayerError } from '../engine/onnx/lower.js';
import { applyHead, type HeadOptions } from '../head/build.js';
import { VERSION } from '../version.js';
import { type ClassifierMetadata, ONNX_FILE, saveClassifier } from './model-dir.js';

/** What an export wrote. */
export interface ExportResult {
  /** The model/ folder. */
  readonly dir: string;
  /** model/model.onnx when the classifier could be lowered (not for graph backbones). */
  readonly onnx: string | null;
}

/**
 * Writes `out/model/`: backbone + head as one tfjs layers model (or the head alone, plus a
 * reference to the backbone, for graph-model backbones), with labels and input spec in its
 * metadata, and the same classifier as model.onnx when it can be lowered.
 */
export async function exportClassifier(
  out: string,
  backbone: Backbone,
  head: tf.LayersModel,
  headOptions: HeadOptions,
  classes: readonly string[],
  weights: string,
): Promise<ExportResult> {
  const metadataBase = {
    toolkit: 'tfjs-finetune' as const,
    version: VERSION,
    labels: classes,
    input: { format: 'raw-rgb' as const, size: backbone.inputSize, resize: 'fill' as const },
    preprocessing: backbone.preprocessing,
    backbone: {
      id: backbone.spec.id,
      source: backbone.spec.source,
      inputSize: backbone.inputSize,
      ...(backbone.spec.featureLayer ? { featureLayer: backbone.spec.featureLayer } : {}),
    },
    weights,
  };
  if (!backbone.model) {
    const dir = await saveClassifier(head, out, {
      ...metadataBase,
      contents: 'head',
    } satisfies ClassifierMetadata);
    return { dir, onnx: null };
  }
  const body = backbone.model;
  const { probs } = applyHead(body.outputs[0]!, classes.length, headOptions);
  const full = tf.model({ inputs: body.inputs, outputs: probs, name: 'classifier' });
  try {
    for (const layer of head.layers) {
      if (layer.getClassName() === 'InputLayer' || layer.weights.length === 0) continue;
      full.getLayer(layer.name).setWeights(layer.getWeights());
    }
    const dir = await saveClassifier(full, out, {
      ...metadataBase,
      contents: 'full',
    } satisfies ClassifierMetadata);
    // The same classifier for onnxruntime in any language: NCHW raw pixels in, probabilities out.
    let onnx: string | null = null;
    try {
      await writeFile(path.join(dir, ONNX_FILE), lowerToOnnx(full));
      onnx = path.join(dir, ONNX_FILE);
    } catch (err) {
      if (!(err instanceof UnsupportedLayerError)) throw err;
    }
    return { dir, onnx };
  } finally {
    // The body's layers are shared with `backbone`; only the new head layers belong to `full`.
    for (const layer of full.layers) if (layer.name.startsWith('head_')) layer.dispose();
  }
}
