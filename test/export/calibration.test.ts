import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  brierScore,
  CALIBRATION_BINS,
  calibrationErrors,
  calibrationReport,
  NLL_EPSILON,
  negativeLogLikelihood,
  reliabilityBins,
} from '../../src/export/calibration.js';

/** Float32 inputs such as 0.6 are off by up to 3e-8 from the decimal used by hand. */
function near(actual: number | null, expected: number, tol = 1e-6): void {
  assert.ok(actual !== null, `expected ${expected}, got null`);
  assert.ok(Math.abs(actual - expected) <= tol, `expected ${expected}, got ${actual}`);
}

test('4 images, 3 classes, 15 bins: NLL, Brier, ECE, MCE and the table by hand', () => {
  // row  probabilities        true  top-1  conf  correct  bin (of 15, width 1/15)
  //  0   0.6  0.3  0.1          0     0     0.6   yes      8 (0.5333, 0.6]: 0.6 = 9/15, an edge
  //  1   0.2  0.7  0.1          2     1     0.7   no      10 (0.6667, 0.7333]
  //  2   0.05 0.05 0.9          2     2     0.9   yes     13 (0.8667, 0.9333]
  //  3   0.5  0.25 0.25         1     0     0.5   no       7 (0.4667, 0.5333]
  const probs = new Float32Array([0.6, 0.3, 0.1, 0.2, 0.7, 0.1, 0.05, 0.05, 0.9, 0.5, 0.25, 0.25]);
  const labels = [0, 2, 2, 1];
  const r = calibrationReport(probs, labels, 3);
  // NLL = −(ln 0.6 + ln 0.1 + ln 0.9 + ln 0.25) / 4
  //     = (0.510826 + 2.302585 + 0.105361 + 1.386294) / 4 = 1.076266
  near(r.nll, 1.0762664);
  assert.equal(r.nllEpsilon, NLL_EPSILON);
  // Brier: row 0 (0.6−1)² + 0.3² + 0.1² = 0.26; row 1 0.2² + 0.7² + (0.1−1)² = 1.34;
  // row 2 0.05² + 0.05² + (0.9−1)² = 0.015; row 3 0.5² + (0.25−1)² + 0.25² = 0.875;
  // mean 2.49 / 4 = 0.6225
  near(r.brier, 0.6225);
  // One image per bin; gaps |acc − conf|: 0.4, 0.7, 0.1, 0.5.
  // ECE = (0.4 + 0.7 + 0.1 + 0.5) / 4 = 0.425; MCE = 0.7
  near(r.ece, 0.425);
  near(r.mce, 0.7);
  assert.equal(r.bins.length, CALIBRATION_BINS);
  const filled = r.bins.flatMap((b, i) => (b.count ? [i] : []));
  assert.deepEqual(filled, [7, 8, 10, 13]);
  const b8 = r.bins[8]!;
  near(b8.lo, 8 / 15);
  near(b8.hi, 0.6);
  assert.equal(b8.count, 1);
  near(b8.confidence, 0.6);
  assert.equal(b8.accuracy, 1);
  assert.equal(r.bins[10]!.accuracy, 0);
  near(r.bins[10]!.confidence, 0.7);
  // An empty bin has a range and no figures.
  assert.deepEqual(r.bins[9], {
    lo: r.bins[8]!.hi,
    hi: r.bins[10]!.lo,
    count: 0,
    confidence: null,
    accuracy: null,
  });
  assert.equal(r.bins[0]!.lo, 0);
  assert.equal(r.bins[14]!.hi, 1);
  // The parts agree with the whole.
  assert.equal(negativeLogLikelihood(probs, labels, 3), r.nll);
  assert.equal(brierScore(probs, labels, 3), r.brier);
  assert.deepEqual(reliabilityBins(probs, labels, 3), r.bins);
  assert.deepEqual(calibrationErrors(r.bins), { ece: r.ece, mce: r.mce });
});

