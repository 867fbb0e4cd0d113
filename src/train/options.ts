import path from 'node:path';
import { DEFAULT_BACKBONE } from '../backbones/registry.js';
import { BACKEND_OPTIONS, type BackendOption } from '../backend/index.js';
import {
  AUGMENT_KINDS,
  type AugmentKind,
  DEFAULT_CROP,
  parseAugment,
  parseRange,
} from '../data/augment.js';
import { defaultCacheDir } from '../data/cache.js';
import { DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS } from '../data/decode.js';
import { EMBED_CONCURRENCY } from '../data/embed.js';
import { ENGINE_OPTIONS, type EngineOption } from '../engine/index.js';
import { FinetuneError, invalidOption } from '../errors.js';
import {
  AVERAGE_OPTIONS,
  type AverageOption,
  checkSwaStart,
  formatFrequency,
  LR_SCHEDULES,
  type LrScheduleKind,
  parseFrequency,
  SWA_SCHEDULES,
  type SwaScheduleKind,
} from '../swa/schedule.js';
import { closest } from '../util/closest.js';
import * as is from '../util/is.js';
import type { TrainEvent } from './events.js';
import { parseUnfreeze } from './finetune.js';
import { OPTIMIZERS, type OptimizerName } from './optimizers.js';

/**
 * Everything `train` accepts. Only `data` is required. Defaults, ranges and docs live in
 * `TRAIN_OPTIONS` below (the table that also builds the CLI, `--help` and the README).
 */
export interface TrainOptions {
  data: string;
  out?: string;
  backbone?: string;
  alpha?: number;
  featureLayer?: string;
  inputSize?: number;
  init?: string;
  backend?: BackendOption;
  engine?: EngineOption;
  threads?: number;
  workers?: number;
  valSplit?: number;
  seed?: number;
  epochs?: number;
  batchSize?: number;
  optimizer?: OptimizerName;
  lr?: number;
  labelSmoothing?: number;
  classWeights?: 'balanced' | 'none';
  hidden?: number;
  dropout?: number;
  headBn?: boolean;
  swa?: boolean;
  average?: AverageOption;
  emaDecay?: number;
  swaStart?: number;
  swaFreq?: number | string;
  swaLr?: number;
  swaSchedule?: SwaScheduleKind;
  swaAnnealEpochs?: number;
  swaCycle?: number;
  swag?: number;
  lrSchedule?: LrScheduleKind;
  warmupEpochs?: number;
  earlyStop?: number;
  minDelta?: number;
  embedBatchSize?: number;
  decodeConcurrency?: number;
  maxPixels?: number;
  maxBytes?: number;
  cache?: boolean;
  cacheDir?: string;
  finetuneEpochs?: number;
  unfreeze?: string;
  finetuneLr?: number;
  finetuneWarmupEpochs?: number;
  lrMult?: number;
  freezeBn?: boolean;
  bn?: 'frozen' | 'train';
  finetuneDropout?: number;
  finetuneThreads?: number;
  finetuneSwaStart?: number;
  finetuneSwaFreq?: number | string;
  finetuneSwaLr?: number;
  augment?: readonly AugmentKind[] | string;
  augmentViews?: number;
  /** The random-resized-crop's area range, `LO,HI` or [lo, hi] (fractions of the image). */
  cropScale?: readonly number[] | string;
  /** The random-resized-crop's width/height range, `LO,HI` or [lo, hi]. */
  cropRatio?: readonly number[] | string;
  keep?: 'last' | 'best';
  checkpointEvery?: number;
  /** Progress and results as they happen; the library itself prints nothing. */
  onEvent?: (event: TrainEvent) => void;
}

/** Options with no default: they stay undefined unless given. */
type Optional =
  | 'alpha'
  | 'featureLayer'
  | 'inputSize'
  | 'init'
  | 'threads'
  | 'workers'
  | 'finetuneThreads'
  | 'unfreeze'
  | 'checkpointEvery';

/** The options with every default filled in, as written to config.json. */
export type ResolvedTrainOptions = Required<
  Omit<TrainOptions, 'onEvent' | Optional | 'augment' | 'cropScale' | 'cropRatio'>
> &
  Pick<TrainOptions, Optional> & {
    augment: AugmentKind[];
    cropScale: [number, number];
    cropRatio: [number, number];
  };

/** Which phase of a run reads an option. */
export type OptionPhase = 'prepare' | 'embed' | 'head' | 'finetune' | 'records';

export type OptionKey = Exclude<keyof TrainOptions, 'onEvent'>;

/** A condition an option needs; giving the option without it is an error, never ignored. */
type Need =
  | 'finetune'
  | 'swa'
  | 'ema'
  | 'swaOnly'
  | 'swaKind'
  | 'cyclic'
  | 'annealing'
  | 'earlyStop'
  | 'augment'
  | 'crop';

