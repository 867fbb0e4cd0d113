import { availableParallelism } from 'node:os';
import type { Worker } from 'node:worker_threads';
import { FinetuneError, invalidOption } from '../errors.js';
import { quietWorker } from '../util/worker.js';
import type { FrozenModel } from './types.js';

/**
 * How each tfjs worker builds its own copy of the model: JSON-serialisable, since it
 * travels as `workerData`.
 */
export type TfjsWorkerRecipe =
  | {
      kind: 'backbone';
      /** Registry id or model.json path/URL, as for `loadBackbone`. */
      backbone: string;
      options: { inputSize?: number; alpha?: number; featureLayer?: string; body?: string };
      /**
       * Run only the frozen prefix before this layer (see `cutPrefix`); each output row
       * is the prefix output flattened (NHWC order).
       */
      firstUnfrozen?: string;
    }
  | {
      kind: 'classifier';
      /** A run folder, its model/ folder or a model.json, as for `loadClassifierModel`. */
      model: string;
    };

/** A lowered graph for ONNX Runtime workers: one single-threaded session in each. */
export interface OnnxWorkerRecipe {
  kind: 'onnx';
  /** The ONNX bytes (copied to each worker). */
  onnx: Uint8Array;
  inputSize: number;
  /** Row order of a 4-D output, as for `OnnxFrozenModel.create`. */
  rows: 'nhwc' | 'nchw';
}

/** How each worker builds its own copy of the model. */
export type WorkerRecipe = TfjsWorkerRecipe | OnnxWorkerRecipe;

export type PoolBackend = 'wasm' | 'cpu';

export interface WorkerPoolOptions {
  /** How many workers; default `os.availableParallelism()`. */
  workers?: number;
  /** The tfjs backend each worker runs; default wasm. */
  backend?: PoolBackend;
}

/** What each worker receives as `workerData`. */
export interface PoolWorkerData {
  readonly recipe: WorkerRecipe;
  readonly backend: PoolBackend;
  /** ONNX Runtime workers: an Int32Array's memory shared with the pool (see `RunGate`). */
  readonly gate?: SharedArrayBuffer;
}

/**
 * Keeps a worker from being stopped inside ONNX Runtime's `run`. onnxruntime-node runs a
 * graph synchronously on the calling thread; a worker terminated meanwhile, by
 * `worker.terminate()` or by the process exiting, aborts the whole process when the run
 * returns (`terminate called after throwing an instance of 'Napi::Error'`, exit 134). So a
 * worker marks itself busy around each run and runs nothing once the pool is closing, and
 * the pool waits for it to be idle before stopping it: in `dispose`, and on process exit
 * (the 'exit' event runs before worker threads are stopped, so a signal or an error that
 * ends the process still ends with its own code).
 */
export class RunGate {
  private static readonly CLOSING = 0;
  private static readonly BUSY = 1;
  readonly state: Int32Array;

  constructor(memory: SharedArrayBuffer = new SharedArrayBuffer(8)) {
    this.state = new Int32Array(memory);
  }

  get memory(): SharedArrayBuffer {
    return this.state.buffer as SharedArrayBuffer;
  }

  /** Worker side: runs `work` unless the pool is closing (then null). */
  async pass<T>(work: () => Promise<T>): Promise<T | null> {
    Atomics.store(this.state, RunGate.BUSY, 1);
    try {
      // Checked after marking busy, so the pool either sees busy or this sees closing.
      if (Atomics.load(this.state, RunGate.CLOSING)) return null;
      return await work();
    } finally {
      Atomics.store(this.state, RunGate.BUSY, 0);
      Atomics.notify(this.state, RunGate.BUSY);
    }
  }

  /** Pool side: no run starts from now on. */
  close(): void {
    Atomics.store(this.state, RunGate.CLOSING, 1);
  }

  /** Pool side: resolves once no run is in progress. */
  async idle(): Promise<void> {
    // ES2024's Atomics.waitAsync (Node ≥ 16), not yet in this project's lib typings.
    const atomics = Atomics as unknown as {
      waitAsync(
        a: Int32Array,
        index: number,
        value: number,
      ): { async: boolean; value: Promise<string> | string };
    };
    const wait = atomics.waitAsync(this.state, RunGate.BUSY, 1);
    if (wait.async) await wait.value;
  }

  /** Pool side, blocking (for the 'exit' event): waits up to `ms` for the run in progress. */
  idleSync(ms: number): void {
    Atomics.wait(this.state, RunGate.BUSY, 1, ms);
  }
}

