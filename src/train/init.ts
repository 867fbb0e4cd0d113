import { stat } from 'node:fs/promises';
import path from 'node:path';
import type * as tf from '@tensorflow/tfjs';
import { type Backbone, type LayerWeights, layerWeights, withBody } from '../backbones/load.js';
import { type ErrorKind, FinetuneError } from '../errors.js';
import { CONTRACT } from '../export/contract.js';
import { type ClassifierMetadata, loadClassifierModel, MODEL_DIR } from '../export/model-dir.js';
import { HEAD_LOGITS } from '../head/build.js';
import { type DenseWeights, type HeadInit, HeadPopulation } from '../head/population.js';

/** Where a run started from (`--init`), as summary.json records it under `stages.head.init`. */
export interface InitRecord {
  /** The run folder the export was read from (the parent of its model/ folder), absolute. */
  readonly run: string;
  /** The export's run id and weights.bin sha256 (null in exports that predate them). */
  readonly runId: string | null;
  readonly weightsSha256: string | null;
  /** Which weights the export held (`head-swa`, `finetune-raw`, …). */
  readonly weights: string;
  /**
   * `export`: the export's body weights differ from the backbone's own (a fine-tuned body)
   * and the run's backbone carries them; `backbone`: they are the backbone's own.
   */
  readonly body: 'export' | 'backbone';
  /** Classes that started from the export's classifier rows, and classes that started fresh. */
  readonly kept: readonly string[];
  readonly added: readonly string[];
}

/** An exported run, read for `--init`: what its model says, its head and its body weights. */
export interface InitRun {
  /** The run folder (the parent of model/). */
  readonly run: string;
  /** Its model/model.json. */
  readonly modelFile: string;
  readonly metadata: ClassifierMetadata;
  /** The head's hidden layer (null without one) and its classifier, as exported. */
  readonly hidden: DenseWeights | null;
  readonly logits: DenseWeights;
  /** Features the head takes. */
  readonly featureSize: number;
  /** The body's weights by layer; null when the export holds the head alone (graph backbones). */
  readonly body: LayerWeights | null;
}

/** What a prepared run keeps of its `--init` run: the head weights and the record. */
export interface PreparedInit {
  /** `--init` as given. */
  readonly location: string;
  readonly run: InitRun;
  readonly record: InitRecord;
}

/** The files besides model/ that a finished run folder holds (written after the model). */
const FINISHED_RUN = ['summary.json', 'config.json'];

/**
 * A refusal of `--init`: one line naming the option, the location as given and the reason;
 * `reason` names other options through `shown` so the CLI can say them as flags.
 */
function initError(
  location: string,
  reason: (shown: (key: string) => string) => string,
  kind: ErrorKind = 'usage',
  cause?: unknown,
): FinetuneError {
  const say = (shown: (key: string) => string) => `${shown('init')} ${location}: ${reason(shown)}`;
  return new FinetuneError(
    say((k) => k),
    { kind, cause, option: 'init', renamed: say },
  );
}

async function isFile(file: string): Promise<boolean> {
  try {
    return (await stat(file)).isFile();
  } catch {
    return false;
  }
}

/** The run folder and its model.json from what the user gave: the run folder or its model/ folder. */
async function locate(location: string): Promise<{ run: string; modelFile: string }> {
  const inRun = path.join(location, MODEL_DIR, 'model.json');
  if (await isFile(inRun)) return { run: path.resolve(location), modelFile: inRun };
  const inModel = path.join(location, 'model.json');
  if (await isFile(inModel))
    return { run: path.dirname(path.resolve(location)), modelFile: inModel };
  throw initError(
    location,
    () =>
      'no model/model.json there (expected a run folder from finetune train, or its model/ folder)',
  );
}

