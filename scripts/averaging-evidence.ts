/**
 * When does weight averaging help? Head-stage training with `--average none`, `swa` and
 * `ema` over 5 seeds, on the sample set as it is and with 20% of its training labels
 * flipped to another class; prints mean ± std of validation accuracy, NLL and ECE (15
 * bins) per setting, and writes them as JSON.
 *
 *   npm run build && node dist/scripts/averaging-evidence.js [DATA_DIR] [--epochs N] [--json FILE]
 *
 * DATA_DIR defaults to the shipped sample set. Every image is embedded once (through the
 * cache); the noisy copy flips the labels of the embedded training rows (the same images
 * and features, seeded), so both conditions share one validation split with true labels.
 * Heads of one setting train side by side (trainHeads), each as it would alone.
 */
import { writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  type AverageOption,
  calibrationReport,
  type EmbeddedSplits,
  embedSplits,
  prepareRun,
  resolveTrainOptions,
  trainHeads,
} from '../src/index.js';
import { seededRandom } from '../src/util/random.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const args = process.argv.slice(2);
const flag = (name: string): string | undefined => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : undefined;
};
const data =
  args.find((a, i) => !a.startsWith('--') && !args[i - 1]?.startsWith('--')) ??
  path.join(root, 'datasets', 'fashion-mnist-mini');
const epochs = Number(flag('--epochs') ?? 40);
const jsonOut = flag('--json');
if (!Number.isInteger(epochs) || epochs < 2) {
  process.stderr.write(
    `averaging-evidence: --epochs must be an integer ≥ 2, not ${flag('--epochs')}\n`,
  );
  process.exit(2);
}
const SEEDS = [1, 2, 3, 4, 5];
const AVERAGES: AverageOption[] = ['none', 'swa', 'ema'];
const FLIP = 0.2;

/** The splits with a fraction of the training labels moved to another class (seeded). */
function flipLabels(e: EmbeddedSplits, fraction: number, classes: number): EmbeddedSplits {
  const random = seededRandom(7);
  const labels = Int32Array.from(e.train.labels);
  for (let i = 0; i < labels.length; i++) {
    if (random() < fraction)
      labels[i] = (labels[i]! + 1 + Math.floor(random() * (classes - 1))) % classes;
  }
  return { ...e, train: { ...e.train, labels } };
}

const stats = (xs: number[]) => {
  const mean = xs.reduce((a, b) => a + b, 0) / xs.length;
  const std = Math.sqrt(xs.reduce((a, b) => a + (b - mean) ** 2, 0) / (xs.length - 1));
  return { mean, std };
};

const out = path.join(os.tmpdir(), `finetune-averaging-evidence-${process.pid}`);
const run = await prepareRun({ data, out });
try {
  const embedded = await embedSplits(run);
  const classes = run.splits.classes.length;
  const valLabels = embedded.val.labels;
  const rows: Record<string, unknown>[] = [];
  for (const noisy of [false, true]) {
    const splits = noisy ? flipLabels(embedded, FLIP, classes) : embedded;
    for (const average of AVERAGES) {
      const heads = await trainHeads(
        splits,
        SEEDS.map((seed) => ({
          run,
          options: resolveTrainOptions({ data, out, epochs, average, seed }),
        })),
      );
      const acc: number[] = [];
      const nll: number[] = [];
      const ece: number[] = [];
      for (const head of heads) {
        if (head instanceof Error) throw head;
        const ev = head.stage.kept === 'raw' ? head.stage.raw! : head.stage.swa!;
        const report = calibrationReport(ev.probs, valLabels, classes);
        acc.push(ev.acc);
        nll.push(report.nll);
        ece.push(report.ece);
        head.dispose();
      }
      rows.push({
        labels: noisy ? `${FLIP * 100}% flipped` : 'clean',
        average,
        seeds: SEEDS.length,
        val_acc: stats(acc),
        val_nll: stats(nll),
        val_ece: stats(ece),
      });
    }
  }
  const fmt = (s: unknown, digits = 4) => {
    const { mean, std } = s as { mean: number; std: number };
    return `${mean.toFixed(digits)} ± ${std.toFixed(digits)}`;
  };
  process.stdout.write(
    `data ${data}: ${embedded.train.labels.length} train, ${valLabels.length} val images, ${epochs} epochs, seeds ${SEEDS.join(',')}\n`,
  );
  process.stdout.write('labels        average  val acc            val NLL            val ECE\n');
  for (const r of rows)
    process.stdout.write(
      `${String(r['labels']).padEnd(14)}${String(r['average']).padEnd(9)}${fmt(r['val_acc'])}  ${fmt(r['val_nll'])}  ${fmt(r['val_ece'])}\n`,
    );
  if (jsonOut)
    await writeFile(jsonOut, `${JSON.stringify({ data, epochs, seeds: SEEDS, rows }, null, 2)}\n`);
} finally {
  run.dispose();
}
