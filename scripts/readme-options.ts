// Rewrites the README's option table from the option table in src/train/options.ts:
// `npm run docs`. A test fails while the two differ.
import { readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { optionsMarkdown } from '../src/index.js';

export const START = '<!-- train-options:start (npm run docs) -->';
export const END = '<!-- train-options:end -->';

/** The README with the section between the markers replaced by `table`. */
export function withTable(readme: string, table: string): string {
  const a = readme.indexOf(START);
  const b = readme.indexOf(END);
  if (a < 0 || b < a) throw new Error(`README.md lacks the markers ${START} … ${END}`);
  return `${readme.slice(0, a + START.length)}\n${table}${readme.slice(b)}`;
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const file = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', 'README.md');
  await writeFile(file, withTable(await readFile(file, 'utf8'), optionsMarkdown()));
}
