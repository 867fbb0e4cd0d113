import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  type AugmentPlan,
  applyAugment,
  augmentPlan,
  type CropRanges,
  cropRangesId,
  DEFAULT_CROP,
  parseRange,
} from '../../src/data/augment.js';
import { resolveTrainOptions } from '../../src/train/options.js';

/** Crop boxes of many images' views under `ranges`. */
function boxes(ranges: CropRanges, n = 2000): (readonly [number, number, number, number])[] {
  return Array.from({ length: n }, (_, i) => {
    const key = ((i * 2654435761) >>> 0).toString(16).padStart(8, '0');
    return augmentPlan(['crop'], 7, i % 5, key, ranges).crop!;
  });
}

test('the crop is drawn as RandomResizedCrop: area and ratio within the ranges, box inside the image', () => {
  for (const ranges of [DEFAULT_CROP, { scale: [0.3, 0.6], ratio: [0.5, 2] }] as CropRanges[]) {
    const all = boxes(ranges);
    for (const [x, y, w, h] of all) {
      assert.ok(x >= 0 && y >= 0 && x + w <= 1 + 1e-12 && y + h <= 1 + 1e-12);
      // Redrawn, not clamped: every box keeps an area and a ratio from the ranges.
      assert.ok(
        w * h >= ranges.scale[0] - 1e-9 && w * h <= ranges.scale[1] + 1e-9,
        `area ${w * h}`,
      );
      assert.ok(
        w / h >= ranges.ratio[0] - 1e-9 && w / h <= ranges.ratio[1] + 1e-9,
        `ratio ${w / h}`,
      );
    }
    // The draws cover the ranges (not one fixed box).
    const areas = all.map(([, , w, h]) => w * h);
    const span = ranges.scale[1] - ranges.scale[0];
    assert.ok(Math.min(...areas) < ranges.scale[0] + 0.1 * span);
    assert.ok(Math.max(...areas) > ranges.scale[1] - 0.1 * span);
  }
});

test('when no draw fits, the centre crop clamped to the ratio range (torchvision fallback)', () => {
  // Ratios of 2–3 with areas of 0.9–1 never fit a square: width would exceed it.
  const [x, y, w, h] = boxes({ scale: [0.9, 1], ratio: [2, 3] }, 1)[0]!;
  assert.deepEqual([x, y, w, h], [0, 0.25, 1, 0.5]);
  const [x2, y2, w2, h2] = boxes({ scale: [0.9, 1], ratio: [0.25, 0.5] }, 1)[0]!;
  assert.deepEqual([x2, y2, w2, h2], [0.25, 0, 0.5, 1]);
});

test('the same seed, view and image give the same crop; the ranges change it', () => {
  const a = augmentPlan(['flip', 'crop'], 3, 1, 'deadbeef');
  assert.deepEqual(augmentPlan(['flip', 'crop'], 3, 1, 'deadbeef', DEFAULT_CROP), a);
  assert.notDeepEqual(
    augmentPlan(['flip', 'crop'], 3, 1, 'deadbeef', { scale: [0.1, 0.2], ratio: [1, 1] }).crop,
    a.crop,
  );
  assert.equal(cropRangesId(DEFAULT_CROP), '');
  assert.equal(cropRangesId({ scale: [0.5, 1], ratio: [1, 1] }), ':crop0.5-1x1-1');
});

test('--crop-scale and --crop-ratio: parsed, checked, and refused without crop in --augment', () => {
  assert.deepEqual(parseRange('cropScale', '0.08, 1'), [0.08, 1]);
  assert.deepEqual(parseRange('cropRatio', [0.5, 2]), [0.5, 2]);
  for (const bad of ['0,1', '0.9,0.5', '0.5,1.5', '0.5', 'a,b', '0.2,0.4,0.6'])
    assert.throws(() => parseRange('cropScale', bad), /for cropScale but received/);
  assert.throws(() => parseRange('cropRatio', '-1,2'), /for cropRatio/);
  const base = { data: 'photos', finetuneEpochs: 2 };
  const r = resolveTrainOptions({ ...base, augment: 'flip,crop', cropScale: '0.5,1' });
  assert.deepEqual(r.cropScale, [0.5, 1]);
  assert.deepEqual(r.cropRatio, [...DEFAULT_CROP.ratio]);
  assert.throws(
    () => resolveTrainOptions({ ...base, augment: 'flip', cropScale: '0.5,1' }),
    /cropScale needs crop in augment/,
  );
  assert.throws(
    () => resolveTrainOptions({ ...base, augment: 'crop', cropRatio: '2,1' }),
    /Expected LO,HI with 0 < LO ≤ HI \(width \/ height\) for cropRatio/,
  );
});

