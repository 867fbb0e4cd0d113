import { mkdir, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { writeRunReport } from '../experiments/report.js';
import { writeJson } from '../export/model-dir.js';
import { versions } from '../version.js';
import type { EpochLogs } from './callbacks.js';
import type { TrainSummary } from './events.js';
import { VAL_PREDICTIONS, type ValPrediction } from './phases.js';
import type { PreparedRun } from './run.js';

/**
 * Writes the run's records beside model/: config.json (every resolved option, versions,
 * backend, backbone and its hash), labels.json, metrics.jsonl (a line per epoch of every
 * stage), summary.json and, with a validation split, val-predictions.json (each image's
 * prediction by the exported weights), into `out` (default the run's --out); then
 * report.html from those files alone. Reports and sweeps read only these files.
 */
export async function writeRunRecords(
  run: PreparedRun,
  summary: TrainSummary,
  history: readonly EpochLogs[],
  options: { predictions?: readonly ValPrediction[] | null; out?: string; report?: boolean } = {},
): Promise<void> {
  const out = options.out ?? run.options.out;
  const predictions = options.predictions ?? null;
  await mkdir(out, { recursive: true });
  await writeFile(
    path.join(out, 'metrics.jsonl'),
    history.map((logs) => `${JSON.stringify(logs)}\n`).join(''),
  );
  await writeJson(path.join(out, 'config.json'), {
    ...run.options,
    backendInfo: run.backend,
    engineUsed: summary.engine,
    backboneSpec: run.backbone.spec,
    weightsHash: run.backbone.weightsHash,
    versions: versions(),
  });
  await writeJson(path.join(out, 'labels.json'), run.splits.classes);
  await writeJson(path.join(out, 'summary.json'), summary);
  if (predictions) {
    await writeJson(path.join(out, VAL_PREDICTIONS), {
      weights: summary.exported,
      predictions,
    });
  }
  // A sweep writes its runs' reports on demand (`finetune report SWEEP`): 0.4 s a run adds up.
  if (options.report !== false) await writeRunReport(out);
}
