import assert from 'node:assert/strict';
import { test } from 'node:test';
import { classificationReport } from '../../src/export/metrics.js';

test('accuracy, per-class P/R/F1 and confusion match hand-computed values', () => {
  const truth = [0, 0, 0, 1, 1, 2];
  const pred = [0, 0, 1, 1, 0, 1];
  const r = classificationReport(truth, pred, ['a', 'b', 'c']);
  assert.equal(r.accuracy, 3 / 6);
  assert.deepEqual(r.confusion, [
    [2, 1, 0],
    [1, 1, 0],
    [0, 1, 0],
  ]);
  const [a, b, c] = r.perClass;
  assert.deepEqual([a!.precision, a!.recall, a!.support], [2 / 3, 2 / 3, 3]);
  assert.ok(Math.abs(a!.f1 - 2 / 3) < 1e-12);
  assert.deepEqual([b!.precision, b!.recall], [1 / 3, 1 / 2]);
  assert.ok(Math.abs(b!.f1 - 0.4) < 1e-12);
  assert.deepEqual([c!.precision, c!.recall, c!.f1], [0, 0, 0]);
  assert.ok(Math.abs(r.macro.f1 - (2 / 3 + 0.4) / 3) < 1e-12);
});
