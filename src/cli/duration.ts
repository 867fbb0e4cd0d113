import { invalidOption } from '../errors.js';

const DURATION_UNITS: Readonly<Record<string, number>> = Object.freeze({
  s: 1000,
  m: 60 * 1000,
  h: 60 * 60 * 1000,
  d: 24 * 60 * 60 * 1000,
  w: 7 * 24 * 60 * 60 * 1000,
});

/**
 * Milliseconds in `30d`, `12h`, `45m`, `10s` (also `w` for weeks and decimals such as `1.5h`):
 * the flag's vocabulary; the library takes milliseconds.
 *
 * @throws FinetuneError `Expected a duration such as 30d, 12h or 45m for older-than but received …`
 */
export function parseDuration(text: string): number {
  const m = typeof text === 'string' ? /^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$/.exec(text) : null;
  if (!m) throw invalidOption('older-than', 'a duration such as 30d, 12h or 45m', text);
  return Math.round(Number(m[1]) * DURATION_UNITS[m[2]!]!);
}
