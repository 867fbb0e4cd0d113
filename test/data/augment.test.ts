import assert from 'node:assert/strict';
import { test } from 'node:test';
import { type AugmentPlan, applyAugment, augmentPlan } from '../../src/data/augment.js';

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
        out[o + k] = Math.max(0, Math.min(255, Math.round(v * plan.brightness)));
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
