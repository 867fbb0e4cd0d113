import type { Writable } from 'node:stream';
import { MultiBar, Presets, type SingleBar } from 'cli-progress';

/** Where the CLI writes: results on stdout, progress and warnings on stderr. */
export interface Output {
  readonly quiet: boolean;
  readonly json: boolean;
  /** Progress and notices (stderr); silent with --quiet or --json. */
  info(line: string): void;
  /** Warnings and skipped files (stderr); silent only with --quiet. */
  warn(line: string): void;
  /** Results (stdout). */
  result(text: string): void;
  progress(label: string, done: number, total: number): void;
  endProgress(): void;
}

function formatSeconds(s: number): string {
  if (!Number.isFinite(s)) return '--:--';
  const m = Math.floor(s / 60);
  return `${m}:${String(Math.round(s % 60)).padStart(2, '0')}`;
}

export function createOutput(
  options: { quiet?: boolean; json?: boolean },
  stderr: Writable = process.stderr,
): Output {
  const quiet = Boolean(options.quiet);
  const json = Boolean(options.json);
  const tty = Boolean((stderr as { isTTY?: boolean }).isTTY);
  let started = 0;
  let lastLabel = '';
  let lastPrinted = -1;
  // On a terminal: one cli-progress bar; lines printed meanwhile go above it (MultiBar.log).
  let bars: MultiBar | null = null;
  let bar: SingleBar | null = null;
  /** Prints a line above the bar at once (MultiBar.log alone waits for the next redraw). */
  const above = (line: string): void => {
    bars!.log(`${line}\n`);
    bars!.update();
  };
  const closeBar = (): void => {
    bars?.stop();
    bars = null;
    bar = null;
  };
  return {
    quiet,
    json,
    info(line) {
      if (quiet || json) return;
      if (bars) above(line);
      else stderr.write(`${line}\n`);
    },
    warn(line) {
      if (quiet) return;
      if (bars) above(line);
      else stderr.write(`${line}\n`);
    },
    result(text) {
      closeBar();
      process.stdout.write(text.endsWith('\n') ? text : `${text}\n`);
    },
    progress(label, done, total) {
      if (quiet || json) return;
      if (label !== lastLabel) {
        closeBar();
        started = performance.now();
        lastLabel = label;
        lastPrinted = -1;
      }
      const elapsed = (performance.now() - started) / 1000;
      // A rate over the first fraction of a second says nothing (and a cache hit is instant).
      const rate = elapsed >= 0.25 ? done / elapsed : Number.NaN;
      const shown = Number.isFinite(rate) ? `${rate.toFixed(0)}/s` : '--/s';
      if (tty) {
        if (!bars) {
          bars = new MultiBar(
            {
              stream: stderr,
              format: `${label} [{bar}] {value}/{total} {rate} ETA {eta_formatted}`,
              barsize: 28,
              hideCursor: true,
              clearOnComplete: false,
              etaBuffer: 50,
            },
            Presets.legacy,
          );
          bar = bars.create(total, done, { rate: shown });
        }
        bar!.setTotal(total);
        bar!.update(done, { rate: shown });
        return;
      }
      const pct = total ? Math.floor((100 * done) / total) : 100;
      if (Math.floor(pct / 10) !== lastPrinted || done === total) {
        // Without a terminal, a line per 10% keeps logs short.
        lastPrinted = Math.floor(pct / 10);
        const eta = done && Number.isFinite(rate) ? (total - done) / rate : Number.NaN;
        stderr.write(`${label} ${done}/${total} (${pct}%) ${shown} ETA ${formatSeconds(eta)}\n`);
      }
    },
    endProgress() {
      closeBar();
    },
  };
}

/** A plain text table with left-aligned columns. */
export function table(rows: readonly (readonly string[])[]): string {
  const widths = rows[0]!.map((_, c) => Math.max(...rows.map((r) => (r[c] ?? '').length)));
  return rows
    .map((r) =>
      r
        .map((cell, c) => cell.padEnd(widths[c]!))
        .join('  ')
        .trimEnd(),
    )
    .join('\n');
}

export function csvCell(value: string): string {
  return /[",\n]/.test(value) ? `"${value.replace(/"/g, '""')}"` : value;
}
