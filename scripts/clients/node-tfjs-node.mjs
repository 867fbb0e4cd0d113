// Node with tfjs-node installed (native TensorFlow: npm install @tensorflow/tfjs-node sharp)
// Usage: node node-tfjs-node.mjs runs/r1/model photo.jpg [more.jpg …]  → one JSON line per image
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import * as tf from '@tensorflow/tfjs-node';
import sharp from 'sharp';

const [modelDir, ...images] = process.argv.slice(2);
// tfjs-node registers a file:// loader.
const model = await tf.loadLayersModel(pathToFileURL(path.join(modelDir, 'model.json')).href);
const { labels, input } = model.getUserDefinedMetadata();
const { preprocessRgba, toNhwc } = await import(
  pathToFileURL(path.join(modelDir, 'preprocess.js')).href
);

for (const file of images) {
  // Not tf.node.decodeImage + tf.image.resizeBilinear: that kernel is not the model's.
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
