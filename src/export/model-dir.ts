import { access, writeFile } from 'node:fs/promises';
import path from 'node:path';
import * as tf from '@tensorflow/tfjs';
import type { Preprocessing } from '../backbones/registry.js';
import { dataError, fileError } from '../errors.js';
import { fileLoadHandler, fileSaveHandler } from '../io/files.js';

/**
 * What travels inside model.json (`userDefinedMetadata`), so that a user of plain tfjs
 * knows the labels and the input without reading anything else.
 */
export interface ClassifierMetadata {
  readonly toolkit: 'tfjs-finetune';
  readonly version: string;
  readonly labels: readonly string[];
  /** `raw-rgb`: float32 NHWC pixels in 0–255, normalisation inside the model. */
  readonly input: { readonly format: 'raw-rgb'; readonly size: number; readonly resize: 'fill' };
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
}

export const MODEL_DIR = 'model';
/** The ONNX copy of a full classifier, beside model.json. */
export const ONNX_FILE = 'model.onnx';

/** Saves a classifier into `outDir/model/` (model.json + weights.bin) with its metadata. */
export async function saveClassifier(
  model: tf.LayersModel,
  outDir: string,
  metadata: ClassifierMetadata,
): Promise<string> {
  const dir = path.join(outDir, MODEL_DIR);
  model.setUserDefinedMetadata(metadata as unknown as Record<string, unknown>);
  await model.save(fileSaveHandler(dir));
  return dir;
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
  const model = await tf.loadLayersModel(fileLoadHandler(file));
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
  return { model, metadata, file };
}

export async function writeJson(file: string, value: unknown): Promise<void> {
  await writeFile(file, `${JSON.stringify(value, null, 2)}\n`);
}
