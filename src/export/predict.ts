import { readFile, stat } from 'node:fs/promises';
import path from 'node:path';
import * as tf from '@tensorflow/tfjs';
import { type Backbone, backboneFromRecord, loadBackbone } from '../backbones/load.js';
import { type BackendOption, initBackend } from '../backend/index.js';
import { embedFiles, type SkippedFile } from '../data/embed.js';
import { listFiles, scanClassFolders } from '../data/scan.js';
import {
  createFrozenModel,
  type EngineContext,
  type EngineOption,
  resolveEngineContext,
} from '../engine/index.js';
import { TfjsFrozenModel } from '../engine/tfjs.js';
import type { FrozenModel } from '../engine/types.js';
import { dataError, FinetuneError, fileError } from '../errors.js';
import { sha256 } from '../io/hash.js';
import {
  decodeSwag,
  SWAG_DATA_FILE,
  SWAG_SCALE,
  SwagPosterior,
  sampleSeed,
  seededNormal,
} from '../swa/swag.js';
import { splitBody } from '../train/finetune.js';
import { argmax } from '../train/fit.js';
import * as is from '../util/is.js';
import { type CalibrationReport, calibrationReport } from './calibration.js';
import { ONNX_METADATA_KEYS, readOnnxMetadata } from './contract.js';
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
  /**
   * SWAG weight sets whose probabilities are averaged (Bayesian model averaging; the model
   * must be exported with `--swag`). Default 1: the exported weights, the SWA mean, as
   * they are. Above 1 the layers before the first sampled one run once per batch on the
   * engine, the sampled ones S times on tfjs in this thread.
   */
  samples?: number;
  /** Seed of the SWAG samples (with samples above 1). Default 0: the same samples every run. */
  seed?: number;
}

/** `--samples`: each sample is one more forward pass per batch. */
export const MAX_SAMPLES = 10_000;

/**
 * Why the model.onnx exported beside a full classifier was not run: `error` false for the
 * normal case of there being none ('no model.onnx'), true when it exists but could not be
 * read (the reason names the file). The classifier then runs as `engine` says: lowered
 * again here, or on tfjs.
 */
export interface OnnxFallback {
  readonly reason: string;
  readonly error: boolean;
}

/** A loaded classifier, ready to run on raw pixels. */
export interface Classifier {
  readonly labels: readonly string[];
  readonly metadata: ClassifierMetadata;
  readonly frozen: FrozenModel;
  readonly engineReason: string | null;
  /** Set when the exported model.onnx was wanted but not used; null otherwise. */
  readonly onnxFallback: OnnxFallback | null;
  /** SWAG weight sets averaged per image (1: the exported weights). */
  readonly samples: number;
  dispose(): Promise<void>;
}

/** Checks samples and seed, returning the samples (default 1) and the seed (default 0). */
function sampling(options: ClassifierRunOptions): { samples: number; seed: number } {
  const samples =
    options.samples === undefined
      ? 1
      : is.integerInRange('samples', options.samples, 1, MAX_SAMPLES);
  if (options.seed === undefined) return { samples, seed: 0 };
  const seed = is.integerInRange('seed', options.seed, 0, 2 ** 31 - 1);
  if (samples === 1) {
    const say = (shown: (k: string) => string) =>
      `${shown('seed')} seeds SWAG samples and needs ${shown('samples')} above 1`;
    throw new FinetuneError(
      say((k) => k),
      { renamed: say },
    );
  }
  return { samples, seed };
}

/**
 * The SWAG state exported beside model.json (swag.json, swag.bin), checked against the
 * sha256 model.json records; a model without one is an error naming its folder.
 */
async function loadSwagState(file: string, metadata: ClassifierMetadata, samples: number) {
  const dir = path.dirname(file);
  const record = metadata.swag;
  if (!record) {
    const say = (shown: (k: string) => string) =>
      `${shown('samples')} ${samples} needs SWAG state beside the model (train with --swag K), and ${dir} has none`;
    throw new FinetuneError(
      say((k) => k),
      { renamed: say },
    );
  }
  const manifestFile = path.join(dir, record.manifest);
  const dataFile = path.join(dir, SWAG_DATA_FILE);
  const read = async (f: string) => {
    try {
      return new Uint8Array(await readFile(f));
    } catch (err) {
      throw dataError(`cannot read the SWAG state model.json names (${(err as Error).message})`, {
        path: f,
      });
    }
  };
  const text = await read(manifestFile);
  if (sha256(text) !== record.manifestSha256)
    throw dataError(
      'does not match the SWAG sha256 in model.json; the model folder was changed after export',
      { path: manifestFile },
    );
  let manifest: unknown;
  try {
    manifest = JSON.parse(new TextDecoder().decode(text));
  } catch {
    throw dataError('is not JSON', { path: manifestFile });
  }
  return decodeSwag(manifest, await read(dataFile), { manifest: manifestFile, data: dataFile });
}

