import * as tf from '@tensorflow/tfjs';
import type { FinetuneError } from '../errors.js';
import { negativeLogLikelihood } from '../export/calibration.js';
import { WeightAverager } from '../swa/averager.js';
import type { BatchNormState } from '../swa/bn-refresh.js';
import {
  type AverageKind,
  type AveragingPlan,
  averagesAfterEpoch,
  averagesAfterStep,
  type LrPlan,
  type LrScheduleKind,
  learningRateAt,
  parseFrequency,
  resolveSwaStart,
  type SwaScheduleKind,
} from '../swa/schedule.js';
import {
  SWAG_SCALE,
  SwagCollector,
  SwagPosterior,
  type SwagState,
  sampleSeed,
  seededNormal,
} from '../swa/swag.js';
import { type EpochLogs, learningRateSchedule, type TrainingCallback } from './callbacks.js';
import {
  argmax,
  type Batches,
  type Evaluation,
  type ExternalSteps,
  evaluateMembers,
  type FitHooks,
  type FitLoopState,
  type FitMember,
  type Forward,
  fit,
  type HalvedSteps,
} from './fit.js';
import { type OptimizerName, StageOptimizer } from './optimizers.js';

/** Averaging settings of one stage (SWA unless `kind` says otherwise). */
export interface SwaSettings {
  /** Default 'swa'. */
  readonly kind?: AverageKind;
  /** Epoch (≥ 1) or fraction of the epochs (< 1) where averaging starts. */
  readonly start: number;
  /** SWA snapshots: every N epochs (a number) or every N optimizer steps (`'50s'`). */
  readonly freq: number | string;
  /** Learning rate once averaging has started. */
  readonly lr: number;
  /** Epochs to anneal from the base LR to `lr` (0: switch at once). */
  readonly annealEpochs: number;
  /** Default 'cos' (SWALR's): with annealEpochs 0 a switch at once. */
  readonly schedule?: SwaScheduleKind;
  /** cyclic: epochs per cycle (default 1). */
  readonly cycle?: number;
  /** EMA's decay (default 0.999). */
  readonly emaDecay?: number;
  /** SWA only: SWAG's rank K (≥ 2), collected at the SWA snapshots (default 0: off). */
  readonly swag?: number;
}

/** Early stopping on validation loss (Keras EarlyStopping with restore_best_weights). */
export interface EarlyStopSettings {
  /** Epochs without an improvement before it acts. */
  readonly patience: number;
  /** What counts as an improvement: a loss lower by more than this. */
  readonly minDelta: number;
}

/** What may differ between members of a stage trained side by side. */
export interface StageMember {
  readonly seed: number;
  readonly lr: number;
  readonly labelSmoothing: number;
  readonly classWeights: readonly number[] | null;
  /** null: no averaging. */
  readonly swa: SwaSettings | null;
  /** The learning rate before averaging (default constant). */
  readonly lrSchedule?: LrScheduleKind;
  /** Steps of linear LR warm-up at the start (default: the stage's). */
  readonly warmupSteps?: number;
  readonly earlyStop?: EarlyStopSettings | null;
  /** `best`: the raw or the averaged weights, whichever has the lower validation loss (default `last`: averaged when there are any). */
  readonly keep?: 'last' | 'best';
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
  /** Steps of linear LR warm-up at the start (0: none), unless a member says otherwise. */
  readonly warmupSteps?: number;
  /** Also return copies of the final raw weights (before SWA is applied); the caller disposes them. */
  readonly keepRaw?: boolean;
  /** One LR factor per variable (discriminative LRs; default 1), see StageOptimizer. */
  readonly lrScales?: readonly number[];
  /** Checkpoints of the stage every N epochs, and the one to continue from. */
  readonly checkpoint?: StageCheckpointing;
  /**
   * BatchNormalization in training mode after the trained variables (`--head-bn`, `--bn
   * train`): its moving statistics go with the weights (early stopping, `--keep best`) and
   * are recomputed for the averaged weights at the end of the stage (bn-refresh.ts).
   */
  readonly batchNorm?: BatchNormState | null;
  /** Steps in two halves, the second perhaps in a worker (see FitOptions.halves). */
  readonly halves?: HalvedSteps;
  /** Steps computed elsewhere, ONNX Runtime (see FitOptions.external). */
  readonly external?: ExternalSteps;
}

