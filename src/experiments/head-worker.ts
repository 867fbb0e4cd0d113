/**
 * Head-only runs trained in a worker thread beside the main thread: after a sweep's
 * embedding pass, a group of heads of one shape is split in parts, one trained here and
 * the others each in a worker with its own tfjs and backend (wasm trains on one thread, so
 * a part per core roughly halves the loop on two cores). The features go to the worker in
 * shared memory, once per part, without a copy; each head comes back as its weights and
 * its stage's records, and becomes the same model `trainHeads` would have returned here
 * (a member of a stack ends bit for bit as it would alone, so a split changes no figure).
 */
import { isMainThread, parentPort, type Worker, workerData } from 'node:worker_threads';
import * as tf from '@tensorflow/tfjs';
import { type BackendOption, initBackend } from '../backend/index.js';
import { type ErrorKind, FinetuneError } from '../errors.js';
import { buildHead } from '../head/build.js';
import type { StageSummary, TrainEvent, ValFigures, WeightsChoice } from '../train/events.js';
import type { PreparedInit } from '../train/init.js';
import type { ResolvedTrainOptions } from '../train/options.js';
import { type HeadJob, type HeadResult, headOptions, trainHeads } from '../train/phases.js';
import type { Embedded, EmbeddedSplits, PreparedRun } from '../train/run.js';
import type { StageResult } from '../train/stage.js';
import { quietWorker } from '../util/worker.js';

/** What the worker is started with. */
interface HeadWorkerData {
  readonly role: 'head-worker';
  readonly backend: Exclude<BackendOption, 'auto'>;
}

/** The splits a head trains on (trainHeads reads only these), in shared memory. */
interface SharedSplits {
  readonly featureSize: number;
  readonly train: Embedded;
  readonly val: Embedded;
}

/** One part of a group of heads: its data and its runs' options. */
interface PartRequest {
  readonly type: 'train';
  readonly splits: SharedSplits;
  readonly classes: readonly string[];
  /** `--init`, without the backbone's weights (the head needs only its own). */
  readonly init: PreparedInit | null;
  readonly options: readonly ResolvedTrainOptions[];
}

/** A head trained in the worker: its variables' values and what its stage recorded. */
interface TrainedHead {
  readonly weights: readonly Float32Array[];
  readonly shapes: readonly (readonly number[])[];
  /** Its stage's records (rawWeights null: the head stage keeps none). */
  readonly stage: StageResult;
  readonly summary: StageSummary;
  readonly kept: WeightsChoice;
  readonly val: ValFigures | null;
}

type HeadOutcome = TrainedHead | { readonly error: string; readonly kind: ErrorKind };

type WorkerMessage =
  | { readonly type: 'event'; readonly job: number; readonly event: TrainEvent }
  | { readonly type: 'done'; readonly heads: readonly HeadOutcome[] }
  | { readonly type: 'error'; readonly message: string; readonly kind: ErrorKind | null };

const SCRIPT = new URL('./head-worker.js', import.meta.url);

/** A copy of `a` in shared memory (handed to a worker, it is not copied again). */
function shared<T extends Float32Array | Int32Array>(a: T): T {
  const Ctor = a.constructor as new (buffer: SharedArrayBuffer) => T;
  const out = new Ctor(new SharedArrayBuffer(a.byteLength));
  out.set(a as never);
  return out;
}

/**
 * The train and validation features of `embedded` in shared memory, for any number of
 * parts (the copy is made once per embedding).
 */
export function shareSplits(embedded: EmbeddedSplits): SharedSplits {
  const one = (e: Embedded): Embedded => ({
    files: e.files,
    features: shared(e.features),
    labels: shared(e.labels),
  });
  return { featureSize: embedded.featureSize, train: one(embedded.train), val: one(embedded.val) };
}

/**
 * A worker thread that trains parts of head groups, one part at a time. Started early
 * (its tfjs and backend take about half a second to load) and closed by the caller.
 */
export class HeadWorker {
  private readonly worker: Worker;
  private pending: {
    resolve: (outcomes: readonly HeadOutcome[]) => void;
    reject: (err: Error) => void;
    emit: readonly ((event: TrainEvent) => void)[];
  } | null = null;
  private ended: Error | null = null;

  constructor(backend: Exclude<BackendOption, 'auto'>) {
    const data: HeadWorkerData = { role: 'head-worker', backend };
    const { worker, stderr } = quietWorker(SCRIPT, data);
    this.worker = worker;
    this.worker.on('message', (m: WorkerMessage) => {
      const p = this.pending;
      if (!p) return;
      if (m.type === 'event') p.emit[m.job]?.(m.event);
      else {
        this.pending = null;
        if (m.type === 'done') p.resolve(m.heads);
        else
          p.reject(m.kind ? new FinetuneError(m.message, { kind: m.kind }) : new Error(m.message));
      }
    });
    const end = (err: Error) => {
      this.ended ??= err;
      const p = this.pending;
      this.pending = null;
      p?.reject(this.ended);
    };
    this.worker.on('error', (err) => end(new Error(`head worker failed: ${err.message}`)));
    this.worker.on('exit', (code) =>
      end(new Error(`head worker ended (exit code ${code})${stderr() ? `: ${stderr()}` : ''}`)),
    );
  }

