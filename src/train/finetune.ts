import * as tf from '@tensorflow/tfjs';
import { type Backbone, backboneRecipe } from '../backbones/load.js';
import { cutPrefix } from '../backbones/prefix.js';
import { type BackendInfo, trainingThreads } from '../backend/index.js';
import {
  type AugmentKind,
  applyAugment,
  augmentPlan,
  type CropRanges,
  cropRangesId,
  DEFAULT_CROP,
} from '../data/augment.js';
import type { CacheNamespace, EmbeddingCache } from '../data/cache.js';
import { embedFiles } from '../data/embed.js';
import { type KeptPixels, PixelStore } from '../data/pixel-store.js';
import { PREPROCESS_CONTRACT } from '../data/preprocess.js';
import { createFrozenModel, type EngineContext } from '../engine/index.js';
import { OnnxRuntimeUnavailable } from '../engine/onnx/session.js';
import type { FrozenModel } from '../engine/types.js';
import { FinetuneError, invalidOption } from '../errors.js';
import { stageHead } from '../head/build.js';
import { type BatchNormLayer, layersBatchNorm } from '../swa/bn-refresh.js';
import type { TrainingCallback } from './callbacks.js';
import type { WeightsKind } from './events.js';
import {
  ArrayBatches,
  type Batches,
  CHUNK_ROWS,
  type Evaluation,
  evaluateBatches,
  type Forward,
  type StepPart,
} from './fit.js';
import { GradGraphUnsupported, OnnxSteps } from './onnx-step.js';
import type { OptimizerName } from './optimizers.js';
import {
  type EarlyStopSettings,
  runStage,
  type StageCheckpointing,
  type StageResult,
  type SwaSettings,
  type WeightsCandidate,
} from './stage.js';
import { StepWorker } from './step-worker.js';

/** What `--unfreeze` asks for. */
export type Unfreeze =
  | { readonly kind: 'all' }
  | { readonly kind: 'from'; readonly layer: string }
  | { readonly kind: 'blocks'; readonly count: number };

/**
 * Parses `all`, `from:LAYER_NAME` or `blocks:K`.
 *
 * @example parseUnfreeze('blocks:3') // → { kind: 'blocks', count: 3 }
 */
export function parseUnfreeze(text: string): Unfreeze {
  if (text === 'all') return { kind: 'all' };
  const from = /^from:(.+)$/.exec(text);
  if (from) return { kind: 'from', layer: from[1]! };
  const blocks = /^blocks:(\d+)$/.exec(text);
  if (blocks && Number(blocks[1]) > 0) return { kind: 'blocks', count: Number(blocks[1]) };
  throw invalidOption('unfreeze', 'all, from:LAYER_NAME or blocks:K (K ≥ 1)', text);
}

/** The first layer of the body that trains in the fine-tune stage. */
export function firstUnfrozenLayer(backbone: Backbone, u: Unfreeze): string {
  const body = backbone.model!;
  if (u.kind === 'all') {
    // Everything after the input normalisation.
    const first = body.layers.find(
      (l) => l.getClassName() !== 'InputLayer' && l.getClassName() !== 'Rescaling',
    );
    return first!.name;
  }
  if (u.kind === 'from') {
    if (!body.layers.some((l) => l.name === u.layer)) {
      throw invalidOption(
        'unfreeze',
        `from: followed by a layer of backbone ${backbone.spec.id}`,
        `from:${u.layer}`,
      );
    }
    return u.layer;
  }
  const blocks = backbone.spec.blocks;
  if (!blocks?.length) {
    throw new FinetuneError(
      `Backbone ${backbone.spec.id} names no blocks: use --unfreeze from:LAYER_NAME or --unfreeze all`,
    );
  }
  if (u.count > blocks.length) {
    throw invalidOption(
      'unfreeze',
      `blocks:1 to blocks:${blocks.length} for ${backbone.spec.id}`,
      `blocks:${u.count}`,
    );
  }
  return blocks[blocks.length - u.count]!;
}

/**
 * fastai's `even_mults(lo, hi, n)`: n values from `lo` to `hi`, evenly spaced on a log
 * scale, lo·(hi/lo)^(i/(n−1)). The last is `hi` itself (not a rounded power of it), and
 * n = 1 gives [hi].
 *
 * @example evenMults(1e-5, 1e-3, 3) // → [1e-5, 1e-4, 1e-3]
 */
export function evenMults(lo: number, hi: number, n: number): number[] {
  if (n === 1) return [hi];
  return Array.from({ length: n }, (_, i) => (i === n - 1 ? hi : lo * (hi / lo) ** (i / (n - 1))));
}

/** Layers of the unfrozen body that share one learning rate, named by their first layer. */
export interface LayerGroup {
  readonly from: string;
  readonly layers: readonly tf.layers.Layer[];
}

