import { readFile, stat } from 'node:fs/promises';
import path from 'node:path';
import * as tf from '@tensorflow/tfjs';
import { type Backbone, loadBackbone } from '../backbones/load.js';
import type { BackboneSpec } from '../backbones/registry.js';
import { type BackendOption, initBackend } from '../backend/index.js';
import { embedFiles, type SkippedFile } from '../data/embed.js';
import { listFiles, scanClassFolders } from '../data/scan.js';
import { createFrozenModel, type EngineOption } from '../engine/index.js';
import type { FrozenModel } from '../engine/types.js';
import { FinetuneError, fileError } from '../errors.js';
import { argmax } from '../train/fit.js';
import * as is from '../util/is.js';
import { type ClassificationReport, classificationReport } from './metrics.js';
import { type ClassifierMetadata, loadClassifierModel, ONNX_FILE } from './model-dir.js';

export interface ClassifierRunOptions {
  /** Run folder, its model/ folder, or a model.json. */
  model: string;
  /** Default 'auto'. */
  backend?: BackendOption;
  /** Default 'auto'. */
  engine?: EngineOption;
  /** ONNX Runtime threads. Default all cores. */
  threads?: number;
  /** Images per batch. Default 16. */
  batchSize?: number;
  /** Worker threads of the tfjs engine on wasm. Default all cores. */
  workers?: number;
  /** Largest image file read, in bytes; larger files are skipped unread. Default 256 MiB. */
  maxBytes?: number;
}

/** A loaded classifier, ready to run on raw pixels. */
export interface Classifier {
  readonly labels: readonly string[];
  readonly metadata: ClassifierMetadata;
  readonly frozen: FrozenModel;
  readonly engineReason: string | null;
  dispose(): Promise<void>;
}

/** Loads a classifier exported by `train` onto the chosen engine. */
export async function loadClassifier(options: ClassifierRunOptions): Promise<Classifier> {
  if (options.maxBytes !== undefined) is.positiveInteger('maxBytes', options.maxBytes);
  const backend = await initBackend(options.backend ?? 'auto');
  const { model, metadata, file } = await loadClassifierModel(options.model);
  const onnx =
    metadata.contents === 'full' && options.engine !== 'tfjs'
      ? await readOptional(path.join(path.dirname(file), ONNX_FILE))
      : null;
  let backbone: Backbone | null = null;
  if (metadata.contents === 'head') {
    backbone = await loadBackbone(specFromMetadata(metadata), { inputSize: metadata.input.size });
  }
  const bb = backbone;
  const forward = bb
    ? (x: tf.Tensor4D) => tf.tidy(() => model.predict(bb.embed(x)) as tf.Tensor)
    : (x: tf.Tensor4D) => model.predict(x) as tf.Tensor;
  try {
    const choice = await createFrozenModel(
      {
        layersModel: bb ? null : model,
        ...(onnx ? { onnx } : {}),
        inputSize: metadata.input.size,
        outputSize: metadata.labels.length,
        forward,
        hash: null,
        ...(bb ? {} : { recipe: { kind: 'classifier' as const, model: file } }),
      },
      {
        engine: options.engine ?? 'auto',
        backend,
        ...(options.threads !== undefined ? { threads: options.threads } : {}),
        ...(options.workers !== undefined ? { workers: options.workers } : {}),
      },
    );
    return {
      labels: metadata.labels,
      metadata,
      frozen: choice.model,
      engineReason: choice.reason,
      async dispose() {
        await choice.model.dispose();
        model.dispose();
        bb?.dispose();
      },
    };
  } catch (err) {
    model.dispose();
    bb?.dispose();
    throw err;
  }
}

async function readOptional(file: string): Promise<Uint8Array | null> {
  try {
    return new Uint8Array(await readFile(file));
  } catch {
    return null;
  }
}

function specFromMetadata(m: ClassifierMetadata): BackboneSpec | string {
  const src = m.backbone.source as BackboneSpec['source'];
  if (src.kind === 'model-json') return src.location;
  if (src.kind === 'tfjs-models-mobilenet')
    return src.version === 1 ? 'mobilenet_v1' : 'mobilenet_v2';
  return m.backbone.id;
}

