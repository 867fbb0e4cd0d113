import { FinetuneError, invalidOption } from '../errors.js';
import { argmax } from '../train/fit.js';
import * as is from '../util/is.js';

/**
 * Calibration of a classifier's probabilities: how far its confidence can be taken at its
 * word. Pure functions over `probabilities` (a Float32Array of n rows × k classes, row-major,
 * as a softmax model outputs them) and `labels` (the true class of each row), independent of
 * any model or command, so a training-side script can score weights the same way
 * `finetune evaluate` does.
 */

/** Equal-width confidence bins of the reliability table and ECE (Guo et al. 2017 use 15). */
export const CALIBRATION_BINS = 15;

/**
 * The floor put under the true class's probability before taking its log: Keras's and
 * tfjs-layers' epsilon. One confidently wrong image (probability 0 in float32) would make
 * the mean infinite; with the floor it adds at most −ln 1e-7 ≈ 16.12.
 */
export const NLL_EPSILON = 1e-7;

/**
 * One row of the reliability table: the images whose top-1 confidence c lies in
 * (lo, hi] (the first bin also takes c = 0).
 */
export interface ReliabilityBin {
  readonly lo: number;
  readonly hi: number;
  readonly count: number;
  /** Mean top-1 confidence of the bin's images; null when the bin is empty. */
  readonly confidence: number | null;
  /** Fraction of the bin's images whose top-1 class is the true one; null when empty. */
  readonly accuracy: number | null;
}

export interface CalibrationReport {
  /** Mean of −ln max(p_true, nllEpsilon). */
  readonly nll: number;
  readonly nllEpsilon: number;
  /** Mean over images of Σ_k (p_k − y_k)², y one-hot: from 0 to 2, not divided by k. */
  readonly brier: number;
  /** Expected calibration error: Σ_b (count_b / n) · |accuracy_b − confidence_b|. */
  readonly ece: number;
  /** Maximum calibration error: the largest |accuracy_b − confidence_b| of a non-empty bin. */
  readonly mce: number;
  /** The reliability table, one entry per bin, empty bins included. */
  readonly bins: readonly ReliabilityBin[];
}

/**
 * Checks that `probabilities` holds labels.length × classes numbers from 0 to 1 and that
 * every label is a class index; returns the number of rows.
 */
function checkInputs(
  probabilities: Float32Array,
  labels: ArrayLike<number>,
  classes: number,
): number {
  is.positiveInteger('classes', classes);
  const n = labels.length;
  if (n === 0) throw invalidOption('labels', 'at least one label', []);
  if (probabilities.length !== n * classes) {
    throw new FinetuneError(
      `Expected ${n * classes} values (${n} labels × ${classes} classes) for probabilities but received ${probabilities.length}`,
      { option: 'probabilities' },
    );
  }
  for (let i = 0; i < n; i++) is.integerInRange(`labels[${i}]`, labels[i], 0, classes - 1);
  for (let j = 0; j < probabilities.length; j++) {
    is.numberInRange(`probabilities[${j}]`, probabilities[j], 0, 1);
  }
  return n;
}

/**
 * Mean negative log-likelihood of the true class, with each probability floored at
 * `epsilon` (see NLL_EPSILON); probabilities are taken as given, not renormalised.
 *
 * @example negativeLogLikelihood(new Float32Array([0.5, 0.5, 0.25, 0.75]), [0, 1], 2) // (ln 2 + ln 4/3) / 2
 */
export function negativeLogLikelihood(
  probabilities: Float32Array,
  labels: ArrayLike<number>,
  classes: number,
  epsilon: number = NLL_EPSILON,
): number {
  const n = checkInputs(probabilities, labels, classes);
  is.numberInRange('epsilon', epsilon, 0, 1, true);
  let sum = 0;
  for (let i = 0; i < n; i++) {
    sum -= Math.log(Math.max(probabilities[i * classes + labels[i]!]!, epsilon));
  }
  return sum / n;
}

/**
 * Multi-class Brier score: the mean over images of Σ_k (p_k − y_k)² with y the one-hot true
 * class, so it runs from 0 to 2. Some libraries divide by the number of classes as well;
 * this one does not.
 *
 * @example brierScore(new Float32Array([1, 0, 0.5, 0.5]), [0, 0], 2) // (0 + 0.5) / 2 = 0.25
 */
