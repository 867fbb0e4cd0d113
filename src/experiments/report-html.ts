import { readFile } from 'node:fs/promises';
import { fileError } from '../errors.js';

/** The file every report is written to, in the run or sweep folder. */
export const REPORT_FILE = 'report.html';

const ESCAPES: Readonly<Record<string, string>> = {
  '&': '&amp;',
  '<': '&lt;',
  '>': '&gt;',
  '"': '&quot;',
  "'": '&#39;',
};

/** Text made safe for HTML content and attribute values. */
export function esc(value: unknown): string {
  return String(value ?? '').replace(/[&<>"']/g, (c) => ESCAPES[c]!);
}

/** A figure for a table cell: fixed digits, or an en dash when absent. */
export function num(value: number | null | undefined, digits = 4): string {
  return typeof value === 'number' && Number.isFinite(value) ? value.toFixed(digits) : '–';
}

/** A cell holding a count (figures get four digits; counts none). */
export function count(n: number | null | undefined): Cell {
  return typeof n === 'number' ? { html: String(n), sort: n } : { html: '–', sort: null };
}

/** A cell; `sort` is what the sortable table compares (absent: the text). */
export interface Cell {
  readonly html: string;
  readonly sort?: string | number | null;
  readonly className?: string;
}

export type CellInput = Cell | string | number | null | undefined;

function cell(c: CellInput): Cell {
  if (c === null || c === undefined) return { html: '–', sort: null };
  if (typeof c === 'number') return { html: num(c), sort: Number.isNaN(c) ? null : c };
  if (typeof c === 'string') return { html: esc(c) };
  return c;
}

/**
 * An HTML table. `sortable` tables sort on a header click (the page's inline script);
 * each cell's `data-sort` holds what is compared, empty for a missing value.
 */
export function htmlTable(
  headers: readonly string[] | null,
  rows: readonly (readonly CellInput[])[],
  options: {
    sortable?: boolean;
    id?: string;
    rowClass?: (i: number) => string | null;
    /** Rows that stay below the others when the table sorts (totals, averages). */
    footer?: readonly (readonly CellInput[])[];
  } = {},
): string {
  const head = headers
    ? `<thead><tr>${headers.map((h) => `<th scope="col">${esc(h)}</th>`).join('')}</tr></thead>`
    : '';
  const renderRows = (
    list: readonly (readonly CellInput[])[],
    sortable: boolean,
    rowClass?: (i: number) => string | null,
  ) =>
    list.map((r, i) => {
      const cls = rowClass?.(i);
      const cells = r
        .map((input) => {
          const c = cell(input);
          const sort = sortable && c.sort !== undefined ? ` data-sort="${esc(c.sort ?? '')}"` : '';
          const klass = c.className ? ` class="${esc(c.className)}"` : '';
          return `<td${sort}${klass}>${c.html}</td>`;
        })
        .join('');
      return `<tr${cls ? ` class="${esc(cls)}"` : ''}>${cells}</tr>`;
    });
  const body = renderRows(rows, Boolean(options.sortable), options.rowClass).join('\n');
  const foot = options.footer?.length
    ? `<tfoot>${renderRows(options.footer, false).join('\n')}</tfoot>`
    : '';
  const attrs = [
    options.id ? `id="${esc(options.id)}"` : '',
    options.sortable ? 'class="sortable"' : '',
  ]
    .filter(Boolean)
    .join(' ');
  return `<table${attrs ? ` ${attrs}` : ''}>${head}<tbody>\n${body}\n</tbody>${foot}</table>`;
}

/** Two-column table of names and values. */
export function keyValueTable(entries: readonly (readonly [string, CellInput])[]): string {
  return htmlTable(null, entries);
}

/**
 * Sorts a `table.sortable` on a header click: numbers as numbers, text by locale,
 * missing values last in either direction; `aria-sort` says the current order.
 */
const SORT_SCRIPT = `
for (const table of document.querySelectorAll('table.sortable')) {
  const heads = [...table.tHead.rows[0].cells];
  heads.forEach((th, col) => th.addEventListener('click', () => {
    const dir = th.getAttribute('aria-sort') === 'ascending' ? 'descending' : 'ascending';
    for (const h of heads) h.removeAttribute('aria-sort');
    th.setAttribute('aria-sort', dir);
    const key = (row) => {
      const c = row.cells[col];
      const v = c.dataset.sort ?? c.textContent.trim();
      if (v === '') return null;
      const n = Number(v);
      return Number.isNaN(n) ? v : n;
    };
    const body = table.tBodies[0];
    const rows = [...body.rows].sort((a, b) => {
      const x = key(a), y = key(b);
      if (x === null || y === null) return x === y ? 0 : x === null ? 1 : -1;
      const c = typeof x === 'number' && typeof y === 'number' ? x - y : String(x).localeCompare(String(y));
      return dir === 'ascending' ? c : -c;
    });
    body.append(...rows);
  }));
}`;

const STYLE = `
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1100px; padding: 0 16px; color: #1d1d1f; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 32px; border-bottom: 1px solid #ddd; }
.sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; } tfoot td { font-style: italic; }
#results td, #results th { white-space: nowrap; } th, td { padding: 3px 10px; text-align: left; border-bottom: 1px solid #eee; }
td { font-variant-numeric: tabular-nums; }
table.sortable th { cursor: pointer; user-select: none; white-space: nowrap; }
table.sortable th[aria-sort=ascending]::after { content: ' ▲'; } table.sortable th[aria-sort=descending]::after { content: ' ▼'; }
tr.best { background: #fff4c2; font-weight: 600; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; } .card { border: 1px solid #ddd; border-radius: 6px; padding: 8px 14px; }
.card b { display: block; font-size: 20px; }
.charts { display: flex; flex-wrap: wrap; gap: 8px; } .chart svg { display: block; }
.thumbs { display: flex; flex-wrap: wrap; gap: 10px; }
.thumbs figure { margin: 0; width: 120px; font-size: 12px; } .thumbs img { display: block; border: 2px solid #c0392b; }
.missing { width: 64px; height: 64px; background: #eee; display: flex; align-items: center; justify-content: center; color: #888; }
pre { background: #f6f6f6; padding: 10px; overflow: auto; max-height: 480px; }
.note { color: #666; }`;

/**
 * A whole page. The Content-Security-Policy lets the page load nothing: images are data
 * URIs, charts are inline SVG, the only script is inline, so it opens offline from file://.
 */
export function htmlPage(title: string, body: string, options: { script?: boolean } = {}): string {
  return `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>${esc(title)}</title>
<style>${STYLE}</style>
</head>
<body>
${body}
${options.script ? `<script>${SORT_SCRIPT}</script>` : ''}
</body>
</html>
`;
}

/** Reads a JSON record; a missing or broken file names itself. */
export async function readJsonRecord<T>(file: string): Promise<T> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (err) {
    throw fileError(file, 'cannot be read (is this a run or sweep folder?)', err);
  }
  try {
    return JSON.parse(text) as T;
  } catch (err) {
    throw fileError(file, `is not valid JSON (${(err as Error).message})`, err);
  }
}

/** Reads a JSON-lines record (blank lines ignored); a bad line is named by its number. */
export async function readJsonLines<T>(file: string): Promise<T[]> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (err) {
    throw fileError(file, 'cannot be read (is this a run or sweep folder?)', err);
  }
  const rows: T[] = [];
  text.split('\n').forEach((line, i) => {
    if (!line.trim()) return;
    try {
      rows.push(JSON.parse(line) as T);
    } catch (err) {
      throw fileError(file, `line ${i + 1} is not valid JSON (${(err as Error).message})`, err);
    }
  });
  return rows;
}
