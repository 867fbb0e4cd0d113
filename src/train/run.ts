import { type Backbone, backboneRecipe, loadBackbone } from '../backbones/load.js';
import { resolveBackboneSpec } from '../backbones/registry.js';
import { type BackendInfo, initBackend } from '../backend/index.js';
import { type CacheFailure, EmbeddingCache } from '../data/cache.js';
import { embedFiles, type LazyFrozenModel, type SkippedFile } from '../data/embed.js';
import { type LabelledFile, loadSplits, type Splits } from '../data/scan.js';
import {
  createFrozenModel,
  type EngineChoice,
  type EngineContext,
  resolveEngineContext,
} from '../engine/index.js';
import * as is from '../util/is.js';
import type { EmbeddingSource, TrainEvent } from './events.js';
import { cacheNamespace, firstUnfrozenLayer, graphModelError, parseUnfreeze } from './finetune.js';
import { type PreparedInit, prepareInit } from './init.js';
import { type ResolvedTrainOptions, resolveTrainOptions, type TrainOptions } from './options.js';

/** What the fine-tune stage will unfreeze, resolved against the backbone before any image is decoded. */
export interface FinetunePlan {
  readonly unfreeze: string;
  readonly firstUnfrozen: string;
}

/** Everything a run decides before it touches an image. */
export interface PreparedRun {
  readonly options: ResolvedTrainOptions;
  readonly backend: BackendInfo;
  readonly splits: Splits;
  readonly backbone: Backbone;
  /** How frozen passes run, resolved once for every phase of the run. */
  readonly engine: EngineContext;
  readonly cache: EmbeddingCache | null;
  /** null without a fine-tune stage. */
  readonly finetune: FinetunePlan | null;
  /** The exported run the head starts from (`--init`); null for a fresh head. */
  readonly init: PreparedInit | null;
  /** Warnings so far (the run's phases add theirs through `warn`). */
  readonly warnings: string[];
  readonly emit: (event: TrainEvent) => void;
  warn(message: string): void;
  /** Seconds spent scanning and loading. */
  readonly seconds: { readonly scan: number; readonly load: number };
  /** Frees the backbone. */
  dispose(): void;
}

/**
 * Resolves and checks every option, picks the backend, scans and splits the data, loads
 * the backbone and resolves the fine-tune cut: everything that can fail on bad input
 * fails here, before any image is decoded.
 */
export async function prepareRun(options: TrainOptions): Promise<PreparedRun> {
  const o = resolveTrainOptions(options);
  const emit = options.onEvent ?? (() => undefined);
  let mark = performance.now();
  const lap = (): number => {
    const now = performance.now();
    const s = (now - mark) / 1000;
    mark = now;
    return s;
  };
  const warnings: string[] = [];
  const warn = (message: string): void => {
    warnings.push(message);
    emit({ type: 'warning', message });
  };
  // The cache is an accelerator: a failure is one warning per kind per run (not one per
  // image) and the run goes on without that part of the cache.
  const cacheFailures = new Set<CacheFailure['kind']>();
  const onCacheFailure = (failure: CacheFailure): void => {
    if (cacheFailures.has(failure.kind)) return;
    cacheFailures.add(failure.kind);
    warn(failure.message);
  };
  const backend = await initBackend(o.backend);
  emit({ type: 'backend', backend });
  const engine = resolveEngineContext({
    engine: o.engine,
    backend,
    ...(o.threads !== undefined ? { threads: o.threads } : {}),
    ...(o.workers !== undefined ? { workers: o.workers } : {}),
    cacheDir: o.cache ? o.cacheDir : null,
    onCacheFailure,
  });
  const splits = await loadSplits(o.data, { valSplit: o.valSplit, seed: o.seed });
  for (const message of splits.warnings) warn(message);
  const scan = lap();

  const spec = resolveBackboneSpec(o.backbone, {
    ...(o.alpha !== undefined ? { alpha: o.alpha } : {}),
    ...(o.featureLayer !== undefined ? { featureLayer: o.featureLayer } : {}),
  });
  // Known graph models fail before anything is downloaded or decoded.
  if (o.finetuneEpochs > 0 && spec.format === 'graph') throw graphModelError(spec.id);
  let backbone = await loadBackbone(
    spec,
    o.inputSize !== undefined ? { inputSize: o.inputSize } : {},
  );
  let finetune: FinetunePlan | null = null;
  let init: PreparedInit | null = null;
  try {
    checkSizes(o, backbone);
    if (o.init !== undefined) {
      // The export's fine-tuned body (if any) replaces the backbone's before anything is
      // embedded or cut, so the head meets the features it was trained on.
      ({ backbone, init } = await prepareInit(o.init, backbone, o.hidden, splits.classes));
    }
    if (o.finetuneEpochs > 0) {
      if (!backbone.model) throw graphModelError(backbone.spec.id);
      const unfreeze = o.unfreeze ?? (backbone.spec.blocks?.length ? 'blocks:3' : 'all');
      finetune = { unfreeze, firstUnfrozen: firstUnfrozenLayer(backbone, parseUnfreeze(unfreeze)) };
    }
  } catch (err) {
    backbone.dispose();
    throw err;
  }
  emit({
    type: 'backbone',
    id: backbone.spec.id,
    inputSize: backbone.inputSize,
    featureSize: backbone.featureSize,
  });
  return {
    options: o,
    backend,
    splits,
    backbone,
    engine,
    cache: o.cache ? new EmbeddingCache(o.cacheDir, { onFailure: onCacheFailure }) : null,
    finetune,
    init,
    warnings,
    emit,
    warn,
    seconds: { scan, load: lap() },
    dispose: () => backbone.dispose(),
  };
}