/**
 * The unfrozen body's layer groups for discriminative LRs: one per named block of the
 * backbone (a group starts at each block's first layer; a cut inside a block, or before
 * the first, makes a group of what lies between the cut and the next block), or the whole
 * unfrozen body as one group when the backbone names no blocks (fastai's default splitter
 * for an architecture it does not know: body and head).
 */
export function layerGroups(
  layers: readonly tf.layers.Layer[],
  blocks: readonly string[] | undefined,
): LayerGroup[] {
  const starts = new Set(blocks ?? []);
  const groups: { from: string; layers: tf.layers.Layer[] }[] = [];
  for (const layer of layers) {
    const last = groups[groups.length - 1];
    if (!last || starts.has(layer.name)) groups.push({ from: layer.name, layers: [layer] });
    else last.layers.push(layer);
  }
  return groups;
}

/**
 * LR factors of the body's groups then the head, for `--lr-mult K`: the head at 1, the
 * first group at 1/K, geometric in between (fastai's `slice(lr / K, lr)`).
 *
 * @example groupScales(2, 100) // → [0.01, 0.1, 1] (two body groups, then the head)
 */
export function groupScales(bodyGroups: number, k: number): number[] {
  return evenMults(1 / k, 1, bodyGroups + 1);
}

/** The body cut in two where one tensor flows: a frozen prefix and a trainable suffix sharing the body's layers. */
export interface SplitBody {
  /** Layer whose output feeds the first unfrozen layer (the prefix's output). */
  readonly cutLayer: string;
  /** Prefix output shape without the batch: [h, w, c] or [d]. */
  readonly cutShape: readonly number[];
  /** Raw pixels → the cut tensor. */
  readonly prefix: tf.LayersModel;
  /** The cut tensor → features; its layers are the body's own (training updates the body). */
  readonly suffix: tf.LayersModel;
  /** The body's layers after the cut, in order. */
  readonly layers: readonly tf.layers.Layer[];
  /**
   * Undoes the split's hold on the body's weights. Applying a layer symbolically raises
   * its reference count, so without this `body.dispose()` would leave the suffix's
   * variables alive. (The prefix re-uses the body's own graph and holds nothing.)
   */
  release(): void;
}

type Symbolic = tf.SymbolicTensor;

/**
 * Cuts the body at the input of `firstUnfrozen`. The suffix re-applies the body's own
 * layers to a new input, so its variables are the body's and nothing needs copying
 * back. A layer after the cut that also reads a tensor from before it (a skip
 * connection across the cut) makes the cut impossible: the error names both.
 */
export function splitBody(body: tf.LayersModel, firstUnfrozen: string): SplitBody {
  const { cut, cutLayer, cutShape, model: prefix } = cutPrefix(body, firstUnfrozen);
  const first = body.getLayer(firstUnfrozen);
  const input = tf.input({ shape: [...cutShape], name: `${firstUnfrozen}_input` });
  const mapped = new Map<number, Symbolic>([[cut.id, input]]);
  const layers: tf.layers.Layer[] = [];
  const startIndex = body.layers.indexOf(first);
  for (const layer of body.layers.slice(startIndex)) {
    const node = layer.inboundNodes[0]!;
    const ins = node.inputTensors as Symbolic[];
    const known = ins.map((t) => mapped.get(t.id));
    if (known.every((k) => k === undefined)) continue; // a branch that does not depend on the cut
    const missing = ins.find((_, i) => known[i] === undefined);
    if (missing) {
      throw new FinetuneError(
        `Cannot cut the backbone at ${firstUnfrozen}: layer ${layer.name} also reads ${missing.name} from before the cut; unfreeze from an earlier block`,
      );
    }
    const out = layer.apply(known.length === 1 ? known[0]! : (known as Symbolic[])) as Symbolic;
    mapped.set((node.outputTensors as Symbolic[])[0]!.id, out);
    layers.push(layer);
  }
  const output = mapped.get(body.outputs[0]!.id);
  if (!output)
    throw new FinetuneError(
      `Cannot cut the backbone at ${firstUnfrozen}: the features do not depend on it`,
    );
  const suffix = tf.model({ inputs: input, outputs: output, name: 'trainable_suffix' });
  return {
    cutLayer,
    cutShape,
    prefix,
    suffix,
    layers,
    release: () => {
      suffix.dispose();
    },
  };
}

/**
 * Makes every BatchNormalization layer in `layers` normalise with its moving statistics
 * even when called with `training: true` (Keras's `training=False` rule for fine-tuning):
 * tfjs-layers ignores `trainable` for BN and would otherwise use batch statistics and
 * update the moving ones. Gamma and beta still train. Returns a function that undoes it.
 *
 * For channels-last BN the layer becomes `x · s + t` with s = γ/√(σ² + ε) and
 * t = β − μ·s, whose gradients are plain broadcast reductions; tfjs's batchNorm gradient
 * goes through Tile, which cost ~0.4 s of a 1.7 s MobileNetV2 step on wasm.
 */
