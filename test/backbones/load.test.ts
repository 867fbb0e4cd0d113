import assert from 'node:assert/strict';
import { readFile } from 'node:fs/promises';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import { after, before, test } from 'node:test';
import * as tf from '@tensorflow/tfjs';
import { loadBackbone } from '../../src/backbones/load.js';
import { resolveBackboneSpec } from '../../src/backbones/registry.js';
import { initBackend } from '../../src/backend/index.js';
import { tempDir, writeTinyBackbone } from '../helpers.js';

let dir: string;
let cleanup: () => Promise<void>;
let tiny: string;
let server: Server;
let base: string;

before(async () => {
  await initBackend('wasm');
  ({ dir, cleanup } = await tempDir('backbones'));
  tiny = await writeTinyBackbone(dir);
  // A loopback server stands in for a model host: the URL path is tested up to the network.
  server = createServer(async (req, res) => {
    try {
      const file = path.join(path.dirname(tiny), path.basename(req.url ?? ''));
      res.end(await readFile(file));
    } catch {
      res.statusCode = 404;
      res.end();
    }
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
});
after(async () => {
  server.close();
  await cleanup();
});

test('a model.json from disk and from a URL: cut at the last 4-D layer or a named one', async () => {
  const fromDisk = await loadBackbone(tiny);
  assert.equal(fromDisk.spec.featureLayer, 'conv2');
  assert.equal(fromDisk.featureSize, 16);
  assert.equal(fromDisk.inputSize, 32);
  const fromUrl = await loadBackbone(`${base}/model.json`, { featureLayer: 'relu1' });
  assert.equal(fromUrl.featureSize, 8);
  const x = tf.randomUniform([2, 32, 32, 3], 0, 255, 'float32', 1);
  const same = await loadBackbone(`${base}/model.json`);
  const d = tf.tidy(
    () =>
      fromDisk
        .embed(x as tf.Tensor4D)
        .sub(same.embed(x as tf.Tensor4D))
        .abs()
        .max()
        .dataSync()[0],
  );
  assert.equal(d, 0);
  x.dispose();
  for (const b of [fromDisk, fromUrl, same]) b.dispose();
  await assert.rejects(loadBackbone(tiny, { featureLayer: 'nope' }), {
    message: "Expected the name of a layer of the backbone for feature layer but received 'nope'",
  });
  await assert.rejects(
    loadBackbone(`${base}/nothing-here.json`),
    /^FinetuneError: Could not download the backbone at http.*status code 404/,
  );
  await assert.rejects(
    loadBackbone(path.join(dir, 'nothing', 'model.json')),
    /cannot read model file/,
  );
});

test('TF Hub MobileNets ask for the right model, up to the network boundary', async () => {
  const asked: string[] = [];
  const realFetch = globalThis.fetch;
  // tfjs fetches through globalThis.fetch in Node: answer as an unreachable host would.
  globalThis.fetch = (async (url: string | URL | Request) => {
    asked.push(String(url));
    throw new TypeError('fetch failed');
  }) as typeof fetch;
  try {
    await assert.rejects(
      loadBackbone('mobilenet_v2', { alpha: 0.5 }),
      /^FinetuneError: Could not download backbone mobilenet_v2_0\.5 from TF Hub \(.*fetch failed/,
    );
    await assert.rejects(
      loadBackbone('mobilenet_v1'),
      /Could not download backbone mobilenet_v1 from TF Hub/,
    );
  } finally {
    globalThis.fetch = realFetch;
  }
  assert.equal(asked.length, 2);
  assert.match(
    asked[0]!,
    /^https:\/\/tfhub\.dev\/google\/imagenet\/mobilenet_v2_050_224\/classification\/2\/model\.json\?tfjs-format=file$/,
  );
  assert.match(asked[1]!, /mobilenet_v1_100_224\/classification\/1\/model\.json/);
});

test('registry lookups validate ids and alphas', () => {
  assert.throws(() => resolveBackboneSpec('resnet'), {
    message:
      "Expected one of nsfwjs_mobilenet_v2, mobilenet_v1, mobilenet_v2 or a path/URL to a model.json for backbone but received 'resnet'",
  });
  assert.equal(resolveBackboneSpec('mobilenet_v2', { alpha: 0.5 }).id, 'mobilenet_v2_0.5');
  assert.deepEqual(resolveBackboneSpec('mobilenet_v1', { alpha: 0.25 }).source, {
    kind: 'tfjs-models-mobilenet',
    version: 1,
    alpha: 0.25,
  });
  assert.throws(() => resolveBackboneSpec('mobilenet_v2', { alpha: 0.25 }), {
    message: 'Expected one of 0.5, 0.75, 1 for alpha of mobilenet_v2 but received 0.25',
  });
  assert.throws(
    () => resolveBackboneSpec('nsfwjs_mobilenet_v2', { alpha: 0.5 }),
    /only mobilenet_v1 and mobilenet_v2 take one/,
  );
});
