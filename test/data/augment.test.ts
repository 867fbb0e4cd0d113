import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
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
