import { stat } from 'node:fs/promises';
import path from 'node:path';
import sharp from 'sharp';
import { fileError } from '../errors.js';
import { classificationReport } from '../export/metrics.js';
import { exists } from '../io/atomic.js';
import type { EpochLogs } from '../train/callbacks.js';
import type { StageSummary, TrainSummary } from '../train/events.js';
import { VAL_PREDICTIONS, type ValPrediction } from '../train/phases.js';
import {
  confusionChartOption,
  type EpochMarks,
  type EpochSeries,
  epochChartOption,
  renderChart,
} from './report-charts.js';
import {
  count,
  esc,
  htmlPage,
  htmlTable,
  keyValueTable,
  num,
  readJsonLines,
  readJsonRecord,
} from './report-html.js';

/** How many of the most confidently misclassified validation images a report shows. */
export const MISCLASSIFIED_SHOWN = 24;
/** Thumbnail edge in pixels (JPEG, inlined as a data URI). */
export const THUMBNAIL_SIZE = 64;

/**
 * An epoch line as the report reads it. Once averaging has a snapshot, lines carry the
 * averaged weights' validation figures too (`val_avg_loss`, `val_avg_acc`), drawn as their
 * own curves.
 */
type MetricLine = EpochLogs;

interface ValPredictionsRecord {
  readonly weights: string;
  readonly predictions: readonly ValPrediction[];
}

/** Everything a run report is drawn from, read from the run folder alone. */
export interface RunRecords {
  readonly dir: string;
  readonly config: Record<string, unknown>;
  readonly labels: readonly string[];
  readonly metrics: readonly MetricLine[];
  readonly summary: TrainSummary;
  /** null: the run had no validation split (or predates val-predictions.json). */
  readonly valPredictions: ValPredictionsRecord | null;
}

export async function readRunRecords(dir: string): Promise<RunRecords> {
  const [config, labels, metrics, summary] = await Promise.all([
    readJsonRecord<Record<string, unknown>>(path.join(dir, 'config.json')),
    readJsonRecord<string[]>(path.join(dir, 'labels.json')),
    readJsonLines<MetricLine>(path.join(dir, 'metrics.jsonl')),
    readJsonRecord<TrainSummary>(path.join(dir, 'summary.json')),
  ]);
  const predictionsFile = path.join(dir, VAL_PREDICTIONS);
  const valPredictions = (await exists(predictionsFile))
    ? await readJsonRecord<ValPredictionsRecord>(predictionsFile)
    : null;
  return { dir, config, labels, metrics, summary, valPredictions };
}

/** The run's epochs on one axis: x counts on across stages, in metrics.jsonl order. */
function epochAxis(metrics: readonly MetricLine[]): {
  xs: number[];
  marks: EpochMarks;
  stageEnd: Map<string, number>;
} {
  const xs = metrics.map((_, i) => i + 1);
  const swaStarts: { x: number; stage: string }[] = [];
  const stageEnd = new Map<string, number>();
  let finetune: { from: number; to: number } | null = null;
  metrics.forEach((m, i) => {
    const x = xs[i]!;
    stageEnd.set(m.stage, x);
    if ((m.snapshots ?? 0) > 0 && !swaStarts.some((s) => s.stage === m.stage))
      swaStarts.push({ x, stage: m.stage });
    if (m.stage === 'finetune') finetune = { from: finetune?.from ?? x, to: x };
  });
  return { xs, marks: { swaStarts, finetune }, stageEnd };
}

function curve(
  name: string,
  metrics: readonly MetricLine[],
  xs: readonly number[],
  pick: (m: MetricLine) => number | undefined,
): EpochSeries[] {
  const points = metrics.flatMap((m, i) => {
    const v = pick(m);
    return typeof v === 'number' && Number.isFinite(v) ? [[xs[i]!, v] as const] : [];
  });
  return points.length ? [{ name, points }] : [];
}

/** The averaged weights' validation figure at the end of each stage that averaged. */
function stageEndPoints(
  summary: TrainSummary,
  stageEnd: ReadonlyMap<string, number>,
  pick: (f: NonNullable<StageSummary['swa']>) => number,
): EpochSeries[] {
  const points = Object.entries(summary.stages).flatMap(([stage, s]) => {
    const x = stageEnd.get(stage);
    return s?.swa && x !== undefined ? [[x, pick(s.swa)] as const] : [];
  });
  return points.length
    ? [{ name: 'val (averaged weights, stage end)', points, kind: 'point' as const }]
    : [];
}

