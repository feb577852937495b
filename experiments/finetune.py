"""Fine-tune a train.py checkpoint's encoder with timm, the authors' recipe at any scale.

configs/maskfeat/maskfeat_cls_ft.py, to the letter: AdamW at lr 8e-3 per 2048 images, weight decay
0.05 (none on norms, biases, tokens, positions), layer-wise lr decay 0.65; a linear warm-up from
1e-4 x the peak over a fifth of the epochs (20 of 100), then a cosine to 1e-6 over the rest (80),
per step; drop path 0.1; RandomResizedCrop + flip, RandAugment 'timm_increasing' (2 ops, magnitude
9, std 0.5), ColorJitter 0.4, RandomErasing 0.25; Mixup 0.8 or CutMix 1.0 per batch, label
smoothing 0.1; head trunc-normal std 2e-5, bias 2e-5; test: short edge 256/224 of the size, centre
crop; the feature is fc_norm of the patch mean.
The model is the file `probe.py --timm` writes, loaded as its printed line says; the data is the
checkpoint's data set through torchvision. ImageNet on GPUs: timm's own train.py (docs/finetune.md).

    python experiments/finetune.py runs/x/checkpoint.pt --epochs 2    # Fashion-MNIST, a CPU
    python experiments/finetune.py runs/x/checkpoint.pt --random      # the same ViT, timm's init
"""
import argparse
import json
import os
import random
import sys
import time

import numpy as np
import timm
import torch
import torchvision
from timm.data import Mixup, create_transform
from timm.data.transforms_factory import transforms_imagenet_train
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torchvision import transforms

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import probe  # noqa: E402
import train  # noqa: E402


def datasets(name, root, size, mean, std):
    """(training set with the recipe's augmentation, test set resized to size) as PIL datasets."""
    rgb = transforms.Lambda(lambda im: im.convert("RGB"))   # Fashion-MNIST is grayscale
    aug = transforms_imagenet_train(size, scale=(0.08, 1.0), hflip=0.5, color_jitter=0.4,
                                    force_color_jitter=True,  # timm drops it under RandAugment
                                    auto_augment="rand-m9-n2-mstd0.5-inc1", interpolation="bicubic",
                                    mean=mean, std=std, re_prob=0.25)
    test = create_transform(size, crop_pct=224 / 256, interpolation="bicubic", mean=mean, std=std)
    tfs = (transforms.Compose([rgb, aug]), transforms.Compose([rgb, test]))
    if name == "imagefolder":
        return [torchvision.datasets.ImageFolder(os.path.join(root, s), tf)
                for s, tf in zip(("train", "val"), tfs)]
    cls = getattr(torchvision.datasets, train.TORCHVISION[name])      # load_split's classes
    return [cls(root, train=t, download=True, transform=tf) for t, tf in zip((True, False), tfs)]


@torch.no_grad()
def top1(model, loader):
    model.eval()
    hits = sum((model(x).argmax(1) == y).sum().item() for x, y in loader)
    return hits / len(loader.dataset)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="a checkpoint.pt written by train.py")
    p.add_argument("--random", action="store_true", help="timm's random init, not the checkpoint")
    p.add_argument("--epochs", type=train.COUNT, default=2)
    p.add_argument("--batch-size", type=train.COUNT, default=256)
    p.add_argument("--lr", type=train.POSITIVE, default=8e-3, help="per 2048 images")
    p.add_argument("--data", default=None, help="None: the checkpoint's")
    p.add_argument("--workers", type=train.NATURAL, default=0)
    p.add_argument("--seed", type=train.NATURAL, default=0)
    args, t0 = train.one_line_errors(p).parse_args(), time.time()
    encoder, ckpt = train.load_model(args.checkpoint)
    saved, S = ckpt.get("args", {}), encoder.cfg.img_size
    dataset, mean, std = saved["dataset"], *train.MEAN_STD[saved["dataset"]]
    train_set, test_set = datasets(dataset, args.data or saved.get("data", "data"), S, mean, std)
    C, file = len(train_set.classes), os.path.join(os.path.dirname(args.checkpoint), "timm.pth")
    if not args.random:
        probe.export_timm(encoder, ckpt, file, args.checkpoint)

    # the model: the exported encoder (or timm's init), a new head of std 2e-5
    torch.manual_seed(args.seed)  # and below, the shuffle; Mixup draws from numpy, RandAugment
    random.seed(args.seed)        # from random: with --workers 0 a run repeats exactly
    np.random.seed(args.seed)
    model = timm.create_model("vit_base_patch16_224", pretrained=not args.random, num_classes=C,
                              drop_path_rate=0.1, **probe.timm_kwargs(encoder.cfg),
                              pretrained_cfg_overlay=dict(file=file, num_classes=0))
    torch.nn.init.trunc_normal_(model.head.weight, std=2e-5)
    torch.nn.init.constant_(model.head.bias, 2e-5)
    lr = args.lr * args.batch_size / 2048                   # the authors' linear scaling
    opt = create_optimizer_v2(model, "adamw", lr=lr, weight_decay=0.05, layer_decay=0.65)
    loader = torch.utils.data.DataLoader(train_set, args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.workers)
    test_loader = torch.utils.data.DataLoader(test_set, 512, num_workers=args.workers)
    steps = args.epochs * len(loader)
    warm = steps // 5                                       # then the cosine over the rest
    sched = CosineLRScheduler(opt, t_initial=steps - warm, lr_min=1e-6, warmup_t=warm,
                              warmup_lr_init=1e-4 * lr, warmup_prefix=True, t_in_epochs=False)
    mix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=C)
    loss_fn, step, curve = SoftTargetCrossEntropy(), 0, []

    for epoch in range(args.epochs):
        model.train()
        for x, y in loader:
            # the step: Mixup or CutMix of the batch, soft-target loss, AdamW, the lr of the step
            x, y = mix(x, y)
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            sched.step_update(step)
            if step % 50 == 0 or step == steps:
                print(f"epoch {epoch} step {step}/{steps} loss {loss.item():.4f} "
                      f"{step * args.batch_size / (time.time() - t0):.1f} img/s", flush=True)
        curve.append(top1(model, test_loader))
        print(f"epoch {epoch + 1}: test top-1 {100 * curve[-1]:.2f}%", flush=True)
    out = os.path.join(os.path.dirname(args.checkpoint),
                       f"finetune{'_random' if args.random else ''}_s{args.seed}.json")
    report = {"command": " ".join(["python"] + sys.argv), "checkpoint": args.checkpoint,
              "top1_per_epoch": curve, "epochs": args.epochs, "batch_size": args.batch_size,
              "lr": lr, "timm": timm.__version__, "minutes": (time.time() - t0) / 60}
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"{'random init' if args.random else 'fine-tuned'}: test top-1 {100 * curve[-1]:.2f}% "
          f"after {args.epochs} epochs ({report['minutes']:.1f} min); wrote {out}")


if __name__ == "__main__":
    main()
