/**
 * Writes the frozen-backbone features of a split layout (DIR/train, DIR/test) as JSON,
 * for checking the head's defaults against a logistic-regression probe
 * (scripts/logreg-probe.py).
 *
 *   node dist/scripts/dump-embeddings.js datasets/fashion-mnist-mini /tmp/emb.json
 */
import { writeFile } from 'node:fs/promises';
import path from 'node:path';
import {
  createFrozenModel,
  embedFiles,
  initBackend,
  loadBackbone,
  loadSplits,
  resolveEngineContext,
} from '../src/index.js';

const [root, out] = process.argv.slice(2);
if (!root || !out) {
  process.stderr.write('usage: dump-embeddings DATA_DIR OUT.json\n');
  process.exit(2);
}
const backend = await initBackend('auto');
const backbone = await loadBackbone();
const { model } = await createFrozenModel(
  {
    layersModel: backbone.model,
    inputSize: backbone.inputSize,
    outputSize: backbone.featureSize,
    forward: (x) => backbone.embed(x),
  },
  resolveEngineContext({ backend }),
);
const result: Record<string, { x: number[][]; y: number[] }> = {};
for (const split of ['train', 'test']) {
  const s = await loadSplits(path.join(root, split), { valSplit: 0 });
  const files = [...s.train, ...s.val];
  const e = await embedFiles(
    files.map((f) => f.path),
    model,
  );
  const d = e.outputSize;
  result[split] = {
    x: e.rows.map((_, i) => Array.from(e.features.subarray(i * d, (i + 1) * d))),
    y: e.rows.map((r) => files[r]!.label),
  };
}
await model.dispose();
backbone.dispose();
await writeFile(out, JSON.stringify(result));
