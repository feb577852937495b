"""Frozen-feature evaluation of a train.py checkpoint: linear-probe and kNN top-1.

The checkpoint is probed beside the same network with its random initial weights and raw pixels.

    python probe.py out/checkpoint.pt                    # its own data set, last block, patch mean
    python probe.py out/checkpoint.pt --pool both --layer 4
    python probe.py out/checkpoint.pt --pool patch proxy --layer all --rows checkpoint
    python probe.py out/checkpoint.pt --dataset fashion_mnist --data data
    torchrun --nproc_per_node=8 probe.py run/checkpoint.pt --augmented --rows checkpoint random
        # the authors' protocol on ImageNet; raw pixels at 224 px: too big to store

The settings follow the authors' configs/maskfeat/maskfeat_cls_linear_probing.py
(github.com/yyk-wew/SemanticMIM). Feature: the parameter-free LayerNorm of the mean of a main
block's patch tokens (`--pool proxy`: of its proxy tokens, which for the authors' MaskFeat
baseline settings is their single [CLS]; `--pool both`: the two, each so normalised,
concatenated). Several pools and blocks (`--layer all`) are probed from one pass over the images.
By default the features are extracted once, without augmentation, and the linear classifier
(AdamW, cosine, lr 4e-3, wd 1e-4, batch 1024, 100 epochs, as the authors) trains on the stored
features: a CIFAR-size probe takes minutes on a CPU. --augmented recomputes the training features
every epoch from RandomResizedCrop + flip images instead, as the authors do on ImageNet. kNN
(DINO's eval_knn: cosine similarity, the k = 20 nearest vote with weights exp(sim / 0.07)) always
uses the stored, un-augmented features. Progress lines (images done, images/s, ETA; classifier
epochs) appear about every 10 s on rank 0.
Under torchrun every process extracts a contiguous shard of the images; the gathered features
are in data-set order and the classifiers run on rank 0. The table is also written as JSON next
to the checkpoint.
"""
import argparse
import json
import os
import shlex
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader

import common
import data
import semanticmim as sm
import train

ROWS = {"checkpoint": "checkpoint", "random": "random weights", "pixels": "raw pixels"}


