import { mkdir } from 'node:fs/promises';
import path from 'node:path';
import type * as tf from '@tensorflow/tfjs';
import { FinetuneError, invalidOption } from '../errors.js';
import { writeJson } from '../export/model-dir.js';
import { buildHead, dropoutSeeder, logitsView } from '../head/build.js';
import type { TrainingCallback } from '../train/callbacks.js';
import { ArrayBatches, balancedWeights, fit } from '../train/fit.js';
import { initialHeadModel } from '../train/init.js';
import { StageOptimizer } from '../train/optimizers.js';
import type { ResolvedTrainOptions, TrainOptions } from '../train/options.js';
import { embedSplits, prepareRun } from '../train/run.js';
import { checkCounts } from '../train/train.js';
import * as is from '../util/is.js';

/** The ramp of `lrFind`; defaults are fastai's `lr_find`. */
export interface LrFindSettings {
  /** First learning rate (default 1e-7). */
  startLr?: number;
  /** Last learning rate (default 10). */
  endLr?: number;
  /** Steps of the ramp (default 100). */
  steps?: number;
  /** Weight of the past in the loss's moving average (default 0.98). */
  beta?: number;
  /** The ramp stops once the smoothed loss exceeds this many times its minimum (default 4). */
  divergence?: number;
}

export interface LrFindPoint {
  readonly step: number;
  readonly lr: number;
  readonly loss: number;
  /** Exponential moving average of the loss, bias-corrected. */
  readonly smoothed: number;
}

export interface LrFindResult {
  /** The suggested learning rate: fastai's valley. */
  readonly suggested: number;
  readonly suggestions: {
    /** About two thirds down the longest descending stretch of the smoothed loss (fastai `valley`). */
    readonly valley: number;
    /** Where the smoothed loss falls fastest against log(lr) (fastai `steep`). */
    readonly steep: number;
    /** A tenth of the learning rate at the smoothed loss's minimum (fastai `minimum`). */
    readonly minimum: number;
  };
  readonly points: readonly LrFindPoint[];
  /** Whether the ramp stopped early because the loss diverged. */
  readonly diverged: boolean;
  readonly settings: Required<LrFindSettings>;
  readonly options: ResolvedTrainOptions;
  readonly seconds: Record<string, number>;
  /** Where lr-find.json was written. */
  readonly file: string;
}

export const LR_FIND_FILE = 'lr-find.json';

function checkSettings(s: LrFindSettings): Required<LrFindSettings> {
  const r = {
    startLr: is.positiveNumber('startLr', s.startLr ?? 1e-7),
    endLr: is.positiveNumber('endLr', s.endLr ?? 10),
    steps: is.positiveInteger('steps', s.steps ?? 100),
    beta: is.numberInRange('beta', s.beta ?? 0.98, 0, 1, true),
    divergence: is.positiveNumber('divergence', s.divergence ?? 4),
  };
  if (r.endLr <= r.startLr)
    throw invalidOption('endLr', `a number above startLr (${r.startLr})`, r.endLr);
  if (r.steps < 10) throw invalidOption('steps', 'an integer of at least 10', r.steps);
  return r;
}

/** Thrown from the loop's batch end to stop the ramp; never leaves `lrFind`. */
class RampEnd extends Error {}

/**
 * fastai's valley: the longest run of decreasing smoothed loss (not necessarily
 * contiguous), then the point two thirds of the way down it.
 */
export function valley(points: readonly LrFindPoint[]): number {
  const n = points.length;
  const lds = new Array<number>(n).fill(1);
  let maxStart = 0;
  let maxEnd = 0;
  for (let i = 1; i < n; i++) {
    for (let j = 0; j < i; j++) {
      if (points[i]!.smoothed < points[j]!.smoothed && lds[i]! < lds[j]! + 1) lds[i] = lds[j]! + 1;
      if (lds[maxEnd]! < lds[i]!) {
        maxEnd = i;
        maxStart = maxEnd - lds[maxEnd]!;
      }
    }
  }
  const sections = (maxEnd - maxStart) / 3;
  const idx = Math.max(0, maxStart + Math.floor(sections) + Math.floor(sections / 2));
  return points[Math.min(idx, n - 1)]!.lr;
}

/** Where d(smoothed loss)/d(log lr) is most negative. */
export function steepest(points: readonly LrFindPoint[]): number {
  let best = 0;
  let slope = Number.POSITIVE_INFINITY;
  for (let i = 1; i < points.length; i++) {
    const a = points[i - 1]!;
    const b = points[i]!;
    const s = (b.smoothed - a.smoothed) / (Math.log(b.lr) - Math.log(a.lr));
    if (s < slope) {
      slope = s;
      best = i;
    }
  }
  return points[best]!.lr;
}

