import { createRequire } from 'node:module';

// jstat ships no types; only its Student t quantile is used.
const { jStat } = createRequire(import.meta.url)('jstat') as {
  jStat: { studentt: { inv(p: number, dof: number): number } };
};

/** Mean, sample standard deviation and a two-sided confidence interval of the mean. */
export interface Spread {
  readonly n: number;
  readonly mean: number;
  /** Sample standard deviation (n − 1); null for one value. */
  readonly std: number | null;
  /** The interval of the mean from Student's t with n − 1 degrees of freedom; null for one value. */
  readonly low: number | null;
  readonly high: number | null;
}

/**
 * mean ± t(1 − (1 − level)/2, n − 1) · s/√n: with 3 repeats the 95% half-width is
 * 4.30 s/√3, much wider than the normal 1.96 s/√3 that small sweeps are often reported with.
 *
 * @example spread([0.8, 0.82, 0.81]) // → { n: 3, mean: 0.81, std: 0.01, low: 0.785, high: 0.835 }
 */
export function spread(values: readonly number[], level = 0.95): Spread {
  const n = values.length;
  if (n === 0) return { n, mean: Number.NaN, std: null, low: null, high: null };
  const mean = values.reduce((a, b) => a + b, 0) / n;
  if (n === 1) return { n, mean, std: null, low: null, high: null };
  const std = Math.sqrt(values.reduce((a, b) => a + (b - mean) ** 2, 0) / (n - 1));
  const half = (jStat.studentt.inv(1 - (1 - level) / 2, n - 1) * std) / Math.sqrt(n);
  return { n, mean, std, low: mean - half, high: mean + half };
}
