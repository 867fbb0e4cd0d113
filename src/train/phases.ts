import path from 'node:path';
import * as tf from '@tensorflow/tfjs';
import { FinetuneError } from '../errors.js';
import { classificationReport } from '../export/metrics.js';
import { buildHead, type HeadOptions } from '../head/build.js';
import { HeadPopulation } from '../head/population.js';
import type { AverageKind } from '../swa/schedule.js';
import type { SwagState } from '../swa/swag.js';
import type { EpochLogs, TrainingCallback } from './callbacks.js';
import type { HeadCarry, RunCheckpoints } from './checkpoint.js';
import {
  type StageSummary,
  type TrainSummary,
  type ValFigures,
  type WeightsChoice,
  type WeightsKind,
  weightsName,
} from './events.js';
import { type FineTuneResult, runFineTune, warmupSteps } from './finetune.js';
import { ArrayBatches, argmax, balancedWeights, type Evaluation, evaluateBatches } from './fit.js';
import { headInit } from './init.js';
import type { ResolvedTrainOptions } from './options.js';
import type { Embedded, EmbeddedSplits, PreparedRun } from './run.js';
import {
  type EarlyStopSettings,
  runMembers,
  type StageCheckpointing,
  type StageResult,
  type SwaSettings,
} from './stage.js';

export function figures(e: Evaluation | null): ValFigures | null {
  return e ? { loss: e.loss, acc: e.acc } : null;
}

/** What summary.json says of a stage. */
function stageSummary(stage: StageResult) {
  return {
    raw: figures(stage.raw),
    swa: figures(stage.swa),
    average: stage.average,
    snapshots: stage.snapshots,
    averagingFrom: stage.averagingFrom,
    stoppedAfter: stage.stoppedAfter,
    kept: stage.kept,
    ...(stage.swag
      ? { swag: { rank: stage.swag.rank, deviations: stage.swag.deviations.length } }
      : {}),
    ...(stage.bnRefreshed.length ? { bnRefreshed: stage.bnRefreshed } : {}),
    ...(stage.candidates ? { candidates: stage.candidates } : {}),
    ...(stage.chosen ? { chosen: stage.chosen } : {}),
  };
}

/** The head's shape and seed as the options give them (what buildHead and the export take). */
export function headOptions(o: ResolvedTrainOptions): HeadOptions {
  return { hidden: o.hidden, dropout: o.dropout, seed: o.seed, bn: o.headBn };
}

function featureBatches(e: Embedded, dim: number): ArrayBatches {
  return new ArrayBatches(e.features, [dim], e.labels);
}

function classWeights(o: ResolvedTrainOptions, labels: Int32Array, numClasses: number) {
  return o.classWeights === 'balanced' ? balancedWeights(labels, numClasses) : null;
}

/** Emits an event per epoch (the logs reach metrics.jsonl through the stage's history). */
function epochLogger(
  run: PreparedRun,
  epochs: number,
  average: AverageKind | null,
): TrainingCallback {
  return {
    onEpochEnd(_epoch, logs) {
      run.emit({ type: 'epoch', logs, epochs, average });
    },
  };
}

/** The run's kind of averaging, or null without. */
function averageName(o: ResolvedTrainOptions): AverageKind | null {
  return o.average === 'none' ? null : o.average;
}

/** A stage's averaging settings from the options (null: `--average none`). */
function averaging(o: ResolvedTrainOptions, stage: 'head' | 'finetune'): SwaSettings | null {
  if (o.average === 'none') return null;
  const head = stage === 'head';
  return {
    kind: o.average,
    start: head ? o.swaStart : o.finetuneSwaStart,
    freq: head ? o.swaFreq : o.finetuneSwaFreq,
    lr: head ? o.swaLr : o.finetuneSwaLr,
    // The fine-tune stage switches to its SWA LR at once (no anneal, no cycles).
    annealEpochs: head ? o.swaAnnealEpochs : 0,
    schedule: head ? o.swaSchedule : 'cos',
    cycle: o.swaCycle,
    emaDecay: o.emaDecay,
    ...(o.average === 'swa' && o.swag > 0 ? { swag: o.swag } : {}),
  };
}