/** One option: the single place its flag, type, default, range and doc are written. */
export interface OptionRow {
  readonly key: OptionKey;
  /** The CLI flag without dashes. */
  readonly flag: string;
  readonly type: 'string' | 'number' | 'boolean';
  /** For the CLI: its choices. */
  readonly choices?: readonly string[];
  /** The default as the docs say it. */
  readonly defaultText: string;
  /** The default, from the options resolved so far (rows resolve in table order); undefined: none. */
  readonly fallback?: (r: Partial<ResolvedTrainOptions>) => unknown;
  /** Validates a given or default value, returning what the run uses. */
  readonly check: (value: unknown, r: Partial<ResolvedTrainOptions>) => unknown;
  readonly phase: OptionPhase;
  readonly needs?: readonly Need[];
  readonly doc: string;
}

function timestamp(): string {
  return new Date().toISOString().replace(/[:.]/g, '-').replace('T', '_').slice(0, 19);
}

/** Upper bounds: far above any useful value, low enough that a typo fails before any work. */
export const MAX_EPOCHS = 100_000;
export const MAX_LR = 10;
/** `--lr-mult`: 1e4 already puts the first unfrozen block four decades below the head. */
export const MAX_LR_MULT = 1e4;
/** Square input sizes a backbone can take: below 32 the strided convs leave nothing. */
/** `--swag`: each kept deviation is one more copy of the trainable variables. */
export const MAX_SWAG_RANK = 1000;
export const INPUT_SIZE_RANGE = Object.freeze({ min: 32, max: 2048 });

const positiveInteger = (key: string) => (v: unknown) => is.positiveInteger(key, v);
const epochs = (key: string, min: number) => (v: unknown) =>
  is.integerInRange(key, v, min, MAX_EPOCHS);
const learningRate = (key: string) => (v: unknown) => is.positiveNumberUpTo(key, v, MAX_LR);
const positiveNumber = (key: string) => (v: unknown) => is.positiveNumber(key, v);
const fraction = (key: string) => (v: unknown) => is.numberInRange(key, v, 0, 1, true);
const bool = (key: string) => (v: unknown) => is.boolean(key, v);
const text = (key: string) => (v: unknown) => is.nonEmptyString(key, v);
const choice =
  <T extends string>(key: string, values: readonly T[]) =>
  (v: unknown) =>
    is.oneOfValues(key, v, values);

/**
 * Every option of `train`, in the order defaults resolve (a default may read options
 * above it). The library's resolver, the CLI's flags and `--help`, and the README's
 * table all come from here.
 */
