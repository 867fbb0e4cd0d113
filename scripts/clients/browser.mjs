// In the browser with TensorFlow.js from a CDN (see browser.html) or a bundler
// (`import * as tf from '@tensorflow/tfjs'`, then pass `tf` as the second argument).
// The model folder is served as it is: model.json, weights.bin and preprocess.js.

/**
 * Loads an exported classifier from the URL of its model/ folder (ending in '/').
 * `classify(blob)` takes an image file (a File from <input type="file">, or a fetched Blob)
 * and gives { label, probabilities } with probabilities[i] ↔ labels[i].
 */
export async function loadClassifier(modelUrl, tf = globalThis.tf) {
  const base = new URL(modelUrl, globalThis.location?.href);
  const model = await tf.loadLayersModel(new URL('model.json', base).href);
  const { labels, input } = model.getUserDefinedMetadata();
  // The exported model's own preprocessing code (the toolkit trained with the same).
  const { preprocessRgba, toNhwc } = await import(new URL('preprocess.js', base).href);

  async function classify(blob) {
    // Decoded at full size, EXIF orientation applied, alpha not premultiplied; the resize
    // is preprocess.js's, not drawImage's (whose kernel differs between browsers).
    const bitmap = await createImageBitmap(blob, {
      imageOrientation: 'from-image',
      premultiplyAlpha: 'none',
    });
    const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
    const context = canvas.getContext('2d');
    context.drawImage(bitmap, 0, 0);
    const { data, width, height } = context.getImageData(0, 0, bitmap.width, bitmap.height);
    bitmap.close();
    const rgb = preprocessRgba(data, width, height, input.size);
    const output = tf.tidy(() =>
      model.predict(tf.tensor4d(toNhwc(rgb), [1, input.size, input.size, 3])),
    );
    const probabilities = Array.from(await output.data());
    output.dispose();
    const best = probabilities.indexOf(Math.max(...probabilities));
    return { label: labels[best], probabilities };
  }
  return { labels, input, model, classify };
}
