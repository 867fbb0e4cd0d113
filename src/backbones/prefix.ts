import * as tf from '@tensorflow/tfjs';
import { FinetuneError } from '../errors.js';

/** The frozen part of a body: its layers up to the input of the first unfrozen one. */
export interface PrefixCut {
  /** Layer whose output feeds the first unfrozen layer: the prefix's output. */
  readonly cutLayer: string;
  /** The prefix output's shape without the batch: [h, w, c] or [d]. */
  readonly cutShape: readonly number[];
  /** The body's own tensor at the cut (what the trainable suffix starts from). */
  readonly cut: tf.SymbolicTensor;
  /** Raw pixels → the cut tensor. Re-uses the body's graph: it holds no weights of its own. */
  readonly model: tf.LayersModel;
}

/**
 * Cuts the frozen prefix off a layers body: everything that computes the single input of
 * `firstUnfrozen`. The one place the fine-tune cut is made, in this thread (the fine-tune
 * stage) and in the tfjs worker pool, so both run the same graph.
 *
 * @example
 *   const { model, cutLayer } = cutPrefix(backbone.model!, 'block_16_expand'); // cutLayer 'block_15_add'
 */
export function cutPrefix(body: tf.LayersModel, firstUnfrozen: string): PrefixCut {
  const first = body.layers.find((l) => l.name === firstUnfrozen);
  if (!first) throw new FinetuneError(`The backbone has no layer '${firstUnfrozen}' to cut before`);
  const inbound = (first.inboundNodes[0]?.inputTensors ?? []) as tf.SymbolicTensor[];
  if (inbound.length !== 1)
    throw new FinetuneError(
      `Cannot cut the backbone at ${firstUnfrozen}: it has ${inbound.length} inputs`,
    );
  const cut = inbound[0]!;
  const cutShape = cut.shape.slice(1);
  if (!cutShape.every((d) => typeof d === 'number' && d > 0)) {
    throw new FinetuneError(
      `Cannot cut the backbone at ${firstUnfrozen}: its input has no fixed shape ([${cut.shape.join(', ')}])`,
    );
  }
  return {
    cutLayer: cut.sourceLayer.name,
    cutShape: cutShape as number[],
    cut,
    model: tf.model({ inputs: body.inputs, outputs: cut, name: 'frozen_prefix' }),
  };
}
