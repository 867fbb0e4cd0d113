import { FinetuneError } from '../errors.js';

/**
 * Edits of a Keras functional-model topology (the JSON inside model.json), so a body
 * can be built at any input size, cut at any layer and given its normalisation as a
 * first layer, without loading the weights twice.
 */

interface LayerJSON {
  class_name: string;
  name: string;
  config: Record<string, unknown>;
  inbound_nodes?: unknown[];
}

interface FunctionalConfig {
  name?: string;
  layers: LayerJSON[];
  input_layers: [string, number, number][];
  output_layers: [string, number, number][];
}

export interface TopologyEdit {
  /** Keep only this layer and its ancestors; it becomes the single output. */
  readonly cutAt?: string;
  /** New square input size (the batch_input_shape of the input layer). */
  readonly inputSize?: number;
  /** A Rescaling layer (`x * scale + offset`) inserted right after the input. */
  readonly rescale?: { readonly scale: number; readonly offset: number };
}

/** Returns the functional config inside a model.json `modelTopology`, as a deep copy. */
export function functionalConfig(modelTopology: unknown): {
  className: string;
  config: FunctionalConfig;
  wrap: (c: FunctionalConfig) => unknown;
} {
  const topo = structuredClone(modelTopology) as Record<string, unknown>;
  const inner = (topo['model_config'] ?? topo) as { class_name: string; config: unknown };
  const wrap = (c: FunctionalConfig): unknown => {
    const modelConfig = { class_name: 'Model', config: c };
    return topo['model_config']
      ? { ...topo, model_config: modelConfig }
      : { ...topo, ...modelConfig };
  };
  if (inner.class_name === 'Sequential')
    return { className: 'Sequential', config: sequentialToFunctional(inner.config), wrap };
  if (inner.class_name !== 'Model' && inner.class_name !== 'Functional') {
    throw new FinetuneError(
      `Expected a Keras Model, Functional or Sequential topology but received '${inner.class_name}'`,
    );
  }
  return { className: inner.class_name, config: inner.config as FunctionalConfig, wrap };
}

function sequentialToFunctional(config: unknown): FunctionalConfig {
  const layers = (
    Array.isArray(config) ? config : (config as { layers: LayerJSON[] }).layers
  ) as LayerJSON[];
  const first = layers[0];
  const shape = first?.config['batch_input_shape'];
  if (!first || !Array.isArray(shape)) {
    throw new FinetuneError('Expected a Sequential model whose first layer has batch_input_shape');
  }
  const out: LayerJSON[] = [
    {
      class_name: 'InputLayer',
      name: 'input',
      config: { name: 'input', batch_input_shape: shape, dtype: 'float32' },
      inbound_nodes: [],
    },
  ];
  let prev = 'input';
  for (const l of layers) {
    const name = (l.config['name'] as string) ?? l.name;
    const cfg = { ...l.config };
    delete cfg['batch_input_shape'];
    out.push({ class_name: l.class_name, name, config: cfg, inbound_nodes: [[[prev, 0, 0, {}]]] });
    prev = name;
  }
  return { layers: out, input_layers: [['input', 0, 0]], output_layers: [[prev, 0, 0]] };
}

function inboundNames(layer: LayerJSON): string[] {
  const names: string[] = [];
  for (const node of layer.inbound_nodes ?? []) {
    for (const ref of node as unknown[]) names.push((ref as [string])[0]);
  }
  return names;
}

/** Applies the edits and returns a new modelTopology. */
export function editTopology(modelTopology: unknown, edit: TopologyEdit): unknown {
  const { config, wrap } = functionalConfig(modelTopology);
  if (config.input_layers.length !== 1) {
    throw new FinetuneError(
      `Expected a backbone with one input but it has ${config.input_layers.length}`,
    );
  }
  let layers = config.layers;
  const byName = new Map(layers.map((l) => [l.name, l]));
  const inputName = config.input_layers[0]![0];
  if (edit.cutAt !== undefined) {
    if (!byName.has(edit.cutAt)) {
      throw new FinetuneError(
        `Expected the name of a layer of the backbone for feature layer but received '${edit.cutAt}'`,
      );
    }
    const keep = new Set<string>();
    const stack = [edit.cutAt];
    while (stack.length) {
      const n = stack.pop()!;
      if (keep.has(n)) continue;
      keep.add(n);
      stack.push(...inboundNames(byName.get(n)!));
    }
    layers = layers.filter((l) => keep.has(l.name));
    config.output_layers = [[edit.cutAt, 0, 0]];
  }
  if (edit.inputSize !== undefined) {
    const input = byName.get(inputName)!;
    const shape = input.config['batch_input_shape'] as (number | null)[];
    input.config['batch_input_shape'] = [null, edit.inputSize, edit.inputSize, shape[3] ?? 3];
  }
  if (edit.rescale) {
    const name = 'input_rescaling';
    for (const l of layers) {
      for (const node of l.inbound_nodes ?? []) {
        for (const ref of node as unknown[]) {
          if ((ref as string[])[0] === inputName) (ref as string[])[0] = name;
        }
      }
    }
    const at = layers.findIndex((l) => l.name === inputName) + 1;
    layers.splice(at, 0, {
      class_name: 'Rescaling',
      name,
      config: {
        name,
        trainable: false,
        dtype: 'float32',
        scale: edit.rescale.scale,
        offset: edit.rescale.offset,
      },
      inbound_nodes: [[[inputName, 0, 0, {}]]],
    });
  }
  config.layers = layers;
  return wrap(config);
}
