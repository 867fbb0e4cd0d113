import assert from 'node:assert/strict';
import { Writable } from 'node:stream';
import { test } from 'node:test';
import { createOutput } from '../../src/cli/output.js';

function sink(tty: boolean): Writable & { text: () => string } {
  let text = '';
  const s = new Writable({
    write(chunk, _enc, done) {
      text += String(chunk);
      done();
    },
  }) as Writable & { text: () => string; isTTY?: boolean; columns?: number };
  s.isTTY = tty;
  s.columns = 100;
  s.text = () => text;
  return s;
}

test('on a terminal: a progress bar, with warnings printed above it', () => {
  const err = sink(true);
  const out = createOutput({}, err);
  out.progress('embedding', 0, 10);
  out.progress('embedding', 4, 10);
  out.warn('skipped a.jpg: not an image');
  out.progress('embedding', 10, 10);
  out.endProgress();
  const text = err.text();
  assert.match(text, /embedding \[=+-*\] 10\/10/);
  assert.match(text, /skipped a\.jpg: not an image\n/);
});

test('without a terminal: a line per 10%, no control characters', () => {
  const err = sink(false);
  const out = createOutput({}, err);
  for (let i = 0; i <= 100; i++) out.progress('embedding', i, 100);
  out.endProgress();
  const lines = err.text().trim().split('\n');
  assert.equal(lines.length, 11);
  assert.match(lines[10]!, /^embedding 100\/100 \(100%\)/);
  assert.ok(!err.text().includes('\u001b'), 'no escape sequences');
});

test('--quiet and --json print no progress', () => {
  for (const o of [{ quiet: true }, { json: true }]) {
    const err = sink(true);
    const out = createOutput(o, err);
    out.progress('embedding', 5, 10);
    out.info('backend: wasm');
    out.endProgress();
    assert.equal(err.text(), '');
  }
});