/** Early stopping from the options (null: off); it needs validation images to watch. */
function earlyStopping(
  o: ResolvedTrainOptions,
  embedded: EmbeddedSplits,
): EarlyStopSettings | null {
  if (!(o.earlyStop > 0)) return null;
  if (!embedded.val.files.length)
    throw new FinetuneError(
      'earlyStop needs validation images to watch, and this run has none (see the warning above)',
      { option: 'earlyStop' },
    );
  return { patience: o.earlyStop, minDelta: o.minDelta };
}

/** A trained head: the model (owned by the caller until `dispose`) and its stage's figures. */
export interface HeadResult {
  readonly head: tf.LayersModel;
  readonly stage: StageResult;
  readonly summary: StageSummary;
  /** The weights the head holds, and the validation figures of those weights. */
  readonly kept: WeightsChoice;
  readonly val: ValFigures | null;
  dispose(): void;
}

/**
 * The head options that must agree for heads to train side by side in `trainHeads`: the
 * shape of the head and of the loop. Seed, learning rate, label smoothing, dropout, class
 * weights and SWA settings may differ.
 */
export function headShapeKey(o: ResolvedTrainOptions): string {
  return JSON.stringify([o.hidden, o.headBn, o.epochs, o.batchSize, o.optimizer]);
}

/** A run whose head trains in `trainHeads`: its view (events, warnings) and its options. */
export interface HeadJob {
  readonly run: PreparedRun;
  readonly options: ResolvedTrainOptions;
}

/**
 * Trains heads on embedded features: the head stage, with SWA over each head's trainable
 * variables. Every job's head trains side by side with the others in one loop (see
 * HeadPopulation): each ends exactly as it would alone, for about the cost of one. The
 * jobs must agree on `headShapeKey`. It reads only `embedded` and the head options, so it
 * can run many times on one embedding (a sweep passes each configuration's options).
 * A head whose loss diverged gets its error in place of a result (the others are unharmed).
 */
export async function trainHeads(
  embedded: EmbeddedSplits,
  jobs: readonly HeadJob[],
  checkpoint?: StageCheckpointing,
): Promise<(HeadResult | FinetuneError)[]> {
  const first = jobs[0];
  if (!first) return [];
  if (checkpoint && jobs.length > 1)
    throw new Error('trainHeads: checkpoints are for one head at a time');
  const o = first.options;
  for (const job of jobs) {
    if (headShapeKey(job.options) !== headShapeKey(o))
      throw new Error(
        'trainHeads: heads trained together must agree on hidden, headBn, epochs, batchSize and optimizer',
      );
  }
  const numClasses = first.run.splits.classes.length;
  const dim = embedded.featureSize;
  const heads = new HeadPopulation(
    dim,
    numClasses,
    o.hidden,
    jobs.map(({ run, options: m }) => ({
      seed: m.seed,
      dropout: m.dropout,
      // --init: each job's own hidden size is checked (a sweep's jobs share one prepared run).
      ...(run.init
        ? { init: headInit(run.init.location, run.init.run, m.hidden, run.splits.classes) }
        : {}),
    })),
    { bn: o.headBn },
  );
  const models: tf.LayersModel[] = [];
  try {
    const stages = await runMembers(
      featureBatches(embedded.train, dim),
      embedded.val.files.length ? featureBatches(embedded.val, dim) : null,
      {
        name: 'head',
        forward: (x, training) => heads.forward(x, training),
        variables: heads.variables,
        reseed: (seeds) => heads.reseed(seeds),
        epochs: o.epochs,
        batchSize: o.batchSize,
        optimizer: o.optimizer,
        numClasses,
        stacked: true,
        ...(checkpoint ? { checkpoint } : {}),
        batchNorm: heads.batchNormState(),
      },
      jobs.map(({ run, options: m }) => ({
        seed: m.seed,
        lr: m.lr,
        labelSmoothing: m.labelSmoothing,
        classWeights: classWeights(m, embedded.train.labels, numClasses),
        swa: averaging(m, 'head'),
        lrSchedule: m.lrSchedule,
        warmupSteps: warmupSteps(m.warmupEpochs, embedded.train.labels.length, m.batchSize),
        earlyStop: earlyStopping(m, embedded),
        keep: m.keep,
        callbacks: [epochLogger(run, m.epochs, averageName(m))],
      })),
    );
    return jobs.map(({ run }, i) => {
      const stage = stages[i]!;
      if (stage instanceof Error) return stage;
      const head = heads.toModel(i);
      models.push(head);
      run.emit({
        type: 'stage-end',
        stage: 'head',
        raw: stage.raw?.acc ?? null,
        swa: stage.swa?.acc ?? null,
        average: stage.average,
      });
      return {
        head,
        stage,
        summary: {
          ...stageSummary(stage),
          ...(run.init ? { init: run.init.record } : {}),
        },
        kept: { stage: 'head', weights: stage.kept },
        val: figures(stage.kept === 'raw' ? stage.raw : stage.swa),
        dispose: () => head.dispose(),
      };
    });
  } catch (err) {
    for (const m of models) m.dispose();
    throw err;
  } finally {
    heads.dispose();
  }
}