export const TRAIN_OPTIONS: readonly OptionRow[] = Object.freeze([
  {
    key: 'data',
    flag: 'data',
    type: 'string',
    defaultText: 'required',
    check: (v) => {
      if (typeof v !== 'string' || !v) throw invalidOption('data', 'a folder of class folders', v);
      return v;
    },
    phase: 'prepare',
    doc: 'folder of class folders, or with `train/`, `val/` and/or `test/` folders of them',
  },
  {
    key: 'out',
    flag: 'out',
    type: 'string',
    defaultText: '`runs/<timestamp>`',
    fallback: () => path.join('runs', timestamp()),
    check: text('out'),
    phase: 'records',
    doc: 'run folder',
  },
  {
    key: 'backbone',
    flag: 'backbone',
    type: 'string',
    defaultText: `\`${DEFAULT_BACKBONE}\``,
    fallback: () => DEFAULT_BACKBONE,
    check: text('backbone'),
    phase: 'prepare',
    doc: 'registry id (`finetune models`) or path/URL of a `model.json`',
  },
  {
    key: 'alpha',
    flag: 'alpha',
    type: 'number',
    defaultText: '1',
    check: positiveNumber('alpha'),
    phase: 'prepare',
    doc: 'width of `mobilenet_v1`/`mobilenet_v2` (TF Hub)',
  },
  {
    key: 'featureLayer',
    flag: 'feature-layer',
    type: 'string',
    defaultText: 'last 4-D layer',
    check: text('featureLayer'),
    phase: 'prepare',
    doc: 'where a `model.json` backbone is cut',
  },
  {
    key: 'inputSize',
    flag: 'input-size',
    type: 'number',
    defaultText: "the backbone's",
    check: (v) => is.integerInRange('inputSize', v, INPUT_SIZE_RANGE.min, INPUT_SIZE_RANGE.max),
    phase: 'prepare',
    doc: `square input size (${INPUT_SIZE_RANGE.min}–${INPUT_SIZE_RANGE.max})`,
  },
  {
    key: 'init',
    flag: 'init',
    type: 'string',
    defaultText: 'none',
    // A path only: whether it is a finished run that fits this one is checked by prepareRun.
    check: text('init'),
    phase: 'prepare',
    doc: 'start from an exported run (its folder or `model/`): its head, old classes mapped by name, and its fine-tuned body (see *Continuing from a run*)',
  },
  {
    key: 'backend',
    flag: 'backend',
    type: 'string',
    choices: BACKEND_OPTIONS,
    defaultText: '`auto`',
    fallback: () => 'auto',
    check: choice('backend', BACKEND_OPTIONS),
    phase: 'prepare',
    doc: 'tfjs backend that trains: `auto` (node-gpu > node > wasm), `node-gpu`, `node`, `wasm`, `cpu`',
  },
  {
    key: 'engine',
    flag: 'engine',
    type: 'string',
    choices: ENGINE_OPTIONS,
    defaultText: '`auto`',
    fallback: () => 'auto',
    check: choice('engine', ENGINE_OPTIONS),
    phase: 'embed',
    doc: 'frozen passes and fine-tune steps: `onnx` (ONNX Runtime), `tfjs`; `auto` = onnx unless the model cannot be lowered (for steps: a layer the step graph does not cover, or BatchNorm that trains), the backend is a GPU or onnxruntime-node does not load',
  },
  {
    key: 'threads',
    flag: 'threads',
    type: 'number',
    defaultText: 'all cores',
    check: positiveInteger('threads'),
    phase: 'embed',
    doc: 'ONNX Runtime threads for frozen passes: with 2 or more (on the CPU), that many single-threaded sessions, each in a worker thread; with 1, one session in the main thread',
  },
  {
    key: 'workers',
    flag: 'workers',
    type: 'number',
    defaultText: 'all cores',
    check: positiveInteger('workers'),
    phase: 'embed',
    doc: 'worker threads of the tfjs engine on wasm (`--engine tfjs` or the fallback)',
  },
  {
    key: 'valSplit',
    flag: 'val-split',
    type: 'number',
    defaultText: '0.2',
    fallback: () => 0.2,
    check: fraction('valSplit'),
    phase: 'prepare',
    doc: 'held-out fraction of each class (when there is no val/ folder)',
  },
  {
    key: 'seed',
    flag: 'seed',
    type: 'number',
    defaultText: '42',
    fallback: () => 42,
    check: (v) => is.integer('seed', v),
    phase: 'prepare',
    doc: 'split, shuffles, initialisation, dropout',
  },
  {
    key: 'epochs',
    flag: 'epochs',
    type: 'number',
    defaultText: '40',
    fallback: () => 40,
    check: epochs('epochs', 1),
    phase: 'head',
    doc: `head-stage epochs (at most ${MAX_EPOCHS})`,
  },
  {
    key: 'batchSize',
    flag: 'batch-size',
    type: 'number',
    defaultText: '32',
    fallback: () => 32,
    check: positiveInteger('batchSize'),
    phase: 'head',
    doc: 'training batch size (both stages; a batch must fit in 1 GiB)',
  },
  {
    key: 'optimizer',
    flag: 'optimizer',
    type: 'string',
    choices: Object.keys(OPTIMIZERS),
    defaultText: '`adam`',
    fallback: () => 'adam',
    check: choice('optimizer', Object.keys(OPTIMIZERS) as OptimizerName[]),
    phase: 'head',
    doc: '`adam`, `sgd`, `momentum` (0.9)',
  },
  {
    key: 'lr',
    flag: 'lr',
    type: 'number',
    defaultText: '0.01',
    // On cached features the head is a small convex-ish problem; with the sample set 0.01
    // reaches the tuned logistic-regression probe where Keras's 1e-3 stays ~7 points short.
    fallback: () => 0.01,
    check: learningRate('lr'),
    phase: 'head',
    doc: `head learning rate (at most ${MAX_LR})`,
  },
  {
    key: 'labelSmoothing',
    flag: 'label-smoothing',
    type: 'number',
    defaultText: '0.1',
    fallback: () => 0.1,
    check: fraction('labelSmoothing'),
    phase: 'head',
    doc: 'label smoothing of the training loss',
  },
  {
    key: 'classWeights',
    flag: 'class-weights',
    type: 'string',
    choices: ['balanced', 'none'],
    defaultText: '`none`',
    fallback: () => 'none',
    check: choice('classWeights', ['balanced', 'none'] as const),
    phase: 'head',
    doc: '`balanced`: n / (k · n_class), as Keras/sklearn; the loss is the weighted sum over the rows of non-zero weight, divided by their count (0 for a batch with none)',
  },
  {
    key: 'hidden',
    flag: 'hidden',
    type: 'number',
    defaultText: '0',
    fallback: () => 0,
    check: (v) => is.nonNegativeInteger('hidden', v),
    phase: 'head',
    doc: 'units of a hidden Dense+ReLU layer in the head (0: none; its weights must fit in 1 GiB)',
  },
  {
    key: 'dropout',
    flag: 'dropout',
    type: 'number',
    defaultText: '0.2',
    fallback: () => 0.2,
    check: fraction('dropout'),
    phase: 'head',
    doc: 'dropout before the classifier',
  },
  {
    key: 'headBn',
    flag: 'head-bn',
    type: 'boolean',
    defaultText: 'off',
    fallback: () => false,
    check: bool('headBn'),
    phase: 'head',
    doc: "BatchNorm before each Dense of the head (fastai's `create_head`): on the features and on the hidden layer; its statistics are recomputed after averaging (see *Averaging*)",
  },
  {
    key: 'swa',
    flag: 'swa',
    type: 'boolean',
    defaultText: 'on',
    fallback: () => true,
    check: bool('swa'),
    phase: 'head',
    doc: '`--no-swa` is `--average none` (kept as an alias)',
  },
  {
    key: 'average',
    flag: 'average',
    type: 'string',
    choices: AVERAGE_OPTIONS,
    defaultText: '`swa`',
    fallback: (r) => (r.swa === false ? 'none' : 'swa'),
    check: (v, r) => {
      const value = is.oneOfValues('average', v, AVERAGE_OPTIONS);
      if (r.swa === false && value !== 'none')
        throw new FinetuneError(`swa turned off contradicts average ${value}`, {
          renamed: (shown) => `${shown('swa')} turned off contradicts ${shown('average')} ${value}`,
        });
      return value;
    },
    phase: 'head',
    doc: 'weight averaging of the trainable variables, both stages: `swa` (equal-weight mean of snapshots), `ema` (exponential moving average after every step), `none` (the raw weights)',
  },
  {
    key: 'emaDecay',
    flag: 'ema-decay',
    type: 'number',
    defaultText: '0.999',
    fallback: () => 0.999,
    check: (v) => is.numberInRange('emaDecay', v, 0, 1, true),
    phase: 'head',
    needs: ['swa', 'ema'],
    doc: 'EMA decay, warmed up as min(decay, (1 + t)/(10 + t)) at its t-th update',
  },
  {
    key: 'swaStart',
    flag: 'swa-start',
    type: 'number',
    defaultText: '0.75',
    fallback: () => 0.75,
    check: (v, r) => checkSwaStart('swaStart', v, r.epochs!),
    phase: 'head',
    needs: ['swa'],
    doc: 'epoch (≥ 1) or fraction of `--epochs` where averaging (SWA or EMA) starts',
  },
  {
    key: 'swaSchedule',
    flag: 'swa-schedule',
    type: 'string',
    choices: SWA_SCHEDULES,
    defaultText: '`cos`',
    fallback: () => 'cos',
    check: choice('swaSchedule', SWA_SCHEDULES),
    phase: 'head',
    needs: ['swa'],
    doc: 'LR once averaging starts: `constant` (swa-lr at once), `cos`/`linear` (to swa-lr over swa-anneal-epochs, PyTorch SWALR), `cyclic` (lr down to swa-lr in each cycle of swa-cycle epochs, a snapshot at its end)',
  },
  {
    key: 'swaFreq',
    flag: 'swa-freq',
    type: 'string',
    defaultText: '1',
    fallback: () => 1,
    check: (v) => formatFrequency(parseFrequency('swaFreq', v)),
    phase: 'head',
    needs: ['swa', 'swaOnly'],
    doc: 'SWA snapshots every N epochs (`2`) or every N optimizer steps (`50s`); not with `cyclic`',
  },
  {
    key: 'swaLr',
    flag: 'swa-lr',
    type: 'number',
    defaultText: 'lr / 2',
    fallback: (r) => r.lr! / 2,
    check: learningRate('swaLr'),
    phase: 'head',
    needs: ['swa'],
    doc: 'learning rate once averaging starts',
  },
  {
    key: 'swaAnnealEpochs',
    flag: 'swa-anneal-epochs',
    type: 'number',
    defaultText: '0',
    fallback: () => 0,
    check: (v) => is.nonNegativeInteger('swaAnnealEpochs', v),
    phase: 'head',
    needs: ['swa', 'annealing'],
    doc: '`cos`/`linear`: epochs to go from the LR to swa-lr (0: at once)',
  },
  {
    key: 'swaCycle',
    flag: 'swa-cycle',
    type: 'number',
    defaultText: '1',
    fallback: () => 1,
    check: positiveInteger('swaCycle'),
    phase: 'head',
    needs: ['swa', 'cyclic'],
    doc: '`cyclic`: epochs per cycle',
  },
  {
    key: 'swag',
    flag: 'swag',
    type: 'number',
    defaultText: '0 (off)',
    fallback: () => 0,
    check: (v) => {
      if (v === 0) return 0;
      if (!Number.isInteger(v) || (v as number) < 2 || (v as number) > MAX_SWAG_RANK)
        throw invalidOption('swag', `0 (off) or an integer from 2 to ${MAX_SWAG_RANK}`, v);
      return v;
    },
    phase: 'head',
    needs: ['swaKind'],
    doc: "SWAG (Maddox et al. 2019): at every SWA snapshot of each stage, also the second moment and the last K deviations from the mean; the export carries the last stage's beside the model for `predict`/`evaluate --samples` (see Averaging)",
  },
  {
    key: 'lrSchedule',
    flag: 'lr-schedule',
    type: 'string',
    choices: LR_SCHEDULES,
    defaultText: '`constant`',
    fallback: () => 'constant',
    check: choice('lrSchedule', LR_SCHEDULES),
    phase: 'head',
    doc: 'head LR before averaging: `constant`, `cos` (cosine from lr to swa-lr at the averaging start, or to 0 without averaging), `step` (÷10 at 50% and 75% of those epochs)',
  },
  {
    key: 'warmupEpochs',
    flag: 'warmup-epochs',
    type: 'number',
    defaultText: '0',
    fallback: () => 0,
    check: (v, r) => is.integerInRange('warmupEpochs', v, 0, r.epochs!),
    phase: 'head',
    doc: 'head stage: linear LR warm-up over this many epochs, step by step (the fine-tune stage: `--finetune-warmup-epochs`)',
  },
  {
    key: 'earlyStop',
    flag: 'early-stop',
    type: 'number',
    defaultText: '0 (off)',
    fallback: () => 0,
    check: (v) => is.integerInRange('earlyStop', v, 0, MAX_EPOCHS),
    phase: 'head',
    doc: 'patience in epochs on validation loss, both stages: restores the best weights when it stops a stage; with averaging, running out before averaging starts starts it (see Averaging)',
  },
  {
    key: 'minDelta',
    flag: 'min-delta',
    type: 'number',
    defaultText: '0',
    fallback: () => 0,
    check: (v) => is.numberInRange('minDelta', v, 0, 1e6, true),
    phase: 'head',
    needs: ['earlyStop'],
    doc: 'early stopping: a loss lower by more than this is an improvement',
  },
  {
    key: 'embedBatchSize',
    flag: 'embed-batch-size',
    type: 'number',
    defaultText: '16',
    fallback: () => 16,
    check: positiveInteger('embedBatchSize'),
    phase: 'embed',
    doc: "images per frozen-pass batch (a batch of pixels must fit in 1 GiB); the fine-tune stage's prefix pass takes at most 8, which bounds ONNX Runtime's memory arena for the rest of the stage",
  },
  {
    key: 'decodeConcurrency',
    flag: 'decode-concurrency',
    type: 'number',
    defaultText: String(EMBED_CONCURRENCY),
    fallback: () => EMBED_CONCURRENCY,
    check: positiveInteger('decodeConcurrency'),
    phase: 'embed',
    doc: 'images read, hashed and decoded at once',
  },
  {
    key: 'maxPixels',
    flag: 'max-pixels',
    type: 'number',
    defaultText: String(DEFAULT_MAX_PIXELS),
    fallback: () => DEFAULT_MAX_PIXELS,
    check: positiveInteger('maxPixels'),
    phase: 'embed',
    doc: 'larger images (width × height) are skipped',
  },
  {
    key: 'maxBytes',
    flag: 'max-bytes',
    type: 'number',
    defaultText: String(DEFAULT_MAX_BYTES),
    fallback: () => DEFAULT_MAX_BYTES,
    check: positiveInteger('maxBytes'),
    phase: 'embed',
    doc: 'larger files are skipped unread; only regular files are read (not FIFOs or devices)',
  },
  {
    key: 'cache',
    flag: 'cache',
    type: 'boolean',
    defaultText: 'on',
    fallback: () => true,
    check: bool('cache'),
    phase: 'embed',
    doc: 'keep embeddings and lowered models on disk between runs (see *Embedding cache*); `--no-cache` computes everything',
  },
  {
    key: 'cacheDir',
    flag: 'cache-dir',
    type: 'string',
    defaultText: '`$XDG_CACHE_HOME/tfjs-finetune`, else `~/.cache/tfjs-finetune`',
    fallback: () => defaultCacheDir(),
    check: text('cacheDir'),
    phase: 'embed',
    doc: 'cache folder',
  },
  {
    key: 'finetuneEpochs',
    flag: 'finetune-epochs',
    type: 'number',
    defaultText: '0',
    fallback: () => 0,
    check: epochs('finetuneEpochs', 0),
    phase: 'finetune',
    doc: `epochs of the fine-tune stage (0: none; at most ${MAX_EPOCHS})`,
  },
  {
    key: 'unfreeze',
    flag: 'unfreeze',
    type: 'string',
    defaultText: '`blocks:3` (`all` for backbones without blocks)',
    check: (v) => {
      parseUnfreeze(v as string);
      return v;
    },
    phase: 'finetune',
    needs: ['finetune'],
    doc: '`all`, `from:LAYER_NAME` (that layer and all after it) or `blocks:K` (the last K blocks; the final 1×1 conv belongs to the last)',
  },
  {
    key: 'finetuneLr',
    flag: 'finetune-lr',
    type: 'number',
    defaultText: 'lr / 100',
    // With Adam, a tenth of the head LR (1e-3) wrecked the pretrained top in the first epoch
    // on the sample set (val acc 0.74 → 0.48) where 1e-4 kept it; 1/100 is Keras's guide's ratio.
    fallback: (r) => r.lr! / 100,
    check: learningRate('finetuneLr'),
    phase: 'finetune',
    needs: ['finetune'],
    doc: 'fine-tune learning rate, reached by a linear warm-up (`--finetune-warmup-epochs`); a fresh optimizer for the new trainable set',
  },
  {
    key: 'finetuneWarmupEpochs',
    flag: 'finetune-warmup-epochs',
    type: 'number',
    defaultText: '1',
    fallback: () => 1,
    // Up to the whole stage, as the head's --warmup-epochs: a longer ramp would never reach the LR.
    check: (v, r) => {
      if (typeof v !== 'number' || !Number.isInteger(v) || v < 0 || v > r.finetuneEpochs!)
        throw invalidOption(
          'finetuneWarmupEpochs',
          `an integer from 0 to ${r.finetuneEpochs} (the fine-tune stage's epochs)`,
          v,
        );
      return v;
    },
    phase: 'finetune',
    needs: ['finetune'],
    doc: "fine-tune stage: linear LR warm-up over this many epochs, step by step (0: the full LR from the first step; at most the stage's epochs)",
  },
  {
    key: 'lrMult',
    flag: 'lr-mult',
    type: 'number',
    defaultText: '1',
    fallback: () => 1,
    check: (v) => is.numberInRange('lrMult', v, 1, MAX_LR_MULT),
    phase: 'finetune',
    needs: ['finetune'],
    doc: `discriminative LRs (fastai's \`slice(lr / K, lr)\`): the head at \`--finetune-lr\`, the first unfrozen block at finetune-lr / K, the blocks between geometrically spaced; 1 to ${MAX_LR_MULT} (see *Fine-tune stage*)`,
  },
  {
    key: 'freezeBn',
    flag: 'freeze-bn',
    type: 'boolean',
    defaultText: 'off',
    fallback: () => false,
    check: bool('freezeBn'),
    phase: 'finetune',
    needs: ['finetune'],
    doc: 'also keep BatchNorm gamma/beta frozen (with `--bn train` the statistics still train)',
  },
  {
    key: 'bn',
    flag: 'bn',
    type: 'string',
    choices: ['frozen', 'train'],
    defaultText: '`frozen`',
    fallback: () => 'frozen',
    check: choice('bn', ['frozen', 'train'] as const),
    phase: 'finetune',
    needs: ['finetune'],
    doc: "BatchNorm of the unfrozen blocks: `frozen` normalises with the backbone's statistics (inference mode); `train` with batch statistics, updating the moving ones and recomputing them after averaging; the frozen prefix's BN is never touched",
  },
  {
    key: 'finetuneDropout',
    flag: 'finetune-dropout',
    type: 'number',
    defaultText: 'dropout',
    fallback: (r) => r.dropout,
    check: fraction('finetuneDropout'),
    phase: 'finetune',
    needs: ['finetune'],
    doc: "the head's dropout rate in the fine-tune stage only (the head stage keeps `--dropout`; after `--dropout 0` the stage adds one before the classifier); the export is built as without it (dropout does nothing at inference)",
  },
  {
    key: 'finetuneThreads',
    flag: 'finetune-threads',
    type: 'number',
    defaultText:
      'ONNX Runtime: --threads; tfjs: 2 on wasm/cpu with 2+ cores, whole steps on native TF',
    check: (v) => is.integerInRange('finetuneThreads', v, 1, 2),
    phase: 'finetune',
    needs: ['finetune'],
    doc: "threads that compute a fine-tune step, the figures the same either way: ONNX Runtime's threads for steps on onnx; on tfjs, the step's gradient is the sum of the batch's two halves' (each with its own dropout seed), and with 2 a worker thread computes the second half meanwhile; tfjs steps are whole, on one thread, when BatchNorm trains (`--bn train`, `--head-bn`), and by default on native TensorFlow",
  },
  {
    key: 'finetuneSwaStart',
    flag: 'finetune-swa-start',
    type: 'number',
    defaultText: 'swa-start',
    fallback: (r) => r.swaStart,
    check: (v, r) =>
      r.finetuneEpochs! > 0 ? checkSwaStart('finetuneSwaStart', v, r.finetuneEpochs!) : v,
    phase: 'finetune',
    needs: ['finetune', 'swa'],
    doc: 'epoch or fraction of `--finetune-epochs` where stage-two averaging starts',
  },
  {
    key: 'finetuneSwaFreq',
    flag: 'finetune-swa-freq',
    type: 'number',
    defaultText: 'swa-freq',
    fallback: (r) => r.swaFreq,
    check: (v) => formatFrequency(parseFrequency('finetuneSwaFreq', v)),
    phase: 'finetune',
    needs: ['finetune', 'swa', 'swaOnly'],
    doc: 'stage-two SWA snapshots every N epochs or N steps (`50s`)',
  },
  {
    key: 'finetuneSwaLr',
    flag: 'finetune-swa-lr',
    type: 'number',
    defaultText: 'finetune-lr / 2',
    fallback: (r) => r.finetuneLr! / 2,
    check: learningRate('finetuneSwaLr'),
    phase: 'finetune',
    needs: ['finetune', 'swa'],
    doc: 'stage-two learning rate once SWA starts; stage two averages its own trainable variables (head included)',
  },
  {
    key: 'augment',
    flag: 'augment',
    type: 'string',
    defaultText: 'none',
    fallback: () => [],
    check: (v) => parseAugment(v as string | readonly string[]),
    phase: 'finetune',
    needs: ['finetune'],
    doc: `stage-two augmentation, any of \`${AUGMENT_KINDS.join(',')}\` (seeded)`,
  },
  {
    key: 'augmentViews',
    flag: 'augment-views',
    type: 'number',
    defaultText: 'one fresh view per epoch',
    fallback: (r) => Math.max(1, r.finetuneEpochs!),
    check: positiveInteger('augmentViews'),
    phase: 'finetune',
    needs: ['finetune', 'augment'],
    doc: 'augmented views cached per image, cycled over the epochs',
  },
  {
    key: 'cropScale',
    flag: 'crop-scale',
    type: 'string',
    defaultText: '0.8,1',
    fallback: () => [...DEFAULT_CROP.scale],
    check: (v) => parseRange('cropScale', v as string | readonly number[]),
    phase: 'finetune',
    needs: ['finetune', 'crop'],
    doc: "the crop's area as a fraction of the image, `LO,HI` (drawn as torchvision's RandomResizedCrop; its own default is 0.08,1)",
  },
  {
    key: 'cropRatio',
    flag: 'crop-ratio',
    type: 'string',
    defaultText: '0.75,1.3333',
    fallback: () => [...DEFAULT_CROP.ratio],
    check: (v) => parseRange('cropRatio', v as string | readonly number[]),
    phase: 'finetune',
    needs: ['finetune', 'crop'],
    doc: "the crop's width / height, `LO,HI`, drawn log-uniformly",
  },
  {
    key: 'keep',
    flag: 'keep',
    type: 'string',
    choices: ['last', 'best'],
    defaultText: '`last`',
    fallback: () => 'last',
    check: choice('keep', ['last', 'best'] as const),
    phase: 'head',
    doc: "`last`: each stage's averaged weights (raw without averaging); `best`: by validation loss, the head stage keeps its raw, averaged or (with `--swag`) SWAG weights, the fine-tune stage the best of the head's and its own; `summary.json` lists every candidate",
  },
  {
    key: 'checkpointEvery',
    flag: 'checkpoint-every',
    type: 'number',
    defaultText: '0 (off)',
    check: (v) => is.integerInRange('checkpointEvery', v, 0, MAX_EPOCHS),
    phase: 'head',
    doc: 'write `RUN/checkpoint/` at the end of every N-th epoch of either stage, for `--resume RUN` (see *Checkpoints and resume*)',
  },
] satisfies OptionRow[]);

