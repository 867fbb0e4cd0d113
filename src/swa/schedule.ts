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
 * `--swa-start` as an epoch (an integer ≥ 1 means "from that epoch count on") or a
 * fraction of the epochs (0 < x < 1). Returns the 0-based epoch of the first snapshot.
 *
 * @example resolveSwaStart(0.75, 40) // → 30: snapshots after epochs 31…40
 */
export function resolveSwaStart(swaStart: number, epochs: number, name = 'swaStart'): number {
  if (!Number.isFinite(swaStart) || swaStart < 0)
    throw invalidOption(name, 'an epoch or a fraction of the epochs', swaStart);
  const start = swaStart < 1 ? Math.floor(swaStart * epochs) : Math.floor(swaStart);
  if (start >= epochs) {
    throw invalidOption(name, `an epoch before the last (epochs is ${epochs})`, swaStart);
  }
  return start;
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
