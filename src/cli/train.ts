import type { Argv } from 'yargs';
import { BACKEND_OPTIONS, ENGINE_OPTIONS, OPTIMIZERS, type TrainOptions, train } from '../index.js';
import { createOutput } from './output.js';

export const command = 'train';
export const describe = 'Train a classifier on a folder of images (frozen backbone, head with SWA)';

export function builder(y: Argv) {
  return y
    .option('data', {
      type: 'string',
      demandOption: true,
      describe: 'Folder of class folders, or with train/ val/ test/',
    })
    .option('out', { type: 'string', describe: 'Run folder [default: runs/<timestamp>]' })
    .option('backbone', {
      type: 'string',
      describe:
        'Registry id (finetune models) or path/URL of a model.json [default: nsfwjs_mobilenet_v2]',
    })
    .option('alpha', { type: 'number', describe: 'Width multiplier of mobilenet_v1/v2 (TF Hub)' })
    .option('feature-layer', {
      type: 'string',
      describe: 'Layer where a model.json backbone is cut',
    })
    .option('input-size', {
      type: 'number',
      describe: 'Square input size [default: the backbone’s]',
    })
    .option('backend', {
      type: 'string',
      choices: BACKEND_OPTIONS,
      describe: 'tfjs backend for training [default: auto]',
    })
    .option('engine', {
      type: 'string',
      choices: ENGINE_OPTIONS,
      describe: 'Engine of frozen passes [default: auto]',
    })
    .option('threads', { type: 'number', describe: 'ONNX Runtime threads [default: all cores]' })
    .option('workers', {
      type: 'number',
      describe: 'Worker threads of the tfjs engine on wasm [default: all cores]',
    })
    .option('val-split', { type: 'number', describe: 'Held-out fraction per class [default: 0.2]' })
    .option('seed', {
      type: 'number',
      describe: 'Seed of split, shuffles, init, dropout [default: 42]',
    })
    .option('epochs', { type: 'number', describe: 'Head-stage epochs [default: 40]' })
    .option('batch-size', { type: 'number', describe: '[default: 32]' })
    .option('optimizer', {
      type: 'string',
      choices: Object.keys(OPTIMIZERS),
      describe: '[default: adam]',
    })
    .option('lr', { type: 'number', describe: 'Learning rate [default: 0.01]' })
    .option('label-smoothing', { type: 'number', describe: '[default: 0.1]' })
    .option('class-weights', {
      type: 'string',
      choices: ['balanced', 'none'],
      describe: '[default: none]',
    })
    .option('hidden', {
      type: 'number',
      describe: 'Units of a hidden layer in the head, 0 for none [default: 0]',
    })
    .option('dropout', { type: 'number', describe: 'Dropout in the head [default: 0.2]' })
    .option('swa', {
      type: 'boolean',
      describe: 'Stochastic Weight Averaging of the head (--no-swa to turn off) [default: true]',
    })
    .option('swa-start', {
      type: 'number',
      describe: 'Epoch, or fraction of --epochs, where SWA starts [default: 0.75]',
    })
    .option('swa-freq', { type: 'number', describe: 'Epochs between SWA snapshots [default: 1]' })
    .option('swa-lr', { type: 'number', describe: 'Constant LR once SWA starts [default: lr/2]' })
    .option('swa-anneal-epochs', {
      type: 'number',
      describe: 'Epochs of cosine annealing to --swa-lr [default: 0]',
    })
    .option('embed-batch-size', {
      type: 'number',
      describe: 'Images per frozen-pass batch [default: 16]',
    })
    .option('decode-concurrency', {
      type: 'number',
      describe: 'Images decoded at once [default: 8]',
    })
    .option('max-pixels', {
      type: 'number',
      describe: 'Skip images with more pixels than this [default: 100000000]',
    })
    .option('cache', {
      type: 'boolean',
      describe: 'Reuse embeddings across runs (--no-cache: compute all) [default: true]',
    })
    .option('cache-dir', {
      type: 'string',
      describe: 'Cache folder [default: $XDG_CACHE_HOME/tfjs-finetune or ~/.cache/tfjs-finetune]',
    })
    .option('finetune-epochs', {
      type: 'number',
      describe: 'Epochs of the fine-tune stage after the head stage (0: none) [default: 0]',
    })
    .option('unfreeze', {
      type: 'string',
      describe:
        'What trains in the fine-tune stage: all, from:LAYER or blocks:K [default: blocks:3, or all]',
    })
    .option('finetune-lr', {
      type: 'number',
      describe: 'Fine-tune learning rate [default: lr/100]',
    })
    .option('freeze-bn', {
      type: 'boolean',
      describe: 'Keep BatchNorm gamma/beta frozen too in the fine-tune stage',
    })
    .option('finetune-swa-start', {
      type: 'number',
      describe: 'Epoch or fraction where stage-two SWA starts [default: --swa-start]',
    })
    .option('finetune-swa-freq', {
      type: 'number',
      describe: 'Epochs between stage-two snapshots [default: --swa-freq]',
    })
    .option('finetune-swa-lr', {
      type: 'number',
      describe: 'Stage-two LR once SWA starts [default: finetune-lr/2]',
    })
    .option('augment', {
      type: 'string',
      describe: 'Fine-tune augmentation: any of flip,crop,rotate,brightness',
    })
    .option('augment-views', {
      type: 'number',
      describe: 'Augmented views cached per image [default: one fresh view per epoch]',
    })
    .option('keep', {
      type: 'string',
      choices: ['last', 'best'],
      describe: 'Export the last stage’s weights or the best on validation [default: last]',
    })
    .option('quiet', { type: 'boolean', describe: 'No progress, warnings or summary line' })
    .option('json', { type: 'boolean', describe: 'Print only the summary JSON on stdout' });
}