/** applyAugment's per-pixel mapping as it was before the axis-aligned path: the reference. */
function perPixel(pixels: Uint8Array, size: number, plan: AugmentPlan): Uint8Array {
  const out = new Uint8Array(pixels.length);
  const [cx0, cy0, cw, ch] = plan.crop ?? [0, 0, 1, 1];
  const rad = (plan.angle * Math.PI) / 180;
  const cos = Math.cos(rad);
  const sin = Math.sin(rad);
  const c = (size - 1) / 2;
  for (let y = 0; y < size; y++) {
    for (let x = 0; x < size; x++) {
      const xf = plan.flip ? size - 1 - x : x;
      const dx = xf - c;
      const dy = y - c;
      const rx = cos * dx - sin * dy + c;
      const ry = sin * dx + cos * dy + c;
      const sx = (cx0 + (cw * (rx + 0.5)) / size) * size - 0.5;
      const sy = (cy0 + (ch * (ry + 0.5)) / size) * size - 0.5;
      const o = (y * size + x) * 3;
      if (sx < -0.5 || sy < -0.5 || sx > size - 0.5 || sy > size - 0.5) continue;
      const x0 = Math.max(0, Math.min(size - 1, Math.floor(sx)));
      const y0 = Math.max(0, Math.min(size - 1, Math.floor(sy)));
      const x1 = Math.min(size - 1, x0 + 1);
      const y1 = Math.min(size - 1, y0 + 1);
      const ax = Math.max(0, Math.min(1, sx - x0));
      const ay = Math.max(0, Math.min(1, sy - y0));
      for (let k = 0; k < 3; k++) {
        const p00 = pixels[(y0 * size + x0) * 3 + k]!;
        const p01 = pixels[(y0 * size + x1) * 3 + k]!;
        const p10 = pixels[(y1 * size + x0) * 3 + k]!;
        const p11 = pixels[(y1 * size + x1) * 3 + k]!;
        const v = (p00 * (1 - ax) + p01 * ax) * (1 - ay) + (p10 * (1 - ax) + p11 * ax) * ay;
        out[o + k] = Math.max(0, Math.min(255, Math.floor(v * plan.brightness + 0.5)));
      }
    }
  }
  return out;
}

test('flip, crop and brightness without rotation: the same pixels as the per-pixel mapping', () => {
  for (const size of [7, 32, 224]) {
    const pixels = Uint8Array.from({ length: size * size * 3 }, (_, i) => (i * 7919 + 13) % 256);
    const plans: AugmentPlan[] = [
      { flip: false, crop: null, angle: 0, brightness: 1 },
      { flip: true, crop: null, angle: 0, brightness: 1 },
      { flip: true, crop: [0.05, 0.1, 0.9, 0.85], angle: 0, brightness: 1.17 },
      ...Array.from({ length: 20 }, (_, v) =>
        augmentPlan(['flip', 'crop', 'brightness'], 3, v, (v * 2654435761).toString(16)),
      ),
      // Brightness 1 takes its own (unclamped) branch.
      ...Array.from({ length: 10 }, (_, v) =>
        augmentPlan(['flip', 'crop'], 5, v, (v * 2654435761).toString(16)),
      ),
    ];
    for (const plan of plans) {
      assert.equal(plan.angle, 0);
      assert.deepEqual(
        applyAugment(pixels, size, plan),
        perPixel(pixels, size, plan),
        JSON.stringify(plan),
      );
    }
  }
});

test('with rotation the general mapping still runs', () => {
  const size = 16;
  const pixels = Uint8Array.from({ length: size * size * 3 }, (_, i) => (i * 31) % 256);
  const plan: AugmentPlan = { flip: true, crop: [0.1, 0, 0.8, 0.9], angle: 12.5, brightness: 0.9 };
  assert.deepEqual(applyAugment(pixels, size, plan), perPixel(pixels, size, plan));
});
