/**
 * One error type and one wording for everything the toolkit rejects, and one table of
 * exit codes for every command.
 */

/**
 * What the CLI exits with. `usage`: a bad option, flag or path given by the user;
 * `data`: the data cannot be used (no usable images, every input skipped, labels that do
 * not match the model); `internal`: anything else (a bug, an engine failure, a full disk).
 */
export const EXIT_CODES = Object.freeze({ ok: 0, internal: 1, usage: 2, data: 3 });

export type ErrorKind = 'usage' | 'data' | 'internal';

const KIND_OF_CODE: Readonly<Record<number, ErrorKind>> = Object.freeze({
  [EXIT_CODES.internal]: 'internal',
  [EXIT_CODES.usage]: 'usage',
  [EXIT_CODES.data]: 'data',
});

export interface FinetuneErrorOptions {
  /** Default 'usage'. */
  kind?: ErrorKind;
  /** Same as `kind`, given as its code in EXIT_CODES (a code outside the table means internal). */
  exitCode?: number;
  cause?: unknown;
  /** The option a bad value was given for, by its library name (see `invalidOption`). */
  option?: string;
  /**
   * The message again with every option it names shown another way (for a message that
   * names several, e.g. options given without what they need).
   */
  renamed?: (shown: (key: string) => string) => string;
}

export class FinetuneError extends Error {
  readonly kind: ErrorKind;
  /** `EXIT_CODES[kind]`: what the CLI exits with. */
  readonly exitCode: number;
  /**
   * The option a bad value was given for (the library's name, e.g. `batchSize`), so a caller
   * can name it in its own vocabulary (the CLI's `--batch-size`): see `renameOption`.
   */
  readonly option: string | undefined;
  /** See FinetuneErrorOptions.renamed. */
  readonly renamed: ((shown: (key: string) => string) => string) | undefined;
  constructor(message: string, options: FinetuneErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'FinetuneError';
    this.option = options.option;
    this.renamed = options.renamed;
    this.kind =
      options.kind ??
      (options.exitCode === undefined ? 'usage' : (KIND_OF_CODE[options.exitCode] ?? 'internal'));
    this.exitCode = EXIT_CODES[this.kind];
  }
}

/** Formats a received value the same way in every message. */
export function describeValue(value: unknown): string {
  if (typeof value === 'string') return `'${value}'`;
  if (typeof value === 'number' || typeof value === 'boolean' || value == null)
    return String(value);
  if (Array.isArray(value)) return `[${value.map(describeValue).join(', ')}]`;
  try {
    return JSON.stringify(value);
  } catch {
    return String(value);
  }
}

/** `Expected a positive integer for epochs but received -1` */
export function invalidOption(name: string, expected: string, received: unknown): FinetuneError {
  return new FinetuneError(
    `Expected ${expected} for ${name} but received ${describeValue(received)}`,
    { option: name },
  );
}

/**
 * The message of an `invalidOption` error with the option named as the caller knows it.
 *
 * @example renameOption(err, '--batch-size') // "Expected … for --batch-size but received 0"
 */
export function renameOption(err: FinetuneError, shown: string): string {
  if (err.option === undefined) return err.message;
  return err.message.replace(` for ${err.option} but received `, ` for ${shown} but received `);
}

/** An error about one file: the path always comes first. */
export function fileError(path: string, reason: string, cause?: unknown): FinetuneError {
  return new FinetuneError(`${path}: ${reason}`, { cause });
}

/**
 * The data cannot be used (exit code 3): no usable images, every input skipped, labels that
 * do not match the model. Give `path` when one file or folder is at fault: it comes first.
 *
 * @example dataError('no usable images', { path: 'photos/' }) // "photos/: no usable images"
 */
export function dataError(
  message: string,
  options: { path?: string; cause?: unknown } = {},
): FinetuneError {
  return new FinetuneError(options.path === undefined ? message : `${options.path}: ${message}`, {
    kind: 'data',
    cause: options.cause,
  });
}
