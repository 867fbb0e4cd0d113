import path from 'node:path';
import { fileError } from '../errors.js';
import { exists } from '../io/atomic.js';
import type { ValFigures } from '../train/events.js';
import { type ParamGroup, paramChartOption, renderChart } from './report-charts.js';
import {
  type CellInput,
  esc,
  htmlPage,
  htmlTable,
  num,
  REPORT_FILE,
  readJsonLines,
  readJsonRecord,
} from './report-html.js';

/** One row of a sweep's results.jsonl. */
export interface SweepResultRow {
  readonly id: string;
  /** The swept values of this run. */
  readonly params: Record<string, unknown>;
  readonly options?: Record<string, unknown>;
  readonly status: string;
  readonly runDir?: string;
  readonly val?: { readonly raw?: ValFigures | null; readonly swa?: ValFigures | null } | null;
  readonly test?: (ValFigures & { readonly macroF1?: number }) | null;
  readonly seconds?: number;
  readonly error?: string;
}

/** sweep.json as the report reads it. */
export interface SweepRecord {
  readonly metric?: string;
  readonly best?: string | { readonly id: string } | null;
  readonly config?: unknown;
}

/** Swept parameters that only repeat a configuration: the charts average over them. */
const REPEAT_PARAMS: ReadonlySet<string> = new Set(['seed', 'repeat']);

/**
 * Figures a sweep can be ranked by, besides any dotted path into a row (`val.raw.acc`,
 * `test.macroF1`, …): `val.acc`/`val.loss` are the averaged weights' figures where the
 * run averaged, else the raw weights' (what a run keeps by default).
 */
const METRIC_ALIASES: Readonly<Record<string, (r: SweepResultRow) => unknown>> = {
  'val.acc': (r) => (r.val?.swa ?? r.val?.raw)?.acc,
  'val.loss': (r) => (r.val?.swa ?? r.val?.raw)?.loss,
};

function dotted(row: unknown, key: string): unknown {
  return key
    .split('.')
    .reduce<unknown>(
      (v, k) => (v && typeof v === 'object' ? (v as Record<string, unknown>)[k] : undefined),
      row,
    );
}

export function metricOf(row: SweepResultRow, metric: string): number | null {
  const v = METRIC_ALIASES[metric] ? METRIC_ALIASES[metric](row) : dotted(row, metric);
  return typeof v === 'number' && Number.isFinite(v) ? v : null;
}

/** Loss-like metrics are minimised, everything else maximised. */
export function lowerIsBetter(metric: string): boolean {
  return /loss$/i.test(metric);
}

function formatValue(v: unknown): string {
  return typeof v === 'string' ? v : JSON.stringify(v);
}

function compareValues(a: unknown, b: unknown): number {
  if (typeof a === 'number' && typeof b === 'number') return a - b;
  return formatValue(a).localeCompare(formatValue(b));
}

/** The run folder of a row: its runDir (absolute, or relative to the sweep), else runs/<id>. */
export async function locateRunDir(sweepDir: string, row: SweepResultRow): Promise<string | null> {
  const candidates = [
    ...(row.runDir ? [path.resolve(sweepDir, row.runDir), path.resolve(row.runDir)] : []),
    path.join(sweepDir, 'runs', row.id),
  ];
  for (const dir of candidates) if (await exists(path.join(dir, 'summary.json'))) return dir;
  return null;
}

export interface SweepRecords {
  readonly dir: string;
  readonly sweep: SweepRecord;
  readonly rows: readonly SweepResultRow[];
  readonly metric: string;
  readonly bestId: string | null;
  /** Each row's run folder (null when it has none with a summary.json). */
  readonly runDirs: readonly (string | null)[];
}

export async function readSweepRecords(dir: string): Promise<SweepRecords> {
  const sweepFile = path.join(dir, 'sweep.json');
  const resultsFile = path.join(dir, 'results.jsonl');
  const [sweep, rows] = await Promise.all([
    readJsonRecord<SweepRecord>(sweepFile),
    readJsonLines<SweepResultRow>(resultsFile),
  ]);
  rows.forEach((r, i) => {
    if (typeof r?.id !== 'string' || !r.params || typeof r.params !== 'object')
      throw fileError(resultsFile, `line ${i + 1} lacks an id or params`);
  });
  const metric = sweep.metric ?? 'val.acc';
  if (rows.length && rows.every((r) => metricOf(r, metric) === null) && rows.some((r) => r.val)) {
    throw fileError(
      sweepFile,
      `names metric '${metric}', which no row of results.jsonl holds (expected val.acc, val.loss or a path such as val.raw.acc, val.swa.acc, test.acc)`,
    );
  }
  const named = typeof sweep.best === 'string' ? sweep.best : (sweep.best?.id ?? null);
  const ranked = rows
    .filter((r) => metricOf(r, metric) !== null)
    .sort((a, b) => {
      const d = metricOf(a, metric)! - metricOf(b, metric)!;
      return lowerIsBetter(metric) ? d : -d;
    });
  const bestId = named && rows.some((r) => r.id === named) ? named : (ranked[0]?.id ?? null);
  const runDirs = await Promise.all(rows.map((r) => locateRunDir(dir, r)));
  return { dir, sweep, rows, metric, bestId, runDirs };
}