/** The model's weights the SWAG state names, in its order; a missing one names the model file. */
function swagTargets(model: tf.LayersModel, posterior: SwagPosterior, file: string) {
  const weights = new Map(model.weights.map((w) => [w.originalName, w]));
  return posterior.names.map((name, i) => {
    const w = weights.get(name);
    const n = posterior.shapes[i]!.reduce((a, b) => a * b, 1);
    if (!w || w.shape.reduce<number>((a, b) => a * (b ?? 1), 1) !== n)
      throw dataError(`has no weight ${name} of ${n} values, which the SWAG state samples`, {
        path: file,
      });
    return w;
  });
}

type Targets = ReturnType<typeof swagTargets>;

/**
 * `suffix` run once per SWAG weight set, its probabilities averaged: sample s is drawn from
 * `seed` and s, the same for every batch, and written into the weights before its pass.
 */
function swagForward(
  suffix: tf.LayersModel,
  targets: Targets,
  posterior: SwagPosterior,
  samples: number,
  seed: number,
): (x: tf.Tensor) => tf.Tensor {
  return (x) =>
    tf.tidy(() => {
      let sum: tf.Tensor | null = null;
      for (let s = 0; s < samples; s++) {
        const theta = posterior.sample(seededNormal(sampleSeed(seed, s)), SWAG_SCALE);
        targets.forEach((w, i) => {
          w.write(theta[i]!.reshape(w.shape as number[]));
        });
        tf.dispose(theta);
        const y = suffix.predict(x) as tf.Tensor;
        const next: tf.Tensor = sum ? tf.add(sum, y) : y;
        if (sum) tf.dispose([sum, y]);
        sum = next;
      }
      return tf.div(sum!, samples);
    });
}

/** The part before the sampled layers on an engine, then the sampled part S times on tfjs. */
class SampledFrozenModel implements FrozenModel {
  readonly engine: FrozenModel['engine'];
  readonly layout: FrozenModel['layout'];
  readonly inputSize: number;
  constructor(
    private readonly prefix: FrozenModel,
    private readonly cutShape: readonly number[],
    readonly outputSize: number,
    private readonly forward: (x: tf.Tensor) => tf.Tensor,
  ) {
    this.engine = prefix.engine;
    this.layout = prefix.layout;
    this.inputSize = prefix.inputSize;
  }

  async run(batch: Float32Array, n: number): Promise<Float32Array> {
    const acts = await this.prefix.run(batch, n);
    const y = tf.tidy(() =>
      this.forward(tf.tensor(acts.subarray(0, n * this.prefix.outputSize), [n, ...this.cutShape])),
    );
    try {
      return (await y.data()) as Float32Array;
    } finally {
      y.dispose();
    }
  }

  async dispose(): Promise<void> {
    await this.prefix.dispose();
  }
}

/**
 * The classifier for `samples` SWAG weight sets: cut before the first layer the state
 * samples, the part before runs once per batch on the chosen engine (lowered here: the
 * exported model.onnx holds the mean throughout), the part after once per weight set on
 * tfjs, and the probabilities are averaged. For a head-only export the backbone is the
 * part before. `release` undoes the cut's hold on the model's weights.
 */