export interface PredictOptions extends ClassifierRunOptions {
  /** Image files and/or folders (searched recursively). */
  inputs: readonly string[];
  /** Labels per image, best first. Default 3. */
  topK?: number;
}

export interface Prediction {
  readonly path: string;
  readonly top: readonly { readonly label: string; readonly probability: number }[];
}

export interface PredictResult {
  readonly predictions: readonly Prediction[];
  readonly skipped: readonly SkippedFile[];
  readonly engine: string;
  readonly labels: readonly string[];
}

/** Expands files and folders into a sorted file list; a missing path is an error naming it. */
export async function expandInputs(inputs: readonly string[]): Promise<string[]> {
  const out: string[] = [];
  for (const input of inputs) {
    let s: Awaited<ReturnType<typeof stat>>;
    try {
      s = await stat(input);
    } catch {
      throw fileError(input, 'no such file or folder');
    }
    if (s.isDirectory()) out.push(...(await listFiles(input)));
    else out.push(input);
  }
  return out;
}

/**
 * Top-k labels for images and folders of images.
 *
 * @example const { predictions } = await predict({ model: 'runs/r1', inputs: ['a.jpg'], topK: 1 });
 */
export async function predict(options: PredictOptions): Promise<PredictResult> {
  const topK = is.positiveInteger('topK', options.topK ?? 3);
  if (!options.inputs?.length)
    throw new FinetuneError(
      'Expected at least one image file or folder for inputs but received none',
    );
  const files = await expandInputs(options.inputs);
  const classifier = await loadClassifier(options);
  try {
    const k = classifier.labels.length;
    const result = await embedFiles(files, classifier.frozen, {
      batchSize: options.batchSize ?? 16,
      ...(options.maxBytes !== undefined ? { maxBytes: options.maxBytes } : {}),
    });
    const predictions = result.rows.map((r, i) => {
      const probs = Array.from(result.features.subarray(i * k, (i + 1) * k));
      const order = probs.map((p, c) => [p, c] as const).sort((a, b) => b[0] - a[0]);
      return {
        path: files[r]!,
        top: order
          .slice(0, Math.min(topK, k))
          .map(([p, c]) => ({ label: classifier.labels[c]!, probability: p })),
      };
    });
    return {
      predictions,
      skipped: result.skipped,
      engine: classifier.frozen.engine,
      labels: classifier.labels,
    };
  } finally {
    await classifier.dispose();
  }
}

export interface EvaluateOptions extends ClassifierRunOptions {
  /** Folder of class folders named like the model's labels. */
  data: string;
}

export interface EvaluateResult extends ClassificationReport {
  readonly skipped: readonly SkippedFile[];
  readonly engine: string;
}

/** Accuracy, per-class precision/recall/F1 and the confusion matrix on a labelled folder. */
export async function evaluate(options: EvaluateOptions): Promise<EvaluateResult> {
  const classifier = await loadClassifier(options);
  try {
    const scanned = await scanClassFolders(options.data, classifier.labels);
    const files: string[] = [];
    const truth: number[] = [];
    for (const [name, list] of scanned.files) {
      const label = classifier.labels.indexOf(name);
      for (const f of list) {
        files.push(f);
        truth.push(label);
      }
    }
    if (!files.length) throw new FinetuneError(`${options.data}: no images found in class folders`);
    const k = classifier.labels.length;
    const result = await embedFiles(files, classifier.frozen, {
      batchSize: options.batchSize ?? 16,
      ...(options.maxBytes !== undefined ? { maxBytes: options.maxBytes } : {}),
    });
    const predicted = result.rows.map((_, i) => argmax(result.features, i * k, k));
    const report = classificationReport(
      result.rows.map((r) => truth[r]!),
      predicted,
      classifier.labels,
    );
    return { ...report, skipped: result.skipped, engine: classifier.frozen.engine };
  } finally {
    await classifier.dispose();
  }
}
