import { randomBytes } from 'node:crypto';
import { lstat, rename, unlink, writeFile } from 'node:fs/promises';
import { threadId } from 'node:worker_threads';

/** Suffix of the temp files `writeFileAtomic` leaves behind when its writer is killed. */
export const TMP_EXT = '.tmp';

/**
 * A temp name next to `final`, unique across processes and worker threads (pid alone is
 * shared by every thread of a process; the random part covers the rest).
 */
export function tempName(final: string): string {
  return `${final}.${process.pid}.${threadId}.${randomBytes(6).toString('hex')}${TMP_EXT}`;
}

/**
 * Writes `data` to a unique temp file next to `final` and renames it into place, which
 * is atomic on one filesystem: a reader sees the old complete file or the new complete
 * file, never a half-written one. The temp file is removed if anything fails.
 */
export async function writeFileAtomic(final: string, data: Uint8Array | string): Promise<void> {
  const tmp = tempName(final);
  try {
    await writeFile(tmp, data);
    await rename(tmp, final);
  } catch (err) {
    await unlink(tmp).catch(() => {});
    throw err;
  }
}

/** Whether anything exists at `file` (a file, a folder, a dangling link). */
export async function exists(file: string): Promise<boolean> {
  try {
    await lstat(file);
    return true;
  } catch {
    return false;
  }
}
