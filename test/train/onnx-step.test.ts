import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { test } from 'node:test';
import * as tf from '@tensorflow/tfjs';
import onnxProto from 'onnx-proto';
import type { BackendInfo } from '../../src/backend/index.js';
import { resolveEngineContext } from '../../src/engine/index.js';
import { buildHead, logitsView } from '../../src/head/build.js';
import * as lib from '../../src/index.js';
import { inferenceModeBatchNorm, tfjsStepsReason } from '../../src/train/finetune.js';
import { partGradients, type StepPart } from '../../src/train/fit.js';
import {
  buildGradGraph,
  type GradGraphModel,
  GradGraphUnsupported,
  OnnxSteps,
} from '../../src/train/onnx-step.js';
import { train } from '../../src/train/train.js';
import { useColourWorkspace } from '../helpers.js';

const ws = useColourWorkspace('onnx-step');

function values(n: number, seed: number): Float32Array {
  return Float32Array.from({ length: n }, (_, i) => Math.sin(i * 12.9898 + seed * 78.233) * 0.8);
}

/**
 * A body with every layer kind the step graph covers: 1×1 convs (with and without bias,
 * with relu6), BatchNorm with non-trivial statistics (folded into a 1×1 conv and a depthwise
 * one before it, or on its own after a conv with bias), capped ReLU, depthwise convs
 * (stride 1 'same' with bias; ZeroPadding2D then stride 2 'valid'; a 5×5 on 3×3 maps), a
 * residual Add, and global average pooling.
 */
function body(): tf.LayersModel {
  const input = tf.input({ shape: [6, 6, 4], name: 'cut' });
  const conv = (x: tf.SymbolicTensor, filters: number, name: string, extra = {}) =>
    tf.layers
      .conv2d({ filters, kernelSize: 1, name, useBias: false, ...extra })
      .apply(x) as tf.SymbolicTensor;
  const bn = (x: tf.SymbolicTensor, name: string) =>
    tf.layers.batchNormalization({ name }).apply(x) as tf.SymbolicTensor;
  let x = conv(input, 8, 'expand');
  x = bn(x, 'expand_bn');
  x = tf.layers.reLU({ maxValue: 6, name: 'expand_relu' }).apply(x) as tf.SymbolicTensor;
  x = tf.layers
    .depthwiseConv2d({ kernelSize: 3, padding: 'same', useBias: true, name: 'dw_same' })
    .apply(x) as tf.SymbolicTensor;
  x = bn(x, 'dw_bn');
  x = tf.layers.reLU({ name: 'dw_relu' }).apply(x) as tf.SymbolicTensor;
  const project = bn(conv(x, 4, 'project'), 'project_bn');
  x = tf.layers.add({ name: 'add' }).apply([input, project]) as tf.SymbolicTensor;
  x = tf.layers
    .zeroPadding2d({
      padding: [
        [0, 1],
        [0, 1],
      ],
      name: 'pad',
    })
    .apply(x) as tf.SymbolicTensor;
  x = tf.layers
    .depthwiseConv2d({ kernelSize: 3, strides: 2, padding: 'valid', useBias: false, name: 'dw_s2' })
    .apply(x) as tf.SymbolicTensor;
  x = bn(x, 'dw_s2_bn');
  x = tf.layers
    .depthwiseConv2d({ kernelSize: 5, padding: 'same', useBias: false, name: 'dw_5' })
    .apply(x) as tf.SymbolicTensor;
  x = conv(x, 6, 'top', { useBias: true, activation: 'relu6' });
  x = tf.layers.globalAveragePooling2d({ name: 'pool' }).apply(x) as tf.SymbolicTensor;
  const model = tf.model({ inputs: input, outputs: x });
  // Every weight distinct, BN's statistics far from 0 and 1.
  model.layers.forEach((layer, l) => {
    layer.setWeights(
      layer.getWeights().map((w, i) => {
        const v = values(w.size, l * 10 + i);
        const moving = layer.getClassName() === 'BatchNormalization' && i >= 2;
        return tf.tensor(moving ? v.map((a) => (i === 3 ? 0.5 + Math.abs(a) : a)) : v, w.shape);
      }),
    );
  });
  return model;
}

interface Case {
  readonly suffix: tf.LayersModel;
  readonly head: tf.LayersModel;
  readonly variables: tf.Variable[];
  readonly forward: (x: tf.Tensor, training: boolean) => tf.Tensor;
  readonly dispose: () => void;
}

function stage(headOptions: Parameters<typeof buildHead>[2]): Case {
  const suffix = body();
  const head = buildHead(6, 3, headOptions);
  const logits = logitsView(head);
  const restore = inferenceModeBatchNorm(suffix.layers);
  const variables = [...suffix.layers, ...head.layers].flatMap((l) =>
    l.trainableWeights.map((w) => w.read() as tf.Variable),
  );
  return {
    suffix,
    head,
    variables,
    forward: (x, training) =>
      logits.apply(suffix.apply(x, { training }) as tf.Tensor, { training }) as tf.Tensor,
    dispose: () => {
      restore();
      suffix.dispose();
      head.dispose();
    },
  };
}

