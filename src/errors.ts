/**
 * One error type and one wording for everything the toolkit rejects.
 *
 * `exitCode` is what the CLI exits with: 2 for bad input (options, data, files),
 * 1 for everything else.
 */
export class FinetuneError extends Error {
  readonly exitCode: number;
  constructor(message: string, options: { exitCode?: number; cause?: unknown } = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'FinetuneError';
    this.exitCode = options.exitCode ?? 2;
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
  );
}

/** An error about one file: the path always comes first. */
export function fileError(path: string, reason: string, cause?: unknown): FinetuneError {
  return new FinetuneError(`${path}: ${reason}`, { cause });
}
