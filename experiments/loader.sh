#!/usr/bin/env bash
# Does the loader keep up? The loader measurement of docs/speed.md, offline, from Fashion-MNIST:
#   1. in memory (one uint8 tensor, batches augmented on the device), the `cifar` preset;
#   2. an image folder of 32 px PNGs (CIFAR-sized files), the `cifar` preset, 2 workers;
#   3. an image folder of 500x375 JPEGs (ImageNet's typical size, quality 90), the `vit_b16`
#      preset at 224 px, 2 workers.
# Each is `experiments/bench.py --dataset ...`: the training step of the three models, then the
# loader alone, and its rate against SemanticMIM's step. Needs data/FashionMNIST/raw/ (README).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data}
mkdir -p runs
python - "$DATA" <<'EOF'
# The two folders: Fashion-MNIST training images, one sub-folder per class, tinted RGB.
import os, sys
import torchvision
from PIL import Image
ds = torchvision.datasets.FashionMNIST(sys.argv[1], train=True)
for out, n, size, ext in (("runs/folder_png32", 2560, (32, 32), "png"),
                          ("runs/folder_jpeg500", 640, (500, 375), "jpg")):
    if os.path.isdir(out):
        continue
    for i in range(n):
        img, label = ds[i]
        d = os.path.join(out, "train", str(label))
        os.makedirs(d, exist_ok=True)
        rgb = Image.merge("RGB", (img, img.point(lambda v: v // 2), img.point(lambda v: 255 - v)))
        rgb.resize(size, Image.BICUBIC).save(os.path.join(d, f"{i}.{ext}"), quality=90)
    print(f"wrote {n} images of {size[0]}x{size[1]} to {out}")
EOF
WIDE=(--dim 192 --depth 6 --heads 3)   # docs/speed.md's rows: the cifar preset of that time
python experiments/bench.py "${WIDE[@]}" --amp none --batch-size 128 --dataset fashion_mnist \
  --data "$DATA" \
  | tee runs/loader_memory.txt
python experiments/bench.py "${WIDE[@]}" --amp none --batch-size 128 --dataset imagefolder \
  --data runs/folder_png32 --preset cifar --workers 2 | tee runs/loader_png32.txt
python experiments/bench.py --amp none --batch-size 8 --dataset imagefolder \
  --data runs/folder_jpeg500 --workers 2 | tee runs/loader_jpeg500.txt