/** Gates of the ONNX Runtime workers alive in this process. */
const liveGates = new Set<RunGate>();
let exitHook = false;

function watchGate(gate: RunGate): void {
  liveGates.add(gate);
  if (exitHook) return;
  exitHook = true;
  process.on('exit', () => {
    for (const g of liveGates) g.close();
    // A batch chunk takes well under a second; the bound keeps a stuck run from hanging exit.
    const until = Date.now() + 10_000;
    for (const g of liveGates) g.idleSync(Math.max(0, until - Date.now()));
  });
}

/** Main → worker: `n` images (raw pixels, NHWC or for 'onnx' NCHW), the buffer transferred. */
export interface PoolRequest {
  readonly id: number;
  readonly data: Float32Array;
  readonly n: number;
}

/** Worker → main. An error with `id: null` is a load failure. */
export type PoolWorkerMessage =
  | { type: 'ready'; inputSize: number; outputSize: number }
  | {
      type: 'result';
      id: number;
      data: Float32Array;
      /** The request's pixels, transferred back for the next request to reuse. */
      input: Float32Array;
    }
  | ({ type: 'error'; id: number | null } & WorkerError);

/** An error thrown in a worker, as it crosses to the main thread. */
export interface WorkerError {
  message: string;
  name: string;
  exitCode?: number;
  stack?: string;
}

/** What a worker sends of an error it caught. */
export function workerError(err: unknown): WorkerError {
  const e = err as { message?: unknown; name?: unknown; exitCode?: unknown; stack?: unknown };
  return {
    message: typeof e?.message === 'string' ? e.message : String(err),
    name: typeof e?.name === 'string' ? e.name : 'Error',
    ...(typeof e?.exitCode === 'number' ? { exitCode: e.exitCode } : {}),
    ...(typeof e?.stack === 'string' ? { stack: e.stack } : {}),
  };
}

// Resolved next to this file: dist/src/engine/pool-worker.js once compiled. The ONNX Runtime
// worker is a file of its own, so it does not load tfjs.
const WORKER_URL = new URL('./pool-worker.js', import.meta.url);
const ONNX_WORKER_URL = new URL('./onnx/session-worker.js', import.meta.url);

interface Pending {
  resolve(data: Float32Array): void;
  reject(err: Error): void;
}

/** Turns a worker's error message back into an error thrown on this thread. */
function fromWorker(
  m: Extract<PoolWorkerMessage, { type: 'error' }>,
  name: string,
  stage: string,
): FinetuneError {
  // A FinetuneError keeps its wording and exit code, as if it had been thrown in-process.
  if (m.name === 'FinetuneError')
    return new FinetuneError(m.message, m.exitCode === undefined ? {} : { exitCode: m.exitCode });
  // Anything else is named by the worker; its own stack stays with it, as the cause.
  const cause = Object.assign(new Error(m.message), { name: m.name });
  if (m.stack) cause.stack = m.stack;
  return new FinetuneError(`${name} failed ${stage}: ${m.message}`, { exitCode: 1, cause });
}

/** One worker, its requests in flight, and why it died if it did. */
class Slot {
  readonly pending = new Map<number, Pending>();
  /** Buffers the worker handed back, to carry the next requests (see `send`). */
  private readonly spare: ArrayBuffer[] = [];
  readonly ready: Promise<{ inputSize: number; outputSize: number }>;
  failure: FinetuneError | null = null;
  closing = false;
  private resolveReady!: (info: { inputSize: number; outputSize: number }) => void;
  private rejectReady!: (err: Error) => void;

  readonly worker: Worker;
  private readonly stderr: () => string;

  constructor(
    started: { worker: Worker; stderr: () => string },
    /** How messages name this worker, e.g. 'tfjs pool worker 1'. */
    readonly name: string,
    readonly disposedMessage: string,
    private readonly gate: RunGate | null,
  ) {
    const { worker } = started;
    this.worker = worker;
    this.stderr = started.stderr;
    this.ready = new Promise((resolve, reject) => {
      this.resolveReady = resolve;
      this.rejectReady = reject;
    });
    worker.on('message', (m: PoolWorkerMessage) => this.onMessage(m));
    worker.on('messageerror', (err) => this.fail(`could not deserialise a message`, err));
    worker.on('error', (err) => this.fail(`crashed: ${err.message}`, err));
    worker.on('exit', (code) => this.fail(`exited (code ${code})`));
  }

