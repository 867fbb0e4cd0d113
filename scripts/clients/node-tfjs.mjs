// Plain Node with @tensorflow/tfjs (no tfjs-node): npm install @tensorflow/tfjs @tensorflow/tfjs-backend-wasm sharp
// Usage: node node-tfjs.mjs runs/r1/model photo.jpg [more.jpg …]  → one JSON line per image
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import * as tf from '@tensorflow/tfjs';
import '@tensorflow/tfjs-backend-wasm'; // optional: 10× faster than the pure-JS cpu backend
import sharp from 'sharp';

const [modelDir, ...images] = process.argv.slice(2);
await tf.setBackend('wasm');

// Plain tfjs has no file:// loader in Node: read model.json and its shards with fs.
const modelJson = path.join(modelDir, 'model.json');
const model = await tf.loadLayersModel({
  load: async () => {
    const json = JSON.parse(await readFile(modelJson, 'utf8'));
    return tf.io.getModelArtifactsForJSON(json, async (manifest) => {
      const specs = manifest.flatMap((group) => group.weights);
      const shards = await Promise.all(
        manifest.flatMap((group) => group.paths).map((p) => readFile(path.join(modelDir, p))),
      );
      const data = Buffer.concat(shards);
      return [specs, data.buffer.slice(data.byteOffset, data.byteOffset + data.byteLength)];
    });
  },
});
const { labels, input } = model.getUserDefinedMetadata();
// The exported model's own preprocessing code: EXIF-oriented sRGB RGBA in, size×size RGB out.
const { preprocessRgba, toNhwc } = await import(
  pathToFileURL(path.join(modelDir, 'preprocess.js')).href
);

for (const file of images) {
  const { data, info } = await sharp(file, { autoOrient: true })
    .toColourspace('srgb')
    .ensureAlpha()
    .raw({ depth: 'uchar' })
    .toBuffer({ resolveWithObject: true });
  const rgb = preprocessRgba(data, info.width, info.height, input.size);
  const probabilities = tf.tidy(() =>
    model.predict(tf.tensor4d(toNhwc(rgb), [1, input.size, input.size, 3])).dataSync(),
  );
  const best = probabilities.indexOf(Math.max(...probabilities));
  console.log(
    JSON.stringify({ file, label: labels[best], probabilities: Array.from(probabilities) }),
  );
}
