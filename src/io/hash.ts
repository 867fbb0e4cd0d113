import { createHash } from 'node:crypto';

/**
 * sha256 hex of some byte arrays and strings, in order: the one hash behind weights hashes,
 * cache keys, namespace ids and checksums.
 *
 * @example sha256(imageBytes) // → '9f86d0…' (64 hex chars)
 */
export function sha256(...parts: ReadonlyArray<Uint8Array | string>): string {
  const h = createHash('sha256');
  for (const p of parts) h.update(p);
  return h.digest('hex');
}
