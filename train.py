"""Pre-train SemanticMIM (or its one-stream baseline) on one CPU, one GPU, or many with torchrun.

    python train.py                                  # laptop smoke run: CIFAR-10, 1 epoch
    python train.py --dataset fashion_mnist --data data --epochs 2
    torchrun --nproc_per_node=8 train.py --data /imagenet --epochs 300 --warmup-epochs 30 \
        --batch-size 2048                            # the authors' ViT-B/16 settings

--batch-size is the global batch: the same command trains the same model on 1 or 8 processes,
in micro-batches of --micro-batch images per process per forward where a batch does not fit.
lr = --blr * global batch / 256 (the authors' 1.6e-3 at batch 2048 is --blr 2e-4). Checkpoints:
every --ckpt-every steps, --ckpt-minutes after the last save, at the end and after the step a
SIGTERM/SIGINT arrives in; --resume continues a run bit for bit, on the same data. This file is
also the one home of what probe.py and visualize.py share: flag types, distributed set-up, data
(one split loader), checkpoint and report files.
Sections: 1 arguments, 2 distributed, 3 data, 4 model and optimizer, 5 checkpoints, 6 the loop.
"""
import argparse
import contextlib
import fcntl
import hashlib
import json
import math
import os
import pathlib
import pickle
import shlex
import shutil
import signal
import sys
import time
import zipfile
from dataclasses import asdict, fields

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, DistributedSampler, default_collate
from torchvision.transforms import v2

import semanticmim as sm


# ---- 1. Arguments: every flag checked where it is parsed; a preset, then any override ------------
def number(kind, low, high=math.inf, open_low=False, open_high=False):
    """An argparse type: a finite int or float in [low, high] (an end left out when open); else
    one line naming the value and the allowed range (argparse adds the flag)."""
    what = "an integer" if kind is int else "a number"
    allowed = (f"{what} {'>' if open_low else '>='} {low}" if high == math.inf else
               f"{what} in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}")

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if math.isfinite(value) and (low < value if open_low else low <= value) and (
                value < high if open_high else value <= high):
            return value
        raise argparse.ArgumentTypeError(f"{text} is not allowed: it must be {allowed}")
    return parse


COUNT, NATURAL = number(int, 1), number(int, 0)             # >= 1; >= 0
POSITIVE, NONNEGATIVE = number(float, 0, open_low=True), number(float, 0)
FRACTION = number(float, 0, 1, open_low=True)               # (0, 1]


def one_line_errors(parser):
    """Argparse errors as one line on stderr (exit 2), without the usage block."""
    parser.error = lambda message: parser.exit(2, f"error: {message} (see {parser.prog} --help)\n")
    return parser


def run_main(main):
    """A script's entry: Ctrl-C ends it in one line, not a traceback (every file is written whole
    or not at all, so nothing is left half-written)."""
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit("stopped by Ctrl-C") from None


def say(text):
    """print, flushed; a reader gone (Ctrl-C on `python train.py | tee`) must not stop a save."""
    try:
        print(text, flush=True)
    except BrokenPipeError:                                 # stdout to /dev/null from now on
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


# The base learning rate of each preset. vit_b16: the authors' 1.6e-3 at batch 2048. cifar: 1e-3,
# the rate of the README's Fashion-MNIST results (at 2e-4 one epoch left the last block's
# attention as good as uniform).
BLR = {"cifar": 1e-3, "vit_b16": 2e-4}
ARCH_FLAGS = tuple(f.name for f in fields(sm.Config))  # each has a flag, None = the preset's
RUNTIME_FLAGS = {"out", "resume", "data", "device", "workers", "compile", "log_every",
                 "ckpt_every", "ckpt_minutes", "stop_at", "micro_batch"}  # may change on --resume


