import { Worker } from 'node:worker_threads';

/** How much of a worker's stderr is kept to explain its end. */
export const STDERR_TAIL = 2000;

/**
 * A worker thread whose output the library keeps to itself (it never prints): stdout is
 * read and dropped (left unread it would fill), and the tail of stderr is kept for the
 * message should the worker end. `stderr()` gives that tail, trimmed.
 */
export function quietWorker(
  script: URL,
  workerData: unknown,
): { worker: Worker; stderr: () => string } {
  const worker = new Worker(script, { workerData, stdout: true, stderr: true });
  worker.stdout.resume();
  worker.stderr.setEncoding('utf8');
  let tail = '';
  worker.stderr.on('data', (chunk: string) => {
    tail = (tail + chunk).slice(-STDERR_TAIL);
  });
  return { worker, stderr: () => tail.trim() };
}
