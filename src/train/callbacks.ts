/** Per-epoch figures, one line of metrics.jsonl. */
export interface EpochLogs {
  stage: string;
  epoch: number;
  loss: number;
  acc: number;
  val_loss?: number;
  val_acc?: number;
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

/** Sets the optimizer's learning rate at the start of every epoch. */
export function learningRateSchedule(
  setLr: (lr: number) => void,
  lrAt: (epoch: number) => number,
  warmupSteps = 0,
): TrainingCallback & { current: number } {
  let step = 0;
  const cb = {
    current: Number.NaN,
    onEpochBegin(epoch: number) {
      cb.current = lrAt(epoch);
      setLr(cb.current);
    },
    onBatchBegin() {
      // Linear warm-up over the first steps (fastai's one-cycle and most fine-tuning
      // recipes start low): Adam's first updates are full-size whatever the gradient.
      if (step < warmupSteps) setLr((cb.current * (step + 1)) / warmupSteps);
      else if (step === warmupSteps && warmupSteps > 0) setLr(cb.current);
      step++;
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