def build_parser(prog="train.py"):
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument_group("data")
    a.add_argument("--dataset", choices=DATASETS, help="default: imagefolder with --data, else "
                   "cifar10")
    a.add_argument("--data", help="data root (default ./data); for imagefolder the folder, or "
                   "its parent holding train/")
    a.add_argument("--synthetic-size", type=COUNT, default=1024, help="images of synthetic")
    a.add_argument("--min-crop", type=FRACTION, default=0.5, help="RandomResizedCrop min scale")
    a.add_argument("--workers", type=NATURAL, default=8, help="DataLoader workers (image folders)")
    m = p.add_argument_group("model (a preset, then any override)")
    m.add_argument("--preset", choices=sorted(sm.PRESETS), help="default: vit_b16 for "
                   "imagefolder, else cifar")
    for flag, kind in (("img-size", COUNT), ("patch-size", COUNT), ("dim", COUNT),
                       ("depth", COUNT), ("heads", COUNT), ("mlp-ratio", POSITIVE)):
        m.add_argument(f"--{flag}", type=kind)
    m.add_argument("--num-proxies", type=NATURAL, help="P")
    m.add_argument("--mask-ratio", type=number(float, 0, 1, open_low=True, open_high=True))
    m.add_argument("--target", choices=("hog", "pixel"))
    m.add_argument("--baseline", action="store_true", default=None,
                   help="the paper's one-stream MIM comparison (no proxy bottleneck)")
    m.add_argument("--independent-mask", action="store_true", default=None,
                   help="draw the [MASK]/target set independently of the visible set")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=COUNT, default=1)
    o.add_argument("--batch-size", type=COUNT, default=256, help="global, over all processes")
    o.add_argument("--micro-batch", type=COUNT, help="images per process per forward: gradients "
                   "accumulate over a process's batch in these (default: all of it at once)")
    o.add_argument("--blr", type=POSITIVE, help="lr per 256 images; default: the preset's (BLR)")
    o.add_argument("--min-lr", type=NONNEGATIVE, default=1e-6)
    o.add_argument("--warmup-epochs", type=NONNEGATIVE, help="default: 10%% of --epochs")
    o.add_argument("--weight-decay", type=NONNEGATIVE, default=0.05)
    o.add_argument("--clip", type=NONNEGATIVE, default=0.02, help="gradient-norm clip (0: off)")
    o.add_argument("--amp", choices=("auto", "bf16", "fp16", "none"), default="auto",
                   help="autocast dtype; fp16 uses a GradScaler; auto: bf16 on a GPU (fp16 where "
                   "it lacks bf16), none on a CPU (one without bf16 runs bf16 ~10x slower)")
    o.add_argument("--seed", type=NATURAL, default=0)
    r = p.add_argument_group("run")
    r.add_argument("--out", default="out", help="folder for checkpoint.pt and log.jsonl")
    r.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    r.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    r.add_argument("--compile", action="store_true", help="torch.compile the model")
    r.add_argument("--log-every", type=COUNT, default=20, help="steps between progress lines")
    r.add_argument("--ckpt-every", type=COUNT, default=500, help="steps between checkpoints")
    r.add_argument("--ckpt-minutes", type=NONNEGATIVE, default=5, help="also save at the first "
                   "progress line this many minutes after the last save (0: off)")
    r.add_argument("--stop-at", type=COUNT, help="save and exit after this step (to split a run "
                   "into jobs; --resume continues it)")
    return one_line_errors(p)


def parse_args(argv=None, prog="train.py"):
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    for action in parser._actions:                          # which flags were given explicitly
        action.default = argparse.SUPPRESS
    args.given = sorted(vars(parser.parse_args(argv)))
    args.dataset = args.dataset or ("imagefolder" if args.data else "cifar10")
    if args.data is None and args.dataset == "imagefolder":
        raise SystemExit("error: --dataset imagefolder needs --data DIR")
    args.data = args.data or "data"
    args.preset = args.preset or ("vit_b16" if args.dataset == "imagefolder" else "cifar")
    args.blr = args.blr or BLR[args.preset]
    args.warmup_epochs = 0.1 * args.epochs if args.warmup_epochs is None else args.warmup_epochs
    return args


def build_config(args):
    """The preset with any architecture flag given on the command line applied."""
    over = {k: getattr(args, k) for k in ARCH_FLAGS if getattr(args, k, None) is not None}
    try:
        return sm.Config(**{**asdict(sm.PRESETS[args.preset]), **over})
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def merge_resumed_args(args, saved):
    """On --resume the saved run's settings hold; a run-defining flag that differs is refused."""
    clash = [k for k in args.given if k not in RUNTIME_FLAGS and k in saved
             and getattr(args, k) != saved[k]]
    if clash:
        flags = ", ".join(f"--{k.replace('_', '-')} {getattr(args, k)!r} (saved {saved[k]!r})"
                          for k in clash)
        raise SystemExit(f"error: --resume continues the saved run, but these flags differ from "
                         f"it: {flags}; drop them or start a new --out")
    for k, v in saved.items():  # everything not given now comes from the saved run
        if k not in args.given and k not in ("given", "resume", "stop_at"):
            setattr(args, k, v)
    return args


# ---- 2. Distributed: torchrun sets RANK and WORLD_SIZE; plain python is one process --------------
def setup_distributed(device_arg="auto"):
    """Returns (rank, world_size, device). NCCL on GPUs, Gloo on CPU."""
    if device_arg == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no GPU: use --device cpu")
    use_cuda = torch.cuda.is_available() if device_arg == "auto" else device_arg == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = use_cuda  # TF32
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, torch.device("cuda" if use_cuda else "cpu")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, world, torch.device("cuda", local) if use_cuda else torch.device("cpu")


# ---- 3. Data: small sets as one uint8 tensor on the device; image folders through workers --------
MEAN_STD = {  # per-channel mean and std of each set's training images (ImageNet's for folders)
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "fashion_mnist": ((0.2860,) * 3, (0.3530,) * 3),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "synthetic": ((0.5,) * 3, (0.25,) * 3)}
DATASETS = tuple(MEAN_STD)
TORCHVISION = {"cifar10": "CIFAR10", "cifar100": "CIFAR100",   # torchvision.datasets' class
               "fashion_mnist": "FashionMNIST"}
OFFLINE_HINT = ("offline choices: --dataset fashion_mnist --data DIR with the Debian copy "
                "unpacked into DIR/FashionMNIST/raw (see README), --dataset imagefolder --data "
                "DIR, or --dataset synthetic")

