import assert from 'node:assert/strict';
import { access, mkdir } from 'node:fs/promises';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { pathToFileURL } from 'node:url';
import { type BrowserContext, chromium, type Page } from 'playwright-core';
import { writeRunReport, writeSweepReport } from '../../src/experiments/report.js';
import { writeRunFixture, writeSweepFixture } from '../experiments/report-fixtures.js';
import { ROOT, tempDir } from '../helpers.js';

// The reports opened in a real headless browser from file://, with no network: Debian's
// chromium driven by playwright-core (which downloads no browser of its own).
const CHROMIUM = '/usr/bin/chromium';
/** Screenshots stay after the run, for a person to look at. */
const OUTPUT = path.join(ROOT, 'dist', 'test-output', 'report-browser');

let dir: string;
let cleanup: () => Promise<void>;
let context: BrowserContext;

before(async () => {
  try {
    await access(CHROMIUM);
  } catch {
    assert.fail(
      `${CHROMIUM} is missing: the report browser test needs Debian's chromium (apt-get install -y chromium; .ci/run installs it)`,
    );
  }
  ({ dir, cleanup } = await tempDir('report-browser'));
  await mkdir(OUTPUT, { recursive: true });
  // A fresh profile per run: nothing cached or remembered from another run.
  context = await chromium.launchPersistentContext(path.join(dir, 'profile'), {
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
    viewport: { width: 1200, height: 900 },
  });
});
after(async () => {
  await context?.close();
  await cleanup?.();
});

interface Opened {
  readonly page: Page;
  readonly errors: string[];
  readonly requests: string[];
}

/** Opens a report and records console errors, page errors and every request but the page itself. */
async function open(file: string): Promise<Opened> {
  const page = await context.newPage();
  const errors: string[] = [];
  const requests: string[] = [];
  const url = pathToFileURL(file).href;
  page.on('console', (m) => {
    if (m.type() === 'error') errors.push(m.text());
  });
  page.on('pageerror', (e) => errors.push(e.message));
  page.on('request', (r) => {
    if (r.url() !== url) requests.push(r.url());
  });
  await page.goto(url, { waitUntil: 'load' });
  return { page, errors, requests };
}

/** Each chart's SVG: its drawn size and how many shapes it holds. */
async function charts(page: Page) {
  return page.$$eval('.chart > svg', (svgs) =>
    svgs.map((svg) => {
      const box = svg.getBoundingClientRect();
      return {
        id: svg.parentElement!.id,
        width: box.width,
        height: box.height,
        paths: svg.querySelectorAll('path').length,
        shapes: svg.querySelectorAll('path, rect').length,
        text: svg.textContent ?? '',
      };
    }),
  );
}

test('run report in chromium: no errors, no requests, every chart drawn, thumbnails decoded, tables sort', async () => {
  const run = path.join(dir, 'run');
  await writeRunFixture(run, { valImages: 60 });
  const { page, errors, requests } = await open(await writeRunReport(run));
  try {
    const drawn = await charts(page);
    assert.deepEqual(
      drawn.map((c) => c.id),
      ['chart-curve-0', 'chart-curve-1', 'chart-curve-2', 'chart-confusion'],
    );
    for (const c of drawn) {
      assert.ok(c.width > 200 && c.height > 200, `${c.id} is drawn at ${c.width}×${c.height}`);
      assert.ok(c.paths > 5, `${c.id} has ${c.paths} paths`);
    }
    assert.match(drawn[0]!.text, /SWA starts \(head\)/);
    assert.match(drawn[0]!.text, /fine-tune/);
    const images = await page.$$eval('.thumbs img', (imgs) =>
      imgs.map((i) => (i as unknown as { naturalWidth: number }).naturalWidth),
    );
    assert.ok(images.length > 10);
    for (const w of images) assert.ok(w > 0 && w <= 64, `thumbnail ${w} px wide`);

    // the per-class table sorts by F1 on a click, then the other way on a second click
    const f1 = () =>
      page.$$eval('#per-class tbody tr td:nth-child(4)', (tds) =>
        tds.map((td) => Number(td.getAttribute('data-sort'))),
      );
    await page.click('#per-class th:nth-child(4)');
    const up = await f1();
    assert.deepEqual(
      up,
      [...up].sort((a, b) => a - b),
    );
    assert.equal(await page.getAttribute('#per-class th:nth-child(4)', 'aria-sort'), 'ascending');
    await page.click('#per-class th:nth-child(4)');
    const down = await f1();
    assert.deepEqual(down, [...up].reverse());

    await page.screenshot({ path: path.join(OUTPUT, 'run-report.png'), fullPage: true });
    assert.deepEqual(errors, []);
    assert.deepEqual(requests, []);
  } finally {
    await page.close();
  }
});

test('sweep report in chromium: sorts on a header click, best run linked, parameter charts drawn', async () => {
  const sweep = path.join(dir, 'sweep');
  const { bestId } = await writeSweepFixture(sweep);
  const { page, errors, requests } = await open(await writeSweepReport(sweep));
  try {
    const drawn = await charts(page);
    assert.equal(drawn.length, 2);
    for (const c of drawn) {
      assert.ok(c.width > 200 && c.height > 200, `${c.id} is drawn at ${c.width}×${c.height}`);
      assert.ok(c.shapes > 5, `${c.id} has ${c.shapes} shapes`);
    }
    const column = async (n: number) =>
      page.$$eval(`#results tbody tr td:nth-child(${n})`, (tds) =>
        tds.map((td) => td.getAttribute('data-sort') ?? ''),
      );
    const headers = await page.$$eval('#results th', (ths) => ths.map((t) => t.textContent));
    const metricCol = headers.indexOf('val.swa.acc') + 1;
    assert.ok(metricCol > 0);
    await page.click(`#results th:nth-child(${metricCol})`);
    await page.click(`#results th:nth-child(${metricCol})`);
    const desc = await column(metricCol);
    const figures = desc.filter((v) => v !== '').map(Number);
    assert.deepEqual(
      figures,
      [...figures].sort((a, b) => b - a),
    );
    assert.equal(desc.at(-1), '', 'the failed run, without a figure, sorts last');
    // highest first: the best run heads the table, highlighted, linking to its report
    const first = page.locator('#results tbody tr').first();
    assert.equal(await first.getAttribute('class'), 'best');
    const href = await first.locator('a').getAttribute('href');
    assert.equal(href, `runs/${bestId}/report.html`);
    await access(path.join(sweep, href!));

    // text columns sort too
    const idCol = 1;
    await page.click(`#results th:nth-child(${idCol})`);
    const ids = await column(idCol);
    assert.deepEqual(
      ids,
      [...ids].sort((a, b) => a.localeCompare(b)),
    );

    await page.screenshot({ path: path.join(OUTPUT, 'sweep-report.png'), fullPage: true });
    assert.deepEqual(errors, []);
    assert.deepEqual(requests, []);

    // the link opens the run's report, itself without errors or requests
    const linked = await open(path.join(sweep, href!));
    try {
      assert.equal((await charts(linked.page)).length, 4);
      assert.deepEqual(linked.errors, []);
      assert.deepEqual(linked.requests, []);
    } finally {
      await linked.page.close();
    }
  } finally {
    await page.close();
  }
});
