/**
 * Worker entry of `WorkerPoolFrozenModel` for `onnx` recipes (see pool.ts for the message
 * protocol): one single-threaded ONNX Runtime session on the lowered graph. It loads no
 * tfjs.
 */
import { parentPort, workerData } from 'node:worker_threads';
import {
  type PoolRequest,
  type PoolWorkerData,
  type PoolWorkerMessage,
  RunGate,
  workerError,
} from '../pool.js';
import { OnnxFrozenModel } from './session.js';

const port = parentPort;
if (!port) throw new Error('session-worker.js runs only as a worker thread');

function post(message: PoolWorkerMessage, transfer: ArrayBuffer[] = []): void {
  port!.postMessage(message, transfer);
}

async function main(): Promise<void> {
  const { recipe, gate: memory } = workerData as PoolWorkerData;
  const gate = new RunGate(memory);
  let model: OnnxFrozenModel | null;
  try {
    if (recipe.kind !== 'onnx')
      throw new Error(`session-worker.js runs onnx recipes, not ${recipe.kind}`);
    // Opening the session is a native call on this thread too.
    model = await gate.pass(() =>
      OnnxFrozenModel.create(recipe.onnx, {
        inputSize: recipe.inputSize,
        threads: 1,
        rows: recipe.rows,
      }),
    );
  } catch (err) {
    post({ type: 'error', id: null, ...workerError(err) });
    return;
  }
  // The pool closed while the session opened.
  if (!model) return;
  const session = model;
  // One batch at a time, in arrival order (the session computes on this thread anyway).
  let queue = Promise.resolve();
  port!.on('message', (req: PoolRequest) => {
    queue = queue.then(async () => {
      try {
        const rows = await gate.pass(() => session.run(req.data, req.n));
        // The pool is closing: nothing waits for this batch any more.
        if (!rows) return;
        // Rows that are a view into a larger buffer are copied, so only they cross.
        const out = rows.buffer.byteLength === rows.byteLength ? rows : rows.slice();
        post({ type: 'result', id: req.id, data: out, input: req.data }, [
          out.buffer as ArrayBuffer,
          req.data.buffer as ArrayBuffer,
        ]);
      } catch (err) {
        post({ type: 'error', id: req.id, ...workerError(err) });
      }
    });
  });
  post({ type: 'ready', inputSize: session.inputSize, outputSize: session.outputSize });
}

await main();