/**
 * Sizes that cannot fit in memory fail here, named by their option, before any image is
 * decoded: a batch of pixels for the frozen pass (and for the fine-tune stage, whose rows
 * are at most that large), a batch of features, the hidden layer's weights.
 */
function checkSizes(o: ResolvedTrainOptions, backbone: Backbone): void {
  const pixels = 3 * backbone.inputSize ** 2;
  is.integerInRange('embedBatchSize', o.embedBatchSize, 1, is.maxItemsInMemory(pixels));
  const row = o.finetuneEpochs > 0 ? pixels : backbone.featureSize;
  is.integerInRange('batchSize', o.batchSize, 1, is.maxItemsInMemory(row));
  is.integerInRange('hidden', o.hidden, 0, is.maxItemsInMemory(backbone.featureSize));
}

/** Features of one split; rows that could not be decoded are dropped. */
export interface Embedded {
  readonly files: readonly LabelledFile[];
  readonly features: Float32Array;
  readonly labels: Int32Array;
}

export interface EmbeddedSplits {
  readonly train: Embedded;
  readonly val: Embedded;
  readonly test: Embedded;
  /** Length of one feature row. */
  readonly featureSize: number;
  readonly skipped: readonly SkippedFile[];
  /** Images whose features came from the cache. */
  readonly cached: number;
  readonly source: EmbeddingSource;
  /** Why the engine is not the one asked for (auto passing onnx over), or why none ran. */
  readonly reason: string | null;
}

/**
 * Embeds every split once through the frozen backbone. The engine is opened at the first
 * cache miss: a warm cache loads no engine at all.
 */
export async function embedSplits(run: PreparedRun): Promise<EmbeddedSplits> {
  const { backbone, options: o, splits } = run;
  let choice: EngineChoice | null = null;
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
        run.engine,
      );
      run.emit({ type: 'engine', engine: choice.engine, reason: choice.reason });
      return choice.model;
    },
  };
  try {
    const lists = [splits.train, splits.val, splits.test] as const;
    const all = lists.flat();
    const result = await embedFiles(
      all.map((f) => f.path),
      lazy,
      {
        batchSize: o.embedBatchSize,
        concurrency: o.decodeConcurrency,
        maxPixels: o.maxPixels,
        maxBytes: o.maxBytes,
        cache: run.cache
          ? { store: run.cache, namespace: cacheNamespace(backbone, 'features') }
          : null,
        onProgress: (progress) => run.emit({ type: 'embed-progress', progress }),
      },
    );
    for (const file of result.skipped) run.emit({ type: 'skipped', file });
    const dim = result.outputSize;
    // Result rows are indices into `all`, in order: cut them back into the three splits.
    const embedded: Embedded[] = [];
    let end = 0;
    let row = 0;
    for (const list of lists) {
      end += list.length;
      const start = row;
      while (row < result.rows.length && result.rows[row]! < end) row++;
      const rows = result.rows.slice(start, row);
      embedded.push({
        files: rows.map((r) => all[r]!),
        features: result.features.subarray(start * dim, row * dim),
        labels: Int32Array.from(rows, (r) => all[r]!.label),
      });
    }
    const used = choice as EngineChoice | null;
    return {
      train: embedded[0]!,
      val: embedded[1]!,
      test: embedded[2]!,
      featureSize: dim,
      skipped: [...result.skipped],
      cached: result.cached,
      source: used?.engine ?? 'cache',
      reason: used ? used.reason : all.length ? 'every embedding came from the cache' : null,
    };
  } finally {
    await (choice as EngineChoice | null)?.model.dispose();
  }
}