/** The swept parameters in first-seen order, with their values sorted. */
export function sweptParams(rows: readonly SweepResultRow[]): Map<string, unknown[]> {
  const params = new Map<string, unknown[]>();
  for (const r of rows) {
    for (const [k, v] of Object.entries(r.params)) {
      const values = params.get(k) ?? [];
      if (!values.some((x) => formatValue(x) === formatValue(v))) values.push(v);
      params.set(k, values);
    }
  }
  for (const values of params.values()) values.sort(compareValues);
  return params;
}

/** For each value of `param`: the metric of every run with that value (over every other parameter). */
export function paramGroups(
  rows: readonly SweepResultRow[],
  param: string,
  values: readonly unknown[],
  metric: string,
): ParamGroup[] {
  return values.map((v) => ({
    value: formatValue(v),
    metrics: rows.flatMap((r) => {
      const m = metricOf(r, metric);
      return formatValue(r.params[param]) === formatValue(v) && m !== null ? [m] : [];
    }),
  }));
}

/** The sweep report's HTML, from sweep.json, results.jsonl and the run folders. */
export async function sweepReportHtml(s: SweepRecords): Promise<string> {
  const params = sweptParams(s.rows);
  const charted = [...params].filter(([k, values]) => values.length > 1 && !REPEAT_PARAMS.has(k));
  const charts = await Promise.all(
    charted.map(([k, values]) =>
      renderChart(
        paramChartOption(k, s.metric, paramGroups(s.rows, k, values, s.metric)),
        460,
        320,
      ),
    ),
  );
  const link = (i: number): string => {
    const row = s.rows[i]!;
    const dir = s.runDirs[i];
    if (!dir) return esc(row.id);
    const href = path
      .relative(s.dir, path.join(dir, REPORT_FILE))
      .split(path.sep)
      .map(encodeURIComponent)
      .join('/');
    return `<a href="${esc(href)}">${esc(row.id)}</a>`;
  };
  const best = s.rows.findIndex((r) => r.id === s.bestId);
  const table = htmlTable(
    [
      'run',
      ...params.keys(),
      'status',
      s.metric,
      'val acc (raw)',
      'val loss (raw)',
      'val acc (SWA)',
      'val loss (SWA)',
      'test acc',
      'seconds',
    ],
    s.rows.map((r, i) => [
      { html: `${i === best ? '★ ' : ''}${link(i)}`, sort: r.id },
      ...[...params.keys()].map((k): CellInput => {
        const v = r.params[k];
        return v === undefined
          ? null
          : typeof v === 'number'
            ? { html: esc(String(v)), sort: v }
            : formatValue(v);
      }),
      r.error
        ? { html: `<span title="${esc(r.error)}">${esc(r.status)}</span>`, sort: r.status }
        : r.status,
      metricOf(r, s.metric),
      r.val?.raw?.acc,
      r.val?.raw?.loss,
      r.val?.swa?.acc,
      r.val?.swa?.loss,
      r.test?.acc,
      typeof r.seconds === 'number' ? { html: num(r.seconds, 1), sort: r.seconds } : null,
    ]),
    { sortable: true, id: 'results', rowClass: (i) => (i === best ? 'best' : null) },
  );
  const bestRow = best >= 0 ? s.rows[best]! : null;
  const name = path.basename(path.resolve(s.dir));
  const body = `<h1>Sweep ${esc(name)}</h1>
<p class="sub">${s.rows.length} runs · ranked by ${esc(s.metric)} (${lowerIsBetter(s.metric) ? 'lower' : 'higher'} is better)</p>
${
  bestRow
    ? `<p id="best">Best run: <b>${link(best)}</b>, ${esc(s.metric)} ${num(metricOf(bestRow, s.metric))} with ${esc(
        Object.entries(bestRow.params)
          .map(([k, v]) => `${k}=${formatValue(v)}`)
          .join(', '),
      )}</p>`
    : '<p class="note">No run finished with a figure for this metric.</p>'
}
<h2>Results</h2>
<p class="note">Click a column header to sort.</p>
${table}
<h2>${esc(s.metric)} against each swept parameter</h2>
${
  charts.length
    ? `<p class="note">Mean over every run with the value (other parameters and repeats included), ± one standard deviation; dots are single runs.</p><div class="charts">${charts.map((svg, i) => `<div class="chart" id="chart-param-${i}">${svg}</div>`).join('\n')}</div>`
    : '<p class="note">No parameter took more than one value.</p>'
}
<h2>Sweep configuration</h2>
<pre>${esc(JSON.stringify(s.sweep, null, 2))}</pre>`;
  return htmlPage(`Sweep ${name}`, body, { script: true });
}