const ROWS = new Map(TRAIN_OPTIONS.map((row) => [row.key, row]));

/** The row of an option (by library key). */
export function optionRow(key: string): OptionRow | undefined {
  return ROWS.get(key as OptionKey);
}

/** Whether a condition holds for resolved options. */
function holds(need: Need, r: Partial<ResolvedTrainOptions>): boolean {
  switch (need) {
    case 'finetune':
      return r.finetuneEpochs! > 0;
    case 'swa':
      return r.average !== 'none';
    case 'ema':
      return r.average === 'ema';
    case 'swaOnly':
      return r.average === 'swa' && r.swaSchedule !== 'cyclic';
    case 'swaKind':
      return r.average === 'swa';
    case 'cyclic':
      return r.average !== 'none' && r.swaSchedule === 'cyclic';
    case 'annealing':
      return r.average !== 'none' && (r.swaSchedule === 'cos' || r.swaSchedule === 'linear');
    case 'earlyStop':
      return r.earlyStop! > 0;
    case 'augment':
      return (r.augment?.length ?? 0) > 0;
    case 'crop':
      return r.augment?.includes('crop') ?? false;
  }
}

/** What an option given without its need says; `shown` names an option (a key, or the CLI's flag). */
const NEED_MESSAGES: Readonly<
  Record<Need, (keys: readonly string[], shown: (key: string) => string) => string>