async function curveCharts(r: RunRecords): Promise<string[]> {
  const { metrics, summary } = r;
  if (!metrics.length) return [];
  const { xs, marks, stageEnd } = epochAxis(metrics);
  const loss: EpochSeries[] = [
    ...curve('train', metrics, xs, (m) => m.loss),
    ...curve('val (raw weights)', metrics, xs, (m) => m.val_loss),
    ...curve('val (averaged weights)', metrics, xs, (m) => m.val_avg_loss),
    ...stageEndPoints(summary, stageEnd, (f) => f.loss),
  ];
  const acc: EpochSeries[] = [
    ...curve('train', metrics, xs, (m) => m.acc),
    ...curve('val (raw weights)', metrics, xs, (m) => m.val_acc),
    ...curve('val (averaged weights)', metrics, xs, (m) => m.val_avg_acc),
    ...stageEndPoints(summary, stageEnd, (f) => f.acc),
  ];
  const lrs = metrics.map((m) => m.lr).filter((v) => v > 0);
  const lr = curve('learning rate', metrics, xs, (m) => m.lr);
  // A log axis once the rates span more than a decade (a fine-tune stage's LR is ~10× lower).
  const logY = lrs.length > 0 && Math.max(...lrs) / Math.min(...lrs) > 10;
  return Promise.all([
    renderChart(epochChartOption('Loss', 'loss', loss, marks), 540, 340),
    renderChart(epochChartOption('Accuracy', 'accuracy', acc, marks), 540, 340),
    renderChart(epochChartOption('Learning rate per epoch', 'lr', lr, marks, { logY }), 540, 300),
  ]);
}

/** A small JPEG data URI of an image, or why there is none. */
async function thumbnail(file: string): Promise<{ uri: string } | { missing: string }> {
  try {
    // Only regular files: a FIFO or a device would block or never end.
    if (!(await stat(file)).isFile()) return { missing: 'not a regular file' };
    const jpeg = await sharp(file)
      .rotate()
      .resize(THUMBNAIL_SIZE, THUMBNAIL_SIZE, { fit: 'inside' })
      .jpeg({ quality: 75 })
      .toBuffer();
    return { uri: `data:image/jpeg;base64,${jpeg.toString('base64')}` };
  } catch (err) {
    return {
      missing: (err as NodeJS.ErrnoException).code === 'ENOENT' ? 'not found' : 'unreadable',
    };
  }
}

async function misclassifiedSection(r: RunRecords): Promise<string> {
  const rows = r.valPredictions?.predictions ?? [];
  const wrong = rows
    .filter((p) => p.label !== p.predicted)
    .sort((a, b) => b.confidence - a.confidence)
    .slice(0, MISCLASSIFIED_SHOWN);
  if (!wrong.length) {
    return `<p class="note">${rows.length ? 'Every validation image was classified correctly.' : 'No validation predictions recorded.'}</p>`;
  }
  const thumbs = await Promise.all(wrong.map((p) => thumbnail(p.file)));
  const figures = wrong.map((p, i) => {
    const t = thumbs[i]!;
    const img =
      'uri' in t
        ? `<img src="${t.uri}" alt="${esc(path.basename(p.file))}">`
        : `<div class="missing" title="${esc(p.file)}">${esc(t.missing)}</div>`;
    return `<figure>${img}<figcaption>true <b>${esc(p.label)}</b><br>predicted <b>${esc(p.predicted)}</b> (${num(p.confidence, 3)})<br><span class="note" title="${esc(p.file)}">${esc(path.basename(p.file))}</span></figcaption></figure>`;
  });
  const total = rows.filter((p) => p.label !== p.predicted).length;
  return `<p class="note">The ${wrong.length} most confident of ${total} misclassified validation images (of ${rows.length}).</p><div class="thumbs">${figures.join('\n')}</div>`;
}

async function validationSection(r: RunRecords): Promise<string> {
  const vp = r.valPredictions;
  if (!vp?.predictions.length) {
    return '<p class="note">No per-image validation predictions in this run folder (no validation split, or the run was written before val-predictions.json existed).</p>';
  }
  const index = new Map(r.labels.map((l, i) => [l, i]));
  const file = path.join(r.dir, VAL_PREDICTIONS);
  const toIndex = (label: string): number => {
    const i = index.get(label);
    if (i === undefined) throw fileError(file, `names class '${label}', which labels.json lacks`);
    return i;
  };
  const report = classificationReport(
    vp.predictions.map((p) => toIndex(p.label)),
    vp.predictions.map((p) => toIndex(p.predicted)),
    r.labels,
  );
  const k = r.labels.length;
  const side = Math.min(900, Math.max(360, 160 + 44 * k));
  const heatmap = await renderChart(confusionChartOption(r.labels, report.confusion), side, side);
  const perClass = htmlTable(
    ['class', 'precision', 'recall', 'F1', 'support'],
    report.perClass.map((m) => [m.label, m.precision, m.recall, m.f1, count(m.support)]),
    {
      sortable: true,
      id: 'per-class',
      footer: [
        [
          'macro average',
          report.macro.precision,
          report.macro.recall,
          report.macro.f1,
          count(report.count),
        ],
      ],
    },
  );
  return `<p class="note">Weights: ${esc(vp.weights)}; accuracy ${num(report.accuracy)} on ${report.count} images.</p>
<div class="charts"><div class="chart" id="chart-confusion">${heatmap}</div><div>${perClass}</div></div>`;
}

