import { randomBytes } from 'node:crypto';
import {
  closeSync,
  constants,
  type Dirent,
  fstatSync,
  openSync,
  readdirSync,
  readSync,
  type Stats,
  utimesSync,
} from 'node:fs';
import { mkdir, open, readdir, readFile, rmdir, stat, unlink, utimes } from 'node:fs/promises';
import { endianness, homedir } from 'node:os';
import path from 'node:path';
import { threadId } from 'node:worker_threads';
import { FinetuneError, invalidOption } from '../errors.js';
import { TMP_EXT, writeFileAtomic } from '../io/atomic.js';
import { sha256 } from '../io/hash.js';
import { nonEmptyString, nonNegativeInteger, positiveInteger } from '../util/is.js';

/**
 * An on-disk, content-addressed store of embeddings, keyed by (namespace, image bytes).
 *
 * Layout: `<dir>/embeddings/<namespaceId>/namespace.json` plus pack files
 * `<dir>/embeddings/<namespaceId>/<writer>.pack`, where a key is the sha256 of an image
 * file's bytes. Everything that changes the embedding of the same bytes (backbone, its
 * weights, cut layer, input size, preprocessing, augmentation view) is in the namespace, so a
 * stale entry is never looked up rather than having to be detected.
 *
 * Each cache object that stores entries appends them to a pack of its own (named by time,
 * pid, thread and a random part), one write per batch: a cold pass over 1,000 images creates
 * one file, not 1,000. A pack only grows, by whole records written at its end, so a killed
 * writer leaves at most one record cut short at the end of its pack, and nothing else ever
 * writes there. Pack record (little-endian), records back to back from offset 0:
 *
 * | offset | size | field                                  |
 * |--------|------|----------------------------------------|
 * | 0      | 4    | magic `TFEP`                           |
 * | 4      | 4    | element count n (uint32)               |
 * | 8      | 32   | key (the sha256, raw)                  |
 * | 40     | 8    | first 8 bytes of sha256(key ‖ payload) |
 * | 48     | 4n   | float32 payload                        |
 *
 * A reader indexes a namespace's packs once per cache object, reading record headers only,
 * and stops in a pack at a record cut short (it may be still being written: a later scan
 * goes on from there) or at bytes that are not a record (nothing after them is read). On a
 * miss it scans again for what other processes appended, at most once a second. A record is
 * checked when read (magic, length, key, checksum); one that fails is a miss and is computed
 * and stored again.
 *
 * Entries of the earlier format, one file each at `<namespaceId>/<key[0..2]>/<key>.bin`, are
 * still read, counted and cleared; nothing new is written there:
 *
 * | offset | size | field                                  |
 * |--------|------|----------------------------------------|
 * | 0      | 4    | magic `TFEC`                           |
 * | 4      | 4    | format version (uint32, 1)             |
 * | 8      | 4    | element count n (uint32)               |
 * | 12     | 8    | first 8 bytes of sha256(payload)       |
 * | 20     | 4n   | float32 payload                        |
 *
 * Lowered models (ONNX graphs the engine made from a layers model) live beside them, one file
 * per key: `<dir>/onnx/<id>.lowered`, id = the first 32 hex chars of sha256(canonical key).
 *
 * | offset | size | field                                          |
 * |--------|------|------------------------------------------------|
 * | 0      | 4    | magic `TFLO`                                   |
 * | 4      | 4    | format version (uint32, 1)                     |
 * | 8      | 4    | key JSON length m (uint32)                     |
 * | 12     | 32   | sha256(key JSON ‖ model)                       |
 * | 44     | m    | the key as canonical JSON                      |
 * | 44 + m | rest | the ONNX ModelProto bytes                      |
 *
 * Lowered models and `namespace.json` go to a unique `*.tmp` file in the same folder, renamed
 * over the final name, which is atomic on one filesystem: a reader opens either the old
 * complete file or the new complete file, never a half-written one, and a killed writer
 * leaves only a `*.tmp`.
 */

/** What an embedding depends on besides the image bytes; one namespace = one folder. */
export interface CacheNamespace {
  backboneId: string;
  /** A hash of the backbone's weight files, so replaced weights never reuse old entries. */
  weightsHash: string;
  /** The cut layer's name, or `'features'` for the backbone's own feature output. */
  layer: string;
  inputSize: number;
  /** A stable string describing resize and normalisation, e.g. `'cover-bilinear;[-1,1]'`. */
  preprocessing: string;
  /** The augmentation view id; `'plain'` for the unaugmented image. */
  view: string;
}

export interface CacheNamespaceInfo {
  /** The namespace folder's name (32 hex chars). */
  id: string;
  /** `'unknown'` (and empty layer/view, inputSize 0) when `namespace.json` is missing or bad. */
  backboneId: string;
  layer: string;
  inputSize: number;
  view: string;
  /** Records in its packs plus entry files of the earlier format. */
  entries: number;
  bytes: number;
  /** ISO time of the newest last use (a pack's or entry file's mtime), or null without entries. */
  lastUsed: string | null;
}

/** What a lowered ONNX graph depends on: the same key finds the same graph in the next run. */
export interface LoweredModelKey {
  backboneId: string;
  /** The backbone's weights hash (it covers the edited topology: input size, cut, normalisation). */
  weightsHash: string;
  /** Where the graph ends: null for the whole body, else the layer a fine-tune prefix is cut at. */
  cut: string | null;
  /** The lowering's version: a new lowering never reads an old one's graph. */
  lowering: number;
}

export interface LoweredModelInfo {
  /** The file's id (32 hex chars). */
  id: string;
  /** `'unknown'` (cut null, lowering 0) when the file's header cannot be read. */
  backboneId: string;
  cut: string | null;
  lowering: number;
  bytes: number;
  /** ISO time of the last use (the file's mtime). */
  lastUsed: string;
}

