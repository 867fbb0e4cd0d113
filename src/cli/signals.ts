import { removePendingSync } from '../index.js';

/** Exit codes of a run stopped by a signal (128 + the signal's number, as shells report it). */
export const SIGNAL_EXIT_CODES: Readonly<Record<'SIGINT' | 'SIGTERM', number>> = {
  SIGINT: 130,
  SIGTERM: 143,
};

/**
 * On SIGINT/SIGTERM: remove the staging folders and locks of runs in flight (an earlier
 * run folder stays as it was), say so in one line, and exit 130/143. In-flight work ends
 * with the process.
 */
export function exitCleanlyOnSignals(): void {
  for (const signal of Object.keys(SIGNAL_EXIT_CODES) as (keyof typeof SIGNAL_EXIT_CODES)[]) {
    process.once(signal, () => {
      removePendingSync();
      process.stderr.write(
        `finetune: stopped by ${signal}; the run folder was left as it was before (with --checkpoint-every: at its last checkpoint, for --resume)\n`,
      );
      process.exit(SIGNAL_EXIT_CODES[signal]);
    });
  }
}
