// Module hooks (node:module register) that make onnxruntime-node fail to import, with the
// error its loader gives where the native binding for the platform is missing.

type Next = (specifier: string, context: unknown) => Promise<unknown>;

export async function resolve(specifier: string, context: unknown, next: Next): Promise<unknown> {
  if (specifier === 'onnxruntime-node') {
    const err = new Error(
      "Cannot find module '../bin/napi-v6/linux/x64/onnxruntime_binding.node'\nRequire stack:\n- onnxruntime-node/dist/binding.js",
    );
    throw Object.assign(err, { code: 'MODULE_NOT_FOUND' });
  }
  return next(specifier, context);
}
