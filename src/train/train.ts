import path from 'node:path';
import { dataError } from '../errors.js';
import { exportClassifier } from '../export/classifier.js';
import { openRunFolder } from '../io/run-folder.js';
import { versions } from '../version.js';
import {
  type LoadedCheckpoint,
  type ResumeOptions,
  RunCheckpoints,
  resumeOptions,
} from './checkpoint.js';
import { type TrainSummary, weightsName } from './events.js';
import { resolveTrainOptions, type TrainOptions } from './options.js';
import { type HeadResult, headOptions, trainStages } from './phases.js';
import { writeRunRecords } from './records.js';
import { type EmbeddedSplits, embedSplits, type PreparedRun, prepareRun } from './run.js';

function countBy(
  files: EmbeddedSplits['train']['files'],
  classes: readonly string[],
): Record<string, number> {
  const counts = Object.fromEntries(classes.map((c) => [c, 0]));
  for (const f of files) counts[classes[f.label]!]!++;
  return counts;
}

/** Per-split counts of usable images; fails when fewer than two classes can be learned. */
export function checkCounts(run: PreparedRun, embedded: EmbeddedSplits): TrainSummary['counts'] {
  const { classes } = run.splits;
  const counts = {
    train: countBy(embedded.train.files, classes),
    val: countBy(embedded.val.files, classes),
    test: countBy(embedded.test.files, classes),
  };
  const usable = classes.filter((c) => counts.train[c]! > 0);
  if (usable.length < 2) {
    throw dataError(
      `expected at least 2 classes with usable training images but found ${usable.length}`,
      { path: run.options.data },
    );
  }
  for (const c of classes) {
    if (counts.train[c] === 0)
      run.warn(
        `class '${c}' has no usable training images; it stays in the labels but cannot be learned`,
      );
  }
  if (!embedded.val.files.length) {
    run.warn(
      'no validation images (too few per class for the validation split, or every one was skipped): there are no val figures, and SWA and raw weights cannot be compared',
    );
  }
  run.emit({ type: 'data', classes, counts: counts.train });
  return counts;
}

/**
 * Trains a classifier on a folder of images: prepare (options, splits, backbone, the
 * fine-tune cut) → embed every image once through the frozen backbone → train the head
 * with SWA over its trainable variables → optional fine-tune stage → test figures →
 * export backbone + head → run records. Each phase is a library function of its own.
 *
 * With `checkpointEvery` the run checkpoints itself, and `{ resume: RUN }` continues an
 * interrupted one exactly (see `ResumeOptions`).
 *
 * @example
 *   const summary = await train({ data: 'photos', out: 'runs/r1', epochs: 20 });
 *   console.log(summary.val?.acc);
 *   await train({ resume: 'runs/r2' }); // a run started with checkpointEvery: 5
 */
export async function train(options: TrainOptions | ResumeOptions): Promise<TrainSummary> {
  const t0 = performance.now();
  // --resume: RUN's own options, and its checkpoint to continue from.
  let resumed: LoadedCheckpoint | null = null;
  if ('resume' in options && options.resume !== undefined) {
    const r = await resumeOptions(options);
    options = r.options;
    resumed = r.checkpoint;
  }
  const given = options as TrainOptions;
  // --out is checked and locked before any work; the run writes into a staging folder
  // that replaces it whole at the end, so a folder is a complete run or visibly not one.
  let folder: Awaited<ReturnType<typeof openRunFolder>>;
  let run: PreparedRun;
  try {
    const out = resolveTrainOptions(given).out;
    folder = await openRunFolder(out);
    try {
      run = await prepareRun({ ...given, out });
    } catch (err) {
      await folder.abandon();
      throw err;
    }
  } catch (err) {
    resumed?.dispose();
    throw err;
  }
  const o = run.options;
  const seconds: Record<string, number> = { ...run.seconds };
  let mark = performance.now();
  const lap = (name: string): void => {
    const now = performance.now();
    seconds[name] = (now - mark) / 1000;
    mark = now;
  };
  let head: HeadResult | null = null;
  let committed = false;
  const checkpoints = RunCheckpoints.create(
    given,
    o,
    {
      ...o,
      backendInfo: run.backend,
      backboneSpec: run.backbone.spec,
      weightsHash: run.backbone.weightsHash,
      versions: versions(),
    },
    resumed,
  );
  try {
    const embedded = await embedSplits(run);
    lap('embed');
    const counts = checkCounts(run, embedded);

    const stagesResult = await trainStages(run, embedded, o, {
      finetune: run.finetune !== null,
      predictions: true,
      lap,
      checkpoints,
    });
    head = stagesResult.head;
    const { history, stages, kept, val, test, predictions } = stagesResult;

    const exported = weightsName(kept);
    const { onnx } = await exportClassifier(
      folder.staging,
      run.backbone,
      head.head,
      headOptions(o),
      run.splits.classes,
      exported,
      undefined,
      stagesResult.swag,
    );
    lap('export');
    seconds['total'] = (performance.now() - t0) / 1000;
    const summary: TrainSummary = {
      out: o.out,
      classes: run.splits.classes,
      counts,
      skipped: embedded.skipped,
      warnings: run.warnings,
      backend: run.backend.option,
      engine: embedded.source,
      engineReason: embedded.reason,
      cachedEmbeddings: embedded.cached,
      backbone: run.backbone.spec.id,
      stages,
      exported,
      onnx: onnx && path.join(o.out, path.relative(folder.staging, onnx)),
      val,
      test,
      seconds,
    };
    await writeRunRecords(run, summary, history, { predictions, out: folder.staging });
    await folder.commit();
    committed = true;
    run.emit({ type: 'done', summary });
    return summary;
  } finally {
    head?.dispose();
    checkpoints?.dispose();
    run.dispose();
    if (!committed) await folder.abandon();
  }
}