export function inferenceModeBatchNorm(layers: readonly tf.layers.Layer[]): () => void {
  const restores: (() => void)[] = [];
  for (const layer of layers) {
    if (layer.getClassName() !== 'BatchNormalization') continue;
    const l = layer as unknown as BatchNormLayer;
    const original = l.call;
    l.call = function (this: BatchNormLayer, inputs, kwargs) {
      const x = Array.isArray(inputs) ? inputs[0]! : inputs;
      const lastAxis = this.axis === -1 || this.axis === x.rank - 1;
      if (!lastAxis) return original.call(this, inputs, { ...kwargs, training: false });
      return tf.tidy(() => {
        const mean = this.movingMean.read();
        let scale = tf.rsqrt(tf.add(this.movingVariance.read(), this.epsilon));
        if (this.gamma) scale = tf.mul(scale, this.gamma.read());
        let shift = tf.neg(tf.mul(mean, scale));
        if (this.beta) shift = tf.add(shift, this.beta.read());
        return tf.add(tf.mul(x, scale), shift);
      });
    };
    restores.push(() => {
      l.call = original;
    });
  }
  return () => {
    for (const r of restores) r();
  };
}

/** What shapes the fine-tune stage's model (see stageModel). */
export interface StageModelSettings {
  readonly bn?: 'frozen' | 'train';
  readonly freezeBn: boolean;
  readonly dropout?: number;
}

/** The model the fine-tune stage trains: the body after the cut, then the head. */
export interface StageModel {
  readonly split: SplitBody;
  /** Cut tensor → logits; `training` applies dropout (and BN's batch statistics with `bn: 'train'`). */
  readonly forward: Forward;
  /** What trains: the unfrozen layers' trainable weights in order, then the head's. */
  readonly variables: readonly tf.Variable[];
  /** Fresh dropout seeds for the next step (see stageHead). */
  readonly reseed: (seeds: readonly number[]) => void;
  /** The head, and the rate of a dropout the stage adds before its classifier (see stageHead). */
  readonly head: tf.LayersModel;
  readonly addedDropout: number;
  /** Gives the body and head back as they were (BN mode, trainable flags, dropout, the split's hold). */
  restore(): void;
}

/**
 * Cuts `body` at `firstUnfrozen` and makes the suffix and `head` into the stage's model:
 * the suffix's BatchNorm in inference mode unless `bn: 'train'`, its BN frozen with
 * `freezeBn`, the head's dropout at the stage's rate. The stage and its step worker build
 * their models with this one function, so both compute the same.
 */
export function stageModel(
  body: tf.LayersModel,
  head: tf.LayersModel,
  firstUnfrozen: string,
  s: StageModelSettings,
): StageModel {
  const split = splitBody(body, firstUnfrozen);
  const restoreBn = s.bn === 'train' ? () => undefined : inferenceModeBatchNorm(split.layers);
  const restoreTrainable = split.layers.map((l) => {
    const was = l.trainable;
    l.trainable = !(s.freezeBn && l.getClassName() === 'BatchNormalization');
    return () => {
      l.trainable = was;
    };
  });
  const logits = stageHead(head, s.dropout);
  const variables = [...split.layers, ...head.layers].flatMap((l) =>
    l.trainableWeights.map((w) => w.read() as tf.Variable),
  );
  return {
    split,
    forward: (x, training) =>
      logits.forward(split.suffix.apply(x, { training }) as tf.Tensor, training),
    variables,
    reseed: logits.reseed,
    head,
    addedDropout: logits.addedDropout,
    restore: () => {
      logits.restore();
      restoreBn();
      for (const r of restoreTrainable) r();
      split.release();
    },
  };
}

/**
 * Why the stage's steps run on tfjs rather than ONNX Runtime, or null when they may run on
 * ONNX Runtime (if its graph covers the model: see buildGradGraph). `--engine` decides, as
 * for the frozen passes: `tfjs` asks for tfjs, and `auto` keeps tfjs on a GPU backend.
 * BatchNorm on batch statistics (`--bn train`, `--head-bn`) needs tfjs.
 */
export function tfjsStepsReason(engine: EngineContext, bnTrains: boolean): string | null {
  if (engine.engine === 'tfjs') return '--engine tfjs';
  if (engine.engine === 'auto' && engine.backend.gpu) return 'the tfjs backend runs on a GPU';
  if (bnTrains) return 'BatchNorm trains on batch statistics';
  return null;
}

/**
 * How the stage takes its steps: in halves (see FitOptions.halves) on `threads` threads, or
 * whole on one.
 * - BatchNorm on batch statistics (`bnTrains`): whole, since each half would normalise on
 *   its own statistics.
 * - Backends that train on one thread (wasm, cpu): halves, on `requested` threads (default:
 *   the cores), at most 2.
 * - Native TensorFlow: whole unless `requested` is given. Its kernels spread a step over
 *   the cores and it has no 4 GiB heap, so halves only cost it: the bench's recipe trained
 *   an epoch in 16.2 s with whole steps of 32, 18.2 s in halves and 21.4 s in 8-row chunks.
 */