export interface CacheInfo {
  dir: string;
  /** Embedding entries, and their bytes. */
  entries: number;
  bytes: number;
  namespaces: CacheNamespaceInfo[];
  /** Lowered ONNX models kept for the engine. */
  lowered: { count: number; bytes: number; models: LoweredModelInfo[] };
  /** `*.tmp` files of writers that are running or were killed (`clear` removes those older than a minute). */
  temp: { count: number; bytes: number };
}

export interface CacheClearResult {
  /** Embedding entries removed. */
  removed: number;
  /** Lowered models removed. */
  lowered: number;
  /** Stray `*.tmp` files removed. */
  temp: number;
  /** Bytes freed: entries, lowered models and stray temp files. */
  bytes: number;
}

/**
 * A cache operation that failed (a read-only or full disk, a cache folder that is a file, an
 * entry that is not a regular file, a damaged lowered model). With `onFailure`, the cache
 * reports it and carries on as if the cache were not there for that operation: the cache
 * is an accelerator, never a requirement.
 */
export interface CacheFailure {
  /**
   * `read`: a file could not be read (or is not a regular file); `write`: nothing more is
   * written by this cache object; `damaged`: a lowered model failed its checksum (it was
   * removed and is lowered again). A damaged embedding entry is a plain miss, not a failure.
   */
  readonly kind: 'read' | 'write' | 'damaged';
  readonly path: string;
  /** One line: `cache: <file>: <what happened>; <what the run does instead>`. */
  readonly message: string;
  readonly cause?: unknown;
}

export interface EmbeddingCacheOptions {
  /**
   * Called for every cache failure instead of throwing it; `get`/`getLowered` then miss and
   * `put`/`putLowered` do nothing. Without it, failures throw (kind 'internal', exit 1).
   */
  onFailure?: (failure: CacheFailure) => void;
}

export interface CacheClearOptions {
  /** Only namespaces and lowered models of this backbone id. */
  backbone?: string;
  /**
   * Only packs, entry files and lowered models last used longer ago than this many
   * milliseconds. A pack is one writer's entries, and a read of any of them is a use of all.
   */
  olderThanMs?: number;
}

const PACK_MAGIC = 0x50454654; // 'TFEP' read as a little-endian uint32
const PACK_HEADER_BYTES = 48;
const PACK_EXT = '.pack';
/** A record longer than this (1 GiB of floats) is not one this code wrote. */
const MAX_RECORD_FLOATS = 1 << 28;
/** A miss scans the namespace's packs again (for other writers' records) at most this often. */
const RESCAN_MS = 1000;
const SHARD_PATTERN = /^[0-9a-f]{2}$/;
const MAGIC = 0x43454654; // 'TFEC' read as a little-endian uint32
const VERSION = 1;
const HEADER_BYTES = 20;
const CHECKSUM_BYTES = 8;
const ENTRY_EXT = '.bin';
const NAMESPACE_FILE = 'namespace.json';
const LOWERED_MAGIC = 0x4f4c4654; // 'TFLO' read as a little-endian uint32
const LOWERED_VERSION = 1;
const LOWERED_HEADER_BYTES = 44;
const LOWERED_EXT = '.lowered';
/** Files of the first lowering cache (`<weights hash>-lowering<N>.onnx`, no checksum): cleared, never read. */
const LEGACY_LOWERED = /^[0-9a-f]{64}-lowering\d+\.onnx$/;
/** A key JSON longer than this is not one this code wrote. */
const MAX_KEY_BYTES = 64 * 1024;
/**
 * Touch an entry on read only if its mtime is older than this, so reading a large cache
 * does not turn every hit into a metadata write; `--older-than` works in hours/days anyway.
 */
const TOUCH_AFTER_MS = 60 * 60 * 1000;
/** A `*.tmp` younger than this may belong to a writer that is still running. */
const STRAY_TMP_MS = 60 * 1000;
const LITTLE_ENDIAN = endianness() === 'LE';
const KEY_PATTERN = /^[0-9a-f]{64}$/;
const ID_PATTERN = /^[0-9a-f]{32}$/;

/**
 * `$XDG_CACHE_HOME/tfjs-finetune` when XDG_CACHE_HOME is set to an absolute path (the XDG spec
 * says relative values are invalid and must be ignored), else `~/.cache/tfjs-finetune`.
 */
export function defaultCacheDir(): string {
  const xdg = process.env['XDG_CACHE_HOME'];
  if (xdg && path.isAbsolute(xdg)) return path.join(xdg, 'tfjs-finetune');
  return path.join(homedir(), '.cache', 'tfjs-finetune');
}

function isMissing(err: unknown): boolean {
  const code = (err as NodeJS.ErrnoException)?.code;
  return code === 'ENOENT' || code === 'ENOTDIR';
}

/** A cache file that cannot be read or written: not the user's input, so not a usage error. */
function cacheError(file: string, reason: string, cause: unknown): FinetuneError {
  return new FinetuneError(`${file}: ${reason}`, { kind: 'internal', cause });
}

function errorText(err: unknown): string {
  return (err as Error)?.message ?? String(err);
}

async function listDir(dir: string): Promise<Dirent[]> {
  try {
    return await readdir(dir, { withFileTypes: true });
  } catch (err) {
    if (isMissing(err)) return [];
    throw cacheError(dir, `cannot read cache folder (${errorText(err)})`, err);
  }
}

async function statOrNull(file: string): Promise<Stats | null> {
  try {
    return await stat(file);
  } catch {
    return null;
  }
}

