import * as tf from '@tensorflow/tfjs';
import { dataError } from '../errors.js';
import { sha256 } from '../io/hash.js';
import { seededRandom } from '../util/random.js';

/** The paper's scale of SWAG samples (Maddox et al. 2019 draw with 0.5 throughout). */
export const SWAG_SCALE = 0.5;

/**
 * One member's SWAG posterior, flat and serialisable: every variable's values laid end to
 * end in `names` order (`shapes` without the member axis).
 */
export interface SwagState {
  /** K: the most deviations kept. */
  readonly rank: number;
  /** Snapshots folded in. */
  readonly count: number;
  readonly names: readonly string[];
  readonly shapes: readonly (readonly number[])[];
  /** First moment (the SWA mean). */
  readonly mean: Float32Array;
  /** Second moment (mean of squares). */
  readonly sqMean: Float32Array;
  /** The last min(count, rank) deviations w − mean (the mean as it was after that snapshot), oldest first. */
  readonly deviations: readonly Float32Array[];
}

export interface SwagCollectorOptions {
  /** K, the deviations kept (≥ 2: the low-rank term divides by K − 1). */
  rank: number;
  /** Models stacked on the first axis of every target (default 1), each with its own moments. */
  members?: number;
}

const size = (shape: readonly number[]) => shape.reduce((a, b) => a * b, 1);

/**
 * SWAG (Maddox et al. 2019, "A Simple Baseline for Bayesian Uncertainty in Deep
 * Learning"): over the averaged variables, the running first and second moments and the
 * last K deviations, folded in at the SWA snapshots. The first moment is the SWA mean;
 * with the second it gives a diagonal variance, and the deviations a rank-K covariance.
 * With stacked members, one call updates any subset of members in one batched
 * computation, each with its own count (as `WeightAverager`).
 *
 * @example
 *   const swag = new SwagCollector(variables, { rank: 20 });
 *   swag.update();                                    // at each SWA snapshot
 *   const theta = swag.sample(seededNormal(1));       // one weight set, per variable
 */
export class SwagCollector {
  readonly rank: number;
  readonly members: number;
  private readonly means: tf.Variable[];
  private readonly squares: tf.Variable[];
  /** Per target, [rank, ...target shape]: a ring of deviations, slot n % rank for snapshot n. */
  private readonly devs: tf.Variable[];
  private readonly counts: number[];

  constructor(
    private readonly targets: readonly tf.Variable[],
    options: SwagCollectorOptions,
  ) {
    const { rank } = options;
    if (!Number.isInteger(rank) || rank < 2)
      throw new Error(`SwagCollector: rank must be an integer of at least 2, not ${rank}`);
    this.rank = rank;
    this.members = options.members ?? 1;
    if (this.members > 1) {
      for (const v of targets) {
        if (v.shape[0] !== this.members)
          throw new Error(
            `SwagCollector: ${this.members} members but variable ${v.name} has shape [${v.shape}]`,
          );
      }
    }
    this.counts = new Array<number>(this.members).fill(0);
    const zeros = (shape: number[]) => tf.tidy(() => tf.variable(tf.zeros(shape), false));
    this.means = targets.map((v) => zeros(v.shape));
    this.squares = targets.map((v) => zeros(v.shape));
    this.devs = targets.map((v) => zeros([rank, ...v.shape]));
  }

  /** Snapshots folded in for `member`. */
  count(member = 0): number {
    return this.counts[member] ?? 0;
  }

