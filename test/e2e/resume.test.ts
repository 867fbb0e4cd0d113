import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { readdir, readFile } from 'node:fs/promises';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { CLI, runCli, tempDir, writeColourDataset, writeTinyBackbone } from '../helpers.js';

let dir: string;
let cleanup: () => Promise<void>;
let args: string[];
before(async () => {
  ({ dir, cleanup } = await tempDir('resume-e2e'));
  const backbone = await writeTinyBackbone(dir);
  await writeColourDataset(path.join(dir, 'data'), 6, {
    red: [220, 30, 30],
    blue: [20, 40, 230],
  });
  args = [
    'train',
    '--data',
    'data',
    '--backbone',
    backbone,
    '--backend',
    'wasm',
    '--quiet',
    '--no-cache',
    '--epochs',
    '120',
    '--swa-start',
    '0.5',
    '--checkpoint-every',
    '1',
  ];
});
after(async () => {
  await cleanup();
});

/** The epoch of RUN's checkpoint, or null while there is none. */
async function checkpointEpoch(run: string): Promise<number | null> {
  try {
    const m = JSON.parse(await readFile(path.join(run, 'checkpoint', 'manifest.json'), 'utf8'));
    return m.epoch;
  } catch {
    return null;
  }
}

test('a run killed (SIGKILL) between or during checkpoints resumes from the last whole one to the uninterrupted result', async () => {
  const whole = await runCli([...args, '--out', 'whole'], dir);
  assert.equal(whole.code, 0, whole.stderr);

  const child = spawn(process.execPath, [CLI, ...args, '--out', 'cut'], {
    cwd: dir,
    env: { ...process.env, FINETUNE_DEBUG: '', XDG_CACHE_HOME: path.join(dir, '.cache') },
  });
  const exited = new Promise((resolve) => child.on('close', resolve));
  const cut = path.join(dir, 'cut');
  const deadline = Date.now() + 60_000;
  // Killed at once once a few epochs are checkpointed: possibly in the middle of writing one.
  while (((await checkpointEpoch(cut)) ?? 0) < 5) {
    assert.ok(Date.now() < deadline, 'no checkpoint within 60 s');
    await new Promise((r) => setTimeout(r, 10));
  }
  child.kill('SIGKILL');
  assert.equal(await exited, null);
  const names = await readdir(cut);
  assert.ok(!names.includes('summary.json'), 'the run finished before it was killed');
  // The stale lock and staging folder of the killed process do not stand in the way.
  assert.ok((await readdir(dir)).some((n) => n.startsWith('.cut.lock')));

  const resumed = await runCli(['train', '--resume', 'cut', '--quiet'], dir);
  assert.equal(resumed.code, 0, resumed.stderr);
  const bin = (run: string) => readFile(path.join(dir, run, 'model', 'weights.bin'));
  assert.ok((await bin('cut')).equals(await bin('whole')), 'weights.bin differs');
  const lines = async (run: string) =>
    (await readFile(path.join(dir, run, 'metrics.jsonl'), 'utf8'))
      .trim()
      .split('\n')
      .map((l) => {
        const { seconds: _, ...rest } = JSON.parse(l);
        return rest;
      });
  assert.deepEqual(await lines('cut'), await lines('whole'));
  assert.ok(!(await readdir(cut)).includes('checkpoint'));
  assert.ok(!(await readdir(dir)).some((n) => n.startsWith('.cut.')), 'debris left beside cut');
});