export function stepPlan(
  backend: BackendInfo,
  bnTrains: boolean,
  requested: number | undefined,
): { halved: boolean; threads: number } {
  if (bnTrains) return { halved: false, threads: 1 };
  if (requested === undefined && backend.tfBackend === 'tensorflow')
    return { halved: false, threads: 1 };
  return { halved: true, threads: Math.min(requested ?? trainingThreads(backend), 2) };
}

/**
 * Rough bytes a training step keeps per image in the suffix: every layer's output,
 * kept for the backward pass, about three times over (activation, its gradient, and
 * temporaries). Used to lower a batch that would overflow the 4 GiB wasm heap.
 */
export function bytesPerImage(layers: readonly tf.layers.Layer[]): number {
  let floats = 0;
  for (const l of layers) {
    const shape = l.outputShape as number[];
    floats += shape.slice(1).reduce((a, b) => a * (b ?? 1), 1);
  }
  return floats * 4 * 3;
}

/** Prefix activations of a list of files, for one augmented view (or the plain images). */
export async function prefixActivations(
  files: readonly string[],
  prefix: FrozenModel,
  options: {
    augment: readonly AugmentKind[];
    /** The random-resized-crop's ranges (DEFAULT_CROP when not given). */
    crop?: CropRanges;
    view: number | null;
    seed: number;
    batchSize: number;
    concurrency: number;
    /** Decoded images kept between the views of one list (see embedFiles). */
    keep?: KeptPixels;
    /** Cache and namespace of the plain view; the view id is filled in here. */
    cache: { readonly store: EmbeddingCache; readonly namespace: CacheNamespace } | null;
  },
): Promise<{ data: Float32Array; rows: readonly number[] }> {
  const { augment, view, seed } = options;
  const crop = options.crop ?? DEFAULT_CROP;
  const augmented = view !== null && augment.length > 0;
  // `rrc`: crops drawn as torchvision's RandomResizedCrop (views of the earlier clamped draw are not reused).
  const cropId = augment.includes('crop') ? `:rrc${cropRangesId(crop)}` : '';
  const viewId = augmented
    ? `augment:${augment.join('+')}${cropId}:seed${seed}:view${view}`
    : 'plain';
  const result = await embedFiles(files, prefix, {
    batchSize: options.batchSize,
    concurrency: options.concurrency,
    ...(options.keep ? { keep: options.keep } : {}),
    cache: options.cache
      ? { store: options.cache.store, namespace: { ...options.cache.namespace, view: viewId } }
      : null,
    ...(augmented
      ? {
          transform: (pixels: Uint8Array, key: string, size: number) =>
            applyAugment(pixels, size, augmentPlan(augment, seed, view!, key, crop)),
        }
      : {}),
  });
  return { data: result.features, rows: result.rows };
}

/**
 * Whether the augmented view of `epoch` is used again by a later epoch (views cycle every
 * `augmentViews` epochs). One that is not is dropped after its epoch: a view of 1,000
 * images at `blocks:3` is 31 MB, and with the default (a view per epoch) keeping them all
 * grew the fine-tune stage by that much every epoch.
 *
 * @example viewReturns(0, 2, 5) // → true (epoch 2 uses view 0 again)
 */
export function viewReturns(epoch: number, augmentViews: number, epochs: number): boolean {
  return epoch + augmentViews < epochs;
}

/** Rows whose data is swapped per epoch (one augmented view at a time). */
class ViewBatches implements Batches {
  data: Float32Array;
  constructor(
    data: Float32Array,
    private readonly rowShape: readonly number[],
    readonly labels: Int32Array,
  ) {
    this.data = data;
  }
  get size(): number {
    return this.labels.length;
  }
  take(rows: ArrayLike<number>): tf.Tensor {
    return new ArrayBatches(this.data, this.rowShape, this.labels).take(rows);
  }
}

