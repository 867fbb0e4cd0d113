/**
 * Worker entry of `WorkerPoolFrozenModel` (see pool.ts for the message protocol). Each
 * worker owns a tfjs instance, a backend and a copy of the model built from the recipe.
 */
import { parentPort, workerData } from 'node:worker_threads';
import * as tf from '@tensorflow/tfjs';
import { loadBackbone } from '../backbones/load.js';
import { cutPrefix } from '../backbones/prefix.js';
import { initBackend } from '../backend/index.js';
import { FinetuneError } from '../errors.js';
import { loadClassifierModel } from '../export/model-dir.js';
import {
  type PoolRequest,
  type PoolWorkerData,
  type PoolWorkerMessage,
  type TfjsWorkerRecipe,
  workerError,
} from './pool.js';

interface Built {
  readonly inputSize: number;
  readonly outputSize: number;
  readonly forward: (pixels: tf.Tensor4D) => tf.Tensor;
}

const port = parentPort;
if (!port) throw new Error('pool-worker.js runs only as a worker thread');

function post(message: PoolWorkerMessage, transfer: ArrayBuffer[] = []): void {
  port!.postMessage(message, transfer);
}

/** Elements per image of a symbolic output (its shape without the batch dimension). */
function rowSize(shape: readonly (number | null)[], what: string): number {
  const dims = shape.slice(1);
  if (dims.some((d) => typeof d !== 'number' || d <= 0)) {
    throw new FinetuneError(
      `Expected ${what} to have a fixed output shape but it is [${shape.join(', ')}]`,
    );
  }
  return (dims as number[]).reduce((a, b) => a * b, 1);
}

async function build(recipe: TfjsWorkerRecipe): Promise<Built> {
  if (recipe.kind === 'classifier') {
    const { model, file } = await loadClassifierModel(recipe.model);
    const shape = model.inputs[0]!.shape;
    // A 'head' export takes feature vectors, not pixels: nothing to split by image size.
    if (shape.length !== 4 || shape[1] !== shape[2] || shape[3] !== 3 || !shape[1]) {
      model.dispose();
      throw new FinetuneError(
        `${file}: expected a full classifier (square RGB pixels in) but its input shape is [${shape.join(', ')}]`,
      );
    }
    return {
      inputSize: shape[1],
      outputSize: rowSize(model.outputs[0]!.shape, file),
      forward: (x) => model.predict(x) as tf.Tensor,
    };
  }
  const backbone = await loadBackbone(recipe.backbone, recipe.options);
  if (recipe.firstUnfrozen === undefined) {
    return {
      inputSize: backbone.inputSize,
      outputSize: backbone.featureSize,
      forward: (x) => backbone.embed(x),
    };
  }
  if (!backbone.model) {
    throw new FinetuneError(
      `Cannot cut ${recipe.backbone} before '${recipe.firstUnfrozen}': only layers-format backbones can be cut`,
    );
  }
  const prefix = cutPrefix(backbone.model, recipe.firstUnfrozen);
  return {
    inputSize: backbone.inputSize,
    outputSize: prefix.cutShape.reduce((a, b) => a * b, 1),
    forward: (x) => prefix.model.predict(x) as tf.Tensor,
  };
}

async function main(): Promise<void> {
  const { recipe, backend } = workerData as PoolWorkerData;
  let model: Built;
  try {
    if (recipe.kind === 'onnx')
      throw new Error('pool-worker.js runs tfjs recipes; see session-worker.js');
    await initBackend(backend);
    model = await build(recipe);
  } catch (err) {
    post({ type: 'error', id: null, ...workerError(err) });
    return;
  }
  const { inputSize: s, outputSize } = model;
  // Handled synchronously (forward + dataSync), so requests never interleave.
  port!.on('message', (req: PoolRequest) => {
    try {
      if (req.data.length !== req.n * s * s * 3) {
        throw new Error(
          `received ${req.data.length} floats for ${req.n} images of ${s}×${s}×3 (expected ${req.n * s * s * 3})`,
        );
      }
      const y = tf.tidy(() => {
        const x = tf.tensor4d(req.data, [req.n, s, s, 3]);
        return model.forward(x).reshape([req.n, outputSize]);
      });
      let out: Float32Array;
      try {
        const raw = y.dataSync() as Float32Array;
        // wasm's readSync returns a fresh copy of its heap; cpu returns the tensor's own
        // storage, which must not be detached under tfjs, so it is copied first.
        out = tf.getBackend() === 'wasm' ? raw : raw.slice();
      } finally {
        y.dispose();
      }
      post({ type: 'result', id: req.id, data: out, input: req.data }, [
        out.buffer as ArrayBuffer,
        req.data.buffer as ArrayBuffer,
      ]);
    } catch (err) {
      post({ type: 'error', id: req.id, ...workerError(err) });
    }
  });
  post({ type: 'ready', inputSize: s, outputSize });
}

await main();
