#!/usr/bin/env node
import yargs from 'yargs';
import { hideBin } from 'yargs/helpers';
import { FinetuneError, VERSION } from '../index.js';
import * as cacheCommand from './cache.js';
import * as evaluateCommand from './evaluate.js';
import * as modelsCommand from './models.js';
import * as predictCommand from './predict.js';
import * as trainCommand from './train.js';

function report(err: unknown): never {
  if (err instanceof FinetuneError) {
    process.stderr.write(`finetune: ${err.message}\n`);
    if (process.env['FINETUNE_DEBUG']) process.stderr.write(`${err.stack}\n`);
    process.exit(err.exitCode);
  }
  const e = err as Error;
  process.stderr.write(`finetune: ${e?.message ?? String(err)}\n`);
  if (process.env['FINETUNE_DEBUG']) process.stderr.write(`${e?.stack}\n`);
  process.exit(1);
}

/** "Unknown argument: epoch" → "; did you mean --epochs?" */
function suggest(msg: string, known: readonly string[]): string {
  const m = /^Unknown arguments?: (.+)$/.exec(msg ?? '');
  if (!m) return '';
  const hints = m[1]!.split(', ').flatMap((bad) => {
    const best = known
      .map((k) => [k, distance(bad, k)] as const)
      .filter(([, d]) => d <= Math.max(2, Math.floor(bad.length / 3)))
      .sort((a, b) => a[1] - b[1])[0];
    return best ? [{ bad, hint: `--${best[0]}` }] : [];
  });
  if (!hints.length) return '';
  if (hints.length === 1) return `; did you mean ${hints[0]!.hint}?`;
  return `; did you mean ${hints.map((h) => `${h.hint} (for ${h.bad})`).join(', ')}?`;
}

function distance(a: string, b: string): number {
  const d = Array.from({ length: a.length + 1 }, (_, i) => [
    i,
    ...new Array<number>(b.length).fill(0),
  ]);
  for (let j = 1; j <= b.length; j++) d[0]![j] = j;
  for (let i = 1; i <= a.length; i++) {
    for (let j = 1; j <= b.length; j++) {
      d[i]![j] = Math.min(
        d[i - 1]![j]! + 1,
        d[i]![j - 1]! + 1,
        d[i - 1]![j - 1]! + (a[i - 1] === b[j - 1] ? 0 : 1),
      );
    }
  }
  return d[a.length]![b.length]!;
}

async function main(): Promise<void> {
  const cli = yargs(hideBin(process.argv));
  await cli
    .scriptName('finetune')
    .version(VERSION)
    // biome-ignore lint/suspicious/noExplicitAny: yargs' command-module typing cannot express these builders
    .command(trainCommand as any)
    // biome-ignore lint/suspicious/noExplicitAny: as above
    .command(predictCommand as any)
    // biome-ignore lint/suspicious/noExplicitAny: as above
    .command(evaluateCommand as any)
    // biome-ignore lint/suspicious/noExplicitAny: as above
    .command(modelsCommand as any)
    // biome-ignore lint/suspicious/noExplicitAny: as above
    .command(cacheCommand as any)
    .command(await import('./sweep.js'))
    .command(await import('./lr-find.js'))
    .demandCommand(1, 'Name a command: train, predict, evaluate, models or cache')
    .recommendCommands()
    .strict()
    .wrap(Math.min(110, process.stdout.columns ?? 100))
    .fail((msg, err) => {
      if (err) report(err);
      const known = Object.keys(
        (cli as unknown as { getOptions(): { key: Record<string, unknown> } }).getOptions().key,
      );
      process.stderr.write(
        `finetune: ${msg}${suggest(msg, known)}\nRun finetune --help (or finetune COMMAND --help) for usage.\n`,
      );
      process.exit(2);
    })
    .parseAsync();
}

main().catch(report);
