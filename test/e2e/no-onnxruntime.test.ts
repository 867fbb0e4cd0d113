import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { runCli, useColourWorkspace } from '../helpers.js';

// A machine where onnxruntime-node does not load (no prebuilt binding for the platform, an
// install that failed): the CLI still starts, `auto` computes on tfjs and says why.
const HIDE = [
  '--import',
  path.join(path.dirname(fileURLToPath(import.meta.url)), 'no-onnxruntime.js'),
];
const MISSING = "Cannot find module '../bin/napi-v6/linux/x64/onnxruntime_binding.node'";

describe('without onnxruntime-node', () => {
  const ws = useColourWorkspace('no-ort', 4);

  test('doctor reports it and what auto runs instead, and exits 0', async () => {
    const out = await runCli(['doctor', '--json'], ws.dir, HIDE);
    assert.equal(out.code, 0, out.stderr);
    const report = JSON.parse(out.stdout);
    assert.equal(report.onnxRuntime.loads, false);
    assert.equal(report.onnxRuntime.reason, MISSING);
    assert.equal(report.onnxRuntime.cuda.present, false);
    assert.equal(report.engine.auto, 'tfjs');
    assert.equal(report.engine.autoWhy, 'onnxruntime-node does not load');
    assert.deepEqual(report.problems, []);
    const text = await runCli(['doctor'], ws.dir, HIDE);
    assert.match(
      text.stdout,
      /frozen passes on tfjs \(--engine auto: onnxruntime-node does not load\)/,
    );
  });

  test('train with --engine auto runs both stages on tfjs and records why', async () => {
    const run = path.join(ws.dir, 'run-auto');
    // A cache of its own: every image is embedded here, whatever ran before.
    const cache = path.join(ws.dir, 'cache-auto');
    const args = ['train', '--data', ws.data, '--out', run, '--backbone', ws.backbone];
    const stages = ['--epochs', '2', '--finetune-epochs', '1', '--unfreeze', 'from:conv2'];
    const out = await runCli([...args, ...stages, '--cache-dir', cache], ws.dir, HIDE);
    assert.equal(out.code, 0, out.stderr);
    assert.doesNotMatch(out.stderr, /\n\s+at /, 'no stack trace');
    const summary = JSON.parse(await readFile(path.join(run, 'summary.json'), 'utf8'));
    assert.equal(summary.engine, 'tfjs');
    assert.equal(summary.engineReason, `ONNX Runtime does not load (${MISSING})`);
    // The fine-tune stage's steps, which run on ONNX Runtime where it loads.
    assert.deepEqual(summary.stages.finetune.steps, {
      engine: 'tfjs',
      reason: `ONNX Runtime does not load (${MISSING})`,
    });
  });

  test('--engine onnx fails with one line naming the reason', async () => {
    const run = path.join(ws.dir, 'run-onnx');
    const cache = path.join(ws.dir, 'cache-onnx');
    const args = ['train', '--data', ws.data, '--out', run, '--backbone', ws.backbone];
    const out = await runCli(
      [...args, '--engine', 'onnx', '--epochs', '2', '--cache-dir', cache],
      ws.dir,
      HIDE,
    );
    assert.equal(out.code, 2);
    const last = out.stderr.trim().split('\n').at(-1);
    assert.equal(
      last,
      `finetune: Cannot use --engine onnx: ONNX Runtime does not load (${MISSING})`,
    );
    assert.doesNotMatch(out.stderr, /\n\s+at /, 'no stack trace');
  });
});
