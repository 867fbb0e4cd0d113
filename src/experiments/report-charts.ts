import { createRequire } from 'node:module';
import type { CustomSeriesRenderItem, EChartsOption, SeriesOption } from 'echarts';

type EChartsModule = typeof import('echarts');
let echartsModule: EChartsModule | null = null;

/**
 * ECharts is loaded on first use, so commands that draw no chart do not pay for it, and
 * as its single-file CommonJS bundle: about 3× faster to load than its ES modules (0.4 s
 * vs 1.5 s here), which dominated the time of a first report.
 */
function loadECharts(): EChartsModule {
  echartsModule ??= createRequire(import.meta.url)('echarts') as EChartsModule;
  return echartsModule;
}

/**
 * Renders one chart to an SVG string with ECharts' server-side SVG renderer (no DOM, no
 * animation), ready to inline into a page.
 */
export async function renderChart(
  option: EChartsOption,
  width: number,
  height: number,
): Promise<string> {
  const echarts = loadECharts();
  const chart = echarts.init(null, null, { renderer: 'svg', ssr: true, width, height });
  try {
    chart.setOption({ animation: false, ...option });
    return chart.renderToSVGString();
  } finally {
    chart.dispose();
  }
}

/** Title on top, legend under it, the y axis named along its side: nothing overlaps. */
const TITLE = { left: 'center', top: 4, textStyle: { fontSize: 14 } } as const;
const LEGEND_TOP = 30;
const GRID = { left: 72, right: 24, top: 72, bottom: 48 } as const;
function yName(name: string) {
  return { name, nameLocation: 'middle', nameGap: 52, nameRotate: 90 } as const;
}

/** Axis labels without float noise: 0.0001 rather than 0.00009999999999999999. */
function tick(v: number): string {
  if (v === 0) return '0';
  return Math.abs(v) < 1e-3 ? v.toExponential(0) : String(Number(v.toPrecision(4)));
}

const PALETTE = ['#2f6db5', '#e07b39', '#3a9e5d', '#9b59b6', '#c0392b', '#7f8c8d'];

export interface EpochSeries {
  readonly name: string;
  /** [epoch, value]; epochs count on across stages (fine-tune epoch 1 follows the last head epoch). */
  readonly points: readonly (readonly [number, number])[];
  /** `point`: single figures (the averaged weights at a stage's end) drawn as markers. */
  readonly kind?: 'line' | 'point';
}

export interface EpochMarks {
  /** Where each stage's averaging takes its first snapshot. */
  readonly swaStarts: readonly { readonly x: number; readonly stage: string }[];
  /** The epochs of the fine-tune stage. */
  readonly finetune: { readonly from: number; readonly to: number } | null;
}

/**
 * A per-epoch chart: one line per series over the run's epochs, the SWA starts as dashed
 * vertical lines (markLine) and the fine-tune stage as a shaded band (markArea).
 */
export function epochChartOption(
  title: string,
  yLabel: string,
  series: readonly EpochSeries[],
  marks: EpochMarks,
  options: { logY?: boolean } = {},
): EChartsOption {
  const xs = series.flatMap((s) => s.points.map((p) => p[0]));
  const out: SeriesOption[] = series.map((s, i) =>
    s.kind === 'point'
      ? {
          type: 'scatter',
          name: s.name,
          data: s.points.map((p) => [...p]),
          symbol: 'diamond',
          symbolSize: 12,
          itemStyle: { color: PALETTE[i % PALETTE.length]! },
        }
      : {
          type: 'line',
          name: s.name,
          data: s.points.map((p) => [...p]),
          showSymbol: s.points.length <= 20,
          lineStyle: { width: 2 },
          itemStyle: { color: PALETTE[i % PALETTE.length]! },
        },
  );
  const first = out[0] as Record<string, unknown> | undefined;
  if (first) {
    first['markLine'] = {
      silent: true,
      symbol: 'none',
      lineStyle: { type: 'dashed', color: '#555' },
      label: { formatter: '{b}', position: 'insideMiddleTop', color: '#333' },
      data: marks.swaStarts.map((m) => ({ name: `SWA starts (${m.stage})`, xAxis: m.x })),
    };
    if (marks.finetune) {
      first['markArea'] = {
        silent: true,
        itemStyle: { color: 'rgba(120, 160, 230, 0.15)' },
        label: { position: 'insideTop', color: '#335' },
        data: [
          [
            { name: 'fine-tune', xAxis: marks.finetune.from - 0.5 },
            { xAxis: marks.finetune.to + 0.5 },
          ],
        ],
      };
    }
  }
  return {
    title: { text: title, ...TITLE },
    legend: { top: LEGEND_TOP, data: series.map((s) => s.name) },
    grid: GRID,
    xAxis: {
      type: 'value',
      name: 'epoch',
      nameLocation: 'middle',
      nameGap: 28,
      min: xs.length ? Math.min(...xs) - 0.5 : 0,
      max: xs.length ? Math.max(...xs) + 0.5 : 1,
      minInterval: 1,
      axisLabel: { formatter: (v: number) => (Number.isInteger(v) ? String(v) : '') },
    },
    yAxis: {
      ...(options.logY ? { type: 'log', logBase: 10 } : { type: 'value', scale: true }),
      ...yName(yLabel),
      axisLabel: { formatter: tick },
    },
    series: out,
  };
}