type Args = Awaited<ReturnType<ReturnType<typeof builder>['parseAsync']>>;

/** Keeps only the options the user gave: defaults live in the library. */
function given<T extends object>(o: T): Partial<T> {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as Partial<T>;
}

export async function handler(argv: Args): Promise<void> {
  const out = createOutput({ quiet: argv.quiet, json: argv.json });
  const options: TrainOptions = {
    data: argv.data,
    ...given({
      out: argv.out,
      backbone: argv.backbone,
      alpha: argv.alpha,
      featureLayer: argv.featureLayer,
      inputSize: argv.inputSize,
      backend: argv.backend as TrainOptions['backend'],
      engine: argv.engine as TrainOptions['engine'],
      threads: argv.threads,
      workers: argv.workers,
      valSplit: argv.valSplit,
      seed: argv.seed,
      epochs: argv.epochs,
      batchSize: argv.batchSize,
      optimizer: argv.optimizer as TrainOptions['optimizer'],
      lr: argv.lr,
      labelSmoothing: argv.labelSmoothing,
      classWeights: argv.classWeights as TrainOptions['classWeights'],
      hidden: argv.hidden,
      dropout: argv.dropout,
      swa: argv.swa,
      swaStart: argv.swaStart,
      swaFreq: argv.swaFreq,
      swaLr: argv.swaLr,
      swaAnnealEpochs: argv.swaAnnealEpochs,
      embedBatchSize: argv.embedBatchSize,
      decodeConcurrency: argv.decodeConcurrency,
      maxPixels: argv.maxPixels,
      cache: argv.cache,
      cacheDir: argv.cacheDir,
      finetuneEpochs: argv.finetuneEpochs,
      unfreeze: argv.unfreeze,
      finetuneLr: argv.finetuneLr,
      freezeBn: argv.freezeBn,
      finetuneSwaStart: argv.finetuneSwaStart,
      finetuneSwaFreq: argv.finetuneSwaFreq,
      finetuneSwaLr: argv.finetuneSwaLr,
      augment: argv.augment,
      augmentViews: argv.augmentViews,
      keep: argv.keep as TrainOptions['keep'],
    }),
    onEvent(e) {
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
          const swa = l.snapshots ? ` swa ${l.snapshots}` : '';
          out.info(
            `${l.stage} epoch ${l.epoch}/${e.epochs} loss ${l.loss.toFixed(4)} acc ${l.acc.toFixed(4)}${val} lr ${l.lr.toPrecision(3)}${swa} (${l.seconds.toFixed(2)} s)`,
          );
          break;
        }
        case 'stage-end':
          out.info(
            `${e.stage} stage val acc: raw ${fmt(e.raw)}${e.swa !== null ? `, swa ${fmt(e.swa)}` : ''}`,
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