function stagesTable(summary: TrainSummary, metrics: readonly MetricLine[]): string {
  return htmlTable(
    [
      'stage',
      'epochs',
      'val acc (raw)',
      'val loss (raw)',
      'val acc (SWA)',
      'val loss (SWA)',
      'snapshots',
      'kept',
    ],
    Object.entries(summary.stages).map(([stage, s]) => [
      stage,
      count(metrics.filter((m) => m.stage === stage).length),
      s?.raw?.acc,
      s?.raw?.loss,
      s?.swa?.acc,
      s?.swa?.loss,
      count(s?.snapshots),
      s?.kept,
    ]),
  );
}

function isPlain(v: unknown): boolean {
  return (
    v === null ||
    ['string', 'number', 'boolean'].includes(typeof v) ||
    (Array.isArray(v) && v.every((x) => x === null || typeof x !== 'object'))
  );
}

function configSection(config: Record<string, unknown>): string {
  const versions = (config['versions'] ?? {}) as Record<string, string | null>;
  const options = Object.entries(config)
    .filter(([, v]) => isPlain(v))
    .map(([k, v]) => [k, Array.isArray(v) ? v.join(', ') : String(v)] as const);
  const nested = Object.entries(config).filter(([, v]) => !isPlain(v) && v !== undefined);
  return `<div class="charts"><div><h3>Versions</h3>${keyValueTable(Object.entries(versions))}</div>
<div><h3>Resolved options</h3>${keyValueTable(options)}</div></div>
${nested.map(([k, v]) => `<details><summary>${esc(k)}</summary><pre>${esc(JSON.stringify(v, null, 2))}</pre></details>`).join('\n')}`;
}

function card(label: string, value: string): string {
  return `<div class="card">${esc(label)}<b>${esc(value)}</b></div>`;
}

/** The run report's HTML, from the run folder's records alone. */
export async function runReportHtml(records: RunRecords): Promise<string> {
  const { summary: s, metrics } = records;
  const total = (split: 'train' | 'val' | 'test') =>
    Object.values(s.counts?.[split] ?? {}).reduce((a, b) => a + b, 0);
  const [charts, validation, misclassified] = await Promise.all([
    curveCharts(records),
    validationSection(records),
    misclassifiedSection(records),
  ]);
  // The run's own name (summary.out): the report is written while the run is still in its
  // staging folder, and a run folder may be moved or renamed after.
  const name = path.basename(path.resolve(s.out || records.dir));
  const body = `<h1>Run ${esc(name)}</h1>
<p class="sub">${esc(s.backbone)} · ${esc(s.classes.length)} classes · backend ${esc(s.backend)} · embeddings ${esc(s.engine)}</p>
<div class="cards">
${card('exported weights', s.exported)}
${card('val accuracy', num(s.val?.acc))}
${card('test accuracy', num(s.test?.acc))}
${card('test macro F1', num(s.test?.macroF1))}
${card('images train / val / test', `${total('train')} / ${total('val')} / ${total('test')}`)}
${card('skipped files', String(s.skipped.length))}
${card('seconds', num(s.seconds['total'], 1))}
</div>
<h2>Stages</h2>
${stagesTable(s, metrics)}
<h2>Training curves</h2>
${charts.length ? `<div class="charts">${charts.map((svg, i) => `<div class="chart" id="chart-curve-${i}">${svg}</div>`).join('\n')}</div>` : '<p class="note">metrics.jsonl holds no epochs.</p>'}
<h2>Validation: confusion and per-class figures</h2>
${validation}
<h2>Most confidently misclassified</h2>
${misclassified}
<h2>Classes</h2>
${htmlTable(
  ['class', 'train', 'val', 'test'],
  s.classes.map((c) => [
    c,
    count(s.counts.train[c]),
    count(s.counts.val[c]),
    count(s.counts.test[c]),
  ]),
  { sortable: true, id: 'classes' },
)}
<h2>Skipped files</h2>
${
  s.skipped.length
    ? htmlTable(
        ['file', 'reason'],
        s.skipped.map((f) => [f.path, f.reason]),
        { sortable: true, id: 'skipped' },
      )
    : '<p class="note">None.</p>'
}
${s.warnings.length ? `<h2>Warnings</h2><ul>${s.warnings.map((w) => `<li>${esc(w)}</li>`).join('')}</ul>` : ''}
<h2>Time per phase</h2>
${keyValueTable(Object.entries(s.seconds).map(([k, v]) => [k, num(v, 2)]))}
<h2>Configuration</h2>
${configSection(records.config)}`;
  return htmlPage(`Run ${name}`, body, { script: true });
}