> = {
  finetune: (keys, shown) =>
    `${keys.map(shown).join(', ')} need a fine-tune stage (${shown('finetuneEpochs')} > 0)`,
  swa: (keys, shown) =>
    `${keys.map(shown).join(', ')} cannot be used with ${shown('average')} none (or ${shown('swa')} turned off)`,
  ema: (keys, shown) => `${keys.map(shown).join(', ')} needs ${shown('average')} ema`,
  swaOnly: (keys, shown) =>
    `${keys.map(shown).join(', ')} needs ${shown('average')} swa with a ${shown('swaSchedule')} other than cyclic (EMA updates after every step; cyclic snapshots at each cycle's end)`,
  swaKind: (keys, shown) =>
    `${keys.map(shown).join(', ')} needs ${shown('average')} swa (it is collected at the SWA snapshots)`,
  cyclic: (keys, shown) => `${keys.map(shown).join(', ')} needs ${shown('swaSchedule')} cyclic`,
  annealing: (keys, shown) =>
    `${keys.map(shown).join(', ')} needs ${shown('swaSchedule')} cos or linear`,
  earlyStop: (keys, shown) => `${keys.map(shown).join(', ')} needs ${shown('earlyStop')} > 0`,
  augment: (keys, shown) =>
    `${keys.map(shown).join(', ')} needs ${shown('augment')} (e.g. flip,crop)`,
  crop: (keys, shown) => `${keys.map(shown).join(', ')} needs crop in ${shown('augment')}`,
};

