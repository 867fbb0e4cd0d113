import { mkdir, readFile, rename, rm } from 'node:fs/promises';
import path from 'node:path';
import type { CacheNamespace } from '../data/cache.js';
import { EmbeddingCache } from '../data/cache.js';
import { FinetuneError } from '../errors.js';
import { exportClassifier } from '../export/classifier.js';
import { MODEL_DIR, writeJson } from '../export/model-dir.js';
import { type TrainEvent, type TrainSummary, weightsName } from '../train/events.js';
import { type HeadResult, headOptions, trainStages } from '../train/phases.js';
import { writeRunRecords } from '../train/records.js';
import type { EmbeddedSplits, PreparedRun } from '../train/run.js';
import type { SweepRun } from './config.js';
import type { ResultRow } from './results.js';

/** Written last into a run folder: a run counts as finished only when this file says `done`. */
export const RESULT_FILE = 'result.json';

/** One run to execute: the run, and whether its model is exported with it. */
export interface RunJob {
  readonly run: SweepRun;
  readonly export: boolean;
  /** Engine threads for a run in a child process (so that threads × parallel ≤ cores). */
  readonly threads?: number;
}

/** An embedding cache that counts its hits and misses (how a sweep shows it recomputed nothing). */
export class CountingCache extends EmbeddingCache {
  hits = 0;
  misses = 0;
  override async get(
    ns: CacheNamespace,
    key: string,
    length: number,
  ): Promise<Float32Array | null> {
    const values = await super.get(ns, key, length);
    if (values) this.hits++;
    else this.misses++;
    return values;
  }
}

function sum(seconds: Readonly<Record<string, number>> | undefined): number {
  return Object.values(seconds ?? {}).reduce((a, b) => a + b, 0);
}

/** The run folder, relative to the sweep folder. */
export function relativeRunDir(run: SweepRun): string {
  return path.join('runs', run.id);
}

/** The finished record of a run, or null when it is missing, failed or half-written. */
export async function readFinished(run: SweepRun): Promise<ResultRow | null> {
  try {
    const row = JSON.parse(
      await readFile(path.join(run.options.out, RESULT_FILE), 'utf8'),
    ) as ResultRow;
    return row.status === 'done' && row.id === run.id ? row : null;
  } catch {
    return null;
  }
}

/**
 * Records a failed run (its folder keeps whatever was written, and the error); never
 * rejects: a folder that cannot be written adds its reason to the row's error.
 */
export async function failedRow(run: SweepRun, err: unknown): Promise<ResultRow> {
  const row: ResultRow = {
    ...rowBase(run),
    status: 'failed',
    val: null,
    test: null,
    seconds: {},
    cache: null,
    error: err instanceof Error ? err.message : String(err),
  };
  try {
    await mkdir(run.options.out, { recursive: true });
    await writeJson(path.join(run.options.out, RESULT_FILE), row);
    return row;
  } catch (writeErr) {
    return { ...row, error: `${row.error} (and ${(writeErr as Error).message})` };
  }
}

function rowBase(run: SweepRun) {
  return {
    id: run.id,
    index: run.index,
    config: run.config,
    repeat: run.repeat,
    params: run.params,
    options: run.options,
    splitSeed: run.splitSeed,
    runDir: relativeRunDir(run),
  };
}

/**
 * The prepared run seen by one sweep run: its own resolved options (seed, head options,
 * `out`), warnings and events over the shared backbone, splits and cache. Disposing it
 * leaves the shared backbone alone.
 */
export function runView(
  shared: PreparedRun,
  run: SweepRun,
  emit: (e: TrainEvent) => void,
): PreparedRun {
  const warnings = [...shared.warnings];
  return {
    ...shared,
    options: run.options,
    warnings,
    emit,
    warn(message) {
      warnings.push(message);
      emit({ type: 'warning', message });
    },
    dispose: () => undefined,
  };
}

/**
 * Exports a trained head (with the backbone) into a run folder: written beside it first,
 * then renamed into place, so `model/` is never half there.
 */
