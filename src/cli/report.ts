import type { Argv } from 'yargs';
import { writeReport } from '../index.js';
import { createOutput } from './output.js';

export const command = 'report <folder>';
export const describe =
  'Write report.html for a run folder (from train) or a sweep folder (from sweep), from its records';

export function builder(y: Argv) {
  return y
    .positional('folder', {
      type: 'string',
      demandOption: true,
      describe: 'A run folder (summary.json) or a sweep folder (sweep.json)',
    })
    .option('json', { type: 'boolean', describe: 'Print what was written as JSON' });
}

type Args = Awaited<ReturnType<ReturnType<typeof builder>['parseAsync']>>;

export async function handler(argv: Args): Promise<void> {
  const out = createOutput({ json: argv.json });
  const written = await writeReport(argv.folder);
  out.result(argv.json ? JSON.stringify(written) : `${written.kind} report: ${written.file}`);
}
