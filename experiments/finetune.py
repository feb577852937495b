"""Fine-tune a train.py checkpoint's encoder with timm: the authors' recipe at any scale, or ours.

configs/maskfeat/maskfeat_cls_ft.py, to the letter: AdamW at lr 8e-3 per 2048 images, weight decay
0.05 (none on norms, biases, tokens, positions), layer-wise lr decay 0.65; a linear warm-up from
1e-4 x the peak over a fifth of the epochs (20 of 100), then a cosine to 1e-6 over the rest (80),
per step; drop path 0.1; RandomResizedCrop + flip, RandAugment 'timm_increasing' (2 ops, magnitude
9, std 0.5), ColorJitter 0.4, RandomErasing 0.25; Mixup 0.8 or CutMix 1.0 per batch, label
smoothing 0.1; head trunc-normal std 2e-5, bias 2e-5; test: short edge 256/224 of the size, centre
crop; the feature is fc_norm of the patch mean.
The model is the file `probe.py --timm` writes, loaded as its printed line says; the data is the
checkpoint's data set through torchvision. ImageNet on GPUs: timm's own train.py (docs/finetune.md).

--recipe ours, for small images and a few epochs on a CPU (not the authors'): LP-FT (Kumar et al.,
ICLR 2022), the head first trained as probe.py's linear probe on the frozen feature (from --random:
a new head), then everything fine-tuned with RandomResizedCrop (scale --min-crop to 1, ratio 3/4
to 4/3) + flip of the in-memory images, label smoothing 0.1, drop path 0.1, AdamW with layer decay
0.75 at lr 1e-3 per 256 (2e-3 from --random), warm-up over a tenth of the steps then cosine; no
RandAugment, Mixup, CutMix. --val holds out the last 10,000 training images and scores on them,
never on the test split: these choices were made there, at 2 epochs (docs/finetune.md).

    python experiments/finetune.py runs/x/checkpoint.pt --epochs 2    # Fashion-MNIST, a CPU
    python experiments/finetune.py runs/x/checkpoint.pt --random      # the same ViT, timm's init
    python experiments/finetune.py runs/x/checkpoint.pt --recipe ours --lr 3e-4 --val
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
import torch.nn.functional as F
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


VAL = 10_000  # --val: the last training images, held out


def datasets(name, root, size, mean, std, val):
    """(training set with the recipe's augmentation, test set resized to size, classes) as PIL
    datasets; with val, the first and the last VAL training images."""
    rgb = transforms.Lambda(lambda im: im.convert("RGB"))   # Fashion-MNIST is grayscale
    aug = transforms_imagenet_train(size, scale=(0.08, 1.0), hflip=0.5, color_jitter=0.4,
                                    force_color_jitter=True,  # timm drops it under RandAugment
                                    auto_augment="rand-m9-n2-mstd0.5-inc1", interpolation="bicubic",
                                    mean=mean, std=std, re_prob=0.25)
    test = create_transform(size, crop_pct=224 / 256, interpolation="bicubic", mean=mean, std=std)
    tfs = (transforms.Compose([rgb, aug]), transforms.Compose([rgb, test]))
    if name == "imagefolder":
        sets = [torchvision.datasets.ImageFolder(os.path.join(root, s), tf)
                for s, tf in zip(("train", "val"), tfs)]
        return *sets, len(sets[0].classes)
    cls = getattr(torchvision.datasets, train.TORCHVISION[name])      # load_split's classes
    sets = [cls(root, train=t, download=True, transform=tf) for t, tf in zip((True, val), tfs)]
    n, C = len(sets[0]), len(sets[0].classes)
    if val:
        sets = [torch.utils.data.Subset(s, r) for s, r in zip(sets, (range(n - VAL), range(
            n - VAL, n)))]
    return *sets, C


def in_memory(name, root, size, val):
    """((train images uint8, labels), (test images, labels), classes) of an in-memory set
    (--recipe ours); with val, the first and the last VAL training images."""
    if name == "imagefolder":
        raise SystemExit("error: --recipe ours reads the images into memory: not an image folder")
    x, y, classes = train.load_split(name, root, "train", size)
    cut = len(y) - VAL if val else len(y)
    return ((x[:cut], y[:cut]), (x[cut:], y[cut:]) if val else train.load_split(
        name, root, "test", size)[:2], len(classes))


def batches(images, labels, epoch, order, batch, size, mean, std, min_crop=None):
    """(images (B, 3, S, S), labels (B,)) of the in-memory set in `order`, with min_crop
    RandomResizedCrop + flip drawn from (epoch, image)."""
    g = torch.Generator().manual_seed(1_000_003 + epoch)
    r = torch.rand(len(labels), 5, generator=g)             # (n, 5): one row per image
    draw = None if min_crop is None else (lambda idx: r[idx])   # noqa: E731
    x = train.batches(images, [(epoch, int(i)) for i in order], batch, torch.device("cpu"), size,
                      mean, std, draw=draw, min_crop=min_crop or 0.5)
    return zip(x, labels[order].split(batch))


@torch.no_grad()
def top1(model, items):
    model.eval()
    hits = total = 0
    for x, y in items:
        hits, total = hits + (model(x).argmax(1) == y).sum().item(), total + len(y)
    return hits / total


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="a checkpoint.pt written by train.py")
    p.add_argument("--random", action="store_true", help="timm's random init, not the checkpoint")
    p.add_argument("--recipe", choices=("authors", "ours"), default="authors")
    p.add_argument("--epochs", type=train.COUNT, default=2)
    p.add_argument("--batch-size", type=train.COUNT, default=256)
    p.add_argument("--lr", type=train.POSITIVE, help="peak lr per 256 images (None: the "
                   "authors' 8e-3 per 2048 = 1e-3; ours 1e-3, from --random 2e-3)")
    p.add_argument("--min-crop", type=train.FRACTION, default=1.0, help="ours: crop scale (0.5 "
                   "cuts away up to half a 28-pixel garment: 3 to 7 points lower on --val)")
    p.add_argument("--val", action="store_true", help=f"train on all but the last {VAL:,} "
                   "training images and score on those, not on the test split")
    p.add_argument("--data", default=None, help="None: the checkpoint's")
    p.add_argument("--workers", type=train.NATURAL, default=0)
    p.add_argument("--seed", type=train.NATURAL, default=0)
    args, t0 = train.one_line_errors(p).parse_args(), time.time()
    encoder, ckpt = train.load_model(args.checkpoint)
    saved, S, ours = ckpt.get("args", {}), encoder.cfg.img_size, args.recipe == "ours"
    dataset, mean, std = saved["dataset"], *train.MEAN_STD[saved["dataset"]]
    root = args.data or saved.get("data", "data")
    if ours:
        (xtr, ytr), (xte, yte), C = in_memory(dataset, root, S, args.val)
    else:
        train_set, test_set, C = datasets(dataset, root, S, mean, std, args.val)
    n = len(ytr) if ours else len(train_set)
    file = os.path.join(os.path.dirname(args.checkpoint), "timm.pth")
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
    ours_lr = 2e-3 if args.random else 1e-3                 # chosen on --val (docs/finetune.md)
    lr = (args.lr or (ours_lr if ours else 8e-3 / 2048 * 256)) * args.batch_size / 256  # linear
    opt = create_optimizer_v2(model, "adamw", lr=lr, weight_decay=0.05,
                              layer_decay=0.75 if ours else 0.65)
    steps = args.epochs * (n // args.batch_size)            # full batches, as drop_last
    warm = steps // (10 if ours else 5)                     # then the cosine over the rest
    sched = CosineLRScheduler(opt, t_initial=steps - warm, lr_min=1e-6, warmup_t=warm,
                              warmup_lr_init=1e-4 * lr, warmup_prefix=True, t_in_epochs=False)
    step, curve, probe_top1 = 0, [], None
    if ours:
        test = lambda: batches(xte, yte, 0, torch.arange(len(yte)), 512, S, mean, std)  # noqa
    if ours and not args.random:
        # LP: the head as probe.py's linear probe of the frozen feature (fc_norm of the mean). From
        # random init the head starts new: a probe of random features ended 4 points lower on --val
        order = torch.arange(n)
        with torch.no_grad():
            model.eval()
            feats = [torch.cat([model.forward_head(model.forward_features(x), pre_logits=True)
                                for x, _ in b]) for b in (batches(xtr, ytr, 0, order, 512, S,
                                                                  mean, std), test())]
        conf = probe.fit_head(lambda e: feats[0], lambda e: ytr, feats[1], yte, C, 100, 4e-3,
                              1e-4, 1024, args.seed, head=model.head)
        probe_top1 = (conf.trace() / conf.sum()).item()
        print(f"linear probe of the frozen feature: top-1 {100 * probe_top1:.2f}%", flush=True)
    elif not ours:
        mix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=C)
        soft = SoftTargetCrossEntropy()
        loader = torch.utils.data.DataLoader(train_set, args.batch_size, shuffle=True,
                                             drop_last=True, num_workers=args.workers)
        test_loader = torch.utils.data.DataLoader(test_set, 512, num_workers=args.workers)

    for epoch in range(args.epochs):
        model.train()
        if ours:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed + epoch))
            items = batches(xtr, ytr, epoch + 1, order[:steps // args.epochs * args.batch_size],
                            args.batch_size, S, mean, std, args.min_crop)
        else:
            items = loader
        for x, y in items:
            # the step: (the authors': Mixup or CutMix of the batch, soft targets) the loss,
            # AdamW, the lr of the step
            if ours:
                loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            else:
                x, y = mix(x, y)
                loss = soft(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            sched.step_update(step)
            if step % 50 == 0 or step == steps:
                print(f"epoch {epoch} step {step}/{steps} loss {loss.item():.4f} "
                      f"{step * args.batch_size / (time.time() - t0):.1f} img/s", flush=True)
        curve.append(top1(model, test() if ours else test_loader))
        print(f"epoch {epoch + 1}: {'val' if args.val else 'test'} top-1 {100 * curve[-1]:.2f}%",
              flush=True)
    name = "finetune" + "_random" * args.random + "_ours" * ours + "_val" * args.val
    out = os.path.join(os.path.dirname(args.checkpoint), f"{name}_s{args.seed}.json")
    report = {"command": " ".join(["python"] + sys.argv), "checkpoint": args.checkpoint,
              "recipe": args.recipe, "scored_on": "val" if args.val else "test",
              "top1_per_epoch": curve, "probe_top1": probe_top1, "epochs": args.epochs,
              "batch_size": args.batch_size, "lr": lr, "min_crop": args.min_crop * ours or None,
              "timm": timm.__version__, "minutes": (time.time() - t0) / 60}
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"{'random init' if args.random else 'fine-tuned'}: {report['scored_on']} top-1 "
          f"{100 * curve[-1]:.2f}% after {args.epochs} epochs ({report['minutes']:.1f} min); "
          f"wrote {out}")


if __name__ == "__main__":
    main()
