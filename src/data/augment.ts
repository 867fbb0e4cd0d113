import { invalidOption } from '../errors.js';
import { seededRandom } from '../util/random.js';

/** Pixel-space augmentations for the fine-tune stage. */
export type AugmentKind = 'flip' | 'crop' | 'rotate' | 'brightness';
export const AUGMENT_KINDS: readonly AugmentKind[] = ['flip', 'crop', 'rotate', 'brightness'];

/**
 * Parses `--augment flip,crop,rotate,brightness` (order does not matter; duplicates
 * are an error so a typo cannot hide).
 */
export function parseAugment(value: string | readonly string[] | undefined): AugmentKind[] {
  if (value === undefined) return [];
  const parts = (typeof value === 'string' ? value.split(',') : value.flatMap((v) => v.split(',')))
    .map((p) => p.trim())
    .filter(Boolean);
  const out: AugmentKind[] = [];
  for (const p of parts) {
    if (!AUGMENT_KINDS.includes(p as AugmentKind))
      throw invalidOption('augment', `a list of ${AUGMENT_KINDS.join(', ')}`, p);
    if (out.includes(p as AugmentKind)) throw invalidOption('augment', 'each augmentation once', p);
    out.push(p as AugmentKind);
  }
  return AUGMENT_KINDS.filter((k) => out.includes(k));
}

/** The random draws of one augmented view of one image. */
export interface AugmentPlan {
  readonly flip: boolean;
  /** Crop box as fractions of the image (x, y, width, height). */
  readonly crop: readonly [number, number, number, number] | null;
  /** Degrees, counter-clockwise. */
  readonly angle: number;
  /** Pixel multiplier. */
  readonly brightness: number;
}

/** The random-resized-crop's ranges: area as a fraction of the image, and width/height. */
export interface CropRanges {
  readonly scale: readonly [number, number];
  readonly ratio: readonly [number, number];
}

/** `--crop-scale 0.8,1 --crop-ratio 0.75,1.3333`: the usual fine-tuning ranges (torchvision's scale is 0.08–1). */
export const DEFAULT_CROP: CropRanges = { scale: [0.8, 1], ratio: [3 / 4, 4 / 3] };

/**
 * Parses a `LO,HI` range (or [lo, hi]) for `--crop-scale` (0 < lo ≤ hi ≤ 1) or
 * `--crop-ratio` (0 < lo ≤ hi).
 */
export function parseRange(
  name: 'cropScale' | 'cropRatio',
  value: string | readonly number[],
): [number, number] {
  const parts =
    typeof value === 'string' ? value.split(',').map((p) => Number(p.trim())) : [...value];
  const [lo, hi] = parts as [number, number];
  const max = name === 'cropScale' ? 1 : Number.POSITIVE_INFINITY;
  if (
    parts.length !== 2 ||
    !parts.every((x) => typeof x === 'number' && Number.isFinite(x)) ||
    !(lo > 0 && lo <= hi && hi <= max)
  ) {
    const expected =
      name === 'cropScale'
        ? 'LO,HI with 0 < LO ≤ HI ≤ 1 (fractions of the image area)'
        : 'LO,HI with 0 < LO ≤ HI (width / height)';
    throw invalidOption(name, expected, value);
  }
  return [lo, hi];
}

/** A short id of the ranges for cache keys of augmented views (empty for the defaults). */
export function cropRangesId(ranges: CropRanges): string {
  const same = (a: readonly number[], b: readonly number[]) => a[0] === b[0] && a[1] === b[1];
  if (same(ranges.scale, DEFAULT_CROP.scale) && same(ranges.ratio, DEFAULT_CROP.ratio)) return '';
  return `:crop${ranges.scale.join('-')}x${ranges.ratio.join('-')}`;
}

/**
 * torchvision's RandomResizedCrop.get_params on a square image, with the image's side as 1:
 * up to ten draws of an area in `scale` and a log-uniform ratio in `ratio`, the first box
 * that fits is placed uniformly; when none fits, a centre crop of the whole image clamped
 * to the ratio range.
 */
