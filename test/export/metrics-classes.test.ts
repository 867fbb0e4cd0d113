import assert from 'node:assert/strict';
import { test } from 'node:test';
import { classificationReport } from '../../src/export/metrics.js';

const close = (a: number, b: number): boolean => Math.abs(a - b) < 1e-12;

test('macro averages run over every class of the model; classes without examples are named', () => {
  // 'b' has no true example but is predicted once; 'd' is neither.
  const r = classificationReport([0, 0, 2], [0, 1, 2], ['a', 'b', 'c', 'd']);
  assert.deepEqual(r.withoutExamples, ['b', 'd']);
  assert.deepEqual(
    r.perClass.map((m) => [m.precision, m.recall, m.support]),
    [
      [1, 0.5, 2],
      [0, 0, 0],
      [1, 1, 1],
      [0, 0, 0],
    ],
  );
  assert.ok(close(r.macro.precision, 2 / 4));
  assert.ok(close(r.macro.recall, 1.5 / 4));
  assert.ok(close(r.macro.f1, (2 / 3 + 1) / 4));
  assert.equal(r.accuracy, 2 / 3);
});

test('every class present: nothing named, macro over all of them', () => {
  const r = classificationReport([0, 1], [0, 1], ['a', 'b']);
  assert.deepEqual(r.withoutExamples, []);
  assert.deepEqual(r.macro, { precision: 1, recall: 1, f1: 1 });
});
