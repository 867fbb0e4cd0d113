import { Worker } from 'node:worker_threads';
import { FinetuneError } from '../errors.js';
import { positiveInteger } from '../util/is.js';
import type { Layout, Preprocess } from './decode.js';
import type { DecodeJob, DecodeReply } from './decode-worker.js';

/** What one image's decode into shared memory came to: written, or why the file is unusable. */
export type DecodeIntoResult =
  | { readonly ok: true }
  | { readonly ok: false; readonly reason: string };

interface Pending {
  readonly resolve: (r: DecodeIntoResult) => void;
  readonly reject: (err: Error) => void;
}

interface Member {
  readonly worker: Worker;
  readonly pending: Map<number, Pending>;
}

/**
 * Worker threads that decode images (sharp), resize them by the preprocessing contract and
 * write the model's float input straight into a SharedArrayBuffer: the same values as
 * `toModelInput(decodeImage(...).pixels, ...)` on the calling thread, computed elsewhere,
 * so the thread that runs the engine only reads files and runs batches.
 *
 * A file that cannot be used resolves to `{ ok: false, reason }` (the reasons of
 * `decodeImage`); a worker that dies rejects its jobs in flight and every later one.
 * `close()` ends the workers; jobs still in flight reject. Workers do not keep the process
 * alive while idle.
 *
 * @example
 *   const pool = DecodePool.start(1);
 *   try { await pool.decodeInto(bytes, job, shared, 0); } finally { await pool.close(); }
 */
export class DecodePool {
  private readonly members: Member[];
  private nextId = 0;
  private failure: Error | null = null;
  private closed = false;

  private constructor(members: Member[]) {
    this.members = members;
  }

  /** Starts `workers` decode workers (they load sharp on their own, in the background). */
  static start(workers: number): DecodePool {
    positiveInteger('decodeWorkers', workers);
    const url = new URL('./decode-worker.js', import.meta.url);
    const members: Member[] = [];
    const pool = new DecodePool(members);
    for (let i = 0; i < workers; i++) {
      // No inherited Node flags: some (--input-type, --eval) make a worker refuse to start,
      // and none matter to decoding.
      const member: Member = { worker: new Worker(url, { execArgv: [] }), pending: new Map() };
      member.worker.unref();
      member.worker.on('message', (reply: DecodeReply) => pool.settle(member, reply));
      member.worker.on('error', (err) => pool.fail(err));
      member.worker.on('exit', (code) => {
        if (!pool.closed) pool.fail(new Error(`a decode worker exited (code ${code})`));
      });
      members.push(member);
    }
    return pool;
  }

  /**
   * Decodes `bytes` (an image file's content, copied to the worker) to `size × size` and
   * writes it as `toModelInput` would into `target` from element `offset`.
   */
  decodeInto(
    bytes: Uint8Array,
    job: {
      readonly size: number;
      readonly maxPixels: number;
      readonly maxBytes: number;
      readonly pre: Preprocess;
      readonly layout: Layout;
    },
    target: Float32Array,
    offset: number,
  ): Promise<DecodeIntoResult> {
    if (this.failure) return Promise.reject(this.failure);
    if (this.closed)
      return Promise.reject(
        new FinetuneError('The decode pool was used after close()', { exitCode: 1 }),
      );
    if (!(target.buffer instanceof SharedArrayBuffer) || target.byteOffset !== 0) {
      throw new FinetuneError(
        'decodeInto writes into a Float32Array over a whole SharedArrayBuffer',
        { exitCode: 1 },
      );
    }
    // The least busy worker; ties go to the first.
    const member = this.members.reduce((a, b) => (b.pending.size < a.pending.size ? b : a));
    const id = this.nextId++;
    // A copy of exactly the file's bytes, moved to the worker: small files share Node's
    // buffer pool, which must not be transferred.
    const own = Uint8Array.prototype.slice.call(bytes);
    const message: DecodeJob = { id, bytes: own, ...job, target: target.buffer, offset };
    return new Promise<DecodeIntoResult>((resolve, reject) => {
      member.pending.set(id, { resolve, reject });
      if (member.pending.size === 1) member.worker.ref();
      member.worker.postMessage(message, [own.buffer]);
    });
  }

  /** Ends the workers; resolves once they have exited. Jobs in flight reject. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const gone = new FinetuneError('The decode pool was closed with jobs in flight', {
      exitCode: 1,
    });
    for (const m of this.members) this.rejectAll(m, gone);
    await Promise.all(this.members.map((m) => m.worker.terminate()));
  }

  private settle(member: Member, reply: DecodeReply): void {
    const job = member.pending.get(reply.id);
    if (!job) return;
    member.pending.delete(reply.id);
    if (member.pending.size === 0) member.worker.unref();
    if ('error' in reply)
      job.reject(new FinetuneError(`Decoding failed: ${reply.error}`, { exitCode: 1 }));
    else job.resolve(reply.ok ? { ok: true } : { ok: false, reason: reply.reason });
  }

  private fail(err: Error): void {
    this.failure ??= new FinetuneError(`A decode worker failed: ${err.message}`, {
      cause: err,
      exitCode: 1,
    });
    for (const m of this.members) this.rejectAll(m, this.failure);
  }

  private rejectAll(member: Member, err: Error): void {
    for (const job of member.pending.values()) job.reject(err);
    member.pending.clear();
    member.worker.unref();
  }
}