/** The first CHECKSUM_BYTES of sha256(payload). */
function checksum(payload: Uint8Array): Buffer {
  return Buffer.from(sha256(payload).slice(0, 2 * CHECKSUM_BYTES), 'hex');
}

/** `values` as little-endian float32 bytes, written into `out`. */
function writeFloats(values: Float32Array, out: Buffer): void {
  if (LITTLE_ENDIAN) out.set(new Uint8Array(values.buffer, values.byteOffset, values.byteLength));
  else for (let i = 0; i < values.length; i++) out.writeFloatLE(values[i]!, i * 4);
}

/**
 * `length` floats from little-endian bytes. A copy rather than a view: a Buffer from the pool
 * may sit at an offset that is not a multiple of 4, which a Float32Array view cannot start at.
 */
function readFloats(payload: Buffer, length: number): Float32Array {
  const out = new Float32Array(length);
  if (LITTLE_ENDIAN) new Uint8Array(out.buffer).set(payload.subarray(0, length * 4));
  else for (let i = 0; i < length; i++) out[i] = payload.readFloatLE(i * 4);
  return out;
}

/** The payload of a well-formed entry of `length` floats, or null for anything else. */
function decodeEntry(bytes: Buffer, length: number): Float32Array | null {
  if (bytes.length !== HEADER_BYTES + length * 4) return null;
  if (bytes.readUInt32LE(0) !== MAGIC || bytes.readUInt32LE(4) !== VERSION) return null;
  if (bytes.readUInt32LE(8) !== length) return null;
  const payload = bytes.subarray(HEADER_BYTES);
  if (!checksum(payload).equals(bytes.subarray(12, 12 + CHECKSUM_BYTES))) return null;
  return readFloats(payload, length);
}

/** First CHECKSUM_BYTES of sha256(key ‖ payload): a record's checksum. */
function recordChecksum(record: Buffer): Buffer {
  const digest = sha256(record.subarray(8, 40), record.subarray(PACK_HEADER_BYTES));
  return Buffer.from(digest.slice(0, 2 * CHECKSUM_BYTES), 'hex');
}

/** One pack record: header + little-endian float32 payload. */
function encodeRecord(key: string, values: Float32Array): Buffer {
  const out = Buffer.allocUnsafe(PACK_HEADER_BYTES + values.length * 4);
  writeFloats(values, out.subarray(PACK_HEADER_BYTES));
  out.writeUInt32LE(PACK_MAGIC, 0);
  out.writeUInt32LE(values.length, 4);
  out.write(key, 8, 32, 'hex');
  recordChecksum(out).copy(out, 40);
  return out;
}

/** The payload of a whole, well-formed record of `key` with `length` floats, or null. */
function decodeRecord(bytes: Buffer, key: string, length: number): Float32Array | null {
  if (bytes.length !== PACK_HEADER_BYTES + length * 4) return null;
  if (bytes.readUInt32LE(0) !== PACK_MAGIC || bytes.readUInt32LE(4) !== length) return null;
  if (bytes.toString('hex', 8, 40) !== key) return null;
  if (!recordChecksum(bytes).equals(bytes.subarray(40, PACK_HEADER_BYTES))) return null;
  return readFloats(bytes.subarray(PACK_HEADER_BYTES), length);
}

/** A pack file name of its own: time first, so names sort by when the writer started. */
function packName(): string {
  const time = Date.now().toString(36).padStart(9, '0');
  return `${time}-${process.pid}-${threadId}-${randomBytes(4).toString('hex')}${PACK_EXT}`;
}

/** Where a record of a pack starts, and its element count. */
interface PackEntry {
  readonly file: string;
  readonly offset: number;
  readonly length: number;
}

/** How far a pack has been indexed. */
interface PackScan {
  /** The end of the last whole record indexed: the next scan starts here. */
  end: number;
  /** Records indexed. */
  records: number;
  /** Bytes that are not a record were found at `end`: nothing more is read from this pack. */
  bad: boolean;
  /** The pack's mtime when last scanned or touched (its last use). */
  mtimeMs: number;
}

/** A namespace's packs as far as this object has indexed them. */
interface NamespaceIndex {
  readonly dir: string;
  readonly entries: Map<string, PackEntry>;
  readonly packs: Map<string, PackScan>;
  /** Whether the folder has shard folders of the earlier one-file-per-entry format. */
  loose: boolean;
  scannedAt: number;
}

/**
 * Indexes the records of a pack from `scan.end` on, calling `found` for each whole one.
 * Synchronous: record headers at known offsets, one small read each (the asynchronous
 * API would make each a round trip through libuv's thread pool). A pack that is gone
 * leaves `scan` as it was; one that is not a regular file throws `NotAFile`, unread.
 */
function scanPack(
  file: string,
  scan: PackScan,
  found: (key: string, offset: number, length: number) => void,
): void {
  let fd: number;
  try {
    // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
    fd = openSync(file, constants.O_RDONLY | constants.O_NONBLOCK);
  } catch (err) {
    if (isMissing(err)) return;
    throw err;
  }
  try {
    const st = fstatSync(fd);
    if (!st.isFile()) throw new NotAFile(file);
    scan.mtimeMs = st.mtimeMs;
    const header = Buffer.alloc(PACK_HEADER_BYTES);
    while (!scan.bad && scan.end + PACK_HEADER_BYTES <= st.size) {
      if (readSync(fd, header, 0, PACK_HEADER_BYTES, scan.end) !== PACK_HEADER_BYTES) break;
      const length = header.readUInt32LE(4);
      if (header.readUInt32LE(0) !== PACK_MAGIC || length > MAX_RECORD_FLOATS) {
        scan.bad = true;
        break;
      }
      const size = PACK_HEADER_BYTES + 4 * length;
      if (scan.end + size > st.size) break; // cut short, or still being written
      found(header.toString('hex', 8, 40), scan.end, length);
      scan.records++;
      scan.end += size;
    }
  } finally {
    closeSync(fd);
  }
}