/**
 * Fills defaults and checks every option once, before any work, in one wording. An
 * option given without what it needs (a fine-tune option without a fine-tune stage, an
 * SWA option with SWA off) is an error, never ignored.
 *
 * @example resolveTrainOptions({ data: 'photos' }).swaLr // → 0.005 (lr / 2)
 */
export function resolveTrainOptions(o: TrainOptions): ResolvedTrainOptions {
  if (!o || typeof o !== 'object') throw invalidOption('data', 'a folder of class folders', o);
  const given = o as unknown as Record<string, unknown>;
  for (const key of Object.keys(given)) {
    if (key !== 'onEvent' && !ROWS.has(key as OptionKey) && given[key] !== undefined) {
      const near = closest(key, [...ROWS.keys()]);
      const say = (shown: (k: string) => string) =>
        `Unknown option ${key}${near ? `; did you mean ${shown(near)}?` : ''}`;
      throw new FinetuneError(
        say((k) => k),
        { renamed: say },
      );
    }
  }
  // The conditions first (they need nothing but each other), then every unmet need.
  const base: Partial<ResolvedTrainOptions> = {};
  for (const key of [
    'epochs',
    'finetuneEpochs',
    'swa',
    'average',
    'swaSchedule',
    'earlyStop',
    'augment',
  ] as const) {
    const row = ROWS.get(key)!;
    (base as Record<string, unknown>)[key] = row.check(given[key] ?? row.fallback?.(base), base);
  }
  for (const need of [
    'finetune',
    'augment',
    'crop',
    'swa',
    'ema',
    'swaOnly',
    'swaKind',
    'cyclic',
    'annealing',
    'earlyStop',
  ] as const) {
    if (holds(need, base)) continue;
    const keys = TRAIN_OPTIONS.filter(
      (row) => row.needs?.includes(need) && given[row.key] !== undefined,
    ).map((row) => row.key);
    if (keys.length) {
      const say = NEED_MESSAGES[need];
      throw new FinetuneError(
        say(keys, (k) => k),
        { renamed: (shown) => say(keys, shown) },
      );
    }
  }
  const r: Partial<ResolvedTrainOptions> = {};
  for (const row of TRAIN_OPTIONS) {
    const value = given[row.key] ?? row.fallback?.(r);
    // `data` alone has neither a default nor a way to be left out: its check says so.
    if (value === undefined && row.key !== 'data') continue;
    // Options whose condition does not hold keep their default unchecked: they do nothing.
    if (given[row.key] === undefined && row.needs?.some((n) => !holds(n, r))) {
      (r as Record<string, unknown>)[row.key] = value;
      continue;
    }
    (r as Record<string, unknown>)[row.key] = row.check(value, r);
  }
  return r as ResolvedTrainOptions;
}

/** The README's option table, generated from `TRAIN_OPTIONS`. */
export function optionsMarkdown(rows: readonly OptionRow[] = TRAIN_OPTIONS): string {
  const lines = ['| option | default | phase | meaning |', '|---|---|---|---|'];
  for (const row of rows) {
    if (row.key === 'data') continue;
    const flag =
      row.type === 'boolean' && row.defaultText === 'on' ? `--no-${row.flag}` : `--${row.flag}`;
    lines.push(`| \`${flag}\` | ${row.defaultText} | ${row.phase} | ${row.doc} |`);
  }
  return `${lines.join('\n')}\n`;
}
