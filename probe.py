"""Frozen-feature evaluation of a train.py checkpoint: linear-probe and kNN top-1, dense mIoU.

Beside the same network at its random initial weights and the raw pixels, the authors' protocols:
configs/maskfeat/maskfeat_cls_linear_probing.py, a linear classifier on the LayerNorm'd mean of a
block's patch tokens (or proxies, or both), once or (--augmented) per epoch of crops, and DINO's
kNN; with --dense, seg_linear_probing.py, a 1x1 convolution on the map of a block's patch tokens
that labels every pixel, of VOC 2012 or of Fashion-MNIST garments (one, or a 2x2 mosaic of four).

    python probe.py out/checkpoint.pt                    # its own data set, last block, patch mean
    python probe.py out/checkpoint.pt --pool patch proxy both --layer all --rows checkpoint
    python probe.py out/checkpoint.pt --dense mosaic --layer all   # or single; voc --data ROOT
    torchrun --nproc_per_node=8 probe.py run/checkpoint.pt --augmented --rows checkpoint random
"""
import argparse
import copy
import math
import os
import shlex
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torchvision.transforms import v2

import semanticmim as sm
import train

ROWS = {"checkpoint": "checkpoint", "random": "random weights", "pixels": "raw pixels"}
TEXT = {"linear_top1": "linear", "knn_top1": "kNN", "miou": "mIoU", "pixel_acc": "pixel accuracy"}
PIXELS_GIB = 8  # the raw-pixel row holds every image's pixels on rank 0's device: CIFAR-sized only
IGNORE, DENSE_TRAIN = 255, 10_000  # VOC's unlabelled boundary; garment training images (~VOC aug)
VOC = ("background aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse "
       "motorbike person pottedplant sheep sofa train tvmonitor").split()


