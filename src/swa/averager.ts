import * as tf from '@tensorflow/tfjs';
import { type AverageKind, emaDecay } from './schedule.js';

export type { AverageKind as AveragerKind } from './schedule.js';

export interface AveragerOptions {
  /** Default 'swa'. */
  kind?: AverageKind;
  /** EMA decay (weight kept by the old average), warmed up as `emaDecay` says. Default 0.999. */
  decay?: number;
  /**
   * Models trained side by side, stacked on the first axis of every target (default 1):
   * each member has its own snapshot count and is averaged on its own.
   */
  members?: number;
}

/** A serialisable averager state, for resume. */
export interface AveragerState {
  readonly kind: AverageKind;
  readonly decay: number;
  /** Snapshots of member 0 of the first group. */
  readonly count: number;
  /** Per group (variables that joined together), snapshots per member. */
  readonly counts?: readonly (readonly number[])[];
  readonly names: readonly string[];
  readonly values: readonly { shape: number[]; data: number[] }[];
}

/** Variables that joined the averaged set together, with their own snapshot counts. */
interface Group {
  readonly targets: readonly tf.Variable[];
  averages: tf.Variable[] | null;
  /** Snapshots per member. */
  counts: number[];
}

/**
 * Keeps a running average of a chosen set of variables (the trainable ones only).
 *
 * SWA: `avg ← avg + (w − avg)/(n + 1)` with n the number of snapshots so far: every
 * snapshot weighs the same, whatever the period between snapshots.
 * EMA: `avg ← d·avg + (1 − d)·w` with `d = min(decay, (1 + n)/(10 + n))`, starting from
 * the first snapshot.
 * Variables added later (`add`) start their own count. With stacked members, one call
 * updates any subset of members in one batched computation.
 *
 * @example
 *   const swa = new WeightAverager(model.trainableWeights.map((w) => w.read() as tf.Variable));
 *   swa.update();                 // at each snapshot
 *   swa.swapIn(); evaluate(); swa.swapOut();
 */
export class WeightAverager {
  readonly kind: AverageKind;
  readonly decay: number;
  readonly members: number;
  private readonly groups: Group[] = [];
  private saved: tf.Tensor[] | null = null;

  constructor(targets: readonly tf.Variable[], options: AveragerOptions = {}) {
    this.kind = options.kind ?? 'swa';
    this.decay = options.decay ?? 0.999;
    this.members = options.members ?? 1;
    this.add(targets);
  }

  /** Adds variables to the averaged set; they start with no snapshot. */
  add(targets: readonly tf.Variable[]): void {
    if (this.members > 1) {
      for (const v of targets) {
        if (v.shape[0] !== this.members)
          throw new Error(
            `WeightAverager: ${this.members} members but variable ${v.name} has shape [${v.shape}]`,
          );
      }
    }
    if (targets.length)
      this.groups.push({
        targets,
        averages: null,
        counts: new Array<number>(this.members).fill(0),
      });
  }

  private get targets(): tf.Variable[] {
    return this.groups.flatMap((g) => g.targets);
  }

  /** Snapshots taken so far (of `member`, by the first variables averaged). */
  count(member = 0): number {
    return this.groups[0]?.counts[member] ?? 0;
  }

  /** Folds the targets' current values into the average of each of `members` (default: the only one). */
  update(members: number | readonly number[] = 0): void {
    if (this.saved)
      throw new Error('WeightAverager.update() while the averaged weights are swapped in');
    const list = typeof members === 'number' ? [members] : members;
    if (!list.length) return;
    for (const g of this.groups) this.fold(g, list);
  }

  private fold(g: Group, list: readonly number[]): void {
    const k = this.members;
    if (!g.averages) {
      // The first snapshot is the weights themselves (other members' slots are placeholders).
      g.averages = g.targets.map((v) => ownedVariable(v.clone()));
      for (const m of list) g.counts[m]!++;
      return;
    }
    const counts = g.counts;
    tf.tidy(() => {
      // Per-member n (snapshots so far) as a [K, 1, …] tensor; one member: a plain number.
      const perMember = (f: (n: number) => number, rank: number): tf.Tensor | number =>
        k === 1
          ? f(counts[0]!)
          : tf.tensor(
              counts.map((n) => f(n)),
              [k, ...new Array<number>(rank - 1).fill(1)],
            );
      g.averages!.forEach((avg, i) => {
        const w = g.targets[i]!;
        let next: tf.Tensor;
        if (this.kind === 'swa') next = avg.add(w.sub(avg).div(perMember((n) => n + 1, avg.rank)));
        else {
          const d = perMember((n) => emaDecay(this.decay, n), avg.rank);
          const keep = typeof d === 'number' ? 1 - d : tf.sub(1, d);
          next = avg.mul(d).add(w.mul(keep));
        }
        // A member's first snapshot is its weights; members not updating keep theirs.
        const first = list.filter((m) => counts[m] === 0);
        if (first.length) next = tf.where(this.mask(first, avg.rank), w, next);
        if (k > 1 && list.length < k) next = tf.where(this.mask(list, avg.rank), next, avg);
        avg.assign(next);
      });
    });
    for (const m of list) counts[m]!++;
  }

