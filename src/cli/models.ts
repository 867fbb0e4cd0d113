import type { Argv } from 'yargs';
import { BACKBONES } from '../index.js';
import { createOutput, table } from './output.js';

export const command = 'models';
export const describe = 'List the registered backbones';

export function builder(y: Argv) {
  return y.option('json', { type: 'boolean', describe: 'Print the registry as JSON' });
}

type Args = Awaited<ReturnType<ReturnType<typeof builder>['parseAsync']>>;

export async function handler(argv: Args): Promise<void> {
  const out = createOutput({ json: argv.json });
  const specs = Object.values(BACKBONES);
  if (argv.json) {
    out.result(JSON.stringify(specs, null, 2));
    return;
  }
  out.result(
    table([
      ['id', 'format', 'input', 'offline', 'licence', 'description'],
      ...specs.map((s) => [
        s.id,
        s.format,
        String(s.inputSize),
        s.offline ? 'yes' : 'no',
        s.licence,
        s.description,
      ]),
    ]),
  );
}