export interface FineTuneSettings {
  readonly epochs: number;
  readonly unfreeze: string;
  readonly lr: number;
  readonly batchSize: number;
  readonly optimizer: OptimizerName;
  readonly freezeBn: boolean;
  /**
   * `--bn`: `frozen` (default) runs the unfrozen blocks' BatchNormalization in inference
   * mode; `train` in training mode (batch statistics, moving ones updated and, after
   * averaging, recomputed). With `freezeBn` too, the statistics train and gamma/beta do not.
   * The frozen prefix's BN is never touched.
   */
  readonly bn?: 'frozen' | 'train';
  /**
   * Discriminative LRs (default 1: one LR for all): the head trains at `lr`, the first
   * unfrozen layer group at lr / lrMult, the groups between at geometrically spaced rates
   * (see `layerGroups`, `groupScales`).
   */
  readonly lrMult?: number;
  /** Epochs of linear LR warm-up at the start, step by step (default 1; 0: none). */
  readonly warmupEpochs?: number;
  /**
   * The head's dropout rate in this stage (default: the rate the head was built with);
   * see `stageHead`.
   */
  readonly dropout?: number;
  readonly swa: SwaSettings | null;
  readonly earlyStop: EarlyStopSettings | null;
  readonly augment: readonly AugmentKind[];
  /** The crop's ranges (`--crop-scale`, `--crop-ratio`; DEFAULT_CROP when not given). */
  readonly crop?: CropRanges;
  /** Augmented views cached per image; views cycle over the epochs. */
  readonly augmentViews: number;
  readonly keep: 'last' | 'best';
  readonly labelSmoothing: number;
  readonly classWeights: readonly number[] | null;
  readonly seed: number;
  readonly decodeConcurrency: number;
  readonly embedBatchSize: number;
  /**
   * Threads that compute a step. On ONNX Runtime (see tfjsStepsReason), its threads (default:
   * the engine's). On tfjs (default: see stepPlan), each step's gradient is the sum of its two
   * halves', and with 2 the second half runs in a worker thread meanwhile. The figures are
   * the same either way. tfjs steps are whole (one thread) when BatchNorm trains on batch
   * statistics (`bn: 'train'`, a head with BN), and by default on native TensorFlow.
   */
  readonly threads?: number;
}

export interface FineTuneInputs {
  readonly backbone: Backbone;
  /** The trained head (stage one's kept weights); its variables train on. */
  readonly head: tf.LayersModel;
  readonly train: { readonly files: readonly string[]; readonly labels: Int32Array };
  readonly val: { readonly files: readonly string[]; readonly labels: Int32Array };
  readonly numClasses: number;
  /** Validation loss of what stage one left in the head (for --keep best). */
  readonly headLoss: number | null;
  /** Its validation accuracy, recorded beside the loss among --keep best's candidates. */
  readonly headAcc?: number | null;
  /** Where the frozen prefix runs (and its lowered copy is cached). */
  readonly engine: EngineContext;
  readonly callbacks: readonly TrainingCallback[];
  readonly warn: (message: string) => void;
  /** Where prefix activations are kept between runs; null: in memory only. */
  readonly cache: EmbeddingCache | null;
  /** The stage's checkpoints, given the variables it does not train (see StageCheckpointing.extra). */
  readonly checkpoint?: (extra: readonly tf.Variable[]) => StageCheckpointing;
}

export interface FineTuneResult {
  readonly stage: StageResult;
  readonly firstUnfrozen: string;
  readonly cutLayer: string;
  readonly batchSize: number;
  /** Threads that computed the steps (see FineTuneSettings.threads, and `steps`). */
  readonly threads: number;
  /** What computed the steps, and why not ONNX Runtime when tfjs did (see stepEngine). */
  readonly steps: { readonly engine: 'onnx' | 'tfjs'; readonly reason: string | null };
  readonly trainableVariables: number;
  /** Each layer group's base LR (before warm-up and SWA), body groups first, then `head`. */
  readonly lrGroups: readonly { readonly from: string; readonly lr: number }[];
  readonly prefixEngine: string;
  /** Which weights the model holds now: 'finetune-swa', 'finetune-raw' or 'head-…' (stage one's, with --keep best). */
  readonly kept: 'head' | `finetune-${WeightsKind}`;
  /** `--keep best`: every candidate with its validation figures, the head's first (null otherwise). */
  readonly candidates: readonly FineTuneCandidate[] | null;
  /** `--keep best`: the winner (`finetune-swag`: the model holds the SWA mean, see StageResult.chosen). */
  readonly chosen: FineTuneCandidate['weights'] | null;
  /** Inference on raw pixels through prefix, suffix and head, for test figures. */
  readonly evaluate: (files: readonly string[], labels: Int32Array) => Promise<Evaluation>;
  dispose(): Promise<void>;
}

/** A `--keep best` candidate of the fine-tune stage: the head's weights, or one of the stage's. */
export interface FineTuneCandidate extends Omit<WeightsCandidate, 'weights'> {
  readonly weights: 'head' | `finetune-${WeightsCandidate['weights']}`;
}

/**
 * Steps of the stage's linear LR warm-up: `epochs` whole epochs of `size` rows in batches
 * of `batchSize` (the last batch of an epoch may be short; it is still a step).
 *
 * @example warmupSteps(2, 24, 8) // → 6
 */
export function warmupSteps(epochs: number, size: number, batchSize: number): number {
  return epochs * Math.ceil(size / batchSize);
}

/**
 * Bytes the wasm heap may spend on one training step (of its 4 GiB). Measured with the
 * whole MobileNetV2 body at 224 (estimate 250 MiB/image): batch 12 trained, batch 16
 * aborted; this budget gives 10.
 */
export const WASM_STEP_BUDGET = 2.5 * 2 ** 30;

