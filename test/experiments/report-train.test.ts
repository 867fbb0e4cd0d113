import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { after, before, test } from 'node:test';
import * as tf from '@tensorflow/tfjs';
import { initBackend } from '../../src/backend/index.js';
import { train } from '../../src/train/train.js';
import { tempDir, writeColourDataset, writeTinyBackbone } from '../helpers.js';

let dir: string;
let cleanup: () => Promise<void>;
let backbone: string;
let data: string;

before(async () => {
  await initBackend('wasm');
  ({ dir, cleanup } = await tempDir('report-train'));
  backbone = await writeTinyBackbone(dir);
  data = path.join(dir, 'data');
  await writeColourDataset(data, 10, {
    red: [220, 30, 30],
    green: [30, 200, 40],
    blue: [20, 40, 230],
  });
});
after(async () => {
  await cleanup();
});

interface Recorded {
  weights: string;
  predictions: { file: string; label: string; predicted: string; confidence: number }[];
}

for (const finetuneEpochs of [0, 2]) {
  test(`train (${finetuneEpochs ? 'with' : 'without'} fine-tune) records each validation image's prediction by the exported weights and writes report.html`, async () => {
    const before = tf.memory().numTensors;
    const out = path.join(dir, `run-${finetuneEpochs}`);
    const summary = await train({
      data,
      out,
      backbone,
      engine: 'tfjs',
      epochs: 6,
      batchSize: 8,
      lr: 0.05,
      valSplit: 0.3,
      finetuneEpochs,
      ...(finetuneEpochs ? { unfreeze: 'from:dw1', finetuneLr: 0.01, finetuneSwaStart: 1 } : {}),
      cache: false,
    });
    assert.equal(tf.memory().numTensors, before);
    const recorded = JSON.parse(
      await readFile(path.join(out, 'val-predictions.json'), 'utf8'),
    ) as Recorded;
    assert.equal(recorded.weights, summary.exported);
    assert.equal(summary.exported, finetuneEpochs ? 'finetune-swa' : 'head-swa');
    const valCount = Object.values(summary.counts.val).reduce((a, b) => a + b, 0);
    assert.equal(recorded.predictions.length, valCount);
    // the same weights, the same images: the recorded predictions give the summary's accuracy
    const correct = recorded.predictions.filter((p) => p.label === p.predicted).length;
    assert.equal(correct / valCount, summary.val!.acc);
    for (const p of recorded.predictions) {
      assert.ok(path.isAbsolute(p.file) && p.file.startsWith(data), p.file);
      assert.equal(path.basename(path.dirname(p.file)), p.label);
      assert.ok(summary.classes.includes(p.predicted));
      assert.ok(p.confidence >= 1 / summary.classes.length && p.confidence <= 1);
    }

    const html = await readFile(path.join(out, 'report.html'), 'utf8');
    assert.match(html, new RegExp(`<b>${summary.exported}</b>`));
    // named after the run, not the staging folder it was written in
    assert.match(html, new RegExp(`<h1>Run run-${finetuneEpochs}</h1>`));
    assert.match(html, new RegExp(`accuracy ${summary.val!.acc.toFixed(4)} on ${valCount} images`));
    assert.equal(/>fine-tune</.test(html), finetuneEpochs > 0);
    assert.match(html, /SWA starts \(head\)/);
    assert.equal(/SWA starts \(finetune\)/.test(html), finetuneEpochs > 0);
  });
}