function newScan(): PackScan {
  return { end: 0, records: 0, bad: false, mtimeMs: 0 };
}

/**
 * Appends `data` to `file` (a short write goes on from where it stopped, so a full disk
 * ends in its own error); resolves to the offset it was written at.
 */
async function append(file: string, data: Buffer): Promise<number> {
  const handle = await open(file, 'a');
  try {
    // The writer of a pack is its only writer, and writes one batch at a time.
    const offset = (await handle.stat()).size;
    for (let at = 0; at < data.length; ) {
      const { bytesWritten } = await handle.write(data, at, data.length - at);
      if (bytesWritten === 0) throw new Error(`wrote nothing at byte ${at} of ${data.length}`);
      at += bytesWritten;
    }
    return offset;
  } finally {
    await handle.close();
  }
}

/**
 * The embedding cache rooted at `dir` (see `defaultCacheDir()`); nothing is created on disk
 * until the first `put`. Safe to share between processes: see the file comment.
 */
export class EmbeddingCache {
  readonly dir: string;
  /** Namespace folders whose `namespace.json` this process has already checked. */
  private readonly described = new Set<string>();
  private readonly onFailure: ((failure: CacheFailure) => void) | null;
  /** Set at the first failed write when failures are reported: later writes are skipped. */
  private writesOff = false;
  /** Entries that are not regular files: never read or written again by this object. */
  private readonly unusable = new Set<string>();
  /** Per namespace folder: its packs as indexed so far. */
  private readonly indexes = new Map<string, NamespaceIndex>();
  /** Per namespace folder: the pack this object appends to. */
  private readonly writing = new Map<string, string>();
  /** Pack writes, one at a time, so each knows the offset it lands at. */
  private writes: Promise<void> = Promise.resolve();

  constructor(dir: string, options: EmbeddingCacheOptions = {}) {
    this.dir = path.resolve(nonEmptyString('cache-dir', dir));
    this.onFailure = options.onFailure ?? null;
  }

  /**
   * Reports a failure when asked to (saying what the run does `instead`), else throws it.
   */
  private fail(
    kind: CacheFailure['kind'],
    file: string,
    reason: string,
    instead: string,
    cause?: unknown,
  ): void {
    if (!this.onFailure) throw cacheError(file, reason, cause);
    if (kind === 'write') this.writesOff = true;
    this.onFailure({
      kind,
      path: file,
      message: `cache: ${file}: ${reason}; ${instead}`,
      ...(cause === undefined ? {} : { cause }),
    });
  }

  /** Reads a cache file; a failure is reported (or thrown) and is a miss. */
  private async read(file: string): Promise<{ bytes: Buffer; st: Stats } | null> {
    if (this.unusable.has(file)) return null;
    try {
      return await readChecked(file);
    } catch (err) {
      if (err instanceof NotAFile) this.unusable.add(file);
      this.readFailed(file, err);
      return null;
    }
  }

  /** Reports (or throws) a cache file that could not be read: what it holds is computed. */
  private readFailed(file: string, err: unknown, what = 'cannot read'): void {
    if (err instanceof NotAFile) {
      this.fail('read', file, 'not a regular file', 'what it would hold is computed, not cached');
    } else {
      const reason = `${what} (${errorText(err)})`;
      this.fail('read', file, reason, 'computed instead of read from the cache', err);
    }
  }

  /** Whether a write should be tried at all. */
  private writable(file: string): boolean {
    return !this.writesOff && !this.unusable.has(file);
  }

  private writeFailed(file: string, err: unknown): void {
    const reason = `cannot write (${errorText(err)})`;
    this.fail('write', file, reason, 'nothing more is stored in the cache during this run', err);
  }

  /** The namespace's folder name: sha256 of its canonical JSON, first 32 hex chars. */
  namespaceId(ns: CacheNamespace): string {
    return sha256(canonicalNamespace(ns)).slice(0, 32);
  }

  /** The key of an image: sha256 hex of its file bytes. */
  key(imageBytes: Uint8Array): string {
    return sha256(imageBytes);
  }

  /** Where an entry file of the earlier format for `key` in `ns` lives (it may not exist). */
  entryPath(ns: CacheNamespace, key: string): string {
    checkKey(key);
    return path.join(this.namespaceDir(ns), key.slice(0, 2), `${key}${ENTRY_EXT}`);
  }

  /** The pack this object appends `ns`'s entries to, or null before its first store. */
  packPath(ns: CacheNamespace): string | null {
    return this.writing.get(this.namespaceDir(ns)) ?? null;
  }

  /**
   * The cached embedding of `length` floats, or null on a miss. A damaged record (bad
   * magic, length, key or checksum) is a miss, and so is a damaged entry file of the
   * earlier format, which is deleted.
   */
  async get(ns: CacheNamespace, key: string, length: number): Promise<Float32Array | null> {
    nonNegativeInteger('length', length);
    checkKey(key);
    const index = this.index(ns);
    let entry = index.entries.get(key);
    if (!entry && Date.now() - index.scannedAt >= RESCAN_MS) {
      this.scan(index);
      entry = index.entries.get(key);
    }
    if (entry) {
      const values = this.readRecord(index, entry, key, length);
      if (values) return values;
      index.entries.delete(key);
    }
    return index.loose ? this.getFile(ns, key, length) : null;
  }

