// The public API of tfjs-finetune. Named exports only; the CLI uses nothing else.

// Backbones
export {
  BACKBONE_SOURCES,
  type Backbone,
  type BackboneRecord,
  type BackboneReference,
  type BackboneSourceRow,
  backboneFromRecord,
  backboneRecipe,
  type LoadBackboneOptions,
  loadBackbone,
} from './backbones/load.js';
export { cutPrefix, type PrefixCut } from './backbones/prefix.js';
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
  type BackendProbe,
  type BackendReport,
  initBackend,
  probeBackends,
  trainingThreads,
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
  type CacheClearResult,
  type CacheFailure,
  type CacheInfo,
  type CacheNamespace,
  type CacheNamespaceInfo,
  defaultCacheDir,
  EmbeddingCache,
  type EmbeddingCacheOptions,
  type LoweredModelInfo,
  type LoweredModelKey,
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
  flattenAlpha,
  PREPROCESS_CONTRACT,
  preprocessRgba,
  resizeRgb,
  toNchw,
  toNhwc,
} from './data/preprocess.js';
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
  type EngineContext,
  type EngineContextOptions,
  type EngineOption,
  type FrozenModelSource,
  onnxWorkers,
  resolveEngineContext,
} from './engine/index.js';
export {
  canLowerToOnnx,
  LOWERABLE_LAYERS,
  lowerToOnnx,
  UnsupportedLayerError,
} from './engine/onnx/lower.js';
export {
  executionProviders,
  loadOnnxRuntime,
  OnnxFrozenModel,
  OnnxRuntimeUnavailable,
} from './engine/onnx/session.js';
export {
  type OnnxWorkerRecipe,
  type TfjsWorkerRecipe,
  WorkerPoolFrozenModel,
  type WorkerRecipe,
} from './engine/pool.js';
export { TfjsFrozenModel } from './engine/tfjs.js';
export type { EngineName, FrozenModel } from './engine/types.js';
export {
  dataError,
  type ErrorKind,
  EXIT_CODES,
  FinetuneError,
  renameOption,
} from './errors.js';
// Experiments: sweeps over one embedding, their tables, the LR finder
export {
  expandSweep,
  loadSweepConfig,
  type SweepConfig,
  type SweepOptions,
  type SweepRun,
} from './experiments/config.js';
export {
  type LrFindPoint,
  type LrFindResult,
  type LrFindSettings,
  lrFind,
} from './experiments/lr-find.js';
// Reports
export {
  REPORT_FILE,
  writeReport,
  writeRunReport,
  writeSweepReport,
} from './experiments/report.js';
export {
  type ConfigSummary,
  type ResultRow,
  SWEEP_METRICS,
  type SweepMetric,
} from './experiments/results.js';
export { type Spread, spread } from './experiments/stats.js';
export {
  EXPORT_CHOICES,
  type ExportChoice,
  SWEEP_FILES,
  type SweepEvent,
  type SweepResult,
  type SweepSettings,
  sweep,
} from './experiments/sweep.js';
// Results
export {
  brierScore,
  CALIBRATION_BINS,
  type CalibrationOptions,
  type CalibrationReport,
  calibrationErrors,
  calibrationReport,
  NLL_EPSILON,
  negativeLogLikelihood,
  type ReliabilityBin,
  reliabilityBins,
} from './export/calibration.js';
export { type ExportResult, exportClassifier } from './export/classifier.js';
export {
  CONTRACT,
  ONNX_METADATA_KEYS,
  PREPROCESS_FILE,
  type PreprocessingContract,
  readOnnxMetadata,
} from './export/contract.js';
export {
  type ClassificationReport,
  type ClassMetrics,
  classificationReport,
} from './export/metrics.js';
export {
  type ClassifierMetadata,
  type InputSpec,
  loadClassifierModel,
} from './export/model-dir.js';
export {
  type Classifier,
  type ClassifierRunOptions,
  type EvaluateOptions,
  type EvaluateResult,
  evaluate,
  expandInputs,
  loadClassifier,
  MAX_SAMPLES,
  type OnnxFallback,
  type Prediction,
  type PredictOptions,
  type PredictResult,
  predict,
} from './export/predict.js';
// Heads, training loop, SWA
export { applyHead, buildHead, type HeadOptions, type StageHead, stageHead } from './head/build.js';
export { type HeadMember, HeadPopulation } from './head/population.js';
export { openRunFolder, type RunFolder, removePendingSync } from './io/run-folder.js';
export { type AveragerKind, type AveragerState, WeightAverager } from './swa/averager.js';
export {
  type BatchNormState,
  layersBatchNorm,
  MomentAccumulator,
  refreshBatchNorm,
} from './swa/bn-refresh.js';
export {
  AVERAGE_OPTIONS,
  type AverageKind,
  type AverageOption,
  type AveragingPlan,
  averagesAfterEpoch,
  averagesAfterStep,
  checkSwaStart,
  emaDecay,
  type Frequency,
  formatFrequency,
  LR_SCHEDULES,
  type LrPlan,
  type LrScheduleKind,
  learningRateAt,
  parseFrequency,
  resolveSwaStart,
  SWA_SCHEDULES,
  type SwaScheduleKind,
} from './swa/schedule.js';
export {
  decodeSwag,
  encodeSwag,
  SWAG_DATA_FILE,
  SWAG_MANIFEST_FILE,
  SWAG_SCALE,
  SwagCollector,
  type SwagCollectorOptions,
  type SwagManifest,
  SwagPosterior,
  type SwagState,
  seededNormal,
} from './swa/swag.js';
export type { BatchLogs, EpochLogs, TrainingCallback } from './train/callbacks.js';
// Running a whole job: options, the phases of a run, and their composition
export {
  CHECKPOINT_DIR,
  type LoadedCheckpoint,
  RESUME_OVERRIDES,
  type ResumeOptions,
  readCheckpoint,
} from './train/checkpoint.js';
export {
  type EmbeddingSource,
  type StageName,
  type StageSummary,
  type TrainEvent,
  type TrainSummary,
  type ValFigures,
  type WeightsChoice,
  type WeightsKind,
  type WeightsName,
  weightsName,
} from './train/events.js';
export {
  type FineTuneInputs,
  type FineTuneResult,
  type FineTuneSettings,
  firstUnfrozenLayer,
  inferenceModeBatchNorm,
  parseUnfreeze,
  runFineTune,
  type SplitBody,
  type StageModel,
  type StageModelSettings,
  splitBody,
  stageModel,
  stepPlan,
  tfjsStepsReason,
  type Unfreeze,
} from './train/finetune.js';
export {
  ArrayBatches,
  type Batches,
  CHUNK_ROWS,
  type ExternalSteps,
  evaluateBatches,
  evaluateMembers,
  type FitMember,
  type FitOptions,
  fit,
  type HalvedSteps,
  halfGradients,
  type PartOutcome,
  type StepPart,
} from './train/fit.js';
export {
  buildGradGraph,
  type GradGraph,
  type GradGraphModel,
  GradGraphUnsupported,
  OnnxSteps,
} from './train/onnx-step.js';
export { OPTIMIZERS, type OptimizerName, StageOptimizer } from './train/optimizers.js';
export {
  type OptionPhase,
  type OptionRow,
  optionRow,
  optionsMarkdown,
  type ResolvedTrainOptions,
  resolveTrainOptions,
  TRAIN_OPTIONS,
  type TrainOptions,
} from './train/options.js';
export {
  evaluateTest,
  exportedSwag,
  type FinetuneStageResult,
  type HeadJob,
  type HeadResult,
  headShapeKey,
  trainFinetune,
  trainHead,
  trainHeads,
  VAL_PREDICTIONS,
  type ValPrediction,
  valPredictions,
} from './train/phases.js';
export { writeRunRecords } from './train/records.js';
export {
  type Embedded,
  type EmbeddedSplits,
  embedSplits,
  type FinetunePlan,
  type PreparedRun,
  prepareRun,
} from './train/run.js';
export {
  type CandidateKind,
  KEEP_SWAG_SAMPLES,
  runMembers,
  runStage,
  type StageMember,
  type StageOptions,
  type StageResult,
  type StageShared,
  type SwaSettings,
  type WeightsCandidate,
} from './train/stage.js';
export { train } from './train/train.js';
export { VERSION, versions } from './version.js';
