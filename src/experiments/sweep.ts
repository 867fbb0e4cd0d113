import { fork } from 'node:child_process';
import { mkdir, readdir, rm, stat } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { trainingThreads } from '../backend/index.js';
import { FinetuneError } from '../errors.js';
import { MODEL_DIR } from '../export/model-dir.js';
import type { TrainEvent } from '../train/events.js';
import { type HeadJob, type HeadResult, headShapeKey, trainHeads } from '../train/phases.js';
import { type EmbeddedSplits, embedSplits, prepareRun } from '../train/run.js';
import { checkCounts } from '../train/train.js';
import { closest } from '../util/closest.js';
import * as is from '../util/is.js';
import { expandSweep, type SweepConfig, type SweepRun } from './config.js';
import {
  executeRun,
  exportInto,
  failedRow,
  type RunJob,
  readFinished,
  runView,
} from './execute.js';
import { HeadWorker, shareSplits } from './head-worker.js';
import {
  bestConfig,
  bestRun,
  type ConfigSummary,
  checkMetric,
  type ResultRow,
  resultsCsv,
  type SweepMetric,
  summarise,
  summaryCsv,
  writeFileAtomic,
} from './results.js';
import type { ChildMessage } from './run-child.js';

export const EXPORT_CHOICES = ['best', 'all', 'none'] as const;
export type ExportChoice = (typeof EXPORT_CHOICES)[number];

/** The files a sweep writes into its folder. */
export const SWEEP_FILES = Object.freeze({
  results: 'results.jsonl',
  resultsCsv: 'results.csv',
  summary: 'summary.csv',
  sweep: 'sweep.json',
});

export type SweepEvent =
  | { type: 'plan'; runs: number; finished: number; todo: number }
  | { type: 'run-skip'; id: string; index: number; total: number }
  | {
      type: 'run-start';
      id: string;
      index: number;
      total: number;
      params: Readonly<Record<string, unknown>>;
      inChild: boolean;
    }
  | { type: 'train'; id: string; event: TrainEvent }
  | {
      type: 'embedding';
      runs: number;
      images: number;
      cached: number;
      seconds: { scan: number; load: number; embed: number };
      headThreads: number;
    }
  | { type: 'run-end'; row: ResultRow; total: number }
  | { type: 'export'; id: string; dir: string };

export interface SweepSettings {
  /** Runs with a fine-tune stage at once, each in a child process (default 1). Head-only runs stay in this process. */
  parallel?: number;
  /**
   * Threads that train head-only runs after their embedding pass: each group of heads of one
   * shape is split in this many parts, one trained in this thread and each other in a
   * worker thread (default: the cores, `os.availableParallelism()`, on the wasm and cpu
   * backends, which train on one thread; 1 with native TensorFlow, which uses every core
   * itself). The figures do not depend on it.
   */
  headThreads?: number;
  /** Models to export: the best run's (default), every run's, or none. */
  export?: ExportChoice;
  /** What ranks runs and configurations (default `val_loss`, lower is better). */
  metric?: SweepMetric;
  /** Called with each run's row as it finishes (or fails). */
  onRunEnd?: (row: ResultRow) => void;
  /** Progress; the library prints nothing. */
  onEvent?: (event: SweepEvent) => void;
}

const SETTINGS = ['parallel', 'headThreads', 'export', 'metric', 'onRunEnd', 'onEvent'] as const;

export interface SweepResult {
  readonly out: string;
  readonly metric: SweepMetric;
  /** Every run, in sweep order (finished earlier, finished now, or failed). */
  readonly rows: readonly ResultRow[];
  readonly skipped: number;
  readonly summaries: readonly ConfigSummary[];
  readonly best: ResultRow | null;
  readonly bestConfig: ConfigSummary | null;
  /** The best run's model folder (with `export: 'best'` or `'all'`). */
  readonly model: string | null;
}

/** What one embedding pass in this process cost, for sweep.json. */
interface EmbeddingRecord {
  readonly prepareKey: string;
  readonly runs: number;
  readonly images: number;
  readonly cached: number;
  readonly seconds: { scan: number; load: number; embed: number };
  /** Threads its heads trained on (this one and workers; see SweepSettings.headThreads). */
  readonly headThreads: number;
}

const CHILD = fileURLToPath(new URL('./run-child.js', import.meta.url));

