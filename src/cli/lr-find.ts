import type { Argv, Options } from 'yargs';
import { lrFind, TRAIN_OPTIONS } from '../index.js';
import { createOutput } from './output.js';
import { help, optionsFrom } from './train.js';

export const command = 'lr-find';
export const describe =
  'Find a head learning rate: an exponential LR ramp over the cached embeddings (fastai lr_find)';

/**
 * The options lr-find reads: everything that prepares and embeds, and the head's own
 * (not lr or epochs: the ramp sets them; not SWA or the fine-tune stage).
 */
const HEAD_KEYS: readonly string[] = [
  'batchSize',
  'optimizer',
  'labelSmoothing',
  'classWeights',
  'hidden',
  'dropout',
];
const ROWS = TRAIN_OPTIONS.filter(
  (row) =>
    row.phase === 'prepare' ||
    row.phase === 'embed' ||
    row.phase === 'records' ||
    HEAD_KEYS.includes(row.key),
);

export function builder(y: Argv) {
  let b = y;
  for (const row of ROWS) {
    const spec: Options = { type: row.type, describe: help(row.doc, row.defaultText) };
    if (row.choices) spec.choices = row.choices;
    if (row.key === 'data') spec.demandOption = true;
    b = b.option(row.flag, spec);
  }
  return b
    .option('start-lr', {
      type: 'number',
      describe: 'First learning rate of the ramp [default: 1e-7]',
    })
    .option('end-lr', { type: 'number', describe: 'Last learning rate of the ramp [default: 10]' })
    .option('steps', { type: 'number', describe: 'Steps of the ramp [default: 100]' })
    .option('quiet', { type: 'boolean', describe: 'Only the suggested learning rate' })
    .option('json', { type: 'boolean', describe: 'Print only the result JSON on stdout' });
}

type Args = Record<string, unknown> & {
  quiet?: boolean;
  json?: boolean;
  startLr?: number;
  endLr?: number;
  steps?: number;
};

export async function handler(argv: Args): Promise<void> {
  const out = createOutput({ quiet: argv.quiet, json: argv.json });
  const result = await lrFind(
    {
      ...optionsFrom(argv),
      onEvent(e) {
        if (e.type === 'warning') out.warn(`warning: ${e.message}`);
        else if (e.type === 'embed-progress') {
          out.progress('embedding', e.progress.done, e.progress.total);
          if (e.progress.done === e.progress.total) out.endProgress();
        }
      },
    },
    {
      ...(argv.startLr !== undefined ? { startLr: argv.startLr } : {}),
      ...(argv.endLr !== undefined ? { endLr: argv.endLr } : {}),
      ...(argv.steps !== undefined ? { steps: argv.steps } : {}),
    },
  );
  if (out.json) {
    out.result(JSON.stringify(result, null, 2));
    return;
  }
  if (out.quiet) {
    out.result(result.suggested.toPrecision(2));
    return;
  }
  const s = result.suggestions;
  const n = result.points.length;
  out.result(
    `suggested lr ${s.valley.toPrecision(2)} (valley); steep ${s.steep.toPrecision(2)}, minimum/10 ${s.minimum.toPrecision(2)}; ${n} of ${result.settings.steps} steps${result.diverged ? ' (stopped: the loss diverged)' : ''}; wrote ${result.file} (${result.seconds['total']!.toFixed(1)} s)`,
  );
}