/**
 * A stage's checkpoints: `save` is called at the end of every `every`-th epoch (0: never)
 * with the whole state of the stage; `resume` (when given) is such a state to continue
 * from, in place of the stage's first epochs.
 */
export interface StageCheckpointing {
  readonly every: number;
  save(state: StageState): Promise<void>;
  readonly resume: StageState | null;
  /**
   * Variables the stage does not train but whose values a resume needs back, beyond its
   * trainable set (BatchNorm moving statistics, should a mode update them).
   */
  readonly extra?: readonly tf.Variable[];
}

/**
 * Everything a stage needs to continue after an epoch exactly as if it had not stopped:
 * the loop's place (logs, random sources), each member's plan and early-stopping state,
 * and by name the tensors: the variables (`var/i`), the extra variables (`extra/i`), the
 * optimizer's state (`opt/…`), the averager's (`avg/i`), SWAG's (`swag/i`) and early
 * stopping's best weights (`best/i`). In `save` the tensors are the stage's own (read them
 * before returning); the tensors of a state to resume from pass to the stage, which frees
 * them once restored.
 */
export interface StageState {
  readonly stage: string;
  readonly loop: FitLoopState;
  readonly members: readonly MemberState[];
  readonly lrs: readonly number[];
  readonly averagerCounts: readonly (readonly number[])[] | null;
  readonly swagCounts: readonly number[] | null;
  readonly tensors: ReadonlyMap<string, tf.Tensor>;
}

/** `--keep best`: SWAG's Bayesian model average over this many weight sets, seeded by the member's seed. */
export const KEEP_SWAG_SAMPLES = 20;

/** Which weights a `--keep best` candidate stands for: `swag` is the SWAG model average. */
export type CandidateKind = 'raw' | AverageKind | 'swag';

/** One set of weights `--keep best` ranked, with its validation figures. */
export interface WeightsCandidate {
  readonly weights: CandidateKind;
  readonly loss: number;
  readonly acc: number;
  /** SWAG: the weight sets averaged. */
  readonly samples?: number;
}

/** One model's stage: the shared settings and its own. */
export type StageOptions = StageShared & StageMember;

export interface StageResult {
  readonly history: EpochLogs[];
  /** Validation figures of the final raw weights (the best epoch's, when early stopping restored them). */
  readonly raw: Evaluation | null;
  /** Validation figures of the averaged weights (null without a snapshot). */
  readonly swa: Evaluation | null;
  /** The averaging strategy (null: none). */
  readonly average: AverageKind | null;
  readonly snapshots: number;
  /** Which weights the variables hold after the stage. */
  readonly kept: 'raw' | AverageKind;
  /** With `keepRaw`: the raw final values of the variables, in order, then of `batchNorm`'s statistics (stacked: every member's). */
  readonly rawWeights: tf.Tensor[] | null;
  /** Early stopping: the epoch (1-based) after which it ended the stage, or null. */
  readonly stoppedAfter: number | null;
  /** The first averaged epoch (1-based; early stopping can bring it forward), or null. */
  readonly averagingFrom: number | null;
  /** With `swa.swag`: the SWAG posterior over the variables (by their names), null without a snapshot. */
  readonly swag: SwagState | null;
  /** BatchNormalization layers whose statistics were recomputed for the averaged weights. */
  readonly bnRefreshed: readonly string[];
  /** `--keep best`: every candidate ranked, in order raw, averaged, SWAG (null otherwise). */
  readonly candidates: readonly WeightsCandidate[] | null;
  /**
   * `--keep best`: the winner. `swag` leaves the SWA mean in the variables (the centre
   * of the SWAG samples, exported with their state: `predict --samples` averages them).
   */
  readonly chosen: CandidateKind | null;
}