/** Threads per child (engine, and fine-tune unless a run says) so that threads × parallel stays within the cores. */
function childThreads(runs: readonly SweepRun[], parallel: number): number | undefined {
  const cores = os.availableParallelism();
  for (const run of runs) {
    for (const key of ['threads', 'workers', 'finetuneThreads'] as const) {
      const n = run.options[key];
      if (n !== undefined && n * parallel > cores)
        throw new FinetuneError(
          `run ${run.index}: ${key} ${n} × parallel ${parallel} would run ${n * parallel} ${key === 'finetuneThreads' ? 'training' : 'engine'} threads on ${cores} cores; lower ${key} or parallel`,
        );
    }
  }
  return parallel > 1 ? Math.max(1, Math.floor(cores / parallel)) : undefined;
}

/**
 * Keys of the cache entries a run's first passes write. The first run to hold a key runs
 * alone with respect to it; the others wait until it has finished, then read its entries
 * instead of computing them again at the same time.
 */
function cacheGates(run: SweepRun): string[] {
  const o = run.options;
  if (!o.cache) return [];
  const cut = `${run.prepareKey}|${o.unfreeze ?? 'default'}`;
  const gates = [run.prepareKey, cut];
  if (o.augment.length)
    gates.push(
      `${cut}|${o.augment.join('+')}|${o.cropScale}|${o.cropRatio}|${o.seed}|${o.augmentViews}`,
    );
  return gates;
}

/**
 * Runs a sweep (see `expandSweep` for the config): one prepared run and one embedding
 * pass per distinct data/backbone/embedding setup, every head-only run trained on it in
 * this process (on `headThreads` threads), fine-tune runs in child processes sharing the
 * on-disk cache. Finished
 * runs (runs/<id>/result.json says done) are skipped; failed and half-written ones run
 * again. Writes results.jsonl, results.csv, summary.csv and sweep.json into `out`.
 *
 * @example
 *   const result = await sweep(
 *     { out: 'sweeps/lr', base: { data: 'photos', epochs: 20 }, grid: { lr: [0.03, 0.01, 0.003] }, repeats: 3 },
 *     { metric: 'val_acc', onRunEnd: (row) => console.log(row.id, row.val?.kept?.acc) },
 *   );
 *   console.log(result.bestConfig?.params);
 */