function randomResizedCrop(
  random: () => number,
  ranges: CropRanges,
): [number, number, number, number] {
  const [s0, s1] = ranges.scale;
  const [r0, r1] = ranges.ratio;
  for (let attempt = 0; attempt < 10; attempt++) {
    const area = s0 + (s1 - s0) * random();
    const ratio = Math.exp(Math.log(r0) + (Math.log(r1) - Math.log(r0)) * random());
    const w = Math.sqrt(area * ratio);
    const h = Math.sqrt(area / ratio);
    if (w > 0 && w <= 1 && h > 0 && h <= 1) return [(1 - w) * random(), (1 - h) * random(), w, h];
  }
  const w = r0 > 1 ? 1 : Math.min(1, r1);
  const h = r0 > 1 ? 1 / r0 : 1;
  return [(1 - w) / 2, (1 - h) / 2, w, h];
}

/**
 * Draws a plan from (seed, view, image content hash) alone, so a view of an image is the
 * same whichever list it is in, whichever order images are processed in and whichever
 * process computes it (which is what lets views be cached by content). Ranges follow the
 * usual torchvision/Keras recipes: flip p=0.5; random resized crop as torchvision draws
 * it, with scale 0.8–1.0 and aspect 3/4–4/3 unless `crop` says otherwise; rotation ±15°;
 * brightness ×0.8–1.2.
 */
export function augmentPlan(
  kinds: readonly AugmentKind[],
  seed: number,
  view: number,
  imageKey: string,
  crop: CropRanges = DEFAULT_CROP,
): AugmentPlan {
  const image = Number.parseInt(imageKey.slice(0, 8), 16) || 0;
  const random = seededRandom(Math.imul(seed, 73856093) ^ Math.imul(view + 1, 19349663) ^ image);
  random();
  const flip = kinds.includes('flip') && random() < 0.5;
  const box = kinds.includes('crop') ? randomResizedCrop(random, crop) : null;
  const angle = kinds.includes('rotate') ? -15 + 30 * random() : 0;
  const brightness = kinds.includes('brightness') ? 0.8 + 0.4 * random() : 1;
  return { flip, crop: box, angle, brightness };
}

/**
 * Applies a plan to `size × size × 3` RGB pixels (as decoded), returning new pixels of
 * the same size: crop (resized back, bilinear), rotation about the centre (bilinear,
 * zero fill), horizontal flip, brightness. One inverse mapping does all geometry, so
 * each output pixel is interpolated once.
 */
export function applyAugment(pixels: Uint8Array, size: number, plan: AugmentPlan): Uint8Array {
  if (plan.angle === 0) return applyAxisAligned(pixels, size, plan);
  const out = new Uint8Array(pixels.length);
  const [cx0, cy0, cw, ch] = plan.crop ?? [0, 0, 1, 1];
  const rad = (plan.angle * Math.PI) / 180;
  const cos = Math.cos(rad);
  const sin = Math.sin(rad);
  const c = (size - 1) / 2;
  for (let y = 0; y < size; y++) {
    for (let x = 0; x < size; x++) {
      // output → (unflipped) → rotated back → crop box → source pixel
      const xf = plan.flip ? size - 1 - x : x;
      const dx = xf - c;
      const dy = y - c;
      const rx = cos * dx - sin * dy + c;
      const ry = sin * dx + cos * dy + c;
      const sx = (cx0 + (cw * (rx + 0.5)) / size) * size - 0.5;
      const sy = (cy0 + (ch * (ry + 0.5)) / size) * size - 0.5;
      const o = (y * size + x) * 3;
      if (sx < -0.5 || sy < -0.5 || sx > size - 0.5 || sy > size - 0.5) continue; // zero fill
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
        out[o + k] = Math.min(255, nearestByte(v * plan.brightness));
      }
    }
  }
  return out;
}

/**
 * The nearest integer to `v` ≥ 0, halves up, as the resize of the preprocessing contract
 * rounds (preprocess.ts): `v + 0.5` truncated. Math.round differs only where `v + 0.5`
 * itself rounds up to an integer (v within half an ulp below a half) and took two thirds
 * of the crop's time (2.3 against 0.8 ms an image at 224).
 */
