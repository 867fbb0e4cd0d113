import { invalidOption } from '../errors.js';

/** When SWA snapshots are taken and what learning rate runs meanwhile. */
export interface SwaSchedule {
  /** First epoch (0-based) whose end takes a snapshot. */
  readonly startEpoch: number;
  /** Epochs between snapshots. */
  readonly freq: number;
  /** Learning rate once SWA has started (after annealing). */
  readonly swaLr: number;
  /** Epochs over which the LR moves from the base LR to swaLr (0: at once, PyTorch SWALR's anneal_epochs). */
  readonly annealEpochs: number;
  readonly annealStrategy: 'cos' | 'linear';
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

/** True when the end of `epoch` (0-based) takes a snapshot. */
export function isSnapshotEpoch(s: SwaSchedule, epoch: number): boolean {
  return epoch >= s.startEpoch && (epoch - s.startEpoch) % s.freq === 0;
}

/**
 * Learning rate for `epoch` (0-based): `baseLr` before SWA starts, then annealed to
 * `swaLr` over `annealEpochs` (cosine or linear), then constant.
 */
export function swaLearningRate(s: SwaSchedule, baseLr: number, epoch: number): number {
  if (epoch < s.startEpoch) return baseLr;
  if (s.annealEpochs <= 0) return s.swaLr;
  const t = Math.min(1, (epoch - s.startEpoch + 1) / s.annealEpochs);
  const alpha = s.annealStrategy === 'cos' ? (1 - Math.cos(Math.PI * t)) / 2 : t;
  return baseLr * (1 - alpha) + s.swaLr * alpha;
}
