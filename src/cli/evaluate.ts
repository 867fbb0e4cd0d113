import type { Argv } from 'yargs';
import { type CalibrationReport, type EvaluateOptions, evaluate } from '../index.js';
import { createOutput, table } from './output.js';
import { noUsableImages } from './predict.js';
import { runOptionsFrom, withRunOptions } from './run-options.js';

export const command = 'evaluate';
export const describe =
  'Accuracy, per-class precision/recall/F1, confusion matrix and calibration on a labelled folder';

export function builder(y: Argv) {
  return withRunOptions(y)
    .option('data', {
      type: 'string',
      demandOption: true,
      describe: 'Folder of class folders named like the labels',
    })
    .option('json', { type: 'boolean', describe: 'Print the report as JSON' })
    .option('samples', {
      type: 'number',
      describe:
        'Average the probabilities of S SWAG weight samples (a model trained with --swag; runs on tfjs) [default: 1, the exported SWA mean]',
    })
    .option('seed', { type: 'number', describe: 'Seed of the SWAG samples [default: 0]' });
}

type Args = Awaited<ReturnType<ReturnType<typeof builder>['parseAsync']>>;

export async function handler(argv: Args): Promise<void> {
  const out = createOutput({ quiet: argv.quiet, json: argv.json });
  const options: EvaluateOptions = { ...runOptionsFrom(argv), data: argv.data };
  if (argv.samples !== undefined) options.samples = argv.samples;
  if (argv.seed !== undefined) options.seed = argv.seed;
  const r = await evaluate(options);
  if (r.onnxFallback?.error) out.warn(`model.onnx not used: ${r.onnxFallback.reason}`);
  if (r.count === 0) throw noUsableImages([argv.data], r.skipped);
  for (const s of r.skipped) out.warn(`skipped ${s.path}: ${s.reason}`);
  if (argv.json) {
    out.result(JSON.stringify(r, null, 2));
    return;
  }
  const averaged = r.samples > 1 ? `, the average of ${r.samples} SWAG samples` : '';
  const lines = [
    `accuracy ${r.accuracy.toFixed(4)} on ${r.count} images (engine ${r.engine}${averaged})`,
    '',
  ];
  lines.push(
    table([
      ['class', 'precision', 'recall', 'f1', 'support'],
      ...r.perClass.map((m) => [
        m.label,
        m.precision.toFixed(4),
        m.recall.toFixed(4),
        m.f1.toFixed(4),
        String(m.support),
      ]),
      [
        'macro avg',
        r.macro.precision.toFixed(4),
        r.macro.recall.toFixed(4),
        r.macro.f1.toFixed(4),
        String(r.count),
      ],
    ]),
  );
  if (r.withoutExamples.length) {
    lines.push(
      '',
      `no examples of ${r.withoutExamples.join(', ')} (recall 0 in the macro average)`,
    );
  }
  lines.push('', 'confusion (rows: true, columns: predicted)');
  lines.push(
    table([
      ['', ...r.labels.map((_, i) => String(i))],
      ...r.confusion.map((row, i) => [`${i} ${r.labels[i]}`, ...row.map(String)]),
    ]),
  );
  if (r.calibration) lines.push('', ...calibrationLines(r.calibration));
  out.result(lines.join('\n'));
}

/** The figures on one line, then the reliability table's non-empty bins. */
function calibrationLines(c: CalibrationReport): string[] {
  const f = (x: number) => x.toFixed(4);
  const filled = c.bins.filter((b) => b.count > 0);
  const empty = c.bins.length - filled.length;
  return [
    `calibration: nll ${f(c.nll)}  brier ${f(c.brier)}  ece ${f(c.ece)}  mce ${f(c.mce)} (${c.bins.length} bins of top-1 confidence)`,
    table([
      ['confidence', 'count', 'mean conf', 'accuracy'],
      ...filled.map((b) => [
        `${b.lo === 0 ? '[' : '('}${f(b.lo)}, ${f(b.hi)}]`,
        String(b.count),
        f(b.confidence!),
        f(b.accuracy!),
      ]),
    ]),
    ...(empty ? [`${empty} of ${c.bins.length} bins empty, not shown`] : []),
  ];
}
