import { randomBytes } from 'node:crypto';
import { mkdir, readdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import * as tf from '@tensorflow/tfjs';
import { FinetuneError, fileError } from '../errors.js';
import { exists, writeFileAtomic } from '../io/atomic.js';
import { sha256 } from '../io/hash.js';
import type { EpochLogs } from './callbacks.js';
import type { StageName, StageSummary, ValFigures, WeightsChoice } from './events.js';
import type { Evaluation } from './fit.js';
import {
  type ResolvedTrainOptions,
  resolveTrainOptions,
  TRAIN_OPTIONS,
  type TrainOptions,
} from './options.js';
import type { CandidateKind, StageCheckpointing, StageState, WeightsCandidate } from './stage.js';

/** The checkpoint's folder inside the run folder. */
export const CHECKPOINT_DIR = 'checkpoint';
const MANIFEST = 'manifest.json';
const FORMAT = 'tfjs-finetune-checkpoint';
const VERSION = 1;

/**
 * Options that may be given with `resume`: they change how a run goes, never what it
 * computes (the others must be the checkpointed run's own).
 */
export const RESUME_OVERRIDES = [
  'checkpointEvery',
  'decodeConcurrency',
  'finetuneThreads',
] as const;

/**
 * Options the options hash leaves out: the run folder's place, the overrides, and the
 * cache folder (its default follows the environment; the cache never changes results).
 */
const UNHASHED = new Set<string>(['out', 'cacheDir', ...RESUME_OVERRIDES]);

/** What `train` takes to continue an interrupted run (see *Checkpoints and resume*). */
export interface ResumeOptions {
  /** The run folder to continue: written by a run with `checkpointEvery`, not complete. */
  readonly resume: string;
  readonly checkpointEvery?: number;
  readonly decodeConcurrency?: number;
  readonly finetuneThreads?: number;
  readonly onEvent?: TrainOptions['onEvent'];
}

/** sha256 of the resolved options that decide a run's results (every one but `UNHASHED`). */
export function optionsHash(o: ResolvedTrainOptions): string {
  const kept = Object.entries(o)
    .filter(([k, v]) => !UNHASHED.has(k) && v !== undefined)
    .sort(([a], [b]) => (a < b ? -1 : 1));
  return sha256(JSON.stringify(kept));
}

// JSON with the numbers it cannot hold (NaN, ±Infinity: an early-stopping best before any
// epoch, a loss without data) kept as tagged strings, so a state comes back exactly.
const NUM = '__number';
function toJson(value: unknown): string {
  return JSON.stringify(value, (_k, v) =>
    typeof v === 'number' && !Number.isFinite(v) ? { [NUM]: String(v) } : v,
  );
}
function fromJson(text: string): unknown {
  return JSON.parse(text, (_k, v) =>
    v && typeof v === 'object' && !Array.isArray(v) && typeof v[NUM] === 'string'
      ? Number(v[NUM])
      : v,
  );
}

/** A tensor's place in the checkpoint's data file. */
interface TensorEntry {
  readonly name: string;
  readonly dtype: 'float32' | 'int32' | 'bool';
  readonly shape: number[];
  readonly offset: number;
  readonly bytes: number;
}

/** Tensors laid end to end as their raw bytes (float32 stays bit for bit). */
function encodeTensors(tensors: ReadonlyMap<string, tf.Tensor>): {
  index: TensorEntry[];
  data: Buffer;
} {
  const index: TensorEntry[] = [];
  const parts: Buffer[] = [];
  let offset = 0;
  for (const [name, t] of tensors) {
    const dtype = t.dtype as TensorEntry['dtype'];
    if (dtype !== 'float32' && dtype !== 'int32' && dtype !== 'bool')
      throw new Error(`checkpoint: cannot save ${name} of dtype ${t.dtype}`);
    const values = t.dataSync() as Float32Array | Int32Array | Uint8Array;
    const bytes = Buffer.from(values.buffer, values.byteOffset, values.byteLength);
    parts.push(Buffer.from(bytes));
    index.push({ name, dtype, shape: [...t.shape], offset, bytes: bytes.length });
    offset += bytes.length;
  }
  return { index, data: Buffer.concat(parts) };
}

function decodeTensors(index: readonly TensorEntry[], data: Buffer): Map<string, tf.Tensor> {
  const out = new Map<string, tf.Tensor>();
  for (const e of index) {
    const raw = data.subarray(e.offset, e.offset + e.bytes);
    const copy = new Uint8Array(raw);
    const values =
      e.dtype === 'float32'
        ? new Float32Array(copy.buffer)
        : e.dtype === 'int32'
          ? new Int32Array(copy.buffer)
          : copy;
    out.set(e.name, tf.tensor(values, e.shape, e.dtype));
  }
  return out;
}

/** A stage's state without its tensors, as the manifest holds it. */
type StageStateJson = Omit<StageState, 'tensors'>;

/**
 * What the fine-tune stage's checkpoints carry of the finished head stage, so a resume
 * inside the fine-tune stage does not train the head again: its records and the head's
 * weights as the head stage left them (in the head model's weight order).
 */
export interface HeadCarry {
  readonly summary: StageSummary;
  readonly kept: WeightsChoice;
  readonly val: ValFigures | null;
  readonly history: readonly EpochLogs[];
  readonly raw: Evaluation | null;
  readonly swa: Evaluation | null;
  readonly stage: {
    readonly average: 'swa' | 'ema' | null;
    readonly snapshots: number;
    readonly kept: 'raw' | 'swa' | 'ema';
    readonly stoppedAfter: number | null;
    readonly averagingFrom: number | null;
    readonly bnRefreshed: readonly string[];
    readonly candidates: readonly WeightsCandidate[] | null;
    readonly chosen: CandidateKind | null;
  };
  readonly weights: readonly Float32Array[];
}

type HeadCarryJson = Omit<HeadCarry, 'raw' | 'swa' | 'weights'> & {
  readonly raw: Omit<Evaluation, 'probs'> | null;
  readonly swa: Omit<Evaluation, 'probs'> | null;
  readonly weights: number;
};

interface Manifest {
  readonly format: typeof FORMAT;
  readonly version: number;
  /** The options as given (paths as typed, `out` resolved), and where they were given. */
  readonly options: Record<string, unknown>;
  readonly cwd: string;
  readonly optionsHash: string;
  readonly stage: StageName;
  /** Epochs of `stage` done. */
  readonly epoch: number;
  /** Every metrics line so far (the head stage's first, in the fine-tune stage). */
  readonly history: readonly EpochLogs[];
  readonly state: StageStateJson;
  readonly head: HeadCarryJson | null;
  readonly data: {
    readonly file: string;
    readonly bytes: number;
    readonly sha256: string;
    readonly tensors: readonly TensorEntry[];
  };
}

/**
 * A checkpoint read back: its manifest and tensors. `dispose` frees the tensors (a stage
 * resumed from `state` frees them itself once restored).
 */
export interface LoadedCheckpoint {
  readonly dir: string;
  readonly options: Record<string, unknown>;
  readonly cwd: string;
  readonly optionsHash: string;
  readonly stage: StageName;
  readonly epoch: number;
  readonly state: StageState;
  readonly head: HeadCarry | null;
  dispose(): void;
}

/** Why `dir` cannot be resumed, in one line naming it (exit code 2). */
function cannotResume(dir: string, reason: string): FinetuneError {
  return fileError(dir, `cannot be resumed: ${reason}`);
}

/**
 * Reads RUN's checkpoint. Refuses a folder that is missing, complete (it has a
 * summary.json), holds no checkpoint, or whose checkpoint is damaged.
 */
export async function readCheckpoint(dir: string): Promise<LoadedCheckpoint> {
  const st = await stat(dir).catch(() => null);
  if (!st?.isDirectory()) throw cannotResume(dir, 'no such run folder');
  if (await exists(path.join(dir, 'summary.json')))
    throw cannotResume(dir, 'the run is complete (it has a summary.json)');
  const folder = path.join(dir, CHECKPOINT_DIR);
  const manifestFile = path.join(folder, MANIFEST);
  const text = await readFile(manifestFile, 'utf8').catch(() => null);
  if (text === null)
    throw cannotResume(
      dir,
      `it holds no ${CHECKPOINT_DIR}/${MANIFEST} (runs with checkpointEvery, --checkpoint-every N, write one)`,
    );
  let m: Manifest;
  try {
    m = fromJson(text) as Manifest;
  } catch {
    m = {} as Manifest;
  }
  if (m.format !== FORMAT || m.version !== VERSION)
    throw cannotResume(
      dir,
      `${CHECKPOINT_DIR}/${MANIFEST} is not a version ${VERSION} checkpoint of this toolkit`,
    );
  // The manifest names a file of its own folder, nothing else.
  if (!/^state-[\w-]+\.bin$/.test(String(m.data?.file)))
    throw cannotResume(dir, `${CHECKPOINT_DIR}/${MANIFEST} names no data file of its folder`);
  const dataFile = path.join(folder, m.data.file);
  const data = await readFile(dataFile).catch(() => null);
  if (!data || data.length !== m.data.bytes || sha256(data) !== m.data.sha256)
    throw cannotResume(dir, `${CHECKPOINT_DIR}/${m.data.file} is missing or damaged`);
  const isHead = (e: TensorEntry) => e.name.startsWith('head/');
  const tensors = decodeTensors(
    m.data.tensors.filter((e) => !isHead(e)),
    data,
  );
  // The head stage's carried arrays stay plain arrays: they are read, never trained.
  const arrays = new Map(
    m.data.tensors
      .filter(isHead)
      .map((e) => [
        e.name,
        new Float32Array(new Uint8Array(data.subarray(e.offset, e.offset + e.bytes)).buffer),
      ]),
  );
  let head: HeadCarry | null = null;
  if (m.head) {
    const probs = (name: string) => arrays.get(name) ?? null;
    const evaluation = (e: Omit<Evaluation, 'probs'> | null, name: string) =>
      e ? { ...e, probs: probs(name) ?? new Float32Array(0) } : null;
    head = {
      ...m.head,
      raw: evaluation(m.head.raw, 'head/raw'),
      swa: evaluation(m.head.swa, 'head/swa'),
      weights: Array.from({ length: m.head.weights }, (_, i) => arrays.get(`head/weight/${i}`)!),
    };
  }
  return {
    dir,
    options: m.options,
    cwd: m.cwd,
    optionsHash: m.optionsHash,
    stage: m.stage,
    epoch: m.epoch,
    state: { ...m.state, tensors },
    head,
    dispose: () => tf.dispose([...tensors.values()]),
  };
}

/** Options whose relative paths are read from the folder the run was started in. */
const PATH_OPTIONS = ['data', 'init', 'cacheDir', 'backbone'] as const;

/** `a`, `a and b`, `a, b and c`. */
export function listed(items: readonly string[]): string {
  return items.length < 2 ? items.join('') : `${items.slice(0, -1).join(', ')} and ${items.at(-1)}`;
}

/**
 * The options of a run to resume, with the checkpoint: RUN's own options, plus those of
 * `RESUME_OVERRIDES` given now. Any other option is refused (it would change the run), as
 * are options that no longer resolve as they did (another version of the toolkit).
 */
export async function resumeOptions(
  given: ResumeOptions,
): Promise<{ options: TrainOptions; checkpoint: LoadedCheckpoint }> {
  const { resume: dir, onEvent, ...rest } = given as ResumeOptions & Record<string, unknown>;
  if (typeof dir !== 'string' || !dir)
    throw new FinetuneError(`Expected a run folder for resume but received ${String(dir)}`, {
      option: 'resume',
    });
  const others = Object.keys(rest).filter(
    (k) => rest[k] !== undefined && !(RESUME_OVERRIDES as readonly string[]).includes(k),
  );
  if (others.length) {
    const say = (shown: (k: string) => string) =>
      `a resumed run keeps its own options: drop ${others.map(shown).join(', ')} (only ${listed(RESUME_OVERRIDES.map(shown))} may be given)`;
    throw new FinetuneError(
      say((k) => k),
      { renamed: say },
    );
  }
  const checkpoint = await readCheckpoint(dir);
  try {
    const saved = checkpoint.options;
    const relative = PATH_OPTIONS.filter(
      (k) =>
        typeof saved[k] === 'string' &&
        !path.isAbsolute(saved[k] as string) &&
        (k !== 'backbone' || /[/\\]|\.json$/.test(saved[k] as string)),
    );
    if (relative.length && path.resolve(checkpoint.cwd) !== path.resolve(process.cwd()))
      throw cannotResume(
        dir,
        `its ${relative.join(', ')} ${relative.length > 1 ? 'are paths' : 'is a path'} relative to ${checkpoint.cwd}: resume from there`,
      );
    const options = {
      ...saved,
      ...Object.fromEntries(Object.entries(rest).filter(([, v]) => v !== undefined)),
      out: dir,
      ...(onEvent ? { onEvent } : {}),
    } as unknown as TrainOptions;
    if (optionsHash(resolveTrainOptions(options)) !== checkpoint.optionsHash)
      throw cannotResume(
        dir,
        'its options no longer resolve as when it was checkpointed (another version of the toolkit?)',
      );
    return { options, checkpoint };
  } catch (err) {
    checkpoint.dispose();
    throw err;
  }
}

/** The options as given, for the manifest: the train options only, `out` as resolved. */
function givenOptions(
  given: TrainOptions,
  resolved: ResolvedTrainOptions,
): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const row of TRAIN_OPTIONS) {
    const v = (given as unknown as Record<string, unknown>)[row.key];
    if (v !== undefined) out[row.key] = v;
  }
  out['out'] = resolved.out;
  return out;
}

