import { mkdir, writeFile } from 'node:fs/promises';
import path from 'node:path';
import * as tf from '@tensorflow/tfjs';
import { type Backbone, backboneRecipe, loadBackbone } from '../backbones/load.js';
import { DEFAULT_BACKBONE, resolveBackboneSpec } from '../backbones/registry.js';
import { type BackendInfo, type BackendOption, initBackend } from '../backend/index.js';
import { type AugmentKind, parseAugment } from '../data/augment.js';
import { defaultCacheDir, EmbeddingCache } from '../data/cache.js';
import {
  EMBED_CONCURRENCY,
  type EmbedProgress,
  embedFiles,
  type LazyFrozenModel,
  type SkippedFile,
} from '../data/embed.js';
import { type LabelledFile, loadSplits, type Splits } from '../data/scan.js';
import {
  createFrozenModel,
  type EngineChoice,
  type EngineContext,
  type EngineOption,
  resolveEngineContext,
} from '../engine/index.js';
import { lowerToOnnx, UnsupportedLayerError } from '../engine/onnx/lower.js';
import { FinetuneError, invalidOption } from '../errors.js';
import { classificationReport } from '../export/metrics.js';
import {
  type ClassifierMetadata,
  ONNX_FILE,
  saveClassifier,
  writeJson,
} from '../export/model-dir.js';
import { applyHead, buildHead, dropoutSeeder, logitsView } from '../head/build.js';
import * as is from '../util/is.js';
import { VERSION, versions } from '../version.js';
import type { EpochLogs, TrainingCallback } from './callbacks.js';
import {
  cacheNamespace,
  type FineTuneResult,
  graphModelError,
  parseUnfreeze,
  runFineTune,
} from './finetune.js';
import { ArrayBatches, argmax, balancedWeights, type Evaluation, evaluateBatches } from './fit.js';
import type { OptimizerName } from './optimizers.js';
import { OPTIMIZERS } from './optimizers.js';
import { runStage, type StageResult } from './stage.js';

/** Everything `train` accepts. Only `data` is required; the rest shows its default. */
export interface TrainOptions {
  /** Folder of class folders, or with train/ val/ test/ folders. */
  data: string;
  /** Run folder. Default `runs/<timestamp>`. */
  out?: string;
  /** Registry id or path/URL of a model.json. Default 'nsfwjs_mobilenet_v2' (offline). */
  backbone?: string;
  /** Width multiplier for the TF Hub MobileNets. */
  alpha?: number;
  /** Cut layer for model.json backbones. */
  featureLayer?: string;
  /** Square input size. Default the backbone's own (224). */
  inputSize?: number;
  /** tfjs backend for training. Default 'auto' (node-gpu > node > wasm). */
  backend?: BackendOption;
  /** Engine of frozen passes. Default 'auto' (onnx unless it cannot). */
  engine?: EngineOption;
  /** ONNX Runtime threads. Default all cores. */
  threads?: number;
  /** Worker threads of the tfjs engine on wasm (the fallback of frozen passes). Default all cores. */
  workers?: number;
  /** Held-out fraction per class when there is no val/ folder. Default 0.2. */
  valSplit?: number;
  /** Seed of split, shuffles, initialisation and dropout. Default 42. */
  seed?: number;
  /** Head-stage epochs. Default 40. */
  epochs?: number;
  /** Default 32. */
  batchSize?: number;
  /** Default 'adam'. */
  optimizer?: OptimizerName;
  /**
   * Default 0.01: on cached features the head is a small convex-ish problem; with the
   * sample set this reaches the tuned logistic-regression probe where 1e-3 stays ~7 points short.
   */
  lr?: number;
  /** Default 0.1. */
  labelSmoothing?: number;
  /** Default 'none'. */
  classWeights?: 'balanced' | 'none';
  /** Units of a hidden layer in the head; 0 = none. Default 0. */
  hidden?: number;
  /** Dropout in the head. Default 0.2. */
  dropout?: number;
  /** Stochastic Weight Averaging over the head's trainable variables. Default true. */
  swa?: boolean;
  /** Epoch (≥ 1) or fraction of the epochs (< 1) where SWA starts. Default 0.75. */
  swaStart?: number;
  /** Epochs between SWA snapshots. Default 1. */
  swaFreq?: number;
  /** Constant LR once SWA starts. Default lr / 2. */
  swaLr?: number;
  /** Epochs of cosine annealing from lr to swaLr. Default 0 (switch at once). */
  swaAnnealEpochs?: number;
  /** Images per frozen-pass batch. Default 16. */
  embedBatchSize?: number;
  /** Images in flight (read, hashed, decoded) at once while embedding. Default 8. */
  decodeConcurrency?: number;
  /** Larger images (width × height) are skipped as unusable. Default 100,000,000. */
  maxPixels?: number;
  /** Keep embeddings and lowered models on disk between runs. Default true. */
  cache?: boolean;
  /** Default `$XDG_CACHE_HOME/tfjs-finetune`, else `~/.cache/tfjs-finetune`. */
  cacheDir?: string;
  /** Epochs of the fine-tune stage after the head stage; 0 (the default) means none. */
  finetuneEpochs?: number;
  /**
   * What trains in the fine-tune stage: 'all', 'from:LAYER' or 'blocks:K'. Default
   * 'blocks:3' for backbones that name blocks (the last three MobileNetV2 blocks + the
   * final 1×1 conv), else 'all'.
   */
  unfreeze?: string;
  /**
   * Default lr / 100 (1e-4 with the default head LR), the ratio of Keras's fine-tuning
   * guide: with Adam, a tenth of the head LR (1e-3) wrecked the pretrained top in the
   * first epoch on the sample set (val acc 0.74 → 0.48) where 1e-4 kept it.
   */
  finetuneLr?: number;
  /** Keep BatchNorm gamma/beta frozen too. Default false (they train; statistics never do). */
  freezeBn?: boolean;
  /** Default swaStart. */
  finetuneSwaStart?: number;
  /** Default swaFreq. */
  finetuneSwaFreq?: number;
  /** Default finetuneLr / 2. */
  finetuneSwaLr?: number;
  /** Pixel-space augmentation for the fine-tune stage, e.g. ['flip', 'crop']. Default none. */
  augment?: readonly AugmentKind[] | string;
  /** Augmented views cached per image (cycled over the epochs). Default finetuneEpochs (a fresh view each epoch). */
  augmentViews?: number;
  /** 'last' (default): the last stage's SWA (or raw) weights; 'best': whichever scored best on validation. */
  keep?: 'last' | 'best';
  /** Progress and results as they happen; the library itself prints nothing. */
  onEvent?: (event: TrainEvent) => void;
}

