import type * as tf from '@tensorflow/tfjs';
import type { FinetuneError } from '../errors.js';
import { WeightAverager } from '../swa/averager.js';
import { resolveSwaStart, type SwaSchedule, swaLearningRate } from '../swa/schedule.js';
import { type EpochLogs, learningRateSchedule, type TrainingCallback } from './callbacks.js';
import {
  type Batches,
  type Evaluation,
  evaluateMembers,
  type FitMember,
  type Forward,
  fit,
} from './fit.js';
import { type OptimizerName, StageOptimizer } from './optimizers.js';
import { swaCallback } from './swa-callback.js';

/** SWA settings of one stage. */
export interface SwaSettings {
  /** Epoch (≥ 1) or fraction of the epochs (< 1) where averaging starts. */
  readonly start: number;
  /** Epochs between snapshots. */
  readonly freq: number;
  /** Learning rate once SWA has started. */
  readonly lr: number;
  /** Epochs to anneal from the base LR to `lr` (0: switch at once). */
  readonly annealEpochs: number;
}

/** What may differ between members of a stage trained side by side. */
export interface StageMember {
  readonly seed: number;
  readonly lr: number;
  readonly labelSmoothing: number;
  readonly classWeights: readonly number[] | null;
  /** null: no averaging. */
  readonly swa: SwaSettings | null;
  readonly callbacks?: readonly TrainingCallback[];
}

/** What the members of a stage share. */
export interface StageShared {
  readonly name: string;
  readonly forward: Forward;
  readonly variables: readonly tf.Variable[];
  readonly reseed?: (seeds: readonly number[]) => void;
  readonly epochs: number;
  readonly batchSize: number;
  readonly optimizer: OptimizerName;
  readonly numClasses: number;
  /** Variables, inputs and logits carry a member axis (required with more than one member). */
  readonly stacked?: boolean;
  /** Steps of linear LR warm-up at the start (0: none). */
  readonly warmupSteps?: number;
  /** Also return copies of the final raw weights (before SWA is applied); the caller disposes them. */
  readonly keepRaw?: boolean;
  /** One LR factor per variable (discriminative LRs; default 1), see StageOptimizer. */
  readonly lrScales?: readonly number[];
}

/** One model's stage: the shared settings and its own. */
export type StageOptions = StageShared & StageMember;

export interface StageResult {
  readonly history: EpochLogs[];
  /** Validation figures of the final raw weights. */
  readonly raw: Evaluation | null;
  /** Validation figures of the averaged weights (null without SWA). */
  readonly swa: Evaluation | null;
  readonly snapshots: number;
  /** Which weights the variables hold after the stage. */
  readonly kept: 'swa' | 'raw';
  /** With `keepRaw`: the raw final values of the variables, in order (stacked: every member's). */
  readonly rawWeights: tf.Tensor[] | null;
}

/** One model's training stage (see `runMembers`). */
export async function runStage(
  train: Batches,
  val: Batches | null,
  o: StageOptions,
): Promise<StageResult> {
  const { seed, lr, labelSmoothing, classWeights, swa, callbacks, ...shared } = o;
  const member: StageMember = {
    seed,
    lr,
    labelSmoothing,
    classWeights,
    swa,
    ...(callbacks ? { callbacks } : {}),
  };
  const [result] = await runMembers(train, val, shared, [member]);
  if (result instanceof Error) throw result;
  return result!;
}

/**
 * One training stage: a fresh optimizer for this stage's trainable set, an LR schedule,
 * an averager over exactly these variables, then validation of raw and averaged weights.
 * The variables end up holding the averaged weights when averaging is on. With several
 * members (stacked variables) every member has its own LR schedule, snapshots and
 * figures, and one step trains them all. A member whose loss diverged (stacked members
 * only; one member throws) gets its error in place of a result.
 */
export async function runMembers(
  train: Batches,
  val: Batches | null,
  shared: StageShared,
  members: readonly StageMember[],
): Promise<(StageResult | FinetuneError)[]> {
  const k = members.length;
  const stacked = shared.stacked ?? false;
  const optimizer = new StageOptimizer(
    shared.optimizer,
    shared.variables,
    members.map((m) => m.lr),
    { scales: shared.lrScales },
  );
  const averager = members.some((m) => m.swa)
    ? new WeightAverager(shared.variables, { members: stacked ? k : 1 })
    : null;
  const fitMembers: FitMember[] = members.map((m, i) => {
    const setLr = (lr: number) => optimizer.setLearningRate(lr, i);
    let lrCallback: ReturnType<typeof learningRateSchedule>;
    const callbacks: TrainingCallback[] = [];
    if (m.swa) {
      const schedule: SwaSchedule = {
        startEpoch: resolveSwaStart(m.swa.start, shared.epochs, `${shared.name} swaStart`),
        freq: m.swa.freq,
        swaLr: m.swa.lr,
        annealEpochs: m.swa.annealEpochs,
        annealStrategy: 'cos',
      };
      lrCallback = learningRateSchedule(
        setLr,
        (epoch) => swaLearningRate(schedule, m.lr, epoch),
        shared.warmupSteps ?? 0,
      );
      callbacks.push(lrCallback, swaCallback(averager!, schedule, i));
    } else {
      lrCallback = learningRateSchedule(setLr, () => m.lr, shared.warmupSteps ?? 0);
      callbacks.push(lrCallback);
    }
    callbacks.push(...(m.callbacks ?? []));
    return {
      seed: m.seed,
      labelSmoothing: m.labelSmoothing,
      classWeights: m.classWeights,
      callbacks,
      lr: () => lrCallback.current,
    };
  });
  try {
    const { histories, diverged } = await fit(train, val, {
      stage: shared.name,
      epochs: shared.epochs,
      batchSize: shared.batchSize,
      optimizer,
      variables: shared.variables,
      forward: shared.forward,
      numClasses: shared.numClasses,
      members: fitMembers,
      stacked,
      ...(shared.reseed ? { reseed: shared.reseed } : {}),
    });
    const evalBatch = Math.max(shared.batchSize, 64);
    const evaluate = () =>
      evaluateMembers(shared.forward, val!, evalBatch, shared.numClasses, k, stacked);
    const raw = val?.size ? await evaluate() : null;
    const snapshots = members.map((_, i) => averager?.count(i) ?? 0);
    const rawWeights = shared.keepRaw ? shared.variables.map((v) => v.clone()) : null;
    let swa: Evaluation[] | null = null;
    if (averager && snapshots.some((n) => n > 0)) {
      averager.apply();
      if (val?.size) swa = await evaluate();
    }
    return members.map(
      (_, i) =>
        diverged[i] ?? {
          history: histories[i]!,
          raw: raw?.[i] ?? null,
          swa: snapshots[i]! > 0 ? (swa?.[i] ?? null) : null,
          snapshots: snapshots[i]!,
          kept: snapshots[i]! > 0 ? 'swa' : 'raw',
          rawWeights,
        },
    );
  } finally {
    averager?.dispose();
    optimizer.dispose();
  }
}