  /** A boolean [K, 1, …] mask of the given members, broadcastable to a rank-`rank` target. */
  private mask(members: readonly number[], rank: number): tf.Tensor {
    const on = new Array<boolean>(this.members).fill(false);
    for (const m of members) on[m] = true;
    return tf.tensor(on, [this.members, ...new Array<number>(rank - 1).fill(1)], 'bool');
  }

  /** Copies of the averaged values (the caller disposes them); null before the first snapshot. */
  averaged(): tf.Tensor[] | null {
    const first = this.groups[0];
    if (!first?.averages) return null;
    return this.groups.flatMap((g) =>
      g.averages ? g.averages.map((a) => a.clone()) : g.targets.map((v) => v.clone()),
    );
  }

  /**
   * Puts the averaged values into the targets, keeping the raw ones to swap back. Members
   * (and variables) without a snapshot keep their raw values.
   */
  swapIn(): void {
    if (!this.groups.some((g) => g.averages))
      throw new Error('WeightAverager.swapIn() before any snapshot');
    if (this.saved) return;
    this.saved = this.targets.map((v) => v.clone());
    this.writeAverages();
  }

  private writeAverages(): void {
    for (const g of this.groups) {
      if (!g.averages) continue;
      const members = g.counts.flatMap((c, i) => (c > 0 ? [i] : []));
      g.targets.forEach((v, i) => {
        const avg = g.averages![i]!;
        if (members.length === this.members) v.assign(avg);
        else if (members.length)
          tf.tidy(() => v.assign(tf.where(this.mask(members, v.rank), avg, v)));
      });
    }
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

  /** Whether the averaged weights are swapped in. */
  get swapped(): boolean {
    return this.saved !== null;
  }

  /** Writes the average into the targets for good (members without a snapshot keep theirs). */
  apply(): void {
    if (!this.groups.some((g) => g.averages))
      throw new Error('WeightAverager.apply() before any snapshot');
    this.swapOut();
    this.writeAverages();
  }

  state(): AveragerState {
    return {
      kind: this.kind,
      decay: this.decay,
      count: this.count(0),
      counts: this.groups.map((g) => [...g.counts]),
      names: this.targets.map((v) => v.name),
      values: this.groups.flatMap((g) =>
        (g.averages ?? []).map((a) => ({ shape: a.shape, data: Array.from(a.dataSync()) })),
      ),
    };
  }

  /**
   * The state for checkpoints: snapshot counts per group and member, and the averaged
   * values of the groups that have any, in target order. The tensors are the averager's
   * own: read them before the next update, do not dispose them.
   */
  getState(): { counts: number[][]; values: tf.Tensor[] } {
    if (this.saved)
      throw new Error('WeightAverager.getState() while the averaged weights are swapped in');
    return {
      counts: this.groups.map((g) => [...g.counts]),
      values: this.groups.flatMap((g) => g.averages ?? []),
    };
  }

  /** Restores a `getState()` of an averager over the same variables (the values are copied). */
  setState(state: { counts: readonly (readonly number[])[]; values: readonly tf.Tensor[] }): void {
    const { counts, values } = state;
    if (counts.length !== this.groups.length || counts.some((c) => c.length !== this.members))
      throw new Error(
        `Averager state has ${counts.length} groups of variables but ${this.groups.length} are averaged`,
      );
    this.dispose();
    let at = 0;
    this.groups.forEach((g, i) => {
      g.counts = [...counts[i]!];
      if (g.counts.some((c) => c > 0)) {
        g.averages = g.targets.map((v) => {
          const t = values[at++];
          if (!t || !tf.util.arraysEqual(t.shape, v.shape))
            throw new Error(`Averager state does not fit variable ${v.name} [${v.shape}]`);
          return ownedVariable(t.clone());
        });
      }
    });
    if (at !== values.length)
      throw new Error(
        `Averager state has ${values.length} tensors but ${at} variables are averaged`,
      );
  }

  /** Restores a state saved by `state()` for the same variables. */
  restore(state: AveragerState): void {
    const counts = state.counts ?? [[state.count]];
    if (counts.length !== this.groups.length)
      throw new Error(
        `Averager state has ${counts.length} groups of variables but ${this.groups.length} are averaged`,
      );
    const expected = this.groups.reduce(
      (n, g, i) => n + (counts[i]!.some((c) => c > 0) ? g.targets.length : 0),
      0,
    );
    if (state.values.length !== expected) {
      throw new Error(
        `Averager state has ${state.values.length} tensors but ${expected} variables are averaged`,
      );
    }
    this.dispose();
    let at = 0;
    this.groups.forEach((g, i) => {
      g.counts = [...counts[i]!];
      if (g.counts.some((c) => c > 0)) {
        g.averages = g.targets.map(() => {
          const v = state.values[at++]!;
          return ownedVariable(tf.tensor(v.data, v.shape));
        });
      }
    });
  }

  dispose(): void {
    this.swapOut();
    for (const g of this.groups) {
      if (g.averages) tf.dispose(g.averages);
      g.averages = null;
      g.counts = new Array<number>(this.members).fill(0);
    }
  }
}

/** A non-trainable variable from a temporary tensor; the temporary is freed (tf.variable shares, not takes, it). */
function ownedVariable(initial: tf.Tensor): tf.Variable {
  const v = tf.variable(initial, false);
  initial.dispose();
  return v;
}