/** The confusion matrix as a heatmap: rows true classes (first at the top), columns predicted. */
export function confusionChartOption(
  labels: readonly string[],
  confusion: readonly (readonly number[])[],
): EChartsOption {
  const max = Math.max(1, ...confusion.flat());
  const data = confusion.flatMap((row, t) =>
    row.map((count, p) => ({
      value: [p, t, count],
      label: { color: count > max / 2 ? '#fff' : '#222' },
    })),
  );
  return {
    title: { text: 'Confusion matrix (validation)', ...TITLE },
    grid: { left: 120, right: 24, top: 40, bottom: 90 },
    xAxis: {
      type: 'category',
      data: [...labels],
      name: 'predicted',
      nameLocation: 'middle',
      nameGap: 70,
      axisLabel: { rotate: 40, interval: 0 },
      splitArea: { show: true },
    },
    yAxis: {
      type: 'category',
      data: [...labels],
      name: 'true',
      nameLocation: 'middle',
      nameGap: 100,
      nameRotate: 90,
      inverse: true,
      axisLabel: { interval: 0 },
      splitArea: { show: true },
    },
    visualMap: {
      show: false,
      min: 0,
      max,
      inRange: { color: ['#f4f8fc', '#08306b'] },
    },
    series: [
      {
        type: 'heatmap',
        name: 'images',
        data,
        label: { show: true, fontSize: 11 },
        itemStyle: { borderColor: '#fff', borderWidth: 1 },
      },
    ],
  };
}

/** A swept value and the metric of every finished run that had it. */
export interface ParamGroup {
  readonly value: string;
  readonly metrics: readonly number[];
}

/** Mean and sample standard deviation (0 for a single value). */
export function meanSd(values: readonly number[]): { mean: number; sd: number } {
  const n = values.length;
  const mean = values.reduce((a, b) => a + b, 0) / n;
  const sd = n > 1 ? Math.sqrt(values.reduce((a, v) => a + (v - mean) ** 2, 0) / (n - 1)) : 0;
  return { mean, sd };
}

/**
 * The metric against one swept parameter: every run as a dot, the mean per value as a
 * line, ± one standard deviation over the runs with that value as error bars (a custom
 * series, drawn by ECharts like any other).
 */
export function paramChartOption(
  param: string,
  metric: string,
  groups: readonly ParamGroup[],
): EChartsOption {
  const stats = groups.map((g) => meanSd(g.metrics));
  const renderBar: CustomSeriesRenderItem = (_params, api) => {
    const x = api.value(0) as number;
    const lo = api.coord([x, api.value(1) as number]);
    const hi = api.coord([x, api.value(2) as number]);
    const cap = 6;
    const style = { stroke: '#2f6db5', lineWidth: 1.5 };
    return {
      type: 'group',
      children: [
        { type: 'line', shape: { x1: lo[0]!, y1: lo[1]!, x2: hi[0]!, y2: hi[1]! }, style },
        {
          type: 'line',
          shape: { x1: lo[0]! - cap, y1: lo[1]!, x2: lo[0]! + cap, y2: lo[1]! },
          style,
        },
        {
          type: 'line',
          shape: { x1: hi[0]! - cap, y1: hi[1]!, x2: hi[0]! + cap, y2: hi[1]! },
          style,
        },
      ],
    };
  };
  return {
    title: { text: `${metric} by ${param}`, ...TITLE },
    legend: { top: LEGEND_TOP, data: ['mean', '± 1 sd', 'runs'] },
    grid: GRID,
    xAxis: {
      type: 'category',
      data: groups.map((g) => g.value),
      name: param,
      nameLocation: 'middle',
      nameGap: 28,
    },
    yAxis: { type: 'value', scale: true, ...yName(metric), axisLabel: { formatter: tick } },
    series: [
      {
        type: 'line',
        name: 'mean',
        data: stats.map((s) => s.mean),
        symbolSize: 8,
        itemStyle: { color: '#2f6db5' },
      },
      {
        type: 'custom',
        name: '± 1 sd',
        renderItem: renderBar,
        itemStyle: { color: '#2f6db5' },
        data: stats.map((s, i) => [i, s.mean - s.sd, s.mean + s.sd]),
        z: 1,
      },
      {
        type: 'scatter',
        name: 'runs',
        data: groups.flatMap((g, i) => g.metrics.map((m) => [i, m])),
        symbolSize: 6,
        itemStyle: { color: '#e07b39', opacity: 0.7 },
      },
    ],
  };
}