  /** An entry file of the earlier format; a damaged one is deleted. */
  private async getFile(
    ns: CacheNamespace,
    key: string,
    length: number,
  ): Promise<Float32Array | null> {
    const file = this.entryPath(ns, key);
    const read = await this.read(file);
    if (!read) return null;
    const { bytes, st } = read;
    const values = decodeEntry(bytes, length);
    if (!values) {
      await unlinkIfSame(file, st);
      return null;
    }
    if (Date.now() - st.mtimeMs > TOUCH_AFTER_MS) {
      const t = new Date();
      // mtime doubles as "last used"; atime is unreliable (noatime/relatime mounts).
      await utimes(file, t, t).catch(() => {});
    }
    return values;
  }

  /** The namespace's index, made on first use. */
  private index(ns: CacheNamespace): NamespaceIndex {
    const dir = this.namespaceDir(ns);
    let index = this.indexes.get(dir);
    if (!index) {
      index = { dir, entries: new Map(), packs: new Map(), loose: false, scannedAt: 0 };
      this.indexes.set(dir, index);
      this.scan(index);
    }
    return index;
  }

  /** Indexes what the namespace's packs gained since the last scan (other writers' records). */
  private scan(index: NamespaceIndex): void {
    index.scannedAt = Date.now();
    let names: Dirent[];
    try {
      names = readdirSync(index.dir, { withFileTypes: true });
    } catch (err) {
      if (!isMissing(err)) this.readFailed(index.dir, err, 'cannot read cache folder');
      return;
    }
    index.loose = names.some((d) => d.isDirectory() && SHARD_PATTERN.test(d.name));
    for (const d of names) {
      if (!d.name.endsWith(PACK_EXT)) continue;
      const file = path.join(index.dir, d.name);
      let pack = index.packs.get(file);
      if (!pack) {
        pack = newScan();
        index.packs.set(file, pack);
      }
      if (pack.bad) continue;
      try {
        scanPack(file, pack, (key, offset, length) =>
          index.entries.set(key, { file, offset, length }),
        );
      } catch (err) {
        // Never read again by this object: one warning.
        pack.bad = true;
        this.readFailed(file, err);
      }
    }
  }

  /** A record's payload, or null when it is gone or fails its checks. */
  private readRecord(
    index: NamespaceIndex,
    entry: PackEntry,
    key: string,
    length: number,
  ): Float32Array | null {
    if (entry.length !== length) return null;
    const bytes = Buffer.allocUnsafe(PACK_HEADER_BYTES + length * 4);
    let got: number;
    try {
      const fd = openSync(entry.file, constants.O_RDONLY | constants.O_NONBLOCK);
      try {
        got = readSync(fd, bytes, 0, bytes.length, entry.offset);
      } finally {
        closeSync(fd);
      }
    } catch (err) {
      if (!isMissing(err)) this.readFailed(entry.file, err);
      return null;
    }
    const values = got === bytes.length ? decodeRecord(bytes, key, length) : null;
    if (values) this.touch(index, entry.file);
    return values;
  }

  /** Marks a pack used (its mtime), at most once an hour: `clear --older-than` reads it. */
  private touch(index: NamespaceIndex, file: string): void {
    const pack = index.packs.get(file);
    const now = Date.now();
    if (!pack || now - pack.mtimeMs <= TOUCH_AFTER_MS) return;
    pack.mtimeMs = now;
    try {
      utimesSync(file, now / 1000, now / 1000);
    } catch {
      // last use only informs `clear --older-than`
    }
  }

  /** Stores `values` under `key` in `ns`: `putMany` with one entry. */
  async put(ns: CacheNamespace, key: string, values: Float32Array): Promise<void> {
    return this.putMany(ns, [{ key, values }]);
  }

  /**
   * Stores entries of `ns` in one write at the end of this object's pack (made at the first
   * store), so a batch costs one write however many images it holds. Concurrent calls are
   * written one after the other.
   */
  async putMany(
    ns: CacheNamespace,
    entries: ReadonlyArray<{ readonly key: string; readonly values: Float32Array }>,
  ): Promise<void> {
    for (const { key, values } of entries) {
      checkKey(key);
      if (!(values instanceof Float32Array))
        throw invalidOption('values', 'a Float32Array', values);
    }
    // This object's records join the namespace's index as they are written.
    const index = this.index(ns);
    const dir = index.dir;
    if (entries.length === 0) return;
    const records = entries.map(({ key, values }) => encodeRecord(key, values));
    const data = records.length === 1 ? records[0]! : Buffer.concat(records);
    const write = async (): Promise<void> => {
      // Two tries: a concurrent `clear` may remove the namespace folder under the pack.
      for (let attempt = 0; !this.writesOff; attempt++) {
        let file = this.writing.get(dir);
        try {
          if (!file) {
            const created = await mkdir(dir, { recursive: true });
            await this.describe(ns, created !== undefined);
            file = path.join(dir, packName());
            this.writing.set(dir, file);
          }
          let offset = await append(file, data);
          let pack = index.packs.get(file);
          if (!pack) {
            pack = newScan();
            index.packs.set(file, pack);
          }
          if (pack.end === offset) {
            // What a scan would find: it need not read these records again.
            pack.end += data.length;
            pack.records += records.length;
            pack.mtimeMs = Date.now();
          }
          records.forEach((record, i) => {
            const { key, values } = entries[i]!;
            index.entries.set(key, { file: file!, offset, length: values.length });
            offset += record.length;
          });
          return;
        } catch (err) {
          if (attempt === 0 && isMissing(err)) {
            this.writing.delete(dir);
            continue;
          }
          if (err instanceof FinetuneError) throw err;
          this.writeFailed(file ?? dir, err);
        }
      }
    };
    const done = this.writes.then(write);
    this.writes = done.catch(() => {});
    return done;
  }

