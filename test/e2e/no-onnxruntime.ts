// Given to node with --import: installs no-onnxruntime-hooks.js in the process it starts.
import { register } from 'node:module';

register('./no-onnxruntime-hooks.js', import.meta.url);