  private onMessage(m: PoolWorkerMessage): void {
    if (m.type === 'ready') {
      this.resolveReady({ inputSize: m.inputSize, outputSize: m.outputSize });
      return;
    }
    if (m.type === 'error' && m.id === null) {
      this.rejectReady(fromWorker(m, this.name, 'to load its model'));
      return;
    }
    const p = this.pending.get(m.id!);
    if (!p) return;
    this.pending.delete(m.id!);
    if (m.type === 'result') {
      if (this.spare.length < 2) this.spare.push(m.input.buffer as ArrayBuffer);
      p.resolve(m.data);
    } else {
      p.reject(fromWorker(m, this.name, 'on a batch'));
    }
  }

  /** Rejects everything waiting on this worker; the first reason wins. */
  fail(reason: string, cause?: unknown): void {
    if (this.failure) return;
    const tail = this.stderr().split('\n').slice(-3).join(' | ');
    this.failure = this.closing
      ? new FinetuneError(this.disposedMessage, { exitCode: 1 })
      : new FinetuneError(`${this.name} ${reason}${tail ? ` (stderr: ${tail})` : ''}`, {
          exitCode: 1,
          cause,
        });
    this.rejectReady(this.failure);
    for (const p of this.pending.values()) p.reject(this.failure);
    this.pending.clear();
  }

  /** Rejects what is pending and ends the worker, once it is out of ONNX Runtime's `run`. */
  async stop(): Promise<void> {
    this.closing = true;
    // Whatever is pending rejects now, even a run that ends while the worker is awaited.
    this.fail('disposed');
    if (this.gate) {
      this.gate.close();
      await this.gate.idle();
      liveGates.delete(this.gate);
    }
    await this.worker.terminate();
  }

  /**
   * Sends `n` images, copied from `pixels` into a buffer that is transferred to the worker.
   * The worker hands each buffer back with its result, to be filled again rather than a
   * fresh one of megabytes allocated per batch (on the embedding bench: about 18 fewer page
   * faults an image, no change in images/s beyond the noise).
   */
  send(id: number, pixels: Float32Array, n: number): Promise<Float32Array> {
    if (this.failure) return Promise.reject(this.failure);
    const bytes = pixels.byteLength;
    const i = this.spare.findIndex((b) => b.byteLength >= bytes);
    const buffer = i >= 0 ? this.spare.splice(i, 1)[0]! : new ArrayBuffer(bytes);
    const data = new Float32Array(buffer, 0, pixels.length);
    data.set(pixels);
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      const request: PoolRequest = { id, data, n };
      this.worker.postMessage(request, [buffer]);
    });
  }
}

/**
 * A frozen pass on a pool of `worker_threads`, each with its own copy of the model. Each
 * batch is split into contiguous chunks, one per worker: each chunk is copied into a buffer
 * of that worker's, which crosses threads by transfer (and comes back with the outputs), so
 * the caller's batch is only read.
 *
 * - tfjs (`backbone` and `classifier` recipes): tfjs-backend-wasm has no threads in Node,
 *   so one worker per core is how a frozen pass uses every core (measured: 2 workers,
 *   1.87× on 2 cores).
 * - ONNX Runtime (`onnx` recipes): one single-threaded session per worker. Each worker
 *   runs whole graphs, with none of the per-operator hand-offs of one session's threads,
 *   and the calling thread stays free while they run (onnxruntime-node computes on the
 *   thread that calls it). On 2 cores, 1,000 images embedded by `train` with their decode:
 *   see the README's embedding figures.
 *
 * Call `dispose()` when done: live workers keep the process from exiting.
 */
export class WorkerPoolFrozenModel implements FrozenModel {
  readonly engine: 'tfjs' | 'onnx';
  readonly layout: 'nhwc' | 'nchw';
  private nextId = 0;
  /** Where the next small batch starts, so concurrent small runs spread over workers. */
  private nextSlot = 0;
  private disposed = false;

  private constructor(
    private readonly slots: readonly Slot[],
    readonly inputSize: number,
    readonly outputSize: number,
    engine: 'tfjs' | 'onnx',
  ) {
    this.engine = engine;
    this.layout = engine === 'onnx' ? 'nchw' : 'nhwc';
  }

  /** How many workers run batches. */
  get workers(): number {
    return this.slots.length;
  }

