import { invalidOption } from '../errors.js';

/** Validators that throw the project's one wording; each returns the value it checked. */

export function positiveInteger(name: string, value: unknown): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value <= 0) {
    throw invalidOption(name, 'a positive integer', value);
  }
  return value;
}

export function nonNegativeInteger(name: string, value: unknown): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 0) {
    throw invalidOption(name, 'a non-negative integer', value);
  }
  return value;
}

export function positiveNumber(name: string, value: unknown): number {
  if (typeof value !== 'number' || !Number.isFinite(value) || value <= 0) {
    throw invalidOption(name, 'a positive number', value);
  }
  return value;
}

/** A number in [min, max] (both inclusive unless `exclusiveMax`). */
export function numberInRange(
  name: string,
  value: unknown,
  min: number,
  max: number,
  exclusiveMax = false,
): number {
  const ok =
    typeof value === 'number' &&
    Number.isFinite(value) &&
    value >= min &&
    (exclusiveMax ? value < max : value <= max);
  if (!ok) {
    throw invalidOption(
      name,
      `a number from ${min} to ${max}${exclusiveMax ? ' (exclusive)' : ''}`,
      value,
    );
  }
  return value as number;
}

/**
 * An integer in [min, max], both inclusive.
 *
 * @example integerInRange('epochs', 1e9, 1, 100000) // throws "Expected an integer from 1 to 100000 for epochs but received 1000000000"
 */
export function integerInRange(name: string, value: unknown, min: number, max: number): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < min || value > max) {
    throw invalidOption(name, `an integer from ${min} to ${max}`, value);
  }
  return value;
}

/** A number above 0 and at most `max` (a learning rate, say). */
export function positiveNumberUpTo(name: string, value: unknown, max: number): number {
  if (typeof value !== 'number' || !Number.isFinite(value) || value <= 0 || value > max) {
    throw invalidOption(name, `a number above 0 and at most ${max}`, value);
  }
  return value;
}

/**
 * The largest buffer or tensor an option may ask for: 1 GiB. Above it, typed arrays fail
 * late with "Invalid typed array length" and the 4 GiB wasm heap (which never shrinks)
 * runs out once a tensor exists in several copies (gradients, optimizer slots).
 */
export const MAX_BUFFER_BYTES = 2 ** 30;

/** How many items of `floatsPerItem` float32 values fit in one buffer of MAX_BUFFER_BYTES. */
export function maxItemsInMemory(floatsPerItem: number): number {
  return Math.max(1, Math.floor(MAX_BUFFER_BYTES / (4 * floatsPerItem)));
}

export function integer(name: string, value: unknown): number {
  if (typeof value !== 'number' || !Number.isInteger(value))
    throw invalidOption(name, 'an integer', value);
  return value;
}

export function nonEmptyString(name: string, value: unknown): string {
  if (typeof value !== 'string' || value.length === 0)
    throw invalidOption(name, 'a non-empty string', value);
  return value;
}

export function boolean(name: string, value: unknown): boolean {
  if (typeof value !== 'boolean') throw invalidOption(name, 'a boolean', value);
  return value;
}

/**
 * Looks a key up in a frozen table; an unknown key fails with the list of valid keys.
 *
 * @example oneOf('optimizer', 'adam', OPTIMIZERS) // → OPTIMIZERS.adam
 */
export function oneOf<T>(name: string, key: unknown, table: Readonly<Record<string, T>>): T {
  if (typeof key !== 'string' || !Object.hasOwn(table, key)) {
    throw invalidOption(name, `one of ${Object.keys(table).join(', ')}`, key);
  }
  return table[key] as T;
}

/** Like `oneOf` for a plain list of allowed strings. */
export function oneOfValues<T extends string>(
  name: string,
  value: unknown,
  values: readonly T[],
): T {
  if (typeof value !== 'string' || !values.includes(value as T)) {
    throw invalidOption(name, `one of ${values.join(', ')}`, value);
  }
  return value as T;
}