  /** Where the lowered model for `key` lives (it may not exist). */
  loweredPath(key: LoweredModelKey): string {
    return path.join(this.loweredDir(), `${loweredId(key)}${LOWERED_EXT}`);
  }

  /**
   * The cached ONNX bytes lowered for `key`, or null on a miss. A damaged file (bad header,
   * checksum or key) is deleted and reported as a miss, so the model is lowered again.
   */
  async getLowered(key: LoweredModelKey): Promise<Uint8Array | null> {
    const file = this.loweredPath(key);
    const read = await this.read(file);
    if (!read) return null;
    const { bytes, st } = read;
    const decoded = decodeLowered(bytes);
    if (!decoded || decoded.keyJson !== canonicalLoweredKey(key)) {
      await unlinkIfSame(file, st);
      if (this.onFailure) {
        const reason = 'damaged lowered model (bad header or checksum)';
        this.fail('damaged', file, reason, 'removed and lowered again');
      }
      return null;
    }
    if (Date.now() - st.mtimeMs > TOUCH_AFTER_MS) {
      const t = new Date();
      await utimes(file, t, t).catch(() => {});
    }
    return decoded.model;
  }

  /** Stores the ONNX bytes lowered for `key`, atomically (temp file + rename). */
  async putLowered(key: LoweredModelKey, model: Uint8Array): Promise<void> {
    if (!(model instanceof Uint8Array)) throw invalidOption('model', 'a Uint8Array', model);
    const file = this.loweredPath(key);
    if (!this.writable(file)) return;
    const keyJson = Buffer.from(canonicalLoweredKey(key));
    const header = Buffer.alloc(LOWERED_HEADER_BYTES);
    header.writeUInt32LE(LOWERED_MAGIC, 0);
    header.writeUInt32LE(LOWERED_VERSION, 4);
    header.writeUInt32LE(keyJson.length, 8);
    Buffer.from(sha256(keyJson, model), 'hex').copy(header, 12);
    try {
      await mkdir(path.dirname(file), { recursive: true });
      await writeFileAtomic(file, Buffer.concat([header, keyJson, model]));
    } catch (err) {
      this.writeFailed(file, err);
    }
  }

  /** Entry counts and sizes per namespace, the lowered models, and the `*.tmp` files. */
  async info(): Promise<CacheInfo> {
    const namespaces: CacheNamespaceInfo[] = [];
    const temp = { count: 0, bytes: 0 };
    for (const id of await this.namespaceIds()) {
      const nsDir = path.join(this.embeddingsDir(), id);
      const meta = await readNamespaceFile(nsDir);
      let entries = 0;
      let bytes = 0;
      let last = -Infinity;
      for (const { file, st, entries: held } of await listEntries(nsDir, true)) {
        if (file.endsWith(TMP_EXT)) {
          temp.count++;
          temp.bytes += st.size;
          continue;
        }
        entries += held;
        bytes += st.size;
        last = Math.max(last, st.mtimeMs);
      }
      namespaces.push({
        id,
        backboneId: meta?.backboneId ?? 'unknown',
        layer: meta?.layer ?? '',
        inputSize: meta?.inputSize ?? 0,
        view: meta?.view ?? '',
        entries,
        bytes,
        lastUsed: entries ? new Date(last).toISOString() : null,
      });
    }
    namespaces.sort(
      (a, b) =>
        a.backboneId.localeCompare(b.backboneId) ||
        a.layer.localeCompare(b.layer) ||
        a.inputSize - b.inputSize ||
        a.view.localeCompare(b.view) ||
        a.id.localeCompare(b.id),
    );
    const models: LoweredModelInfo[] = [];
    for (const { file, st, key, isTmp } of await this.listLowered(true)) {
      if (isTmp) {
        temp.count++;
        temp.bytes += st.size;
        continue;
      }
      models.push({
        id: path
          .basename(file)
          .replace(/\.[a-z]+$/, '')
          .slice(0, 32),
        backboneId: key?.backboneId ?? 'unknown',
        cut: key?.cut ?? null,
        lowering: key?.lowering ?? 0,
        bytes: st.size,
        lastUsed: new Date(st.mtimeMs).toISOString(),
      });
    }
    models.sort(
      (a, b) =>
        a.backboneId.localeCompare(b.backboneId) ||
        (a.cut ?? '').localeCompare(b.cut ?? '') ||
        a.id.localeCompare(b.id),
    );
    return {
      dir: this.dir,
      entries: namespaces.reduce((s, n) => s + n.entries, 0),
      bytes: namespaces.reduce((s, n) => s + n.bytes, 0),
      namespaces,
      lowered: {
        count: models.length,
        bytes: models.reduce((s, m) => s + m.bytes, 0),
        models,
      },
      temp,
    };
  }

