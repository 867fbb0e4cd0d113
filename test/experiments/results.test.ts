import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  bestConfig,
  bestRun,
  checkMetric,
  type ResultRow,
  resultsCsv,
  summarise,
  summaryCsv,
} from '../../src/experiments/results.js';
import { spread } from '../../src/experiments/stats.js';

test('spread: mean, sample std and the t interval (t(0.975, 2) = 4.303)', () => {
  const s = spread([0.8, 0.82, 0.81]);
  assert.equal(s.n, 3);
  assert.ok(Math.abs(s.mean - 0.81) < 1e-12);
  assert.ok(Math.abs(s.std! - 0.01) < 1e-12);
  const half = (4.302652729 * 0.01) / Math.sqrt(3);
  assert.ok(Math.abs(s.low! - (0.81 - half)) < 1e-8);
  assert.ok(Math.abs(s.high! - (0.81 + half)) < 1e-8);
  // Many repeats: close to the normal 1.96.
  const many = spread(Array.from({ length: 1000 }, (_, i) => (i % 2 ? 1 : -1)));
  assert.ok(Math.abs((many.high! - many.mean) / (many.std! / Math.sqrt(1000)) - 1.9623) < 1e-3);
  assert.deepEqual(spread([0.5]), { n: 1, mean: 0.5, std: null, low: null, high: null });
});

function row(id: string, config: string, seed: number, loss: number, acc: number): ResultRow {
  return {
    id,
    index: 0,
    config,
    repeat: seed - 42,
    params: { lr: config === 'a' ? 0.1 : 0.01, seed },
    options: {} as ResultRow['options'],
    splitSeed: 42,
    status: 'done',
    runDir: `runs/${id}`,
    val: {
      stage: 'head',
      raw: { loss: loss + 0.01, acc },
      swa: { loss, acc },
      kept: { loss, acc },
      exported: 'head-swa',
    },
    test: null,
    seconds: { head: 1.5, test: 0, records: 0.01, total: 1.51 },
    cache: null,
  };
}

const rows: ResultRow[] = [
  row('r1', 'a', 42, 0.5, 0.8),
  row('r2', 'a', 43, 0.7, 0.9),
  row('r3', 'b', 42, 0.55, 0.85),
  row('r4', 'b', 43, 0.56, 0.84),
  { ...row('r5', 'b', 44, 0, 0), status: 'failed', val: null, seconds: {}, error: 'Out of memory' },
];

test('best run and best configuration, each metric the right way round', () => {
  assert.equal(bestRun('val_loss', rows)!.id, 'r1');
  assert.equal(bestRun('val_acc', rows)!.id, 'r2');
  assert.equal(bestRun('test_acc', rows), null);
  const summaries = summarise(rows);
  assert.deepEqual(
    summaries.map((s) => [s.config, s.params, s.runs, s.failed, s.metrics.val_loss?.n]),
    [
      ['a', { lr: 0.1 }, 2, 0, 2],
      ['b', { lr: 0.01 }, 3, 1, 2],
    ],
  );
  // r1 alone is the best run by loss, but b is the better configuration on average.
  assert.equal(bestConfig('val_loss', summaries)!.config, 'b');
  assert.equal(bestConfig('val_acc', summaries)!.config, 'a');
  assert.throws(() => checkMetric('val_f1'), {
    message:
      "Expected one of val_loss, val_acc, test_loss, test_acc, test_f1 for metric but received 'val_f1'",
  });
});

test('results.csv: swept values first, then figures, seconds, folder and error', () => {
  const lines = resultsCsv(rows).trimEnd().split('\n');
  assert.equal(
    lines[0],
    'id,config,repeat,status,lr,seed,val_raw_loss,val_raw_acc,val_swa_loss,val_swa_acc,val_loss,val_acc,kept,' +
      'test_loss,test_acc,test_f1,seconds_scan,seconds_load,seconds_embed,seconds_head,seconds_finetune,seconds_test,seconds_export,seconds_records,' +
      'seconds_total,cache_hits,cache_misses,run_dir,error',
  );
  assert.equal(
    lines[1],
    'r1,a,0,done,0.1,42,0.51,0.8,0.5,0.8,0.5,0.8,head-swa,,,,,,,1.5,,0,,0.01,1.51,,,runs/r1,',
  );
  assert.equal(lines[5], 'r5,b,2,failed,0.01,44,,,,,,,,,,,,,,,,,,,,,,runs/r5,Out of memory');
  const summary = summaryCsv(summarise(rows)).trimEnd().split('\n');
  assert.equal(
    summary[0],
    'config,lr,runs,failed,val_loss_n,val_loss_mean,val_loss_std,val_loss_ci95_low,val_loss_ci95_high,' +
      'val_acc_n,val_acc_mean,val_acc_std,val_acc_ci95_low,val_acc_ci95_high',
  );
  const b = summary[2]!.split(',');
  assert.deepEqual(b.slice(0, 5), ['b', '0.01', '3', '1', '2']);
  assert.ok(Math.abs(Number(b[5]) - 0.555) < 1e-12);
});
