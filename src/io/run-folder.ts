import { randomBytes } from 'node:crypto';
import { rmSync } from 'node:fs';
import { mkdir, mkdtemp, open, readdir, readFile, rename, rm, stat } from 'node:fs/promises';
import path from 'node:path';
import { FinetuneError, fileError } from '../errors.js';
import { exists } from './atomic.js';

/**
 * A run folder written as a transaction: the run writes into a hidden staging folder
 * beside `out` (`.NAME.partial-XXXXXX`, visibly incomplete), and `commit` moves it into
 * place whole, replacing an earlier run folder of the same name. A lock file beside it
 * (`.NAME.lock`, holding the writer's pid) refuses a second run into the same `out`.
 */
export interface RunFolder {
  /** Where the run ends up. */
  readonly out: string;
  /** Where the run writes until `commit`. */
  readonly staging: string;
  /** Moves the staging folder into place (replacing an earlier run folder) and releases the lock. */
  commit(): Promise<void>;
  /** Removes the staging folder and releases the lock; the earlier run folder, if any, stays as it was. */
  abandon(): Promise<void>;
}

/** Files that mark a folder as a run folder of this toolkit (so replacing it loses nothing else). */
const RUN_MARKERS = ['summary.json', 'config.json', 'model'];

/** Paths to remove if the process is stopped by a signal before a run commits or abandons. */
const pending = new Set<string>();

/**
 * Removes every staging folder and lock of runs still in flight, synchronously: for a
 * SIGINT/SIGTERM handler, which has no time for promises.
 */
export function removePendingSync(): void {
  for (const p of pending) {
    try {
      rmSync(p, { recursive: true, force: true });
    } catch {
      // best effort: the process is going down
    }
  }
  pending.clear();
}

function errnoCode(err: unknown): string | undefined {
  return (err as NodeJS.ErrnoException)?.code;
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return errnoCode(err) === 'EPERM';
  }
}

async function takeLock(lock: string, out: string): Promise<void> {
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      const handle = await open(lock, 'wx');
      await handle.writeFile(`${process.pid}\n`);
      await handle.close();
      return;
    } catch (err) {
      if (errnoCode(err) !== 'EEXIST') throw err;
      const pid = Number.parseInt(await readFile(lock, 'utf8').catch(() => ''), 10);
      if (Number.isInteger(pid) && pid > 0 && alive(pid)) {
        throw new FinetuneError(
          `${out}: another run (pid ${pid}) is writing this run folder; wait for it or choose another --out`,
        );
      }
      // The writer died without releasing it: a stale lock, and its staging folders are debris.
      const dir = path.dirname(lock);
      const prefix = `${path.basename(lock).slice(0, -'lock'.length)}partial-`;
      for (const name of await readdir(dir)) {
        if (name.startsWith(prefix))
          await rm(path.join(dir, name), { recursive: true, force: true });
      }
      await rm(lock, { force: true });
    }
  }
  throw new FinetuneError(`${out}: could not lock the run folder`);
}

/**
 * With the lock held, no other writer works on `out`, so what a killed one left beside it
 * goes: the config-only folder of a first checkpoint that was never moved in
 * (`.NAME.checkpoint-*`, see checkpoint.ts) and, when `out` exists, earlier run folders it
 * replaced but did not yet delete (`.NAME.old-*`). Without `out`, an `.old-*` folder may be
 * the only copy of the earlier run, so it stays.
 */
async function removeDebris(parent: string, name: string, out: string): Promise<void> {
  const debris = [`.${name}.checkpoint-`, ...((await exists(out)) ? [`.${name}.old-`] : [])];
  for (const entry of await readdir(parent)) {
    if (debris.some((prefix) => entry.startsWith(prefix)))
      await rm(path.join(parent, entry), { recursive: true, force: true });
  }
}

/** Checks that `out` can be a run folder: absent, empty, or an earlier run folder. */
async function checkTarget(out: string): Promise<void> {
  let st: Awaited<ReturnType<typeof stat>>;
  try {
    st = await stat(out);
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') return;
    if (errnoCode(err) === 'ENOTDIR')
      throw fileError(out, 'cannot be a run folder: a parent is a file');
    throw err;
  }
  if (!st.isDirectory()) throw fileError(out, 'is a file, not a run folder');
  const entries = await readdir(out);
  if (entries.length && !entries.some((e) => RUN_MARKERS.includes(e))) {
    throw fileError(
      out,
      'exists and is not a run folder (no summary.json, config.json or model/); choose another --out',
    );
  }
}

/**
 * Opens a run folder for writing: checks `out` and its parent are usable (before any
 * work, so a bad --out fails at once), takes the lock and makes the staging folder.
 */
export async function openRunFolder(out: string): Promise<RunFolder> {
  const target = path.resolve(out);
  await checkTarget(target);
  const parent = path.dirname(target);
  const name = path.basename(target);
  try {
    await mkdir(parent, { recursive: true });
  } catch (err) {
    const code = errnoCode(err);
    const reason =
      code === 'ENOTDIR' || code === 'EEXIST'
        ? 'a parent is a file'
        : code === 'EACCES' || code === 'EPERM' || code === 'EROFS'
          ? 'permission denied'
          : String((err as Error).message);
    throw fileError(out, `cannot be created: ${reason}`);
  }
  const lock = path.join(parent, `.${name}.lock`);
  try {
    await takeLock(lock, out);
  } catch (err) {
    if (err instanceof FinetuneError) throw err;
    const code = errnoCode(err);
    throw fileError(
      out,
      code === 'EACCES' || code === 'EPERM' || code === 'EROFS'
        ? 'cannot write here: permission denied'
        : `cannot write here: ${(err as Error).message}`,
    );
  }
  pending.add(lock);
  await removeDebris(parent, name, target);
  let staging: string;
  try {
    staging = await mkdtemp(path.join(parent, `.${name}.partial-`));
  } catch (err) {
    pending.delete(lock);
    await rm(lock, { force: true });
    throw fileError(out, `cannot write here: ${(err as Error).message}`);
  }
  pending.add(staging);
  const release = async (): Promise<void> => {
    pending.delete(staging);
    pending.delete(lock);
    await rm(lock, { force: true });
  };
  return {
    out: target,
    staging,
    async commit() {
      let old: string | null = null;
      if (await exists(target)) {
        old = path.join(parent, `.${name}.old-${randomBytes(4).toString('hex')}`);
        await rename(target, old);
      }
      await rename(staging, target);
      await release();
      if (old) await rm(old, { recursive: true, force: true });
    },
    async abandon() {
      await rm(staging, { recursive: true, force: true });
      await release();
    },
  };
}