export type TrainEvent =
  | { type: 'backend'; backend: BackendInfo }
  | { type: 'backbone'; id: string; inputSize: number; featureSize: number }
  | { type: 'engine'; engine: string; reason: string | null }
  | { type: 'data'; classes: readonly string[]; counts: Record<string, number> }
  | { type: 'warning'; message: string }
  | { type: 'embed-progress'; progress: EmbedProgress }
  | { type: 'skipped'; file: SkippedFile }
  | { type: 'epoch'; logs: EpochLogs; epochs: number }
  | { type: 'stage-end'; stage: string; raw: number | null; swa: number | null }
  | { type: 'done'; summary: TrainSummary };

export interface ValFigures {
  readonly loss: number;
  readonly acc: number;
}

export interface TrainSummary {
  readonly out: string;
  readonly classes: readonly string[];
  readonly counts: Record<'train' | 'val' | 'test', Record<string, number>>;
  readonly skipped: readonly SkippedFile[];
  readonly warnings: readonly string[];
  readonly backend: string;
  readonly engine: string;
  readonly engineReason: string | null;
  /** Images whose features came from the embedding cache. */
  readonly cachedEmbeddings: number;
  readonly backbone: string;
  readonly stages: Record<
    string,
    {
      raw: ValFigures | null;
      swa: ValFigures | null;
      snapshots: number;
      kept: string;
      unfreezeFrom?: string;
      batchSize?: number;
      trainableVariables?: number;
    }
  >;
  /** Which weights model/ holds. */
  readonly exported: string;
  /** model/model.onnx when the classifier could be lowered (not for graph backbones). */
  readonly onnx: string | null;
  readonly val: ValFigures | null;
  readonly test: (ValFigures & { macroF1: number }) | null;
  readonly seconds: Record<string, number>;
}

/** The options with every default filled in, as written to config.json. */
export type ResolvedTrainOptions = Required<
  Omit<
    TrainOptions,
    | 'onEvent'
    | 'alpha'
    | 'featureLayer'
    | 'inputSize'
    | 'threads'
    | 'workers'
    | 'unfreeze'
    | 'augment'
  >
