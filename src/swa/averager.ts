import * as tf from '@tensorflow/tfjs';

/** How snapshots are weighted: SWA's equal-weight mean, or an exponential moving average. */
export type AveragerKind = 'swa' | 'ema';

export interface AveragerOptions {
  /** Default 'swa'. */
  kind?: AveragerKind;
  /** EMA decay (weight kept by the old average). Default 0.999. */
  decay?: number;
  /**
   * Models trained side by side, stacked on the first axis of every target (default 1):
   * each member has its own snapshot count and is averaged on its own.
   */
  members?: number;
}

/** A serialisable averager state, for resume. */
export interface AveragerState {
  readonly kind: AveragerKind;
  readonly decay: number;
  readonly count: number;
  /** Snapshots per member (members trained side by side). */
  readonly counts?: readonly number[];
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
  readonly members: number;
  private readonly targets: readonly tf.Variable[];
  private averages: tf.Variable[] | null = null;
  private saved: tf.Tensor[] | null = null;
  private counts: number[];

  constructor(targets: readonly tf.Variable[], options: AveragerOptions = {}) {
    this.targets = targets;
    this.kind = options.kind ?? 'swa';
    this.decay = options.decay ?? 0.999;
    this.members = options.members ?? 1;
    this.counts = new Array<number>(this.members).fill(0);
    if (this.members > 1) {
      for (const v of targets) {
        if (v.shape[0] !== this.members)
          throw new Error(
            `WeightAverager: ${this.members} members but variable ${v.name} has shape [${v.shape}]`,
          );
      }
    }
  }

  /** Snapshots taken so far (of `member`). */
  count(member = 0): number {
    return this.counts[member]!;
  }

  /** Folds the targets' current values into the average (of one member when stacked). */
  update(member = 0): void {
    if (this.saved)
      throw new Error('WeightAverager.update() while the averaged weights are swapped in');
    const n = this.counts[member]!;
    if (this.members === 1) {
      if (!this.averages) this.averages = this.targets.map((v) => ownedVariable(v.clone()));
      else this.fold(n, null);
    } else {
      // Other members' slots hold placeholders until their own first snapshot.
      this.averages ??= this.targets.map((v) => ownedVariable(v.clone()));
      this.fold(n, member);
    }
    this.counts[member] = n + 1;
  }

  /** avg ← the next average after n snapshots; only `member`'s slice when stacked. */
  private fold(n: number, member: number | null): void {
    tf.tidy(() => {
      this.averages!.forEach((avg, i) => {
        const w = this.targets[i]!;
        let next: tf.Tensor;
        if (n === 0) next = w;
        else
          next =
            this.kind === 'swa'
              ? avg.add(w.sub(avg).div(n + 1))
              : avg.mul(this.decay).add(w.mul(1 - this.decay));
        if (member !== null) next = tf.where(this.mask([member], avg.rank), next, avg);
        avg.assign(next);
      });
    });
  }

  /** A boolean [K, 1, …] mask of the given members, broadcastable to a rank-`rank` target. */
  private mask(members: readonly number[], rank: number): tf.Tensor {
    const on = new Array<boolean>(this.members).fill(false);
    for (const m of members) on[m] = true;
    return tf.tensor(on, [this.members, ...new Array<number>(rank - 1).fill(1)], 'bool');
  }

  /** Members with at least one snapshot. */
  private averaged_(): number[] {
    return this.counts.flatMap((c, i) => (c > 0 ? [i] : []));
  }

  /** Copies of the averaged values (the caller disposes them); null before the first snapshot. */
  averaged(): tf.Tensor[] | null {
    return this.averages ? this.averages.map((a) => a.clone()) : null;
  }

  /**
   * Puts the averaged values into the targets, keeping the raw ones to swap back. Stacked
   * members without a snapshot keep their raw values.
   */
  swapIn(): void {
    if (!this.averages) throw new Error('WeightAverager.swapIn() before any snapshot');
    if (this.saved) return;
    this.saved = this.targets.map((v) => v.clone());
    this.writeAverages();
  }

  private writeAverages(): void {
    const members = this.averaged_();
    this.targets.forEach((v, i) => {
      const avg = this.averages![i]!;
      if (this.members === 1 || members.length === this.members) v.assign(avg);
      else tf.tidy(() => v.assign(tf.where(this.mask(members, v.rank), avg, v)));
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

  /** Writes the average into the targets for good (stacked members without a snapshot keep theirs). */
  apply(): void {
    if (!this.averages) throw new Error('WeightAverager.apply() before any snapshot');
    this.swapOut();
    this.writeAverages();
  }

  state(): AveragerState {
    return {
      kind: this.kind,
      decay: this.decay,
      count: this.counts[0]!,
      counts: [...this.counts],
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
    this.counts = state.counts ? [...state.counts] : [state.count];
    this.averages = state.values.length
      ? state.values.map((v) => ownedVariable(tf.tensor(v.data, v.shape)))
      : null;
  }

  dispose(): void {
    this.swapOut();
    if (this.averages) tf.dispose(this.averages);
    this.averages = null;
    this.counts = new Array<number>(this.members).fill(0);
  }
}

/** A non-trainable variable from a temporary tensor; the temporary is freed (tf.variable shares, not takes, it). */
function ownedVariable(initial: tf.Tensor): tf.Variable {
  const v = tf.variable(initial, false);
  initial.dispose();
  return v;
}