export function brierScore(
  probabilities: Float32Array,
  labels: ArrayLike<number>,
  classes: number,
): number {
  const n = checkInputs(probabilities, labels, classes);
  let sum = 0;
  for (let i = 0; i < n; i++) {
    for (let k = 0; k < classes; k++) {
      const d = probabilities[i * classes + k]! - (k === labels[i] ? 1 : 0);
      sum += d * d;
    }
  }
  return sum / n;
}

/**
 * The reliability table: `bins` equal-width bins of top-1 confidence over [0, 1], each
 * (lo, hi] as in Guo et al.'s code, so a confidence exactly on an edge counts in the bin
 * below it; the first bin also takes 0. The edges are i / bins rounded to float32, the
 * precision of the probabilities, so a confidence that reads 0.6 lies on the edge 0.6.
 * The top-1 class is the first of equal maxima, as evaluate's predictions.
 *
 * @example reliabilityBins(new Float32Array([0.6, 0.4]), [0], 2)[8] // (0.5333, 0.6]: count 1, accuracy 1
 */
export function reliabilityBins(
  probabilities: Float32Array,
  labels: ArrayLike<number>,
  classes: number,
  bins: number = CALIBRATION_BINS,
): ReliabilityBin[] {
  const n = checkInputs(probabilities, labels, classes);
  is.positiveInteger('bins', bins);
  const edges = Array.from({ length: bins + 1 }, (_, i) => Math.fround(i / bins));
  const count = new Array<number>(bins).fill(0);
  const confidence = new Array<number>(bins).fill(0);
  const correct = new Array<number>(bins).fill(0);
  for (let i = 0; i < n; i++) {
    const top = argmax(probabilities, i * classes, classes);
    const c = probabilities[i * classes + top]!;
    // ceil(c·bins) − 1 is the bin up to rounding next to an edge; the float32 edges decide.
    let b = Math.min(bins - 1, Math.max(0, Math.ceil(c * bins) - 1));
    while (b > 0 && c <= edges[b]!) b--;
    while (b < bins - 1 && c > edges[b + 1]!) b++;
    count[b]!++;
    confidence[b]! += c;
    if (top === labels[i]) correct[b]!++;
  }
  return count.map((m, b) => ({
    lo: edges[b]!,
    hi: edges[b + 1]!,
    count: m,
    confidence: m ? confidence[b]! / m : null,
    accuracy: m ? correct[b]! / m : null,
  }));
}

/**
 * Expected and maximum calibration error from a reliability table: ECE weighs each bin's
 * |accuracy − confidence| by its share of the images (torchmetrics' norm 'l1'), MCE is the
 * largest gap (norm 'max'); empty bins count for nothing.
 *
 * @example calibrationErrors(reliabilityBins(probs, labels, k)) // { ece: 0.05, mce: 0.2 }
 */
export function calibrationErrors(bins: readonly ReliabilityBin[]): { ece: number; mce: number } {
  const n = bins.reduce((a, b) => a + b.count, 0);
  let ece = 0;
  let mce = 0;
  for (const b of bins) {
    if (!b.count) continue;
    const gap = Math.abs(b.accuracy! - b.confidence!);
    ece += (b.count / n) * gap;
    mce = Math.max(mce, gap);
  }
  return { ece, mce };
}

export interface CalibrationOptions {
  /** Confidence bins. Default 15 (CALIBRATION_BINS). */
  bins?: number;
  /** Floor under the true class's probability in the NLL. Default 1e-7 (NLL_EPSILON). */
  nllEpsilon?: number;
}

/**
 * NLL, Brier score, ECE, MCE and the reliability table of one set of predictions.
 *
 * @example
 * const probs = new Float32Array([0.9, 0.1, 0.2, 0.8]); // 2 images × 2 classes
 * const { ece, bins } = calibrationReport(probs, [0, 0], 2);
 */
export function calibrationReport(
  probabilities: Float32Array,
  labels: ArrayLike<number>,
  classes: number,
  options: CalibrationOptions = {},
): CalibrationReport {
  const nllEpsilon = options.nllEpsilon ?? NLL_EPSILON;
  const bins = reliabilityBins(probabilities, labels, classes, options.bins ?? CALIBRATION_BINS);
  return {
    nll: negativeLogLikelihood(probabilities, labels, classes, nllEpsilon),
    nllEpsilon,
    brier: brierScore(probabilities, labels, classes),
    ...calibrationErrors(bins),
    bins,
  };
}