> &
  Pick<
    TrainOptions,
    'alpha' | 'featureLayer' | 'inputSize' | 'threads' | 'workers' | 'unfreeze'
  > & {
    augment: AugmentKind[];
  };

function timestamp(): string {
  return new Date().toISOString().replace(/[:.]/g, '-').replace('T', '_').slice(0, 19);
}

/** Fills defaults and validates every option at the boundary, in one wording. */
export function resolveTrainOptions(o: TrainOptions): ResolvedTrainOptions {
  if (!o || typeof o.data !== 'string' || !o.data)
    throw invalidOption('data', 'a folder of class folders', o?.data);
  const lr = is.positiveNumber('lr', o.lr ?? 0.01);
  const epochs = is.positiveInteger('epochs', o.epochs ?? 40);
  const r: ResolvedTrainOptions = {
    data: o.data,
    out: o.out ?? path.join('runs', timestamp()),
    backbone: o.backbone ?? DEFAULT_BACKBONE,
    backend: o.backend ?? 'auto',
    engine: o.engine ?? 'auto',
    valSplit: is.numberInRange('valSplit', o.valSplit ?? 0.2, 0, 1, true),
    seed: is.integer('seed', o.seed ?? 42),
    epochs,
    batchSize: is.positiveInteger('batchSize', o.batchSize ?? 32),
    optimizer: is.oneOfValues(
      'optimizer',
      o.optimizer ?? 'adam',
      Object.keys(OPTIMIZERS) as OptimizerName[],
    ),
    lr,
    labelSmoothing: is.numberInRange('labelSmoothing', o.labelSmoothing ?? 0.1, 0, 1, true),
    classWeights: is.oneOfValues('classWeights', o.classWeights ?? 'none', [
      'balanced',
      'none',
    ] as const),
    hidden: is.nonNegativeInteger('hidden', o.hidden ?? 0),
    dropout: is.numberInRange('dropout', o.dropout ?? 0.2, 0, 1, true),
    swa: is.boolean('swa', o.swa ?? true),
    swaStart: o.swaStart ?? 0.75,
    swaFreq: is.positiveInteger('swaFreq', o.swaFreq ?? 1),
    swaLr: is.positiveNumber('swaLr', o.swaLr ?? lr / 2),
    swaAnnealEpochs: is.nonNegativeInteger('swaAnnealEpochs', o.swaAnnealEpochs ?? 0),
    embedBatchSize: is.positiveInteger('embedBatchSize', o.embedBatchSize ?? 16),
    decodeConcurrency: is.positiveInteger(
      'decodeConcurrency',
      o.decodeConcurrency ?? EMBED_CONCURRENCY,
    ),
    maxPixels: is.positiveInteger('maxPixels', o.maxPixels ?? 100_000_000),
    cache: is.boolean('cache', o.cache ?? true),
    cacheDir: o.cacheDir ?? defaultCacheDir(),
    finetuneEpochs: is.nonNegativeInteger('finetuneEpochs', o.finetuneEpochs ?? 0),
    finetuneLr: is.positiveNumber('finetuneLr', o.finetuneLr ?? lr / 100),
    freezeBn: is.boolean('freezeBn', o.freezeBn ?? false),
    finetuneSwaStart: 0,
    finetuneSwaFreq: 1,
    finetuneSwaLr: 0,
    augment: parseAugment(o.augment as string | readonly string[] | undefined),
    augmentViews: 1,
    keep: is.oneOfValues('keep', o.keep ?? 'last', ['last', 'best'] as const),
  };
  const ftGiven = (
    [
      'unfreeze',
      'finetuneLr',
      'freezeBn',
      'finetuneSwaStart',
      'finetuneSwaFreq',
      'finetuneSwaLr',
      'augment',
      'augmentViews',
      'keep',
    ] as const
  ).filter((k) => o[k] !== undefined);
  if (r.finetuneEpochs === 0 && ftGiven.length) {
    throw new FinetuneError(`${ftGiven.join(', ')} need a fine-tune stage (finetuneEpochs > 0)`);
  }
  if (o.unfreeze !== undefined) {
    parseUnfreeze(o.unfreeze);
    r.unfreeze = o.unfreeze;
  }
  r.finetuneSwaStart = o.finetuneSwaStart ?? r.swaStart;
  r.finetuneSwaFreq = is.positiveInteger('finetuneSwaFreq', o.finetuneSwaFreq ?? r.swaFreq);
  r.finetuneSwaLr = is.positiveNumber('finetuneSwaLr', o.finetuneSwaLr ?? r.finetuneLr / 2);
  r.augmentViews = is.positiveInteger(
    'augmentViews',
    o.augmentViews ?? Math.max(1, r.finetuneEpochs),
  );
  if (o.augmentViews !== undefined && !r.augment.length) {
    throw new FinetuneError('augmentViews needs augment (e.g. flip,crop)');
  }
  if (r.finetuneEpochs > 0 && r.swa) {
    const fs = r.finetuneSwaStart;
    const fe = r.finetuneEpochs;
    if (!Number.isFinite(fs) || fs < 0 || fs >= fe || (fs >= 1 && !Number.isInteger(fs))) {
      throw invalidOption(
        'finetuneSwaStart',
        `an epoch from 1 to ${fe - 1} or a fraction of the fine-tune epochs below 1`,
        fs,
      );
    }
  }
  if (o.alpha !== undefined) r.alpha = is.positiveNumber('alpha', o.alpha);
  if (o.featureLayer !== undefined)
    r.featureLayer = is.nonEmptyString('featureLayer', o.featureLayer);
  if (o.inputSize !== undefined) r.inputSize = is.positiveInteger('inputSize', o.inputSize);
  if (o.threads !== undefined) r.threads = is.positiveInteger('threads', o.threads);
  if (o.workers !== undefined) r.workers = is.positiveInteger('workers', o.workers);
  if (!r.swa) {
    const given = (
      [
        'swaStart',
        'swaFreq',
        'swaLr',
        'swaAnnealEpochs',
        'finetuneSwaStart',
        'finetuneSwaFreq',
        'finetuneSwaLr',
      ] as const
    ).filter((k) => o[k] !== undefined);
    if (given.length)
      throw new FinetuneError(`${given.join(', ')} cannot be used with swa turned off`);
  } else {
    // Validated here so a bad value fails before any image is decoded.
    const start = r.swaStart;
    if (
      typeof start !== 'number' ||
      !Number.isFinite(start) ||
      start < 0 ||
      start >= epochs ||
      (start >= 1 && !Number.isInteger(start))
    ) {
      throw invalidOption(
        'swaStart',
        `an epoch from 1 to ${epochs - 1} or a fraction of the epochs below 1`,
        start,
      );
    }
  }
  return r;
}