/**
 * A run's checkpoints: `RUN/checkpoint/` holds one data file of tensors and a manifest
 * written last (atomically) that names it, so a checkpoint is whole or absent; the one
 * before it is removed only once the new manifest is in place. From the first checkpoint,
 * RUN is a visibly incomplete run folder (config.json, metrics.jsonl so far, checkpoint/,
 * no summary.json) until the run ends and its complete folder replaces it.
 */
export class RunCheckpoints {
  private head: { json: HeadCarryJson; tensors: Map<string, tf.Tensor> } | null = null;
  private folderReady: boolean;

  constructor(
    readonly out: string,
    readonly every: number,
    private readonly record: {
      readonly options: Record<string, unknown>;
      readonly optionsHash: string;
      readonly config: unknown;
    },
    /** The checkpoint the run continues from (the run folder exists already). */
    readonly resumed: LoadedCheckpoint | null,
  ) {
    this.folderReady = resumed !== null;
  }

  static create(
    given: TrainOptions,
    resolved: ResolvedTrainOptions,
    config: unknown,
    resumed: LoadedCheckpoint | null,
  ): RunCheckpoints | null {
    const every = resolved.checkpointEvery ?? 0;
    if (every === 0 && !resumed) return null;
    return new RunCheckpoints(
      resolved.out,
      every,
      {
        options: resumed?.options ?? givenOptions(given, resolved),
        optionsHash: optionsHash(resolved),
        config,
      },
      resumed,
    );
  }

