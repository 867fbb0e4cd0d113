import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import * as tf from '@tensorflow/tfjs';
import sharp from 'sharp';

const require = createRequire(import.meta.url);

function packageVersion(): string {
  // dist/src/version.js and src/version.ts both sit two levels below package.json's folder or one.
  for (const rel of ['../../package.json', '../package.json']) {
    try {
      const pkg = JSON.parse(
        readFileSync(fileURLToPath(new URL(rel, import.meta.url)), 'utf8'),
      ) as { name?: string; version?: string };
      if (pkg.name === 'tfjs-finetune') return pkg.version ?? '0.0.0';
    } catch {
      // try the next
    }
  }
  return '0.0.0';
}

function dependencyVersion(name: string): string | null {
  try {
    const main = require.resolve(name);
    let dir = main;
    for (let i = 0; i < 6; i++) {
      dir = path.dirname(dir);
      try {
        const pkg = JSON.parse(readFileSync(path.join(dir, 'package.json'), 'utf8')) as {
          name?: string;
          version?: string;
        };
        if (pkg.name === name) return pkg.version ?? null;
      } catch {
        // keep climbing
      }
    }
  } catch {
    return null;
  }
  return null;
}

export const VERSION = packageVersion();

/** Versions of everything that shapes a result, for config.json and benchmarks. */
export function versions(): Record<string, string | null> {
  return {
    'tfjs-finetune': VERSION,
    node: process.versions.node,
    '@tensorflow/tfjs': tf.version.tfjs,
    'onnxruntime-node': dependencyVersion('onnxruntime-node'),
    sharp: sharp.versions.sharp ?? null,
    libvips: sharp.versions.vips,
  };
}
