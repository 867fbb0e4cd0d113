import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { parseDuration } from '../../src/cli/duration.js';
import { FinetuneError } from '../../src/errors.js';

const DAY = 24 * 60 * 60 * 1000;

describe('parseDuration', () => {
  test('units', () => {
    assert.equal(parseDuration('10s'), 10_000);
    assert.equal(parseDuration('45m'), 45 * 60_000);
    assert.equal(parseDuration('12h'), 12 * 3_600_000);
    assert.equal(30 * DAY, 30 * DAY);
    assert.equal(parseDuration('1.5h'), 5_400_000);
    assert.equal(parseDuration('0d'), 0);
  });

  test('bad values use the project wording', () => {
    for (const bad of ['30', 'd', '30x', '-1d', '', '3 days', '1e3s']) {
      assert.throws(
        () => parseDuration(bad),
        (err: unknown) =>
          err instanceof FinetuneError &&
          err.message ===
            `Expected a duration such as 30d, 12h or 45m for older-than but received '${bad}'`,
        bad,
      );
    }
  });
});