/** One model's training stage (see `runMembers`). */
export async function runStage(
  train: Batches,
  val: Batches | null,
  o: StageOptions,
): Promise<StageResult> {
  const {
    seed,
    lr,
    labelSmoothing,
    classWeights,
    swa,
    callbacks,
    lrSchedule,
    earlyStop,
    keep,
    ...shared
  } = o;
  const member: StageMember = {
    seed,
    lr,
    labelSmoothing,
    classWeights,
    swa,
    ...(callbacks ? { callbacks } : {}),
    ...(lrSchedule ? { lrSchedule } : {}),
    ...(earlyStop ? { earlyStop } : {}),
    ...(keep ? { keep } : {}),
  };
  const [result] = await runMembers(train, val, shared, [member]);
  if (result instanceof Error) throw result;
  return result!;
}

/** The averaging plan of a member's settings. */
function averagingPlan(swa: SwaSettings, epochs: number, stage: string): AveragingPlan {
  const schedule = swa.schedule ?? 'cos';
  return {
    kind: swa.kind ?? 'swa',
    startEpoch: resolveSwaStart(swa.start, epochs, `${stage} swaStart`),
    frequency: parseFrequency(`${stage} swaFreq`, swa.freq),
    swaLr: swa.lr,
    schedule,
    annealEpochs: swa.annealEpochs,
    cycle: swa.cycle ?? 1,
    emaDecay: swa.emaDecay ?? 0.999,
  };
}

/** A member's progress through its stage: its plan (early stopping may move averaging forward) and its best epoch. */
export interface MemberState {
  plan: LrPlan;
  /** The last epoch (0-based) it trains. */
  lastEpoch: number;
  best: number;
  wait: number;
  /** Whether `bestWeights` holds this member's best (raw or averaged) weights. */
  saved: 'raw' | 'averaged' | null;
  stoppedAfter: number | null;
}

/**
 * One training stage: a fresh optimizer for this stage's trainable set, an LR schedule,
 * an averager over exactly these variables (SWA snapshots per epoch or per step, or an
 * EMA after every step), the averaged weights evaluated on validation every epoch once
 * they exist (swapped in, then out: the optimizer follows the raw weights), early stopping,
 * then validation of raw and averaged weights. The variables end up holding the weights
 * kept (averaged, unless `keep: 'best'` finds the raw ones better). With several members
 * (stacked variables) every member has its own plan, snapshots, stopping and figures, and
 * one step trains them all. A member whose loss diverged (stacked members only; one
 * member throws) gets its error in place of a result.
 *
 * Early stopping watches the validation loss of the weights the stage would keep: the raw
 * weights until averaging has a snapshot, the averaged ones after. When its patience runs
 * out before averaging has started, averaging starts with the next epoch and lasts as many
 * epochs as planned (the stage ends earlier); when it runs out during averaging, or without
 * averaging, the stage stops and the best weights seen are restored (Keras's
 * restore_best_weights; for averaging, the average as it was at its best epoch).
 */