  /**
   * Starts the workers and waits until each has built its model. A load error in any
   * worker rejects with that worker's message (e.g. the missing file) after every
   * worker has been terminated.
   *
   * @example
   *   const pool = await WorkerPoolFrozenModel.create(
   *     { kind: 'backbone', backbone: 'nsfwjs_mobilenet_v2', options: {} },
   *     { workers: 2 },
   *   );
   *   try { features = await pool.run(pixels, n); } finally { await pool.dispose(); }
   */
  static async create(
    recipe: WorkerRecipe,
    options: WorkerPoolOptions = {},
  ): Promise<WorkerPoolFrozenModel> {
    const count = options.workers ?? availableParallelism();
    if (!Number.isInteger(count) || count < 1)
      throw invalidOption('workers', 'a positive integer', count);
    const backend = options.backend ?? 'wasm';
    if (backend !== 'wasm' && backend !== 'cpu')
      throw invalidOption('backend', "'wasm' or 'cpu'", backend);
    const onnx = recipe.kind === 'onnx';
    const what = onnx ? 'ONNX Runtime' : 'tfjs';
    const slots = Array.from({ length: count }, (_, i) => {
      const gate = onnx ? new RunGate() : null;
      if (gate) watchGate(gate);
      const data: PoolWorkerData = { recipe, backend, ...(gate ? { gate: gate.memory } : {}) };
      return new Slot(
        quietWorker(onnx ? ONNX_WORKER_URL : WORKER_URL, data),
        `${onnx ? 'ONNX Runtime worker' : 'tfjs pool worker'} ${i}`,
        `The ${what} worker pool was disposed`,
        gate,
      );
    });
    let infos: { inputSize: number; outputSize: number }[];
    try {
      infos = await Promise.all(slots.map((s) => s.ready));
    } catch (err) {
      await Promise.all(slots.map((s) => s.stop()));
      throw err;
    }
    const { inputSize, outputSize } = infos[0]!;
    return new WorkerPoolFrozenModel(slots, inputSize, outputSize, onnx ? 'onnx' : 'tfjs');
  }

  /**
   * Runs `n` images (raw pixels in `layout`, n × size × size × 3 floats) split over the
   * workers; resolves to n × outputSize floats in image order. `batch` is only read
   * (each chunk is copied before it is transferred). Safe to call concurrently.
   */
  async run(batch: Float32Array, n: number): Promise<Float32Array> {
    if (this.disposed) throw new FinetuneError(this.slots[0]!.disposedMessage, { exitCode: 1 });
    if (!Number.isInteger(n) || n < 0) throw invalidOption('n', 'a non-negative integer', n);
    const per = this.inputSize * this.inputSize * 3;
    if (batch.length < n * per) {
      throw new FinetuneError(
        `Expected at least ${n * per} floats for ${n} images of ${this.inputSize}×${this.inputSize}×3 but received ${batch.length}`,
      );
    }
    const out = new Float32Array(n * this.outputSize);
    if (n === 0) return out;
    const k = Math.min(n, this.slots.length);
    const first = this.nextSlot;
    this.nextSlot = (first + k) % this.slots.length;
    // Contiguous chunks whose sizes differ by at most one: ceil(n/k) for the first n % k.
    const base = Math.floor(n / k);
    const extra = n % k;
    const jobs: { from: number; count: number; result: Promise<Float32Array> }[] = [];
    let from = 0;
    for (let c = 0; c < k; c++) {
      const count = base + (c < extra ? 1 : 0);
      const slot = this.slots[(first + c) % this.slots.length]!;
      const chunk = batch.subarray(from * per, (from + count) * per);
      jobs.push({ from, count, result: slot.send(this.nextId++, chunk, count) });
      from += count;
    }
    const parts = await Promise.all(jobs.map((j) => j.result));
    for (let c = 0; c < k; c++) {
      const { from, count } = jobs[c]!;
      const part = parts[c]!;
      if (part.length !== count * this.outputSize) {
        throw new FinetuneError(
          `${this.slots[(first + c) % this.slots.length]!.name} returned ${part.length} floats for ${count} images (expected ${count * this.outputSize})`,
          { exitCode: 1 },
        );
      }
      out.set(part, from * this.outputSize);
    }
    return out;
  }

  /**
   * Terminates every worker (an ONNX Runtime worker once the run it is in returns); runs
   * still in flight reject. Calling again is free.
   */
  async dispose(): Promise<void> {
    if (this.disposed) return;
    this.disposed = true;
    await Promise.all(this.slots.map((s) => s.stop()));
  }
}