export async function exportInto(
  shared: PreparedRun,
  run: SweepRun,
  head: HeadResult,
): Promise<string> {
  const dir = run.options.out;
  const staging = path.join(dir, '.export');
  await rm(staging, { recursive: true, force: true });
  const o = run.options;
  await exportClassifier(
    staging,
    shared.backbone,
    head.head,
    headOptions(o),
    shared.splits.classes,
    weightsName(head.kept),
  );
  await rm(path.join(dir, MODEL_DIR), { recursive: true, force: true });
  await rename(path.join(staging, MODEL_DIR), path.join(dir, MODEL_DIR));
  await rm(staging, { recursive: true, force: true });
  return path.join(dir, MODEL_DIR);
}

/**
 * Runs the phases after the embedding for one sweep run (head, fine-tune when asked, test,
 * export when asked) and writes its records into its run folder: config.json,
 * metrics.jsonl, summary.json as `train` writes them, then result.json last. With
 * `keepHead` a head-only run hands back its trained head (the caller disposes it).
 */
export async function executeRun(
  shared: PreparedRun,
  embedded: EmbeddedSplits,
  counts: TrainSummary['counts'],
  job: RunJob,
  options: {
    emit: (e: TrainEvent) => void;
    keepHead: boolean;
    cache: CountingCache | null;
    /** Seconds this run spent on phases of its own before the head (a child's prepare and embed). */
    before?: Readonly<Record<string, number>>;
    /** Its head, already trained beside others' (trainHeads); this run owns it from here. */
    head?: { result: HeadResult; seconds: number };
  },
): Promise<{ row: ResultRow; head: HeadResult | null }> {
  const { run } = job;
  const o = run.options;
  if (run.needsBackbone && !shared.finetune)
    throw new FinetuneError(`run ${run.id} needs a run prepared with its fine-tune stage`);
  try {
    await rm(o.out, { recursive: true, force: true });
  } catch (err) {
    options.head?.result.dispose();
    throw err;
  }
  const view = runView(shared, run, options.emit);
  const t0 = performance.now();
  const seconds: Record<string, number> = { ...options.before };
  let mark = t0;
  const lap = (name: string): void => {
    const now = performance.now();
    seconds[name] = (now - mark) / 1000;
    mark = now;
  };
  let head: HeadResult | null = options.head?.result ?? null;
  let handedOver = false;
  try {
    const stagesResult = await trainStages(view, embedded, o, {
      finetune: run.needsBackbone,
      predictions: false,
      lap: (name) => {
        lap(name);
        // A head trained beside others: its share of their common loop.
        if (name === 'head' && options.head) seconds['head'] = options.head.seconds;
      },
      ...(options.head ? { head: options.head.result } : {}),
    });
    head = stagesResult.head;
    const { history, stages, kept, val, test } = stagesResult;
    lap('test');
    const exported = weightsName(kept);
    let onnx: string | null = null;
    if (job.export) {
      await mkdir(o.out, { recursive: true });
      ({ onnx } = await exportClassifier(
        o.out,
        shared.backbone,
        stagesResult.head.head,
        headOptions(o),
        shared.splits.classes,
        exported,
        undefined,
        stagesResult.swag,
      ));
      lap('export');
    }
    const summary: TrainSummary = {
      out: o.out,
      classes: shared.splits.classes,
      counts,
      skipped: embedded.skipped,
      warnings: view.warnings,
      backend: shared.backend.option,
      engine: embedded.source,
      engineReason: embedded.reason,
      cachedEmbeddings: embedded.cached,
      backbone: shared.backbone.spec.id,
      stages,
      exported,
      onnx,
      val,
      test,
      seconds: {
        ...seconds,
        total: (performance.now() - t0) / 1000 + sum(options.before) + (options.head?.seconds ?? 0),
      },
    };
    await writeRunRecords(view, summary, history, { report: false });
    lap('records');
    const last = stages.finetune ?? stages.head!;
    const row: ResultRow = {
      ...rowBase(run),
      status: 'done',
      val: {
        stage: stages.finetune ? 'finetune' : 'head',
        raw: last.raw,
        swa: last.swa,
        kept: val,
        exported,
      },
      test,
      seconds: {
        ...seconds,
        total: (performance.now() - t0) / 1000 + sum(options.before) + (options.head?.seconds ?? 0),
      },
      cache: options.cache ? { hits: options.cache.hits, misses: options.cache.misses } : null,
    };
    await writeJson(path.join(o.out, RESULT_FILE), row);
    handedOver = options.keepHead && !run.needsBackbone;
    return { row, head: handedOver ? head : null };
  } finally {
    if (!handedOver) head?.dispose();
  }
}
