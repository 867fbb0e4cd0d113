import { mkdir, writeFile } from 'node:fs/promises';
import path from 'node:path';
import type { EpochLogs } from '../../src/train/callbacks.js';
import type { TrainSummary } from '../../src/train/events.js';
import type { ValPrediction } from '../../src/train/phases.js';
import { versions } from '../../src/version.js';
import { writeImage } from '../helpers.js';

// Run and sweep folders of the shape train and sweep write, made from formulas so tests
// can compute every expected figure independently of the report code.

export const FIXTURE_CLASSES = ['apple', 'banana', 'cherry', 'date'] as const;
const COLOURS: [number, number, number][] = [
  [200, 40, 40],
  [230, 210, 50],
  [120, 20, 60],
  [140, 90, 40],
];

export interface RunFixtureOptions {
  readonly headEpochs?: number;
  readonly finetuneEpochs?: number;
  /** Head epoch of the first SWA snapshot (1-based). */
  readonly swaStart?: number;
  readonly valImages?: number;
  /** Where the validation images go (shared between runs of a sweep); default dir/images. */
  readonly imagesDir?: string;
  /** Write val-predictions.json (runs before it existed did not). */
  readonly predictions?: boolean;
  /** Shifts the figures, so runs of a sweep differ. */
  readonly quality?: number;
}

/** Validation image i: its true class, and whether the fixture's model gets it wrong. */
export function fixturePrediction(i: number, dir: string): ValPrediction {
  const k = FIXTURE_CLASSES.length;
  const label = FIXTURE_CLASSES[i % k]!;
  const wrong = i % 5 === 0 || i % 7 === 3;
  return {
    file: path.join(dir, label, `${i}.png`),
    label,
    predicted: wrong ? FIXTURE_CLASSES[(i + 1 + (i % 2)) % k]! : label,
    confidence: 0.3 + ((i * 37) % 70) / 100,
  };
}

/** The file of validation image `i` that the fixture deliberately does not write. */
export const MISSING_IMAGE = 0;

export async function writeRunFixture(
  dir: string,
  o: RunFixtureOptions = {},
): Promise<{ predictions: ValPrediction[]; metrics: EpochLogs[]; summary: TrainSummary }> {
  const headEpochs = o.headEpochs ?? 12;
  const finetuneEpochs = o.finetuneEpochs ?? 4;
  const swaStart = o.swaStart ?? 8;
  const q = o.quality ?? 0;
  const images = o.imagesDir ?? path.join(dir, 'images');
  const n = o.valImages ?? 40;
  await mkdir(dir, { recursive: true });
  const predictions = Array.from({ length: n }, (_, i) => fixturePrediction(i, images));
  for (const [i, p] of predictions.entries()) {
    if (i === MISSING_IMAGE) continue;
    const c = FIXTURE_CLASSES.indexOf(p.label as (typeof FIXTURE_CLASSES)[number]);
    await writeImage(p.file, COLOURS[c]!, { size: 48, variant: i });
  }
  const metrics: EpochLogs[] = [];
  for (let e = 1; e <= headEpochs; e++) {
    metrics.push({
      stage: 'head',
      epoch: e,
      loss: 1.4 / e + 0.2,
      acc: Math.min(0.98, 0.4 + 0.05 * e + q),
      val_loss: 1.3 / e + 0.35,
      val_acc: Math.min(0.95, 0.35 + 0.045 * e + q),
      lr: e >= swaStart ? 5e-4 : 1e-3,
      ...(e >= swaStart
        ? {
            snapshots: e - swaStart + 1,
            val_avg_loss: 1.3 / swaStart + 0.3 - 0.01 * (e - swaStart),
            val_avg_acc: Math.min(0.96, 0.36 + 0.045 * e + q),
          }
        : { snapshots: 0 }),
      seconds: 0.05,
    });
  }
  for (let e = 1; e <= finetuneEpochs; e++) {
    metrics.push({
      stage: 'finetune',
      epoch: e,
      loss: 0.3 - 0.02 * e,
      acc: 0.9 + 0.01 * e,
      val_loss: 0.45 - 0.01 * e,
      val_acc: 0.86 + 0.005 * e + q,
      lr: 1e-5,
      seconds: 0.8,
    });
  }
  const per = (split: number) => Object.fromEntries(FIXTURE_CLASSES.map((c, i) => [c, split + i]));
  const summary: TrainSummary = {
    out: dir,
    classes: [...FIXTURE_CLASSES],
    counts: { train: per(40), val: per(10), test: per(5) },
    skipped: [
      { path: path.join(images, 'apple', 'bad <name>&.png'), reason: 'unsupported image format' },
      { path: path.join(images, 'date', 'empty.jpg'), reason: 'empty file' },
    ],
    warnings: ["class 'date' has few images"],
    backend: 'wasm',
    engine: 'onnx',
    engineReason: null,
    cachedEmbeddings: 0,
    backbone: 'nsfwjs_mobilenet_v2',
    stages: {
      head: {
        raw: { loss: 0.47, acc: 0.86 + q },
        swa: { loss: 0.44, acc: 0.875 + q },
        snapshots: headEpochs - swaStart + 1,
        kept: 'swa',
      },
      ...(finetuneEpochs
        ? {
            finetune: {
              raw: { loss: 0.41, acc: 0.88 + q },
              swa: null,
              snapshots: 0,
              kept: 'finetune-raw' as const,
              unfreezeFrom: 'block_15_expand',
              batchSize: 16,
              trainableVariables: 30,
            },
          }
        : {}),
    },
    exported: finetuneEpochs ? 'finetune-raw' : 'head-swa',
    onnx: path.join(dir, 'model', 'model.onnx'),
    val: { loss: 0.41, acc: 0.88 + q },
    test: { loss: 0.5, acc: 0.84 + q, macroF1: 0.83 + q },
    seconds: {
      scan: 0.1,
      load: 1.2,
      embed: 4.5,
      head: 2.1,
      finetune: 9.7,
      export: 0.8,
      total: 18.4,
    },
  };
  const config = {
    data: images,
    out: dir,
    epochs: headEpochs,
    finetuneEpochs,
    lr: 1e-3,
    swa: true,
    swaStart,
    augment: ['flip'],
    backendInfo: { option: 'wasm', tfBackend: 'wasm' },
    backboneSpec: { id: 'nsfwjs_mobilenet_v2', inputSize: 224 },
    versions: versions(),
  };
  await writeFile(path.join(dir, 'config.json'), JSON.stringify(config, null, 2));
  await writeFile(path.join(dir, 'labels.json'), JSON.stringify(FIXTURE_CLASSES));
  await writeFile(
    path.join(dir, 'metrics.jsonl'),
    metrics.map((m) => `${JSON.stringify(m)}\n`).join(''),
  );
  await writeFile(path.join(dir, 'summary.json'), JSON.stringify(summary, null, 2));
  if (o.predictions !== false) {
    await writeFile(
      path.join(dir, 'val-predictions.json'),
      JSON.stringify({ weights: summary.exported, predictions }),
    );
  }
  return { predictions, metrics, summary };
}