/**
 * Trains one head on embedded features (`trainHeads` with one job).
 *
 * @example
 *   const run = await prepareRun({ data: 'photos' });
 *   const embedded = await embedSplits(run);
 *   const a = await trainHead(run, embedded);
 *   const b = await trainHead(run, embedded, resolveTrainOptions({ data: 'photos', hidden: 256 }));
 */
export async function trainHead(
  run: PreparedRun,
  embedded: EmbeddedSplits,
  options: ResolvedTrainOptions = run.options,
  checkpoint?: StageCheckpointing,
): Promise<HeadResult> {
  const [head] = await trainHeads(embedded, [{ run, options }], checkpoint);
  if (head instanceof Error) throw head;
  return head!;
}

/** The fine-tune stage's result, with what the export holds after it. */
export interface FinetuneStageResult {
  readonly result: FineTuneResult;
  readonly summary: StageSummary;
  readonly kept: WeightsChoice;
  readonly val: ValFigures | null;
}

/**
 * Stage two on top of a trained head (whose variables train on): the plan's cut of the
 * backbone unfrozen, its own optimizer and averager. The caller disposes `result`.
 */
export async function trainFinetune(
  run: PreparedRun,
  embedded: EmbeddedSplits,
  head: HeadResult,
  options: ResolvedTrainOptions = run.options,
  checkpoints?: RunCheckpoints | null,
): Promise<FinetuneStageResult> {
  const o = options;
  const plan = run.finetune;
  if (!plan) throw new Error('trainFinetune needs a run prepared with finetuneEpochs > 0');
  const numClasses = run.splits.classes.length;
  const paths = (e: Embedded) => e.files.map((f) => f.path);
  const result = await runFineTune(
    {
      backbone: run.backbone,
      head: head.head,
      train: { files: paths(embedded.train), labels: embedded.train.labels },
      val: { files: paths(embedded.val), labels: embedded.val.labels },
      numClasses,
      headLoss: head.val?.loss ?? null,
      headAcc: head.val?.acc ?? null,
      engine: run.engine,
      callbacks: [epochLogger(run, o.finetuneEpochs, averageName(o))],
      cache: run.cache,
      warn: (message) => run.warn(message),
      ...(checkpoints
        ? {
            checkpoint: (extra: readonly tf.Variable[]) =>
              checkpoints.stage('finetune', head.stage.history, extra),
          }
        : {}),
    },
    {
      epochs: o.finetuneEpochs,
      unfreeze: plan.unfreeze,
      lr: o.finetuneLr,
      lrMult: o.lrMult,
      warmupEpochs: o.finetuneWarmupEpochs,
      dropout: o.finetuneDropout,
      ...(o.finetuneThreads !== undefined ? { threads: o.finetuneThreads } : {}),
      batchSize: o.batchSize,
      optimizer: o.optimizer,
      freezeBn: o.freezeBn,
      bn: o.bn,
      swa: averaging(o, 'finetune'),
      earlyStop: earlyStopping(o, embedded),
      augment: o.augment,
      crop: { scale: o.cropScale, ratio: o.cropRatio },
      augmentViews: o.augmentViews,
      keep: o.keep,
      labelSmoothing: o.labelSmoothing,
      classWeights: classWeights(o, embedded.train.labels, numClasses),
      seed: o.seed,
      decodeConcurrency: o.decodeConcurrency,
      embedBatchSize: o.embedBatchSize,
    },
  );
  const st = result.stage;
  run.emit({
    type: 'stage-end',
    stage: 'finetune',
    raw: st.raw?.acc ?? null,
    swa: st.swa?.acc ?? null,
    average: st.average,
  });
  const kept: WeightsChoice =
    result.kept === 'head'
      ? head.kept
      : { stage: 'finetune', weights: result.kept.slice('finetune-'.length) as WeightsKind };
  const val = kept.stage === 'head' ? head.val : figures(kept.weights === 'raw' ? st.raw : st.swa);
  return {
    result,
    summary: {
      ...stageSummary(st),
      kept: result.kept,
      unfreezeFrom: result.firstUnfrozen,
      batchSize: result.batchSize,
      threads: result.threads,
      steps: result.steps,
      trainableVariables: result.trainableVariables,
      ...(o.lrMult !== 1 ? { lrGroups: result.lrGroups } : {}),
      ...(result.candidates ? { candidates: result.candidates } : {}),
      ...(result.chosen ? { chosen: result.chosen } : {}),
    },
    kept,
    val,
  };
}

