import type * as tf from '@tensorflow/tfjs';
import { WeightAverager } from '../swa/averager.js';
import { resolveSwaStart, type SwaSchedule, swaLearningRate } from '../swa/schedule.js';
import { type EpochLogs, learningRateSchedule, type TrainingCallback } from './callbacks.js';
import { type Batches, type Evaluation, evaluateBatches, type Forward, fit } from './fit.js';
import { createOptimizer, type OptimizerName, setLearningRate } from './optimizers.js';
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

export interface StageOptions {
  readonly name: string;
  readonly forward: Forward;
  readonly variables: readonly tf.Variable[];
  readonly reseed?: (seed: number) => void;
  readonly epochs: number;
  readonly batchSize: number;
  readonly optimizer: OptimizerName;
  readonly lr: number;
  readonly labelSmoothing: number;
  readonly classWeights: readonly number[] | null;
  readonly numClasses: number;
  readonly seed: number;
  /** null: no averaging. */
  readonly swa: SwaSettings | null;
  readonly callbacks?: readonly TrainingCallback[];
  /** Steps of linear LR warm-up at the start (0: none). */
  readonly warmupSteps?: number;
  /** Also return copies of the final raw weights (before SWA is applied); the caller disposes them. */
  readonly keepRaw?: boolean;
}

export interface StageResult {
  readonly history: EpochLogs[];
  /** Validation figures of the final raw weights. */
  readonly raw: Evaluation | null;
  /** Validation figures of the averaged weights (null without SWA). */
  readonly swa: Evaluation | null;
  readonly snapshots: number;
  /** Which weights the variables hold after the stage. */
  readonly kept: 'swa' | 'raw';
  /** With `keepRaw`: the raw final values of the variables, in order. */
  readonly rawWeights: tf.Tensor[] | null;
}

/**
 * One training stage: a fresh optimizer for this stage's trainable set (tfjs keys
 * optimizer slots by position), an LR schedule, an averager over exactly these
 * variables, then validation of raw and averaged weights. The variables end up
 * holding the averaged weights when averaging is on.
 */
export async function runStage(
  train: Batches,
  val: Batches | null,
  o: StageOptions,
): Promise<StageResult> {
  const optimizer = createOptimizer(o.optimizer, o.lr);
  let schedule: SwaSchedule | null = null;
  let averager: WeightAverager | null = null;
  const callbacks: TrainingCallback[] = [];
  let lrCallback: ReturnType<typeof learningRateSchedule>;
  if (o.swa) {
    schedule = {
      startEpoch: resolveSwaStart(o.swa.start, o.epochs, `${o.name} swaStart`),
      freq: o.swa.freq,
      swaLr: o.swa.lr,
      annealEpochs: o.swa.annealEpochs,
      annealStrategy: 'cos',
    };
    const s = schedule;
    averager = new WeightAverager(o.variables);
    lrCallback = learningRateSchedule(
      (lr) => setLearningRate(optimizer, lr),
      (epoch) => swaLearningRate(s, o.lr, epoch),
      o.warmupSteps ?? 0,
    );
    callbacks.push(lrCallback, swaCallback(averager, schedule));
  } else {
    lrCallback = learningRateSchedule(
      (lr) => setLearningRate(optimizer, lr),
      () => o.lr,
      o.warmupSteps ?? 0,
    );
    callbacks.push(lrCallback);
  }
  callbacks.push(...(o.callbacks ?? []));
  try {
    const history = await fit(train, val, {
      stage: o.name,
      epochs: o.epochs,
      batchSize: o.batchSize,
      optimizer,
      variables: o.variables,
      forward: o.forward,
      numClasses: o.numClasses,
      labelSmoothing: o.labelSmoothing,
      classWeights: o.classWeights,
      seed: o.seed,
      ...(o.reseed ? { reseed: o.reseed } : {}),
      lr: () => lrCallback.current,
      callbacks,
    });
    const evalBatch = Math.max(o.batchSize, 64);
    const raw = val?.size ? await evaluateBatches(o.forward, val, evalBatch, o.numClasses) : null;
    let swa: Evaluation | null = null;
    const snapshots = averager?.count ?? 0;
    const rawWeights = o.keepRaw ? o.variables.map((v) => v.clone()) : null;
    if (averager && snapshots > 0) {
      averager.apply();
      if (val?.size) swa = await evaluateBatches(o.forward, val, evalBatch, o.numClasses);
    }
    return {
      history,
      raw,
      swa,
      snapshots,
      kept: averager && snapshots > 0 ? 'swa' : 'raw',
      rawWeights,
    };
  } finally {
    averager?.dispose();
    optimizer.dispose();
  }
}