test('edges: a confidence on an edge counts in the bin below (lo, hi]; 1 in the last bin; p = 0 floored', () => {
  // 4 bins, so the edges 0, 0.25, 0.5, 0.75, 1 and every value here are exact in float32.
  // row  probabilities   true  top-1  conf   correct  bin
  //  A   0.5   0.5        0     0     0.5    yes      1 (0.25, 0.5]  (tie: the first class)
  //  B   0.25  0.75       1     1     0.75   yes      2 (0.5, 0.75]
  //  C   1     0          1     0     1      no       3 (0.75, 1]
  //  D   0.125 0.875      1     1     0.875  yes      3 (0.75, 1]
  // (torchmetrics 1.x bins [lo, hi) and would put A in 2, B in 3 and C in a 5th bin of its own.)
  const probs = new Float32Array([0.5, 0.5, 0.25, 0.75, 1, 0, 0.125, 0.875]);
  const labels = [0, 1, 1, 1];
  const r = calibrationReport(probs, labels, 2, { bins: 4 });
  assert.deepEqual(r.bins, [
    { lo: 0, hi: 0.25, count: 0, confidence: null, accuracy: null },
    { lo: 0.25, hi: 0.5, count: 1, confidence: 0.5, accuracy: 1 },
    { lo: 0.5, hi: 0.75, count: 1, confidence: 0.75, accuracy: 1 },
    // confidence (1 + 0.875) / 2 = 0.9375, accuracy 1/2
    { lo: 0.75, hi: 1, count: 2, confidence: 0.9375, accuracy: 0.5 },
  ]);
  // ECE = 1/4·|1 − 0.5| + 1/4·|1 − 0.75| + 2/4·|0.5 − 0.9375| = 0.125 + 0.0625 + 0.21875
  assert.equal(r.ece, 0.40625);
  assert.equal(r.mce, 0.5);
  // NLL: C's true class has probability 0, floored at 1e-7:
  // (ln 2 + ln 4/3 + ln 1e7 + ln 8/7) / 4 = (0.693147 + 0.287682 + 16.118096 + 0.133531) / 4
  near(r.nll, 4.3081141);
  // Brier: A 0.25 + 0.25; B 0.0625 + 0.0625; C 1 + 1; D 2·0.015625 → 2.65625 / 4
  assert.equal(r.brier, 0.6640625);
  // Without the floor C alone makes the mean infinite.
  assert.equal(negativeLogLikelihood(probs, labels, 2, 0), Number.POSITIVE_INFINITY);

  // 15 bins: 0.6 in float32 is 0.6000000238 > 0.6 in float64, but the edges are float32 too,
  // so it still lies on the edge 9/15 and counts in bin 8, not 9; 2/3 likewise in bin 9.
  const onEdges = reliabilityBins(new Float32Array([0.6, 0.4, 2 / 3, 1 / 3]), [0, 0], 2);
  assert.equal(onEdges[8]!.count, 1);
  assert.equal(onEdges[9]!.count, 1);
  assert.equal(onEdges[10]!.count, 0);
  // Just above an edge moves up a bin.
  const above = reliabilityBins(new Float32Array([0.6000001, 0.3999999]), [0], 2);
  assert.equal(above[9]!.count, 1);
});

test('perfectly calibrated predictions have ECE and MCE 0', () => {
  // Four images at confidence 0.75 (bin 11, (0.7333, 0.8]), three of them right:
  // accuracy 0.75 = confidence 0.75.
  const probs = new Float32Array([0.75, 0.25, 0.75, 0.25, 0.75, 0.25, 0.75, 0.25]);
  const r = calibrationReport(probs, [0, 0, 0, 1], 2);
  assert.equal(r.ece, 0);
  assert.equal(r.mce, 0);
  assert.deepEqual(r.bins[11], {
    lo: Math.fround(11 / 15),
    hi: Math.fround(12 / 15),
    count: 4,
    confidence: 0.75,
    accuracy: 0.75,
  });
  // NLL = (3·ln 4/3 + ln 4) / 4 = (0.863046 + 1.386294) / 4 = 0.562335
  near(r.nll, 0.5623351);
  // Brier: right rows 0.0625 + 0.0625, the wrong one 0.5625 + 0.5625 → (3·0.125 + 1.125) / 4
  assert.equal(r.brier, 0.375);
  // Certain and right: every figure 0.
  const sure = calibrationReport(new Float32Array([1, 0, 0, 0, 0, 1]), [0, 2], 3);
  assert.deepEqual([sure.nll, sure.brier, sure.ece, sure.mce], [0, 0, 0, 0]);
});

test('bad input is named: shape, labels, probabilities, bins, epsilon', () => {
  const p = new Float32Array([0.5, 0.25, 0.25, 0.1, 0.2, 0.7]);
  assert.throws(() => calibrationReport(p, [0, 1], 0), {
    message: 'Expected a positive integer for classes but received 0',
  });
  assert.throws(() => calibrationReport(p.subarray(1), [0, 1], 3), {
    message: 'Expected 6 values (2 labels × 3 classes) for probabilities but received 5',
  });
  assert.throws(() => calibrationReport(new Float32Array(0), [], 3), {
    message: 'Expected at least one label for labels but received []',
  });
  assert.throws(() => brierScore(p, [0, 3], 3), {
    message: 'Expected an integer from 0 to 2 for labels[1] but received 3',
  });
  assert.throws(() => negativeLogLikelihood(p, [0, 0.5], 3), {
    message: 'Expected an integer from 0 to 2 for labels[1] but received 0.5',
  });
  const nan = Float32Array.from(p);
  nan[4] = Number.NaN;
  assert.throws(() => reliabilityBins(nan, [0, 1], 3), {
    message: 'Expected a number from 0 to 1 for probabilities[4] but received NaN',
  });
  const logits = Float32Array.from(p);
  logits[0] = 2.5;
  assert.throws(() => calibrationReport(logits, [0, 1], 3), {
    message: 'Expected a number from 0 to 1 for probabilities[0] but received 2.5',
  });
  assert.throws(() => reliabilityBins(p, [0, 1], 3, 0), {
    message: 'Expected a positive integer for bins but received 0',
  });
  assert.throws(() => negativeLogLikelihood(p, [0, 1], 3, 1), {
    message: 'Expected a number from 0 to 1 (exclusive) for epsilon but received 1',
  });
});
