"""Frozen-feature evaluation of a train.py checkpoint: linear-probe and kNN top-1.

Beside the same network at its random initial weights and the raw pixels, the authors' protocol
(configs/maskfeat/maskfeat_cls_linear_probing.py): a linear classifier on the LayerNorm'd mean of
a block's patch tokens (or proxies, or both), once or (--augmented) per epoch of crops; DINO's kNN.

    python probe.py out/checkpoint.pt                    # its own data set, last block, patch mean
    python probe.py out/checkpoint.pt --pool patch proxy both --layer all --rows checkpoint
    torchrun --nproc_per_node=8 probe.py run/checkpoint.pt --augmented --rows checkpoint random
"""
import argparse
import copy
import os
import shlex
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import semanticmim as sm
import train

ROWS = {"checkpoint": "checkpoint", "random": "random weights", "pixels": "raw pixels"}
PIXELS_GIB = 8  # the raw-pixel row holds every image's pixels on rank 0's device: CIFAR-sized only


# ---- Data: one split's labels and this rank's shard of its normalised images -------------------
def shard(n, rank, world):
    """This rank's contiguous part of range(n); the parts of ranks 0..world-1 cover it in order."""
    return range(n * rank // world, n * (rank + 1) // world)


def load_split(args, split, size, rank, world, device):
    """(labels (n,), batches(epoch, augment)) yielding this rank's shard in order (B, 3, size,
    size), crops and flips drawn from (seed, epoch, image) alone: N processes = 1."""
    images, labels, _ = train.load_split(args.dataset, args.data, split, size,
                                         args.synthetic_size, seed=args.seed)
    n, (mean, std) = len(labels), train.MEAN_STD[args.dataset]
    if n < world:
        raise SystemExit(f"error: {n} images cannot be split over {world} processes")
    crops = images  # image folders: the same files, the Folder's train transform seeded per image
    if isinstance(images, train.Folder):
        crops = copy.copy(images)
        crops.transform = train.folder_transform(size, True, args.min_crop)

    def batches(epoch, augment):
        keys, draw = [(epoch, i) for i in shard(n, rank, world)], None
        if augment and crops is images:  # in memory: crops and flips from the split's draws
            g = torch.Generator().manual_seed(args.seed * 1_000_003 + epoch)
            r = torch.rand(n, 5, generator=g)               # (n, 5): one row per image
            draw = lambda idx: r[idx.cpu()].to(device)      # noqa: E731  (B, 5): its images'
        return train.batches(crops if augment else images, keys, args.batch_size, device, size,
                             mean, std, args.workers, draw, args.min_crop)
    return labels, batches


# ---- Features: pooled and LayerNorm'd, extracted per shard and gathered in data-set order -------
def layer_norm(x):
    """Parameter-free LayerNorm over the last dimension (the authors' probe feature)."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def pool_features(model, imgs, layers, pools):
    """Images (B, 3, S, S) -> {(pool, layer): LayerNorm'd mean of the layer's patch outputs (B, D),
    proxies (B, D), or for 'both' the two, patch part first (B, 2D)}, from one pass."""
    outs, _ = model.features(imgs, max(layers))             # per block: (B, P, D), (B, N, D)
    feats = {}
    for layer in layers:
        proxy, patch = outs[layer - 1]                      # (B, P, D), (B, N, D)
        for pool in pools:
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


# ---- Classifiers: a linear probe and DINO's weighted kNN ----------------------------------------
def linear_probe(features_of_epoch, train_y, test_f, test_y, num_classes, epochs=100, lr=4e-3,
                 weight_decay=1e-4, batch_size=1024, seed=0, what=None):
    """The test top-1 of a linear classifier (zero init: convex) trained with AdamW, per-step
    cosine, on features_of_epoch(epoch) (n, F). With `what`, progress lines of the epochs."""
    g = torch.Generator().manual_seed(seed)
    n, steps = len(train_y), -(-len(train_y) // batch_size)  # steps per epoch
    head = torch.nn.Linear(test_f.shape[1], num_classes, device=test_f.device)
    torch.nn.init.zeros_(head.weight), torch.nn.init.zeros_(head.bias)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    update = progress(what, epochs, "epochs") if what else lambda done: None
    for epoch in range(epochs):
        feats, y = features_of_epoch(epoch), train_y.to(test_f.device)  # (n, F), (n,)
        order = torch.randperm(n, generator=g).to(test_f.device)  # (n,)
        for i in range(steps):
            opt.param_groups[0]["lr"] = train.lr_at(epoch * steps + i, epochs * steps, 0, lr, 0.0)
            idx = order[i * batch_size:(i + 1) * batch_size]  # (b,)
            loss = F.cross_entropy(head(feats[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        update(epoch + 1)
    with torch.no_grad():
        pred = head(test_f).argmax(1)                       # (m,)
    return (pred == test_y.to(pred.device)).float().mean().item()


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
    add("--epochs", type=train.COUNT, default=100, help="linear classifier epochs")
    add("--lr", type=train.POSITIVE, default=4e-3, help="the authors' at batch 1024")
    add("--weight-decay", type=train.NONNEGATIVE, default=1e-4)
    add("--probe-batch-size", type=train.COUNT, default=1024, help="linear classifier batch")
    add("--augmented", action="store_true", help="the authors' protocol: training features "
        "recomputed every epoch from RandomResizedCrop + flip images")
    add("--min-crop", type=train.FRACTION, default=0.08, help="--augmented crop scale minimum")
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
    args.synthetic_size = args.synthetic_size or saved.get("synthetic_size", 1024)
    layers = args.layer or [cfg.depth]
    args.layer = sorted(set(range(1, cfg.depth + 1) if "all" in layers else layers))
    bad = [layer for layer in args.layer if not 1 <= layer <= cfg.depth]
    if bad:
        raise SystemExit(f"error: --layer {bad[0]} does not exist: this checkpoint has main "
                         f"blocks 1..{cfg.depth}")
    if args.pool != ["patch"] and cfg.num_proxies == 0:
        raise SystemExit(f"error: --pool {' '.join(args.pool)} needs proxies, but this "
                         f"checkpoint has none (num_proxies 0): use --pool patch")
    if args.augmented and len(args.pool) * len(args.layer) > 1:
        raise SystemExit("error: --augmented recomputes the features every epoch: give one "
                         "--pool and one --layer")
    if args.dataset == "imagefolder" and os.path.isdir(args.data) and not args.timm:
        if not all(os.path.isdir(os.path.join(args.data, s)) for s in ("train", "val")):
            raise SystemExit(f"error: the probe needs a held-out split: {args.data}/train and "
                             f"{args.data}/val, each with one sub-folder of images per class")
        args.workers = train.usable_workers(args.workers, say=os.environ.get("RANK", "0") == "0")
    all_ = len(args.layer) == cfg.depth > 1
    name = (f"probe_{'-'.join(args.pool)}_L{'all' if all_ else '-'.join(map(str, args.layer))}"
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
                  "augmented", "epochs", "lr", "weight_decay", "probe_batch_size", "k",
                  "temperature", "seed")},
              "processes": world, "device": str(device), "rows": results,
              "wall_time_s": round(time.time() - t0, 2)}
    train.write_json(args.out, report)
    print(f"probe of {args.checkpoint} (step {report['step']}) on {args.dataset}: {sizes[0]} "
          f"train / {sizes[1]} test images, {args.epochs} epochs{' augmented' * args.augmented}"
          f", kNN k={args.k}: wrote {args.out} ({report['wall_time_s']:.1f} s)\ncommand: "
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
    train_y, train_batches = load_split(args, "train", S, rank, world, device)
    test_y, test_batches = load_split(args, "test", S, rank, world, device)
    C = int(max(train_y.max(), test_y.max())) + 1           # classes
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
    fns["pixels"] = lambda x: {("pixels", None): layer_norm(x.flatten(1))}  # (B, 3*S*S)

    def fit(features_of_epoch, test_f, what):               # the linear probe of one row
        return linear_probe(features_of_epoch, train_y, test_f, test_y, C,
                            args.epochs, args.lr, args.weight_decay, args.probe_batch_size,
                            args.seed, f"linear probe, {what}")
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
        acc = linear[name, pool, layer] if args.augmented else fit(lambda e: tr, te, label)
        pred = knn_predict(tr, train_y, te, C, args.k, args.temperature)  # (m,)
        knn = (pred == test_y.to(pred.device)).float().mean().item()
        results.append({"row": ROWS[name], "linear_top1": acc, "knn_top1": knn,
                        "dims": tr.shape[1], "pool": pool, "layer": layer})
        print(f"{label}: linear {100 * acc:.2f}%  kNN {100 * knn:.2f}%  ({tr.shape[1]} dims, "
              f"{time.time() - t0:.0f} s)", flush=True)
    return write_report(args, argv, ckpt, world, device, (len(train_y), len(test_y)),
                        C, results, t0), features


if __name__ == "__main__":
    train.run_main(main)