function denseOf(layer: tf.layers.Layer | undefined): DenseWeights | null {
  if (!layer) return null;
  const [kernel, bias] = layer.getWeights();
  if (!kernel || !bias) return null;
  return {
    kernel: (kernel.dataSync() as Float32Array).slice(),
    bias: (bias.dataSync() as Float32Array).slice(),
  };
}

/**
 * Reads an exported run for `--init`: a run folder from `finetune train` (or a sweep's
 * exported run), or its model/ folder. The run must be finished (summary.json and
 * config.json beside model/) and its model intact (weights.bin matching its sha256).
 */
export async function readInitRun(location: string): Promise<InitRun> {
  const { run, modelFile } = await locate(location);
  for (const name of FINISHED_RUN) {
    if (!(await isFile(path.join(run, name))))
      throw initError(location, () => `not a finished run (no ${name} beside model/)`);
  }
  let loaded: Awaited<ReturnType<typeof loadClassifierModel>>;
  try {
    loaded = await loadClassifierModel(modelFile);
  } catch (err) {
    if (!(err instanceof FinetuneError)) throw err;
    throw initError(location, () => err.message, err.kind, err);
  }
  const { model, metadata } = loaded;
  try {
    const layer = (name: string) => model.layers.find((l) => l.name === name);
    const logits = denseOf(layer(HEAD_LOGITS));
    if (!logits)
      throw initError(location, () => `${modelFile} has no '${HEAD_LOGITS}' layer to start from`);
    if (model.layers.some((l) => l.name.startsWith('head_bn_')))
      throw initError(
        location,
        () =>
          `${modelFile} has a BatchNorm head (--head-bn), whose statistics --init cannot carry over; train without --init`,
      );
    const hidden = denseOf(layer('head_hidden'));
    const featureSize = hidden
      ? hidden.kernel.length / hidden.bias.length
      : logits.kernel.length / logits.bias.length;
    let body: LayerWeights | null = null;
    if (metadata.contents === 'full') {
      const all = layerWeights(model);
      body = new Map([...all].filter(([name]) => !name.startsWith('head_')));
    }
    return { run, modelFile, metadata, hidden, logits, featureSize, body };
  } finally {
    model.dispose();
  }
}

const normalisation = (p: { mean: readonly number[]; std: readonly number[] }): string =>
  `mean [${p.mean.join(', ')}], std [${p.std.join(', ')}]`;

/**
 * Refuses an `--init` run whose embeddings would not be this run's: another backbone or
 * cut, another input size, another preprocessing contract or normalisation, another
 * feature size.
 */
export function checkInitBackbone(location: string, init: InitRun, backbone: Backbone): void {
  const m = init.metadata;
  const refuse = (reason: (shown: (key: string) => string) => string): never => {
    throw initError(location, reason);
  };
  if (m.backbone.id !== backbone.spec.id)
    refuse(
      (shown) =>
        `its backbone is ${m.backbone.id} but this run's is ${backbone.spec.id} (${shown('backbone')})`,
    );
  const cut = m.backbone.featureLayer ?? null;
  const ours = backbone.spec.featureLayer ?? null;
  if (cut !== ours)
    refuse(
      (shown) =>
        `its backbone is cut at ${cut ?? 'the default layer'} but this run's at ${ours ?? 'the default layer'} (${shown('featureLayer')})`,
    );
  if (m.input.size !== backbone.inputSize)
    refuse(
      (shown) =>
        `it was trained at input size ${m.input.size} but this run's is ${backbone.inputSize} (${shown('inputSize')})`,
    );
  const contract = m.contract?.id ?? null;
  if (contract !== CONTRACT.id)
    refuse(
      () =>
        `its preprocessing contract is ${contract ?? 'not recorded (an export older than the contract)'} but this toolkit's is ${CONTRACT.id}`,
    );
  if (normalisation(m.preprocessing) !== normalisation(backbone.preprocessing))
    refuse(
      () =>
        `its preprocessing is ${normalisation(m.preprocessing)} but the backbone's is ${normalisation(backbone.preprocessing)}`,
    );
  if (init.featureSize !== backbone.featureSize)
    refuse(
      () =>
        `its head takes ${init.featureSize} features but the backbone gives ${backbone.featureSize}`,
    );
}