function countBy(
  files: readonly LabelledFile[],
  rows: readonly number[] | null,
  classes: readonly string[],
): Record<string, number> {
  const counts = Object.fromEntries(classes.map((c) => [c, 0]));
  const picked = rows ? rows.map((r) => files[r]!) : files;
  for (const f of picked) counts[classes[f.label]!]!++;
  return counts;
}

/** Features of a list of files; rows that could not be decoded are dropped. */
interface Embedded {
  readonly files: readonly LabelledFile[];
  readonly features: Float32Array;
  readonly labels: Int32Array;
}

function figures(e: Evaluation | null): ValFigures | null {
  return e ? { loss: e.loss, acc: e.acc } : null;
}

/**
 * Trains a classifier on a folder of images: scan and split, embed every image once
 * through the frozen backbone, train the head with SWA over its trainable variables,
 * evaluate raw and averaged weights, export backbone + head with labels and records.
 *
 * @example
 *   const summary = await train({ data: 'photos', out: 'runs/r1', epochs: 20 });
 *   console.log(summary.val?.acc);
 */
export async function train(options: TrainOptions): Promise<TrainSummary> {
  const o = resolveTrainOptions(options);
  const emit = options.onEvent ?? (() => undefined);
  const seconds: Record<string, number> = {};
  const t0 = performance.now();
  let mark = t0;
  const lap = (name: string): void => {
    const now = performance.now();
    seconds[name] = (now - mark) / 1000;
    mark = now;
  };

  const backend = await initBackend(o.backend);
  emit({ type: 'backend', backend });
  const engineContext = resolveEngineContext({
    engine: o.engine,
    backend,
    threads: o.threads,
    workers: o.workers,
    cacheDir: o.cache ? o.cacheDir : null,
  });
  const splits = await loadSplits(o.data, { valSplit: o.valSplit, seed: o.seed });
  for (const w of splits.warnings) emit({ type: 'warning', message: w });
  lap('scan');

  const spec = resolveBackboneSpec(o.backbone, {
    ...(o.alpha !== undefined ? { alpha: o.alpha } : {}),
    ...(o.featureLayer !== undefined ? { featureLayer: o.featureLayer } : {}),
  });
  // Known graph models fail before anything is downloaded or decoded.
  if (o.finetuneEpochs > 0 && spec.format === 'graph') throw graphModelError(spec.id);
  // alpha and the feature layer are already in the spec.
  const backbone = await loadBackbone(
    spec,
    o.inputSize !== undefined ? { inputSize: o.inputSize } : {},
  );
  const cache = o.cache ? new EmbeddingCache(o.cacheDir) : null;
  if (o.finetuneEpochs > 0 && !backbone.model) {
    backbone.dispose();
    throw graphModelError(backbone.spec.id);
  }
  emit({
    type: 'backbone',
    id: backbone.spec.id,
    inputSize: backbone.inputSize,
    featureSize: backbone.featureSize,
  });
  let head: tf.LayersModel | null = null;
  try {
    lap('load');
    const { embedded, skipped, cached, engine, engineReason } = await embedSplits(
      splits,
      backbone,
      o,
      engineContext,
      cache,
      emit,
    );
    lap('embed');
    const [trainSet, valSet, testSet] = embedded;
    const numClasses = splits.classes.length;
    const counts = {
      train: countBy(trainSet!.files, null, splits.classes),
      val: countBy(valSet!.files, null, splits.classes),
      test: countBy(testSet!.files, null, splits.classes),
    };
    const usable = splits.classes.filter((c) => counts.train[c]! > 0);
    if (usable.length < 2) {
      throw new FinetuneError(
        `${o.data}: expected at least 2 classes with usable training images but found ${usable.length}`,
      );
    }
    const warnings = [...splits.warnings];
    for (const c of splits.classes) {
      if (counts.train[c] === 0) {
        const message = `class '${c}' has no usable training images; it stays in the labels but cannot be learned`;
        warnings.push(message);
        emit({ type: 'warning', message });
      }
    }
    emit({ type: 'data', classes: splits.classes, counts: counts.train });

    await mkdir(o.out, { recursive: true });
    const metricsFile = path.join(o.out, 'metrics.jsonl');
    await writeFile(metricsFile, '');
    const logger: TrainingCallback = {
      async onEpochEnd(_epoch, logs) {
        await writeFile(metricsFile, `${JSON.stringify(logs)}\n`, { flag: 'a' });
        emit({ type: 'epoch', logs, epochs: o.epochs });
      },
    };
    const finetuneLogger: TrainingCallback = {
      async onEpochEnd(_epoch, logs) {
        await writeFile(metricsFile, `${JSON.stringify(logs)}\n`, { flag: 'a' });
        emit({ type: 'epoch', logs, epochs: o.finetuneEpochs });
      },
    };

    head = buildHead(backbone.featureSize, numClasses, {
      hidden: o.hidden,
      dropout: o.dropout,
      seed: o.seed,
    });
    const logits = logitsView(head);
    const dim = backbone.featureSize;
    const batches = (e: Embedded): ArrayBatches => new ArrayBatches(e.features, [dim], e.labels);
    const trainBatches = batches(trainSet!);
    const valBatches = valSet!.files.length ? batches(valSet!) : null;
    const headResult: StageResult = await runStage(trainBatches, valBatches, {
      name: 'head',
      forward: (x, training) => logits.apply(x, { training }) as tf.Tensor,
      variables: head.trainableWeights.map((w) => w.read() as tf.Variable),
      reseed: dropoutSeeder(head),
      epochs: o.epochs,
      batchSize: o.batchSize,
      optimizer: o.optimizer,
      lr: o.lr,
      labelSmoothing: o.labelSmoothing,
      classWeights:
        o.classWeights === 'balanced' ? balancedWeights(trainSet!.labels, numClasses) : null,
      numClasses,
      seed: o.seed,
      swa: o.swa
        ? { start: o.swaStart, freq: o.swaFreq, lr: o.swaLr, annealEpochs: o.swaAnnealEpochs }
        : null,
      callbacks: [logger],
    });
    emit({
      type: 'stage-end',
      stage: 'head',
      raw: headResult.raw?.acc ?? null,
      swa: headResult.swa?.acc ?? null,
    });
    lap('head');

    let exported = `head-${headResult.kept}`;
    let val = figures(headResult.kept === 'swa' ? headResult.swa : headResult.raw);
    const stages: TrainSummary['stages'] = {
      head: {
        raw: figures(headResult.raw),
        swa: figures(headResult.swa),
        snapshots: headResult.snapshots,
        kept: headResult.kept,
      },
    };
    let fineTune: FineTuneResult | null = null;
    if (o.finetuneEpochs > 0) {
      const files = (e: Embedded) => e.files.map((f) => f.path);
      fineTune = await runFineTune(
        {
          backbone,
          head,
          train: { files: files(trainSet!), labels: trainSet!.labels },
          val: { files: files(valSet!), labels: valSet!.labels },
          numClasses,
          headAcc: val?.acc ?? null,
          engine: engineContext,
          callbacks: [finetuneLogger],
          cache,
          warn: (message) => {
            warnings.push(message);
            emit({ type: 'warning', message });
          },
        },
        {
          epochs: o.finetuneEpochs,
          unfreeze: o.unfreeze ?? (backbone.spec.blocks?.length ? 'blocks:3' : 'all'),
          lr: o.finetuneLr,
          batchSize: o.batchSize,
          optimizer: o.optimizer,
          freezeBn: o.freezeBn,
          swa: o.swa
            ? {
                start: o.finetuneSwaStart,
                freq: o.finetuneSwaFreq,
                lr: o.finetuneSwaLr,
                annealEpochs: 0,
              }
            : null,
          augment: o.augment,
          augmentViews: o.augmentViews,
          keep: o.keep,
          labelSmoothing: o.labelSmoothing,
          classWeights:
            o.classWeights === 'balanced' ? balancedWeights(trainSet!.labels, numClasses) : null,
          seed: o.seed,
          decodeConcurrency: o.decodeConcurrency,
          embedBatchSize: o.embedBatchSize,
        },
      );
      const st = fineTune.stage;
      stages['finetune'] = {
        raw: figures(st.raw),
        swa: figures(st.swa),
        snapshots: st.snapshots,
        kept: fineTune.kept,
        unfreezeFrom: fineTune.firstUnfrozen,
        batchSize: fineTune.batchSize,
        trainableVariables: fineTune.trainableVariables,
      };
      emit({
        type: 'stage-end',
        stage: 'finetune',
        raw: st.raw?.acc ?? null,
        swa: st.swa?.acc ?? null,
      });
      exported = fineTune.kept.startsWith('head') ? `head-${headResult.kept}` : fineTune.kept;
      val =
        exported === 'finetune-swa'
          ? figures(st.swa)
          : exported === 'finetune-raw'
            ? figures(st.raw)
            : val;
      lap('finetune');
    }
    let test: TrainSummary['test'] = null;
    if (testSet!.files.length) {
      const ev = fineTune
        ? await fineTune.evaluate(
            testSet!.files.map((f) => f.path),
            testSet!.labels,
          )
        : await evaluateBatches(
            (x) => head!.apply(x) as tf.Tensor,
            batches(testSet!),
            256,
            numClasses,
          );
      const predicted = Array.from({ length: testSet!.labels.length }, (_, i) =>
        argmax(ev.probs, i * numClasses, numClasses),
      );
      const report = classificationReport(testSet!.labels, predicted, splits.classes);
      test = { loss: ev.loss, acc: report.accuracy, macroF1: report.macro.f1 };
    }

    await fineTune?.dispose();
    fineTune = null;
    const onnxFile = await exportRun(o, backbone, head, splits.classes, exported);
    lap('export');
    seconds['total'] = (performance.now() - t0) / 1000;

    const summary: TrainSummary = {
      out: o.out,
      classes: splits.classes,
      counts,
      skipped,
      warnings,
      backend: backend.option,
      engine,
      engineReason,
      cachedEmbeddings: cached,
      backbone: backbone.spec.id,
      stages,
      exported,
      onnx: onnxFile ? path.join(o.out, 'model', onnxFile) : null,
      val,
      test,
      seconds,
    };
    await writeJson(path.join(o.out, 'config.json'), {
      ...o,
      backendInfo: backend,
      engineUsed: engine,
      backboneSpec: backbone.spec,
      weightsHash: backbone.weightsHash,
      versions: versions(),
    });
    await writeJson(path.join(o.out, 'labels.json'), splits.classes);
    await writeJson(path.join(o.out, 'summary.json'), summary);
    emit({ type: 'done', summary });
    return summary;
  } finally {
    head?.dispose();
    backbone.dispose();
  }
}

