import { mkdir, readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import * as tf from '@tensorflow/tfjs';
import { fileError } from '../errors.js';

/**
 * Model files on disk without tfjs-node: tfjs's own `file://` router exists only in
 * tfjs-node, and registering a second one there makes loading throw, so these are plain
 * IOHandlers passed straight to `loadLayersModel` / `loadGraphModel` / `save`.
 */

/** Reads `model.json` and its weight shards (paths relative to model.json). */
export function fileLoadHandler(modelJsonPath: string): tf.io.IOHandler {
  return {
    load: async () => {
      const json = await readModelJson(modelJsonPath);
      const dir = path.dirname(modelJsonPath);
      return tf.io.getModelArtifactsForJSON(json, async (manifest) => {
        const specs: tf.io.WeightsManifestEntry[] = [];
        const buffers: Buffer[] = [];
        for (const group of manifest) {
          specs.push(...group.weights);
          for (const p of group.paths) {
            const file = path.join(dir, p);
            try {
              buffers.push(await readFile(file));
            } catch (err) {
              throw fileError(file, `cannot read weight shard (${(err as Error).message})`, err);
            }
          }
        }
        return [specs, concatBuffers(buffers)];
      });
    },
  };
}

export async function readModelJson(modelJsonPath: string): Promise<tf.io.ModelJSON> {
  let text: string;
  try {
    text = await readFile(modelJsonPath, 'utf8');
  } catch (err) {
    throw fileError(modelJsonPath, `cannot read model file (${(err as Error).message})`, err);
  }
  try {
    return JSON.parse(text) as tf.io.ModelJSON;
  } catch (err) {
    throw fileError(modelJsonPath, 'is not valid JSON', err);
  }
}

/** Saves a model as `dir/model.json` + `dir/weights.bin`. */
export function fileSaveHandler(dir: string): tf.io.IOHandler {
  return tf.io.withSaveHandler(async (artifacts) => {
    await mkdir(dir, { recursive: true });
    const weightsFile = 'weights.bin';
    const json: tf.io.ModelJSON = {
      modelTopology: artifacts.modelTopology as object,
      format: artifacts.format,
      generatedBy: artifacts.generatedBy,
      convertedBy: artifacts.convertedBy,
      weightsManifest: [{ paths: [weightsFile], weights: artifacts.weightSpecs ?? [] }],
    };
    if (artifacts.trainingConfig) json.trainingConfig = artifacts.trainingConfig;
    if (artifacts.userDefinedMetadata) json.userDefinedMetadata = artifacts.userDefinedMetadata;
    const data = artifacts.weightData
      ? new Uint8Array(
          tf.io.concatenateArrayBuffers(artifacts.weightData as ArrayBuffer | ArrayBuffer[]),
        )
      : new Uint8Array(0);
    await writeFile(path.join(dir, weightsFile), data);
    await writeFile(path.join(dir, 'model.json'), JSON.stringify(json));
    return {
      modelArtifactsInfo: tf.io.getModelArtifactsInfoForJSON(artifacts),
    };
  });
}

export function concatBuffers(buffers: readonly Uint8Array[]): ArrayBuffer {
  const total = buffers.reduce((n, b) => n + b.byteLength, 0);
  const out = new Uint8Array(total);
  let offset = 0;
  for (const b of buffers) {
    out.set(b, offset);
    offset += b.byteLength;
  }
  return out.buffer;
}