# ---- Data: one split's labels and this rank's shard of its normalised images -------------------
def shard(n, rank, world):
    """This rank's contiguous part of range(n); the parts of ranks 0..world-1 cover it in order."""
    return range(n * rank // world, n * (rank + 1) // world)


def dense_split(args, split, S):
    """--dense data at the model's size S: images uint8 (n, C, S, S), label maps uint8 (n, S, S),
    class names. VOC 2012's train or val, image and mask squashed to S x S (the authors' val
    transform); or an in-memory set's images, labelled c + 1 where an image of class c is
    foreground, 0 (background) elsewhere: one per image ('single'), or four of four classes at half
    size in the quarters of a 2x2 mosaic ('mosaic'). Training images: the first DENSE_TRAIN."""
    if args.dense == "voc":  # VOC's own train split: SBD's train_aug (the authors') is not read
        ds = torchvision.datasets.VOCSegmentation(args.data, "2012", split.replace("test", "val"))
        size = lambda im, how: v2.functional.resize(v2.functional.pil_to_tensor(im), [S, S], how)
        x, m = zip(*[(size(im.convert("RGB"), v2.InterpolationMode.BICUBIC),
                      size(mask, v2.InterpolationMode.NEAREST)[0]) for im, mask in ds])
        x, m = torch.stack(x), torch.stack(m)               # (n, 3, S, S), (n, S, S)
        wrong = (m >= len(VOC)) & (m != IGNORE)             # (n, S, S)
        if wrong.any():
            raise SystemExit(f"error: {ds.masks[wrong.flatten(1).any(1).nonzero()[0, 0]]} holds "
                             f"label {m[wrong][0]}, not one of VOC's {len(VOC)} classes or "
                             f"{IGNORE}: replace that mask")
        return x, m, VOC
    images, labels, names = train.load_split(args.dataset, args.data, split, S,
                                             args.synthetic_size, seed=args.seed)
    n = min(len(labels), DENSE_TRAIN) if split == "train" else len(labels)
    half = args.dense == "mosaic"
    x = train.to_model_input(images[:n], S // (1 + half), (0,) * 3, (1,) * 3)  # (n, 3, s, s) 0..1
    m = (x.mean(1) > train.FOREGROUND_THRESHOLD[args.dataset]) * (labels[:n, None, None] + 1)
    if half:  # mosaic i: quarters idx[0..3][i], four images of four classes
        g, idx = torch.Generator().manual_seed(int(split == "train")), [torch.arange(n)]
        while len(idx) < 4:
            j = torch.randint(n, (n,), generator=g)         # (n,): redrawn where a class repeats
            while (clash := sum(labels[j] == labels[i] for i in idx) > 0).any():
                j[clash] = torch.randint(n, (int(clash.sum()),), generator=g)
            idx.append(j)
        x, m = (torch.cat([torch.cat([t[idx[0]], t[idx[1]]], -1),
                           torch.cat([t[idx[2]], t[idx[3]]], -1)], -2) for t in (x, m))  # S x S
    return (x * 255).round().byte(), m.byte(), ["background", *names]


def load_split(args, split, size, rank, world, device):
    """(labels (n,) or --dense label maps (n, S, S), class names, batches(epoch, augment) yielding
    this rank's shard in order (B, 3, size, size), maps(epoch) the label maps cropped and flipped
    as batches(epoch, True) crops them), crops and flips from (seed, epoch, image): N procs = 1."""
    images, labels, names = (dense_split(args, split, size) if args.dense else train.load_split(
        args.dataset, args.data, split, size, args.synthetic_size, seed=args.seed))
    n, (mean, std) = len(labels), train.MEAN_STD[args.dataset]
    if n < world:
        raise SystemExit(f"error: {n} images cannot be split over {world} processes")
    crops = images  # image folders: the same files, the Folder's train transform seeded per image
    if isinstance(images, train.Folder):
        crops = copy.copy(images)
        crops.transform = train.folder_transform(size, True, args.min_crop)

    def draws(epoch):  # in memory: crops and flips from the split's draws, (n, 5) one per image
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + epoch)
        return torch.rand(n, 5, generator=g)

    def batches(epoch, augment):
        keys, draw = [(epoch, i) for i in shard(n, rank, world)], None
        if augment and crops is images:
            r = draws(epoch)
            draw = lambda idx: r[idx.cpu()].to(device)      # noqa: E731  (B, 5): its images'
        return train.batches(crops if augment else images, keys, args.batch_size, device, size,
                             mean, std, args.workers, draw, args.min_crop)

    def maps(epoch):  # (n, S, S): the same crops, by nearest neighbour
        cut = train.augment(labels[:, None], size, draws(epoch), args.min_crop, "nearest")
        return (cut * 255).round()[:, 0]
    return labels, names, batches, maps


# ---- Features: pooled and LayerNorm'd, extracted per shard and gathered in data-set order -------
def layer_norm(x):
    """Parameter-free LayerNorm over the last dimension (the authors' probe feature)."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def pool_features(model, imgs, layers, pools):
    """Images (B, 3, S, S) -> {(pool, layer): LayerNorm'd mean of the layer's patch outputs (B, D),
    proxies (B, D), or for 'both' the two, patch part first (B, 2D); for 'map' (--dense) the patch
    outputs themselves (B, N*D), unnormalised as the authors' (no final norm)}, from one pass."""
    outs, _ = model.features(imgs, max(layers))             # per block: (B, P, D), (B, N, D)
    feats = {}
    for layer in layers:
        proxy, patch = outs[layer - 1]                      # (B, P, D), (B, N, D)
        for pool in pools:
            if pool == "map":                               # --dense: the tokens themselves
                feats[pool, layer] = patch.flatten(1)       # (B, N*D)
                continue
            parts = {"patch": [patch], "proxy": [proxy], "both": [patch, proxy]}[pool]
            feats[pool, layer] = torch.cat([layer_norm(t.mean(1)) for t in parts], 1)  # (B, F)
    return feats


def progress(what, total, unit, every=10.0):
    """update(done), printing train.py-style progress of `what` (done of total units, rate, ETA)
    at most every `every` seconds, and always once done == total."""
    t0 = last = time.time()

    def update(done):
        nonlocal last
        now = time.time()
        if now - last < every and done < total:
            return
        last, rate = now, done / max(now - t0, 1e-9)
        print(f"{what}: {done}/{total} {unit} {rate:.1f} {unit}/s eta "
              f"{(total - done) / max(rate, 1e-9) / 60:.1f} min", flush=True)
    return update


@torch.no_grad()
def extract(fn, batches, n, world, device, amp=None, what=None):
    """fn (images -> {key: (B, F)}) over this rank's shard, gathered to {key: (n, F)} float32 in
    data-set order on rank 0 (the only rank that fits and scores; the others keep their shard).
    With `what`, progress lines on rank 0 (of its shard)."""
    rank = dist.get_rank() if world > 1 else 0
    sizes = [len(shard(n, r, world)) for r in range(world)]
    update = progress(what, sizes[rank], "images") if what and rank == 0 else lambda done: None
    parts, done = {}, 0
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        for x in batches:
            for key, f in fn(x).items():
                parts.setdefault(key, []).append(f.float())  # (B, F)
            done += len(x)
            update(done)
    out = {key: torch.cat(p) for key, p in parts.items()}   # {key: (n_rank, F)}
    for key, f in out.items() if world > 1 else ():
        padded = f.new_zeros(max(sizes), f.shape[1])        # (rows, F): one length for all
        padded[:len(f)] = f
        pieces = [torch.empty_like(padded) for _ in range(world)] if rank == 0 else None
        dist.gather(padded, pieces)
        out[key] = torch.cat([p[:s] for p, s in zip(pieces, sizes)]) if rank == 0 else f  # (n, F)
    return out


# ---- Classifiers: a linear head, per image or (--dense) per pixel, and DINO's weighted kNN -----
def fit_head(features_of_epoch, targets_of_epoch, test_f, test_y, num_classes, epochs, lr,
             weight_decay, batch_size, seed=0, dim=None, what=None, head=None):
    """The test confusion matrix (C, C), counts of (label, prediction), of a linear head trained on
    features_of_epoch(e) and targets_of_epoch(e). Per image (dim None; the authors' linear probe):
    features (n, F), labels (n,); zero init (convex), AdamW, per-step cosine. Per pixel (dim D;
    seg_linear_probing.py): maps (n, h*w*D) of D-dim features, label maps (n, S, S); a 1x1 conv,
    weights N(0, 0.01^2), bias 0, its logits bilinearly upsampled to the label map; IGNORE pixels
    neither trained nor scored; SGD, momentum 0.9, lr x 0.1 after 2/5 and 4/5 of the epochs (their
    StepLR, 10 of 25). With `what`, progress lines of the epochs; with `head`, that Linear."""
    g, dev, C, ignore = torch.Generator().manual_seed(seed), test_f.device, num_classes, -100
    head = head or torch.nn.Linear(dim or test_f.shape[1], C, device=dev)
    torch.nn.init.zeros_(head.weight), torch.nn.init.zeros_(head.bias)
    if dim:  # the authors' head; bilinear upsampling (h, w) -> (S, S) as the matrix it is
        # (h*w, S*S): a matmul's backward is twice as fast as interpolate's on a CPU
        head.weight.data = (0.01 * torch.randn(head.weight.shape, generator=g)).to(dev)
        h, S, ignore = math.isqrt(test_f.shape[1] // dim), test_y.shape[-1], IGNORE
        up = F.interpolate(torch.eye(h * h, device=dev).view(-1, 1, h, h), size=(S, S),
                           mode="bilinear", align_corners=False).view(h * h, S * S)
    opt = (torch.optim.SGD(head.parameters(), lr, momentum=0.9, weight_decay=weight_decay) if dim
           else torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay))
    update = progress(what, epochs, "epochs") if what else lambda done: None

    def logits(f):  # (b, F) -> (b, C); per pixel (b, h*w*D) -> (b, C, S, S): the head on each
        if not dim:  # patch, then upsampled. The authors upsample first: the same (both are
            return head(f)  # linear, bilinear weights sum to 1), here at C/D of the cost
        z = head(f.view(len(f), h * h, dim)).transpose(1, 2)  # (b, C, h*w)
        return (z.reshape(-1, h * h) @ up).view(len(f), C, S, S)
    for epoch in range(epochs):
        feats, y = features_of_epoch(epoch), targets_of_epoch(epoch).to(dev).long()  # (n, F), (n,)
        order, steps = torch.randperm(len(y), generator=g).to(dev), -(-len(y) // batch_size)
        for i in range(steps):
            opt.param_groups[0]["lr"] = (lr * 0.1 ** (epoch * 5 // (2 * epochs)) if dim else
                                         train.lr_at(epoch * steps + i, epochs * steps, 0, lr, 0.0))
            idx = order[i * batch_size:(i + 1) * batch_size]  # (b,)
            loss = F.cross_entropy(logits(feats[idx]), y[idx], ignore_index=ignore,
                                   reduction="sum") / (y[idx] != ignore).sum().clamp(min=1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        update(epoch + 1)
    with torch.no_grad():  # in chunks: per pixel (b, C, S, S) logits each
        return sum(confusion(test_y[s:s + 256].to(dev).long(), logits(test_f[s:s + 256]).argmax(1),
                             C, ignore) for s in range(0, len(test_f), 256))


def confusion(y, pred, C, ignore=IGNORE):
    """(C, C) counts of (label, prediction) of the images or pixels whose label is not `ignore`."""
    keep = y != ignore                                      # (b[, S, S])
    return torch.bincount(C * y[keep] + pred[keep], minlength=C * C).view(C, C)


def scores(conf, names, dense):
    """Confusion (C, C) -> top-1; --dense: mean IoU over the classes in the labels (the authors'
    StreamSegMetrics averages all C: the same where each occurs, as in VOC val), IoU per class,
    pixel accuracy."""
    conf = conf.double()
    tp, labelled = conf.diag(), conf.sum(1)                 # (C,), (C,)
    iou = tp / (labelled + conf.sum(0) - tp).clamp(min=1)   # (C,)
    acc = (tp.sum() / conf.sum()).item()
    return {"miou": iou[labelled > 0].mean().item(), "pixel_acc": acc, "class_iou": dict(
        zip(names, iou.tolist()))} if dense else {"linear_top1": acc}


@torch.no_grad()
def knn_predict(train_f, train_y, test_f, num_classes, k=20, temperature=0.07, chunk=256):
    """DINO's eval_knn: cosine similarity of L2-normalised features, the k most similar training
    images vote for their class with weight exp(sim / T). Test images in chunks. (m,) classes."""
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    train_y, k, preds = train_y.to(train_f.device), min(k, len(train_f)), []
    for s in range(0, len(test_f), chunk):
        sim = test_f[s:s + chunk] @ train_f.T               # (b, n)
        top, idx = sim.topk(k, dim=1)                       # (b, k), (b, k)
        votes = torch.zeros(len(sim), num_classes, device=sim.device)  # (b, C)
        votes.scatter_add_(1, train_y[idx], (top / temperature).exp())
        preds.append(votes.argmax(1))                       # (b,)
    return torch.cat(preds)                                 # (m,)


# ---- The encoder for timm: fine-tuning is done there ----------------------------------------
# The authors' configs/maskfeat/maskfeat_cls_ft.py as flags of timm's own train.py (checked against
# its tag v1.0.28 with timm 1.0.31): 8 GPUs x 256, 20 warm-up epochs from 1e-4 x the peak, then a
# cosine over 80 more, per step; RandAugment 'timm_increasing'; head std and bias 2e-5; test crop
# 224 of 256. timm's train.py drops --color-jitter under --aa (the authors keep both).
AUTHORS_RECIPE = (
    "-b 256 --opt adamw --lr 8e-3 --weight-decay 0.05 --layer-decay 0.65 --epochs 80 "
    "--warmup-epochs 20 --warmup-prefix --sched cosine --sched-on-updates --warmup-lr 8e-7 "
    "--min-lr 1e-6 --drop-path 0.1 --aa rand-m9-n2-mstd0.5-inc1 --color-jitter 0.4 --reprob 0.25 "
    "--mixup 0.8 --cutmix 1.0 --smoothing 0.1 --head-init-scale 1e-3 --head-init-bias 2e-5 "
    "--crop-pct 0.875 --interpolation bicubic --amp --amp-dtype bfloat16").split()


def timm_kwargs(cfg):
    """timm VisionTransformer's arguments for the main stack: [PROXY] = register tokens with own
    position entries; 'avg' pool + fc_norm = the LayerNorm'd patch mean (the authors' ln2)."""
    return dict(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.dim,
                depth=cfg.depth, num_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True,
                class_token=False, reg_tokens=cfg.num_proxies, no_embed_class=False,
                global_pool="avg", fc_norm=True)


def export_timm(model, ckpt, path, ckpt_path):
    """The encoder for fine-tuning (--timm): the main stack under timm's names, a file timm's
    VisionTransformer(**timm_kwargs, num_classes=0) loads strictly; print how to load it, and the
    command of timm's train.py that fine-tunes it the authors' way.
    The patch Linear (D, p*p*3), in patchify's order, becomes the Conv2d (D, 3, p, p). Left out,
    pre-training only: [MASK] (its key makes timm read a DINOv2 file), mask stack, norm, head."""
    sd, p, D, S = model.state_dict(), model.cfg.patch_size, model.cfg.dim, model.cfg.img_size
    out = {"patch_embed.proj.weight": sd["patch_embed.weight"].reshape(D, p, p, 3)
           .permute(0, 3, 1, 2).contiguous(),              # (D, 3, p, p)
           "patch_embed.proj.bias": sd["patch_embed.bias"], "pos_embed": sd["pos_embed"],
           **({"reg_token": sd["proxy"]} if model.cfg.num_proxies else {}),
           **{k.replace("mlp.0.", "mlp.fc1.").replace("mlp.2.", "mlp.fc2."): v
              for k, v in sd.items() if k.startswith("blocks.")},
           "fc_norm.weight": torch.ones(D), "fc_norm.bias": torch.zeros(D)}  # the probe's LN
    train.write_atomic(path, lambda tmp: torch.save(out, tmp), "the timm file")
    saved, kw = ckpt.get("args", {}), timm_kwargs(model.cfg)
    dataset = saved.get("dataset", "imagefolder")
    (mean, std), folder = train.MEAN_STD[dataset], dataset == "imagefolder"
    classes = ckpt.get("data", {}).get("classes")            # recorded by train.py; else a guess
    C = len(classes) if classes else {"cifar100": 100, "imagefolder": 1000}.get(dataset, 10)
    line = ", ".join(f"{k}={v!r}" for k, v in kw.items())
    command = shlex.join(  # timm's train.py passes global_pool=--gp itself: not a model kwarg
        ["torchrun", "--nproc_per_node=8", "train.py", "--data-dir", saved.get("data", "DIR")
         if folder else "IMAGE_FOLDER", "--val-split", "val", "--model", "vit_base_patch16_224",
         "--pretrained", "--pretrained-path", path, "--num-classes", str(C), "--gp", "avg",
         "--model-kwargs", *(f"{k}={v}" for k, v in kw.items() if k != "global_pool"),
         "--input-size", "3", str(S), str(S), "--mean", *map(str, mean), "--std", *map(str, std),
         *AUTHORS_RECIPE])
    print(f"wrote {path}, the encoder of step {ckpt.get('step')} for timm; with a new head:\n"
          f"  model = timm.create_model('vit_base_patch16_224', pretrained=True, num_classes={C}, "
          f"drop_path_rate=0.1, {line}, pretrained_cfg_overlay=dict(file={path!r}, num_classes=0, "
          f"mean={mean}, std={std}, input_size=(3, {S}, {S})))\nfine-tune it the authors' way "
          f"with timm's own train.py (an image folder with train/ and val/; docs/finetune.md):\n  "
          f"{command}\nor on a CPU: python experiments/finetune.py {shlex.quote(ckpt_path)}")


# ---- Arguments and the run ----------------------------------------------------------------------
def layer_arg(text):
    """--layer values: a block number or 'all' (checked against the checkpoint in load)."""
    if text != "all" and not text.lstrip("+-").isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is neither a block number nor 'all'")
    return text if text == "all" else int(text)


def build_parser():
    p = argparse.ArgumentParser(prog="probe.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    add("checkpoint", help="a checkpoint.pt written by train.py")
    add("--dataset", choices=train.DATASETS, default=None, help="None: the checkpoint's own")
    add("--data", default=None, help="data root (None: the checkpoint's own); for imagefolder "
        "the folder holding train/ and val/")
    add("--synthetic-size", type=train.COUNT, default=None, help="None: the checkpoint's")
    add("--pool", nargs="+", choices=("patch", "proxy", "both"), default=["patch"],
        help="mean of the patch tokens (authors'), of the proxies, or both (one pass for all)")
    add("--layer", nargs="+", type=layer_arg, default=None,
        help="main blocks, 1..depth, or 'all' (None: the last; one pass for all)")
    add("--rows", nargs="+", choices=tuple(ROWS), help="the checkpoint, the same network at its "
        f"initial weights, the raw pixels (None: all; the pixels only up to {PIXELS_GIB} GiB)")
    add("--dense", choices=("single", "mosaic", "voc"), help="label pixels, not images: one "
        "garment an image, a 2x2 mosaic of four (Fashion-MNIST style), or VOC 2012 (--data ROOT)")
    add("--epochs", type=train.COUNT, help="classifier epochs (None: 100; --dense 25)")
    add("--lr", type=train.POSITIVE, help="None: 4e-3 (batch 1024); --dense 0.01 per 60 images")
    add("--weight-decay", type=train.NONNEGATIVE, default=1e-4)
    add("--probe-batch-size", type=train.COUNT, help="classifier batch (None: 1024; --dense 60)")
    add("--augmented", action="store_true", help="the authors' protocol: training features "
        "recomputed every epoch from RandomResizedCrop + flip images (and --dense label maps)")
    add("--min-crop", type=train.FRACTION, help="--augmented crop scale (None: 0.08; --dense 0.8)")
    add("--k", type=train.COUNT, default=20, help="kNN neighbours")
    add("--temperature", type=train.POSITIVE, default=0.07, help="kNN temperature")
    add("--batch-size", type=train.COUNT, default=256, help="feature-extraction batch per process")
    add("--amp", choices=("bf16", "none"), default="none", help="autocast dtype for features")
    add("--workers", type=train.NATURAL, default=8, help="DataLoader workers (image folders)")
    add("--device", choices=("auto", "cpu", "cuda"), default="auto")
    add("--seed", type=train.NATURAL, default=0, help="classifier order and augmentation")
    add("--out", help="JSON file (None: probe_<pool>_L<layer>[_<dataset>][_aug].json beside it)")
    add("--timm", metavar="FILE", help="instead of probing: write the encoder as a timm "
        "VisionTransformer file (e.g. RUN/timm.pth) and print how to load and fine-tune it")
    return train.one_line_errors(p)


def load(args):
    """The checkpoint's model and dict, with the data, layer and file settings they imply."""
    model, ckpt = train.load_model(args.checkpoint)
    saved, cfg = ckpt.get("args", {}), model.cfg
    args.dataset = args.dataset or saved.get("dataset", "cifar10")
    if args.data is None and args.dataset == saved.get("dataset"):
        args.data = saved.get("data", "data")
    elif args.data is None and args.dataset == "imagefolder":
        raise SystemExit("error: --dataset imagefolder needs --data DIR")
    args.data, args.pool = args.data or "data", list(dict.fromkeys(args.pool))  # each pool once
    for k, v in dict(epochs=(100, 25), probe_batch_size=(1024, 60), min_crop=(0.08, 0.8)).items():
        setattr(args, k, getattr(args, k) or v[bool(args.dense)])
    args.lr = args.lr or (0.01 * args.probe_batch_size / 60 if args.dense else 4e-3)
    args.synthetic_size = args.synthetic_size or saved.get("synthetic_size", 1024)
    layers = args.layer or [cfg.depth]
    args.layer = sorted(set(range(1, cfg.depth + 1) if "all" in layers else layers))
    bad = [layer for layer in args.layer if not 1 <= layer <= cfg.depth]
    if bad:
        raise SystemExit(f"error: --layer {bad[0]} does not exist: this checkpoint has main "
                         f"blocks 1..{cfg.depth}")
    seg, p = os.path.join(args.data, "VOCdevkit", "VOC2012", "SegmentationClass"), cfg.patch_size
    for bad, message in (  # --dense: the data fits the checkpoint
            (args.dense and args.pool != ["patch"], "--dense probes the map of patch tokens: "
             "leave out --pool"),
            (args.dense == "voc" and not os.path.isdir(seg), f"no folder {seg}: pass --data ROOT "
             f"holding VOC 2012 as torchvision's VOCSegmentation reads it (ROOT/VOCdevkit/...)"),
            (args.dense in ("single", "mosaic") and args.dataset not in train.FOREGROUND_THRESHOLD,
             f"--dense {args.dense} labels garments on a black background, not {args.dataset} "
             f"images: use a fashion_mnist checkpoint or --dataset fashion_mnist, or --dense voc"),
            (args.dense == "mosaic" and cfg.img_size % (2 * p), f"--dense mosaic puts a garment "
             f"in each quarter: image size {cfg.img_size} does not halve into {p}-pixel patches")):
        if bad:
            raise SystemExit(f"error: {message}")
    args.pool = ["map"] if args.dense else args.pool
    if args.pool != ["patch"] and cfg.num_proxies == 0:
        raise SystemExit(f"error: --pool {' '.join(args.pool)} needs proxies, but this "
                         f"checkpoint has none (num_proxies 0): use --pool patch")
    if args.augmented and len(args.pool) * len(args.layer) > 1:
        raise SystemExit("error: --augmented recomputes the features every epoch: give one "
                         "--pool and one --layer")
    if args.dataset == "imagefolder" and os.path.isdir(args.data) and not (args.timm or args.dense):
        if not all(os.path.isdir(os.path.join(args.data, s)) for s in ("train", "val")):
            raise SystemExit(f"error: the probe needs a held-out split: {args.data}/train and "
                             f"{args.data}/val, each with one sub-folder of images per class")
        args.workers = train.usable_workers(args.workers, say=os.environ.get("RANK", "0") == "0")
    all_ = len(args.layer) == cfg.depth > 1
    name = (f"probe_{'dense-' + args.dense if args.dense else '-'.join(args.pool)}_L"
            f"{'all' if all_ else '-'.join(map(str, args.layer))}"
            f"{'_' + args.dataset if args.dataset != saved.get('dataset') else ''}"
            f"{'_aug' if args.augmented else ''}.json")
    args.out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), name)
    train.check_output(args.timm or args.out, reading=args.checkpoint)  # before any work
    return model, ckpt


def write_report(args, argv, ckpt, world, device, sizes, num_classes, results, t0):
    """The JSON report at args.out, and the printed table."""
    one = {k: v[0] if len(v) == 1 else v for k, v in (("pool", args.pool), ("layer", args.layer))}
    report = {"command": shlex.join(train.launcher(world).split() + ["probe.py"] + argv),
              "checkpoint": os.path.abspath(args.checkpoint), "step": ckpt.get("step"),
              "config": ckpt["config"], "dataset": args.dataset, "data": args.data,
              "train_images": sizes[0], "test_images": sizes[1], "num_classes": num_classes,
              **one, **{k: getattr(args, k) for k in (
                  "dense", "augmented", "min_crop", "epochs", "lr", "weight_decay",
                  "probe_batch_size", "k", "temperature", "seed")},
              "processes": world, "device": str(device), "rows": results,
              "wall_time_s": round(time.time() - t0, 2)}
    train.write_json(args.out, report)
    what = f" --dense {args.dense}" if args.dense else ""
    print(f"probe of {args.checkpoint} (step {report['step']}) on {args.dataset}{what}: "
          f"{sizes[0]} train / {sizes[1]} test images, {args.epochs} epochs"
          f"{' augmented' * args.augmented}{'' if what else f', kNN k={args.k}'}: wrote "
          f"{args.out} ({report['wall_time_s']:.1f} s)\ncommand: "
          f"{report['command']}")
    return report


def main(argv=None):
    """(report or None off rank 0, {(row, pool, layer): (train, test features)})."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args, t0 = build_parser().parse_args(argv), time.time()
    model, ckpt = load(args)
    if args.timm:  # one file, written by rank 0 alone under torchrun
        if os.environ.get("RANK", "0") == "0":
            export_timm(model, ckpt, args.timm, args.checkpoint)
        return None, {}
    rank, world, device = train.setup_distributed(args.device)
    amp, S = torch.bfloat16 if args.amp == "bf16" else None, model.cfg.img_size
    train_y, names, train_batches, train_maps = load_split(args, "train", S, rank, world, device)
    test_y, _, test_batches, _ = load_split(args, "test", S, rank, world, device)
    C, p = len(names), model.cfg.patch_size                 # classes (--dense: with background)
    kind, dims = "dense" if args.dense else "linear", lambda f: (  # --dense: per patch
        f.shape[1] * p ** 2 // S ** 2 if args.dense else f.shape[1])
    gib = (len(train_y) + len(test_y)) * 3 * S * S * 4 / 2 ** 30  # the raw-pixel row, float32
    if gib > PIXELS_GIB and "pixels" in (args.rows or []):
        raise SystemExit(f"error: --rows pixels would hold {gib:.3g} GiB of raw pixels on one "
                         f"device (at most {PIXELS_GIB}): leave out pixels for this data set")
    if args.rows is None:
        args.rows = list(ROWS)[:2 if gib > PIXELS_GIB else 3]
        if gib > PIXELS_GIB and rank == 0:
            print(f"note: no raw-pixel row: it would hold {gib:.3g} GiB on one device", flush=True)
    nets = {"checkpoint": model}
    if "random" in args.rows:  # seeded as train.py seeds it: the checkpoint's own initialisation
        torch.manual_seed(ckpt.get("args", {}).get("seed", args.seed))
        nets["random"] = sm.SemanticMIM(model.cfg)
    fns = {name: (lambda x, m=net.to(device).eval(): pool_features(m, x, args.layer, args.pool))
           for name, net in nets.items()}
    fns["pixels"] = lambda x: {("pixels", None): sm.patchify(x, p).flatten(1) if args.dense
                               else layer_norm(x.flatten(1))}  # (B, N*3p^2) or (B, 3*S*S)

    def fit(features_of_epoch, test_f, what):               # the head of one row
        maps = (lambda e: train_maps(e + 1)) if args.dense and args.augmented else lambda e: train_y
        return fit_head(features_of_epoch, maps, test_f, test_y, C, args.epochs, args.lr,
                        args.weight_decay, args.probe_batch_size, args.seed,
                        dims(test_f) if args.dense else None, f"{kind} probe, {what}")
    features, linear = {}, {}  # every collective first: no rank waits long for rank 0's fits
    for name in (r for r in ROWS if r in args.rows):
        tr = extract(fns[name], train_batches(0, False), len(train_y), world, device, amp,
                     f"{ROWS[name]} features, train")      # {(pool, layer): (n, F)}
        te = extract(fns[name], test_batches(0, False), len(test_y), world, device, amp,
                     f"{ROWS[name]} features, test")       # {(pool, layer): (m, F)}
        features.update({(name, *key): (tr[key], te[key]) for key in tr})
    for key in features if args.augmented else []:  # training features of epoch e: its crops
        def epoch_features(e, fn=fns[key[0]], k=key[1:]):
            return extract(fn, train_batches(e + 1, True), len(train_y), world, device, amp)[k]
        if rank == 0:
            linear[key] = fit(epoch_features, features[key][1], ROWS[key[0]])
        for e in range(args.epochs) if rank > 0 else ():    # the collectives of rank 0's epochs
            epoch_features(e)
    if world > 1:
        dist.destroy_process_group()
    if rank > 0:
        return None, features
    results = []
    for (name, pool, layer), (tr, te) in features.items():  # (n, F), (m, F)
        label = ROWS[name] if name == "pixels" else f"{ROWS[name]} {pool} L{layer}"
        conf = linear[name, pool, layer] if args.augmented else fit(lambda e: tr, te, label)
        row = scores(conf, names, args.dense)
        if not args.dense:
            pred = knn_predict(tr, train_y, te, C, args.k, args.temperature)  # (m,)
            row["knn_top1"] = (pred == test_y.to(pred.device)).float().mean().item()
        results.append({"row": ROWS[name], **row, "dims": dims(tr), "pool": pool, "layer": layer})
        print(f"{label}: " + "  ".join(f"{TEXT[k]} {100 * v:.2f}%" for k, v in row.items() if k in
              TEXT) + f"  ({dims(tr)} dims, {time.time() - t0:.0f} s)", flush=True)
    return write_report(args, argv, ckpt, world, device, (len(train_y), len(test_y)),
                        C, results, t0), features


if __name__ == "__main__":
    train.run_main(main)