const graphModel = (c: Case, extra: Partial<GradGraphModel> = {}): GradGraphModel => ({
  suffix: c.suffix,
  head: c.head,
  addedDropout: 0,
  variables: c.variables,
  numClasses: 3,
  ...extra,
});

const ROWS = 5;
const part = (seed = 1): StepPart => ({
  x: values(ROWS * 6 * 6 * 4, 99).map((v) => v * 3),
  shape: [ROWS, 6, 6, 4],
  labels: Int32Array.from([0, 2, 1, 2, 0]),
  rowWeights: Float32Array.from([1, 0.5, 2, 0.5, 1]),
  labelSmoothing: 0.1,
  divisor: 4,
  seed,
});

for (const [name, matmulDepthwiseMax] of [
  ['depthwise as matrix products', undefined],
  ['depthwise as Conv nodes', 0],
] as const) {
  test(`the ONNX step's loss, correct rows and gradients match tfjs's for every covered layer (${name})`, async () => {
    const c = stage({ hidden: 5, dropout: 0 });
    const tensors = tf.memory().numTensors;
    const steps = await OnnxSteps.open(
      graphModel(c, matmulDepthwiseMax === undefined ? {} : { matmulDepthwiseMax }),
      2,
    );
    const p = part();
    const got = await steps.gradients(p);
    await steps.close();
    const x = tf.tensor(p.x, [...p.shape]);
    const want = partGradients(c.forward, c.variables, 3, x, p);
    assert.ok(Math.abs(got.loss - want.loss.dataSync()[0]!) < 1e-5, `${got.loss}`);
    assert.equal(got.hits, want.hits.dataSync()[0]);
    assert.equal(got.grads.length, c.variables.length);
    c.variables.forEach((v, i) => {
      const a = want.grads[i]!.dataSync();
      const b = got.grads[i]!;
      const scale = Math.max(...Array.from(a, Math.abs));
      assert.ok(scale > 0, `${v.name}: a gradient of zeros tests nothing`);
      const worst = Math.max(...Array.from(a, (ai, j) => Math.abs(ai - b[j]!)));
      assert.ok(worst <= 1e-4 * scale, `${v.name}: off by ${worst} of ${scale}`);
    });
    tf.dispose([x, want.loss, want.hits, ...want.grads]);
    assert.equal(tf.memory().numTensors, tensors);
    c.dispose();
  });
}

test('BatchNorm folds into the bias-free conv (1×1 or depthwise) before it, not after a conv with bias', () => {
  const c = stage({ hidden: 5, dropout: 0 });
  for (const mode of ['step', 'forward'] as const) {
    assert.deepEqual(buildGradGraph(graphModel(c), mode).folded, [
      'expand_bn',
      'project_bn',
      'dw_s2_bn',
    ]);
  }
  c.dispose();
});

test("the inference graph's logits match tfjs's forward pass in inference mode (dropout off)", async () => {
  const c = stage({ hidden: 5, dropout: 0.5 });
  const steps = await OnnxSteps.open(graphModel(c, { addedDropout: 0.3 }), 2);
  const p = part();
  const got = await steps.logits(p.x, p.shape);
  await steps.close();
  const x = tf.tensor(p.x, [...p.shape]);
  const want = tf.tidy(() => c.forward(x, false).dataSync());
  assert.equal(got.length, ROWS * 3);
  got.forEach((v, i) => {
    assert.ok(Math.abs(v - want[i]!) < 1e-4, `logit ${i}: ${v} vs ${want[i]}`);
  });
  x.dispose();
  c.dispose();
});

test('every initializer of the step and inference graphs is used (ONNX Runtime warns on stderr about one that is not)', () => {
  const c = stage({ hidden: 5, dropout: 0.5 });
  for (const mode of ['step', 'forward'] as const) {
    for (const matmulDepthwiseMax of [undefined, 0]) {
      const graph = buildGradGraph(
        graphModel(c, matmulDepthwiseMax === undefined ? {} : { matmulDepthwiseMax }),
        mode,
      );
      const model = onnxProto.onnx.ModelProto.decode(graph.bytes);
      const used = new Set(model.graph!.node!.flatMap((n) => n.input ?? []));
      const unused = model.graph!.initializer!.map((t) => t.name!).filter((n) => !used.has(n));
      assert.deepEqual(unused, [], `${mode}, ${matmulDepthwiseMax}`);
    }
  }
  c.dispose();
});

test('dropout masks come from the step seed: the same seed gives the same step, another seed another', async () => {
  const c = stage({ dropout: 0.5 });
  const graph = buildGradGraph(graphModel(c));
  assert.deepEqual(
    graph.masks.map((m) => [m.width, m.rate]),
    [[6, 0.5]],
  );
  const steps = await OnnxSteps.open(graphModel(c), 1);
  const a = await steps.gradients(part(7));
  const b = await steps.gradients(part(7));
  const other = await steps.gradients(part(8));
  await steps.close();
  await steps.close(); // a second close is a no-op
  assert.deepEqual(b, a);
  assert.notDeepEqual(other.grads, a.grads);
  c.dispose();
});