export const SWEEP_LRS = [1e-3, 1e-4] as const;
export const SWEEP_HIDDEN = [0, 64] as const;
export const SWEEP_SEEDS = [1, 2] as const;
/** The run that failed (no figures). */
export const FAILED_RUN = 'lr0.0001-h64-s2';

/** The fixture's metric (val.swa.acc) of a configuration. */
export function sweepMetric(lr: number, hidden: number, seed: number): number {
  return 0.7 + (lr === 1e-3 ? 0.08 : 0) + (hidden ? 0.03 : 0) + (seed === 2 ? 0.01 : -0.01);
}

/** A sweep folder: sweep.json, results.jsonl and a run folder per finished run. */
export async function writeSweepFixture(dir: string): Promise<{ bestId: string; ids: string[] }> {
  const rows: Record<string, unknown>[] = [];
  const images = path.join(dir, 'images');
  for (const lr of SWEEP_LRS) {
    for (const hidden of SWEEP_HIDDEN) {
      for (const seed of SWEEP_SEEDS) {
        const id = `lr${lr}-h${hidden}-s${seed}`;
        const failed = id === FAILED_RUN;
        const m = sweepMetric(lr, hidden, seed);
        const runDir = path.join(dir, 'runs', id);
        if (!failed) {
          await writeRunFixture(runDir, {
            headEpochs: 6,
            finetuneEpochs: 0,
            swaStart: 4,
            valImages: 8,
            imagesDir: images,
            quality: m - 0.875,
          });
        }
        rows.push({
          id,
          params: { lr, hidden, seed },
          options: { lr, hidden, seed, epochs: 6 },
          status: failed ? 'failed' : 'ok',
          runDir: path.join('runs', id),
          val: failed ? null : { raw: { loss: 0.5, acc: m - 0.01 }, swa: { loss: 0.45, acc: m } },
          test: failed ? null : { loss: 0.55, acc: m - 0.02 },
          seconds: failed ? 0.2 : 3 + hidden / 32,
          ...(failed ? { error: 'wasm heap exhausted' } : {}),
        });
      }
    }
  }
  const best = rows
    .filter((r) => r['val'])
    .reduce((a, b) =>
      (b['val'] as { swa: { acc: number } }).swa.acc >
      (a['val'] as { swa: { acc: number } }).swa.acc
        ? b
        : a,
    );
  await writeFile(
    path.join(dir, 'sweep.json'),
    JSON.stringify(
      {
        config: { grid: { lr: SWEEP_LRS, hidden: SWEEP_HIDDEN, seed: SWEEP_SEEDS } },
        metric: 'val.swa.acc',
        best: best['id'],
      },
      null,
      2,
    ),
  );
  await writeFile(
    path.join(dir, 'results.jsonl'),
    rows.map((r) => `${JSON.stringify(r)}\n`).join(''),
  );
  return { bestId: best['id'] as string, ids: rows.map((r) => r['id'] as string) };
}