/** Test-split figures of what the run ended with (through the fine-tuned body when there is one). */
export async function evaluateTest(
  run: PreparedRun,
  embedded: EmbeddedSplits,
  head: HeadResult,
  finetune: FinetuneStageResult | null,
): Promise<(ValFigures & { macroF1: number }) | null> {
  const test = embedded.test;
  if (!test.files.length) return null;
  const numClasses = run.splits.classes.length;
  const ev = finetune
    ? await finetune.result.evaluate(
        test.files.map((f) => f.path),
        test.labels,
      )
    : await evaluateBatches(
        (x) => head.head.apply(x) as tf.Tensor,
        featureBatches(test, embedded.featureSize),
        256,
        numClasses,
      );
  const predicted = Array.from({ length: test.labels.length }, (_, i) =>
    argmax(ev.probs, i * numClasses, numClasses),
  );
  const report = classificationReport(test.labels, predicted, run.splits.classes);
  return { loss: ev.loss, acc: report.accuracy, macroF1: report.macro.f1 };
}

/** The record of per-image validation predictions, beside summary.json. */
export const VAL_PREDICTIONS = 'val-predictions.json';

/** One validation image as the exported weights see it (a row of val-predictions.json). */
export interface ValPrediction {
  /** Absolute path, so a report written from another folder still finds the image. */
  readonly file: string;
  readonly label: string;
  readonly predicted: string;
  /** Probability of the predicted class. */
  readonly confidence: number;
}

/**
 * Per-image validation predictions of the weights the export holds, read from the
 * evaluation the stage already ran on them (no extra pass). null without a validation
 * split, or when the fine-tune stage could not use every validation image (its rows
 * would no longer line up with the files).
 */
export function valPredictions(
  run: PreparedRun,
  embedded: EmbeddedSplits,
  head: HeadResult,
  finetune: FinetuneStageResult | null,
): ValPrediction[] | null {
  const kept = finetune?.kept ?? head.kept;
  const stage = kept.stage === 'head' || !finetune ? head.stage : finetune.result.stage;
  const ev = kept.weights === 'raw' ? stage.raw : stage.swa;
  const { classes } = run.splits;
  const k = classes.length;
  const files = embedded.val.files;
  if (!ev || !files.length || ev.probs.length !== files.length * k) return null;
  return files.map((f, i) => {
    const p = argmax(ev.probs, i * k, k);
    return {
      file: path.resolve(f.path),
      label: classes[f.label]!,
      predicted: classes[p]!,
      confidence: ev.probs[i * k + p]!,
    };
  });
}