/**
 * Finds a head learning rate (fastai's `lr_find`): a fresh head (with `init`, the head
 * the run would start from) trained for one ramp of exponentially growing learning rates
 * over the cached embeddings, the loss smoothed, stopped once it diverges; suggests the
 * valley. Prepares and embeds as `train` does (a warm cache decodes nothing), writes
 * `<out>/lr-find.json`. Seconds on a warm cache.
 *
 * @example
 *   const { suggested } = await lrFind({ data: 'photos', out: 'runs/lr' });
 *   await train({ data: 'photos', lr: suggested });
 */
export async function lrFind(
  options: TrainOptions,
  settings: LrFindSettings = {},
): Promise<LrFindResult> {
  const s = checkSettings(settings);
  const t0 = performance.now();
  const run = await prepareRun(options);
  const o = run.options;
  const head = { model: null as tf.LayersModel | null, optimizer: null as StageOptimizer | null };
  try {
    const embedded = await embedSplits(run);
    // Fails on fewer than two learnable classes, as train does.
    checkCounts(run, embedded);
    const embedSeconds = (performance.now() - t0) / 1000;
    const numClasses = run.splits.classes.length;
    const dim = embedded.featureSize;
    const shape = { hidden: o.hidden, dropout: o.dropout, seed: o.seed, bn: o.headBn };
    const model = run.init
      ? initialHeadModel(run.init, dim, run.splits.classes, shape)
      : buildHead(dim, numClasses, shape);
    head.model = model;
    const logits = logitsView(model);
    const variables = model.trainableWeights.map((w) => w.read() as tf.Variable);
    const optimizer = new StageOptimizer(o.optimizer, variables, s.startLr);
    head.optimizer = optimizer;
    const train = new ArrayBatches(embedded.train.features, [dim], embedded.train.labels);
    const points: LrFindPoint[] = [];
    const ratio = s.endLr / s.startLr;
    const lrAt = (step: number) => s.startLr * ratio ** (step / (s.steps - 1));
    let step = 0;
    let avg = 0;
    let best = Number.POSITIVE_INFINITY;
    let diverged = false;
    const ramp: TrainingCallback = {
      onBatchBegin() {
        optimizer.setLearningRate(lrAt(step));
      },
      onBatchEnd(_batch, logs) {
        avg = s.beta * avg + (1 - s.beta) * logs.loss;
        const smoothed = avg / (1 - s.beta ** (step + 1));
        points.push({ step, lr: lrAt(step), loss: logs.loss, smoothed });
        best = Math.min(best, smoothed);
        step++;
        if (!Number.isFinite(smoothed) || (step > 1 && smoothed > s.divergence * best)) {
          diverged = true;
          throw new RampEnd();
        }
        if (step >= s.steps) throw new RampEnd();
      },
    };
    const perEpoch = Math.ceil(train.size / o.batchSize);
    const t1 = performance.now();
    try {
      await fit(train, null, {
        stage: 'lr-find',
        epochs: Math.ceil(s.steps / perEpoch),
        batchSize: o.batchSize,
        optimizer,
        variables,
        forward: (x, training) => logits.apply(x, { training }) as tf.Tensor,
        numClasses,
        members: [
          {
            labelSmoothing: o.labelSmoothing,
            classWeights:
              o.classWeights === 'balanced'
                ? balancedWeights(embedded.train.labels, numClasses)
                : null,
            seed: o.seed,
            lr: () => lrAt(Math.max(0, step - 1)),
            callbacks: [ramp],
          },
        ],
        reseed: dropoutSeeder(model),
      });
    } catch (err) {
      if (!(err instanceof RampEnd)) throw err;
    }
    // fastai leaves out the first tenth of the ramp: the average is still warming up there.
    const considered = points.slice(Math.floor(s.steps / 10));
    if (considered.length < 2)
      throw new FinetuneError(
        `The loss diverged after ${points.length} of ${s.steps} steps; lower startLr (${s.startLr})`,
      );
    const lowest = considered.reduce((a, b) => (b.smoothed < a.smoothed ? b : a));
    const suggestions = {
      valley: valley(considered),
      steep: steepest(considered),
      minimum: lowest.lr / 10,
    };
    const file = path.join(o.out, LR_FIND_FILE);
    const seconds = {
      embed: embedSeconds,
      ramp: (performance.now() - t1) / 1000,
      total: (performance.now() - t0) / 1000,
    };
    const result: LrFindResult = {
      suggested: suggestions.valley,
      suggestions,
      points,
      diverged,
      settings: s,
      options: o,
      seconds,
      file,
    };
    await mkdir(o.out, { recursive: true });
    await writeJson(file, result);
    return result;
  } finally {
    head.optimizer?.dispose();
    head.model?.dispose();
    run.dispose();
  }
}
