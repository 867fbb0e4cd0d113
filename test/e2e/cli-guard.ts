import { spawn } from 'node:child_process';
import path from 'node:path';
import { CLI, type Run } from '../helpers.js';

export interface GuardedRun extends Run {
  /** True when the kill timer ended the run (a hang). */
  readonly killed: boolean;
}

/**
 * Runs the real CLI like `runCli`, but kills it after `timeoutMs` (default 60 s), so a
 * regression that hangs (a FIFO, /dev/zero) fails the test instead of stalling CI.
 * `nodeArgs` go before the script (e.g. `--import` of a fault-injecting module).
 */
export function runCliGuarded(
  args: readonly string[],
  cwd: string,
  options: { timeoutMs?: number; env?: Record<string, string>; nodeArgs?: readonly string[] } = {},
): Promise<GuardedRun> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [...(options.nodeArgs ?? []), CLI, ...args], {
      cwd,
      env: {
        ...process.env,
        FINETUNE_DEBUG: '',
        XDG_CACHE_HOME: path.join(cwd, '.cache'),
        ...options.env,
      },
    });
    let stdout = '';
    let stderr = '';
    let killed = false;
    const timer = setTimeout(() => {
      killed = true;
      child.kill('SIGKILL');
    }, options.timeoutMs ?? 60_000);
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    child.on('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr, killed });
    });
  });
}