  /**
   * Folds the targets' current values into each of `members` (default: the only one):
   * mean ← mean + (w − mean)/(n + 1), sq ← sq + (w² − sq)/(n + 1), then w − mean into the
   * deviation slot n mod K.
   */
  update(members: number | readonly number[] = 0): void {
    const list = typeof members === 'number' ? [members] : members;
    if (!list.length) return;
    const k = this.members;
    const counts = this.counts;
    tf.tidy(() => {
      const perMember = (rank: number): tf.Tensor | number =>
        k === 1
          ? counts[0]! + 1
          : tf.tensor(
              counts.map((n) => n + 1),
              [k, ...new Array<number>(rank - 1).fill(1)],
            );
      this.targets.forEach((w, i) => {
        const mean = this.means[i]!;
        const sq = this.squares[i]!;
        const n1 = perMember(w.rank);
        let nextMean = mean.add(w.sub(mean).div(n1));
        let nextSq = sq.add(w.square().sub(sq).div(n1));
        if (k > 1 && list.length < k) {
          const on = this.mask(list, w.rank);
          nextMean = tf.where(on, nextMean, mean);
          nextSq = tf.where(on, nextSq, sq);
        }
        const dev = w.sub(nextMean).expandDims(0);
        const D = this.devs[i]!;
        D.assign(tf.where(this.slotMask(list, D.rank), dev, D));
        mean.assign(nextMean);
        sq.assign(nextSq);
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

  /** [rank, members?, 1, …]: on at each updating member's next slot. */
  private slotMask(members: readonly number[], rank: number): tf.Tensor {
    const k = this.members;
    const on = new Array<boolean>(this.rank * k).fill(false);
    for (const m of members) on[(this.counts[m]! % this.rank) * k + m] = true;
    const lead = k > 1 ? [this.rank, k] : [this.rank];
    return tf.tensor(on, [...lead, ...new Array<number>(rank - lead.length).fill(1)], 'bool');
  }

  /** `member`'s posterior as flat arrays (see SwagState); throws before its first snapshot. */
  state(member = 0): SwagState {
    const n = this.count(member);
    if (n === 0) throw new Error(`SwagCollector.state(${member}) before any snapshot`);
    const k = this.members;
    const shapes = this.targets.map((v) => (k > 1 ? v.shape.slice(1) : v.shape));
    const total = shapes.reduce((a, s) => a + size(s), 0);
    const d = Math.min(n, this.rank);
    // Slots in the order they were written: the oldest kept is slot n mod K once the ring is full.
    const slots = Array.from({ length: d }, (_, j) => (n > this.rank ? (n + j) % this.rank : j));
    const mean = new Float32Array(total);
    const sqMean = new Float32Array(total);
    const deviations = slots.map(() => new Float32Array(total));
    let at = 0;
    this.targets.forEach((_, i) => {
      const len = size(shapes[i]!);
      const from = (t: tf.Tensor, row: number) => {
        const data = t.dataSync() as Float32Array;
        const start = (row * k + member) * len;
        return data.subarray(start, start + len);
      };
      mean.set(from(this.means[i]!, 0), at);
      sqMean.set(from(this.squares[i]!, 0), at);
      slots.forEach((slot, j) => {
        deviations[j]!.set(from(this.devs[i]!, slot), at);
      });
      at += len;
    });
    return {
      rank: this.rank,
      count: n,
      names: this.targets.map((v) => v.name),
      shapes: shapes.map((s) => [...s]),
      mean,
      sqMean,
      deviations,
    };
  }

  /**
   * The state for checkpoints: snapshot counts per member, then per target its first and
   * second moments and its ring of deviations. The tensors are the collector's own: read
   * them before the next update, do not dispose them.
   */
  getState(): { counts: number[]; values: tf.Tensor[] } {
    return {
      counts: [...this.counts],
      values: this.targets.flatMap((_, i) => [this.means[i]!, this.squares[i]!, this.devs[i]!]),
    };
  }

  /** Restores a `getState()` of a collector over the same variables and rank (the values are copied). */
  setState(state: { counts: readonly number[]; values: readonly tf.Tensor[] }): void {
    const mine = this.getState().values;
    if (state.counts.length !== this.members || state.values.length !== mine.length)
      throw new Error(
        `SWAG state of ${state.counts.length} members and ${state.values.length} tensors does not fit this collector`,
      );
    state.values.forEach((t, i) => {
      if (!tf.util.arraysEqual(t.shape, mine[i]!.shape))
        throw new Error(`SWAG state tensor ${i} [${t.shape}] does not fit [${mine[i]!.shape}]`);
      (mine[i] as tf.Variable).assign(t);
    });
    state.counts.forEach((c, m) => {
      this.counts[m] = c;
    });
  }

  /** One weight set drawn for `member`, one tensor per target without the member axis (the caller disposes them). */
  sample(normal: () => number, scale = SWAG_SCALE, member = 0): tf.Tensor[] {
    const posterior = new SwagPosterior(this.state(member));
    try {
      return posterior.sample(normal, scale);
    } finally {
      posterior.dispose();
    }
  }

  dispose(): void {
    tf.dispose([...this.means, ...this.squares, ...this.devs]);
    this.counts.fill(0);
  }
}

/**
 * A SWAG posterior ready to sample from (its moments held as tensors).
 *
 * θ = mean + scale·(σ∘z₁/√2 + D·z₂/√(2(d − 1))), σ = √max(sq − mean², 0), z₁ ~ N(0, I_P),
 * z₂ ~ N(0, I_d), with D the d ≤ K deviations kept; with fewer than two deviations the
 * low-rank term is left out. With zero variance (every snapshot equal) every sample is the mean.
 */
export class SwagPosterior {
  readonly names: readonly string[];
  readonly shapes: readonly (readonly number[])[];
  private readonly mean: tf.Tensor1D;
  private readonly sigma: tf.Tensor1D;
  /** [d, P], or null with fewer than two deviations. */
  private readonly devs: tf.Tensor2D | null;
  private readonly d: number;

  constructor(state: SwagState) {
    this.names = state.names;
    this.shapes = state.shapes;
    const p = state.mean.length;
    this.d = state.deviations.length;
    this.mean = tf.tensor1d(state.mean);
    this.sigma = tf.tidy(() => {
      const m = this.mean;
      return tf.sqrt(tf.relu(tf.sub(tf.tensor1d(state.sqMean), m.square()))) as tf.Tensor1D;
    });
    if (this.d >= 2) {
      const flat = new Float32Array(this.d * p);
      state.deviations.forEach((row, j) => {
        flat.set(row, j * p);
      });
      this.devs = tf.tensor2d(flat, [this.d, p]);
    } else this.devs = null;
  }

  /** One weight set, one tensor per variable in `names` order (the caller disposes them). */
  sample(normal: () => number, scale = SWAG_SCALE): tf.Tensor[] {
    const p = this.mean.size;
    const z1 = new Float32Array(p);
    for (let i = 0; i < p; i++) z1[i] = normal();
    const z2 = new Float32Array(this.d);
    for (let j = 0; j < this.d; j++) z2[j] = normal();
    return tf.tidy(() => {
      let noise = tf.mul(this.sigma, tf.tensor1d(z1)).mul(Math.SQRT1_2);
      if (this.devs) {
        const low = tf.matMul(tf.tensor2d(z2, [1, this.d]), this.devs).reshape([p]);
        noise = noise.add(low.mul(1 / Math.sqrt(2 * (this.d - 1))));
      }
      const theta = this.mean.add(noise.mul(scale));
      const sizes = this.shapes.map(size);
      return tf.split(theta, sizes).map((t, i) => t.reshape([...this.shapes[i]!]));
    });
  }

  dispose(): void {
    tf.dispose([this.mean, this.sigma, ...(this.devs ? [this.devs] : [])]);
  }
}

/** Sample s's own seed from a run's seed (a golden-ratio step, so that nearby seeds do not share samples). */
export function sampleSeed(seed: number, s: number): number {
  return (seed + Math.imul(s + 1, 0x9e3779b9)) >>> 0;
}

/**
 * Standard normal draws from a seed (Box–Muller over mulberry32), so a seed gives the
 * same samples on every run and every backend.
 *
 * @example const normal = seededNormal(7); normal(); // → the same number for seed 7
 */
export function seededNormal(seed: number): () => number {
  const random = seededRandom(seed);
  let spare: number | null = null;
  return () => {
    if (spare !== null) {
      const s = spare;
      spare = null;
      return s;
    }
    // 1 − u keeps the logarithm finite (u can be 0, never 1).
    const r = Math.sqrt(-2 * Math.log(1 - random()));
    const t = 2 * Math.PI * random();
    spare = r * Math.sin(t);
    return r * Math.cos(t);
  };
}

/** swag.json: what swag.bin holds. */
export interface SwagManifest {
  readonly format: 'tfjs-finetune-swag';
  readonly version: 1;
  readonly rank: number;
  readonly count: number;
  /** Variables as the exported model names its weights, with their element counts' shapes. */
  readonly variables: readonly { readonly name: string; readonly shape: readonly number[] }[];
  /** Rows of float32 (little-endian) in swag.bin, each as long as every variable together. */
  readonly rows: { readonly mean: 1; readonly sqMean: 1; readonly deviations: number };
  readonly sha256: string;
}

export const SWAG_MANIFEST_FILE = 'swag.json';
export const SWAG_DATA_FILE = 'swag.bin';

/** A state as swag.json and swag.bin (mean, sqMean, then the deviations, oldest first). */
export function encodeSwag(state: SwagState): { manifest: SwagManifest; data: Uint8Array } {
  const p = state.mean.length;
  const rows = [state.mean, state.sqMean, ...state.deviations];
  const flat = new Float32Array(rows.length * p);
  rows.forEach((r, i) => {
    flat.set(r, i * p);
  });
  const data = new Uint8Array(flat.buffer);
  return {
    manifest: {
      format: 'tfjs-finetune-swag',
      version: 1,
      rank: state.rank,
      count: state.count,
      variables: state.names.map((name, i) => ({ name, shape: [...state.shapes[i]!] })),
      rows: { mean: 1, sqMean: 1, deviations: state.deviations.length },
      sha256: sha256(data),
    },
    data,
  };
}

/** Reads what `encodeSwag` wrote; a file that does not fit names `file` (swag.json or swag.bin). */
export function decodeSwag(
  manifest: unknown,
  data: Uint8Array,
  files: { manifest: string; data: string },
): SwagState {
  const m = manifest as Partial<SwagManifest> | null;
  const bad = (what: string) => dataError(what, { path: files.manifest });
  if (m?.format !== 'tfjs-finetune-swag' || m.version !== 1)
    throw bad('is not a SWAG manifest of this toolkit (format tfjs-finetune-swag, version 1)');
  if (!Array.isArray(m.variables) || !m.rows || !Number.isInteger(m.rows.deviations))
    throw bad('has no variables or rows');
  const p = m.variables.reduce((a, v) => a + size(v.shape), 0);
  const rows = 2 + m.rows.deviations;
  if (sha256(data) !== m.sha256)
    throw dataError(
      `does not match the sha256 in ${files.manifest}; the model folder was changed after export`,
      { path: files.data },
    );
  if (data.byteLength !== rows * p * 4)
    throw dataError(
      `has ${data.byteLength} bytes but ${files.manifest} describes ${rows * p * 4}`,
      {
        path: files.data,
      },
    );
  // A copy: the file's bytes need not be 4-byte aligned.
  const flat = new Float32Array(data.slice().buffer);
  const row = (i: number) => flat.subarray(i * p, (i + 1) * p);
  return {
    rank: m.rank!,
    count: m.count!,
    names: m.variables.map((v) => v.name),
    shapes: m.variables.map((v) => [...v.shape]),
    mean: row(0),
    sqMean: row(1),
    deviations: Array.from({ length: m.rows.deviations }, (_, j) => row(2 + j)),
  };
}