  /** The fine-tune stage's checkpoints carry the head stage's results (see HeadCarry). */
  setHead(carry: HeadCarry): void {
    const tensors = new Map<string, tf.Tensor>();
    if (carry.raw) tensors.set('head/raw', tf.tensor1d(carry.raw.probs));
    if (carry.swa) tensors.set('head/swa', tf.tensor1d(carry.swa.probs));
    carry.weights.forEach((w, i) => {
      tensors.set(`head/weight/${i}`, tf.tensor1d(w));
    });
    const strip = (e: Evaluation | null) => (e ? { loss: e.loss, acc: e.acc } : null);
    this.disposeHead();
    this.head = {
      json: {
        ...carry,
        raw: strip(carry.raw),
        swa: strip(carry.swa),
        weights: carry.weights.length,
      },
      tensors,
    };
  }

  /** The stage's checkpointing: what to continue from (when the run resumes inside it) and where to save. */
  stage(
    name: StageName,
    history: readonly EpochLogs[],
    extra?: readonly tf.Variable[],
  ): StageCheckpointing {
    const resume = this.resumed?.stage === name ? this.resumed.state : null;
    return {
      every: this.every,
      resume,
      ...(extra ? { extra } : {}),
      save: (state) => this.save(name, state, [...history, ...(state.loop.histories[0] ?? [])]),
    };
  }

