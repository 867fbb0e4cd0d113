/**
 * One `train` in its own process, for benchmarks that need a clean peak RSS:
 *   node dist/scripts/bench-train.js DATA_DIR CACHE_DIR OUT_DIR [epochs]
 * prints { summary seconds, cachedEmbeddings, maxRssMB } as JSON.
 */
import { train } from '../src/index.js';

const [data, cacheDir, out, epochs] = process.argv.slice(2);
if (!data || !cacheDir || !out) {
  process.stderr.write('usage: bench-train DATA_DIR CACHE_DIR OUT_DIR [epochs]\n');
  process.exit(2);
}
const summary = await train({ data, cacheDir, out, epochs: Number(epochs ?? 40) });
process.stdout.write(
  `${JSON.stringify({
    images:
      Object.values(summary.counts.train).reduce((a, b) => a + b, 0) +
      Object.values(summary.counts.val).reduce((a, b) => a + b, 0),
    seconds: summary.seconds,
    cachedEmbeddings: summary.cachedEmbeddings,
    engine: summary.engine,
    backend: summary.backend,
    maxRssMB: Math.round(process.resourceUsage().maxRSS / 1024),
  })}\n`,
);