# Foreground (visualize.py --stats, probe.py --dense): raw mean intensity above the set's threshold.
# Fashion-MNIST garments lie on an exactly black background (a background patch's mean is 0, up to
# the resize's ringing): 0.1 keeps every patch with a real piece of the garment and drops those that
# only graze its edge (for pixels likewise).
# Synthetic images have no background: 0.5, their mean, splits each colour template into a brighter
# and a darker region, enough to exercise the statistic. Natural images have none to threshold.
FOREGROUND_THRESHOLD = {"fashion_mnist": 0.1, "synthetic": 0.5}


def synthetic_images(n, size, seed, num_classes=10):
    """Generated images (n, 3, size, size) uint8 and labels: per-class smooth colour templates
    plus noise, so the classes are linearly separable. Templates depend on nothing but size."""
    g = torch.Generator().manual_seed(1234)
    templates = torch.rand(num_classes, 3, 4, 4, generator=g)               # (K, 3, 4, 4)
    templates = F.interpolate(templates, size=(size, size), mode="bilinear", align_corners=False)
    g.manual_seed(seed)
    labels = torch.randint(num_classes, (n,), generator=g)                   # (n,)
    x = templates[labels] + 0.15 * torch.randn(n, 3, size, size, generator=g)  # (n, 3, S, S)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8), labels


def decode_image(path):
    """An image file -> uint8 RGB (3, h, w): torchvision.io for JPEG (grayscale and CMYK too),
    PNG (16-bit, RGBA), GIF and WebP; PIL for what it cannot decode (BMP, TIFF, ...) and for all
    of them on a torchvision without decoders (0.29 deprecates them in favour of TorchCodec)."""
    try:
        img = torchvision.io.decode_image(path, mode=torchvision.io.ImageReadMode.RGB)
    except (RuntimeError, AttributeError):                  # AttributeError: no decode_image
        import numpy as np
        from PIL import Image                               # torchvision's own dependency
        with Image.open(path) as im:
            if im.mode.startswith("I;16"):  # 16-bit grey, which convert("RGB") clips at 255
                return torch.from_numpy((np.array(im) >> 8).astype(np.uint8)).repeat(3, 1, 1)
            img = v2.functional.pil_to_tensor(im.convert("RGB"))
    return v2.functional.to_dtype(img, torch.uint8, scale=True)  # a 16-bit PNG is uint16


def folder_transform(size, train, min_crop=0.5):
    """The authors' train (RandomResizedCrop bicubic + flip) or test (resize + centre crop)
    transform, on uint8 tensors; normalising happens on the device (to_model_input)."""
    bicubic = v2.InterpolationMode.BICUBIC
    return v2.Compose([v2.RandomResizedCrop(size, (min_crop, 1.0), interpolation=bicubic),
                       v2.RandomHorizontalFlip()] if train else
                      [v2.Resize(int(size * 256 / 224), bicubic), v2.CenterCrop(size)])


class Folder(torch.utils.data.Dataset):
    """An image folder whose item (epoch, i) is (image i as uint8 (3, S, S), label), its random
    transform a pure function of (seed, epoch, i), whatever the workers, processes or resuming.
    An unreadable file gives its message instead, which batches() raises in the main process."""
    def __init__(self, root, transform, seed=0):
        try:
            self.folder = torchvision.datasets.ImageFolder(root)   # its loader is not used
        except (FileNotFoundError, RuntimeError) as e:
            raise SystemExit(f"error: {root} is not an image folder ({e}): it needs one "
                             f"sub-folder of images per class") from None
        self.transform, self.seed = transform, seed

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, key):
        epoch, i = key
        path, label = self.folder.samples[i]
        try:
            img = decode_image(path)
        except Exception as e:
            return f"cannot read image {path} ({type(e).__name__}: {e})"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, epoch, i)) & (2 ** 63 - 1))
            return self.transform(img), label


def load_split(dataset, root, split, size, synthetic_size=1024, augment=False, min_crop=0.5,
               seed=0):
    """One split ("train" or "test") -> (images, labels (n,), class names): a uint8 tensor
    (n, C, h, w) for the in-memory sets; for image folders a Folder of ROOT/train or ROOT/val
    (ROOT itself where that is missing), with the train transform if augment."""
    if dataset == "imagefolder":
        sub = os.path.join(root, "train" if split == "train" else "val")  # else ROOT itself
        if not os.path.isdir(root):
            raise SystemExit(f"error: no such folder {root}: pass --data DIR holding one "
                             f"sub-folder of images per class (or DIR/train/ laid out so)")
        images = Folder(sub if os.path.isdir(sub) else root,
                        folder_transform(size, augment, min_crop), seed)
        classes = images.folder.classes
        if split != "train" and os.path.isdir(os.path.join(root, "train")):  # labels are indices
            trained = torchvision.datasets.folder.find_classes(os.path.join(root, "train"))[0]
            if trained != classes:
                a, b = (", ".join(sorted(set(x) - set(y))) or "none"
                        for x, y in ((trained, classes), (classes, trained)))
                raise SystemExit(f"error: {sub} has other classes than {root}/train (only in "
                                 f"train: {a}; only in val: {b}): give both the same class folders")
        return images, torch.tensor(images.folder.targets), classes
    if dataset == "synthetic":
        n = synthetic_size if split == "train" else max(synthetic_size // 4, 1)
        x, y = synthetic_images(n, size, seed=1 if split == "train" else 2)
        return x, y, [str(c) for c in range(10)]
    cls = getattr(torchvision.datasets, TORCHVISION[dataset])
    rank = dist.get_rank() if dist.is_initialized() and dist.get_world_size() > 1 else None
    if rank:
        dist.barrier()                                      # rank 0 downloads, then the others read
    try:
        ds = cls(root, train=split == "train", download=True)
    except (OSError, RuntimeError) as e:
        raise SystemExit(f"error: could not load or download {dataset} into {root} ({e}); "
                         f"{OFFLINE_HINT}") from None
    if rank == 0:
        dist.barrier()
    x = torch.as_tensor(ds.data)
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # (n, C, h, w): 1 or 3 channels
    return x.contiguous(), torch.as_tensor(ds.targets), ds.classes


def to_model_input(x, size, mean, std):
    """uint8 or [0,1] float batch (B, C, h, w) -> normalised float (B, 3, size, size)."""
    x = x.float() / 255 if x.dtype == torch.uint8 else x
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True,
                          align_corners=False).clamp(0, 1)
    x = x.expand(-1, 3, -1, -1)                            # grayscale -> 3 channels
    m, s = (torch.as_tensor(v, device=x.device).view(1, 3, 1, 1) for v in (mean, std))
    return (x - m) / s