  private async save(
    stage: StageName,
    state: StageState,
    history: readonly EpochLogs[],
  ): Promise<void> {
    const tensors = new Map(state.tensors);
    if (stage === 'finetune') {
      if (!this.head) throw new Error('RunCheckpoints: the fine-tune stage needs setHead first');
      for (const [n, t] of this.head.tensors) tensors.set(n, t);
    }
    const { index, data } = encodeTensors(tensors);
    await this.prepareFolder();
    const folder = path.join(this.out, CHECKPOINT_DIR);
    await mkdir(folder, { recursive: true });
    const file = `state-${stage}-${state.loop.epochs}-${randomBytes(4).toString('hex')}.bin`;
    await writeFile(path.join(folder, file), data);
    await writeFileAtomic(
      path.join(this.out, 'metrics.jsonl'),
      history.map((l) => `${JSON.stringify(l)}\n`).join(''),
    );
    const { tensors: _, ...json } = state;
    const manifest: Manifest = {
      format: FORMAT,
      version: VERSION,
      options: this.record.options,
      cwd: process.cwd(),
      optionsHash: this.record.optionsHash,
      stage,
      epoch: state.loop.epochs,
      history,
      state: json,
      head: stage === 'finetune' ? this.head!.json : null,
      data: { file, bytes: data.length, sha256: sha256(data), tensors: index },
    };
    await writeFileAtomic(path.join(folder, MANIFEST), toJson(manifest));
    for (const name of await readdir(folder)) {
      if (name !== MANIFEST && name !== file) await rm(path.join(folder, name), { force: true });
    }
  }

