import { createHash } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { parse as parseYaml } from 'yaml';
import { FinetuneError, fileError, invalidOption } from '../errors.js';
import {
  type OptionKey,
  optionRow,
  type ResolvedTrainOptions,
  resolveTrainOptions,
  TRAIN_OPTIONS,
  type TrainOptions,
} from '../train/options.js';
import { closest } from '../util/closest.js';
import * as is from '../util/is.js';

/** Train options as a sweep file writes them (no callbacks). */
export type SweepOptions = Partial<Omit<TrainOptions, 'onEvent'>>;

/**
 * A sweep: `base` options shared by every run, a `grid` whose listed values are crossed,
 * `variants` (option sets tried one at a time, each crossed with the grid), `repeats`
 * seeds per configuration and the sweep folder `out`.
 */
export interface SweepConfig {
  readonly base?: SweepOptions;
  readonly grid?: Readonly<Record<string, readonly unknown[]>>;
  readonly variants?: readonly SweepOptions[];
  /** Seeds per configuration: seed, seed + 1, … (default 1). */
  readonly repeats?: number;
  readonly out: string;
}

const SWEEP_KEYS = ['base', 'grid', 'variants', 'repeats', 'out'] as const;

/**
 * Options that never change a run's figures: they stay out of its id, so a rerun with
 * another cache folder or thread count still finds its finished runs.
 */
const NOT_IN_ID: readonly OptionKey[] = [
  'out',
  'cache',
  'cacheDir',
  'threads',
  'workers',
  'finetuneThreads',
  'decodeConcurrency',
  'embedBatchSize',
];

/** One run of a sweep, resolved and checked before anything runs. */
export interface SweepRun {
  /** Hash of the resolved options that change results (with the split seed). */
  readonly id: string;
  /** 1-based position in the sweep. */
  readonly index: number;
  /** Hash of the configuration without its seed: the runs that repeat one configuration share it. */
  readonly config: string;
  /** 0-based repeat (the seed offset). */
  readonly repeat: number;
  /** The swept values of this run: grid and variant keys, and the seed when there are repeats. */
  readonly params: Readonly<Record<string, unknown>>;
  /** The options as given (base, then variant, then grid values, then the seed). */
  readonly given: SweepOptions & { data: string };
  /** Every option resolved; `out` is the run folder. */
  readonly options: ResolvedTrainOptions;
  /** The seed of the train/val split: `base`'s seed for every run (repeats vary training only). */
  readonly splitSeed: number;
  /** What `prepare` and `embed` read: runs with the same key share one prepared run and embedding. */
  readonly prepareKey: string;
  /** Runs with a fine-tune stage touch the backbone again. */
  readonly needsBackbone: boolean;
}

/** Reads a sweep file: YAML (`.yaml`/`.yml`) or JSON. */
export async function loadSweepConfig(file: string): Promise<SweepConfig> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (err) {
    throw fileError(file, `cannot read sweep config (${(err as Error).message})`, err);
  }
  try {
    const value: unknown = /\.ya?ml$/i.test(file) ? parseYaml(text) : JSON.parse(text);
    return value as SweepConfig;
  } catch (err) {
    throw fileError(
      file,
      `not valid ${/\.ya?ml$/i.test(file) ? 'YAML' : 'JSON'} (${(err as Error).message})`,
      err,
    );
  }
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** sha256 of JSON with sorted keys, first 12 hex digits. */
export function stableHash(value: unknown): string {
  const canonical = (v: unknown): unknown =>
    Array.isArray(v)
      ? v.map(canonical)
      : isObject(v)
        ? Object.fromEntries(
            Object.keys(v)
              .sort()
              .filter((k) => v[k] !== undefined)
              .map((k) => [k, canonical(v[k])]),
          )
        : v;
  return createHash('sha256')
    .update(JSON.stringify(canonical(value)))
    .digest('hex')
    .slice(0, 12);
}

/** Checks that every key of a section is an option; `out` belongs to the sweep, not to a run. */
function checkKeys(section: string, keys: readonly string[]): void {
  const known = TRAIN_OPTIONS.map((row) => row.key as string);
  for (const key of keys) {
    if (key === 'out')
      throw new FinetuneError(`${section}: out is set once, at the top of the sweep config`);
    if (key === 'checkpointEvery')
      throw new FinetuneError(
        `${section}: checkpointEvery is for finetune train (a sweep's runs are not checkpointed)`,
      );
    if (!optionRow(key)) {
      const near = closest(key, known);
      throw new FinetuneError(
        `${section}: Unknown option ${key}${near ? `; did you mean ${near}?` : ''}`,
      );
    }
  }
}

/** The cartesian product of the grid, in the order its keys and values are listed. */
function crossGrid(grid: Readonly<Record<string, readonly unknown[]>>): Record<string, unknown>[] {
  let combos: Record<string, unknown>[] = [{}];
  for (const [key, values] of Object.entries(grid)) {
    combos = combos.flatMap((c) => values.map((v) => ({ ...c, [key]: v })));
  }
  return combos;
}

function describeParams(params: Readonly<Record<string, unknown>>): string {
  return Object.entries(params)
    .map(([k, v]) => `${k}=${Array.isArray(v) ? v.join('+') : String(v)}`)
    .join(', ');
}

/** The id-relevant view of resolved options. */
function identity(o: ResolvedTrainOptions, splitSeed: number, withSeed: boolean) {
  const kept: Record<string, unknown> = { splitSeed, data: path.resolve(o.data) };
  for (const [k, v] of Object.entries(o)) {
    if (k === 'data' || NOT_IN_ID.includes(k as OptionKey)) continue;
    if (k === 'seed' && !withSeed) continue;
    kept[k] = v;
  }
  return kept;
}

