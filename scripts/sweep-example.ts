/**
 * A small sweep from TypeScript: find a head learning rate with lrFind, then sweep the
 * learning rate around it and the head's width over 2 seeds, on one embedding pass.
 *
 *   npm run build && node dist/scripts/sweep-example.js [DATA_DIR] [OUT_DIR]
 *
 * DATA_DIR defaults to the shipped sample set (train/ and test/ folders). Rerunning with
 * the same OUT_DIR skips the runs that finished.
 */
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { lrFind, type SweepConfig, sweep } from '../src/index.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const data = process.argv[2] ?? path.join(root, 'datasets', 'fashion-mnist-mini');
const out = process.argv[3] ?? path.join('sweeps', 'example');

const found = await lrFind({ data, out: path.join(out, 'lr-find') });
const lr = found.suggested;
process.stdout.write(
  `lr-find suggests ${lr.toPrecision(2)} (${found.seconds['total']!.toFixed(1)} s)\n`,
);

const config: SweepConfig = {
  out,
  base: { data, epochs: 20 },
  grid: { lr: [lr / 3, lr, lr * 3].map((x) => Number(x.toPrecision(2))), hidden: [0, 256] },
  repeats: 2,
};
const result = await sweep(config, {
  metric: 'val_loss',
  onRunEnd: (row) =>
    process.stdout.write(
      `${row.id} ${JSON.stringify(row.params)} ${row.status} val loss ${row.val?.kept?.loss.toFixed(4) ?? 'n/a'}\n`,
    ),
});
const best = result.bestConfig;
if (best) {
  const m = best.metrics.val_loss!;
  process.stdout.write(
    `best: ${JSON.stringify(best.params)} val loss ${m.mean.toFixed(4)} ± ${(m.std ?? 0).toFixed(4)} over ${m.n} seeds; model in ${result.model}\n`,
  );
}