def augment(x, size, r, min_scale=0.5, mode="bicubic"):
    """RandomResizedCrop(scale=(min_scale, 1), ratio=(3/4, 4/3), `mode`) + flip of a uint8
    batch (B, C, h, w) on its device, from uniform numbers r (B, 5) -> [0, 1] (B, C, size, size).
    Unlike torchvision's rejection loop, a crop larger than the image is clamped to its side."""
    scale = min_scale + (1 - min_scale) * r[:, 0]
    log_ratio = math.log(3 / 4) + r[:, 1] * (math.log(4 / 3) - math.log(3 / 4))
    w = (scale * log_ratio.exp()).sqrt().clamp(max=1)      # crop width / image width
    h = (scale / log_ratio.exp()).sqrt().clamp(max=1)
    tx, ty = (2 * r[:, 2] - 1) * (1 - w), (2 * r[:, 3] - 1) * (1 - h)  # crop centre in [-1, 1]
    flip = torch.where(r[:, 4] < 0.5, -1.0, 1.0)
    zero = torch.zeros_like(w)
    theta = torch.stack([torch.stack([w * flip, zero, tx], 1),
                         torch.stack([zero, h, ty], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, (x.shape[0], x.shape[1], size, size), align_corners=False)
    out = F.grid_sample(x.float() / 255, grid, mode=mode, padding_mode="border",
                        align_corners=False)                # (B, C, size, size)
    return out.clamp(0, 1)


def usable_workers(n, say=True):
    """--workers per process, at most the CPUs here shared by this node's processes (torchrun's
    LOCAL_WORLD_SIZE; above that PyTorch warns and the node is oversubscribed), with a note."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    procs = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    cap = max(1, cpus // procs)
    if n > cap and say:
        print(f"note: --workers {n} is more than the {cpus} CPUs here"
              f"{f' shared by {procs} processes' * (procs > 1)}: using {cap}", flush=True)
    return min(n, cap)


QUIET = {signal.SIGTERM, signal.SIGINT}  # for the training process alone: it saves, then exits


def quiet_worker(_):
    """Workers live through the SIGTERM/SIGINT sent to the whole process group (by torchrun, a
    scheduler, Ctrl-C): the training process still needs the step it saves after. They are
    started with both blocked (a signal waits, not kills), then ignore them for good."""
    for s in QUIET:
        signal.signal(s, signal.SIG_IGN)


def collate_or_message(items):
    """default_collate of (image, label) pairs, or the message of the first unreadable image."""
    bad = [item for item in items if isinstance(item, str)]
    return bad[0] if bad else default_collate(items)


def batches(images, keys, batch, device, size, mean, std, workers=0, draw=None, min_crop=0.5):
    """Normalised batches (B, 3, size, size) on the device of the images at keys, (epoch, index)
    pairs, in order: image folders through DataLoader workers; in-memory images sliced, and with
    draw(indices) -> uniform numbers (B, 5), cropped and flipped by augment() on the device."""
    mean, std = (torch.tensor(v, device=device) for v in (mean, std))  # once: it waits for a GPU
    if isinstance(images, Folder):
        loader = DataLoader(images, batch_size=batch, sampler=keys, num_workers=workers,
                            pin_memory=device.type == "cuda", collate_fn=collate_or_message,
                            worker_init_fn=quiet_worker)
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, QUIET)  # while the workers start
        items = iter(loader)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)        # a signal meanwhile comes now
        for item in items:
            if isinstance(item, str):
                raise SystemExit(f"error: {item}: remove or replace that file, then run again")
            yield to_model_input(item[0].to(device, non_blocking=True), size, mean, std)
        return
    order = torch.tensor([i for _, i in keys], device=images.device)  # once: (n,), not per step
    for s in range(0, len(keys), batch):
        idx = order[s:s + batch]                            # (B,)
        x = images[idx].to(device)                          # (B, C, h, w) uint8
        if draw is not None:
            x = augment(x, size, draw(idx), min_crop)       # (B, C, S, S) in [0, 1]
        yield to_model_input(x, size, mean, std)           # (B, 3, S, S)


# ---- 4. Model and optimizer: the authors' AdamW groups, linear warm-up then cosine, per step ----
# (configs/maskfeat/maskfeat_bottleneck_pretrain.py: lr 1.6e-3 at batch 2048, betas (0.9, 0.999),
# weight decay 0.05, gradient-norm clip 0.02, 30 warm-up epochs of 300, cosine to 1e-6)
def make_optimizer(model, lr, weight_decay):
    """AdamW, fused (on CPU the per-parameter loop took a third of a cifar-preset step), without
    weight decay on biases, norms and the learned tokens (the authors' paramwise settings)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        token = name in ("pos_embed", "proxy", "mask_token")
        (no_decay if p.ndim < 2 or token else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.999), fused=True)


def lr_at(step, total, warmup, peak, final=1e-6):
    """Linear warm-up over `warmup` steps, then cosine from peak to `final` at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * t))


def train_step(net, model, opt, scaler, imgs, ids_keep, ids_mask, amp_dtype, clip, micro):
    """One optimizer step on one batch, in micro-batches of `micro` images whose gradients add up
    (each image masks as many patches, so the mean of the micro-batch losses is the batch's);
    DDP all-reduces once, after the last. Returns the loss (a 0-dim tensor, not synchronised)."""
    opt.zero_grad(set_to_none=True)
    parts, total = range(0, len(imgs), micro), 0
    no_sync = getattr(net, "no_sync", contextlib.nullcontext)  # DDP's; a plain model has none
    for i in parts:
        with contextlib.nullcontext() if i == parts[-1] else no_sync():
            with torch.autocast(imgs.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = net(imgs[i:i + micro], ids_keep[i:i + micro], ids_mask[i:i + micro])
            scaler.scale(loss / len(parts)).backward()
        total = total + loss.detach() / len(parts)
    if clip > 0:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    scaler.step(opt)
    scaler.update()
    return total


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}  # --amp -> dtype


def resolve_amp(amp, device):
    """--amp auto -> bf16 on a GPU that has it (fp16 on older ones: V100, T4), none on a CPU."""
    if amp != "auto" or device.type != "cuda":
        return "none" if amp == "auto" else amp
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"


# ---- 5. Checkpoints: written atomically, read by one function with one-line errors ---------------
TRAINING_STATE = ("config", "model", "optimizer", "scaler", "rng", "step", "args")  # --resume


def fail(what, path, e, step=False):
    """The one line of a failed write: its cause, what is intact (of a run: step is the step of
    its checkpoint, None for none yet; False for a report), how to go on."""
    folder = os.path.dirname(os.path.abspath(path))
    cause = os.strerror(e.errno) if getattr(e, "errno", None) else " ".join(str(e).split())[:120]
    if not getattr(e, "errno", None) and os.path.isdir(folder):  # torch's own text, and:
        cause += f"; {shutil.disk_usage(folder).free / 2**20:.1f} MiB free there"
    kept = "" if step is False else (f"; the checkpoint of step {step} is intact" if step else
                                     "; no checkpoint was written")
    return SystemExit(f"error: could not write {what} {path} ({cause}){kept}: free space or fix "
                      f"the folder {folder}, then run again{' with --resume' if step else ''}")


def write_atomic(path, write, what, step=False):
    """write(temporary file), then rename: a crash never leaves a half-written file, and a failed
    write (a full disk, no permission) removes its temporary file and stops in one line."""
    try:
        write(path + ".tmp")
        os.replace(path + ".tmp", path)
    except (OSError, RuntimeError) as e:  # torch reports a full disk as a RuntimeError
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        raise fail(what, path, e, step) from None


def write_json(path, report):
    """A report, written whole or not at all."""
    write_atomic(path, lambda tmp: pathlib.Path(tmp).write_text(json.dumps(report, indent=1)),
                 "the report")


def check_output(path, folder=False, reading=None):
    """Before any work, one line for an output path that cannot be written: the checkpoint being
    read, a folder where a file goes or the reverse, a parent that is a file or missing."""
    where, up = os.path.abspath(path), os.path.abspath(path if folder else os.path.dirname(path))
    while folder and not os.path.exists(up):                # a folder's missing parents are made
        up = os.path.dirname(up)
    exists = os.path.exists(where)
    fault = ("is the checkpoint being read (it would be replaced)" if reading and exists and
             os.path.samefile(where, reading) else f"is {'not ' * folder}a folder" if exists and
             os.path.isdir(where) != folder else None if os.path.isdir(up) else
             f"cannot be written: {up} {'is a file' if os.path.exists(up) else 'does not exist'}")
    if fault:
        raise SystemExit(f"error: {path} {fault}: choose another path")
    return path


def read_checkpoint(path, needs=("config", "model")):
    """Every checkpoint file is opened here: its dict, or SystemExit with one line naming the
    file and its fault. Weights-only: a file holding other objects is refused unrun."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: no checkpoint at {path}: pass the checkpoint.pt that train.py "
                         f"wrote in its --out folder")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; its index is at the end
        raise SystemExit(f"error: {path} is not a complete checkpoint: not the zip archive "
                         f"torch.save writes (a copy cut short, a full disk, or another file)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise SystemExit(f"error: {path} was not loaded: it holds objects other than tensors "
                         f"and plain values, and loading it could run code") from None
    except Exception as e:  # a damaged archive: torch reports it as RuntimeError and others
        raise SystemExit(f"error: {path} is damaged and could not be read "
                         f"({type(e).__name__}: {str(e).split('. ')[0]})") from None
    missing = [k for k in needs if not isinstance(ckpt, dict) or k not in ckpt]
    if missing or not isinstance(ckpt["model"], dict):
        raise SystemExit(f"error: {path} is not a checkpoint written by train.py (no "
                         f"{', '.join(missing or ['weights'])})")
    bad = [k for k, v in ckpt["model"].items() if torch.is_tensor(v) and not v.isfinite().all()]
    if bad:
        raise SystemExit(f"error: {path} holds non-finite weights (first: {bad[0]}): it cannot "
                         f"be used; take an earlier checkpoint")
    unknown = sorted(set(ckpt["config"]) - set(ARCH_FLAGS))
    if unknown:
        raise SystemExit(f"error: {path}: checkpoint config has unknown settings {unknown}: it "
                         f"was written by another version of semanticmim.py")
    return ckpt


def load_model(path):
    """(the model of a train.py checkpoint, in eval mode, on the CPU; its dict)."""
    ckpt = read_checkpoint(path)
    try:
        return sm.model_from_checkpoint(ckpt).eval(), ckpt
    except (TypeError, ValueError, RuntimeError) as e:
        raise SystemExit(f"error: {path}: {' '.join(str(e).split())[:400]}") from None


def training_state(model, opt, scaler, gen, step, cfg, args, data):
    """Everything --resume needs to continue bit for bit (the RNGs too), and what it checks."""
    rng = {"torch": torch.get_rng_state(), "batch": gen.get_state()}
    if gen.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(gen.device)
    return dict(model=model.state_dict(), optimizer=opt.state_dict(), scaler=scaler.state_dict(),
                step=step, rng=rng, config=asdict(cfg), args=vars(args), data=data)


def restore_state(ckpt, path, model, opt, scaler, gen, data):
    """The inverse of training_state; one line for a file that does not fit the run or its data
    (other images would mix two runs; the same images at another path are the same data)."""
    saved = ckpt.get("data", data)
    differ = [f"{data[k]} images (saved {saved[k]})" if k == "images" else f"other {k}"
              for k in data if saved.get(k, data[k]) != data[k]]
    if differ:
        raise SystemExit(f"error: {path} was trained on other data than --data holds now "
                         f"({', '.join(differ)}): resume on the run's own images, or a new --out")
    try:
        on = "cpu" if len(ckpt["rng"]["batch"]) == len(torch.Generator().get_state()) else "cuda"
        if on != gen.device.type:                           # a generator's state is its device's
            raise SystemExit(f"error: {path} was trained on {on}, and its random stream of masks "
                             f"and crops continues only there: resume with --device {on}")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        gen.set_state(ckpt["rng"]["batch"])
        if gen.device.type == "cuda" and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], gen.device)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise SystemExit(f"error: {path} could not be resumed "
                         f"({' '.join(str(e).split())[:300]})") from None
    return ckpt["step"]


