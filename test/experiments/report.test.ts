import assert from 'node:assert/strict';
import { access, readFile, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { after, before, test } from 'node:test';
import sharp from 'sharp';
import { writeReport, writeRunReport, writeSweepReport } from '../../src/experiments/report.js';
import { meanSd } from '../../src/experiments/report-charts.js';
import { paramGroups, readSweepRecords, sweptParams } from '../../src/experiments/report-sweep.js';
import { runCli, tempDir } from '../helpers.js';
import {
  FAILED_RUN,
  FIXTURE_CLASSES,
  MISSING_IMAGE,
  SWEEP_HIDDEN,
  SWEEP_LRS,
  SWEEP_SEEDS,
  sweepMetric,
  writeRunFixture,
  writeSweepFixture,
} from './report-fixtures.js';

let dir: string;
let cleanup: () => Promise<void>;
before(async () => {
  ({ dir, cleanup } = await tempDir('report'));
});
after(async () => {
  await cleanup();
});

/** Nothing in the page may make the browser fetch: no remote or relative sources. */
function assertSelfContained(html: string): void {
  assert.doesNotMatch(html, /<script[^>]+src=/i);
  assert.doesNotMatch(html, /<link[^>]+href=/i);
  assert.doesNotMatch(html, /\bsrc="(?!data:)/i);
  assert.doesNotMatch(html, /url\((?!#)/i);
  assert.match(html, /Content-Security-Policy" content="default-src 'none'/);
}

function tableRows(html: string, id: string): string[] {
  const table = new RegExp(`<table id="${id}"[^>]*>([\\s\\S]*?)</table>`).exec(html);
  assert.ok(table, `table #${id} is in the page`);
  return [...table[1]!.matchAll(/<tr[^>]*>([\s\S]*?)<\/tr>/g)].slice(1).map((m) => m[1]!);
}

function cells(row: string): string[] {
  return [...row.matchAll(/<td[^>]*>([\s\S]*?)<\/td>/g)].map((m) => m[1]!);
}

test('run report: curves with SWA and fine-tune marks, confusion, per-class figures, misclassified thumbnails, skipped files, config', async () => {
  const run = path.join(dir, 'run');
  const { predictions } = await writeRunFixture(run, { valImages: 60 });
  const file = await writeRunReport(run);
  assert.equal(file, path.join(run, 'report.html'));
  const html = await readFile(file, 'utf8');
  assertSelfContained(html);

  // three curve charts and the heatmap, each an ECharts SVG
  const charts = [...html.matchAll(/<div class="chart" id="([^"]+)"><svg[\s\S]*?<\/svg>/g)];
  assert.deepEqual(
    charts.map((m) => m[1]),
    ['chart-curve-0', 'chart-curve-1', 'chart-curve-2', 'chart-confusion'],
  );
  for (const m of charts) assert.match(m[0], /<path /);
  assert.match(html, /SWA starts \(head\)/);
  assert.doesNotMatch(
    html,
    /SWA starts \(finetune\)/,
    'the fixture fine-tune stage does not average',
  );
  assert.match(html, />fine-tune</);
  assert.match(html, /val \(raw weights\)/);
  assert.match(html, /val \(averaged weights, stage end\)/);

  // per-class figures, counted here from the fixture's predictions
  const rows = tableRows(html, 'per-class');
  assert.equal(rows.length, FIXTURE_CLASSES.length + 1);
  assert.match(
    html,
    /<tfoot><tr><td>macro average<\/td>/,
    'the average stays below the classes when sorting',
  );
  FIXTURE_CLASSES.forEach((c, i) => {
    const tp = predictions.filter((p) => p.label === c && p.predicted === c).length;
    const support = predictions.filter((p) => p.label === c).length;
    const predicted = predictions.filter((p) => p.predicted === c).length;
    const [name, precision, recall, , sup] = cells(rows[i]!);
    assert.equal(name, c);
    assert.equal(precision, (tp / predicted).toFixed(4));
    assert.equal(recall, (tp / support).toFixed(4));
    assert.equal(sup, String(support));
  });
  // the confusion cell of apple → banana appears as a label in the heatmap
  const appleAsBanana = predictions.filter(
    (p) => p.label === 'apple' && p.predicted === 'banana',
  ).length;
  assert.ok(appleAsBanana > 0);
  assert.match(charts[3]![0], new RegExp(`>${appleAsBanana}</text>`));

  // the most confident mistakes first, true and predicted labels, 64 px JPEG thumbnails
  const wrong = predictions
    .filter((p) => p.label !== p.predicted)
    .sort((a, b) => b.confidence - a.confidence);
  const figures = [...html.matchAll(/<figure>([\s\S]*?)<\/figure>/g)].map((m) => m[1]!);
  assert.equal(figures.length, Math.min(24, wrong.length));
  figures.forEach((f, i) => {
    assert.match(f, new RegExp(`true <b>${wrong[i]!.label}</b>`));
    assert.match(
      f,
      new RegExp(
        `predicted <b>${wrong[i]!.predicted}</b> \\(${wrong[i]!.confidence.toFixed(3)}\\)`,
      ),
    );
  });
  const missing = `${MISSING_IMAGE}.png`;
  const missingFigure = figures.find((f) => f.includes(`>${missing}</span>`));
  assert.ok(missingFigure, 'the image that is not on disk is among the shown mistakes');
  assert.match(missingFigure, /class="missing"[^>]*>not found</);
  const uris = [...html.matchAll(/<img src="data:image\/jpeg;base64,([^"]+)"/g)].map((m) => m[1]!);
  assert.equal(uris.length, figures.length - 1);
  const meta = await sharp(Buffer.from(uris[0]!, 'base64')).metadata();
  assert.equal(meta.format, 'jpeg');
  assert.equal(Math.max(meta.width!, meta.height!), 64);

  // skipped files escaped, warnings, versions, nested config
  assert.match(html, /bad &lt;name&gt;&amp;\.png<\/td><td[^>]*>unsupported image format/);
  assert.doesNotMatch(html, /bad <name>/);
  assert.match(html, /class &#39;date&#39; has few images/);
  assert.match(
    html,
    new RegExp(`<td>sharp</td><td>${(await import('sharp')).default.versions.sharp}</td>`),
  );
  assert.match(html, /<summary>backboneSpec<\/summary>/);
  assert.match(html, /<td>finetune-raw<\/td>/);
});

test('run report without val-predictions.json still draws the curves and says why the rest is missing', async () => {
  const run = path.join(dir, 'old-run');
  await writeRunFixture(run, { valImages: 4, predictions: false, finetuneEpochs: 0 });
  const html = await readFile(await writeRunReport(run), 'utf8');
  assert.equal([...html.matchAll(/<div class="chart" id="chart-curve-\d">/g)].length, 3);
  assert.doesNotMatch(html, /chart-confusion/);
  assert.doesNotMatch(html, />fine-tune</);
  assert.match(html, /No per-image validation predictions in this run folder/);
});

test('run report draws the averaged weights per epoch where metrics.jsonl carries them', async () => {
  const run = path.join(dir, 'swa-per-epoch');
  const { metrics } = await writeRunFixture(run, { valImages: 4 });
  const write = (lines: readonly object[]) =>
    writeFile(path.join(run, 'metrics.jsonl'), lines.map((l) => `${JSON.stringify(l)}\n`).join(''));
  // Records without per-epoch averaged figures (as runs before they existed wrote) draw no such curve.
  await write(metrics.map(({ val_avg_loss: _l, val_avg_acc: _a, ...m }) => m));
  const plain = await readFile(await writeRunReport(run), 'utf8');
  assert.doesNotMatch(plain, />val \(averaged weights\)</);
  await write(metrics);
  const html = await readFile(await writeRunReport(run), 'utf8');
  const loss = /<div class="chart" id="chart-curve-0">([\s\S]*?)<\/svg>/.exec(html)![1]!;
  assert.match(loss, />val \(averaged weights\)</);
});

test('run report of a broken record names the file', async () => {
  const run = path.join(dir, 'broken');
  await writeRunFixture(run, { valImages: 2 });
  await rm(path.join(run, 'metrics.jsonl'));
  await assert.rejects(writeRunReport(run), {
    message: `${path.join(run, 'metrics.jsonl')}: cannot be read (is this a run or sweep folder?)`,
  });
});

test('sweep report: sortable table, best run highlighted and linked to its written run report, a chart per swept parameter', async () => {
  const sweep = path.join(dir, 'sweep');
  const { bestId, ids } = await writeSweepFixture(sweep);
  assert.equal(bestId, 'lr0.001-h64-s2');
  const file = await writeSweepReport(sweep);
  const html = await readFile(file, 'utf8');
  assertSelfContained(html);
  assert.match(html, /<table id="results" class="sortable">/);
  assert.match(html, /<script>[\s\S]*aria-sort[\s\S]*<\/script>/);
  const rows = tableRows(html, 'results');
  assert.equal(rows.length, ids.length);
  const best = [...html.matchAll(/<tr class="best">([\s\S]*?)<\/tr>/g)];
  assert.equal(best.length, 1);
  const href = `runs/${bestId}/report.html`;
  assert.match(best[0]![1]!, new RegExp(`★ <a href="${href}">${bestId}</a>`));
  assert.match(html, new RegExp(`id="best">Best run: <b><a href="${href}">`));
  // every finished run's report now exists, so each link opens
  for (const id of ids) {
    if (id === FAILED_RUN) continue;
    await access(path.join(sweep, 'runs', id, 'report.html'));
  }
  const failed = rows.find((r) => r.includes(`>${FAILED_RUN}<`) || r.includes(FAILED_RUN))!;
  assert.match(failed, /title="wasm heap exhausted">failed</);
  assert.doesNotMatch(failed, /<a href/);
  // lr and hidden are charted; seed only repeats a configuration
  const charts = [
    ...html.matchAll(/<div class="chart" id="(chart-param-\d)"><svg[\s\S]*?<\/svg>/g),
  ];
  assert.equal(charts.length, 2);
  assert.match(charts[0]![0], /val\.swa\.acc by lr/);
  assert.match(charts[1]![0], /val\.swa\.acc by hidden/);
});

test('sweep figures: parameters and their values, mean and sd over the runs with each value', async () => {
  const sweep = path.join(dir, 'sweep-figures');
  await writeSweepFixture(sweep);
  const records = await readSweepRecords(sweep);
  const params = sweptParams(records.rows);
  assert.deepEqual([...params.keys()], ['lr', 'hidden', 'seed']);
  assert.deepEqual(
    params.get('lr'),
    [...SWEEP_LRS].sort((a, b) => a - b),
  );
  const groups = paramGroups(records.rows, 'lr', params.get('lr')!, records.metric);
  const expected = (lr: number) =>
    SWEEP_HIDDEN.flatMap((h) =>
      SWEEP_SEEDS.flatMap((s) =>
        `lr${lr}-h${h}-s${s}` === FAILED_RUN ? [] : [sweepMetric(lr, h, s)],
      ),
    );
  assert.deepEqual(
    groups.map((g) => g.value),
    ['0.0001', '0.001'],
  );
  assert.deepEqual(groups[0]!.metrics, expected(1e-4));
  assert.equal(groups[0]!.metrics.length, 3, 'the failed run has no figure');
  const { mean, sd } = meanSd([1, 2, 3, 4]);
  assert.equal(mean, 2.5);
  assert.ok(Math.abs(sd - Math.sqrt(5 / 3)) < 1e-12);
  assert.deepEqual(meanSd([0.7]), { mean: 0.7, sd: 0 });
});

test('a sweep metric no row holds is an error naming sweep.json', async () => {
  const sweep = path.join(dir, 'sweep-bad-metric');
  await writeSweepFixture(sweep);
  const file = path.join(sweep, 'sweep.json');
  const json = JSON.parse(await readFile(file, 'utf8'));
  await (await import('node:fs/promises')).writeFile(
    file,
    JSON.stringify({ ...json, metric: 'val.top5' }),
  );
  await assert.rejects(writeSweepReport(sweep), {
    message: `${file}: names metric 'val.top5', which no row of results.jsonl holds (expected val.acc, val.loss or a path such as val.raw.acc, val.swa.acc, test.acc)`,
  });
});

test('writeReport tells runs from sweeps and names a folder that is neither', async () => {
  const run = path.join(dir, 'kind-run');
  await writeRunFixture(run, { valImages: 2 });
  assert.deepEqual(await writeReport(run), { kind: 'run', file: path.join(run, 'report.html') });
  const empty = path.join(dir, 'kind-run', 'images');
  await assert.rejects(writeReport(empty), {
    message: `${empty}: is neither a run folder (no summary.json) nor a sweep folder (no sweep.json)`,
  });
});

test('finetune report writes a run report again and fails on a folder that is neither', async () => {
  const run = path.join(dir, 'cli-run');
  await writeRunFixture(run, { valImages: 2 });
  const ok = await runCli(['report', run], dir);
  assert.equal(ok.code, 0, ok.stderr);
  assert.equal(ok.stdout.trim(), `run report: ${path.join(run, 'report.html')}`);
  await access(path.join(run, 'report.html'));
  const bad = await runCli(['report', path.join(run, 'images')], dir);
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /is neither a run folder/);
});
