/**
 * A child process that runs one sweep run needing the backbone (a fine-tune stage):
 * prepare, embed (from the shared on-disk cache), then the run's phases. It takes one
 * job over IPC and answers with the run's result row; train events are forwarded.
 */
import { FinetuneError } from '../errors.js';
import type { TrainEvent } from '../train/events.js';
import { embedSplits, prepareRun } from '../train/run.js';
import { checkCounts } from '../train/train.js';
import { childThreadOptions } from './config.js';
import { CountingCache, executeRun, type RunJob } from './execute.js';
import type { ResultRow } from './results.js';

export type ChildMessage =
  | { type: 'event'; event: TrainEvent }
  | { type: 'done'; row: ResultRow }
  | { type: 'error'; message: string };

function send(message: ChildMessage): Promise<void> {
  return new Promise((resolve) => {
    if (!process.send) resolve();
    else process.send(message, undefined, {}, () => resolve());
  });
}

async function runJob(job: RunJob): Promise<void> {
  const { run } = job;
  const emit = (event: TrainEvent): void => {
    // A summary is already in the row; the rest is small.
    if (event.type !== 'done') void send({ type: 'event', event });
  };
  const prepared = await prepareRun({
    ...run.given,
    seed: run.splitSeed,
    out: run.options.out,
    ...(job.threads !== undefined ? childThreadOptions(run.options, job.threads) : {}),
    onEvent: emit,
  });
  try {
    const cache = prepared.cache ? new CountingCache(prepared.cache.dir) : null;
    const shared = { ...prepared, cache };
    const t0 = performance.now();
    const embedded = await embedSplits(shared);
    const counts = checkCounts(shared, embedded);
    const { row } = await executeRun(shared, embedded, counts, job, {
      emit,
      keepHead: false,
      cache,
      before: { ...prepared.seconds, embed: (performance.now() - t0) / 1000 },
    });
    await send({ type: 'done', row });
  } finally {
    prepared.dispose();
  }
}

let finished = false;
// The parent gone (killed), nothing is left to report to.
process.on('disconnect', () => {
  if (!finished) process.exit(1);
});
process.once('message', (job: RunJob) => {
  runJob(job)
    .catch((err: unknown) =>
      send({
        type: 'error',
        message: err instanceof FinetuneError || err instanceof Error ? err.message : String(err),
      }),
    )
    .finally(() => {
      finished = true;
      // Every message was flushed (send waits for it); engine thread pools must not keep us.
      process.disconnect();
      process.exit(0);
    });
});
