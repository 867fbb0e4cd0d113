import type { BackendInfo } from '../backend/index.js';
import type { EmbedProgress, SkippedFile } from '../data/embed.js';
import type { EngineName } from '../engine/types.js';
import type { AverageKind } from '../swa/schedule.js';
import type { EpochLogs } from './callbacks.js';
import type { InitRecord } from './init.js';

/** Which weights a stage left, and so which weights an export holds. */
export type StageName = 'head' | 'finetune';
export type WeightsKind = 'raw' | 'swa' | 'ema';
/** `head-swa`, `finetune-raw`, …: the name summary.json and the CLI use. */
export type WeightsName = `${StageName}-${WeightsKind}`;

export interface WeightsChoice {
  readonly stage: StageName;
  readonly weights: WeightsKind;
}

export function weightsName(c: WeightsChoice): WeightsName {
  return `${c.stage}-${c.weights}`;
}

/**
 * Which engine answered the embedding phase: `cache` when every embedding came from the
 * embedding cache and no engine was loaded.
 */
export type EmbeddingSource = EngineName | 'cache';

export type TrainEvent =
  | { type: 'backend'; backend: BackendInfo }
  | { type: 'backbone'; id: string; inputSize: number; featureSize: number }
  | { type: 'engine'; engine: EngineName; reason: string | null }
  | { type: 'data'; classes: readonly string[]; counts: Record<string, number> }
  | { type: 'warning'; message: string }
  | { type: 'embed-progress'; progress: EmbedProgress }
  | { type: 'skipped'; file: SkippedFile }
  | {
      type: 'epoch';
      logs: EpochLogs;
      epochs: number;
      /** What `logs.snapshots` counts: SWA snapshots or EMA updates (null: no averaging). */
      average: AverageKind | null;
    }
  | {
      type: 'stage-end';
      stage: StageName;
      raw: number | null;
      /** The averaged weights' accuracy (SWA or EMA, as `average` says). */
      swa: number | null;
      average: AverageKind | null;
    }
  | { type: 'done'; summary: TrainSummary };

export interface ValFigures {
  readonly loss: number;
  readonly acc: number;
}

export interface StageSummary {
  readonly raw: ValFigures | null;
  /** The averaged weights' figures (SWA or EMA, as `average` says). */
  readonly swa: ValFigures | null;
  /** The averaging strategy of the stage (null: none). */
  readonly average?: 'swa' | 'ema' | null;
  readonly snapshots: number;
  /** The first averaged epoch (1-based), when there was one. */
  readonly averagingFrom?: number | null;
  /** Early stopping ended the stage after this epoch (1-based). */
  readonly stoppedAfter?: number | null;
  /**
   * Which weights the stage left in the model: the head stage says `raw` or `swa`; the
   * fine-tune stage names the stage too, or `head` when --keep best went back to the head's.
   */
  readonly kept: WeightsKind | 'head' | `finetune-${WeightsKind}`;
  /** With `--swag`: SWAG's rank and the deviations it kept. */
  readonly swag?: { readonly rank: number; readonly deviations: number };
  /** BatchNorm layers whose statistics were recomputed for the averaged weights (`--head-bn`, `--bn train`). */
  readonly bnRefreshed?: readonly string[];
  /**
   * `--keep best`: every candidate's validation figures (raw, averaged, `swag` for SWAG's
   * model average of `samples` weight sets; the fine-tune stage also `head`, stage-prefixed).
   */
  readonly candidates?: readonly {
    readonly weights: string;
    readonly loss: number;
    readonly acc: number;
    readonly samples?: number;
  }[];
  /** `--keep best`: the winning candidate (`swag`: the model holds the SWA mean the samples centre on). */
  readonly chosen?: string;
  /** Head stage only: the exported run it started from (`--init`). */
  readonly init?: InitRecord;
  readonly unfreezeFrom?: string;
  readonly batchSize?: number;
  /**
   * Fine-tune stage: threads that computed its steps: ONNX Runtime's, or on tfjs 2 when a
   * worker thread took each step's second half (a worker that fails leaves a warning and
   * the rest of the stage on one).
   */
  readonly threads?: number;
  /**
   * Fine-tune stage: what computed its steps, `onnx` (ONNX Runtime, on `threads` threads) or
   * `tfjs`, and why not onnx when it is tfjs.
   */
  readonly steps?: { readonly engine: 'onnx' | 'tfjs'; readonly reason: string | null };
  readonly trainableVariables?: number;
  /** With --lr-mult above 1: each layer group's base LR, named by its first layer (the head last). */
  readonly lrGroups?: readonly { readonly from: string; readonly lr: number }[];
}

export interface TrainSummary {
  readonly out: string;
  readonly classes: readonly string[];
  readonly counts: Record<'train' | 'val' | 'test', Record<string, number>>;
  readonly skipped: readonly SkippedFile[];
  readonly warnings: readonly string[];
  readonly backend: string;
  readonly engine: EmbeddingSource;
  readonly engineReason: string | null;
  /** Images whose features came from the embedding cache. */
  readonly cachedEmbeddings: number;
  readonly backbone: string;
  readonly stages: Partial<Record<StageName, StageSummary>>;
  /** Which weights model/ holds. */
  readonly exported: WeightsName;
  /** model/model.onnx when the classifier could be lowered (not for graph backbones). */
  readonly onnx: string | null;
  readonly val: ValFigures | null;
  readonly test: (ValFigures & { macroF1: number }) | null;
  readonly seconds: Record<string, number>;
}
