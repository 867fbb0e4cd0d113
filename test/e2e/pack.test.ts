import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { mkdir, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { ROOT, type Run, tempDir, writeColourDataset, writeTinyBackbone } from '../helpers.js';

// The package as a library user gets it: `npm pack`, then `npm i` of the tarball in a fresh
// project, installed the way the README's library section says. Needs the npm registry (or
// npm's cache: --prefer-offline reuses it). Packs the dist/ that `npm test` has just built.

const INSTALL_ENV = { ONNXRUNTIME_NODE_INSTALL: 'skip' } as const;

/**
 * This process's environment without what npm hands to the scripts it runs (prefix, local
 * prefix, the package being run, ...): inherited, it would point the child npm at this
 * repository. Where the user keeps npm's cache and configuration stays.
 */
function childEnv(extra: Record<string, string>): NodeJS.ProcessEnv {
  const keep = new Set(['npm_config_cache', 'npm_config_userconfig', 'npm_config_globalconfig']);
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) {
    if (/^npm_/i.test(k) && !keep.has(k.toLowerCase())) continue;
    if (k === 'INIT_CWD' || k === 'NODE_PATH' || k === 'NODE_TEST_CONTEXT') continue;
    env[k] = v;
  }
  return { ...env, ...extra };
}

function run(command: string, args: readonly string[], cwd: string, env: NodeJS.ProcessEnv) {
  return new Promise<Run>((resolve, reject) => {
    const child = spawn(command, args, { cwd, env });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code, stdout, stderr }));
  });
}

function ok(r: Run, what: string): void {
  assert.equal(r.code, 0, `${what} exited ${r.code}\n${r.stdout}\n${r.stderr}`);
}

/** npm's warning for an .npmrc key it does not know (printed on every npm and npx command). */
const UNKNOWN_CONFIG = /Unknown (project|env) config/;

let dir: string;
let cleanup: () => Promise<void>;
let project: string;
let packed: string[];

before(async () => {
  ({ dir, cleanup } = await tempDir('pack'));
  const env = childEnv({ ...INSTALL_ENV, XDG_CACHE_HOME: path.join(dir, '.cache') });
  const pack = await run(
    'npm',
    ['pack', '--ignore-scripts', '--json', '--pack-destination', dir],
    ROOT,
    env,
  );
  ok(pack, 'npm pack');
  const [info] = JSON.parse(pack.stdout) as { filename: string; files: { path: string }[] }[];
  packed = info!.files.map((f) => f.path);
  project = path.join(dir, 'project');
  await mkdir(project);
  await writeFile(
    path.join(project, 'package.json'),
    `${JSON.stringify({ name: 'uses-tfjs-finetune', version: '1.0.0', private: true, type: 'module' })}\n`,
  );
  const install = await run(
    'npm',
    ['install', '--prefer-offline', '--no-audit', '--no-fund', path.join(dir, info!.filename)],
    project,
    env,
  );
  ok(install, 'npm install of the tarball');
});
after(async () => {
  await cleanup();
});

test('the tarball holds the built library, its CLI, models/ and the README, nothing of the tests', () => {
  for (const file of [
    'package.json',
    'README.md',
    'models/README.md',
    'dist/src/index.js',
    'dist/src/index.d.ts',
    'dist/src/cli/main.js',
    'dist/src/engine/pool-worker.js',
  ])
    assert.ok(packed.includes(file), `${file} is not in the package`);
  const stray = packed.filter(
    (f) => !(f.startsWith('dist/src/') || f.startsWith('models/')) && !/^[^/]+$/.test(f),
  );
  assert.deepEqual(stray, []);
  const topLevel = packed.filter((f) => !f.includes('/')).sort();
  assert.deepEqual(topLevel, ['LICENSE', 'README.md', 'package.json']);
  // Source maps carry their sources: the package ships no .ts files for them to point at.
  const maps = packed.filter((f) => f.endsWith('.js.map'));
  assert.ok(maps.length > 10);
  for (const map of maps) {
    const m = JSON.parse(readFileSync(path.join(ROOT, map), 'utf8')) as {
      sources: string[];
      sourcesContent?: (string | null)[];
    };
    assert.equal(
      m.sourcesContent?.filter((c) => typeof c === 'string').length,
      m.sources.length,
      map,
    );
  }
  assert.deepEqual(
    packed.filter((f) => /(^|\/)(test|fixtures)\/|\.test\./.test(f)),
    [],
  );
});

