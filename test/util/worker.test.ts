import assert from 'node:assert/strict';
import { writeFile } from 'node:fs/promises';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { pathToFileURL } from 'node:url';
import { quietWorker, STDERR_TAIL } from '../../src/util/worker.js';
import { tempDir } from '../helpers.js';

let dir: string;
let cleanup: () => Promise<void>;
before(async () => {
  ({ dir, cleanup } = await tempDir('quiet-worker'));
});
after(async () => {
  await cleanup();
});

test('quietWorker: stdout is drained (a worker printing megabytes ends), the tail of stderr is kept trimmed', async () => {
  const script = path.join(dir, 'noisy.mjs');
  await writeFile(
    script,
    [
      "import { workerData } from 'node:worker_threads';",
      "for (let i = 0; i < 2000; i++) process.stdout.write('x'.repeat(1024) + '\\n');",
      "process.stderr.write('y'.repeat(5000) + '\\n' + workerData.last + '\\n');",
      'process.exit(3);',
    ].join('\n'),
  );
  const { worker, stderr } = quietWorker(pathToFileURL(script), { last: 'the end' });
  const ended = new Promise((resolve) => worker.stderr.on('end', resolve));
  const code = await new Promise<number>((resolve) => worker.on('exit', resolve));
  assert.equal(code, 3);
  await ended;
  const tail = stderr();
  assert.ok(tail.endsWith('the end'), tail.slice(-40));
  assert.ok(tail.length <= STDERR_TAIL);
  assert.ok(tail.startsWith('y'));
});
