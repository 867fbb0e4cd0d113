import path from 'node:path';
import { fileError } from '../errors.js';
import { exists, writeFileAtomic } from '../io/atomic.js';
import { REPORT_FILE } from './report-html.js';
import { readRunRecords, runReportHtml } from './report-run.js';
import { readSweepRecords, sweepReportHtml } from './report-sweep.js';

export { REPORT_FILE } from './report-html.js';

/**
 * Writes `runDir/report.html` from the run's records alone (config.json, labels.json,
 * metrics.jsonl, summary.json, val-predictions.json): loss, accuracy and LR curves with the
 * SWA starts and the fine-tune stage marked, the validation confusion matrix and per-class
 * precision/recall/F1, the most confidently misclassified validation images as 64 px
 * thumbnails, skipped files, configuration and versions. The page loads nothing: charts
 * are inline SVG and images data URIs, so it opens offline from file://.
 *
 * @returns the report's path
 * @example
 *   await writeRunReport('runs/r1'); // runs/r1/report.html
 */
export async function writeRunReport(runDir: string): Promise<string> {
  const html = await runReportHtml(await readRunRecords(runDir));
  const file = path.join(runDir, REPORT_FILE);
  await writeFileAtomic(file, html);
  return file;
}

/**
 * Writes `sweepDir/report.html` from sweep.json and results.jsonl: a results table that
 * sorts on a header click, the metric against each swept parameter (mean ± one standard
 * deviation over the runs with each value), and the best run highlighted and linked to its
 * run folder's report. Run folders that have records but no report.html get one first, so
 * every link opens.
 *
 * @returns the report's path
 * @example
 *   await writeSweepReport('sweeps/s1'); // sweeps/s1/report.html
 */
export async function writeSweepReport(sweepDir: string): Promise<string> {
  const records = await readSweepRecords(sweepDir);
  for (const dir of records.runDirs) {
    if (dir && !(await exists(path.join(dir, REPORT_FILE)))) await writeRunReport(dir);
  }
  const file = path.join(sweepDir, REPORT_FILE);
  await writeFileAtomic(file, await sweepReportHtml(records));
  return file;
}

/**
 * Writes the report of a run folder (it has summary.json) or a sweep folder (sweep.json).
 *
 * @example
 *   const { kind, file } = await writeReport('runs/r1');
 */
export async function writeReport(dir: string): Promise<{ kind: 'run' | 'sweep'; file: string }> {
  if (await exists(path.join(dir, 'sweep.json')))
    return { kind: 'sweep', file: await writeSweepReport(dir) };
  if (await exists(path.join(dir, 'summary.json')))
    return { kind: 'run', file: await writeRunReport(dir) };
  throw fileError(
    dir,
    'is neither a run folder (no summary.json) nor a sweep folder (no sweep.json)',
  );
}