test('from the installing project, the library trains and predicts (wasm training, ONNX Runtime passes)', async () => {
  const backbone = await writeTinyBackbone(dir);
  const data = path.join(dir, 'data');
  await writeColourDataset(data, 6, { cyan: [20, 200, 200], magenta: [200, 20, 200] });
  const out = path.join(dir, 'run');
  await writeFile(
    path.join(project, 'check.mjs'),
    `import path from 'node:path';
import { BACKBONES, DEFAULT_BACKBONE, predict, resolveBackboneSpec, train } from 'tfjs-finetune';
const [data, backbone, out] = process.argv.slice(2);
const summary = await train({
  data, out, backbone, backend: 'wasm', epochs: 15, lr: 0.05, batchSize: 8, cache: false,
});
const { predictions } = await predict({ model: out, inputs: [data], topK: 1 });
console.log(JSON.stringify({
  resolved: import.meta.resolve('tfjs-finetune'),
  backbones: Object.keys(BACKBONES),
  defaultSpec: resolveBackboneSpec(DEFAULT_BACKBONE).id,
  backend: summary.backend,
  engine: summary.engine,
  onnx: summary.onnx,
  right: predictions.filter((p) => path.basename(path.dirname(p.path)) === p.top[0].label).length,
  total: predictions.length,
}));
`,
  );
  const r = await run(
    process.execPath,
    ['check.mjs', data, backbone, out],
    project,
    childEnv({ XDG_CACHE_HOME: path.join(dir, '.cache') }),
  );
  ok(r, 'node check.mjs');
  const got = JSON.parse(r.stdout.trim().split('\n').at(-1)!) as Record<string, unknown>;
  assert.ok(
    String(got['resolved']).startsWith(
      `file://${path.join(project, 'node_modules', 'tfjs-finetune')}/`,
    ),
    `tfjs-finetune resolved to ${got['resolved']}`,
  );
  assert.ok((got['backbones'] as string[]).includes('nsfwjs_mobilenet_v2'));
  assert.equal(got['defaultSpec'], 'nsfwjs_mobilenet_v2');
  assert.equal(got['backend'], 'wasm');
  assert.equal(got['engine'], 'onnx');
  assert.equal(got['onnx'], path.join(out, 'model', 'model.onnx'));
  assert.ok((await stat(path.join(out, 'model', 'model.onnx'))).size > 0);
  assert.equal(got['total'], 12);
  assert.ok((got['right'] as number) >= 11, `${got['right']} of 12 right`);
});

test('npx finetune models and --help run from the installing project without npm config warnings', async () => {
  const env = childEnv({ XDG_CACHE_HOME: path.join(dir, '.cache') });
  const models = await run('npx', ['--yes=false', 'finetune', 'models'], project, env);
  ok(models, 'npx finetune models');
  assert.match(models.stdout, /nsfwjs_mobilenet_v2/);
  assert.doesNotMatch(models.stderr, UNKNOWN_CONFIG);
  const help = await run('npx', ['--yes=false', 'finetune', '--help'], project, env);
  ok(help, 'npx finetune --help');
  assert.match(help.stdout, /finetune train/);
  assert.doesNotMatch(help.stderr, UNKNOWN_CONFIG);
});

test('npx finetune in this repository prints no npm config warning either', async () => {
  const help = await run(
    'npx',
    ['--yes=false', 'finetune', '--help'],
    ROOT,
    childEnv({ XDG_CACHE_HOME: path.join(dir, '.cache') }),
  );
  ok(help, 'npx finetune --help');
  assert.doesNotMatch(help.stderr, UNKNOWN_CONFIG);
});