/** The largest batch up to `requested` whose step fits `budget` bytes (at least 1). */
export function fittingBatchSize(
  layers: readonly tf.layers.Layer[],
  requested: number,
  budget: number,
): number {
  return Math.max(1, Math.min(requested, Math.floor(budget / bytesPerImage(layers))));
}

/**
 * The largest batch up to `requested` whose step fits `budget` bytes (at least 1). A step in
 * halves holds one chunk at a time (CHUNK_ROWS rows, or half the batch when that is fewer),
 * so only a chunk must fit; a whole step holds the batch.
 *
 * @example stepBatchSize(bodyLayers, 32, true, WASM_STEP_BUDGET) // → 32 (chunks of 8 fit)
 */
export function stepBatchSize(
  layers: readonly tf.layers.Layer[],
  requested: number,
  halved: boolean,
  budget: number,
): number {
  const live = halved ? Math.min(CHUNK_ROWS, Math.ceil(requested / 2)) : requested;
  const fits = fittingBatchSize(layers, live, budget);
  if (fits >= live) return requested;
  return halved ? 2 * fits : fits;
}

/**
 * Most images per batch of the fine-tune stage's frozen prefix pass (`embedBatchSize` when
 * smaller). ONNX Runtime's CPU arena keeps the largest batch's activations at 224 for the
 * session's life, and the session lives through the stage, beside the wasm heap the
 * training step has grown (which never shrinks): issue 16's recipe on 300 images peaked at
 * 1,002 MB RSS with batches of 16, 908 MB with 8, the epoch no slower and the exported
 * weights bit-identical. The head's embedding pass, whose session is closed before the
 * stage, keeps `embedBatchSize`.
 */
export const PREFIX_BATCH_SIZE = 8;

/**
 * Stage two: unfreeze the top of the backbone and train it with the head at a low LR.
 * The frozen prefix runs once per image (per augmented view) on the frozen-pass engine
 * and its activations are kept; each epoch trains only the suffix, outside of which no
 * frozen layer ever sits on the gradient tape. The body's BatchNorm stays in inference
 * mode unless `bn: 'train'` (the head's, with `--head-bn`, trains). A fresh optimizer and
 * averager cover exactly this stage's trainable set.
 */
