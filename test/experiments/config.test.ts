import assert from 'node:assert/strict';
import { writeFile } from 'node:fs/promises';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { expandSweep, loadSweepConfig, type SweepConfig } from '../../src/experiments/config.js';
import { tempDir } from '../helpers.js';

let dir: string;
let cleanup: () => Promise<void>;
before(async () => {
  ({ dir, cleanup } = await tempDir('sweep-config'));
});
after(async () => {
  await cleanup();
});

const base = { data: 'photos', epochs: 5 };

test('variants × grid × repeats, in that nesting, with seeds counted from the base seed', () => {
  const runs = expandSweep({
    out: 'sw',
    base: { ...base, seed: 7 },
    grid: { lr: [0.1, 0.01], hidden: [0, 32] },
    variants: [{}, { labelSmoothing: 0 }],
    repeats: 3,
  });
  assert.equal(runs.length, 2 * 2 * 2 * 3);
  assert.deepEqual(
    runs.slice(0, 4).map((r) => r.params),
    [
      { lr: 0.1, hidden: 0, seed: 7 },
      { lr: 0.1, hidden: 0, seed: 8 },
      { lr: 0.1, hidden: 0, seed: 9 },
      { lr: 0.1, hidden: 32, seed: 7 },
    ],
  );
  assert.deepEqual(runs[12]!.params, { labelSmoothing: 0, lr: 0.1, hidden: 0, seed: 7 });
  assert.deepEqual(
    runs.map((r) => r.index),
    runs.map((_, i) => i + 1),
  );
  // Every option resolved; the run folder is under out/runs/<id>.
  assert.equal(runs[1]!.options.seed, 8);
  assert.equal(runs[1]!.options.swaLr, 0.05);
  assert.equal(runs[1]!.options.out, path.join('sw', 'runs', runs[1]!.id));
  // The split stays the base seed's; repeats share a configuration, not an id.
  assert.ok(runs.every((r) => r.splitSeed === 7));
  assert.equal(new Set(runs.slice(0, 3).map((r) => r.config)).size, 1);
  assert.equal(new Set(runs.map((r) => r.id)).size, runs.length);
  assert.equal(new Set(runs.map((r) => r.config)).size, 8);
  // One prepared run and one embedding for all of them: only head options differ.
  assert.equal(new Set(runs.map((r) => r.prepareKey)).size, 1);
  assert.ok(runs.every((r) => !r.needsBackbone));
});

test('without grid, variants or repeats: one run, the base, with no swept values', () => {
  const runs = expandSweep({ out: 'sw', base });
  assert.equal(runs.length, 1);
  assert.deepEqual(runs[0]!.params, {});
  assert.equal(runs[0]!.splitSeed, 42);
});

test('run ids: stable, blind to what does not change results, sensitive to what does', () => {
  const id = (extra: object, config: Partial<SweepConfig> = {}) =>
    expandSweep({ out: 'sw', base: { ...base, ...extra }, ...config })[0]!.id;
  const plain = id({});
  assert.equal(id({}), plain);
  assert.equal(id({ threads: 1, workers: 1, cacheDir: '/elsewhere', cache: false }), plain);
  assert.equal(id({}, { out: 'another-folder' }), plain);
  assert.equal(id({ data: path.resolve('photos') }), plain);
  assert.notEqual(id({ lr: 0.02 }), plain);
  assert.notEqual(id({ seed: 43 }), plain);
  // The default written out is the same run.
  assert.equal(id({ lr: 0.01 }), plain);
});

test('prepare keys part runs that need their own embedding; fine-tune runs need the backbone', () => {
  const runs = expandSweep({
    out: 'sw',
    base,
    variants: [{}, { inputSize: 64 }, { finetuneEpochs: 2 }, { valSplit: 0.3 }],
  });
  const keys = runs.map((r) => r.prepareKey);
  assert.equal(keys[0], keys[2]);
  assert.notEqual(keys[0], keys[1]);
  assert.notEqual(keys[0], keys[3]);
  assert.deepEqual(
    runs.map((r) => r.needsBackbone),
    [false, false, true, false],
  );
});

const rejects = (config: unknown, message: string) =>
  assert.throws(() => expandSweep(config as SweepConfig), { name: 'FinetuneError', message });

test('unknown keys: their name and the closest valid one, with the section they are in', () => {
  rejects(
    { out: 'sw', base, grids: { lr: [1] } },
    'Unknown sweep key grids; did you mean grid? (expected base, grid, variants, repeats, out)',
  );
  rejects(
    { out: 'sw', base: { ...base, epoch: 3 } },
    'base: Unknown option epoch; did you mean epochs?',
  );
  rejects({ out: 'sw', base, grid: { lrr: [0.1] } }, 'grid: Unknown option lrr; did you mean lr?');
  rejects(
    { out: 'sw', base, variants: [{}, { hiden: 3 }] },
    'variants[1]: Unknown option hiden; did you mean hidden?',
  );
  rejects({ out: 'sw', base, grid: { colour: [1] } }, 'grid: Unknown option colour');
});

