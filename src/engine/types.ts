/**
 * A frozen forward pass: a batch of raw RGB pixels (0–255, float32) in, one flat output
 * row per image out. Implemented by ONNX Runtime (a lowered copy of the tfjs model)
 * and by tfjs itself (the fallback, optionally a worker pool on wasm).
 */
export interface FrozenModel {
  readonly engine: EngineName;
  /** Pixel layout `run` expects: NCHW for ONNX Runtime (no Transpose in the graph), NHWC for tfjs. */
  readonly layout: 'nchw' | 'nhwc';
  /** Square input size in pixels. */
  readonly inputSize: number;
  /** Length of one output row. */
  readonly outputSize: number;
  /**
   * Runs `n` images packed in `batch` (n × 3 × size × size floats in `layout`);
   * resolves to n × outputSize floats.
   */
  run(batch: Float32Array, n: number): Promise<Float32Array>;
  dispose(): Promise<void>;
}

export type EngineName = 'onnx' | 'tfjs';
