import { availableParallelism } from 'node:os';
import type { Worker } from 'node:worker_threads';
import { FinetuneError, invalidOption } from '../errors.js';
import { quietWorker } from '../util/worker.js';
import type { FrozenModel } from './types.js';

/**
 * How each worker builds its own copy of the model: JSON-serialisable, since it travels
 * as `workerData`.
 */
export type WorkerRecipe =
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
}

/** Main → worker: `n` images (NHWC, raw pixels), the buffer transferred. */
export interface PoolRequest {
  readonly id: number;
  readonly data: Float32Array;
  readonly n: number;
}

/** Worker → main. An error with `id: null` is a load failure. */
export type PoolWorkerMessage =
  | { type: 'ready'; inputSize: number; outputSize: number }
  | { type: 'result'; id: number; data: Float32Array }
  | { type: 'error'; id: number | null; message: string; name: string; exitCode?: number };

// Resolved next to this file: dist/src/engine/pool-worker.js once compiled.
const WORKER_URL = new URL('./pool-worker.js', import.meta.url);

interface Pending {
  resolve(data: Float32Array): void;
  reject(err: Error): void;
}

/** Turns a worker's error message back into an error thrown on this thread. */
function fromWorker(
  m: Extract<PoolWorkerMessage, { type: 'error' }>,
  index: number,
  stage: string,
): FinetuneError {
  // A FinetuneError keeps its wording and exit code, as if it had been thrown in-process.
  if (m.name === 'FinetuneError')
    return new FinetuneError(m.message, m.exitCode === undefined ? {} : { exitCode: m.exitCode });
  return new FinetuneError(`tfjs pool worker ${index} failed ${stage}: ${m.message}`, {
    exitCode: 1,
  });
}

/** One worker, its requests in flight, and why it died if it did. */
class Slot {
  readonly pending = new Map<number, Pending>();
  readonly ready: Promise<{ inputSize: number; outputSize: number }>;
  failure: FinetuneError | null = null;
  closing = false;
  private resolveReady!: (info: { inputSize: number; outputSize: number }) => void;
  private rejectReady!: (err: Error) => void;

  readonly worker: Worker;
  private readonly stderr: () => string;

  constructor(
    started: { worker: Worker; stderr: () => string },
    readonly index: number,
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
      this.rejectReady(fromWorker(m, this.index, 'to load its model'));
      return;
    }
    const p = this.pending.get(m.id!);
    if (!p) return;
    this.pending.delete(m.id!);
    if (m.type === 'result') p.resolve(m.data);
    else p.reject(fromWorker(m, this.index, 'on a batch'));
  }

  /** Rejects everything waiting on this worker; the first reason wins. */
  fail(reason: string, cause?: unknown): void {
    if (this.failure) return;
    const tail = this.stderr().split('\n').slice(-3).join(' | ');
    this.failure = this.closing
      ? new FinetuneError('The tfjs worker pool was disposed', { exitCode: 1 })
      : new FinetuneError(
          `tfjs pool worker ${this.index} ${reason}${tail ? ` (stderr: ${tail})` : ''}`,
          { exitCode: 1, cause },
        );
    this.rejectReady(this.failure);
    for (const p of this.pending.values()) p.reject(this.failure);
    this.pending.clear();
  }

  send(id: number, data: Float32Array, n: number): Promise<Float32Array> {
    if (this.failure) return Promise.reject(this.failure);
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      const request: PoolRequest = { id, data, n };
      this.worker.postMessage(request, [data.buffer as ArrayBuffer]);
    });
  }
}

/**
 * The tfjs engine on a pool of `worker_threads`: tfjs-backend-wasm has no threads in
 * Node, so one worker per core, each with its own backend and copy of the model, is
 * how a frozen pass uses every core (measured: 2 workers, 1.87× on 2 cores). Each batch
 * is split into contiguous chunks, one per worker; pixels and outputs are transferred,
 * not copied, across threads.
 *
 * Call `dispose()` when done: live workers keep the process from exiting.
 */
export class WorkerPoolFrozenModel implements FrozenModel {
  readonly engine = 'tfjs' as const;
  readonly layout = 'nhwc' as const;
  private nextId = 0;
  /** Where the next small batch starts, so concurrent small runs spread over workers. */
  private nextSlot = 0;
  private disposed = false;

  private constructor(
    private readonly slots: readonly Slot[],
    readonly inputSize: number,
    readonly outputSize: number,
  ) {}

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
    const data: PoolWorkerData = { recipe, backend };
    const slots = Array.from(
      { length: count },
      (_, i) => new Slot(quietWorker(WORKER_URL, data), i),
    );
    let infos: { inputSize: number; outputSize: number }[];
    try {
      infos = await Promise.all(slots.map((s) => s.ready));
    } catch (err) {
      for (const s of slots) s.closing = true;
      await Promise.all(slots.map((s) => s.worker.terminate()));
      throw err;
    }
    const { inputSize, outputSize } = infos[0]!;
    return new WorkerPoolFrozenModel(slots, inputSize, outputSize);
  }

  /**
   * Runs `n` images (NHWC raw pixels, n × size × size × 3 floats) split over the
   * workers; resolves to n × outputSize floats in image order. `batch` is only read
   * (each chunk is copied before it is transferred). Safe to call concurrently.
   */
  async run(batch: Float32Array, n: number): Promise<Float32Array> {
    if (this.disposed)
      throw new FinetuneError('The tfjs worker pool was disposed', { exitCode: 1 });
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
      // slice copies into a fresh ArrayBuffer, which can be transferred whole.
      const chunk = batch.slice(from * per, (from + count) * per);
      jobs.push({ from, count, result: slot.send(this.nextId++, chunk, count) });
      from += count;
    }
    const parts = await Promise.all(jobs.map((j) => j.result));
    for (let c = 0; c < k; c++) {
      const { from, count } = jobs[c]!;
      const part = parts[c]!;
      if (part.length !== count * this.outputSize) {
        throw new FinetuneError(
          `tfjs pool worker returned ${part.length} floats for ${count} images (expected ${count * this.outputSize})`,
          { exitCode: 1 },
        );
      }
      out.set(part, from * this.outputSize);
    }
    return out;
  }

  /** Terminates every worker; runs still in flight reject. Calling again is free. */
  async dispose(): Promise<void> {
    if (this.disposed) return;
    this.disposed = true;
    for (const s of this.slots) s.closing = true;
    await Promise.all(this.slots.map((s) => s.worker.terminate()));
  }
}