async function sampledClassifier(
  model: tf.LayersModel,
  backbone: Backbone | null,
  posterior: SwagPosterior,
  sampling: { samples: number; seed: number },
  file: string,
  metadata: ClassifierMetadata,
  context: EngineContext,
): Promise<{ model: FrozenModel; reason: string | null; release: () => void }> {
  const targets = swagTargets(model, posterior, file);
  const size = metadata.input.size;
  const forward = (suffix: tf.LayersModel) =>
    swagForward(suffix, targets, posterior, sampling.samples, sampling.seed);
  const k = metadata.labels.length;
  if (backbone) {
    const featureSize = model.inputs[0]!.shape[1] as number;
    const prefix = new TfjsFrozenModel(size, featureSize, (x) => backbone.embed(x));
    return {
      model: new SampledFrozenModel(prefix, [featureSize], k, forward(model)),
      reason: null,
      release: () => undefined,
    };
  }
  const sampled = new Set<unknown>(targets);
  const first = model.layers.find((l) => l.weights.some((w) => sampled.has(w)))!;
  const inbound = first.inboundNodes[0]?.inputTensors ?? [];
  if (inbound.length === 1 && inbound[0] === model.inputs[0]) {
    // The first layer is sampled: the whole model runs per weight set.
    const prefix = new TfjsFrozenModel(size, size * size * 3, (x) => x.clone());
    return {
      model: new SampledFrozenModel(prefix, [size, size, 3], k, forward(model)),
      reason: null,
      release: () => undefined,
    };
  }
  const split = splitBody(model, first.name);
  try {
    const choice = await createFrozenModel(
      {
        layersModel: split.prefix,
        inputSize: size,
        outputSize: split.cutShape.reduce((a, b) => a * b, 1),
        forward: (x) => split.prefix.predict(x) as tf.Tensor,
      },
      context,
    );
    return {
      model: new SampledFrozenModel(choice.model, split.cutShape, k, forward(split.suffix)),
      reason: choice.reason,
      release: () => split.release(),
    };
  } catch (err) {
    split.release();
    throw err;
  }
}

/** Loads a classifier exported by `train` onto the chosen engine. */
export async function loadClassifier(options: ClassifierRunOptions): Promise<Classifier> {
  if (options.maxBytes !== undefined) is.positiveInteger('maxBytes', options.maxBytes);
  if (options.batchSize !== undefined) is.positiveInteger('batchSize', options.batchSize);
  const { samples, seed } = sampling(options);
  const backend = await initBackend(options.backend ?? 'auto');
  const context = resolveEngineContext({
    engine: options.engine,
    backend,
    threads: options.threads,
    workers: options.workers,
  });
  const { model, metadata, file } = await loadClassifierModel(options.model);
  if (options.batchSize !== undefined) {
    // A batch of pixels must fit in memory; the bound depends on the model's input size.
    const max = is.maxItemsInMemory(3 * metadata.input.size ** 2);
    try {
      is.integerInRange('batchSize', options.batchSize, 1, max);
    } catch (err) {
      model.dispose();
      throw err;
    }
  }
  let bb: Backbone | null = null;
  let posterior: SwagPosterior | null = null;
  try {
    // Read whatever the engine: a model.onnx from another export is refused either way.
    const found =
      metadata.contents === 'full'
        ? await readExportedOnnx(path.join(path.dirname(file), ONNX_FILE), metadata)
        : { bytes: null, fallback: null };
    const exported = context.engine === 'tfjs' ? { bytes: null, fallback: null } : found;
    const onnx = exported.bytes;
    if (metadata.contents === 'head') {
      const ref = backboneFromRecord({ ...metadata.backbone, inputSize: metadata.input.size });
      bb = await loadBackbone(ref.backbone, ref.options);
    }
    const backbone = bb;
    const forward = backbone
      ? (x: tf.Tensor4D) => tf.tidy(() => model.predict(backbone.embed(x)) as tf.Tensor)
      : (x: tf.Tensor4D) => model.predict(x) as tf.Tensor;
    if (samples > 1) {
      posterior = new SwagPosterior(await loadSwagState(file, metadata, samples));
      const owned = posterior;
      const sampled = await sampledClassifier(
        model,
        backbone,
        owned,
        { samples, seed },
        file,
        metadata,
        context,
      );
      return {
        labels: metadata.labels,
        metadata,
        frozen: sampled.model,
        engineReason: sampled.reason,
        onnxFallback: null,
        samples,
        async dispose() {
          await sampled.model.dispose();
          sampled.release();
          owned.dispose();
          model.dispose();
          backbone?.dispose();
        },
      };
    }
    const choice = await createFrozenModel(
      {
        layersModel: bb ? null : model,
        ...(onnx ? { onnx } : {}),
        inputSize: metadata.input.size,
        outputSize: metadata.labels.length,
        forward,
        ...(bb ? {} : { recipe: { kind: 'classifier' as const, model: file } }),
      },
      context,
    );
    return {
      labels: metadata.labels,
      metadata,
      frozen: choice.model,
      engineReason: choice.reason,
      onnxFallback: exported.fallback,
      samples,
      async dispose() {
        await choice.model.dispose();
        model.dispose();
        backbone?.dispose();
      },
    };
  } catch (err) {
    posterior?.dispose();
    model.dispose();
    bb?.dispose();
    throw err;
  }
}

