#!/usr/bin/env node
import yargs from 'yargs';
import { hideBin } from 'yargs/helpers';
import { EXIT_CODES, FinetuneError, optionRow, renameOption, VERSION } from '../index.js';
import { closest } from '../util/closest.js';
import * as cacheCommand from './cache.js';
import * as doctorCommand from './doctor.js';
import * as evaluateCommand from './evaluate.js';
import * as modelsCommand from './models.js';
import * as predictCommand from './predict.js';
import * as reportCommand from './report.js';
import { exitCleanlyOnSignals } from './signals.js';
import * as trainCommand from './train.js';

const debug = process.env['FINETUNE_DEBUG'] === '1';

/** Library option names that are not train options, as the commands spell their flags. */
const OTHER_FLAGS: Readonly<Record<string, string>> = Object.freeze({
  topK: 'top-k',
  samples: 'samples',
  'older-than': 'older-than',
  'cache-dir': 'cache-dir',
});

/**
 * The error's message in the user's vocabulary: the library names an option by its key
 * (`batchSize`), the user typed a flag (`--batch-size`).
 */
function messageOf(err: unknown): string {
  if (!(err instanceof Error)) return String(err);
  if (!(err instanceof FinetuneError)) return err.message;
  const flagOf = (key: string): string | undefined => optionRow(key)?.flag ?? OTHER_FLAGS[key];
  if (err.renamed) {
    return err.renamed((key) => {
      const flag = flagOf(key);
      return flag === undefined ? key : `--${flag}`;
    });
  }
  if (err.option === undefined) return err.message;
  const flag = flagOf(err.option);
  return flag === undefined ? err.message : renameOption(err, `--${flag}`);
}

/**
 * One line on stderr and the code of EXIT_CODES (a FinetuneError's kind; anything else is
 * internal); the stack trace only with FINETUNE_DEBUG=1.
 */
function report(err: unknown): never {
  const code = err instanceof FinetuneError ? err.exitCode : EXIT_CODES.internal;
  const text = messageOf(err);
  // Engine messages can span lines; the log line stays one line.
  const line = text.replace(/\s*\n\s*/g, ' ').trim() || String(err);
  // An internal error is worth a bug report, which needs the stack.
  const hint =
    code === EXIT_CODES.internal && !debug ? ' (FINETUNE_DEBUG=1 prints the stack trace)' : '';
  process.stderr.write(`finetune: ${line}${hint}\n`);
  // The stack, then each cause's (an engine worker's error keeps its own stack there).
  let shown: unknown = err;
  for (let depth = 0; debug && shown instanceof Error && depth < 5; depth++) {
    process.stderr.write(`${depth ? 'Caused by: ' : ''}${shown.stack}\n`);
    shown = shown.cause;
  }
  process.exit(code);
}

// A rejection nobody awaited, or an exception thrown in a callback, still ends as one line
// with the table's code: tfjs-wasm registers handlers that rethrow it, which prints a raw
// stack trace and exits with 7. Prepended, these run first and exit.
process.prependListener('unhandledRejection', report);
process.prependListener('uncaughtException', report);

/** "Unknown argument: epoch" → "; did you mean --epochs?" */
function suggest(msg: string, known: readonly string[]): string {
  const m = /^Unknown arguments?: (.+)$/.exec(msg ?? '');
  if (!m) return '';
  const hints = m[1]!.split(', ').flatMap((bad) => {
    const best = closest(bad, known);
    return best ? [{ bad, hint: `--${best}` }] : [];
  });
  if (!hints.length) return '';
  if (hints.length === 1) return `; did you mean ${hints[0]!.hint}?`;
  return `; did you mean ${hints.map((h) => `${h.hint} (for ${h.bad})`).join(', ')}?`;
}

async function main(): Promise<void> {
  exitCleanlyOnSignals();
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
    // biome-ignore lint/suspicious/noExplicitAny: as above
    .command(reportCommand as any)
    // biome-ignore lint/suspicious/noExplicitAny: as above
    .command(doctorCommand as any)
    .command(await import('./sweep.js'))
    .command(await import('./lr-find.js'))
    .demandCommand(
      1,
      'Name a command: train, predict, evaluate, sweep, lr-find, report, models, cache or doctor',
    )
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
      process.exit(EXIT_CODES.usage);
    })
    .parseAsync();
}

main().catch(report);
