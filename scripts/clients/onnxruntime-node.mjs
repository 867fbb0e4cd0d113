// onnxruntime-node, no TensorFlow.js: npm install onnxruntime-node onnx-proto sharp
// Usage: node onnxruntime-node.mjs runs/r1/model photo.jpg [more.jpg …]  → one JSON line per image
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import onnxProto from 'onnx-proto';
import * as ort from 'onnxruntime-node';
import sharp from 'sharp';

const [modelDir, ...images] = process.argv.slice(2);
const bytes = await readFile(path.join(modelDir, 'model.onnx'));
// Labels, input spec and preprocessing travel in model.onnx's metadata_props (onnxruntime-node
// does not expose them; Python's session.get_modelmeta().custom_metadata_map does).
const meta = Object.fromEntries(
  onnxProto.onnx.ModelProto.decode(bytes).metadataProps.map((p) => [p.key, p.value]),
);
const labels = JSON.parse(meta.labels);
const input = JSON.parse(meta.input); // { name: 'pixels', layout: 'nchw', size, … }
const session = await ort.InferenceSession.create(bytes);
const { preprocessRgba, toNchw } = await import(
  pathToFileURL(path.join(modelDir, 'preprocess.js')).href
);

for (const file of images) {
  const { data, info } = await sharp(file, { autoOrient: true })
    .toColourspace('srgb')
    .ensureAlpha()
    .raw({ depth: 'uchar' })
    .toBuffer({ resolveWithObject: true });
  const rgb = preprocessRgba(data, info.width, info.height, input.size);
  const pixels = new ort.Tensor('float32', toNchw(rgb), [1, 3, input.size, input.size]);
  const out = await session.run({ [input.name]: pixels });
  const probabilities = Array.from(out[session.outputNames[0]].data);
  const best = probabilities.indexOf(Math.max(...probabilities));
  console.log(JSON.stringify({ file, label: labels[best], probabilities }));
}
