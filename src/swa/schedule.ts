import { invalidOption } from '../errors.js';

/** How averaged weights are weighted: SWA's equal-weight mean, or an exponential moving average. */
export type AverageKind = 'swa' | 'ema';
/** `--average`: a weighting, or none. */
export type AverageOption = AverageKind | 'none';
export const AVERAGE_OPTIONS: readonly AverageOption[] = ['swa', 'ema', 'none'];

/** The learning rate once averaging has started. */
export type SwaScheduleKind = 'constant' | 'cos' | 'linear' | 'cyclic';
export const SWA_SCHEDULES: readonly SwaScheduleKind[] = ['constant', 'cos', 'linear', 'cyclic'];

/** The learning rate before averaging starts (or throughout, without averaging). */
export type LrScheduleKind = 'constant' | 'cos' | 'step';
export const LR_SCHEDULES: readonly LrScheduleKind[] = ['constant', 'cos', 'step'];

/** Snapshots every `every` epochs, or every `every` optimizer steps. */
export interface Frequency {
  readonly every: number;
  readonly unit: 'epoch' | 'step';
}

/**
 * Reads a snapshot frequency: a whole number of epochs (`1`, `'2'`), or of optimizer
 * steps with an `s` (`'50s'`).
 *
 * @example parseFrequency('swaFreq', '50s') // → { every: 50, unit: 'step' }
 */
export function parseFrequency(name: string, value: unknown): Frequency {
  const m = typeof value === 'string' ? /^\s*(\d+)\s*(s?)\s*$/.exec(value) : null;
  const every = typeof value === 'number' ? value : m ? Number(m[1]) : Number.NaN;
  if (!Number.isInteger(every) || every < 1 || every > 1e9) {
    throw invalidOption(
      name,
      'a whole number of epochs (2) or of optimizer steps with an s (50s), at least 1',
      value,
    );
  }
  return { every, unit: m?.[2] ? 'step' : 'epoch' };
}

/** The frequency as options and records write it: a number of epochs, or `'<n>s'`. */
export function formatFrequency(f: Frequency): number | string {
  return f.unit === 'epoch' ? f.every : `${f.every}s`;
}

/** When averaging starts, how its snapshots are taken and what learning rate runs meanwhile. */
export interface AveragingPlan {
  readonly kind: AverageKind;
  /** First epoch (0-based) of averaging. */
  readonly startEpoch: number;
  /** SWA snapshots (EMA updates after every step). */
  readonly frequency: Frequency;
  readonly swaLr: number;
  readonly schedule: SwaScheduleKind;
  /** cos and linear: epochs to move from the learning rate to swaLr (0: at once). */
  readonly annealEpochs: number;
  /** cyclic: epochs per cycle; a snapshot at the end of each. */
  readonly cycle: number;
  /** EMA: the decay (weight kept by the old average), before its warm-up. */
  readonly emaDecay: number;
}

/** A stage's learning rate over its steps. */
export interface LrPlan {
  readonly lr: number;
  readonly epochs: number;
  readonly schedule: LrScheduleKind;
  /** Steps of linear warm-up at the start (0: none). */
  readonly warmupSteps: number;
  readonly averaging: AveragingPlan | null;
}

/**
 * Checks a SWA start: an epoch (an integer from 1 to epochs − 1, "from that epoch count
 * on") or a fraction of the epochs (0 ≤ x < 1). The one rule and wording for every stage.
 */
export function checkSwaStart(name: string, value: unknown, epochs: number): number {
  const ok =
    typeof value === 'number' &&
    Number.isFinite(value) &&
    value >= 0 &&
    (value < 1 || (Number.isInteger(value) && value < epochs));
  if (!ok) {
    throw invalidOption(
      name,
      epochs > 1
        ? `an epoch from 1 to ${epochs - 1} or a fraction of the epochs below 1`
        : 'a fraction of the epochs below 1',
      value,
    );
  }
  return value as number;
}

/**
 * `--swa-start` resolved to the 0-based epoch of the first snapshot (see `checkSwaStart`).
 *
 * @example resolveSwaStart(0.75, 40) // → 30: snapshots after epochs 31…40
 */
export function resolveSwaStart(swaStart: number, epochs: number, name = 'swaStart'): number {
  checkSwaStart(name, swaStart, epochs);
  return swaStart < 1 ? Math.floor(swaStart * epochs) : swaStart;
}

