import * as tf from '@tensorflow/tfjs';
import { oneOf } from '../util/is.js';

export type OptimizerName = 'adam' | 'sgd' | 'momentum';

/** One variable's update: its gradient, slots and the (negated) learning rate, broadcastable to it. */
interface UpdateArgs {
  readonly value: tf.Variable;
  readonly gradient: tf.Tensor;
  readonly negLr: tf.Tensor;
  /** This variable's slots, created on first use (zeros like the variable). */
  slot(name: string): tf.Variable;
}

/** An update rule: per-step state (Adam's β powers) and the per-variable update. */
interface Rule {
  /** Called once per step before the variables, inside the step's tidy; returns per-step values. */
  step(): Record<string, tf.Tensor>;
  update(args: UpdateArgs, stepValues: Record<string, tf.Tensor>): void;
  /** Called once per step after the variables. */
  after(): void;
  /** The rule's own per-step state (Adam's β powers), for checkpoints. */
  readonly state: readonly tf.Variable[];
  dispose(): void;
}

const BETA1 = 0.9;
const BETA2 = 0.999;
const MOMENTUM = 0.9;

/**
 * Adam with tfjs's defaults and arithmetic, op for op (tf.train.adam): the same float32
 * results, with the learning rate as a tensor so that members trained side by side each
 * have their own.
 */
function adam(): Rule {
  const [accBeta1, accBeta2] = tf.tidy(() => [
    tf.variable(tf.scalar(BETA1), false),
    tf.variable(tf.scalar(BETA2), false),
  ]);
  const epsilon = tf.backend().epsilon();
  return {
    step: () => ({ oneMinusAccBeta1: tf.sub(1, accBeta1), oneMinusAccBeta2: tf.sub(1, accBeta2) }),
    update({ value, gradient, negLr, slot }, s) {
      const m = slot('m');
      const v = slot('v');
      const newM = tf.add(tf.mul(m, BETA1), tf.mul(gradient, 1 - BETA1));
      const newV = tf.add(tf.mul(v, BETA2), tf.mul(tf.square(gradient), 1 - BETA2));
      const mHat = tf.div(newM, s['oneMinusAccBeta1']!);
      const vHat = tf.div(newV, s['oneMinusAccBeta2']!);
      m.assign(newM);
      v.assign(newV);
      value.assign(tf.add(tf.mul(tf.div(mHat, tf.add(tf.sqrt(vHat), epsilon)), negLr), value));
    },
    after() {
      accBeta1.assign(tf.mul(accBeta1, BETA1));
      accBeta2.assign(tf.mul(accBeta2, BETA2));
    },
    state: [accBeta1, accBeta2],
    dispose: () => tf.dispose([accBeta1, accBeta2]),
  };
}

/** SGD, with momentum when `momentum` > 0 (tf.train.sgd / tf.train.momentum, op for op). */
function sgd(momentum: number): Rule {
  return {
    step: () => ({}),
    update({ value, gradient, negLr, slot }) {
      if (momentum > 0) {
        const acc = slot('momentum');
        const next = tf.add(tf.mul(momentum, acc), gradient);
        acc.assign(next);
        value.assign(tf.add(tf.mul(negLr, next), value));
      } else value.assign(tf.add(tf.mul(negLr, gradient), value));
    },
    after: () => undefined,
    state: [],
    dispose: () => undefined,
  };
}

/** Optimizers by name; momentum is SGD with Nesterov-free momentum 0.9 (PyTorch/Keras default pairing). */
export const OPTIMIZERS: Readonly<Record<OptimizerName, () => Rule>> = Object.freeze({
  adam,
  sgd: () => sgd(0),
  momentum: () => sgd(MOMENTUM),
});

/** A StageOptimizer's state (see `getState`). */
export interface OptimizerState {
  readonly lrs: readonly number[];
  readonly tensors: Readonly<Record<string, tf.Tensor>>;
}

/** Options of a StageOptimizer beyond its variables and rates. */
export interface StageOptimizerOptions {
  /**
   * One factor per variable (default 1) multiplying every member's rate for that variable:
   * discriminative learning rates (fastai's parameter groups). A factor of exactly 1 is
   * not multiplied at all, so the update stays bit for bit tfjs's own.
   */
  readonly scales?: readonly number[];
}

/**
 * The optimizer of one training stage. It updates a fixed list of variables and keeps a
 * learning rate per member: with `members` > 1 the variables are stacked (member k's
 * weights at index k of the first axis) and each member steps with its own rate. The
 * arithmetic is tfjs's own optimizers', so one member trains exactly as tf.train.adam,
 * tf.train.sgd or tf.train.momentum would.
 *
 * @example new StageOptimizer('adam', [body, head], 1e-4, { scales: [0.01, 1] }) // body at 1e-6
 */