export async function sweep(
  config: SweepConfig,
  settings: SweepSettings = {},
): Promise<SweepResult> {
  const runs = expandSweep(config);
  for (const key of Object.keys(settings)) {
    if (!(SETTINGS as readonly string[]).includes(key)) {
      const near = closest(key, SETTINGS);
      throw new FinetuneError(
        `Unknown sweep setting ${key}${near ? `; did you mean ${near}?` : ''}`,
      );
    }
  }
  const out = config.out;
  const metric = checkMetric(settings.metric ?? 'val_loss');
  const parallel = is.positiveInteger('parallel', settings.parallel ?? 1);
  const headThreads =
    settings.headThreads === undefined
      ? undefined
      : is.positiveInteger('headThreads', settings.headThreads);
  const exportChoice = is.oneOfValues('export', settings.export ?? 'best', EXPORT_CHOICES);
  const threads = childThreads(
    runs.filter((r) => r.needsBackbone),
    parallel,
  );
  const onEvent = settings.onEvent ?? (() => undefined);
  const total = runs.length;

  await mkdir(path.join(out, 'runs'), { recursive: true });
  // Leftovers of an export that was killed half-way.
  for (const name of await readdir(path.join(out, 'runs'))) {
    await rm(path.join(out, 'runs', name, '.export'), { recursive: true, force: true });
  }
  const rows = new Map<string, ResultRow>();
  for (const run of runs) {
    const row = await readFinished(run);
    if (row) rows.set(run.id, row);
  }
  const skipped = rows.size;
  onEvent({ type: 'plan', runs: total, finished: skipped, todo: total - skipped });
  for (const run of runs)
    if (rows.has(run.id)) onEvent({ type: 'run-skip', id: run.id, index: run.index, total });

  const embeddings: EmbeddingRecord[] = [];
  const inOrder = (): ResultRow[] =>
    runs.flatMap((r) => {
      const row = rows.get(r.id);
      return row ? [row] : [];
    });
  const writeTables = async (best: ResultRow | null, model: string | null, done: boolean) => {
    const ordered = inOrder();
    const summaries = summarise(ordered);
    await writeFileAtomic(
      path.join(out, SWEEP_FILES.results),
      ordered.map((r) => `${JSON.stringify(r)}\n`).join(''),
    );
    await writeFileAtomic(path.join(out, SWEEP_FILES.resultsCsv), resultsCsv(ordered));
    await writeFileAtomic(path.join(out, SWEEP_FILES.summary), summaryCsv(summaries));
    const top = bestConfig(metric, summaries);
    await writeFileAtomic(
      path.join(out, SWEEP_FILES.sweep),
      `${JSON.stringify(
        {
          config,
          metric,
          status: done ? 'done' : 'running',
          runs: total,
          finished: ordered.filter((r) => r.status === 'done').length,
          failed: ordered.filter((r) => r.status === 'failed').length,
          best: best?.id ?? null,
          bestModel: model ? path.relative(out, model) : null,
          bestConfig: top
            ? { config: top.config, params: top.params, metric: top.metrics[metric] }
            : null,
          export: exportChoice,
          embeddings,
          files: SWEEP_FILES,
        },
        null,
        2,
      )}\n`,
    );
    return summaries;
  };
  const finish = async (row: ResultRow): Promise<void> => {
    rows.set(row.id, row);
    settings.onRunEnd?.(row);
    onEvent({ type: 'run-end', row, total });
    await writeTables(null, null, false);
  };

  // Runs exported here as the best so far; those overtaken later lose their model again.
  const exportedHere = new Set<string>();
  const todo = runs.filter((r) => !rows.has(r.id));
  const groups = new Map<string, SweepRun[]>();
  for (const run of todo.filter((r) => !r.needsBackbone))
    groups.set(run.prepareKey, [...(groups.get(run.prepareKey) ?? []), run]);
  for (const group of groups.values()) {
    await runHeadJobs(group, {
      threads: headThreads,
      exportAll: exportChoice === 'all',
      keepBest: exportChoice === 'best',
      // Ties keep the earlier run, as bestRun does.
      isBest: (row) =>
        bestRun(metric, [...inOrder().filter((r) => r.id !== row.id), row])?.id === row.id,
      onEvent,
      total,
      embeddings,
      finish,
      exportedHere,
    });
  }

  const opened = new Set(groups.keys());
  await runInChildren(
    todo.filter((r) => r.needsBackbone),
    { parallel, threads, exportAll: exportChoice === 'all', opened, onEvent, total, finish },
  );

  let best = bestRun(metric, inOrder());
  let model: string | null = null;
  if (best && exportChoice !== 'none') {
    const run = runs.find((r) => r.id === best!.id)!;
    model = path.join(run.options.out, MODEL_DIR);
    if (!(await exists(path.join(model, 'model.json')))) {
      // Finished in an earlier sweep or in a child: train it again (same seed, same figures) with its export.
      // Alone now, so with every core.
      const job: RunJob = { run, export: true };
      const row = run.needsBackbone
        ? await runChild(job, () => undefined, onEvent)
        : (
            await runHeadJobs([run], {
              ...HEAD_DEFAULTS,
              exportAll: true,
              onEvent,
              total,
              embeddings,
            })
          )[0]!;
      if (row.status !== 'done') model = null;
      else {
        rows.set(row.id, row);
        best = row;
      }
    }
    if (model) onEvent({ type: 'export', id: best.id, dir: model });
  }
  if (exportChoice === 'best') {
    // Heads exported here as the best so far, overtaken later.
    for (const id of exportedHere) {
      if (id !== best?.id)
        await rm(path.join(out, 'runs', id, MODEL_DIR), { recursive: true, force: true });
    }
  }
  const summaries = await writeTables(best, model, true);
  return {
    out,
    metric,
    rows: inOrder(),
    skipped,
    summaries,
    best,
    bestConfig: bestConfig(metric, summaries),
    model,
  };
}

async function exists(file: string): Promise<boolean> {
  return stat(file).then(
    () => true,
    () => false,
  );
}

interface HeadJobSettings {
  /** Parts each group of heads is split in (see SweepSettings.headThreads; default by backend). */
  threads?: number | undefined;
  exportAll: boolean;
  /** Keep the best head trained here in memory and export it when its group ends. */
  keepBest: boolean;
  isBest: (row: ResultRow) => boolean;
  onEvent: (event: SweepEvent) => void;
  total: number;
  embeddings: EmbeddingRecord[];
  finish?: (row: ResultRow) => Promise<void>;
  exportedHere?: Set<string>;
}

const HEAD_DEFAULTS = { keepBest: false, isBest: () => false } as const;

/**
 * Head-only runs that share one prepare key: one prepared run, one embedding pass, then a
 * head per run on the same features in memory.
 */