/** ONNX Runtime reads a model through protobuf, which stops at 2 GiB. */
const MAX_ONNX_BYTES = 2 ** 31 - 1;

/**
 * The exported model.onnx, or why not: missing is the normal fallback; anything else (not a
 * regular file, too large, unreadable) is reported, never thrown, since the classifier still
 * runs without it. Stat first: reading a FIFO would block forever. One that model.json does
 * not vouch for (another run id or weights hash, or no metadata where model.json has some)
 * throws: a stale model.onnx must never answer silently.
 */
async function readExportedOnnx(
  file: string,
  metadata: ClassifierMetadata,
): Promise<{ bytes: Uint8Array | null; fallback: OnnxFallback | null }> {
  const fail = (reason: string) => ({ bytes: null, fallback: { reason, error: true } });
  let size: number;
  try {
    const st = await stat(file);
    if (!st.isFile()) return fail(`${file}: not a regular file`);
    size = st.size;
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT')
      return { bytes: null, fallback: { reason: 'no model.onnx', error: false } };
    return fail(`${file}: cannot read (${(err as Error).message})`);
  }
  if (size > MAX_ONNX_BYTES) return fail(`${file}: ${size} bytes, more than ONNX Runtime reads`);
  let bytes: Uint8Array;
  try {
    bytes = new Uint8Array(await readFile(file));
  } catch (err) {
    return fail(`${file}: cannot read (${(err as Error).message})`);
  }
  checkSameExport(file, readOnnxMetadata(bytes, file), metadata);
  return { bytes, fallback: null };
}

/** Throws, naming `file`, when model.onnx's run id or weights hash is not model.json's. */
function checkSameExport(
  file: string,
  props: Readonly<Record<string, string>>,
  metadata: ClassifierMetadata,
): void {
  const pairs = [
    ['run id', props[ONNX_METADATA_KEYS.runId], metadata.runId],
    ['weights sha256', props[ONNX_METADATA_KEYS.weightsSha256], metadata.weightsSha256],
  ] as const;
  for (const [what, onnx, json] of pairs) {
    if ((onnx ?? '') !== (json ?? '')) {
      throw dataError(
        `was not exported with model.json beside it (${what} ${onnx || 'missing'}, model.json has ${json || 'none'}); export again or delete it`,
        { path: file },
      );
    }
  }
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
  /** Why the exported model.onnx was not run, if it was wanted (see `OnnxFallback`). */
  readonly onnxFallback: OnnxFallback | null;
  /** SWAG weight sets averaged per image (1: the exported weights). */
  readonly samples: number;
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
      onnxFallback: classifier.onnxFallback,
      samples: classifier.samples,
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
  /**
   * NLL, Brier score, ECE/MCE and the reliability table of the model's probabilities (15
   * bins; see `calibrationReport`); null when no image could be used.
   */
  readonly calibration: CalibrationReport | null;
  readonly skipped: readonly SkippedFile[];
  readonly engine: string;
  /** Why the exported model.onnx was not run, if it was wanted (see `OnnxFallback`). */
  readonly onnxFallback: OnnxFallback | null;
  /** SWAG weight sets averaged per image (1: the exported weights); calibration is of the average. */
  readonly samples: number;
}

/**
 * Accuracy, per-class precision/recall/F1, the confusion matrix and calibration on a
 * labelled folder.
 */
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
    const labels = result.rows.map((r) => truth[r]!);
    const report = classificationReport(labels, predicted, classifier.labels);
    return {
      ...report,
      calibration: labels.length ? calibrationReport(result.features, labels, k) : null,
      skipped: result.skipped,
      engine: classifier.frozen.engine,
      onnxFallback: classifier.onnxFallback,
      samples: classifier.samples,
    };
  } finally {
    await classifier.dispose();
  }
}