  /**
   * Removes entries and lowered models: all of them by default, only a backbone's with
   * `backbone`, only those last used more than `olderThanMs` ago with `olderThanMs`. Also
   * removes `*.tmp` files older than a minute (left by killed writers) and namespace folders
   * left empty. `bytes` includes the removed temp files.
   */
  async clear(options: CacheClearOptions = {}): Promise<CacheClearResult> {
    const backbone =
      options.backbone === undefined ? undefined : nonEmptyString('backbone', options.backbone);
    const olderThanMs =
      options.olderThanMs === undefined ? undefined : olderThan(options.olderThanMs);
    const now = Date.now();
    let removed = 0;
    let temp = 0;
    let bytes = 0;
    for (const id of await this.namespaceIds()) {
      const nsDir = path.join(this.embeddingsDir(), id);
      if (backbone !== undefined) {
        const meta = await readNamespaceFile(nsDir);
        if (meta?.backboneId !== backbone) continue;
      }
      let kept = 0;
      for (const { file, st, entries } of await listEntries(nsDir, true)) {
        const isTmp = file.endsWith(TMP_EXT);
        const old = now - st.mtimeMs;
        const match = isTmp ? old > STRAY_TMP_MS : olderThanMs === undefined || old > olderThanMs;
        if (!match) {
          kept++;
          continue;
        }
        try {
          await unlink(file);
        } catch (err) {
          if (isMissing(err)) continue;
          throw cacheError(file, `cannot remove cache entry (${errorText(err)})`, err);
        }
        bytes += st.size;
        if (isTmp) temp++;
        else removed += entries;
      }
      await removeEmptyShards(nsDir);
      if (kept === 0) {
        // A concurrent put may be recreating this folder; its files make rmdir fail, which is
        // fine, and put rewrites namespace.json when it has to create the folder.
        await unlink(path.join(nsDir, NAMESPACE_FILE)).catch(() => {});
        await rmdir(nsDir).catch(() => {});
      }
    }
    let lowered = 0;
    for (const { file, st, key, isTmp } of await this.listLowered(true)) {
      const old = now - st.mtimeMs;
      const match = isTmp
        ? old > STRAY_TMP_MS
        : (backbone === undefined || key?.backboneId === backbone) &&
          (olderThanMs === undefined || old > olderThanMs);
      if (!match) continue;
      try {
        await unlink(file);
      } catch (err) {
        if (isMissing(err)) continue;
        throw cacheError(file, `cannot remove lowered model (${errorText(err)})`, err);
      }
      bytes += st.size;
      if (isTmp) temp++;
      else lowered++;
    }
    await rmdir(this.loweredDir()).catch(() => {});
    // What this object had indexed may be gone: the next lookup indexes afresh.
    this.indexes.clear();
    return { removed, lowered, temp, bytes };
  }

  private embeddingsDir(): string {
    return path.join(this.dir, 'embeddings');
  }

  private loweredDir(): string {
    return path.join(this.dir, 'onnx');
  }

  /** The lowered-model files with their stats and keys (null: unreadable or legacy). */
  private async listLowered(
    withTmp = false,
  ): Promise<{ file: string; st: Stats; key: LoweredModelKey | null; isTmp: boolean }[]> {
    const out: { file: string; st: Stats; key: LoweredModelKey | null; isTmp: boolean }[] = [];
    for (const d of await listDir(this.loweredDir())) {
      const isTmp = d.name.endsWith(TMP_EXT);
      const ours =
        (d.name.endsWith(LOWERED_EXT) && ID_PATTERN.test(d.name.slice(0, -LOWERED_EXT.length))) ||
        LEGACY_LOWERED.test(d.name);
      if (!(ours || (withTmp && isTmp))) continue;
      const file = path.join(this.loweredDir(), d.name);
      const st = await statOrNull(file);
      if (!st?.isFile()) continue;
      const key = d.name.endsWith(LOWERED_EXT) ? await readLoweredKey(file) : null;
      out.push({ file, st, key, isTmp });
    }
    return out;
  }

  private namespaceDir(ns: CacheNamespace): string {
    return path.join(this.embeddingsDir(), this.namespaceId(ns));
  }

  private async namespaceIds(): Promise<string[]> {
    return (await listDir(this.embeddingsDir()))
      .filter((d) => d.isDirectory() && ID_PATTERN.test(d.name))
      .map((d) => d.name);
  }

  /** Writes `namespace.json` once per folder (again if the folder was just recreated). */
  private async describe(ns: CacheNamespace, recheck: boolean): Promise<void> {
    const nsDir = this.namespaceDir(ns);
    if (!recheck && this.described.has(nsDir)) return;
    const file = path.join(nsDir, NAMESPACE_FILE);
    if (!(await statOrNull(file))) {
      const record = { ...JSON.parse(canonicalNamespace(ns)), createdAt: new Date().toISOString() };
      await writeFileAtomic(file, `${JSON.stringify(record, null, 2)}\n`);
    }
    this.described.add(nsDir);
  }
}

/** JSON of the namespace with a fixed key order, so equal namespaces hash equally. */
function canonicalNamespace(ns: CacheNamespace): string {
  if (typeof ns !== 'object' || ns === null) throw invalidOption('namespace', 'an object', ns);
  return JSON.stringify({
    backboneId: nonEmptyString('namespace.backboneId', ns.backboneId),
    inputSize: positiveInteger('namespace.inputSize', ns.inputSize),
    layer: nonEmptyString('namespace.layer', ns.layer),
    preprocessing: nonEmptyString('namespace.preprocessing', ns.preprocessing),
    view: nonEmptyString('namespace.view', ns.view),
    weightsHash: nonEmptyString('namespace.weightsHash', ns.weightsHash),
  });
}

/** The key as JSON with a fixed field order, checked. */
function canonicalLoweredKey(key: LoweredModelKey): string {
  if (typeof key !== 'object' || key === null) throw invalidOption('lowered key', 'an object', key);
  if (key.cut !== null) nonEmptyString('lowered key.cut', key.cut);
  return JSON.stringify({
    backboneId: nonEmptyString('lowered key.backboneId', key.backboneId),
    cut: key.cut,
    lowering: positiveInteger('lowered key.lowering', key.lowering),
    weightsHash: nonEmptyString('lowered key.weightsHash', key.weightsHash),
  });
}

function loweredId(key: LoweredModelKey): string {
  return sha256(canonicalLoweredKey(key)).slice(0, 32);
}