/** What the stages of one run leave: the head (the caller disposes it) and their records. */
export interface StagesResult {
  readonly head: HeadResult;
  /** Every epoch of every stage, in order: metrics.jsonl. */
  readonly history: EpochLogs[];
  readonly stages: TrainSummary['stages'];
  /** The weights the model holds at the end, and their validation figures. */
  readonly kept: WeightsChoice;
  readonly val: ValFigures | null;
  readonly test: (ValFigures & { macroF1: number }) | null;
  /** With `predictions`: each validation image's prediction by the kept weights. */
  readonly predictions: ValPrediction[] | null;
  /** With `swag`: the SWAG state the export carries, named by the exported model's weights (see `exportedSwag`). */
  readonly swag: SwagState | null;
}

/** HeadPopulation's variables (`heads_<id>/logits_kernel`, …) as the exported model names them. */
function headWeightName(name: string): string {
  const m = /\/(hidden|logits|bn_\d+)_(kernel|bias|gamma|beta)$/.exec(name);
  if (!m) throw new Error(`exportedSwag: unexpected head variable ${name}`);
  return `head_${m[1]}/${m[2]}`;
}

/**
 * The SWAG state the export carries: the last stage's, renamed to the exported model's
 * weight names (the layer's name and the weight's, as model.json's manifest has them).
 * Only when the export holds that stage's final SWA average, the mean the samples centre
 * on; otherwise a warning says why there is none.
 */
export function exportedSwag(
  run: PreparedRun,
  options: ResolvedTrainOptions,
  head: HeadResult,
  finetune: FinetuneStageResult | null,
): SwagState | null {
  if (!(options.average === 'swa' && options.swag > 0)) return null;
  const name = finetune ? 'finetune' : 'head';
  const stage = finetune ? finetune.result.stage : head.stage;
  const kept = finetune?.kept ?? head.kept;
  const none = (why: string) => {
    run.warn(`swag: the export carries no SWAG state: ${why}`);
    return null;
  };
  if (!stage.swag) return none(`the ${name} stage took no SWA snapshot`);
  if (kept.stage !== name || kept.weights !== 'swa')
    return none(
      `the exported weights are ${weightsName(kept)}, not the ${name} stage's SWA average the samples centre on`,
    );
  if (stage.stoppedAfter !== null)
    return none(
      `early stopping ended the ${name} stage and kept an earlier average than the SWAG moments describe`,
    );
  let rename: (n: string) => string = headWeightName;
  if (finetune) {
    // The stage trains the layers' own variables: a layer weight's variable name → its
    // name in the saved manifest (originalName: the layer's name, then the weight's).
    const names = new Map<string, string>();
    for (const model of [run.backbone.model, head.head]) {
      for (const w of model?.weights ?? []) names.set(w.name, w.originalName);
    }
    rename = (n) => {
      const to = names.get(n);
      if (!to) throw new Error(`exportedSwag: no layer weight for variable ${n}`);
      return to;
    };
  }
  return { ...stage.swag, names: stage.swag.names.map(rename) };
}

/**
 * The stages of one run on an embedding: the head, the fine-tune stage when `finetune`
 * (the run must be prepared with its cut), then the test figures. The fine-tune stage's
 * resources are freed before this returns; the head is the caller's. `lap` is called
 * after each stage with its name, for the run's seconds.
 */
