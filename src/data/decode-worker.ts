// A decode worker of `DecodePool` (decode-pool.ts): decodes image bytes with sharp, resizes
// them by the preprocessing contract and writes the model's float input into shared memory,
// so none of that work runs on the thread that runs the engine.
import { parentPort } from 'node:worker_threads';
import { decodeImage, type Layout, type Preprocess, toModelInput } from './decode.js';

/** One image to decode into `target` (a shared float32 buffer) from element `offset` on. */
export interface DecodeJob {
  readonly id: number;
  readonly bytes: Uint8Array;
  readonly size: number;
  readonly maxPixels: number;
  readonly maxBytes: number;
  readonly pre: Preprocess;
  readonly layout: Layout;
  readonly target: SharedArrayBuffer;
  readonly offset: number;
}

/** `reason`: the file is unusable (skipped); `error`: the job itself failed (thrown). */
export type DecodeReply =
  | { readonly id: number; readonly ok: true }
  | { readonly id: number; readonly ok: false; readonly reason: string }
  | { readonly id: number; readonly error: string };

const port = parentPort;
if (!port) throw new Error('decode-worker.js runs only as a worker thread (DecodePool)');

// One view per shared buffer: the pool sends the same buffer with every job.
let view: { buffer: SharedArrayBuffer; floats: Float32Array } | null = null;

port.on('message', (job: DecodeJob) => {
  const bytes = Buffer.from(job.bytes.buffer, job.bytes.byteOffset, job.bytes.byteLength);
  decodeImage(bytes, {
    width: job.size,
    height: job.size,
    maxPixels: job.maxPixels,
    maxBytes: job.maxBytes,
  })
    .then((decoded) => {
      if (!decoded.ok) {
        port.postMessage({ id: job.id, ok: false, reason: decoded.reason } satisfies DecodeReply);
        return;
      }
      if (view?.buffer !== job.target) {
        view = { buffer: job.target, floats: new Float32Array(job.target) };
      }
      toModelInput(decoded.pixels, job.pre, job.layout, view.floats, job.offset);
      port.postMessage({ id: job.id, ok: true } satisfies DecodeReply);
    })
    .catch((err: unknown) => {
      const error = err instanceof Error ? err.message : String(err);
      port.postMessage({ id: job.id, error } satisfies DecodeReply);
    });
});