def read_log(path):
    """log.jsonl -> its records; a last line cut short (a kill while writing) is dropped."""
    with open(path) as f:
        lines = [ln for ln in f.read().split("\n") if ln.strip()]
    records = []
    for i, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines):
                raise SystemExit(f"error: {path} line {i} is not JSON: repair or remove that "
                                 f"line") from None
            print(f"note: {path} ends in a line cut short (a kill while writing): dropped it")
    return records


def lock_folder(folder, rank, world, device):
    """One run per folder: rank 0 holds an OS lock (flock) on FOLDER/run.lock, which dies with
    its process, so a folder whose run died is free again. Every rank learns the outcome before
    anyone writes. Returns the open lock file, to keep for the run's lifetime."""
    held = taken = None
    if rank == 0:
        os.makedirs(folder, exist_ok=True)
        held = open(os.path.join(folder, "run.lock"), "a+")
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held.truncate(0)
            held.write(f"{os.getpid()}\n")
            held.flush()
        except OSError:                                     # held by a live process
            held.seek(0)
            taken, held = held.read().strip() or "unknown", held.close()
    ok = torch.tensor([float(taken is None)], device=device)
    if world > 1:
        dist.all_reduce(ok, dist.ReduceOp.MIN)              # rank 0 decides for everyone
    if not ok.item():                                       # rank 0 says why; all exit
        raise SystemExit(1 if rank else f"error: {folder} is in use by another run (PID "
                         f"{taken}): wait for it to end or choose another --out")
    return held


