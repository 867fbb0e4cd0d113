/**
 * The fine-tune stage's second thread: tfjs trains on one thread on wasm, so each step's
 * gradient is taken in two halves (see FitOptions.halves) and a worker computes the second
 * while this thread computes the first. The worker builds the stage's model once, with
 * `stageModel` as the stage does, from the body's topology, the unfrozen layers' weights
 * and the head; each step it gets the trained variables' current values and the second
 * half's rows, and answers with that half's gradients, loss share and correct rows. The
 * gradient is the same function on the same values in both threads, so a run's figures do
 * not depend on the thread count. Should the worker fail, the step computes the half here
 * and the stage goes on in one thread (`onFail` is told once).
 */
import { isMainThread, parentPort, type Worker, workerData } from 'node:worker_threads';
import * as tf from '@tensorflow/tfjs';
import { type BackendOption, initBackend } from '../backend/index.js';
import { quietWorker } from '../util/worker.js';
import { type StageModel, type StageModelSettings, stageModel } from './finetune.js';
import { halfGradients, type PartOutcome, type StepPart } from './fit.js';

/** What the worker builds its model from. */
export interface StepWorkerModel {
  /** The whole body's topology (`toJSON(null, false)`); the prefix's layers stay at their initial weights, unused. */
  readonly body: unknown;
  /** The unfrozen layers' weights, in `layer.weights` order. */
  readonly suffix: readonly { readonly name: string; readonly weights: readonly Float32Array[] }[];
  readonly head: { readonly topology: unknown; readonly weights: readonly Float32Array[] };
  readonly firstUnfrozen: string;
  readonly settings: StageModelSettings;
  readonly numClasses: number;
}

interface StepWorkerData {
  readonly role: 'step-worker';
  readonly backend: Exclude<BackendOption, 'auto'>;
  readonly model: StepWorkerModel;
}

interface StepRequest {
  readonly part: StepPart;
  /** The trained variables' values, in the order of StageModel.variables. */
  readonly values: readonly Float32Array[];
}

type WorkerMessage =
  | { readonly type: 'step'; readonly outcome: PartOutcome<Float32Array> }
  | { readonly type: 'error'; readonly message: string };

const SCRIPT = new URL('./step-worker.js', import.meta.url);

/** A worker thread that computes the second half of each step (one step at a time). */
export class StepWorker {
  private readonly worker: Worker;
  private pending: {
    resolve: (o: PartOutcome<Float32Array> | null) => void;
  } | null = null;
  private failed = false;

  /** Starts the worker; its tfjs, backend and model load in the background. */
  constructor(
    backend: Exclude<BackendOption, 'auto'>,
    model: StepWorkerModel,
    private readonly onFail: (reason: string) => void = () => undefined,
  ) {
    const data: StepWorkerData = { role: 'step-worker', backend, model };
    const { worker, stderr } = quietWorker(SCRIPT, data);
    this.worker = worker;
    this.worker.on('message', (m: WorkerMessage) => {
      const p = this.pending;
      this.pending = null;
      if (m.type === 'step') p?.resolve(m.outcome);
      else {
        this.fail(m.message);
        p?.resolve(null);
      }
    });
    this.worker.on('error', (err) => this.end(err.message));
    this.worker.on('exit', (code) =>
      this.end(`it ended (exit code ${code})${stderr() ? `: ${stderr()}` : ''}`),
    );
  }

  private fail(reason: string): void {
    if (this.failed) return;
    this.failed = true;
    this.onFail(reason);
  }

  private end(reason: string): void {
    this.fail(reason);
    const p = this.pending;
    this.pending = null;
    p?.resolve(null);
  }

  /**
   * The gradient of `part` at `values` (the trained variables'), or null when the worker has
   * failed (now or before): the caller computes the part itself.
   */
  gradients(
    part: StepPart,
    values: readonly Float32Array[],
  ): Promise<PartOutcome<Float32Array> | null> {
    if (this.failed) return Promise.resolve(null);
    if (this.pending) throw new Error('StepWorker: one step at a time');
    return new Promise((resolve) => {
      this.pending = { resolve };
      const request: StepRequest = { part, values };
      this.worker.postMessage(request, [
        part.x.buffer,
        ...values.map((v) => v.buffer),
      ] as ArrayBuffer[]);
    });
  }

  async close(): Promise<void> {
    this.failed = true;
    this.pending?.resolve(null);
    this.pending = null;
    await this.worker.terminate();
  }
}

/** The worker's model, built as the stage builds its own. */
async function buildModel(m: StepWorkerModel): Promise<StageModel> {
  const body = await tf.models.modelFromJSON({ modelTopology: m.body as never });
  for (const layer of m.suffix) {
    const values = layer.weights;
    const l = body.getLayer(layer.name);
    l.setWeights(l.weights.map((w, i) => tf.tensor(values[i]!, w.shape as number[])));
  }
  const head = await tf.models.modelFromJSON({ modelTopology: m.head.topology as never });
  head.setWeights(head.weights.map((w, i) => tf.tensor(m.head.weights[i]!, w.shape as number[])));
  return stageModel(body, head, m.firstUnfrozen, m.settings);
}

/** The worker's side: build the model, then answer each step. */
async function serve(data: StepWorkerData): Promise<void> {
  const port = parentPort!;
  const ready = initBackend(data.backend).then(() => buildModel(data.model));
  // A failure answers the first request.
  ready.catch(() => undefined);
  port.on('message', (request: StepRequest) => {
    void ready
      .then((model) => {
        const { part, values } = request;
        tf.tidy(() => {
          model.variables.forEach((v, i) => {
            v.assign(tf.tensor(values[i]!, v.shape));
          });
        });
        const row = part.shape.slice(1).reduce((a, b) => a * b, 1);
        const r = halfGradients(
          model.forward,
          model.variables,
          data.model.numClasses,
          model.reseed,
          part,
          (a, b) => tf.tensor(part.x.subarray(a * row, b * row), [b - a, ...part.shape.slice(1)]),
        );
        const outcome: PartOutcome<Float32Array> = {
          loss: r.loss,
          hits: r.hits,
          grads: r.grads.map((g) => g.dataSync().slice() as Float32Array),
        };
        tf.dispose(r.grads as tf.Tensor[]);
        port.postMessage({ type: 'step', outcome } satisfies WorkerMessage, [
          ...outcome.grads.map((g) => g.buffer as ArrayBuffer),
        ]);
      })
      .catch((err: unknown) => {
        port.postMessage({
          type: 'error',
          message: err instanceof Error ? err.message : String(err),
        } satisfies WorkerMessage);
      });
  });
}

if (!isMainThread && (workerData as StepWorkerData | null)?.role === 'step-worker')
  void serve(workerData as StepWorkerData);
