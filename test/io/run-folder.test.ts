import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdir, readdir, readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { openRunFolder, removePendingSync } from '../../src/io/run-folder.js';
import { tempDir } from '../helpers.js';

let dir: string;
let cleanup: () => Promise<void>;
before(async () => {
  ({ dir, cleanup } = await tempDir('run-folder'));
});
after(async () => {
  await cleanup();
});

async function earlierRun(out: string): Promise<void> {
  await mkdir(path.join(out, 'model'), { recursive: true });
  await writeFile(path.join(out, 'summary.json'), '"old"');
  await writeFile(path.join(out, 'metrics.jsonl'), 'old\n');
}

test('commit replaces an earlier run folder whole; nothing is left beside it', async () => {
  const out = path.join(dir, 'a');
  await earlierRun(out);
  const f = await openRunFolder(out);
  assert.deepEqual(await readdir(out), ['metrics.jsonl', 'model', 'summary.json']);
  await writeFile(path.join(f.staging, 'summary.json'), '"new"');
  await f.commit();
  assert.deepEqual(await readdir(out), ['summary.json']);
  assert.equal(await readFile(path.join(out, 'summary.json'), 'utf8'), '"new"');
  assert.deepEqual(
    (await readdir(dir)).filter((n) => n.startsWith('.a')),
    [],
  );
});

test('abandon leaves the earlier run as it was and removes the staging folder and lock', async () => {
  const out = path.join(dir, 'b');
  await earlierRun(out);
  const f = await openRunFolder(out);
  await writeFile(path.join(f.staging, 'summary.json'), '"half"');
  await f.abandon();
  assert.equal(await readFile(path.join(out, 'summary.json'), 'utf8'), '"old"');
  assert.deepEqual(
    (await readdir(dir)).filter((n) => n.startsWith('.b')),
    [],
  );
});

test('a second writer is refused while the first holds the lock; a dead writer’s lock is taken over', async () => {
  const out = path.join(dir, 'c');
  const f = await openRunFolder(out);
  await assert.rejects(openRunFolder(out), {
    message: `${out}: another run (pid ${process.pid}) is writing this run folder; wait for it or choose another --out`,
  });
  await f.abandon();
  // a lock left by a process that no longer exists
  const child = spawn(process.execPath, ['-e', '0']);
  const pid = child.pid!;
  await new Promise((r) => child.on('close', r));
  await writeFile(path.join(dir, '.c.lock'), `${pid}\n`);
  await mkdir(path.join(dir, '.c.partial-dead01'));
  const g = await openRunFolder(out);
  await g.commit();
  assert.deepEqual(await readdir(out), []);
  // the dead writer's staging folder went with its lock
  assert.deepEqual(
    (await readdir(dir)).filter((n) => n.startsWith('.c.')),
    [],
  );
});

test('what a killed writer left beside the run folder goes when the next run opens it', async () => {
  const out = path.join(dir, 'e');
  await earlierRun(out);
  // A first checkpoint's folder never moved in, and a replaced run folder not yet deleted.
  await mkdir(path.join(dir, '.e.checkpoint-dead01'));
  await writeFile(path.join(dir, '.e.checkpoint-dead01', 'config.json'), '{}');
  await mkdir(path.join(dir, '.e.old-dead02'));
  await writeFile(path.join(dir, '.e.old-dead02', 'summary.json'), '"older"');
  const f = await openRunFolder(out);
  assert.deepEqual(
    (await readdir(dir)).filter((n) => n.startsWith('.e.')).sort(),
    ['.e.lock', path.basename(f.staging)].sort(),
  );
  await f.abandon();
  assert.equal(await readFile(path.join(out, 'summary.json'), 'utf8'), '"old"');

  // Without the run folder, an .old-* folder may be the only copy of the earlier run: kept.
  const lone = path.join(dir, 'f');
  await mkdir(path.join(dir, '.f.old-dead03'));
  await writeFile(path.join(dir, '.f.old-dead03', 'summary.json'), '"only copy"');
  const g = await openRunFolder(lone);
  await g.abandon();
  assert.equal(
    await readFile(path.join(dir, '.f.old-dead03', 'summary.json'), 'utf8'),
    '"only copy"',
  );
});

test('--out that cannot be a run folder fails at once, naming it', async () => {
  const file = path.join(dir, 'file.txt');
  await writeFile(file, 'x');
  await assert.rejects(openRunFolder(file), { message: `${file}: is a file, not a run folder` });
  const under = path.join(file, 'run');
  await assert.rejects(openRunFolder(under), {
    message: `${under}: cannot be a run folder: a parent is a file`,
  });
  const mine = path.join(dir, 'documents');
  await mkdir(mine);
  await writeFile(path.join(mine, 'thesis.tex'), 'precious');
  await assert.rejects(openRunFolder(mine), {
    message: `${mine}: exists and is not a run folder (no summary.json, config.json or model/); choose another --out`,
  });
  assert.equal(await readFile(path.join(mine, 'thesis.tex'), 'utf8'), 'precious');
});

test('removePendingSync removes the staging folders and locks of runs in flight', async () => {
  const out = path.join(dir, 'd');
  const f = await openRunFolder(out);
  await writeFile(path.join(f.staging, 'weights.bin'), Buffer.alloc(10));
  assert.equal((await readdir(dir)).filter((n) => n.startsWith('.d.')).length, 2);
  removePendingSync();
  assert.deepEqual(
    (await readdir(dir)).filter((n) => n.startsWith('.d.')),
    [],
  );
});
