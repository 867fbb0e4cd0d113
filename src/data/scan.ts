import { readdir, stat } from 'node:fs/promises';
import path from 'node:path';
import { dataError, FinetuneError } from '../errors.js';
import { seededRandom, shuffleInPlace } from '../util/random.js';

/** One image file and its class index. */
export interface LabelledFile {
  readonly path: string;
  readonly label: number;
}

export interface Splits {
  /** Sorted class names; index = label. */
  readonly classes: readonly string[];
  readonly train: readonly LabelledFile[];
  readonly val: readonly LabelledFile[];
  readonly test: readonly LabelledFile[];
  /** Where the split came from: folders on disk, or a seeded stratified split of train. */
  readonly layout: 'class-folders' | 'split-folders';
  /** Things the user should know that did not stop the run (empty class folders…). */
  readonly warnings: readonly string[];
}

export interface SplitOptions {
  /** Fraction of each class held out for validation when DIR has no val/ folder. Default 0.2. */
  valSplit?: number;
  /** Seed of the split. Default 42. */
  seed?: number;
}

const SPLIT_NAMES = new Set(['train', 'val', 'validation', 'test']);

const isHidden = (name: string): boolean => name.startsWith('.') || name.startsWith('__');

async function isDirectory(p: string): Promise<boolean> {
  try {
    return (await stat(p)).isDirectory();
  } catch {
    return false;
  }
}

/**
 * Every non-hidden file below `dir`, recursively, sorted (content decides later whether it
 * is an image). FIFOs, sockets and devices are listed too, so that reading them can skip
 * them with a reason rather than drop them unseen; only `readImageFile` decides, without
 * ever opening them. Symlinked folders are not followed.
 */
export async function listFiles(dir: string): Promise<string[]> {
  const out: string[] = [];
  const walk = async (d: string): Promise<void> => {
    const entries = await readdir(d, { withFileTypes: true });
    entries.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
    for (const e of entries) {
      if (isHidden(e.name)) continue;
      const p = path.join(d, e.name);
      if (e.isDirectory()) await walk(p);
      else if (!e.isSymbolicLink() || !(await isDirectory(p))) out.push(p);
    }
  };
  await walk(dir);
  return out;
}

/**
 * Reads `dir/<class>/**` (the Keras image_dataset_from_directory / torchvision
 * ImageFolder convention). Stray files at the root and hidden entries are ignored;
 * empty class folders are reported in `warnings` and left out.
 */
export async function scanClassFolders(
  dir: string,
  classes?: readonly string[],
): Promise<{ classes: string[]; files: Map<string, string[]>; warnings: string[] }> {
  if (!(await isDirectory(dir)))
    throw new FinetuneError(`${dir}: data directory not found or not a directory`);
  const entries = await readdir(dir, { withFileTypes: true });
  const folders = entries
    .filter((e) => !isHidden(e.name) && (e.isDirectory() || e.isSymbolicLink()))
    .map((e) => e.name)
    .sort();
  const files = new Map<string, string[]>();
  const warnings: string[] = [];
  for (const name of folders) {
    const p = path.join(dir, name);
    if (!(await isDirectory(p))) continue;
    if (classes && !classes.includes(name)) {
      throw dataError(
        `class '${name}' is not one of the training classes (${classes.join(', ')})`,
        {
          path: p,
        },
      );
    }
    const list = await listFiles(p);
    if (list.length === 0) {
      warnings.push(`${p}: empty class folder, ignored`);
      continue;
    }
    files.set(name, list);
  }
  return { classes: [...files.keys()], files, warnings };
}

/**
 * Finds the train/val/test splits under `dataDir`.
 *
 * - `dataDir/<class>/…`: a stratified, seeded split holds out `valSplit` of each class.
 * - `dataDir/train` + `dataDir/val` (or `validation`) and/or `dataDir/test`, each with
 *   class folders: used as they are (val is split off train when absent).
 *
 * Fewer than 2 classes with files is an error.
 */
export async function loadSplits(dataDir: string, options: SplitOptions = {}): Promise<Splits> {
  const valSplit = options.valSplit ?? 0.2;
  const seed = options.seed ?? 42;
  if (!(await isDirectory(dataDir)))
    throw new FinetuneError(`${dataDir}: data directory not found or not a directory`);
  const entries = (await readdir(dataDir, { withFileTypes: true })).filter(
    (e) => !isHidden(e.name) && e.isDirectory(),
  );
  const names = new Set(entries.map((e) => e.name));
  const splitLayout =
    names.has('train') &&
    (names.has('val') || names.has('validation') || names.has('test')) &&
    [...names].every((n) => SPLIT_NAMES.has(n));

  const trainDir = splitLayout ? path.join(dataDir, 'train') : dataDir;
  const scanned = await scanClassFolders(trainDir);
  if (scanned.classes.length < 2) {
    throw dataError(
      `expected at least 2 class folders with images but found ${scanned.classes.length}` +
        (scanned.classes.length ? ` (${scanned.classes.join(', ')})` : ''),
      { path: trainDir },
    );
  }
  const classes = scanned.classes;
  const warnings = [...scanned.warnings];
  const labelled = (files: Map<string, string[]>): LabelledFile[] =>
    classes.flatMap((c, label) => (files.get(c) ?? []).map((p) => ({ path: p, label })));

  const readSplit = async (name: string): Promise<LabelledFile[] | null> => {
    const p = path.join(dataDir, name);
    if (!splitLayout || !names.has(name)) return null;
    const s = await scanClassFolders(p, classes);
    warnings.push(...s.warnings);
    return labelled(s.files);
  };
  const givenVal = (await readSplit('val')) ?? (await readSplit('validation'));
  const test = (await readSplit('test')) ?? [];
  if (givenVal) {
    return {
      classes,
      train: labelled(scanned.files),
      val: givenVal,
      test,
      layout: 'split-folders',
      warnings,
    };
  }
  const { train, val } = stratifiedSplit(scanned.files, classes, valSplit, seed);
  return {
    classes,
    train,
    val,
    test,
    layout: splitLayout ? 'split-folders' : 'class-folders',
    warnings,
  };
}

/**
 * Holds out round(n × fraction) files of each class (at least one when the class has
 * two or more and fraction > 0), chosen by a seeded shuffle of the sorted file list.
 */
export function stratifiedSplit(
  files: ReadonlyMap<string, readonly string[]>,
  classes: readonly string[],
  fraction: number,
  seed: number,
): { train: LabelledFile[]; val: LabelledFile[] } {
  const random = seededRandom(seed);
  const train: LabelledFile[] = [];
  const val: LabelledFile[] = [];
  classes.forEach((c, label) => {
    const list = shuffleInPlace([...(files.get(c) ?? [])].sort(), random);
    let k = Math.round(list.length * fraction);
    if (fraction > 0 && k === 0 && list.length >= 2) k = 1;
    if (k >= list.length) k = list.length - 1;
    list.forEach((p, i) => {
      (i < k ? val : train).push({ path: p, label });
    });
  });
  const byPath = (a: LabelledFile, b: LabelledFile): number =>
    a.path < b.path ? -1 : a.path > b.path ? 1 : 0;
  return { train: train.sort(byPath), val: val.sort(byPath) };
}