function nearestByte(v: number): number {
  return (v + 0.5) | 0;
}

/** Source taps of one output coordinate along an axis: −1 where it falls outside (zero fill). */
function axisTaps(
  size: number,
  start: number,
  extent: number,
  flip: boolean,
): { lo: Int32Array; hi: Int32Array; frac: Float64Array } {
  const lo = new Int32Array(size);
  const hi = new Int32Array(size);
  const frac = new Float64Array(size);
  const c = (size - 1) / 2;
  for (let i = 0; i < size; i++) {
    // As applyAugment's general path computes it at angle 0 (cos 1, sin ±0: the same floats).
    const r = (flip ? size - 1 - i : i) - c + c;
    const s = (start + (extent * (r + 0.5)) / size) * size - 0.5;
    if (s < -0.5 || s > size - 0.5) {
      lo[i] = -1;
      continue;
    }
    const s0 = Math.max(0, Math.min(size - 1, Math.floor(s)));
    lo[i] = s0;
    hi[i] = Math.min(size - 1, s0 + 1);
    frac[i] = Math.max(0, Math.min(1, s - s0));
  }
  return { lo, hi, frac };
}

/**
 * applyAugment without rotation (flip, crop, brightness): the source coordinate of a
 * column depends on x alone and of a row on y alone, so both are worked out once per
 * axis (a column's two byte offsets and weights, a row's two offsets), instead of once per
 * pixel. The same arithmetic, so the same pixels; 2–4× faster at 224 (each augmented view
 * of each image goes through here). With brightness 1 the value is a blend of bytes, so it
 * needs no clamp.
 */
function applyAxisAligned(pixels: Uint8Array, size: number, plan: AugmentPlan): Uint8Array {
  const out = new Uint8Array(pixels.length);
  const [cx0, cy0, cw, ch] = plan.crop ?? [0, 0, 1, 1];
  const xs = axisTaps(size, cx0, cw, plan.flip);
  const ys = axisTaps(size, cy0, ch, false);
  const gain = plan.brightness;
  const left = new Int32Array(size);
  const right = new Int32Array(size);
  const keep = new Float64Array(size);
  for (let x = 0; x < size; x++) {
    left[x] = xs.lo[x]! * 3;
    right[x] = xs.hi[x]! * 3;
    keep[x] = 1 - xs.frac[x]!;
  }
  const stride = size * 3;
  for (let y = 0; y < size; y++) {
    const y0 = ys.lo[y]!;
    if (y0 < 0) continue;
    const ay = ys.frac[y]!;
    const by = 1 - ay;
    const top = y0 * stride;
    const bottom = ys.hi[y]! * stride;
    for (let x = 0, o = y * stride; x < size; x++, o += 3) {
      if (xs.lo[x]! < 0) continue;
      const a0 = top + left[x]!;
      const a1 = top + right[x]!;
      const b0 = bottom + left[x]!;
      const b1 = bottom + right[x]!;
      const p = keep[x]!;
      const q = xs.frac[x]!;
      if (gain === 1) {
        // Unrolled: the hottest loop of an augmented epoch.
        out[o] = nearestByte(
          (pixels[a0]! * p + pixels[a1]! * q) * by + (pixels[b0]! * p + pixels[b1]! * q) * ay,
        );
        out[o + 1] = nearestByte(
          (pixels[a0 + 1]! * p + pixels[a1 + 1]! * q) * by +
            (pixels[b0 + 1]! * p + pixels[b1 + 1]! * q) * ay,
        );
        out[o + 2] = nearestByte(
          (pixels[a0 + 2]! * p + pixels[a1 + 2]! * q) * by +
            (pixels[b0 + 2]! * p + pixels[b1 + 2]! * q) * ay,
        );
        continue;
      }
      for (let k = 0; k < 3; k++) {
        const v =
          (pixels[a0 + k]! * p + pixels[a1 + k]! * q) * by +
          (pixels[b0 + k]! * p + pixels[b1 + k]! * q) * ay;
        out[o + k] = Math.min(255, nearestByte(v * gain));
      }
    }
  }
  return out;
}
