import assert from 'node:assert/strict';
import { type ChildProcess, spawn } from 'node:child_process';
import { readdir, readFile } from 'node:fs/promises';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { CLI, runCli, tempDir, writeColourDataset, writeTinyBackbone } from '../helpers.js';

let dir: string;
let cleanup: () => Promise<void>;
let args: string[];
before(async () => {
  ({ dir, cleanup } = await tempDir('run-folder-e2e'));
  const backbone = await writeTinyBackbone(dir);
  await writeColourDataset(path.join(dir, 'data'), 6, {
    red: [220, 30, 30],
    blue: [20, 40, 230],
  });
  args = ['train', '--data', 'data', '--backbone', backbone, '--backend', 'wasm', '--quiet'];
});
after(async () => {
  await cleanup();
});

/** Starts a long run and resolves once its head stage is training (its first epoch line). */
function startLongRun(out: string): Promise<{ child: ChildProcess; stderr: () => string }> {
  const child = spawn(
    process.execPath,
    [CLI, ...args.filter((a) => a !== '--quiet'), '--out', out, '--epochs', '100000', '--no-swa'],
    {
      cwd: dir,
      env: { ...process.env, FINETUNE_DEBUG: '', XDG_CACHE_HOME: path.join(dir, '.cache') },
    },
  );
  let stderr = '';
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no epoch within 60 s: ${stderr}`)), 60_000);
    child.stderr!.on('data', (d) => {
      stderr += d;
      if (/head epoch 2\//.test(stderr)) {
        clearTimeout(timer);
        resolve({ child, stderr: () => stderr });
      }
    });
    child.on('close', () => reject(new Error(`ended early: ${stderr}`)));
  });
}

function exitOf(child: ChildProcess): Promise<number | null> {
  return new Promise((r) => child.on('close', (code) => r(code)));
}

test('a signal mid-run leaves the earlier run folder as it was, and nothing half-written', async () => {
  const first = await runCli([...args, '--out', 'r1', '--epochs', '2'], dir);
  assert.equal(first.code, 0, first.stderr);
  const summary = await readFile(path.join(dir, 'r1', 'summary.json'), 'utf8');
  for (const [signal, code] of [
    ['SIGTERM', 143],
    ['SIGINT', 130],
  ] as const) {
    const { child, stderr } = await startLongRun('r1');
    const exit = exitOf(child);
    child.kill(signal);
    assert.equal(await exit, code, stderr());
    assert.match(
      stderr(),
      new RegExp(`stopped by ${signal}; the run folder was left as it was before`),
    );
    assert.equal(await readFile(path.join(dir, 'r1', 'summary.json'), 'utf8'), summary);
    assert.deepEqual(
      (await readdir(dir)).filter((n) => n.startsWith('.r1')),
      [],
    );
  }
});

test('a second run into the same --out is refused while the first runs', async () => {
  const { child } = await startLongRun('r2');
  const exit = exitOf(child);
  const second = await runCli([...args, '--out', 'r2', '--epochs', '2'], dir);
  child.kill('SIGINT');
  assert.equal(await exit, 130);
  assert.equal(second.code, 2);
  assert.match(
    second.stderr,
    new RegExp(
      `r2: another run \\(pid ${child.pid}\\) is writing this run folder; wait for it or choose another --out`,
    ),
  );
  assert.deepEqual(
    (await readdir(dir)).filter((n) => n.startsWith('.r2') || n === 'r2'),
    [],
  );
});
