/** Per-epoch figures, one line of metrics.jsonl. */
export interface EpochLogs {
  stage: string;
  epoch: number;
  loss: number;
  acc: number;
  val_loss?: number;
  val_acc?: number;
  /** Validation figures of the averaged weights, once averaging has a snapshot. */
  val_avg_loss?: number;
  val_avg_acc?: number;
  lr: number;
  /** Averager snapshots taken so far (absent when averaging is off). */
  snapshots?: number;
  seconds: number;
}

export interface BatchLogs {
  batch: number;
  size: number;
  loss: number;
}

/**
 * Named hooks on the training loop (the tfjs-layers / Keras callback shape). SWA, LR
 * schedules, metric logging and progress output are all callbacks; none forks the loop.
 */
export interface TrainingCallback {
  onTrainBegin?(): void | Promise<void>;
  onEpochBegin?(epoch: number): void | Promise<void>;
  onBatchBegin?(batch: number): void | Promise<void>;
  onBatchEnd?(batch: number, logs: BatchLogs): void | Promise<void>;
  /** `logs` may be extended by earlier callbacks in the list (e.g. snapshots). */
  onEpochEnd?(epoch: number, logs: EpochLogs): void | Promise<void>;
  onTrainEnd?(): void | Promise<void>;
}

/**
 * Sets the optimizer's learning rate before every step from `lrAt(epoch, step)`;
 * `current` is the rate of the epoch's first step without warm-up, for the logs.
 */
export function learningRateSchedule(
  setLr: (lr: number) => void,
  lrAt: (epoch: number, step: number) => number,
  epochLr: (epoch: number) => number,
): TrainingCallback & { current: number } {
  let epoch = 0;
  const cb = {
    current: Number.NaN,
    onEpochBegin(e: number) {
      epoch = e;
      cb.current = epochLr(e);
    },
    onBatchBegin(step: number) {
      setLr(lrAt(epoch, step));
    },
  };
  return cb;
}

/** Calls every callback's hook in list order. */
export class CallbackList {
  constructor(private readonly callbacks: readonly TrainingCallback[]) {}
  async trainBegin(): Promise<void> {
    for (const c of this.callbacks) await c.onTrainBegin?.();
  }
  async epochBegin(epoch: number): Promise<void> {
    for (const c of this.callbacks) await c.onEpochBegin?.(epoch);
  }
  async batchBegin(batch: number): Promise<void> {
    for (const c of this.callbacks) await c.onBatchBegin?.(batch);
  }
  async batchEnd(batch: number, logs: BatchLogs): Promise<void> {
    for (const c of this.callbacks) await c.onBatchEnd?.(batch, logs);
  }
  async epochEnd(epoch: number, logs: EpochLogs): Promise<void> {
    for (const c of this.callbacks) await c.onEpochEnd?.(epoch, logs);
  }
  async trainEnd(): Promise<void> {
    for (const c of this.callbacks) await c.onTrainEnd?.();
  }
}
