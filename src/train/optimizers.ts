import * as tf from '@tensorflow/tfjs';
import { oneOf } from '../util/is.js';

export type OptimizerName = 'adam' | 'sgd' | 'momentum';

/** Optimizers by name; momentum is SGD with Nesterov-free momentum 0.9 (PyTorch/Keras default pairing). */
export const OPTIMIZERS: Readonly<Record<OptimizerName, (lr: number) => tf.Optimizer>> =
  Object.freeze({
    adam: (lr: number) => tf.train.adam(lr),
    sgd: (lr: number) => tf.train.sgd(lr),
    momentum: (lr: number) => tf.train.momentum(lr, 0.9),
  });

export function createOptimizer(name: string, lr: number): tf.Optimizer {
  return oneOf('optimizer', name, OPTIMIZERS)(lr);
}

/**
 * Changes an optimizer's learning rate in place. SGD-family optimizers cache `-lr` as a
 * tensor (setLearningRate replaces it); Adam reads `learningRate` at every step.
 */
export function setLearningRate(optimizer: tf.Optimizer, lr: number): void {
  const o = optimizer as tf.Optimizer & {
    setLearningRate?: (lr: number) => void;
    learningRate?: number;
  };
  if (typeof o.setLearningRate === 'function') o.setLearningRate(lr);
  else o.learningRate = lr;
}
