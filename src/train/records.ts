import { mkdir, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { writeJson } from '../export/model-dir.js';
import { versions } from '../version.js';
import type { EpochLogs } from './callbacks.js';
import type { TrainSummary } from './events.js';
import type { PreparedRun } from './run.js';

/**
 * Writes the run's records beside model/: config.json (every resolved option, versions,
 * backend, backbone and its hash), labels.json, metrics.jsonl (a line per epoch of every
 * stage) and summary.json, into `out` (default the run's --out). Reports and sweeps read
 * only these files.
 */
export async function writeRunRecords(
  run: PreparedRun,
  summary: TrainSummary,
  history: readonly EpochLogs[],
  out: string = run.options.out,
): Promise<void> {
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
}