async function embedSplits(
  splits: Splits,
  backbone: Backbone,
  o: ResolvedTrainOptions,
  engineContext: EngineContext,
  cache: EmbeddingCache | null,
  emit: (e: TrainEvent) => void,
): Promise<{
  embedded: Embedded[];
  skipped: SkippedFile[];
  cached: number;
  engine: string;
  engineReason: string | null;
}> {
  let choice: EngineChoice | null = null;
  // Opened at the first cache miss: a warm cache loads no engine at all.
  const lazy: LazyFrozenModel = {
    inputSize: backbone.inputSize,
    outputSize: backbone.featureSize,
    async open() {
      choice = await createFrozenModel(
        {
          layersModel: backbone.model,
          inputSize: backbone.inputSize,
          outputSize: backbone.featureSize,
          forward: (x) => backbone.embed(x),
          cacheKey: { backboneId: backbone.spec.id, weightsHash: backbone.weightsHash, cut: null },
          recipe: backboneRecipe(backbone),
        },
        engineContext,
      );
      emit({ type: 'engine', engine: choice.engine, reason: choice.reason });
      return choice.model;
    },
  };
  try {
    const lists = [splits.train, splits.val, splits.test];
    const all = lists.flat();
    const result = await embedFiles(
      all.map((f) => f.path),
      lazy,
      {
        batchSize: o.embedBatchSize,
        concurrency: o.decodeConcurrency,
        maxPixels: o.maxPixels,
        cache: cache ? { store: cache, namespace: cacheNamespace(backbone, 'features') } : null,
        onProgress: (progress) => emit({ type: 'embed-progress', progress }),
      },
    );
    for (const file of result.skipped) emit({ type: 'skipped', file });
    const dim = result.outputSize;
    const embedded: Embedded[] = [];
    let offset = 0;
    let row = 0;
    for (const list of lists) {
      const end = offset + list.length;
      const start = row;
      while (row < result.rows.length && result.rows[row]! < end) row++;
      const rows = result.rows.slice(start, row);
      embedded.push({
        files: rows.map((r) => all[r]!),
        features: result.features.subarray(start * dim, row * dim),
        labels: Int32Array.from(rows, (r) => all[r]!.label),
      });
      offset = end;
    }
    const used = choice as EngineChoice | null;
    return {
      embedded,
      skipped: [...result.skipped],
      cached: result.cached,
      engine: used?.engine ?? 'cache',
      engineReason: used ? used.reason : all.length ? 'every embedding came from the cache' : null,
    };
  } finally {
    await (choice as EngineChoice | null)?.model.dispose();
  }
}

