/**
 * One fine-tune run in its own process, for the fine-tune epoch and its peak RSS:
 *   node dist/scripts/bench-finetune.js DATA_DIR CACHE_DIR OUT_DIR [finetune epochs]
 *
 * Issue 16's recipe, as the PyTorch peer (scripts/torch-finetune-peer.py) runs it:
 * `--unfreeze blocks:3 --augment flip,crop`, batch 32, Adam, every image of DATA_DIR in
 * the training split (no validation pass in the epoch), no averaging, one head epoch
 * first. Each fine-tune epoch computes a fresh augmented view (decode, crop/flip, frozen
 * prefix) and trains the suffix on it; the first is the warm-up. Prints one JSON line:
 * every fine-tune epoch's seconds, the other phases' seconds, and the process's peak RSS
 * (with the RSS when the fine-tune stage began, to show what the stage adds).
 */
import { train } from '../src/index.js';

const [data, cacheDir, out, epochs] = process.argv.slice(2);
if (!data || !cacheDir || !out) {
  process.stderr.write('usage: bench-finetune DATA_DIR CACHE_DIR OUT_DIR [finetune epochs]\n');
  process.exit(2);
}
const finetuneEpochs = Number(epochs ?? 2);
if (!Number.isInteger(finetuneEpochs) || finetuneEpochs < 1) {
  process.stderr.write(
    `bench-finetune: finetune epochs must be a positive integer, got ${epochs}\n`,
  );
  process.exit(2);
}
const epochSeconds: number[] = [];
let rssBeforeFinetuneMB: number | null = null;
const summary = await train({
  data,
  cacheDir,
  out,
  valSplit: 0,
  epochs: 1,
  swa: false,
  batchSize: 32,
  optimizer: 'adam',
  finetuneEpochs,
  unfreeze: 'blocks:3',
  augment: 'flip,crop',
  onEvent: (e) => {
    if (e.type === 'stage-end' && e.stage === 'head')
      rssBeforeFinetuneMB = Math.round(process.memoryUsage().rss / 2 ** 20);
    if (e.type === 'epoch' && e.logs.stage === 'finetune') epochSeconds.push(e.logs.seconds);
  },
});
process.stdout.write(
  `${JSON.stringify({
    images: Object.values(summary.counts.train).reduce((a, b) => a + b, 0),
    finetune_epoch_seconds: epochSeconds,
    seconds: summary.seconds,
    engine: summary.engine,
    backend: summary.backend,
    rssBeforeFinetuneMB,
    maxRssMB: Math.round(process.resourceUsage().maxRSS / 1024),
  })}\n`,
);
