import { randomBytes } from 'node:crypto';
import { rename, writeFile } from 'node:fs/promises';
import path from 'node:path';
import type { ValFigures } from '../train/events.js';
import type { ResolvedTrainOptions } from '../train/options.js';
import * as is from '../util/is.js';
import { type Spread, spread } from './stats.js';

/** One run of a sweep, as results.jsonl holds it (and runs/<id>/result.json). */
export interface ResultRow {
  readonly id: string;
  readonly index: number;
  /** The configuration (options without the seed) this run repeats. */
  readonly config: string;
  readonly repeat: number;
  /** The swept values of this run. */
  readonly params: Readonly<Record<string, unknown>>;
  /** Every resolved option. */
  readonly options: ResolvedTrainOptions;
  readonly splitSeed: number;
  readonly status: 'done' | 'failed';
  /** The run folder, relative to the sweep folder. */
  readonly runDir: string;
  /**
   * Validation figures of the last stage's raw and averaged weights, and of the weights the
   * run kept (what an export holds: `kept` names them).
   */
  readonly val: {
    readonly stage: 'head' | 'finetune';
    readonly raw: ValFigures | null;
    readonly swa: ValFigures | null;
    readonly kept: ValFigures | null;
    readonly exported: string;
  } | null;
  readonly test: (ValFigures & { macroF1: number }) | null;
  /**
   * Seconds per phase of this run. Runs in a child process have their own scan, load and
   * embed; runs in the sweep's process share one (in sweep.json's `embeddings`).
   */
  readonly seconds: Readonly<Record<string, number>>;
  /** Embedding-cache reads of this run's own passes (fine-tune prefix, its own embedding). */
  readonly cache: { readonly hits: number; readonly misses: number } | null;
  readonly error?: string;
}

/** What `--metric` may rank by, and which way is better. */
export const SWEEP_METRICS = Object.freeze({
  val_loss: { better: 'lower', of: (r: ResultRow) => r.val?.kept?.loss },
  val_acc: { better: 'higher', of: (r: ResultRow) => r.val?.kept?.acc },
  test_loss: { better: 'lower', of: (r: ResultRow) => r.test?.loss },
  test_acc: { better: 'higher', of: (r: ResultRow) => r.test?.acc },
  test_f1: { better: 'higher', of: (r: ResultRow) => r.test?.macroF1 },
} as const satisfies Record<
  string,
  { better: 'lower' | 'higher'; of: (r: ResultRow) => number | undefined }
>);

export type SweepMetric = keyof typeof SWEEP_METRICS;

export function checkMetric(metric: unknown): SweepMetric {
  return is.oneOfValues('metric', metric, Object.keys(SWEEP_METRICS) as SweepMetric[]);
}

/** The metric's value of a finished run, or null. */
export function metricOf(metric: SweepMetric, row: ResultRow): number | null {
  const v = row.status === 'done' ? SWEEP_METRICS[metric].of(row) : undefined;
  return typeof v === 'number' && Number.isFinite(v) ? v : null;
}

/** Whether `a` beats `b` on the metric (ties keep `b`: the earlier run). */
export function beats(metric: SweepMetric, a: number, b: number): boolean {
  return SWEEP_METRICS[metric].better === 'lower' ? a < b : a > b;
}

/** The finished run with the best metric, or null. */
export function bestRun(metric: SweepMetric, rows: readonly ResultRow[]): ResultRow | null {
  let best: ResultRow | null = null;
  let bestValue = 0;
  for (const row of rows) {
    const v = metricOf(metric, row);
    if (v === null) continue;
    if (!best || beats(metric, v, bestValue)) {
      best = row;
      bestValue = v;
    }
  }
  return best;
}

/** Per configuration: its swept values (without the seed) and the spread of every metric over repeats. */
export interface ConfigSummary {
  readonly config: string;
  readonly params: Readonly<Record<string, unknown>>;
  readonly runs: number;
  readonly failed: number;
  readonly metrics: Readonly<Record<SweepMetric, Spread | null>>;
}

export function summarise(rows: readonly ResultRow[]): ConfigSummary[] {
  const groups = new Map<string, ResultRow[]>();
  for (const row of rows) groups.set(row.config, [...(groups.get(row.config) ?? []), row]);
  return [...groups.entries()].map(([config, group]) => {
    const { seed: _seed, ...params } = group[0]!.params;
    const metrics = Object.fromEntries(
      (Object.keys(SWEEP_METRICS) as SweepMetric[]).map((m) => {
        const values = group.map((r) => metricOf(m, r)).filter((v): v is number => v !== null);
        return [m, values.length ? spread(values) : null];
      }),
    ) as Record<SweepMetric, Spread | null>;
    return {
      config,
      params,
      runs: group.length,
      failed: group.filter((r) => r.status !== 'done').length,
      metrics,
    };
  });
}

