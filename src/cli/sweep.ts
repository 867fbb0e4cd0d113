import type { Argv } from 'yargs';
import {
  EXPORT_CHOICES,
  type ExportChoice,
  loadSweepConfig,
  type ResultRow,
  SWEEP_METRICS,
  type SweepMetric,
  sweep,
} from '../index.js';
import { createOutput, table } from './output.js';

export const command = 'sweep';
export const describe =
  'Train many configurations on one embedding pass (grid, variants, repeats) and tabulate them';

export function builder(y: Argv) {
  return y
    .option('config', {
      type: 'string',
      demandOption: true,
      describe: 'Sweep file (YAML or JSON): base, grid, variants, repeats, out',
    })
    .option('out', { type: 'string', describe: "Sweep folder [default: the config's out]" })
    .option('parallel', {
      type: 'number',
      describe:
        'Fine-tune runs at once, each in a child process with its share of the cores [default: 1]',
    })
    .option('head-threads', {
      type: 'number',
      describe:
        'Threads that train head-only runs after the embedding pass [default: the cores on wasm/cpu, 1 on native TensorFlow]',
    })
    .option('export', {
      type: 'string',
      choices: EXPORT_CHOICES,
      describe: 'Models to export: the best run, all runs, or none [default: best]',
    })
    .option('metric', {
      type: 'string',
      choices: Object.keys(SWEEP_METRICS),
      describe: 'What ranks runs and configurations [default: val_loss]',
    })
    .option('quiet', { type: 'boolean', describe: 'Only the best configuration' })
    .option('json', { type: 'boolean', describe: 'Print only the result JSON on stdout' });
}

type Args = Awaited<ReturnType<ReturnType<typeof builder>['parseAsync']>>;

function fmt(x: number | null | undefined, digits = 4): string {
  return x === null || x === undefined || !Number.isFinite(x) ? 'n/a' : x.toFixed(digits);
}

function describeParams(params: Readonly<Record<string, unknown>>): string {
  const text = Object.entries(params)
    .map(([k, v]) => `${k}=${Array.isArray(v) ? v.join('+') : String(v)}`)
    .join(' ');
  return text || '(base)';
}

function runLine(row: ResultRow, total: number): string {
  const head = `[${row.index}/${total}] ${row.id} ${describeParams(row.params)}`;
  if (row.status !== 'done') return `${head}: failed: ${row.error}`;
  const t = row.test ? `, test acc ${fmt(row.test.acc)}` : '';
  return `${head}: val loss ${fmt(row.val?.kept?.loss)} acc ${fmt(row.val?.kept?.acc)}${t} (${fmt(row.seconds['total'], 1)} s)`;
}

export async function handler(argv: Args): Promise<void> {
  const out = createOutput({ quiet: argv.quiet, json: argv.json });
  const config = await loadSweepConfig(argv.config);
  const t0 = performance.now();
  const result = await sweep(argv.out !== undefined ? { ...config, out: argv.out } : config, {
    ...(argv.parallel !== undefined ? { parallel: argv.parallel } : {}),
    ...(argv.headThreads !== undefined ? { headThreads: argv.headThreads } : {}),
    ...(argv.export !== undefined ? { export: argv.export as ExportChoice } : {}),
    ...(argv.metric !== undefined ? { metric: argv.metric as SweepMetric } : {}),
    onEvent(e) {
      switch (e.type) {
        case 'plan':
          out.info(
            `sweep: ${e.runs} runs${e.finished ? ` (${e.finished} finished earlier, skipped)` : ''}`,
          );
          break;
        case 'embedding':
          out.info(
            `embedded ${e.images} images once for ${e.runs} runs (${e.cached} from the cache; ${fmt(e.seconds.embed, 1)} s)`,
          );
          break;
        case 'train':
          if (e.event.type === 'warning') out.warn(`warning (${e.id}): ${e.event.message}`);
          else if (e.event.type === 'skipped' && e.event.file)
            out.warn(`skipped ${e.event.file.path}: ${e.event.file.reason}`);
          break;
        case 'run-end':
          if (e.row.status === 'done') out.info(runLine(e.row, e.total));
          else out.warn(runLine(e.row, e.total));
          break;
        case 'export':
          out.info(`exported run ${e.id} to ${e.dir}`);
          break;
      }
    },
  });
  if (out.json) {
    const { rows: _rows, ...rest } = result;
    out.result(JSON.stringify(rest, null, 2));
    return;
  }
  const m = result.metric;
  const ranked = [...result.summaries]
    .filter((s) => s.metrics[m])
    .sort((a, b) => {
      const d = a.metrics[m]!.mean - b.metrics[m]!.mean;
      return SWEEP_METRICS[m].better === 'lower' ? d : -d;
    });
  if (!out.quiet && ranked.length > 1) {
    out.result(
      table([
        ['config', 'params', 'runs', `${m} mean`, 'std', '95% interval'],
        ...ranked.slice(0, 10).map((s) => {
          const x = s.metrics[m]!;
          return [
            s.config,
            describeParams(s.params),
            String(x.n),
            fmt(x.mean),
            fmt(x.std),
            x.low === null ? 'n/a' : `${fmt(x.low)}–${fmt(x.high)}`,
          ];
        }),
      ]),
    );
  }
  const best = result.bestConfig;
  const failed = result.rows.filter((r) => r.status !== 'done').length;
  if (!best) {
    out.result(`no run finished (${failed} failed); see ${result.out}/results.csv`);
    return;
  }
  const x = best.metrics[m]!;
  const interval = x.low === null ? '' : ` (95% interval ${fmt(x.low)}–${fmt(x.high)})`;
  out.result(
    `best config by ${m}: ${describeParams(best.params)}: ${fmt(x.mean)} over ${x.n} run${x.n === 1 ? '' : 's'}${interval}; best run ${result.best?.id}${result.model ? ` (model in ${result.model})` : ''}; ${failed ? `${failed} failed; ` : ''}tables in ${result.out} (${fmt((performance.now() - t0) / 1000, 1)} s)`,
  );
}