export class StageOptimizer {
  private readonly rule: Rule;
  private readonly lrs: number[];
  private readonly scales: readonly number[] | null;
  private readonly slots = new Map<string, tf.Variable>();

  constructor(
    name: string,
    private readonly variables: readonly tf.Variable[],
    lr: number | readonly number[],
    options: StageOptimizerOptions = {},
  ) {
    this.rule = oneOf('optimizer', name, OPTIMIZERS)();
    this.lrs = typeof lr === 'number' ? [lr] : [...lr];
    const { scales } = options;
    if (scales) {
      if (scales.length !== variables.length)
        throw new Error(
          `StageOptimizer: ${scales.length} LR scales for ${variables.length} variables`,
        );
      const bad = scales.findIndex((x) => !Number.isFinite(x) || x <= 0);
      if (bad >= 0)
        throw new Error(
          `StageOptimizer: LR scale ${scales[bad]} of variable ${variables[bad]!.name} is not a positive number`,
        );
    }
    this.scales = scales?.some((x) => x !== 1) ? [...scales] : null;
    if (this.lrs.length > 1) {
      for (const v of variables) {
        if (v.shape[0] !== this.lrs.length)
          throw new Error(
            `StageOptimizer: ${this.lrs.length} members but variable ${v.name} has shape [${v.shape}]`,
          );
      }
    }
  }

  get members(): number {
    return this.lrs.length;
  }

  learningRate(member = 0): number {
    return this.lrs[member]!;
  }

  setLearningRate(lr: number, member = 0): void {
    this.lrs[member] = lr;
  }

  /** One step: each variable moves by its gradient (keyed by variable name, as tf.variableGrads gives them). */
  applyGradients(grads: tf.NamedTensorMap): void {
    tf.tidy(() => {
      const stepValues = this.rule.step();
      const k = this.lrs.length;
      const negLrs = k > 1 ? tf.tensor1d(this.lrs.map((lr) => -lr)) : tf.scalar(-this.lrs[0]!);
      this.variables.forEach((value, i) => {
        const gradient = grads[value.name];
        if (!gradient) return;
        const shaped = k > 1 ? negLrs.reshape([k, ...value.shape.slice(1).map(() => 1)]) : negLrs;
        const scale = this.scales?.[i] ?? 1;
        // Not multiplied by 1: a scale of 1 must leave the float path exactly as it was.
        const negLr = scale === 1 ? shaped : tf.mul(shaped, scale);
        this.rule.update(
          { value, gradient, negLr, slot: (name) => this.slot(value, name) },
          stepValues,
        );
      });
      this.rule.after();
    });
  }

  private slot(value: tf.Variable, name: string): tf.Variable {
    const key = `${value.name}/${name}`;
    let slot = this.slots.get(key);
    if (!slot) {
      slot = tf.tidy(() => tf.variable(tf.zerosLike(value), false));
      this.slots.set(key, slot);
    }
    return slot;
  }

  /**
   * Everything a later step depends on, for checkpoints: the members' rates and, by name,
   * the rule's state (`rule/0`, …) and every slot (`slot/<variable index>/<slot name>`:
   * by position, since variable names differ between processes). The tensors are the
   * optimizer's own: read them before the next step, do not dispose them.
   */
  getState(): OptimizerState {
    const tensors: Record<string, tf.Tensor> = {};
    this.rule.state.forEach((v, i) => {
      tensors[`rule/${i}`] = v;
    });
    this.variables.forEach((value, i) => {
      for (const [key, slot] of this.slots) {
        const prefix = `${value.name}/`;
        if (key.startsWith(prefix) && !key.slice(prefix.length).includes('/'))
          tensors[`slot/${i}/${key.slice(prefix.length)}`] = slot;
      }
    });
    return { lrs: [...this.lrs], tensors };
  }

  /** Restores a `getState()` of an optimizer over the same variables (the values are copied). */
  setState(state: OptimizerState): void {
    if (state.lrs.length !== this.lrs.length)
      throw new Error(
        `StageOptimizer: state of ${state.lrs.length} members for ${this.lrs.length}`,
      );
    state.lrs.forEach((lr, m) => {
      this.lrs[m] = lr;
    });
    for (const [key, t] of Object.entries(state.tensors)) {
      const rule = /^rule\/(\d+)$/.exec(key);
      const slot = /^slot\/(\d+)\/(.+)$/.exec(key);
      const target = rule
        ? this.rule.state[Number(rule[1])]
        : slot && this.variables[Number(slot[1])]
          ? this.slot(this.variables[Number(slot[1])]!, slot[2]!)
          : undefined;
      if (!target || !tf.util.arraysEqual(target.shape, t.shape))
        throw new Error(`StageOptimizer: state ${key} [${t.shape}] fits none of its variables`);
      target.assign(t);
    }
  }

  dispose(): void {
    this.rule.dispose();
    tf.dispose([...this.slots.values()]);
    this.slots.clear();
  }
}
