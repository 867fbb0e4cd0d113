import * as tf from '@tensorflow/tfjs';

/** How snapshots are weighted: SWA's equal-weight mean, or an exponential moving average. */
export type AveragerKind = 'swa' | 'ema';

export interface AveragerOptions {
  /** Default 'swa'. */
  kind?: AveragerKind;
  /** EMA decay (weight kept by the old average). Default 0.999. */
  decay?: number;
}

/** A serialisable averager state, for resume. */
export interface AveragerState {
  readonly kind: AveragerKind;
  readonly decay: number;
  readonly count: number;
  readonly names: readonly string[];
  readonly values: readonly { shape: number[]; data: number[] }[];
}

/**
 * Keeps a running average of a fixed set of variables (the trainable ones only).
 *
 * SWA: `avg ← avg + (w − avg)/(n + 1)` with n the number of snapshots so far: every
 * snapshot weighs the same, whatever the period between snapshots.
 * EMA: `avg ← decay·avg + (1 − decay)·w`, starting from the first snapshot.
 *
 * @example
 *   const swa = new WeightAverager(model.trainableWeights.map((w) => w.read() as tf.Variable));
 *   swa.update();                 // at each snapshot
 *   swa.swapIn(); evaluate(); swa.swapOut();
 */
export class WeightAverager {
  readonly kind: AveragerKind;
  readonly decay: number;
  private readonly targets: readonly tf.Variable[];
  private averages: tf.Variable[] | null = null;
  private saved: tf.Tensor[] | null = null;
  private n = 0;

  constructor(targets: readonly tf.Variable[], options: AveragerOptions = {}) {
    this.targets = targets;
    this.kind = options.kind ?? 'swa';
    this.decay = options.decay ?? 0.999;
  }

  /** Snapshots taken so far. */
  get count(): number {
    return this.n;
  }

  /** Folds the targets' current values into the average. */
  update(): void {
    if (this.saved)
      throw new Error('WeightAverager.update() while the averaged weights are swapped in');
    if (!this.averages) {
      this.averages = this.targets.map((v) => ownedVariable(v.clone()));
      this.n = 1;
      return;
    }
    const n = this.n;
    tf.tidy(() => {
      this.averages!.forEach((avg, i) => {
        const w = this.targets[i]!;
        const next =
          this.kind === 'swa'
            ? avg.add(w.sub(avg).div(n + 1))
            : avg.mul(this.decay).add(w.mul(1 - this.decay));
        avg.assign(next);
      });
    });
    this.n = n + 1;
  }

  /** Copies of the averaged values (the caller disposes them); null before the first snapshot. */
  averaged(): tf.Tensor[] | null {
    return this.averages ? this.averages.map((a) => a.clone()) : null;
  }

  /** Puts the averaged values into the targets, keeping the raw ones to swap back. */
  swapIn(): void {
    if (!this.averages) throw new Error('WeightAverager.swapIn() before any snapshot');
    if (this.saved) return;
    this.saved = this.targets.map((v) => v.clone());
    this.targets.forEach((v, i) => {
      v.assign(this.averages![i]!);
    });
  }

  /** Restores the raw values after `swapIn`. */
  swapOut(): void {
    if (!this.saved) return;
    this.targets.forEach((v, i) => {
      v.assign(this.saved![i]!);
    });
    tf.dispose(this.saved);
    this.saved = null;
  }

  /** Writes the average into the targets for good. */
  apply(): void {
    if (!this.averages) throw new Error('WeightAverager.apply() before any snapshot');
    this.swapOut();
    this.targets.forEach((v, i) => {
      v.assign(this.averages![i]!);
    });
  }

  state(): AveragerState {
    return {
      kind: this.kind,
      decay: this.decay,
      count: this.n,
      names: this.targets.map((v) => v.name),
      values: (this.averages ?? []).map((a) => ({
        shape: a.shape,
        data: Array.from(a.dataSync()),
      })),
    };
  }

  /** Restores a state saved by `state()` for the same variables. */
  restore(state: AveragerState): void {
    if (state.values.length && state.values.length !== this.targets.length) {
      throw new Error(
        `Averager state has ${state.values.length} tensors but ${this.targets.length} variables are averaged`,
      );
    }
    this.dispose();
    this.n = state.count;
    this.averages = state.values.length
      ? state.values.map((v) => ownedVariable(tf.tensor(v.data, v.shape)))
      : null;
  }

  dispose(): void {
    this.swapOut();
    if (this.averages) tf.dispose(this.averages);
    this.averages = null;
    this.n = 0;
  }
}

/** A non-trainable variable from a temporary tensor; the temporary is freed (tf.variable shares, not takes, it). */
function ownedVariable(initial: tf.Tensor): tf.Variable {
  const v = tf.variable(initial, false);
  initial.dispose();
  return v;
}