test("bad values: the option's own message, prefixed with the run it came from", () => {
  rejects(
    { out: 'sw', base, grid: { lr: [0.1, -1] } },
    'run 2 of 2 [lr=-1]: Expected a number above 0 and at most 10 for lr but received -1',
  );
  rejects(
    { out: 'sw', base, variants: [{ hidden: 8 }, { hidden: 2.5 }] },
    'run 2 of 2 (variant 2) [hidden=2.5]: Expected a non-negative integer for hidden but received 2.5',
  );
  rejects(
    { out: 'sw', base: { ...base, swa: false }, grid: { swaLr: [0.1] } },
    'run 1 of 1 [swaLr=0.1]: swaLr cannot be used with average none (or swa turned off)',
  );
  rejects(
    { out: 'sw', base: { epochs: 5 } },
    'run 1 of 1: Expected a folder of class folders for data but received undefined',
  );
  rejects(
    { out: 'sw', base, grid: { optimizer: ['adam', 'adamw'] } },
    "run 2 of 2 [optimizer=adamw]: Expected one of adam, sgd, momentum for optimizer but received 'adamw'",
  );
});

test('the shape of the sweep itself is checked before any run', () => {
  rejects({ base }, 'Expected a non-empty string for out but received undefined');
  rejects({ out: 'sw', base: [] }, 'Expected an object of train options for base but received []');
  rejects(
    { out: 'sw', base, grid: { lr: 0.1 } },
    'Expected a non-empty list of values for grid.lr but received 0.1',
  );
  rejects(
    { out: 'sw', base, grid: { lr: [] } },
    'Expected a non-empty list of values for grid.lr but received []',
  );
  rejects(
    { out: 'sw', base, variants: [] },
    'Expected a non-empty list of option sets for variants but received []',
  );
  rejects(
    { out: 'sw', base, variants: [3] },
    'Expected an object of train options for variants[0] but received 3',
  );
  rejects(
    { out: 'sw', base, repeats: 0 },
    'Expected a positive integer for repeats but received 0',
  );
  rejects(
    { out: 'sw', base: { ...base, out: 'x' } },
    'base: out is set once, at the top of the sweep config',
  );
  rejects(
    { out: 'sw', base, grid: { checkpointEvery: [1] } },
    "grid: checkpointEvery is for finetune train (a sweep's runs are not checkpointed)",
  );
  rejects(
    { out: 'sw', base, grid: { lr: [0.1] }, variants: [{ lr: 0.2 }] },
    'variants[0]: lr is also in grid; set it in one place',
  );
  rejects(
    { out: 'sw', base, grid: { seed: [1, 2] }, repeats: 2 },
    'grid: seed cannot be swept together with repeats (repeats set the seeds)',
  );
  rejects(
    { out: 'sw', base, grid: { lr: [0.01, 0.01] } },
    'run 2 of 2 [lr=0.01]: resolves to the same options as run 1',
  );
});

test('sweep files: YAML and JSON read alike; a broken file names itself', async () => {
  const yamlFile = path.join(dir, 'sweep.yaml');
  await writeFile(
    yamlFile,
    'out: sw\nbase:\n  data: photos\n  epochs: 5\ngrid:\n  lr: [1e-2, 3e-3]\n  augment: [[flip], [flip, crop]]\nrepeats: 2\n',
  );
  const jsonFile = path.join(dir, 'sweep.json');
  await writeFile(
    jsonFile,
    JSON.stringify({
      out: 'sw',
      base: { data: 'photos', epochs: 5 },
      grid: { lr: [0.01, 0.003], augment: [['flip'], ['flip', 'crop']] },
      repeats: 2,
    }),
  );
  const fromYaml = await loadSweepConfig(yamlFile);
  assert.deepEqual(fromYaml, await loadSweepConfig(jsonFile));
  assert.equal((fromYaml.grid!['lr']![0] as number) * 1, 0.01);
  // augment needs a fine-tune stage: checked like any other option.
  assert.throws(() => expandSweep(fromYaml), {
    message:
      'run 1 of 8 [lr=0.01, augment=flip, seed=42]: augment need a fine-tune stage (finetuneEpochs > 0)',
  });
  const broken = path.join(dir, 'broken.yaml');
  await writeFile(broken, 'grid: [unclosed\n');
  await assert.rejects(loadSweepConfig(broken), (err: Error) =>
    err.message.startsWith(`${broken}: not valid YAML (`),
  );
  await assert.rejects(loadSweepConfig(path.join(dir, 'missing.json')), (err: Error) =>
    err.message.startsWith(`${path.join(dir, 'missing.json')}: cannot read sweep config (`),
  );
});