/** The configuration with the best mean metric over its repeats, or null. */
export function bestConfig(
  metric: SweepMetric,
  summaries: readonly ConfigSummary[],
): ConfigSummary | null {
  let best: ConfigSummary | null = null;
  for (const s of summaries) {
    const m = s.metrics[metric];
    if (!m) continue;
    if (!best || beats(metric, m.mean, best.metrics[metric]!.mean)) best = s;
  }
  return best;
}

function cell(value: unknown): string {
  if (value === null || value === undefined) return '';
  const text = Array.isArray(value)
    ? value.join('+')
    : typeof value === 'object'
      ? JSON.stringify(value)
      : String(value);
  return /[",\n]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
}

function csv(header: readonly string[], rows: readonly (readonly unknown[])[]): string {
  return [header, ...rows]
    .map((r) => r.map(cell).join(','))
    .join('\n')
    .concat('\n');
}

/** Every key swept by any row, in first-seen order. */
function paramKeys(rows: readonly { params: Readonly<Record<string, unknown>> }[]): string[] {
  const keys = new Set<string>();
  for (const r of rows) for (const k of Object.keys(r.params)) keys.add(k);
  return [...keys];
}

/** Phases in `seconds`: scan, load and embed only for runs in child processes (the others share them). */
const SECONDS = [
  'scan',
  'load',
  'embed',
  'head',
  'finetune',
  'test',
  'export',
  'records',
  'total',
] as const;

/** results.csv: one row per run, the swept values first. */
export function resultsCsv(rows: readonly ResultRow[]): string {
  const params = paramKeys(rows);
  const header = [
    'id',
    'config',
    'repeat',
    'status',
    ...params,
    'val_raw_loss',
    'val_raw_acc',
    'val_swa_loss',
    'val_swa_acc',
    'val_loss',
    'val_acc',
    'kept',
    'test_loss',
    'test_acc',
    'test_f1',
    ...SECONDS.map((s) => `seconds_${s}`),
    'cache_hits',
    'cache_misses',
    'run_dir',
    'error',
  ];
  return csv(
    header,
    rows.map((r) => [
      r.id,
      r.config,
      r.repeat,
      r.status,
      ...params.map((k) => r.params[k]),
      r.val?.raw?.loss,
      r.val?.raw?.acc,
      r.val?.swa?.loss,
      r.val?.swa?.acc,
      r.val?.kept?.loss,
      r.val?.kept?.acc,
      r.val?.exported,
      r.test?.loss,
      r.test?.acc,
      r.test?.macroF1,
      ...SECONDS.map((s) => r.seconds[s]),
      r.cache?.hits,
      r.cache?.misses,
      r.runDir,
      r.error,
    ]),
  );
}

/** summary.csv: per configuration, mean, std and the 95% t-interval of each metric over repeats. */
export function summaryCsv(summaries: readonly ConfigSummary[]): string {
  const params = paramKeys(summaries);
  const metrics = (Object.keys(SWEEP_METRICS) as SweepMetric[]).filter((m) =>
    summaries.some((s) => s.metrics[m]),
  );
  const header = [
    'config',
    ...params,
    'runs',
    'failed',
    ...metrics.flatMap((m) => [
      `${m}_n`,
      `${m}_mean`,
      `${m}_std`,
      `${m}_ci95_low`,
      `${m}_ci95_high`,
    ]),
  ];
  return csv(
    header,
    summaries.map((s) => [
      s.config,
      ...params.map((k) => s.params[k]),
      s.runs,
      s.failed,
      ...metrics.flatMap((m) => {
        const x = s.metrics[m];
        return x ? [x.n, x.mean, x.std, x.low, x.high] : [0, null, null, null, null];
      }),
    ]),
  );
}

/** Writes a file whole or not at all (temp file + rename): readers never see half a table. */
export async function writeFileAtomic(file: string, text: string): Promise<void> {
  const tmp = path.join(
    path.dirname(file),
    `.${path.basename(file)}.${randomBytes(4).toString('hex')}.tmp`,
  );
  await writeFile(tmp, text);
  await rename(tmp, file);
}
