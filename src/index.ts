// The public API of tfjs-finetune. Named exports only; the CLI uses nothing else.

// Backbones
export {
  type Backbone,
  backboneRecipe,
  type LoadBackboneOptions,
  loadBackbone,
} from './backbones/load.js';
export {
  BACKBONES,
  type BackboneSpec,
  DEFAULT_BACKBONE,
  type Preprocessing,
  resolveBackboneSpec,
} from './backbones/registry.js';

// Backends and engines
export {
  BACKEND_OPTIONS,
  type BackendInfo,
  type BackendOption,
  initBackend,
} from './backend/index.js';
export {
  AUGMENT_KINDS,
  type AugmentKind,
  type AugmentPlan,
  applyAugment,
  augmentPlan,
  parseAugment,
} from './data/augment.js';
// Data
export {
  type CacheClearOptions,
  type CacheInfo,
  type CacheNamespace,
  type CacheNamespaceInfo,
  defaultCacheDir,
  EmbeddingCache,
  parseDuration,
} from './data/cache.js';
export {
  DEFAULT_MAX_BYTES,
  type DecodeResult,
  decodeImage,
  type ReadResult,
  readImageFile,
  sniffImageType,
} from './data/decode.js';
export {
  EMBED_CONCURRENCY,
  type EmbedOptions,
  type EmbedResult,
  embedFiles,
  type LazyFrozenModel,
  type SkippedFile,
} from './data/embed.js';
export {
  type LabelledFile,
  listFiles,
  loadSplits,
  type SplitOptions,
  type Splits,
  stratifiedSplit,
} from './data/scan.js';
export {
  createFrozenModel,
  ENGINE_OPTIONS,
  type EngineChoice,
  type EngineOption,
} from './engine/index.js';
export { canLowerToOnnx, lowerToOnnx, UnsupportedLayerError } from './engine/onnx/lower.js';
export { executionProviders, OnnxFrozenModel } from './engine/onnx/session.js';
export { WorkerPoolFrozenModel, type WorkerRecipe } from './engine/pool.js';
export { TfjsFrozenModel } from './engine/tfjs.js';
export type { EngineName, FrozenModel } from './engine/types.js';
export { dataError, type ErrorKind, EXIT_CODES, FinetuneError } from './errors.js';
// Results
export {
  type ClassificationReport,
  type ClassMetrics,
  classificationReport,
} from './export/metrics.js';
export { type ClassifierMetadata, loadClassifierModel } from './export/model-dir.js';
export {
  type Classifier,
  type ClassifierRunOptions,
  type EvaluateOptions,
  type EvaluateResult,
  evaluate,
  expandInputs,
  loadClassifier,
  type Prediction,
  type PredictOptions,
  type PredictResult,
  predict,
} from './export/predict.js';
// Heads, training loop, SWA
export { applyHead, buildHead, type HeadOptions } from './head/build.js';
export { type AveragerKind, type AveragerState, WeightAverager } from './swa/averager.js';
export {
  isSnapshotEpoch,
  resolveSwaStart,
  type SwaSchedule,
  swaLearningRate,
} from './swa/schedule.js';
export type { BatchLogs, EpochLogs, TrainingCallback } from './train/callbacks.js';
export {
  type FineTuneInputs,
  type FineTuneResult,
  type FineTuneSettings,
  firstUnfrozenLayer,
  inferenceModeBatchNorm,
  parseUnfreeze,
  runFineTune,
  type SplitBody,
  splitBody,
  type Unfreeze,
} from './train/finetune.js';
export { ArrayBatches, type Batches, evaluateBatches, type FitOptions, fit } from './train/fit.js';
export { createOptimizer, OPTIMIZERS, type OptimizerName } from './train/optimizers.js';
export { runStage, type StageOptions, type StageResult, type SwaSettings } from './train/stage.js';
// Running a whole job
export {
  type ResolvedTrainOptions,
  resolveTrainOptions,
  type TrainEvent,
  type TrainOptions,
  type TrainSummary,
  train,
} from './train/train.js';
export { VERSION, versions } from './version.js';