/**
 * Writes model/ (backbone + head, or the head alone for graph backbones) and returns the
 * name of the ONNX copy written beside it, when the classifier could be lowered.
 */
async function exportRun(
  o: ResolvedTrainOptions,
  backbone: Backbone,
  head: tf.LayersModel,
  classes: readonly string[],
  weights: string,
): Promise<string | null> {
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
    await saveClassifier(head, o.out, {
      ...metadataBase,
      contents: 'head',
    } satisfies ClassifierMetadata);
    return null;
  }
  const body = backbone.model;
  const { probs } = applyHead(body.outputs[0]!, classes.length, {
    hidden: o.hidden,
    dropout: o.dropout,
    seed: o.seed,
  });
  const full = tf.model({ inputs: body.inputs, outputs: probs, name: 'classifier' });
  for (const layer of head.layers) {
    if (layer.getClassName() === 'InputLayer' || layer.weights.length === 0) continue;
    full.getLayer(layer.name).setWeights(layer.getWeights());
  }
  const dir = await saveClassifier(full, o.out, {
    ...metadataBase,
    contents: 'full',
  } satisfies ClassifierMetadata);
  // The same classifier for onnxruntime in any language: NCHW raw pixels in, probabilities out.
  let onnx: string | null = null;
  try {
    await writeFile(path.join(dir, ONNX_FILE), lowerToOnnx(full));
    onnx = ONNX_FILE;
  } catch (err) {
    if (!(err instanceof UnsupportedLayerError)) throw err;
  }
  // The body's layers are shared with `backbone`; only the new head layers belong to `full`.
  for (const layer of full.layers) if (layer.name.startsWith('head_')) layer.dispose();
  return onnx;
}