/**
 * The head's initial weights for `classes` (sorted as the toolkit sorts them): every class
 * of the export keeps its classifier column, by name; classes it did not have start
 * fresh. Refused when the hidden layer differs from `hidden` (usage) or when a class of
 * the export is missing from the data (data: Keras's load-and-fit would fail on it too,
 * and dropping a class silently changes what the model answers).
 */
export function headInit(
  location: string,
  init: InitRun,
  hidden: number,
  classes: readonly string[],
): HeadInit {
  const theirs = init.hidden ? init.hidden.bias.length : 0;
  if (theirs !== hidden)
    throw initError(
      location,
      (shown) =>
        `its head has ${theirs ? `a hidden layer of ${theirs} units` : 'no hidden layer'} but ${shown('hidden')} is ${hidden}; pass ${shown('hidden')} ${theirs}`,
    );
  const labels = init.metadata.labels;
  const missing = labels.filter((c) => !classes.includes(c));
  if (missing.length)
    throw initError(
      location,
      () =>
        `its ${missing.length === 1 ? 'class' : 'classes'} ${missing.map((c) => `'${c}'`).join(', ')} ${missing.length === 1 ? 'is' : 'are'} not in the data (a run started from it keeps every class it has)`,
      'data',
    );
  return {
    ...(init.hidden ? { hidden: init.hidden } : {}),
    logits: init.logits,
    columns: classes.map((c) => labels.indexOf(c)),
  };
}

/**
 * Reads and checks the `--init` run against the loaded backbone, the head options and the
 * data's classes, and gives the backbone the export's body (its fine-tuned layers) when it
 * differs from the backbone's own. Returns the backbone the run uses (the same object when
 * nothing changed) and what the head stage needs. Everything fails here, before any image
 * is decoded.
 */
export async function prepareInit(
  location: string,
  backbone: Backbone,
  hidden: number,
  classes: readonly string[],
): Promise<{ backbone: Backbone; init: PreparedInit }> {
  const run = await readInitRun(location);
  checkInitBackbone(location, run, backbone);
  headInit(location, run, hidden, classes);
  const used = run.body ? withBody(backbone, run.body, run.modelFile) : backbone;
  const labels = run.metadata.labels;
  const record: InitRecord = {
    run: run.run,
    runId: run.metadata.runId ?? null,
    weightsSha256: run.metadata.weightsSha256 ?? null,
    weights: run.metadata.weights,
    body: used === backbone ? 'backbone' : 'export',
    kept: classes.filter((c) => labels.includes(c)),
    added: classes.filter((c) => !labels.includes(c)),
  };
  // The body's weights are in the backbone now (or were its own): keep only the head's.
  return {
    backbone: used,
    init: { location, run: { ...run, body: null }, record },
  };
}

/**
 * A plain head model (buildHead's layers) holding the `--init` run's weights for `classes`,
 * new classes as `seed` initialises them: for code that trains a head of its own
 * (`lrFind` ramps from where the run would start, as fastai's `lr_find` does on a loaded
 * learner). The caller disposes it.
 */
export function initialHeadModel(
  init: PreparedInit,
  featureSize: number,
  classes: readonly string[],
  options: { hidden: number; dropout: number; seed: number; bn?: boolean },
): tf.LayersModel {
  const heads = new HeadPopulation(
    featureSize,
    classes.length,
    options.hidden,
    [
      {
        seed: options.seed,
        dropout: options.dropout,
        init: headInit(init.location, init.run, options.hidden, classes),
      },
    ],
    { bn: options.bn ?? false },
  );
  try {
    return heads.toModel(0);
  } finally {
    heads.dispose();
  }
}