/** The key JSON and model bytes of a well-formed lowered-model file, or null. */
function decodeLowered(bytes: Buffer): { keyJson: string; model: Uint8Array } | null {
  if (bytes.length < LOWERED_HEADER_BYTES) return null;
  if (bytes.readUInt32LE(0) !== LOWERED_MAGIC || bytes.readUInt32LE(4) !== LOWERED_VERSION)
    return null;
  const m = bytes.readUInt32LE(8);
  if (m > MAX_KEY_BYTES || LOWERED_HEADER_BYTES + m > bytes.length) return null;
  const rest = bytes.subarray(LOWERED_HEADER_BYTES);
  if (sha256(rest) !== bytes.subarray(12, LOWERED_HEADER_BYTES).toString('hex')) return null;
  // A copy, so the bytes handed to ONNX Runtime start at offset 0 of their own buffer.
  return { keyJson: rest.subarray(0, m).toString('utf8'), model: new Uint8Array(rest.subarray(m)) };
}

/** The key in a lowered-model file's header (without reading the model), or null. */
async function readLoweredKey(file: string): Promise<LoweredModelKey | null> {
  try {
    const handle = await open(file, 'r');
    try {
      const header = Buffer.alloc(LOWERED_HEADER_BYTES);
      const { bytesRead } = await handle.read(header, 0, LOWERED_HEADER_BYTES, 0);
      if (bytesRead !== LOWERED_HEADER_BYTES || header.readUInt32LE(0) !== LOWERED_MAGIC)
        return null;
      const m = header.readUInt32LE(8);
      if (m > MAX_KEY_BYTES) return null;
      const json = Buffer.alloc(m);
      await handle.read(json, 0, m, LOWERED_HEADER_BYTES);
      const key = JSON.parse(json.toString('utf8')) as LoweredModelKey;
      canonicalLoweredKey(key);
      return key;
    } finally {
      await handle.close();
    }
  } catch {
    return null;
  }
}

/** A cache path that exists but is not a regular file (a folder, a FIFO, a device). */
class NotAFile extends Error {}

/**
 * A file's bytes and the stats of what was read, or null when it does not exist. Anything
 * but a regular file is refused unread (a FIFO would block, a device never end).
 */
async function readChecked(file: string): Promise<{ bytes: Buffer; st: Stats } | null> {
  let handle: Awaited<ReturnType<typeof open>>;
  try {
    // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
    handle = await open(file, constants.O_RDONLY | constants.O_NONBLOCK);
  } catch (err) {
    if (isMissing(err)) return null;
    throw err;
  }
  try {
    const st = await handle.stat();
    if (!st.isFile()) throw new NotAFile(file);
    return { bytes: await handle.readFile(), st };
  } finally {
    await handle.close();
  }
}

/**
 * Deletes `file` only if it is still the one that was read: another process may have just
 * renamed a good file over it, and that one must survive.
 */
async function unlinkIfSame(file: string, st: Stats): Promise<void> {
  const now = await statOrNull(file);
  if (now && now.ino === st.ino && now.dev === st.dev && now.mtimeMs === st.mtimeMs) {
    await unlink(file).catch(() => {});
  }
}

function olderThan(ms: unknown): number {
  if (typeof ms !== 'number' || !Number.isFinite(ms) || ms < 0) {
    throw invalidOption('older-than', 'a non-negative number of milliseconds', ms);
  }
  return ms;
}

/** Keys become file names, so anything but a sha256 hex digest could escape the folder. */
function checkKey(key: string): void {
  if (typeof key !== 'string' || !KEY_PATTERN.test(key)) {
    throw invalidOption('key', 'a sha256 hex digest (64 lowercase hex chars)', key);
  }
}

async function readNamespaceFile(nsDir: string): Promise<CacheNamespace | null> {
  try {
    const parsed = JSON.parse(await readFile(path.join(nsDir, NAMESPACE_FILE), 'utf8'));
    canonicalNamespace(parsed);
    return parsed as CacheNamespace;
  } catch {
    return null;
  }
}

/**
 * The packs and entry files (`*.bin`) of a namespace folder with their stats and how many
 * entries each holds (a pack's whole records); with `withTmp` also the temp files, in the
 * shard folders and next to `namespace.json` (0 entries). Files that vanish while listing
 * (a concurrent clear) are skipped.
 */
async function listEntries(
  nsDir: string,
  withTmp = false,
): Promise<{ file: string; st: Stats; entries: number }[]> {
  const out: { file: string; st: Stats; entries: number }[] = [];
  const add = async (file: string, entries: number) => {
    const st = await statOrNull(file);
    if (st?.isFile()) out.push({ file, st, entries });
  };
  for (const d of await listDir(nsDir)) {
    if (d.isDirectory()) {
      const shard = path.join(nsDir, d.name);
      for (const f of await listDir(shard)) {
        if (f.name.endsWith(ENTRY_EXT)) await add(path.join(shard, f.name), 1);
        else if (withTmp && f.name.endsWith(TMP_EXT)) await add(path.join(shard, f.name), 0);
      }
    } else if (d.name.endsWith(PACK_EXT) && d.isFile()) {
      const file = path.join(nsDir, d.name);
      const scan = newScan();
      try {
        scanPack(file, scan, () => {});
      } catch {
        // unreadable: listed with its size, entries unknown
      }
      await add(file, scan.records);
    } else if (withTmp && d.name.endsWith(TMP_EXT)) {
      await add(path.join(nsDir, d.name), 0);
    }
  }
  return out;
}

async function removeEmptyShards(nsDir: string): Promise<void> {
  for (const d of await listDir(nsDir)) {
    // rmdir fails on a non-empty folder, which is exactly the check wanted.
    if (d.isDirectory()) await rmdir(path.join(nsDir, d.name)).catch(() => {});
  }
}