export async function runMembers(
  train: Batches,
  val: Batches | null,
  shared: StageShared,
  members: readonly StageMember[],
): Promise<(StageResult | FinetuneError)[]> {
  const k = members.length;
  const stacked = shared.stacked ?? false;
  const stepsPerEpoch = Math.ceil(train.size / shared.batchSize);
  const optimizer = new StageOptimizer(
    shared.optimizer,
    shared.variables,
    members.map((m) => m.lr),
    { scales: shared.lrScales },
  );
  const kinds = new Set(members.flatMap((m) => (m.swa ? [m.swa.kind ?? 'swa'] : [])));
  if (kinds.size > 1)
    throw new Error('runMembers: members trained together must use one averaging kind');
  const kind = [...kinds][0] ?? null;
  const averager = kind
    ? new WeightAverager(shared.variables, {
        kind,
        decay: members.find((m) => m.swa)?.swa?.emaDecay ?? 0.999,
        members: stacked ? k : 1,
      })
    : null;
  const states: MemberState[] = members.map((m) => {
    const plan: LrPlan = {
      lr: m.lr,
      epochs: shared.epochs,
      schedule: m.lrSchedule ?? 'constant',
      warmupSteps: m.warmupSteps ?? shared.warmupSteps ?? 0,
      averaging: m.swa ? averagingPlan(m.swa, shared.epochs, shared.name) : null,
    };
    return {
      plan,
      lastEpoch: shared.epochs - 1,
      best: Number.POSITIVE_INFINITY,
      wait: 0,
      saved: null,
      stoppedAfter: null,
    };
  });
  if (averager && new Set(members.map((m) => m.swa?.emaDecay ?? 0.999)).size > 1)
    throw new Error('runMembers: members trained together must use one EMA decay');
  // SWAG folds in exactly the SWA snapshots of the members that ask for it.
  const swagRanks = new Set(members.flatMap((m) => (m.swa?.swag ? [m.swa.swag] : [])));
  if (swagRanks.size > 1 || (swagRanks.size && kind !== 'swa'))
    throw new Error('runMembers: members trained together must use one SWAG rank, with SWA');
  const swag = swagRanks.size
    ? new SwagCollector(shared.variables, { rank: [...swagRanks][0]!, members: stacked ? k : 1 })
    : null;
  const snapshot = (due: readonly number[]) => {
    averager!.update(due);
    swag?.update(due.filter((m) => members[m]!.swa?.swag));
  };
  // The weights with what goes with them: the BN statistics computed under them.
  const weights = [...shared.variables, ...(shared.batchNorm?.variables ?? [])];
  // Copies of each member's best weights for early stopping (stacked: every member's slot).
  let bestWeights: tf.Tensor[] | null = null;
  const saveBest = (member: number, values: readonly tf.Tensor[]) => {
    const old = bestWeights;
    bestWeights = tf.tidy(() =>
      values.map((v, i) =>
        k > 1 && old ? tf.where(memberMask(k, member, v.rank), v, old[i]!) : v.clone(),
      ),
    );
    if (old) tf.dispose(old);
  };
  // BatchNorm statistics in training mode change with the weights: a resume needs them back.
  const given = shared.checkpoint?.extra ?? [];
  const extra = [
    ...given,
    ...(shared.batchNorm?.variables ?? []).filter((v) => !given.includes(v)),
  ];
  const resume = shared.checkpoint?.resume ?? null;
  // The state resumed from is restored inside the try below (so a bad one frees the stage),
  // and its tensors are freed once copied.
  const restoreState = (resume: StageState) => {
    if (resume.stage !== shared.name || resume.members.length !== k)
      throw new Error(`runMembers: the state to resume is not of this ${shared.name} stage`);
    const t = (name: string): tf.Tensor => {
      const found = resume.tensors.get(name);
      if (!found) throw new Error(`runMembers: the state to resume has no ${name}`);
      return found;
    };
    const assign = (vars: readonly tf.Variable[], prefix: string) => {
      vars.forEach((v, i) => {
        const value = t(`${prefix}/${i}`);
        if (!tf.util.arraysEqual(value.shape, v.shape))
          throw new Error(
            `runMembers: saved ${prefix}/${i} [${value.shape}] does not fit ${v.name} [${v.shape}]`,
          );
        v.assign(value);
      });
    };
    assign(shared.variables, 'var');
    assign(extra, 'extra');
    const opt: Record<string, tf.Tensor> = {};
    for (const [name, value] of resume.tensors)
      if (name.startsWith('opt/')) opt[name.slice('opt/'.length)] = value;
    optimizer.setState({ lrs: resume.lrs, tensors: opt });
    const list = (prefix: string) =>
      [...resume.tensors.keys()]
        .filter((n) => n.startsWith(`${prefix}/`))
        .map((_, i) => t(`${prefix}/${i}`));
    if (averager && resume.averagerCounts)
      averager.setState({ counts: resume.averagerCounts, values: list('avg') });
    if (swag && resume.swagCounts)
      swag.setState({ counts: resume.swagCounts, values: list('swag') });
    resume.members.forEach((m, i) => {
      Object.assign(states[i]!, m);
    });
    const best = list('best');
    if (best.length) bestWeights = best.map((b) => b.clone());
    tf.dispose([...resume.tensors.values()]);
  };
  const capture = (loop: FitLoopState): StageState => {
    const tensors = new Map<string, tf.Tensor>();
    const add = (prefix: string, values: readonly tf.Tensor[]) => {
      values.forEach((v, i) => {
        tensors.set(`${prefix}/${i}`, v);
      });
    };
    add('var', shared.variables);
    add('extra', extra);
    const opt = optimizer.getState();
    for (const [name, value] of Object.entries(opt.tensors)) tensors.set(`opt/${name}`, value);
    const avg = averager?.getState() ?? null;
    if (avg) add('avg', avg.values);
    const sw = swag?.getState() ?? null;
    if (sw) add('swag', sw.values);
    if (bestWeights) add('best', bestWeights);
    return {
      stage: shared.name,
      loop,
      members: states.map((s) => ({ ...s })),
      lrs: opt.lrs,
      averagerCounts: avg?.counts ?? null,
      swagCounts: sw?.counts ?? null,
      tensors,
    };
  };
  const evalBatch = Math.max(shared.batchSize, 64);
  const evaluate = () =>
    evaluateMembers(
      shared.forward,
      val!,
      evalBatch,
      shared.numClasses,
      k,
      stacked,
      shared.external,
    );
  const fitMembers: FitMember[] = members.map((m, i) => {
    const state = states[i]!;
    const lrCallback = learningRateSchedule(
      (lr) => optimizer.setLearningRate(lr, i),
      (epoch, step) => learningRateAt(state.plan, epoch, step, stepsPerEpoch),
      (epoch) => learningRateAt({ ...state.plan, warmupSteps: 0 }, epoch, 0, stepsPerEpoch),
    );
    return {
      seed: m.seed,
      labelSmoothing: m.labelSmoothing,
      classWeights: m.classWeights,
      callbacks: [lrCallback, ...(m.callbacks ?? [])],
      lr: () => lrCallback.current,
    };
  });
  const hooks: FitHooks = {
    afterStep(epoch, step, perEpoch, active) {
      if (!averager) return;
      const due = active.filter((m) => {
        const a = states[m]!.plan.averaging;
        return a !== null && averagesAfterStep(a, epoch, step, perEpoch);
      });
      snapshot(due);
    },
    async afterEpoch(epoch, logs, active) {
      if (averager) {
        snapshot(
          active.filter((m) => {
            const a = states[m]!.plan.averaging;
            return a !== null && averagesAfterEpoch(a, epoch);
          }),
        );
        for (const m of active)
          if (states[m]!.plan.averaging) logs[m]!.snapshots = averager.count(m);
        if (val?.size && active.some((m) => averager.count(m) > 0)) {
          averager.swapIn();
          try {
            const evals = await evaluate();
            for (const m of active) {
              if (averager.count(m) === 0) continue;
              logs[m]!.val_avg_loss = evals[m]!.loss;
              logs[m]!.val_avg_acc = evals[m]!.acc;
            }
            // Early stopping's best averaged weights, while they are swapped in.
            for (const m of active) {
              const s = states[m]!;
              const stop = members[m]!.earlyStop;
              if (stop && averager.count(m) > 0 && evals[m]!.loss < s.best - stop.minDelta)
                saveBest(m, weights);
            }
          } finally {
            averager.swapOut();
          }
        }
      }
      const stopping: number[] = [];
      for (const m of active) {
        const s = states[m]!;
        const stop = members[m]!.earlyStop;
        const l = logs[m]!;
        if (stop && val?.size) {
          const averaged = averager !== null && averager.count(m) > 0;
          const loss = averaged ? l.val_avg_loss! : l.val_loss!;
          if (loss < s.best - stop.minDelta) {
            s.best = loss;
            s.wait = 0;
            if (!averaged) saveBest(m, weights);
            s.saved = averaged ? 'averaged' : 'raw';
          } else if (++s.wait >= stop.patience) {
            const a = s.plan.averaging;
            if (a && epoch + 1 < a.startEpoch) {
              // Patience ends the first phase: averaging starts now, for as long as planned.
              const planned = shared.epochs - a.startEpoch;
              s.plan = { ...s.plan, averaging: { ...a, startEpoch: epoch + 1 } };
              s.lastEpoch = Math.min(shared.epochs - 1, epoch + planned);
              s.best = Number.POSITIVE_INFINITY;
              s.wait = 0;
              s.saved = null;
            } else {
              s.stoppedAfter = epoch + 1;
              stopping.push(m);
              // A stopped member stands still while the others train on.
              optimizer.setLearningRate(0, m);
              shared.batchNorm?.hold?.([m]);
            }
          }
        }
        if (epoch >= s.lastEpoch && !stopping.includes(m)) {
          stopping.push(m);
          optimizer.setLearningRate(0, m);
          shared.batchNorm?.hold?.([m]);
        }
      }
      return stopping;
    },
    async epochDone(epoch, loop) {
      const c = shared.checkpoint;
      if (c && c.every > 0 && (epoch + 1) % c.every === 0) await c.save(capture(loop));
    },
  };
  try {
    if (resume) restoreState(resume);
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
      hooks,
      ...(shared.reseed ? { reseed: shared.reseed } : {}),
      ...(resume ? { resume: resume.loop } : {}),
      ...(shared.halves ? { halves: shared.halves } : {}),
      ...(shared.external ? { external: shared.external } : {}),
    });
    // Early stopping without averaging (or before it): the best raw weights come back.
    const restore = (which: 'raw' | 'averaged') => {
      const ms = states.flatMap((s, m) =>
        s.stoppedAfter !== null && s.saved === which ? [m] : [],
      );
      if (!ms.length || !bestWeights) return;
      tf.tidy(() => {
        weights.forEach((v, i) => {
          const best = bestWeights![i]!;
          v.assign(k > 1 ? tf.where(membersMask(k, ms, v.rank), best, v) : best);
        });
      });
    };
    restore('raw');
    const raw = val?.size ? await evaluate() : null;
    const snapshots = members.map((_, i) => averager?.count(i) ?? 0);
    const keepBest = members.some((m) => m.keep === 'best');
    const rawWeights = shared.keepRaw || keepBest ? weights.map((v) => v.clone()) : null;
    let averaged: Evaluation[] | null = null;
    const averagedMembers = members.flatMap((_, i) => (snapshots[i]! > 0 ? [i] : []));
    const bn = shared.batchNorm?.layers.length ? shared.batchNorm : null;
    if (averager && averagedMembers.length) {
      averager.apply();
      restore('averaged');
      // The statistics training left belong to the raw weights: recompute them for the average.
      if (bn) await bn.refresh(train, shared.batchSize, averagedMembers);
      if (val?.size) averaged = await evaluate();
    }
    // keep best: SWAG's model average joins the candidates where it was collected, unless
    // early stopping kept an earlier average than the one its moments centre on.
    const swagMembers = members.flatMap((m, i) =>
      m.keep === 'best' && swag && swag.count(i) > 0 && states[i]!.stoppedAfter === null ? [i] : [],
    );
    const swagged =
      swagMembers.length && val?.size
        ? await swagAverage(swag!, swagMembers, members, shared, () => evaluate(), val)
        : null;
    const candidates = members.map((m, i): WeightsCandidate[] | null => {
      if (m.keep !== 'best' || !raw) return null;
      const of = (weights: CandidateKind, e: Evaluation, samples?: number): WeightsCandidate => ({
        weights,
        loss: e.loss,
        acc: e.acc,
        ...(samples ? { samples } : {}),
      });
      return [
        of('raw', raw[i]!),
        ...(averaged && snapshots[i]! > 0 ? [of(m.swa!.kind ?? 'swa', averaged[i]!)] : []),
        ...(swagged?.[i] ? [of('swag', swagged[i]!, KEEP_SWAG_SAMPLES)] : []),
      ];
    });
    // By validation loss; a tie goes to the later candidate (averaged over raw).
    const chosen = candidates.map((c) =>
      c ? c.reduce((a, b) => (b.loss <= a.loss ? b : a)).weights : null,
    );
    // Back to the raw weights (and their BN statistics) where they won.
    const backToRaw = members.flatMap((_, i) =>
      chosen[i] === 'raw' && snapshots[i]! > 0 ? [i] : [],
    );
    if (backToRaw.length && rawWeights) {
      tf.tidy(() => {
        weights.forEach((v, i) => {
          const r = rawWeights[i]!;
          v.assign(k > 1 ? tf.where(membersMask(k, backToRaw, v.rank), r, v) : r);
        });
      });
    }
    const handBack = shared.keepRaw ? rawWeights : null;
    if (!handBack && rawWeights) tf.dispose(rawWeights);
    return members.map((m, i) => {
      const error = diverged[i];
      if (error) return error;
      const s = states[i]!;
      const a = s.plan.averaging;
      const has = snapshots[i]! > 0;
      return {
        history: histories[i]!,
        raw: raw?.[i] ?? null,
        swa: has ? (averaged?.[i] ?? null) : null,
        average: m.swa ? (m.swa.kind ?? 'swa') : null,
        snapshots: snapshots[i]!,
        kept: has && !backToRaw.includes(i) ? (m.swa!.kind ?? 'swa') : 'raw',
        rawWeights: handBack,
        stoppedAfter: s.stoppedAfter,
        averagingFrom: a && has ? a.startEpoch + 1 : null,
        swag: swag && swag.count(i) > 0 ? swag.state(i) : null,
        bnRefreshed: bn && has ? [...bn.layers] : [],
        candidates: candidates[i] ?? null,
        chosen: chosen[i] ?? null,
      };
    });
  } finally {
    if (bestWeights) tf.dispose(bestWeights);
    averager?.dispose();
    swag?.dispose();
    optimizer.dispose();
  }
}

