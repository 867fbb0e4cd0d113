import type { Argv, Options } from 'yargs';
import {
  RESUME_OVERRIDES,
  type ResumeOptions,
  TRAIN_OPTIONS,
  type TrainOptions,
  train,
} from '../index.js';
import { listed } from '../train/checkpoint.js';
import { createOutput } from './output.js';

export const command = 'train';
export const describe = 'Train a classifier on a folder of images (frozen backbone, head with SWA)';

/** `--help` text of a row: its doc, then its default. */
export function help(doc: string, defaultText: string): string {
  const plain = doc.replace(/`/g, '');
  return defaultText === 'required'
    ? plain
    : `${plain[0]!.toUpperCase()}${plain.slice(1)} [default: ${defaultText.replace(/`/g, '')}]`;
}

/** Every flag comes from the option table; defaults stay in the library (yargs sets none). */
export function builder(y: Argv) {
  let b = y;
  for (const row of TRAIN_OPTIONS) {
    const spec: Options = { type: row.type, describe: help(row.doc, row.defaultText) };
    if (row.choices) spec.choices = row.choices;
    b = b.option(row.flag, spec);
  }
  return b
    .option('resume', {
      type: 'string',
      describe: `Continue the interrupted run in this folder from its checkpoint (--checkpoint-every), with its own options; only ${listed(RESUME_OVERRIDES.map((k) => `--${TRAIN_OPTIONS.find((r) => r.key === k)!.flag}`))} may be given with it`,
    })
    .option('quiet', { type: 'boolean', describe: 'No progress, warnings or summary line' })
    .option('json', { type: 'boolean', describe: 'Print only the summary JSON on stdout' });
}

type Args = Record<string, unknown> & { quiet?: boolean; json?: boolean; resume?: string };

/** Keeps only the options the user gave: defaults live in the library. */
export function optionsFrom(argv: Args): TrainOptions {
  const options: Record<string, unknown> = {};
  for (const row of TRAIN_OPTIONS) {
    const value = argv[row.flag];
    if (value !== undefined) options[row.key] = value;
  }
  return options as unknown as TrainOptions;
}

export async function handler(argv: Args): Promise<void> {
  const out = createOutput({ quiet: argv.quiet, json: argv.json });
  // With --resume, any other option given reaches the library, which refuses it.
  const options: TrainOptions | ResumeOptions = {
    ...optionsFrom(argv),
    ...(argv.resume !== undefined ? { resume: argv.resume } : {}),
    onEvent(e: Parameters<NonNullable<TrainOptions['onEvent']>>[0]) {
      switch (e.type) {
        case 'backend':
          out.info(
            `backend: ${e.backend.option} (tfjs '${e.backend.tfBackend}')${e.backend.skipped.length ? `; passed over ${e.backend.skipped.join('; ')}` : ''}`,
          );
          break;
        case 'backbone':
          out.info(`backbone: ${e.id} (${e.inputSize}×${e.inputSize} → ${e.featureSize}-d)`);
          break;
        case 'engine':
          out.info(`engine: ${e.engine}${e.reason ? ` (${e.reason})` : ''}`);
          break;
        case 'data':
          out.info(
            `classes: ${e.classes.length} (${e.classes.map((c) => `${c} ${e.counts[c]}`).join(', ')})`,
          );
          break;
        case 'warning':
          out.warn(`warning: ${e.message}`);
          break;
        case 'embed-progress':
          out.progress('embedding', e.progress.done, e.progress.total);
          if (e.progress.done === e.progress.total) out.endProgress();
          break;
        case 'skipped':
          out.warn(`skipped ${e.file.path}: ${e.file.reason}`);
          break;
        case 'epoch': {
          const l = e.logs;
          const val =
            l.val_acc !== undefined
              ? ` val_loss ${l.val_loss!.toFixed(4)} val_acc ${l.val_acc.toFixed(4)}`
              : '';
          // SWA's snapshots or EMA's updates so far.
          const swa = l.snapshots ? ` ${e.average ?? 'swa'} ${l.snapshots}` : '';
          out.info(
            `${l.stage} epoch ${l.epoch}/${e.epochs} loss ${l.loss.toFixed(4)} acc ${l.acc.toFixed(4)}${val} lr ${l.lr.toPrecision(3)}${swa} (${l.seconds.toFixed(2)} s)`,
          );
          break;
        }
        case 'stage-end':
          out.info(
            `${e.stage} stage val acc: raw ${fmt(e.raw)}${e.swa !== null ? `, ${e.average ?? 'swa'} ${fmt(e.swa)}` : ''}`,
          );
          break;
        case 'done':
          if (e.summary.engine === 'cache')
            out.info('engine: none needed (every embedding came from the cache)');
          break;
      }
    },
  };
  const summary = await train(options);
  if (out.json) {
    out.result(JSON.stringify(summary, null, 2));
    return;
  }
  if (!out.quiet) {
    const t = summary.test ? `, test acc ${summary.test.acc.toFixed(4)}` : '';
    out.result(
      `exported ${summary.exported} weights to ${summary.out}/model (val acc ${fmt(summary.val?.acc ?? null)}${t}; ${summary.skipped.length} files skipped; ${summary.seconds['total']!.toFixed(1)} s)`,
    );
  }
}

function fmt(x: number | null): string {
  return x === null ? 'n/a' : x.toFixed(4);
}