def start_log(path, step, run):
    """The log of the run (in the folder lock_folder made), a resumed run's cut back to its
    checkpoint's step. Each record carries its run's id: the log of another run (one that died
    before its first checkpoint, or whose checkpoint was replaced) is moved aside, not lost."""
    kept = read_log(path) if os.path.exists(path) else []
    try:
        if any(step is None or r.get("run") != run for r in kept):
            aside = os.path.join(os.path.dirname(path), f"log.{kept[0].get('run')}.jsonl")
            os.replace(path, aside)
            print(f"note: {path} is the log of another run: moved it to {aside}; a new log starts")
            kept = []
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept if r["step"] <= step)
    except OSError as e:
        raise fail("the log", path, e, step) from None


def launcher(world):
    """The command that starts `world` processes the way this one was started."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    nodes = f"--nnodes={world // local} " if world > local else ""
    return f"torchrun {nodes}--nproc_per_node={local}" if world > 1 else "python"


def next_steps(ckpt_path, world=1):
    """The last lines of a finished run: its checkpoint and the commands to run on it next."""
    path, launch = shlex.quote(ckpt_path), launcher(world)
    timm_file = shlex.quote(os.path.join(os.path.dirname(ckpt_path), "timm.pth"))
    return (f"checkpoint: {ckpt_path}\nnext:\n  {launch} probe.py {path}\n"
            f"  python visualize.py {path}\n  python probe.py {path} --timm {timm_file}"
            f"   # the encoder for timm, to fine-tune")


# ---- 6. Training ---------------------------------------------------------------------------------
def train_batches(args, cfg, rank, world, device, gen):
    """(steps per epoch, batches(epoch, start)): this rank's normalised, augmented images
    (B/world, 3, S, S) of an epoch from batch `start` on; what identifies the data. Every rank
    draws the random numbers of the whole global batch from the shared generator and keeps its
    rows, and DistributedSampler deals global position W*j + r to row j of rank r: N = 1."""
    mean, std = MEAN_STD[args.dataset]
    local = args.batch_size // world
    images, _, classes = load_split(args.dataset, args.data, "train", cfg.img_size,
                                    args.synthetic_size, True, args.min_crop, args.seed)
    data = {"images": len(images), "classes": list(classes)}  # paths relative to the root:
    if isinstance(images, Folder):                          # a moved copy is the same data
        files = "\n".join(os.path.relpath(f, images.folder.root) for f, _ in images.folder.samples)
        data["files"] = hashlib.sha1(files.encode()).hexdigest()
    if isinstance(images, torch.Tensor):
        images = images.to(device)                          # (n, C, h, w) uint8, on the device
    sampler = DistributedSampler(range(len(images)), num_replicas=world, rank=rank, shuffle=True,
                                 seed=args.seed, drop_last=True)
    steps = len(sampler) // local
    if steps == 0:
        raise SystemExit(f"error: {len(images)} images give no full batch of {args.batch_size}: "
                         f"lower --batch-size")

    def draw(idx):
        return torch.rand(args.batch_size, 5, generator=gen, device=device)[rank::world]

    def epoch_batches(epoch, start):
        sampler.set_epoch(epoch)
        keys = [(epoch, i) for i in list(sampler)[start * local: steps * local]]
        return batches(images, keys, local, device, cfg.img_size, mean, std, args.workers, draw,
                       args.min_crop)
    return steps, epoch_batches, data


def decide(step, total, args, loss_sum, loss_n, signals, saved_at, world):
    """At a progress line, what every rank does next, from one all-reduce: (mean loss since the
    last line, save?, stop?). Save at --ckpt-every, at the end or --stop-at, when any rank's clock
    says --ckpt-minutes have passed, or any rank got a signal; stop at the end, --stop-at or a
    signal."""
    due = 0 < args.ckpt_minutes <= (time.time() - saved_at) / 60
    t = torch.cat([(loss_sum / loss_n).view(1),
                   torch.tensor([float(bool(signals)), float(due)], device=loss_sum.device)])
    if world > 1:
        dist.all_reduce(t)                                  # sums: loss over ranks, flags any
    mean_loss, signalled, due = (t / world).tolist()
    stop = step in (total, args.stop_at) or signalled > 0
    return mean_loss, stop or step % args.ckpt_every == 0 or due > 0, stop


def main(argv=None):
    # set-up: arguments, processes, the run (a new one, or the saved one on --resume)
    args = parse_args(argv)
    rank, world, device = setup_distributed(args.device)
    check_output(args.out, folder=True)
    ckpt_path, log_path = (os.path.join(args.out, f) for f in ("checkpoint.pt", "log.jsonl"))
    ckpt = read_checkpoint(ckpt_path, TRAINING_STATE) if args.resume else None
    if ckpt is None and os.path.exists(ckpt_path):
        raise SystemExit(f"error: {ckpt_path} exists: pass --resume to continue that run, "
                         f"or choose another --out")
    args = merge_resumed_args(args, ckpt["args"]) if ckpt else args
    cfg = sm.Config(**ckpt["config"]) if ckpt else build_config(args)
    args.amp = resolve_amp(args.amp, device)
    if args.dataset == "imagefolder":
        args.workers = usable_workers(args.workers, rank == 0)
    if args.batch_size % world:
        raise SystemExit(f"error: --batch-size {args.batch_size} is not divisible by the "
                         f"{world} processes")
    local = args.batch_size // world
    micro = args.micro_batch or local
    if local % micro:
        raise SystemExit(f"error: --micro-batch {micro} does not divide the {local} images of "
                         f"each process's batch: pass a divisor of {local}")
    args.run = getattr(args, "run", None) if ckpt else os.urandom(4).hex()  # names its log lines
    torch.manual_seed(args.seed)
    gen = torch.Generator(device=device).manual_seed(args.seed)  # masks and batch augmentation
    model = sm.SemanticMIM(cfg).to(device)
    steps_per_epoch, epoch_batches, data = train_batches(args, cfg, rank, world, device, gen)
    total, warmup = args.epochs * steps_per_epoch, round(args.warmup_epochs * steps_per_epoch)
    peak_lr = args.blr * args.batch_size / 256
    opt = make_optimizer(model, peak_lr, args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    step = restore_state(ckpt, ckpt_path, model, opt, scaler, gen, data) if ckpt else 0
    if args.stop_at is not None and not step < args.stop_at <= total:
        raise SystemExit(f"error: --stop-at {args.stop_at} is not between step {step} and the "
                         f"last step {total}: pass a step in that range, or leave it out")
    net = model if world == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    net = torch.compile(net) if args.compile else net
    lock = lock_folder(args.out, rank, world, device)  # held until the process ends
    if rank == 0:
        start_log(log_path, step if ckpt else None, args.run)
        name = "baseline" if cfg.baseline else "SemanticMIM"
        print(f"{'resuming' if ckpt else 'training'} {name} {asdict(cfg)} on {args.dataset}: "
              f"{world} process(es) on {device}, {steps_per_epoch} steps/epoch, {total} steps, "
              f"lr {peak_lr:.3g}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
              f"parameters", flush=True)
        if step >= total:
            print(f"nothing to do: the run in {args.out} is complete ({step}/{total} steps)")
    signals = []  # SIGTERM (a scheduler's pre-emption) or SIGINT (Ctrl-C): save, then exit
    flags = dist.new_group(backend="gloo") if world > 1 and device.type == "cuda" else None

    def on_signal(num, frame):
        if signals:                                         # the second one aborts at once
            raise KeyboardInterrupt
        signals.append(num)
        if rank == 0:
            say(f"signal {num}: saving a checkpoint after this step (again to abort)")

    def signalled():  # after every step, every rank learns of any rank's signal by an all-reduce
        got = torch.tensor([float(bool(signals))])  # on the CPU (Gloo: no GPU sync), so the save
        if world > 1:                               # starts long before torchrun's SIGKILL
            dist.all_reduce(got, group=flags)
        return bool(got)
    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    loss_sum, loss_n, t0, step0 = torch.zeros((), device=device), 0, time.time(), step
    last_good, saved_at, stop = (step if ckpt else None), time.time(), step >= total
    model.train()
    try:
        while not stop:
            epoch = step // steps_per_epoch
            for imgs in epoch_batches(epoch, step % steps_per_epoch):
                # the step: learning rate, masks of the global batch (this rank's rows), update
                lr = lr_at(step, total, warmup, peak_lr, args.min_lr)
                for group in opt.param_groups:
                    group["lr"] = lr
                keep, mask = sm.random_masking(args.batch_size, cfg.num_patches, cfg.num_masked,
                                               gen, device, cfg.independent_mask)
                loss_sum += train_step(net, model, opt, scaler, imgs, keep[rank::world],
                                       mask[rank::world], AMP_DTYPES[args.amp], args.clip, micro)
                step, loss_n = step + 1, loss_n + 1
                if step % args.log_every and step % args.ckpt_every and step not in (
                        total, args.stop_at) and not signalled():
                    continue
                # a progress line: one all-reduce decides for every rank; log, save, stop
                mean_loss, save, stop = decide(step, total, args, loss_sum, loss_n, signals,
                                               saved_at, world)
                if not math.isfinite(mean_loss):
                    kept = (f"the last good checkpoint {ckpt_path} (step {last_good}) is intact"
                            if last_good is not None else "no checkpoint was written")
                    raise SystemExit(f"error: loss is {mean_loss} between steps "
                                     f"{step - loss_n + 1} and {step}; stopped, {kept}. Try a "
                                     f"lower --blr, --amp none, or check the data")
                dt, ips = time.time() - t0, (step - step0) * args.batch_size / (time.time() - t0)
                if rank == 0:
                    try:
                        with open(log_path, "a") as f:
                            f.write(json.dumps({"step": step, "epoch": epoch, "loss": mean_loss,
                                                "lr": lr, "img_per_s": ips, "time": time.time(),
                                                "run": args.run}) + "\n")
                    except OSError as e:
                        raise fail("the log", log_path, e, last_good) from None
                    say(f"epoch {epoch} step {step}/{total} loss {mean_loss:.4f} lr {lr:.3g} "
                        f"{ips:.1f} img/s eta {(total - step) * dt / (step - step0) / 60:.1f} min")
                loss_sum.zero_()
                loss_n, t0, step0 = 0, time.time(), step
                if save and rank == 0:
                    state = training_state(model, opt, scaler, gen, step, cfg, args, data)
                    write_atomic(ckpt_path, lambda tmp: torch.save(state, tmp), "the checkpoint",
                                 last_good)
                if save and world > 1:
                    dist.barrier()                          # no rank runs ahead of the file
                last_good, saved_at = (step, time.time()) if save else (last_good, saved_at)
                if stop:
                    break
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    if rank == 0:
        say(f"stopped at step {step}; continue with --resume --out {shlex.quote(args.out)}"
            if step < total else next_steps(ckpt_path, world))
    if lock:
        lock.close()                                        # the folder is free again
    if world > 1:
        del net                                             # DDP holds the process group
        dist.destroy_process_group()
    return model


if __name__ == "__main__":
    run_main(main)
