import type { Argv } from 'yargs';
import { dataError, type PredictOptions, predict, type SkippedFile } from '../index.js';
import { createOutput, csvCell, table } from './output.js';
import { runOptionsFrom, withRunOptions } from './run-options.js';

export const command = 'predict <inputs..>';
export const describe = 'Top-k labels for image files and folders';

export function builder(y: Argv) {
  return withRunOptions(y)
    .positional('inputs', {
      type: 'string',
      array: true,
      demandOption: true,
      describe: 'Image files and folders',
    })
    .option('top-k', { type: 'number', describe: 'Labels per image [default: 3]' })
    .option('samples', {
      type: 'number',
      describe:
        'Average the probabilities of S SWAG weight samples (a model trained with --swag; runs on tfjs) [default: 1, the exported SWA mean]',
    })
    .option('seed', { type: 'number', describe: 'Seed of the SWAG samples [default: 0]' })
    .option('format', {
      type: 'string',
      choices: ['table', 'json', 'csv'] as const,
      default: 'table' as const,
      describe: 'Output format',
    });
}

type Args = Awaited<ReturnType<ReturnType<typeof builder>['parseAsync']>>;

export async function handler(argv: Args): Promise<void> {
  const out = createOutput({ quiet: argv.quiet, json: argv.format !== 'table' });
  const options: PredictOptions = { ...runOptionsFrom(argv), inputs: argv.inputs as string[] };
  if (argv.topK !== undefined) options.topK = argv.topK;
  if (argv.samples !== undefined) options.samples = argv.samples;
  if (argv.seed !== undefined) options.seed = argv.seed;
  const result = await predict(options);
  if (result.onnxFallback?.error) out.warn(`model.onnx not used: ${result.onnxFallback.reason}`);
  if (!result.predictions.length) throw noUsableImages(options.inputs, result.skipped);
  for (const s of result.skipped) out.warn(`skipped ${s.path}: ${s.reason}`);
  if (argv.format === 'json') {
    out.result(
      JSON.stringify(
        {
          predictions: result.predictions,
          skipped: result.skipped,
          engine: result.engine,
          samples: result.samples,
        },
        null,
        2,
      ),
    );
  } else if (argv.format === 'csv') {
    const k = Math.max(0, ...result.predictions.map((p) => p.top.length));
    const header = [
      'path',
      ...Array.from({ length: k }, (_, i) => [`label_${i + 1}`, `probability_${i + 1}`]).flat(),
    ];
    const rows = result.predictions.map((p) => [
      p.path,
      ...p.top.flatMap((t) => [t.label, t.probability.toFixed(6)]),
    ]);
    out.result([header, ...rows].map((r) => r.map(csvCell).join(',')).join('\n'));
  } else {
    const rows = [['file', 'prediction', 'probability', 'next']];
    for (const p of result.predictions) {
      const [best, ...rest] = p.top;
      rows.push([
        p.path,
        best!.label,
        best!.probability.toFixed(4),
        rest.map((t) => `${t.label} ${t.probability.toFixed(3)}`).join(', '),
      ]);
    }
    out.result(table(rows));
  }
}

/** Every input skipped (or none found): one line naming the first few and why. */
export function noUsableImages(inputs: readonly string[], skipped: readonly SkippedFile[]): Error {
  if (!skipped.length) return dataError(`no image files found in ${inputs.join(', ')}`);
  const shown = skipped.slice(0, 3).map((s) => `${s.path}: ${s.reason}`);
  if (skipped.length > 3) shown.push(`and ${skipped.length - 3} more`);
  return dataError(`no usable images (${skipped.length} skipped: ${shown.join('; ')})`);
}