export async function runFineTune(
  inputs: FineTuneInputs,
  s: FineTuneSettings,
): Promise<FineTuneResult> {
  const { backbone, head } = inputs;
  const body = backbone.model;
  if (!body) throw graphModelError(backbone.spec.id);
  const firstUnfrozen = firstUnfrozenLayer(backbone, parseUnfreeze(s.unfreeze));
  const model = stageModel(body, head, firstUnfrozen, s);
  const { split, forward } = model;
  const rowLength = split.cutShape.reduce((a, b) => a * b, 1);
  // BN in training mode: the head's (--head-bn) and, with --bn train, the unfrozen body's.
  const batchNorm = layersBatchNorm(
    [...(s.bn === 'train' ? split.layers : []), ...head.layers],
    (x) => forward(x, false),
  );
  const bnTrains = batchNorm.layers.length > 0;
  let onnxSteps: OnnxSteps | null = null;
  let reason = tfjsStepsReason(inputs.engine, bnTrains);
  if (reason === null) {
    try {
      onnxSteps = await OnnxSteps.open(
        {
          suffix: split.suffix,
          head: model.head,
          addedDropout: model.addedDropout,
          variables: model.variables,
          numClasses: inputs.numClasses,
        },
        s.threads ?? inputs.engine.threads,
      );
    } catch (err) {
      if (!(err instanceof GradGraphUnsupported || err instanceof OnnxRuntimeUnavailable)) {
        model.restore();
        throw err;
      }
      reason = err.message;
    }
  }
  if (reason !== null && inputs.engine.engine === 'onnx')
    inputs.warn(`fine-tune steps run on tfjs: ${reason}`);
  const plan = stepPlan(inputs.engine.backend, bnTrains, s.threads);
  const halved = !onnxSteps && plan.halved;
  const threads = onnxSteps ? onnxSteps.threads : plan.threads;
  // Started now: its tfjs and model load while the prefix pass runs.
  const worker =
    !onnxSteps && threads > 1
      ? new StepWorker(
          inputs.engine.backend.option,
          {
            body: body.toJSON(null, false),
            suffix: split.layers.map((l) => ({
              name: l.name,
              weights: l.getWeights().map((w) => w.dataSync().slice() as Float32Array),
            })),
            head: {
              topology: head.toJSON(null, false),
              weights: head.getWeights().map((w) => w.dataSync().slice() as Float32Array),
            },
            firstUnfrozen,
            settings: { bn: s.bn, freezeBn: s.freezeBn, dropout: s.dropout },
            numClasses: inputs.numClasses,
          },
          (reason) =>
            inputs.warn(
              `fine-tune step worker failed (${reason}); the stage goes on in one thread`,
            ),
        )
      : null;
  let choice: Awaited<ReturnType<typeof createFrozenModel>>;
  try {
    choice = await createFrozenModel(
      {
        layersModel: split.prefix,
        inputSize: backbone.inputSize,
        outputSize: rowLength,
        forward: (x) => split.prefix.predict(x) as tf.Tensor,
        cacheKey: {
          backboneId: backbone.spec.id,
          weightsHash: backbone.weightsHash,
          cut: split.cutLayer,
        },
        recipe: backboneRecipe(backbone, firstUnfrozen),
      },
      inputs.engine,
    );
  } catch (err) {
    await worker?.close();
    await onnxSteps?.close();
    model.restore();
    throw err;
  }
  const prefix = choice.model;
  const cache = inputs.cache
    ? { store: inputs.cache, namespace: cacheNamespace(backbone, split.cutLayer) }
    : null;
  // Augmented views of the training images, when there are two or more, are cut from their
  // pixels as decoded for the first: each image is read and decoded once per stage.
  const keep =
    s.augment.length && Math.min(s.epochs, s.augmentViews) > 1
      ? await PixelStore.open(
          backbone.inputSize ** 2 * 3,
          inputs.train.files.length,
          inputs.cache?.dir,
        ).catch((err) => {
          inputs.warn(`augmented views decode every image again: ${(err as Error).message}`);
          return null;
        })
      : null;
  const activations = async (files: readonly string[], view: number | null) =>
    prefixActivations(files, prefix, {
      ...(view !== null && keep ? { keep } : {}),
      augment: s.augment,
      ...(s.crop ? { crop: s.crop } : {}),
      view,
      seed: s.seed,
      batchSize: Math.min(s.embedBatchSize, PREFIX_BATCH_SIZE),
      concurrency: s.decodeConcurrency,
      cache,
    });
  const closeKeep = async (): Promise<void> => {
    if (keep?.failure && !keep.isClosed)
      inputs.warn(`augmented views stopped keeping decoded images: ${keep.failure}`);
    await keep?.close();
  };
  const cleanup = async (): Promise<void> => {
    await closeKeep();
    await worker?.close();
    await onnxSteps?.close();
    model.restore();
    await prefix.dispose();
  };
  try {
    let batchSize = s.batchSize;
    if (!onnxSteps && inputs.engine.backend.tfBackend === 'wasm') {
      const fits = stepBatchSize(split.layers, batchSize, halved, WASM_STEP_BUDGET);
      if (fits < batchSize) {
        inputs.warn(
          `fine-tune batch size lowered from ${batchSize} to ${fits}: a larger batch would not fit the 4 GiB wasm heap`,
        );
        batchSize = fits;
      }
    }
    const plainTrain = s.augment.length ? null : await activations(inputs.train.files, null);
    const valActs = await activations(inputs.val.files, null);
    const pick = (labels: Int32Array, rows: readonly number[]) =>
      Int32Array.from(rows, (r) => labels[r]!);
    let first: { data: Float32Array; rows: readonly number[] } | null =
      plainTrain ?? (await activations(inputs.train.files, 0));
    const trainBatches = new ViewBatches(
      first.data,
      split.cutShape,
      pick(inputs.train.labels, first.rows),
    );
    // Only trainBatches and views hold view 0 from here, so it can go after its epoch.
    first = null;
    const valBatches = inputs.val.files.length
      ? new ArrayBatches(valActs.data, split.cutShape, pick(inputs.val.labels, valActs.rows))
      : null;
    // Views are computed when first needed and kept only while an epoch to come uses them
    // again (at most augmentViews of them); by default each epoch has a view of its own.
    const views = new Map<number, Float32Array>([[0, trainBatches.data]]);
    const viewCallback: TrainingCallback = {
      async onEpochBegin(epoch) {
        if (!s.augment.length) return;
        const v = epoch % s.augmentViews;
        let data = views.get(v);
        if (!data) {
          // The previous epoch's view, if no epoch returns to it, goes before this one is made.
          trainBatches.data = new Float32Array(0);
          const a = await activations(inputs.train.files, v);
          if (a.rows.length !== trainBatches.size)
            throw new FinetuneError('An image decoded differently between augmented views');
          data = a.data;
          views.set(v, data);
        }
        if (!viewReturns(epoch, s.augmentViews, s.epochs)) views.delete(v);
        trainBatches.data = data;
      },
    };
    const groups = layerGroups(split.layers, backbone.spec.blocks);
    const scales = groupScales(groups.length, s.lrMult ?? 1);
    // Each body variable's group factor; the head's variables take the last one.
    const groupScale = new Map(
      groups.flatMap((g, i) =>
        g.layers.flatMap((l) => l.trainableWeights.map((w) => [w.read(), scales[i]!] as const)),
      ),
    );
    const variables = model.variables;
    const lrScales = variables.map((v) => groupScale.get(v) ?? scales[groups.length]!);
    const weights = [...variables, ...batchNorm.variables];
    const before = s.keep === 'best' ? weights.map((v) => v.clone()) : null;
    // An interrupted stage (a callback that throws) must not strand the copies for --keep best.
    const stage = await runStage(trainBatches, valBatches, {
      name: 'finetune',
      forward,
      variables,
      reseed: model.reseed,
      ...(onnxSteps ? { external: onnxSteps } : {}),
      ...(halved
        ? {
            halves: {
              second: worker
                ? (part: StepPart) =>
                    worker.gradients(
                      part,
                      variables.map((v) => v.dataSync().slice() as Float32Array),
                    )
                : null,
            },
          }
        : {}),
      epochs: s.epochs,
      batchSize,
      optimizer: s.optimizer,
      lr: s.lr,
      labelSmoothing: s.labelSmoothing,
      classWeights: s.classWeights,
      numClasses: inputs.numClasses,
      seed: s.seed + 1,
      swa: s.swa,
      earlyStop: s.earlyStop,
      keep: s.keep,
      batchNorm,
      lrScales,
      warmupSteps: warmupSteps(s.warmupEpochs ?? 1, trainBatches.size, batchSize),
      callbacks: [viewCallback, ...inputs.callbacks],
      ...(inputs.checkpoint
        ? {
            checkpoint: inputs.checkpoint(
              split.layers.flatMap((l) =>
                l.nonTrainableWeights.map((w) => w.read() as tf.Variable),
              ),
            ),
          }
        : {}),
    }).catch((err: unknown) => {
      tf.dispose(before ?? []);
      throw err;
    });
    // Its heap (a chunk's step) is not needed for what follows: test figures, the export.
    await closeKeep();
    await worker?.close();
    await onnxSteps?.close();
    let kept: FineTuneResult['kept'] = `finetune-${stage.kept}`;
    let candidates: FineTuneCandidate[] | null = null;
    let chosen: FineTuneResult['chosen'] = null;
    if (s.keep === 'best' && stage.candidates) {
      // The stage has already kept the best of its own candidates (raw, averaged, SWAG);
      // without validation images there are none and it keeps what `last` would.
      const none = Number.POSITIVE_INFINITY;
      candidates = [
        { weights: 'head', loss: inputs.headLoss ?? none, acc: inputs.headAcc ?? Number.NaN },
        ...(stage.candidates ?? []).map((c) => ({
          ...c,
          weights: `finetune-${c.weights}` as const,
        })),
      ];
      const stageBest = stage.chosen ? `finetune-${stage.chosen}` : `finetune-${stage.kept}`;
      const stageLoss = candidates.find((c) => c.weights === stageBest)?.loss ?? none;
      // By validation loss; ties keep the later stage: it has seen the most training.
      if (candidates[0]!.loss < stageLoss) {
        weights.forEach((v, i) => {
          v.assign(before![i]!);
        });
        kept = 'head';
        chosen = 'head';
      } else chosen = stageBest as FineTuneResult['chosen'];
    }
    tf.dispose(before ?? []);
    tf.dispose(stage.rawWeights ?? []);
    return {
      stage,
      firstUnfrozen,
      cutLayer: split.cutLayer,
      batchSize,
      threads,
      steps: { engine: onnxSteps ? 'onnx' : 'tfjs', reason },
      trainableVariables: variables.length,
      lrGroups: [...groups.map((g) => g.from), 'head'].map((from, i) => ({
        from,
        lr: s.lr * scales[i]!,
      })),
      prefixEngine: choice.engine,
      kept,
      candidates,
      chosen,
      evaluate: async (files, labels) => {
        const a = await activations(files, null);
        return evaluateBatches(
          forward,
          new ArrayBatches(a.data, split.cutShape, pick(labels, a.rows)),
          64,
          inputs.numClasses,
        );
      },
      dispose: cleanup,
    };
  } catch (err) {
    await cleanup();
    throw err;
  }
}

/** The cache namespace of a backbone's output at `layer` ('features' for the pooled body output). */
export function cacheNamespace(backbone: Backbone, layer: string): CacheNamespace {
  return {
    backboneId: backbone.spec.id,
    // The hash covers the edited topology (cut, input size, normalisation) and weights.
    weightsHash: backbone.weightsHash,
    layer,
    inputSize: backbone.inputSize,
    // Bumped when decoding changes what pixels an image becomes.
    preprocessing: `${JSON.stringify(backbone.preprocessing)};decode=${PREPROCESS_CONTRACT}`,
    view: 'plain',
  };
}

/** The message for a graph-model backbone with a fine-tune stage. */
export function graphModelError(id: string): FinetuneError {
  return new FinetuneError(
    `Backbone ${id} is a graph model: it carries no trainable variables, so it cannot be fine-tuned (--finetune-epochs). ` +
      'Use a layers-format backbone: nsfwjs_mobilenet_v2 (the offline default) or a Keras/tfjs layers model.json',
  );
}