export async function trainStages(
  run: PreparedRun,
  embedded: EmbeddedSplits,
  options: ResolvedTrainOptions,
  settings: {
    finetune: boolean;
    predictions: boolean;
    lap?: (name: string) => void;
    /** A head already trained with these options (by `trainHeads` beside others); it becomes the result's. */
    head?: HeadResult;
    /** Checkpoints of both stages, and the one the run continues from. */
    checkpoints?: RunCheckpoints | null;
  },
): Promise<StagesResult> {
  const lap = settings.lap ?? (() => undefined);
  const checkpoints = settings.checkpoints ?? null;
  const carried = checkpoints?.resumed?.stage === 'finetune' ? checkpoints.resumed.head : null;
  const head =
    settings.head ??
    (carried
      ? restoreHead(run, embedded, options, carried)
      : await trainHead(run, embedded, options, checkpoints?.stage('head', [])));
  let finetune: FinetuneStageResult | null = null;
  try {
    lap('head');
    const history: EpochLogs[] = [...head.stage.history];
    const stages: TrainSummary['stages'] = { head: head.summary };
    let kept = head.kept;
    let val = head.val;
    if (settings.finetune) {
      checkpoints?.setHead(headCarry(head));
      finetune = await trainFinetune(run, embedded, head, options, checkpoints);
      history.push(...finetune.result.stage.history);
      stages.finetune = finetune.summary;
      kept = finetune.kept;
      val = finetune.val;
      lap('finetune');
    }
    const test = await evaluateTest(run, embedded, head, finetune);
    const predictions = settings.predictions ? valPredictions(run, embedded, head, finetune) : null;
    const swag = exportedSwag(run, options, head, finetune);
    return { head, history, stages, kept, val, test, predictions, swag };
  } catch (err) {
    head.dispose();
    throw err;
  } finally {
    await finetune?.result.dispose();
  }
}

/** What the fine-tune stage's checkpoints keep of a finished head stage (see HeadCarry). */
function headCarry(head: HeadResult): HeadCarry {
  const st = head.stage;
  return {
    summary: head.summary,
    kept: head.kept,
    val: head.val,
    history: st.history,
    raw: st.raw,
    swa: st.swa,
    stage: {
      average: st.average,
      snapshots: st.snapshots,
      kept: st.kept,
      stoppedAfter: st.stoppedAfter,
      averagingFrom: st.averagingFrom,
      bnRefreshed: st.bnRefreshed,
      candidates: st.candidates,
      chosen: st.chosen,
    },
    weights: head.head.weights.map((w) => (w.read().dataSync() as Float32Array).slice()),
  };
}

/**
 * The head stage's result as a fine-tune checkpoint carried it: the head model with the
 * weights the head stage left, and its records (its SWAG state is not carried: only the
 * last stage's is exported).
 */
function restoreHead(
  run: PreparedRun,
  embedded: EmbeddedSplits,
  o: ResolvedTrainOptions,
  carry: HeadCarry,
): HeadResult {
  const head = buildHead(embedded.featureSize, run.splits.classes.length, headOptions(o));
  if (carry.weights.length !== head.weights.length)
    throw new Error('restoreHead: the checkpoint holds another head');
  tf.tidy(() => {
    head.setWeights(head.weights.map((w, i) => tf.tensor(carry.weights[i]!, w.shape as number[])));
  });
  const stage: StageResult = {
    history: [...carry.history],
    raw: carry.raw,
    swa: carry.swa,
    average: carry.stage.average,
    snapshots: carry.stage.snapshots,
    kept: carry.stage.kept,
    rawWeights: null,
    stoppedAfter: carry.stage.stoppedAfter,
    averagingFrom: carry.stage.averagingFrom,
    swag: null,
    bnRefreshed: carry.stage.bnRefreshed,
    candidates: carry.stage.candidates,
    chosen: carry.stage.chosen,
  };
  run.emit({
    type: 'stage-end',
    stage: 'head',
    raw: carry.raw?.acc ?? null,
    swa: carry.swa?.acc ?? null,
    average: carry.stage.average,
  });
  return {
    head,
    stage,
    summary: carry.summary,
    kept: carry.kept,
    val: carry.val,
    dispose: () => head.dispose(),
  };
}