test('a stage dropout added before the classifier is a mask input too', () => {
  const c = stage({ dropout: 0 });
  assert.deepEqual(buildGradGraph(graphModel(c)).masks, []);
  const masks = buildGradGraph(graphModel(c, { addedDropout: 0.25 })).masks;
  assert.deepEqual(
    masks.map((m) => [m.width, m.rate]),
    [[6, 0.25]],
  );
  c.dispose();
});

test('layers the graph does not cover are named: a 3×3 conv, BatchNorm in the head', () => {
  const input = tf.input({ shape: [4, 4, 2] });
  const conv = tf.layers.conv2d({ filters: 3, kernelSize: 3, name: 'conv3x3' });
  const pooled = tf.layers
    .globalAveragePooling2d({})
    .apply(conv.apply(input) as tf.SymbolicTensor) as tf.SymbolicTensor;
  const suffix = tf.model({ inputs: input, outputs: pooled });
  const head = buildHead(3, 2, {});
  const variables = [...suffix.layers, ...head.layers].flatMap((l) =>
    l.trainableWeights.map((w) => w.read() as tf.Variable),
  );
  assert.throws(
    () => buildGradGraph({ suffix, head, addedDropout: 0, variables, numClasses: 2 }),
    (e: unknown) => e instanceof GradGraphUnsupported && /conv3x3 \(Conv2D\)/.test(e.message),
  );
  const c = stage({ bn: true });
  assert.throws(
    () => buildGradGraph(graphModel(c)),
    (e: unknown) => e instanceof GradGraphUnsupported && /BatchNorm in the head/.test(e.message),
  );
  suffix.dispose();
  head.dispose();
  c.dispose();
});

test('train: fine-tune steps on ONNX Runtime by default, the same figures on 1 or 2 threads; tfjs when asked or not covered', async () => {
  const options = {
    data: ws.data,
    backbone: ws.backbone,
    backend: 'wasm' as const,
    valSplit: 0.25,
    epochs: 2,
    batchSize: 7,
    finetuneEpochs: 2,
    unfreeze: 'from:dw1',
    finetuneLr: 0.01,
    dropout: 0.3,
    labelSmoothing: 0.1,
    augment: 'flip',
    cache: false,
  };
  const metrics: string[] = [];
  for (const finetuneThreads of [1, 2]) {
    const out = path.join(ws.dir, `onnx-${finetuneThreads}`);
    const tensors = tf.memory().numTensors;
    const summary = await train({ ...options, out, finetuneThreads });
    assert.equal(tf.memory().numTensors, tensors);
    assert.deepEqual(summary.stages['finetune']!.steps, { engine: 'onnx', reason: null });
    assert.equal(summary.stages['finetune']!.threads, finetuneThreads);
    metrics.push(
      (await readFile(path.join(out, 'metrics.jsonl'), 'utf8')).replace(/"seconds":[^,}]*/g, ''),
    );
  }
  assert.equal(metrics[1], metrics[0]);
  const asked = await train({ ...options, out: path.join(ws.dir, 'tfjs'), engine: 'tfjs' });
  assert.deepEqual(asked.stages['finetune']!.steps, { engine: 'tfjs', reason: '--engine tfjs' });
  // conv1 is a 3×3 stride-2 conv: not covered, so tfjs, with a warning when onnx was asked for
  const deep = await train({
    ...options,
    out: path.join(ws.dir, 'deep'),
    unfreeze: 'from:conv1',
    engine: 'onnx',
  });
  const steps = deep.stages['finetune']!.steps!;
  assert.equal(steps.engine, 'tfjs');
  assert.match(steps.reason ?? '', /conv1 \(Conv2D\)/);
  assert.ok(
    deep.warnings.some((w) => /fine-tune steps run on tfjs: conv1/.test(w)),
    deep.warnings.join('\n'),
  );
});

test('which engine takes the steps: --engine, a GPU under auto, BatchNorm on batch statistics; the library exports the pieces', () => {
  const wasm = { tfBackend: 'wasm', gpu: false } as BackendInfo;
  const gpu = { tfBackend: 'tensorflow', gpu: true } as BackendInfo;
  const reason = (engine: 'auto' | 'onnx' | 'tfjs', backend: BackendInfo, bnTrains = false) =>
    tfjsStepsReason(resolveEngineContext({ engine, backend }), bnTrains);
  assert.equal(reason('auto', wasm), null);
  assert.equal(reason('onnx', gpu), null);
  assert.equal(reason('tfjs', wasm), '--engine tfjs');
  assert.equal(reason('auto', gpu), 'the tfjs backend runs on a GPU');
  assert.equal(reason('auto', wasm, true), 'BatchNorm trains on batch statistics');
  assert.equal(lib.OnnxSteps, OnnxSteps);
  assert.equal(lib.buildGradGraph, buildGradGraph);
  assert.equal(lib.GradGraphUnsupported, GradGraphUnsupported);
  assert.equal(lib.tfjsStepsReason, tfjsStepsReason);
});