# --------------------------------------------------------------------------------------------
# Data: one split as labels plus this rank's shard of normalised images, in data-set order
# --------------------------------------------------------------------------------------------
def shard(n, rank, world):
    """This rank's contiguous part of range(n); the parts of ranks 0..world-1 cover it in order."""
    return range(n * rank // world, n * (rank + 1) // world)


def load_split(args, size, train_split, rank, world, device):
    """Returns (labels (n,), num_classes, batches) where batches(epoch, augment) yields this
    rank's shard in order as normalised images (B, 3, size, size) on the device. With augment,
    RandomResizedCrop + flip drawn from (seed, epoch, image index) alone, so that the same images
    come out whatever the number of processes."""
    mean, std = data.MEAN_STD[args.dataset]
    if args.dataset == "imagefolder":
        root = data.find_image_folder(args.data, "train" if train_split else "val")
        if not all(os.path.isdir(os.path.join(args.data, s)) for s in ("train", "val")):
            raise SystemExit(f"error: the probe needs a held-out split: {args.data}/train and "
                             f"{args.data}/val, each with one sub-folder of images per class")
        plain, aug = (data.SeededFolder(root, data.folder_transform(
            size, augment, mean, std, args.min_crop), args.seed) for augment in (False, True))
        labels, num_classes = torch.tensor(plain.folder.targets), len(plain.folder.classes)
    else:
        images, labels = data.load_memory_dataset(args.dataset, args.data, train_split, size,
                                                   args.synthetic_size)  # (n, C, h, w) uint8
        num_classes = int(labels.max()) + 1
    n = len(labels)
    if n < world:
        raise SystemExit(f"error: {n} images cannot be split over {world} processes")
    part = shard(n, rank, world)

    def batches(epoch, augment):
        if args.dataset == "imagefolder":
            loader = DataLoader(aug if augment else plain, batch_size=args.batch_size,
                                sampler=[(epoch, i) for i in part], num_workers=args.workers,
                                pin_memory=device.type == "cuda",
                                collate_fn=data.collate_images)
            yield from data.folder_batches(loader, device)  # (B, 3, S, S) each
            return
        if augment:
            g = torch.Generator().manual_seed(args.seed * 1_000_003 + epoch)
            r = torch.rand(n, 5, generator=g)               # (n, 5): the whole split's draws
        for s in range(part.start, part.stop, args.batch_size):
            e = min(s + args.batch_size, part.stop)
            x = images[s:e].to(device)                      # (B, C, h, w) uint8
            if augment:
                x = data.augment(x, size, r[s:e].to(device), args.min_crop)  # (B, C, S, S)
            yield data.to_model_input(x, size, mean, std)  # (B, 3, S, S)

    return labels, num_classes, batches


# --------------------------------------------------------------------------------------------
# Features: pooled and LayerNorm'd, extracted per shard and gathered in data-set order
# --------------------------------------------------------------------------------------------
def layer_norm(x):
    """Parameter-free LayerNorm over the last dimension (the authors' probe feature)."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def pool_tokens(proxy, patch, pool):
    """Proxy (B, P, D) and patch (B, N, D) outputs -> the feature (B, D), or (B, 2D) for 'both'
    (patch part first): each mean LayerNorm'd without parameters."""
    parts = {"patch": [patch], "proxy": [proxy], "both": [patch, proxy]}[pool]
    return torch.cat([layer_norm(t.mean(1)) for t in parts], 1)  # (B, D) or (B, 2D)


def layer_features(model, imgs, layers, pools):
    """Images (B, 3, S, S) -> {(pool, layer): features} for every pool and layer, from one pass
    of the main stack."""
    outs = model.features_per_layer(imgs, layers)           # {layer: ((B, P, D), (B, N, D))}
    return {(pool, layer): pool_tokens(*outs[layer], pool) for layer in layers for pool in pools}


def pool_features(model, imgs, layer=None, pool="patch"):
    """Images (B, 3, S, S) -> features (B, D), or (B, 2D) for pool 'both', of one block."""
    return pool_tokens(*model.features(imgs, layer), pool)


def pixel_features(imgs):
    """The normalised model-input pixels, flattened and LayerNorm'd: (B, 3*S*S)."""
    return layer_norm(imgs.flatten(1))                      # (B, 3*S*S)


def progress(what, total, unit, every=10.0):
    """A function update(done) that prints train.py-style progress of `what` (done of total
    units, rate, ETA) at most every `every` seconds, and always once done == total."""
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
    """fn (images -> {key: (B, F)}) over this rank's shard of batches, gathered: {key: (n, F)}
    float32 features in data-set order, on every rank. Shards are padded to the same length for
    all_gather, then trimmed. With `what`, progress lines on rank 0 (its shard's images)."""
    rank = dist.get_rank() if world > 1 else 0
    mine = len(shard(n, rank, world))
    update = progress(what, mine, "images") if what and rank == 0 else None
    parts, done = {}, 0
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        for x in batches:
            for key, f in fn(x).items():
                parts.setdefault(key, []).append(f.float())  # (B, F)
            done += len(x)
            if update:
                update(done)
    out = {key: torch.cat(p) for key, p in parts.items()}   # {key: (n_rank, F)}
    if world == 1:
        return out
    rows = max(len(shard(n, r, world)) for r in range(world))
    gathered = {}
    for key, f in out.items():
        padded = f.new_zeros(rows, f.shape[1])              # (rows, F)
        padded[:len(f)] = f
        pieces = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(pieces, padded)
        gathered[key] = torch.cat([p[:len(shard(n, r, world))]
                                   for r, p in enumerate(pieces)])  # (n, F)
    return gathered


# --------------------------------------------------------------------------------------------
# Classifiers: a linear probe and DINO's weighted kNN
# --------------------------------------------------------------------------------------------
def linear_probe(features_of_epoch, train_y, test_f, test_y, num_classes, epochs=100, lr=4e-3,
                 weight_decay=1e-4, batch_size=1024, seed=0, fit=True, what=None):
    """Trains a linear classifier (zero init: the problem is convex) with AdamW and a per-step
    cosine schedule on features_of_epoch(epoch) (n, F) and returns the test top-1. With
    fit=False (ranks > 0 under --augmented) only features_of_epoch runs, for its collectives.
    With `what`, progress lines of the epochs."""
    g = torch.Generator().manual_seed(seed)
    n = len(train_y)
    steps_per_epoch = -(-n // batch_size)
    head = opt = None
    update = progress(what, epochs, "epochs") if what and fit else None
    for epoch in range(epochs):
        feats = features_of_epoch(epoch)                    # (n, F)
        if not fit:
            continue
        if head is None:
            head = torch.nn.Linear(feats.shape[1], num_classes, device=feats.device)
            torch.nn.init.zeros_(head.weight)
            torch.nn.init.zeros_(head.bias)
            opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
        y = train_y.to(feats.device)
        order = torch.randperm(n, generator=g).to(feats.device)  # (n,)
        for i in range(steps_per_epoch):
            for group in opt.param_groups:
                group["lr"] = train.lr_at(epoch * steps_per_epoch + i, epochs * steps_per_epoch,
                                          0, lr, final=0.0)
            idx = order[i * batch_size:(i + 1) * batch_size]  # (b,)
            loss = F.cross_entropy(head(feats[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if update:
            update(epoch + 1)
    if not fit:
        return None
    with torch.no_grad():
        pred = head(test_f).argmax(1)                       # (m,)
    return (pred == test_y.to(pred.device)).float().mean().item()


@torch.no_grad()
def knn_predict(train_f, train_y, test_f, num_classes, k=20, temperature=0.07, chunk=256):
    """DINO's eval_knn: cosine similarity of L2-normalised features, the k most similar training
    images vote for their class with weight exp(sim / T). Test images in chunks. (m,) classes."""
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    train_y = train_y.to(train_f.device)
    k = min(k, len(train_f))
    preds = []
    for s in range(0, len(test_f), chunk):
        sim = test_f[s:s + chunk] @ train_f.T               # (b, n)
        top, idx = sim.topk(k, dim=1)                       # (b, k), (b, k)
        votes = torch.zeros(len(sim), num_classes, device=sim.device)  # (b, C)
        votes.scatter_add_(1, train_y[idx], (top / temperature).exp())
        preds.append(votes.argmax(1))                       # (b,)
    return torch.cat(preds)                                 # (m,)


def knn_accuracy(train_f, train_y, test_f, test_y, num_classes, k=20, temperature=0.07):
    pred = knn_predict(train_f, train_y, test_f, num_classes, k, temperature)  # (m,)
    return (pred == test_y.to(pred.device)).float().mean().item()


# --------------------------------------------------------------------------------------------
# Arguments and the run
# --------------------------------------------------------------------------------------------
def layer_arg(text):
    """--layer values: a block number or 'all' (checked against the checkpoint in load)."""
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a block number nor 'all'") from None


def build_parser():
    p = argparse.ArgumentParser(prog="probe.py", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint.pt written by train.py")
    p.add_argument("--dataset", choices=data.DATASETS, default=None,
                   help="None: the checkpoint's own")
    p.add_argument("--data", default=None, help="data root (None: the checkpoint's own); for "
                   "imagefolder the folder holding train/ and val/")
    p.add_argument("--synthetic-size", type=common.COUNT, default=None,
                   help="None: the checkpoint's")
    p.add_argument("--pool", nargs="+", choices=("patch", "proxy", "both"), default=["patch"],
                   help="mean of the patch tokens (authors'), of the proxies, or both; several "
                   "are probed from one pass")
    p.add_argument("--layer", nargs="+", type=layer_arg, default=None, help="main blocks, "
                   "1..depth, or 'all' (None: the last); several are probed from one pass")
    p.add_argument("--rows", nargs="+", choices=tuple(ROWS), default=list(ROWS),
                   help="what to probe: the checkpoint, the same network with its random "
                   "initial weights, the raw pixels")
    p.add_argument("--epochs", type=common.COUNT, default=100, help="linear classifier epochs")
    p.add_argument("--lr", type=common.POSITIVE, default=4e-3, help="the authors' at batch 1024")
    p.add_argument("--weight-decay", type=common.NONNEGATIVE, default=1e-4)
    p.add_argument("--probe-batch-size", type=common.COUNT, default=1024,
                   help="linear classifier batch")
    p.add_argument("--augmented", action="store_true", help="the authors' protocol: training "
                   "features recomputed every epoch from RandomResizedCrop + flip images")
    p.add_argument("--min-crop", type=common.FRACTION, default=0.08, help="RandomResizedCrop "
                   "minimum scale under --augmented (torchvision's default)")
    p.add_argument("--k", type=common.COUNT, default=20, help="kNN neighbours")
    p.add_argument("--temperature", type=common.POSITIVE, default=0.07, help="kNN temperature")
    p.add_argument("--batch-size", type=common.COUNT, default=256, help="feature-extraction "
                   "batch per process")
    p.add_argument("--amp", choices=("bf16", "none"), default="none",
                   help="autocast dtype for feature extraction")
    p.add_argument("--workers", type=common.NATURAL, default=8,
                   help="DataLoader workers (image folders)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--seed", type=common.NATURAL, default=0,
                   help="classifier order and augmentation")
    p.add_argument("--out", default=None, help="JSON file (None: probe_<pool>_L<layer>"
                   "[_<dataset>][_aug].json in the checkpoint's folder)")
    return common.one_line_errors(p)


def load(args):
    """The checkpoint's model, with the data and layer settings it implies filled into args."""
    try:
        model, ckpt = sm.load_checkpoint(args.checkpoint, map_location="cpu")
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    saved, cfg = ckpt.get("args", {}), model.cfg
    args.dataset = args.dataset or saved.get("dataset", "cifar10")
    if args.data is None and args.dataset == saved.get("dataset"):
        args.data = saved.get("data", "data")
    elif args.data is None and args.dataset == "imagefolder":
        raise SystemExit("error: --dataset imagefolder needs --data DIR")
    elif args.data is None:
        args.data = "data"
    args.synthetic_size = args.synthetic_size or saved.get("synthetic_size", 1024)
    layers = args.layer or [cfg.depth]
    args.layer = sorted(set(range(1, cfg.depth + 1) if "all" in layers else layers))
    bad = [layer for layer in args.layer if not 1 <= layer <= cfg.depth]
    if bad:
        raise SystemExit(f"error: --layer {bad[0]} does not exist: this checkpoint has main "
                         f"blocks 1..{cfg.depth}")
    args.pool = list(dict.fromkeys(args.pool))             # each once, in the order given
    if args.pool != ["patch"] and cfg.num_proxies == 0:
        raise SystemExit(f"error: --pool {' '.join(args.pool)} needs proxies, but this "
                         f"checkpoint has none (num_proxies 0): use --pool patch")
    if args.augmented and len(args.pool) * len(args.layer) > 1:
        raise SystemExit("error: --augmented recomputes the features every epoch: give one "
                         "--pool and one --layer")
    return model, ckpt


def main(argv=None):
    """Runs the probe; returns (report dict, {(row, pool, layer): (train features, test
    features)}) on rank 0 and (None, the same features) on other ranks."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    t0 = time.time()
    model, ckpt = load(args)
    cfg = model.cfg
    rank, world, device = common.setup_distributed(args.device)
    amp = torch.bfloat16 if args.amp == "bf16" else None
    train_y, num_classes, train_batches = load_split(args, cfg.img_size, True, rank, world, device)
    test_y, test_classes, test_batches = load_split(args, cfg.img_size, False, rank, world, device)
    num_classes = max(num_classes, test_classes)

    nets = {"checkpoint": model}
    if "random" in args.rows:  # seeded as train.py seeds it: the checkpoint's own initialisation
        torch.manual_seed(ckpt.get("args", {}).get("seed", args.seed))
        nets["random"] = sm.SemanticMIM(cfg)
    fns = {name: (lambda x, m=net.to(device).eval(): layer_features(m, x, args.layer, args.pool))
           for name, net in nets.items()}
    fns["pixels"] = lambda x: {("pixels", None): pixel_features(x)}

    rows = [r for r in ROWS if r in args.rows]
    features = {}  # every collective first, so that no rank waits long for rank 0's classifiers
    for name in rows:
        tr = extract(fns[name], train_batches(0, False), len(train_y), world, device, amp,
                     f"{ROWS[name]} features, train")      # {(pool, layer): (n, F)}
        te = extract(fns[name], test_batches(0, False), len(test_y), world, device, amp,
                     f"{ROWS[name]} features, test")       # {(pool, layer): (m, F)}
        for key in tr:
            features[(name, *key)] = (tr[key], te[key])
    linear = {}
    for key in features if args.augmented else []:  # training features of epoch e: its crops
        def epoch_features(e, fn=fns[key[0]], k=key[1:]):
            return extract(fn, train_batches(e + 1, True), len(train_y), world, device, amp)[k]
        linear[key] = linear_probe(epoch_features, train_y, features[key][1], test_y,
                                   num_classes, args.epochs, args.lr, args.weight_decay,
                                   args.probe_batch_size, args.seed, fit=rank == 0,
                                   what=f"linear probe, {ROWS[key[0]]}")
    if world > 1:
        common.end_distributed(device)
    if rank > 0:
        return None, features

    results = []
    for key, (tr, te) in features.items():                 # (n, F), (m, F)
        name, pool, layer = key
        label = ROWS[name] if name == "pixels" else f"{ROWS[name]} {pool} L{layer}"
        if not args.augmented:
            linear[key] = linear_probe(lambda e: tr, train_y, te, test_y, num_classes,
                                       args.epochs, args.lr, args.weight_decay,
                                       args.probe_batch_size, args.seed,
                                       what=f"linear probe, {label}")
        knn = knn_accuracy(tr, train_y, te, test_y, num_classes, args.k, args.temperature)
        results.append({"row": ROWS[name], "linear_top1": linear[key], "knn_top1": knn,
                        "dims": tr.shape[1], "pool": pool, "layer": layer})
        print(f"{label}: linear {100 * linear[key]:.2f}%  kNN "
              f"{100 * knn:.2f}%  ({tr.shape[1]} dims, {time.time() - t0:.0f} s)", flush=True)

    launcher = ["torchrun", f"--nproc_per_node={world}"] if world > 1 else ["python"]
    one = args.pool[0] if len(args.pool) == 1 else args.pool
    report = {"command": shlex.join(launcher + ["probe.py"] + argv),
              "checkpoint": os.path.abspath(args.checkpoint), "step": ckpt.get("step"),
              "config": ckpt["config"], "dataset": args.dataset, "data": args.data,
              "train_images": len(train_y), "test_images": len(test_y),
              "num_classes": num_classes, "pool": one,
              "layer": args.layer[0] if len(args.layer) == 1 else args.layer,
              "augmented": args.augmented, "epochs": args.epochs, "lr": args.lr,
              "weight_decay": args.weight_decay, "probe_batch_size": args.probe_batch_size,
              "k": args.k, "temperature": args.temperature, "seed": args.seed,
              "processes": world, "device": str(device), "rows": results,
              "wall_time_s": round(time.time() - t0, 2)}
    if args.out is None:
        layers = ("all" if len(args.layer) == ckpt["config"]["depth"] > 1 else
                  "-".join(map(str, args.layer)))
        name = f"probe_{'-'.join(args.pool)}_L{layers}"
        name += f"_{args.dataset}" if args.dataset != ckpt.get("args", {}).get("dataset") else ""
        name += "_aug" if args.augmented else ""
        args.out = os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), name + ".json")
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nprobe of {args.checkpoint} (step {report['step']}) on {args.dataset}: "
          f"{len(train_y)} train / {len(test_y)} test images, {args.epochs} epochs"
          f"{' augmented' if args.augmented else ''}, kNN k={args.k}")
    print(f"{'row':16s} {'pool':>6s} {'layer':>5s} {'dims':>6s} {'linear top-1':>13s} "
          f"{'kNN top-1':>10s}")
    for r in results:
        print(f"{r['row']:16s} {r['pool']:>6s} {str(r['layer'] or '-'):>5s} {r['dims']:6d} "
              f"{100 * r['linear_top1']:12.2f}% {100 * r['knn_top1']:9.2f}%")
    print(f"wrote {args.out} ({report['wall_time_s']:.1f} s)\ncommand: {report['command']}")
    return report, features


if __name__ == "__main__":
    main()