async function runHeadJobs(group: readonly SweepRun[], s: HeadJobSettings): Promise<ResultRow[]> {
  const first = group[0]!;
  const results: ResultRow[] = [];
  const report = async (row: ResultRow) => {
    results.push(row);
    await s.finish?.(row);
  };
  let prepared: Awaited<ReturnType<typeof prepareRun>> | null = null;
  let kept: { row: ResultRow; head: HeadResult } | null = null;
  let workers: HeadWorker[] = [];
  try {
    const eventsOf = (id: string) => (event: TrainEvent) => s.onEvent({ type: 'train', id, event });
    prepared = await prepareRun({
      ...first.given,
      seed: first.splitSeed,
      out: first.options.out,
      onEvent: eventsOf(first.id),
    });
    const chunks = headChunks(group);
    const parts = Math.min(
      s.threads ?? trainingThreads(prepared.backend),
      Math.max(...chunks.map((c) => c.length)),
    );
    // Started before the embedding pass: loading their tfjs (about half a second) overlaps it.
    const backend = prepared.backend.option;
    workers = Array.from({ length: parts - 1 }, () => new HeadWorker(backend));
    const t0 = performance.now();
    const embedded = await embedSplits(prepared);
    const counts = checkCounts(prepared, embedded);
    const images =
      embedded.train.files.length + embedded.val.files.length + embedded.test.files.length;
    const record: EmbeddingRecord = {
      prepareKey: first.prepareKey,
      runs: group.length,
      images,
      cached: embedded.cached,
      seconds: { ...prepared.seconds, embed: (performance.now() - t0) / 1000 },
      headThreads: parts,
    };
    s.embeddings.push(record);
    s.onEvent({ type: 'embedding', ...record });
    const trainParts = headParts(embedded, workers);
    for (const chunk of chunks) {
      for (const run of chunk) s.onEvent(runStart(run, s.total, false));
      const t1 = performance.now();
      const heads = await trainParts(
        chunk.map((run) => ({
          run: runView(prepared!, run, eventsOf(run.id)),
          options: run.options,
        })),
      );
      // Each run's share of the loop that trained its chunk.
      const share = (performance.now() - t1) / 1000 / chunk.length;
      for (const [i, run] of chunk.entries()) {
        const trained = heads[i]!;
        let row: ResultRow;
        if (trained instanceof Error) row = await failedRow(run, trained);
        else {
          try {
            const result = await executeRun(
              prepared,
              embedded,
              counts,
              { run, export: s.exportAll },
              {
                emit: eventsOf(run.id),
                keepHead: s.keepBest,
                cache: null,
                head: { result: trained, seconds: share },
              },
            );
            row = result.row;
            if (result.head) {
              if (s.isBest(row)) {
                kept?.head.dispose();
                kept = { row, head: result.head };
              } else result.head.dispose();
            }
          } catch (err) {
            row = await failedRow(run, err);
          }
        }
        await report(row);
      }
    }
    if (kept && s.isBest(kept.row)) {
      const run = group.find((r) => r.id === kept!.row.id)!;
      await exportInto(prepared, run, kept.head);
      s.exportedHere?.add(run.id);
    }
  } catch (err) {
    // The shared phases failed: every run of the group not yet done fails with them.
    for (const run of group) {
      if (!results.some((r) => r.id === run.id)) await report(await failedRow(run, err));
    }
  } finally {
    kept?.head.dispose();
    prepared?.dispose();
    await Promise.all(workers.map((w) => w.close()));
  }
  return results;
}

/**
 * Trains a group of heads of one shape in parts (run order kept: the first part here, the
 * others in `workers`, at the same time), each head or its error in run order. A part
 * whose training fails as a whole (every head diverged) trains again here one run at a
 * time, so that each run gets its own result or error as in an unsplit group; a part whose
 * worker failed trains again here.
 */
function headParts(
  embedded: EmbeddedSplits,
  workers: readonly HeadWorker[],
): (jobs: readonly HeadJob[]) => Promise<(HeadResult | Error)[]> {
  const shared = workers.length ? shareSplits(embedded) : null;
  return async (jobs) => {
    const n = Math.min(workers.length + 1, jobs.length);
    const parts = Array.from({ length: n }, (_, i) =>
      jobs.slice(Math.floor((i * jobs.length) / n), Math.floor(((i + 1) * jobs.length) / n)),
    );
    // The workers' parts are sent first: this thread's part keeps it busy until its end.
    const theirs = parts.slice(1).map((part, i) => workers[i]!.train(shared!, part));
    const settled = await Promise.allSettled([trainHeads(embedded, parts[0]!), ...theirs]);
    const heads: (HeadResult | Error)[] = [];
    for (const [i, outcome] of settled.entries()) {
      const part = parts[i]!;
      if (outcome.status === 'fulfilled') heads.push(...outcome.value);
      else if (outcome.reason instanceof FinetuneError && part.length > 1) {
        for (const job of part) heads.push(...(await trainHere(embedded, [job])));
      } else if (i > 0 && !(outcome.reason instanceof FinetuneError))
        heads.push(...(await trainHere(embedded, part)));
      else heads.push(...part.map(() => asError(outcome.reason)));
    }
    return heads;
  };
}