/** The learning rate of `epoch` before averaging: constant, cosine to its end value, or ÷10 at 50% and 75%. */
function preAveragingLr(plan: LrPlan, epoch: number): number {
  const a = plan.averaging;
  const span = a ? a.startEpoch : plan.epochs;
  if (plan.schedule === 'constant' || span <= 0) return plan.lr;
  if (plan.schedule === 'step') {
    const drops =
      (epoch >= Math.floor(span / 2) ? 1 : 0) + (epoch >= Math.floor((3 * span) / 4) ? 1 : 0);
    return plan.lr * 0.1 ** drops;
  }
  // cos: from lr at the first epoch towards swaLr (or 0) at the start of averaging (or the end).
  const end = a ? a.swaLr : 0;
  return end + ((plan.lr - end) * (1 + Math.cos((Math.PI * epoch) / span))) / 2;
}

/**
 * The learning rate of step `step` (0-based, within the epoch) of `epoch` (0-based):
 * - before averaging, `schedule` (constant, cos, step);
 * - once averaging has started: `constant` switches to swaLr; `cos` and `linear` move
 *   there over annealEpochs as PyTorch's SWALR does, from the rate the first phase ended
 *   at; `cyclic` falls linearly from lr to swaLr within each cycle of `cycle` epochs, step
 *   by step (Izmailov et al. 2018: α(i) = (1 − t(i))·α1 + t(i)·α2, t(i) = (mod(i − 1, c) + 1)/c);
 * - over the first warmupSteps steps, that rate times (step + 1)/warmupSteps.
 */
export function learningRateAt(
  plan: LrPlan,
  epoch: number,
  step: number,
  stepsPerEpoch: number,
): number {
  const a = plan.averaging;
  let lr: number;
  if (!a || epoch < a.startEpoch) lr = preAveragingLr(plan, epoch);
  else if (a.schedule === 'constant') lr = a.swaLr;
  else if (a.schedule === 'cyclic') {
    const c = a.cycle * stepsPerEpoch;
    const i = (epoch - a.startEpoch) * stepsPerEpoch + step;
    const t = ((i % c) + 1) / c;
    lr = (1 - t) * plan.lr + t * a.swaLr;
  } else if (a.annealEpochs <= 0) lr = a.swaLr;
  else {
    const from = a.startEpoch > 0 ? preAveragingLr(plan, a.startEpoch - 1) : plan.lr;
    const t = Math.min(1, (epoch - a.startEpoch + 1) / a.annealEpochs);
    const alpha = a.schedule === 'cos' ? (1 - Math.cos(Math.PI * t)) / 2 : t;
    lr = from * (1 - alpha) + a.swaLr * alpha;
  }
  const global = epoch * stepsPerEpoch + step;
  return global < plan.warmupSteps ? (lr * (global + 1)) / plan.warmupSteps : lr;
}

/** True when the end of this step updates the average (EMA: every step once started; SWA: a step frequency). */
export function averagesAfterStep(
  a: AveragingPlan,
  epoch: number,
  step: number,
  stepsPerEpoch: number,
): boolean {
  if (epoch < a.startEpoch) return false;
  if (a.kind === 'ema') return true;
  if (a.schedule === 'cyclic' || a.frequency.unit !== 'step') return false;
  return ((epoch - a.startEpoch) * stepsPerEpoch + step + 1) % a.frequency.every === 0;
}

/** True when the end of `epoch` (0-based) takes a SWA snapshot (an epoch frequency, or a cycle's end). */
export function averagesAfterEpoch(a: AveragingPlan, epoch: number): boolean {
  if (a.kind !== 'swa' || epoch < a.startEpoch) return false;
  if (a.schedule === 'cyclic') return (epoch - a.startEpoch + 1) % a.cycle === 0;
  if (a.frequency.unit !== 'epoch') return false;
  return (epoch - a.startEpoch) % a.frequency.every === 0;
}

/**
 * EMA's decay for its update number `t` (0 for the first): the configured decay, warmed
 * up so that the first updates do not weigh the early weights for long.
 *
 * @example emaDecay(0.999, 0) // → 0.1; emaDecay(0.999, 10000) // → 0.999
 */
export function emaDecay(decay: number, t: number): number {
  return Math.min(decay, (1 + t) / (10 + t));
}
