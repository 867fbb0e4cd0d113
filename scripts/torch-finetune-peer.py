#!/usr/bin/env python3
"""The PyTorch peer of the fine-tune epoch that `npm run bench` compares against.

    python3 scripts/torch-finetune-peer.py DATA_DIR [--threads 2] [--batch 32] [--size 224]

Issue 16's recipe, PyTorch CPU at its best: every image of DATA_DIR/<class>/* decoded once
up front and resized to SIZE x SIZE (as uint8, "its images already decoded"); then per epoch
a fresh flip + random-resized-crop view of each image (scale 0.8-1.0, aspect 3/4-4/3, as
src/data/augment.ts draws them), the frozen prefix without grad, and the last three
inverted-residual blocks, the final 1x1 conv and a linear head trained with Adam
(BatchNorm in inference mode, gamma and beta training: the toolkit's fine-tune stage).

The cut is the toolkit's `--unfreeze blocks:3` on Keras MobileNetV2: the first unfrozen
layer is block_14_expand, which is torchvision's features[15] (features[1] is Keras's
expanded_conv, features[k] its block_{k-1}, features[18] its Conv_1), so the frozen prefix
is features[:15]. The weights are torchvision's architecture with a seeded random init:
the same compute as the toolkit's MobileNetV2 (weights do not change a CPU step's time).

One warm-up epoch, then one timed epoch; prints one JSON object. Run it with
GLIBC_TUNABLES=glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296
(glibc's default malloc spends most of a step in page faults on large tensors).
"""

import argparse
import json
import os
import resource
import sys
import time

import torch
import torchvision
from PIL import Image
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms import functional as F

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


def load_images(data_dir: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    classes = sorted(d for d in os.listdir(data_dir) if os.path.isdir(os.path.join(data_dir, d)))
    if len(classes) < 2:
        sys.exit(f"{data_dir}: expected at least 2 class folders, found {len(classes)}")
    pixels, labels = [], []
    for label, name in enumerate(classes):
        folder = os.path.join(data_dir, name)
        for file in sorted(os.listdir(folder)):
            if os.path.splitext(file)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            with Image.open(os.path.join(folder, file)) as im:
                im = im.convert("RGB").resize((size, size), Image.BILINEAR)
                pixels.append(F.pil_to_tensor(im))
            labels.append(label)
    return torch.stack(pixels), torch.tensor(labels, dtype=torch.long)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="folder of class subfolders of images")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not os.path.isdir(args.data):
        sys.exit(f"{args.data}: not a folder")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t = time.perf_counter()
    images, labels = load_images(args.data, args.size)
    decode_seconds = time.perf_counter() - t
    classes = int(labels.max()) + 1

    net = torchvision.models.mobilenet_v2(weights=None)
    prefix = net.features[:15].eval()
    for p in prefix.parameters():
        p.requires_grad_(False)
    suffix = torch.nn.Sequential(
        net.features[15:],
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(1280, classes),
    )
    # BatchNorm in inference mode (moving statistics; gamma and beta still train).
    suffix.eval()
    optimizer = torch.optim.Adam(suffix.parameters(), lr=args.lr)
    crop = RandomResizedCrop(args.size, scale=(0.8, 1.0), ratio=(3 / 4, 4 / 3))
    loss_fn = torch.nn.CrossEntropyLoss()

    def view(image: torch.Tensor) -> torch.Tensor:
        i, j, h, w = crop.get_params(image, crop.scale, crop.ratio)
        out = F.resized_crop(image, i, j, h, w, [args.size, args.size], antialias=False)
        return F.hflip(out) if torch.rand(1).item() < 0.5 else out

    def epoch() -> float:
        t0 = time.perf_counter()
        order = torch.randperm(len(images))
        for start in range(0, len(order), args.batch):
            rows = order[start : start + args.batch]
            x = torch.stack([view(images[r]) for r in rows]).float().div_(255)
            with torch.no_grad():
                cut = prefix(x)
            loss = loss_fn(suffix(cut), labels[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return time.perf_counter() - t0

    warmup = epoch()
    timed = epoch()
    print(
        json.dumps(
            {
                "images": len(images),
                "batch": args.batch,
                "threads": torch.get_num_threads(),
                "epoch_seconds": round(timed, 3),
                "warmup_epoch_seconds": round(warmup, 3),
                "decode_seconds": round(decode_seconds, 3),
                "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                "torch": torch.__version__,
                "torchvision": torchvision.__version__,
                "weights": "torchvision mobilenet_v2 architecture, seeded random init",
                "cut": "features[:15] frozen (Keras block_13_project_BN), features[15:] + head trained",
            }
        )
    )


if __name__ == "__main__":
    main()
