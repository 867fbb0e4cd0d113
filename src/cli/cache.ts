import type { Argv } from 'yargs';
import { FinetuneError } from '../errors.js';
import { defaultCacheDir, EmbeddingCache } from '../index.js';
import { parseDuration } from './duration.js';
import { createOutput, table } from './output.js';

export const command = 'cache <action>';
export const describe = 'Show or clear the cache (embeddings and lowered ONNX models)';

export function builder(y: Argv) {
  return y
    .positional('action', {
      type: 'string',
      choices: ['info', 'clear'] as const,
      demandOption: true,
      describe: 'info: entries per backbone and lowered models; clear: remove them',
    })
    .option('cache-dir', {
      type: 'string',
      default: defaultCacheDir(),
      describe: 'Cache folder',
    })
    .option('backbone', { type: 'string', describe: 'clear: only this backbone id' })
    .option('older-than', {
      type: 'string',
      // Takes the next word whatever it looks like: `-1d` is a bad duration, not two flags.
      nargs: 1,
      requiresArg: true,
      describe:
        'clear: only entries and lowered models last used longer ago than this, e.g. 30d, 12h, 45m (a pack of entries goes as a whole)',
    })
    .option('json', { type: 'boolean', describe: 'Print the result as JSON' });
}

type Args = Awaited<ReturnType<ReturnType<typeof builder>['parseAsync']>>;

export function megabytes(bytes: number): string {
  return (bytes / 1e6).toFixed(1);
}

/** ISO to the minute, without the 'T': readable and still sorts. */
function minute(iso: string): string {
  return iso.slice(0, 16).replace('T', ' ');
}

export async function handler(argv: Args): Promise<void> {
  const out = createOutput({ json: argv.json });
  const cache = new EmbeddingCache(argv.cacheDir);
  if (argv.action === 'info') {
    for (const flag of ['backbone', 'older-than'] as const) {
      if (argv[flag] !== undefined) {
        throw new FinetuneError(`--${flag} applies to cache clear, not cache info`);
      }
    }
    const info = await cache.info();
    if (argv.json) {
      out.result(JSON.stringify(info, null, 2));
      return;
    }
    const { lowered } = info;
    const summary =
      `${info.dir}: ${info.entries} entries, ${megabytes(info.bytes)} MB; ` +
      `${lowered.count} lowered ${lowered.count === 1 ? 'model' : 'models'}, ${megabytes(lowered.bytes)} MB` +
      (info.temp.count
        ? `; ${info.temp.count} temporary ${info.temp.count === 1 ? 'file' : 'files'}, ${megabytes(info.temp.bytes)} MB`
        : '');
    const parts = [summary];
    if (info.namespaces.length) {
      parts.push(
        table([
          ['namespace', 'backbone', 'layer', 'size', 'view', 'entries', 'MB', 'last used'],
          ...info.namespaces.map((n) => [
            n.id.slice(0, 8),
            n.backboneId,
            n.layer,
            String(n.inputSize),
            n.view,
            String(n.entries),
            megabytes(n.bytes),
            n.lastUsed ? minute(n.lastUsed) : '-',
          ]),
        ]),
      );
    }
    if (lowered.count) {
      parts.push(
        table([
          ['lowered', 'backbone', 'cut', 'lowering', 'MB', 'last used'],
          ...lowered.models.map((m) => [
            m.id.slice(0, 8),
            m.backboneId,
            m.cut ?? '(whole body)',
            String(m.lowering),
            megabytes(m.bytes),
            minute(m.lastUsed),
          ]),
        ]),
      );
    }
    out.result(parts.join('\n\n'));
    return;
  }
  const options: { backbone?: string; olderThanMs?: number } = {};
  if (argv.backbone !== undefined) options.backbone = argv.backbone;
  if (argv.olderThan !== undefined) options.olderThanMs = parseDuration(argv.olderThan);
  const result = await cache.clear(options);
  if (argv.json) {
    out.result(JSON.stringify({ dir: cache.dir, ...result }, null, 2));
    return;
  }
  const temp = result.temp
    ? `, ${result.temp} stale temporary ${result.temp === 1 ? 'file' : 'files'}`
    : '';
  out.result(
    `Removed ${result.removed} ${result.removed === 1 ? 'entry' : 'entries'} and ${result.lowered} lowered ${result.lowered === 1 ? 'model' : 'models'}${temp} (${megabytes(result.bytes)} MB) from ${cache.dir}`,
  );
}
