"""Python with onnxruntime: pip install onnxruntime numpy pillow

Usage: python onnxruntime.py runs/r1/model photo.jpg [more.jpg ...]  -> one JSON line per image

The resize below is the toolkit's contract (model/preprocess.js) in numpy: Pillow's own
Image.resize(BILINEAR) uses the same taps but rounds to 8 bits between its two passes and
in fixed point, which moves pixels by a level or two; the model notices.
"""

import io
import json
import math
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageCms, ImageOps


def axis_weights(in_size, out_size):
    """Half-pixel triangle taps, widened by the scale when shrinking (Pillow BILINEAR)."""
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    weights = np.zeros((out_size, in_size), dtype=np.float64)
    for o in range(out_size):
        centre = (o + 0.5) * scale
        lo = max(math.trunc(centre - filter_scale + 0.5), 0)
        hi = min(math.trunc(centre + filter_scale + 0.5), in_size)
        x = np.arange(lo, hi)
        w = np.maximum(0.0, 1.0 - np.abs((x - centre + 0.5) / filter_scale))
        weights[o, lo:hi] = w / w.sum()
    return weights


def resize_rgb(rgb, size):
    """uint8 [H, W, 3] -> uint8 [size, size, 3]: horizontal pass, vertical pass, floor(v + 0.5)."""
    h, w, _ = rgb.shape
    tmp = np.einsum("ox,yxc->yoc", axis_weights(w, size), rgb.astype(np.float64))
    out = np.einsum("oy,yxc->oxc", axis_weights(h, size), tmp)
    return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)


def load_rgb(path):
    """EXIF orientation applied, sRGB 8-bit, alpha flattened onto black as round(c * a / 255)."""
    image = ImageOps.exif_transpose(Image.open(path))
    icc = image.info.get("icc_profile")
    if icc and image.mode in ("RGB", "RGBA"):
        # Pillow ignores embedded profiles; the contract converts them to sRGB.
        image = ImageCms.profileToProfile(
            image,
            ImageCms.ImageCmsProfile(io.BytesIO(icc)),
            ImageCms.createProfile("sRGB"),
            renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC,
            outputMode=image.mode,
        )
    rgba = np.asarray(image.convert("RGBA"), dtype=np.float64)
    return np.floor(rgba[..., :3] * rgba[..., 3:] / 255 + 0.5).astype(np.uint8)


def main():
    model_dir, images = sys.argv[1], sys.argv[2:]
    session = ort.InferenceSession(f"{model_dir}/model.onnx")
    meta = session.get_modelmeta().custom_metadata_map
    labels = json.loads(meta["labels"])
    spec = json.loads(meta["input"])  # name 'pixels', layout 'nchw', size, range [0, 255]
    for path in images:
        rgb = resize_rgb(load_rgb(path), spec["size"])
        pixels = rgb.transpose(2, 0, 1)[None].astype(np.float32)
        probabilities = session.run(None, {spec["name"]: pixels})[0][0]
        best = int(np.argmax(probabilities))
        print(json.dumps({"file": path, "label": labels[best], "probabilities": probabilities.tolist()}))


if __name__ == "__main__":
    main()
