import type { WeightAverager } from '../swa/averager.js';
import { isSnapshotEpoch, type SwaSchedule } from '../swa/schedule.js';
import type { EpochLogs, TrainingCallback } from './callbacks.js';

/**
 * Takes a snapshot at the end of every snapshot epoch and records the count in the logs
 * (of `member` when the averager's variables are stacked members).
 */
export function swaCallback(
  averager: WeightAverager,
  schedule: SwaSchedule,
  member = 0,
): TrainingCallback {
  return {
    onEpochEnd(epoch: number, logs: EpochLogs) {
      if (isSnapshotEpoch(schedule, epoch)) averager.update(member);
      logs.snapshots = averager.count(member);
    },
  };
}