  /**
   * Trains `jobs` (one head shape, see headShapeKey) as `trainHeads` would here; their events
   * reach each job's `run.emit`. Every job must share `classes` and `init` (one prepared run).
   * Rejects with what trainHeads threw (a FinetuneError), or with a plain Error when the
   * worker itself failed (no backend, ended).
   */
  async train(
    splits: SharedSplits,
    jobs: readonly HeadJob[],
  ): Promise<(HeadResult | FinetuneError)[]> {
    if (this.ended) throw this.ended;
    if (this.pending) throw new Error('HeadWorker: one part at a time');
    const first = jobs[0];
    if (!first) return [];
    const init = first.run.init;
    const request: PartRequest = {
      type: 'train',
      splits,
      classes: first.run.splits.classes,
      init: init ? { ...init, run: { ...init.run, body: null } } : null,
      options: jobs.map((j) => j.options),
    };
    const outcomes = await new Promise<readonly HeadOutcome[]>((resolve, reject) => {
      this.pending = { resolve, reject, emit: jobs.map((j) => j.run.emit) };
      this.worker.postMessage(request);
    });
    const numClasses = request.classes.length;
    return outcomes.map((o, i) =>
      'error' in o
        ? new FinetuneError(o.error, { kind: o.kind })
        : headResult(o, splits.featureSize, numClasses, jobs[i]!.options),
    );
  }

  async close(): Promise<void> {
    this.ended ??= new Error('head worker closed');
    await this.worker.terminate();
  }
}

/** A head trained in the worker as this thread's model: buildHead's layers, the worker's values. */
function headResult(
  h: TrainedHead,
  featureSize: number,
  numClasses: number,
  o: ResolvedTrainOptions,
): HeadResult {
  const head = buildHead(featureSize, numClasses, headOptions(o));
  tf.tidy(() => head.setWeights(h.weights.map((w, i) => tf.tensor(w, [...h.shapes[i]!]))));
  return {
    head,
    stage: h.stage,
    summary: h.summary,
    kept: h.kept,
    val: h.val,
    dispose: () => head.dispose(),
  };
}

/** The worker's side: train each part asked for with trainHeads, answer with the weights. */
async function serve(data: HeadWorkerData): Promise<void> {
  const port = parentPort!;
  const ready = initBackend(data.backend);
  // Loading may fail; the first request answers with that.
  ready.catch(() => undefined);
  port.on('message', (request: PartRequest) => {
    void trainPart(request, ready)
      .then((heads) => {
        const transfer = heads.flatMap((h) =>
          'weights' in h ? h.weights.map((w) => w.buffer) : [],
        );
        port.postMessage(
          { type: 'done', heads } satisfies WorkerMessage,
          transfer as ArrayBuffer[],
        );
      })
      .catch((err: unknown) => {
        port.postMessage({
          type: 'error',
          message: err instanceof Error ? err.message : String(err),
          kind: err instanceof FinetuneError ? err.kind : null,
        } satisfies WorkerMessage);
      });
  });
}

async function trainPart(request: PartRequest, ready: Promise<unknown>): Promise<HeadOutcome[]> {
  // Not the runs' failure: a plain Error, so that the caller trains the part itself.
  await ready.catch((err: unknown) => {
    throw new Error(`head worker: no backend (${err instanceof Error ? err.message : err})`);
  });
  const { splits, classes, init } = request;
  const none: Embedded = { files: [], features: new Float32Array(0), labels: new Int32Array(0) };
  // What trainHeads reads of the embedding and of each job's prepared run: the features, the
  // classes, `--init` and the events (the backbone stays in the main thread).
  const embedded = { ...splits, test: none } as unknown as EmbeddedSplits;
  const jobs: HeadJob[] = request.options.map((options, job) => ({
    run: {
      splits: { classes },
      init,
      emit: (event: TrainEvent) =>
        parentPort!.postMessage({ type: 'event', job, event } satisfies WorkerMessage),
    } as unknown as PreparedRun,
    options,
  }));
  const results = await trainHeads(embedded, jobs);
  try {
    return results.map((r): HeadOutcome => {
      if (r instanceof Error) return { error: r.message, kind: r.kind };
      const values = r.head.getWeights();
      return {
        weights: values.map((v) => (v.dataSync() as Float32Array).slice()),
        shapes: values.map((v) => v.shape),
        stage: { ...r.stage, rawWeights: null },
        summary: r.summary,
        kept: r.kept,
        val: r.val,
      };
    });
  } finally {
    for (const r of results) if (!(r instanceof Error)) r.dispose();
  }
}

if (!isMainThread && (workerData as HeadWorkerData | null)?.role === 'head-worker')
  void serve(workerData as HeadWorkerData);