/**
 * `--keep best`'s SWAG candidate: each of `list`'s validation figures under the Bayesian
 * model average of KEEP_SWAG_SAMPLES weight sets drawn from its SWAG posterior (sample s
 * seeded from the member's seed and s, as `predict --samples`), the probabilities averaged
 * and the loss their cross-entropy (negativeLogLikelihood: probabilities floored at 1e-7, as Keras). The samples
 * keep the BN statistics of the SWA mean (refreshed once, not per sample). The variables
 * hold the SWA means again afterwards. Other members get null.
 */
async function swagAverage(
  swag: SwagCollector,
  list: readonly number[],
  members: readonly StageMember[],
  shared: StageShared,
  evaluate: () => Promise<Evaluation[]>,
  val: Batches,
): Promise<(Evaluation | null)[]> {
  const k = members.length;
  const stacked = shared.stacked ?? false;
  const means = shared.variables.map((v) => v.clone());
  const posteriors = list.map((m) => new SwagPosterior(swag.state(m)));
  const sums = members.map(() => new Float64Array(0));
  try {
    for (let s = 0; s < KEEP_SWAG_SAMPLES; s++) {
      tf.tidy(() => {
        const values = shared.variables.map((_, i) => means[i]! as tf.Tensor);
        list.forEach((m, j) => {
          const theta = posteriors[j]!.sample(
            seededNormal(sampleSeed(members[m]!.seed, s)),
            SWAG_SCALE,
          );
          // SWAG's state keeps the member axis only with more than one member.
          theta.forEach((t, i) => {
            values[i] =
              stacked && k > 1
                ? tf.where(membersMask(k, [m], t.rank + 1), tf.expandDims(t, 0), values[i]!)
                : tf.reshape(t, shared.variables[i]!.shape);
          });
        });
        shared.variables.forEach((v, i) => {
          v.assign(values[i]!);
        });
      });
      const evals = await evaluate();
      for (const m of list) {
        const p = evals[m]!.probs;
        if (!sums[m]!.length) sums[m] = new Float64Array(p.length);
        for (let j = 0; j < p.length; j++) sums[m]![j]! += p[j]!;
      }
    }
  } finally {
    shared.variables.forEach((v, i) => {
      v.assign(means[i]!);
    });
    tf.dispose(means);
    for (const p of posteriors) p.dispose();
  }
  const c = shared.numClasses;
  return members.map((_, m) => {
    if (!list.includes(m)) return null;
    const probs = Float32Array.from(sums[m]!, (x) => x / KEEP_SWAG_SAMPLES);
    let correct = 0;
    for (let r = 0; r < val.size; r++) if (argmax(probs, r * c, c) === val.labels[r]) correct++;
    return { loss: negativeLogLikelihood(probs, val.labels, c), acc: correct / val.size, probs };
  });
}

/** A boolean [K, 1, …] mask with `members` on. */
function membersMask(k: number, members: readonly number[], rank: number): tf.Tensor {
  const on = new Array<boolean>(k).fill(false);
  for (const m of members) on[m] = true;
  return tf.tensor(on, [k, ...new Array<number>(Math.max(0, rank - 1)).fill(1)], 'bool');
}

function memberMask(k: number, member: number, rank: number): tf.Tensor {
  return membersMask(k, [member], rank);
}