/**
 * Checks a sweep config and lists its runs, every option resolved: nothing runs until every
 * key and value of every run has passed the option table. Runs are variants × grid ×
 * repeats, in that nesting; the split seed is `base`'s for all of them.
 *
 * @example
 *   expandSweep({ out: 'sweeps/s1', base: { data: 'photos' }, grid: { lr: [0.01, 0.003] }, repeats: 2 })
 *   // → 4 runs, params { lr: 0.01, seed: 42 }, { lr: 0.01, seed: 43 }, { lr: 0.003, seed: 42 }, …
 */
export function expandSweep(config: SweepConfig): SweepRun[] {
  if (!isObject(config)) throw invalidOption('sweep config', 'an object', config);
  for (const key of Object.keys(config)) {
    if (!(SWEEP_KEYS as readonly string[]).includes(key)) {
      const near = closest(key, SWEEP_KEYS);
      throw new FinetuneError(
        `Unknown sweep key ${key}${near ? `; did you mean ${near}?` : ''} (expected ${SWEEP_KEYS.join(', ')})`,
      );
    }
  }
  const out = is.nonEmptyString('out', config.out);
  const base = config.base ?? {};
  if (!isObject(base)) throw invalidOption('base', 'an object of train options', base);
  checkKeys('base', Object.keys(base));
  const grid = config.grid ?? {};
  if (!isObject(grid)) throw invalidOption('grid', 'an object of option: [values]', grid);
  checkKeys('grid', Object.keys(grid));
  for (const [key, values] of Object.entries(grid)) {
    if (!Array.isArray(values) || values.length === 0)
      throw invalidOption(`grid.${key}`, 'a non-empty list of values', values);
  }
  const variants = config.variants ?? [{}];
  if (!Array.isArray(variants) || variants.length === 0)
    throw invalidOption('variants', 'a non-empty list of option sets', variants);
  variants.forEach((v, i) => {
    if (!isObject(v)) throw invalidOption(`variants[${i}]`, 'an object of train options', v);
    checkKeys(`variants[${i}]`, Object.keys(v));
    for (const key of Object.keys(v)) {
      if (key in grid)
        throw new FinetuneError(`variants[${i}]: ${key} is also in grid; set it in one place`);
    }
  });
  const repeats = config.repeats === undefined ? 1 : is.positiveInteger('repeats', config.repeats);
  if (repeats > 1 && 'seed' in grid)
    throw new FinetuneError(
      'grid: seed cannot be swept together with repeats (repeats set the seeds)',
    );

  const baseSeed = resolveTrainOptions({ data: '.', ...pickSeed(base) }).seed;
  const combos = crossGrid(grid as Record<string, readonly unknown[]>);
  const runs: SweepRun[] = [];
  const total = variants.length * combos.length * repeats;
  const seen = new Map<string, number>();
  for (const [v, variant] of variants.entries()) {
    for (const combo of combos) {
      for (let r = 0; r < repeats; r++) {
        const index = runs.length + 1;
        const merged: Record<string, unknown> = { ...base, ...variant, ...combo };
        const params: Record<string, unknown> = { ...variant, ...combo };
        if (repeats > 1) {
          merged['seed'] = ((merged['seed'] as number | undefined) ?? baseSeed) + r;
          params['seed'] = merged['seed'];
        }
        const where = `run ${index} of ${total}${variants.length > 1 ? ` (variant ${v + 1})` : ''}${
          Object.keys(params).length ? ` [${describeParams(params)}]` : ''
        }`;
        let options: ResolvedTrainOptions;
        try {
          // resolveTrainOptions skips a missing option without a default: data is checked here.
          optionRow('data')!.check(merged['data'], {});
          options = resolveTrainOptions(merged as unknown as TrainOptions);
        } catch (err) {
          if (err instanceof FinetuneError) throw new FinetuneError(`${where}: ${err.message}`);
          throw err;
        }
        const id = stableHash(identity(options, baseSeed, true));
        const twin = seen.get(id);
        if (twin !== undefined)
          throw new FinetuneError(`${where}: resolves to the same options as run ${twin}`);
        seen.set(id, index);
        const prepare: Record<string, unknown> = { splitSeed: baseSeed };
        for (const row of TRAIN_OPTIONS) {
          if ((row.phase === 'prepare' || row.phase === 'embed') && row.key !== 'seed')
            prepare[row.key] =
              row.key === 'data'
                ? path.resolve(options.data)
                : options[row.key as keyof ResolvedTrainOptions];
        }
        runs.push({
          id,
          index,
          config: stableHash(identity(options, baseSeed, false)),
          repeat: r,
          params,
          given: merged as SweepOptions & { data: string },
          options: { ...options, out: path.join(out, 'runs', id) },
          splitSeed: baseSeed,
          prepareKey: stableHash(prepare),
          needsBackbone: options.finetuneEpochs > 0,
        });
      }
    }
  }
  return runs;
}

/** Only the seed of `base` (checked), for the split seed of every run. */
function pickSeed(base: SweepOptions): { seed?: number } {
  if (base.seed === undefined) return {};
  return { seed: is.integer('seed', base.seed) };
}

/**
 * A child's share of the cores as options: the engine's threads and workers, and the
 * fine-tune stage's threads (at most 2) unless the run gives its own.
 */
export function childThreadOptions(
  o: SweepRun['options'],
  threads: number,
): { threads: number; workers: number; finetuneThreads?: number } {
  return {
    threads,
    workers: threads,
    ...(o.finetuneEpochs > 0 && o.finetuneThreads === undefined
      ? { finetuneThreads: Math.min(2, threads) }
      : {}),
  };
}