function asError(err: unknown): Error {
  return err instanceof Error ? err : new Error(String(err));
}

/** trainHeads in this thread; a failure as a whole is each run's error. */
async function trainHere(
  embedded: EmbeddedSplits,
  jobs: readonly HeadJob[],
): Promise<(HeadResult | Error)[]> {
  try {
    return await trainHeads(embedded, jobs);
  } catch (err) {
    return jobs.map(() => asError(err));
  }
}

/** The event of a run that starts (here, or in a child process). */
function runStart(run: SweepRun, total: number, inChild: boolean): SweepEvent {
  return { type: 'run-start', id: run.id, index: run.index, total, params: run.params, inChild };
}

/** Heads trained side by side at most: memory grows with each (a batch of features per head). */
const MAX_HEADS_TOGETHER = 32;

/** Head-only runs split into groups that can train side by side (same head shape, see headShapeKey), in run order. */
function headChunks(group: readonly SweepRun[]): SweepRun[][] {
  const byShape = new Map<string, SweepRun[]>();
  for (const run of group) {
    const key = headShapeKey(run.options);
    byShape.set(key, [...(byShape.get(key) ?? []), run]);
  }
  return [...byShape.values()].flatMap((runs) =>
    Array.from({ length: Math.ceil(runs.length / MAX_HEADS_TOGETHER) }, (_, i) =>
      runs.slice(i * MAX_HEADS_TOGETHER, (i + 1) * MAX_HEADS_TOGETHER),
    ),
  );
}

/** One run in a child process; never rejects (a crash is a failed row). */
function runChild(
  job: RunJob,
  onStart: () => void,
  onEvent: (event: SweepEvent) => void,
): Promise<ResultRow> {
  const { run } = job;
  return new Promise<ResultRow>((resolve) => {
    onStart();
    const child = fork(CHILD, [], { stdio: ['ignore', 'ignore', 'pipe', 'ipc'] });
    let stderr = '';
    let answer: ResultRow | string | null = null;
    child.stderr?.on('data', (d: Buffer) => {
      stderr = (stderr + d.toString()).slice(-2000);
    });
    child.on('message', (m: ChildMessage) => {
      if (m.type === 'event') onEvent({ type: 'train', id: run.id, event: m.event });
      else if (m.type === 'done') answer = m.row;
      else answer = m.message;
    });
    child.on('error', (err) => {
      answer ??= err.message;
    });
    child.on('close', (code, signal) => {
      const a = answer as ResultRow | string | null;
      if (a && typeof a === 'object') return resolve(a);
      const reason =
        a ??
        `child process ended (${signal ?? `exit code ${code}`})${stderr.trim() ? `: ${stderr.trim()}` : ''}`;
      void failedRow(run, new Error(reason)).then(resolve);
    });
    child.send(job);
  });
}

/**
 * Fine-tune runs, `parallel` child processes at a time, each with `threads` engine threads.
 * A run whose cache entries another run is computing waits for it (see `cacheGates`).
 */
async function runInChildren(
  runs: readonly SweepRun[],
  s: {
    parallel: number;
    threads: number | undefined;
    exportAll: boolean;
    opened: ReadonlySet<string>;
    onEvent: (event: SweepEvent) => void;
    total: number;
    finish: (row: ResultRow) => Promise<void>;
  },
): Promise<void> {
  const gates = new Map<string, 'opening' | 'open'>([...s.opened].map((k) => [k, 'open']));
  const pending = [...runs];
  const running = new Set<Promise<void>>();
  while (pending.length || running.size) {
    while (running.size < s.parallel) {
      const i = pending.findIndex((r) => cacheGates(r).every((g) => gates.get(g) !== 'opening'));
      if (i < 0) break;
      const run = pending.splice(i, 1)[0]!;
      const opens = cacheGates(run).filter((g) => !gates.has(g));
      for (const g of opens) gates.set(g, 'opening');
      const job: RunJob = {
        run,
        export: s.exportAll,
        ...(s.threads ? { threads: s.threads } : {}),
      };
      const task: Promise<void> = runChild(
        job,
        () => s.onEvent(runStart(run, s.total, true)),
        s.onEvent,
      )
        .then((row) => s.finish(row))
        .finally(() => {
          for (const g of opens) gates.set(g, 'open');
          running.delete(task);
        });
      running.add(task);
    }
    if (running.size) await Promise.race(running);
  }
}
