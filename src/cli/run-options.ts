import type { Argv } from 'yargs';
import {
  BACKEND_OPTIONS,
  type ClassifierRunOptions,
  DEFAULT_MAX_BYTES,
  ENGINE_OPTIONS,
} from '../index.js';

/** The options every command that runs an exported classifier takes (predict, evaluate). */
export function withRunOptions<T>(y: Argv<T>) {
  return y
    .option('model', {
      type: 'string',
      demandOption: true,
      describe: 'Run folder from finetune train (or its model.json)',
    })
    .option('backend', { type: 'string', choices: BACKEND_OPTIONS, describe: '[default: auto]' })
    .option('engine', { type: 'string', choices: ENGINE_OPTIONS, describe: '[default: auto]' })
    .option('threads', {
      type: 'number',
      describe:
        'ONNX Runtime threads: with 2 or more, that many single-threaded sessions in worker threads [default: all cores]',
    })
    .option('batch-size', { type: 'number', describe: '[default: 16]' })
    .option('workers', {
      type: 'number',
      describe: 'Worker threads of the tfjs engine on wasm [default: all cores]',
    })
    .option('max-bytes', {
      type: 'number',
      describe: `Largest image file read; larger ones are skipped [default: ${DEFAULT_MAX_BYTES} (256 MiB)]`,
    })
    .option('quiet', { type: 'boolean', describe: 'No warnings on stderr' });
}

/** Maps those options to the library's, passing on only what the user gave. */
export function runOptionsFrom(argv: {
  model: string;
  backend?: string | undefined;
  engine?: string | undefined;
  threads?: number | undefined;
  batchSize?: number | undefined;
  workers?: number | undefined;
  maxBytes?: number | undefined;
}): ClassifierRunOptions {
  const options: ClassifierRunOptions = { model: argv.model };
  if (argv.backend !== undefined) options.backend = argv.backend as ClassifierRunOptions['backend'];
  if (argv.engine !== undefined) options.engine = argv.engine as ClassifierRunOptions['engine'];
  if (argv.threads !== undefined) options.threads = argv.threads;
  if (argv.batchSize !== undefined) options.batchSize = argv.batchSize;
  if (argv.workers !== undefined) options.workers = argv.workers;
  if (argv.maxBytes !== undefined) options.maxBytes = argv.maxBytes;
  return options;
}
