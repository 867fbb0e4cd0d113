import type { FileHandle } from 'node:fs/promises';
import { mkdir, mkdtemp, open, rm, statfs, unlink } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';

/**
 * Decoded images kept between passes over one list of files, by position in the list: a
 * later pass takes an image from here instead of reading, hashing and decoding its file
 * again. `key` is the sha256 of the file's bytes when it was decoded.
 */
export interface KeptPixels {
  /** The kept image's key, or null when image `index` is not kept. */
  key(index: number): string | null;
  /** The kept image's pixels, or null when it is not kept (or can no longer be read). */
  pixels(index: number): Promise<Uint8Array | null>;
  put(index: number, key: string, pixels: Uint8Array): Promise<void>;
}

/** A PixelStore not opened because the disk has too little room for it; the message says why. */
export class PixelStoreRefused extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'PixelStoreRefused';
  }
}

const gigabytes = (bytes: number): string => `${(bytes / 2 ** 30).toFixed(1)} GB`;

/**
 * KeptPixels in one file of fixed-size records (image i at byte i × recordBytes), on disk
 * rather than in the heap: 1,000 images at 224 are 150 MB, which the page cache holds while
 * memory allows and gives back when it does not. The file is removed as soon as it is
 * open (on POSIX it lives on, nameless, until closed), so not even SIGKILL leaves it behind;
 * where removing an open file fails, `close` removes it. A write that fails (a full disk)
 * turns keeping off: later passes decode again, as without the store, and `failure` says why.
 */
export class PixelStore implements KeptPixels {
  private readonly keys: (string | undefined)[] = [];
  private closed = false;
  /** Why keeping stopped (the first failed write), or null. */
  failure: string | null = null;

  private constructor(
    private readonly file: FileHandle,
    private readonly dir: string,
    private readonly named: boolean,
    readonly recordBytes: number,
  ) {}

  /**
   * A store for up to `records` images in a new folder under `parent` (default: the OS
   * temporary folder). Refused (PixelStoreRefused) when they would take more than half the
   * space free there: the cache and the run folder need the disk more.
   */
  static async open(
    recordBytes: number,
    records: number,
    parent: string = os.tmpdir(),
  ): Promise<PixelStore> {
    await mkdir(parent, { recursive: true });
    const need = recordBytes * records;
    const fs = await statfs(parent).catch(() => null);
    const free = fs ? fs.bavail * fs.bsize : Number.POSITIVE_INFINITY;
    if (need > free / 2) {
      throw new PixelStoreRefused(
        `${records} decoded images would take ${gigabytes(need)}, more than half the ${gigabytes(free)} free in ${parent}`,
      );
    }
    const dir = await mkdtemp(path.join(parent, 'pixels-'));
    const name = path.join(dir, 'pixels.bin');
    const file = await open(name, 'w+');
    let named = true;
    try {
      await unlink(name);
      await rm(dir, { recursive: true, force: true });
      named = false;
    } catch {
      // Windows may refuse to remove an open file: close() does.
    }
    return new PixelStore(file, dir, named, recordBytes);
  }

  key(index: number): string | null {
    return this.closed ? null : (this.keys[index] ?? null);
  }

  async pixels(index: number): Promise<Uint8Array | null> {
    if (this.closed || this.keys[index] === undefined) return null;
    const pixels = new Uint8Array(this.recordBytes);
    const { bytesRead } = await this.file.read(
      pixels,
      0,
      this.recordBytes,
      index * this.recordBytes,
    );
    return bytesRead === this.recordBytes ? pixels : null;
  }

  async put(index: number, key: string, pixels: Uint8Array): Promise<void> {
    if (this.failure !== null || this.closed || pixels.length !== this.recordBytes) return;
    try {
      const { bytesWritten } = await this.file.write(
        pixels,
        0,
        this.recordBytes,
        index * this.recordBytes,
      );
      if (bytesWritten !== this.recordBytes) throw new Error('short write');
      this.keys[index] = key;
    } catch (err) {
      this.failure = (err as NodeJS.ErrnoException).code ?? (err as Error).message ?? String(err);
    }
  }

  /** Whether `close` was called. */
  get isClosed(): boolean {
    return this.closed;
  }

  /** Images kept so far. */
  get size(): number {
    return this.keys.reduce((n, k) => n + (k === undefined ? 0 : 1), 0);
  }

  /** Closes (and so frees) the file; idempotent. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.file.close();
    if (this.named) await rm(this.dir, { recursive: true, force: true });
  }
}