  /**
   * Before the first checkpoint of a fresh run: RUN becomes an incomplete run folder
   * holding config.json, built beside it and moved into place whole (an earlier run folder
   * of that name is replaced now, not at the end).
   */
  private async prepareFolder(): Promise<void> {
    if (this.folderReady) return;
    const parent = path.dirname(this.out);
    const name = path.basename(this.out);
    const fresh = path.join(parent, `.${name}.checkpoint-${randomBytes(4).toString('hex')}`);
    await mkdir(fresh, { recursive: true });
    await writeFile(
      path.join(fresh, 'config.json'),
      `${JSON.stringify(this.record.config, null, 2)}\n`,
    );
    let old: string | null = null;
    if (await exists(this.out)) {
      old = path.join(parent, `.${name}.old-${randomBytes(4).toString('hex')}`);
      await rename(this.out, old);
    }
    await rename(fresh, this.out);
    if (old) await rm(old, { recursive: true, force: true });
    this.folderReady = true;
  }

  private disposeHead(): void {
    if (this.head) tf.dispose([...this.head.tensors.values()]);
    this.head = null;
  }

  /** Frees the head stage's carried tensors and the checkpoint resumed from. */
  dispose(): void {
    this.disposeHead();
    this.resumed?.dispose();
  }
}
