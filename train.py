"""Pre-train SemanticMIM (or its one-stream baseline) on one CPU, one GPU, or many with torchrun.

    python train.py                                  # laptop smoke run: CIFAR-10, 1 epoch
    python train.py --dataset fashion_mnist --data data --epochs 20
    torchrun --nproc_per_node=8 train.py --data /imagenet --epochs 300 --warmup-epochs 30 \
        --batch-size 2048                            # the authors' ViT-B/16 settings

--batch-size is the global batch: the same command trains the same model on 1 or 8 processes.
The learning rate is --blr * global batch / 256 (the authors' 1.6e-3 at batch 2048 is
--blr 2e-4). This file also holds the data, distributed and checkpoint helpers that probe.py
and visualize.py import.
"""
import argparse
import json
import math
import os
import resource
import signal
import statistics
import sys
import time
from dataclasses import asdict, fields, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from torch.utils.data import DataLoader, DistributedSampler

import semanticmim as sm

# Per-channel mean and std of each data set's training images (ImageNet's for image folders).
MEAN_STD = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "fashion_mnist": ((0.2860,) * 3, (0.3530,) * 3),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "synthetic": ((0.5,) * 3, (0.25,) * 3),
}
DATASETS = tuple(MEAN_STD)
OFFLINE_HINT = ("offline choices: --dataset fashion_mnist --data DIR with the Debian copy "
                "unpacked into DIR/FashionMNIST/raw (see README), --dataset imagefolder --data DIR, "
                "or --dataset synthetic")


# --------------------------------------------------------------------------------------------
# Distributed set-up: torchrun's environment if present, else one process
# --------------------------------------------------------------------------------------------
def setup_distributed(device_arg="auto"):
    """Returns (rank, world_size, device). NCCL on GPUs, Gloo on CPU; plain python needs nothing."""
    if device_arg == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no GPU: use --device cpu")
    use_cuda = torch.cuda.is_available() if device_arg == "auto" else device_arg == "cuda"
    if use_cuda:                                # fp32 matmuls (--amp none) in TF32 on GPUs
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", 0))
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo")
        device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
        return rank, world, device
    return 0, 1, torch.device("cuda" if use_cuda else "cpu")


def all_mean(t, world):
    """Mean of a tensor over all ranks (a copy; t itself is left as it is)."""
    t = t.detach().clone()
    if world > 1:
        dist.all_reduce(t)
        t /= world
    return t


# --------------------------------------------------------------------------------------------
# Data: small data sets live on the device as one uint8 tensor; image folders use a DataLoader
# --------------------------------------------------------------------------------------------
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


def load_memory_dataset(name, root, train, size, synthetic_size=1024):
    """CIFAR-10/100, Fashion-MNIST or synthetic as (uint8 images (n, C, h, w), labels (n,))."""
    if name == "synthetic":
        n = synthetic_size if train else max(synthetic_size // 4, 1)
        return synthetic_images(n, size, seed=1 if train else 2)
    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100,
           "fashion_mnist": torchvision.datasets.FashionMNIST}[name]
    try:
        ds = cls(root, train=train, download=True)
    except (OSError, RuntimeError) as e:
        raise SystemExit(f"error: could not load or download {name} into {root} ({e}); "
                         f"{OFFLINE_HINT}") from None
    x = torch.as_tensor(ds.data)
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # (n, C, h, w): 1 or 3 channels
    return x.contiguous(), torch.as_tensor(ds.targets)


def to_model_input(x, size, mean, std):
    """uint8 or [0,1] float batch (B, C, h, w) -> normalised float (B, 3, size, size)."""
    x = x.float() / 255 if x.dtype == torch.uint8 else x
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True,
                          align_corners=False).clamp(0, 1)
    x = x.expand(-1, 3, -1, -1)                            # grayscale -> 3 channels
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def augment(x, size, r, min_scale=0.5):
    """RandomResizedCrop(scale=(min_scale, 1), ratio=(3/4, 4/3), bicubic) + horizontal flip on a
    whole uint8 batch (B, C, h, w) on its device, from uniform numbers r (B, 5). Returns floats
    in [0, 1], (B, C, size, size). Unlike torchvision's rejection loop, a crop larger than the
    image is clamped to the image side."""
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
    out = F.grid_sample(x.float() / 255, grid, mode="bicubic", padding_mode="border",
                        align_corners=False)                # (B, C, size, size)
    return out.clamp(0, 1)


def find_image_folder(path, split="train"):
    """--data /imagenet reads /imagenet/train when it exists, else the folder itself."""
    if not os.path.isdir(path):
        raise SystemExit(f"error: no such folder {path}: pass --data DIR holding one sub-folder "
                         f"of images per class (or DIR/{split}/ laid out so)")
    sub = os.path.join(path, split)
    return sub if os.path.isdir(sub) else path


class SeededFolder(torch.utils.data.Dataset):
    """An ImageFolder whose random transform is a pure function of (seed, epoch, index).

    Keys are (epoch, index) pairs, so augmentation does not depend on the worker count, the
    number of processes or on resuming: exact resume and DDP == one process hold here too."""
    def __init__(self, root, transform, seed):
        try:
            self.folder = torchvision.datasets.ImageFolder(root)
        except (FileNotFoundError, RuntimeError) as e:
            raise SystemExit(f"error: {root} is not an image folder ({e}): it needs one "
                             f"sub-folder of images per class") from None
        self.transform, self.seed = transform, seed

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, key):
        epoch, i = key
        img, label = self.folder[i]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, epoch, i)) & (2 ** 63 - 1))
            return self.transform(img), label


def folder_transform(size, train, mean, std, min_scale=0.5):
    """The authors' train (RandomResizedCrop bicubic + flip) or test (resize + centre crop)."""
    bicubic = T.InterpolationMode.BICUBIC
    if train:
        ops = [T.RandomResizedCrop(size, scale=(min_scale, 1.0), interpolation=bicubic),
               T.RandomHorizontalFlip()]
    else:
        ops = [T.Resize(int(size * 256 / 224), interpolation=bicubic), T.CenterCrop(size)]
    return T.Compose(ops + [T.ToTensor(), T.Normalize(mean, std)])


def make_batches(args, cfg, rank, world, device, gen):
    """Returns (steps_per_epoch, batches) where batches(epoch, start) yields this rank's
    normalised, augmented images (B/world, 3, S, S) on the device, from batch `start` on.

    Every rank draws the random numbers of the whole global batch from the shared generator
    and keeps its rows; DistributedSampler deals global position W*j + r to row j of rank r."""
    mean, std = MEAN_STD[args.dataset]
    local = args.batch_size // world
    rows = slice(rank, None, world)
    if args.dataset == "imagefolder":
        root = find_image_folder(args.data, "train")
        data = SeededFolder(root, folder_transform(cfg.img_size, True, mean, std, args.min_crop),
                            args.seed)
        keys = []  # the loader's sampler: refilled in place every epoch (persistent workers)
        loader = DataLoader(data, batch_size=local, sampler=keys, drop_last=True,
                            num_workers=args.workers, pin_memory=device.type == "cuda",
                            persistent_workers=args.workers > 0)
    else:
        images, _ = load_memory_dataset(args.dataset, args.data, True, cfg.img_size,
                                        args.synthetic_size)
        images = images.to(device)                          # (n, C, h, w) uint8, on the device
    n = len(data) if args.dataset == "imagefolder" else len(images)
    sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True,
                                 seed=args.seed, drop_last=True)
    steps = len(sampler) // local
    if steps == 0:
        raise SystemExit(f"error: {n} images give no full batch of {args.batch_size}: "
                         f"lower --batch-size")

    def batches(epoch, start):
        sampler.set_epoch(epoch)
        idx = list(sampler)[start * local: steps * local]
        if args.dataset == "imagefolder":
            keys[:] = [(epoch, i) for i in idx]
            for x, _ in loader:
                yield x.to(device, non_blocking=True)
            return
        idx = torch.tensor(idx, device=device)
        for k in range(steps - start):
            r = torch.rand(args.batch_size, 5, generator=gen, device=device)[rows]  # (B, 5)
            x = augment(images[idx[k * local:(k + 1) * local]], cfg.img_size, r, args.min_crop)
            yield to_model_input(x, cfg.img_size, mean, std)  # (B, 3, S, S)

    return steps, batches


# --------------------------------------------------------------------------------------------
# Optimisation: the authors' AdamW groups, linear warm-up then cosine, per step
# --------------------------------------------------------------------------------------------
NO_DECAY_TOKENS = ("pos_embed", "proxy", "mask_token")


def param_groups(model, weight_decay):
    """No weight decay on biases, norms and the learned tokens (authors' paramwise config)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or name in NO_DECAY_TOKENS else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model, lr, weight_decay):
    """AdamW with betas (0.9, 0.999), fused: on CPU the default per-parameter loop took a
    third of a training step of the cifar preset (torch profiler)."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.999),
                             fused=True)


def lr_at(step, total, warmup, peak, final=1e-6):
    """Linear warm-up over `warmup` steps, then cosine from peak to `final` at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * t))


def train_step(net, model, opt, scaler, imgs, ids_keep, ids_mask, amp_dtype, clip):
    """One optimizer step on one batch; returns the loss (a 0-dim tensor, not synchronised)."""
    with torch.autocast(imgs.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        loss = net(imgs, ids_keep, ids_mask)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip > 0:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    scaler.step(opt)
    scaler.update()
    return loss.detach()


def flops_per_image(cfg, plain=False):
    """Matmul FLOPs of one training image (backward = 2 x forward, but none for the pixels),
    counted from the architecture: patch embedding, attention projections, QK^T and AV, MLP,
    head. Norms, softmax, GELU, the HOG and the optimizer are left out (not matmuls).
    plain=True: the plain ViT step of plain_vit_loss."""
    D, P, N, Nm = cfg.dim, cfg.num_proxies, cfg.num_patches, cfg.num_masked
    Nv, mlp = N - Nm, 2 * cfg.mlp_ratio * D * D              # MLP weights: D*rD + rD*D

    def block(lq, lk):                                       # lq queries over lk keys/values
        return 2 * (lq * D * D + lk * 2 * D * D + lq * D * D + lq * mlp) + 4 * lq * lk * D

    embed = 2 * N * cfg.patch_size ** 2 * 3 * D
    fwd = embed + 2 * (N if plain else Nm) * D * cfg.target_dim
    if plain:
        fwd += cfg.depth * block(P + N, P + N)
    elif cfg.baseline:
        fwd += cfg.depth * block(P + Nv + Nm, P + Nv + Nm)
    else:
        fwd += cfg.depth * (block(P + Nv, P + Nv) + block(Nm, P + Nm))
    return 3 * fwd - embed                                   # no gradient for the input pixels


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}  # --amp -> dtype


def synchronizer(device):
    """A function that waits for the device's queued work (nothing to wait for on CPU)."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def matmul_peak(device, dtype, n=None, repeats=5):
    """The machine's peak FLOP/s: the fastest of `repeats` large square matmuls of this dtype
    (the best, not the median, so that a fraction of it is never flattered by a slow run);
    n = 4096 on CPU, 8192 on a GPU (a 4096 product is too short to fill an H100)."""
    n = n or (8192 if device.type == "cuda" else 4096)
    sync = synchronizer(device)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / min(times)


def plain_vit_loss(model, imgs):
    """A plain ViT training objective of (nearly) the same FLOPs as SemanticMIM's, for --bench:
    the main stack on [PROXY; all N patches], the head on every patch; no masks, no gathers."""
    patches = model.features(imgs)[1]                       # (B, N, D)
    return F.mse_loss(model.head(model.norm(patches)).float(), model.target(imgs))


def bench_step(args, cfg, plain, device):
    """A training step of the model of cfg (plain: plain_vit_loss) on fixed random images,
    warmed up (and compiled); returns (step function, GiB of memory it took)."""
    amp_dtype = AMP_DTYPES[args.amp]
    torch.manual_seed(args.seed)
    cuda = device.type == "cuda"
    before = torch.cuda.memory_allocated(device) if cuda else 0
    model = sm.SemanticMIM(cfg).to(device)
    net = (lambda imgs, keep, mask: plain_vit_loss(model, imgs)) if plain else model
    net = torch.compile(net) if args.compile else net
    opt = make_optimizer(model, 1e-4, args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    gen = torch.Generator(device=device)
    gen.manual_seed(args.seed)
    imgs = torch.randn(args.batch_size, 3, cfg.img_size, cfg.img_size, device=device)

    def step():
        keep, mask = sm.random_masking(args.batch_size, cfg.num_patches, cfg.num_masked, gen,
                                       device, cfg.independent_mask)
        return train_step(net, model, opt, scaler, imgs, keep, mask, amp_dtype, args.clip)

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(3):                                      # warm-up (and compilation)
        step()
    synchronizer(device)()
    mem = (torch.cuda.max_memory_allocated(device) - before if cuda else  # this model's own
           resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)     # the whole process
    return step, mem / 2 ** 30


def bench(args, cfg, device, repeats=5, steps=5):
    """Times the training step (masking, targets, forward, backward, AdamW; no data loading) of
    SemanticMIM, its baseline and a plain ViT on the same tokens (plain_vit_loss): images/s
    (median of `repeats` timings of `steps` steps, the models taking turns so that a machine
    whose speed drifts slows them alike), model FLOP/s and its fraction of the matmul peak of the
    same dtype, measured before and after the models (the higher of the two, so that a slow
    moment never flatters the fraction), peak memory. SemanticMIM's FLOP/s against the plain
    ViT's is what its two-stream bookkeeping (gathers, concatenations, short sequences) costs."""
    amp_dtype = AMP_DTYPES[args.amp]
    sync = synchronizer(device)
    peaks = [matmul_peak(device, amp_dtype or torch.float32)]
    models = {name: (replace(cfg, baseline=baseline), plain)
              for name, baseline, plain in (("SemanticMIM", False, False),
                                            ("baseline", True, False), ("plain ViT", True, True))}
    stepper, memory, times = {}, {}, {name: [] for name in models}
    for name, (c, plain) in models.items():
        stepper[name], memory[name] = bench_step(args, c, plain, device)
    for _ in range(repeats):
        for name in models:
            sync()
            t = time.perf_counter()
            for _ in range(steps):
                stepper[name]()
            sync()
            times[name].append(time.perf_counter() - t)
    results = {}
    for name, (c, plain) in models.items():
        ips = statistics.median(steps * args.batch_size / t for t in times[name])
        per_img = flops_per_image(c, plain)
        results[name] = {"img_per_s": ips, "gflop_per_img": per_img / 1e9,
                         "tflop_per_s": per_img * ips / 1e12, "memory_gib": memory[name]}
    peaks.append(matmul_peak(device, amp_dtype or torch.float32))
    peak = max(peaks)
    print(f"matmul peak ({args.amp}, {device}, {torch.get_num_threads()} threads): "
          f"{peak / 1e9:.1f} GFLOP/s (before the models {peaks[0] / 1e9:.1f}, after "
          f"{peaks[1] / 1e9:.1f})")
    for name, r in results.items():
        r["peak_fraction"] = r["tflop_per_s"] * 1e12 / peak
        print(f"{name:12s} {r['img_per_s']:8.1f} img/s  {r['gflop_per_img']:.3f} GFLOP/img  "
              f"{r['tflop_per_s'] * 1e3:.1f} GFLOP/s = {100 * r['peak_fraction']:.0f}% of peak  "
              f"{'peak allocated by it' if device.type == 'cuda' else 'peak RSS (process)'} "
              f"{r['memory_gib']:.2f} GiB  (median of {repeats} x {steps} steps, batch "
              f"{args.batch_size}, compile {args.compile})", flush=True)
    ratio = results["SemanticMIM"]["tflop_per_s"] / results["plain ViT"]["tflop_per_s"]
    print(f"SemanticMIM runs at {100 * ratio:.0f}% of the plain ViT's FLOP/s: its two-stream "
          f"bookkeeping costs {100 * (1 - ratio):.0f}%")
    if "dataset" in args.given:                             # --bench --dataset X: the loader too
        ips, step_ips = bench_loader(args, cfg, device), results["SemanticMIM"]["img_per_s"]
        where = (f"{args.workers} worker process(es)" if args.dataset == "imagefolder" else
                 f"in memory, augmented on {device}")
        results["loader"] = {"img_per_s": ips, "times_step": ips / step_ips}
        print(f"loader ({args.dataset}, {where}): {ips:.1f} img/s alone = {ips / step_ips:.1f} x "
              f"SemanticMIM's {step_ips:.1f} img/s: "
              + ("it keeps up" if ips > step_ips else "THE LOADER IS THE BOTTLENECK"), flush=True)
    print("command: python " + " ".join(sys.argv))
    return results


def bench_loader(args, cfg, device, batches=20):
    """Images/s of the training data of --dataset alone: reading, augmentation, normalisation,
    transfer to the device, as train.py feeds it; timed after the first batch (worker start)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(args.seed)
    steps, batches_of = make_batches(args, cfg, 0, 1, device, gen)
    if steps < 2:
        raise SystemExit(f"error: the loader benchmark needs 2 batches of {args.batch_size} "
                         f"images but {args.dataset} gives {steps}: lower --batch-size")
    n, sync, it = min(batches, steps - 1), synchronizer(device), batches_of(0, 0)
    next(it)
    sync()
    t = time.perf_counter()
    for _ in range(n):
        next(it)
    sync()
    seconds = time.perf_counter() - t
    it.close()
    return n * args.batch_size / seconds


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------
# The base learning rate of each preset. vit_b16: the authors' 1.6e-3 at batch 2048. cifar: 1e-3,
# the rate of the README's Fashion-MNIST results; at 2e-4 one epoch of the cifar preset left the
# attention uniform (mean distance 4.15 patches on the 8x8 grid, where uniform gives 4.17).
BLR = {"cifar": 1e-3, "vit_b16": 2e-4}
ARCH_FLAGS = tuple(f.name for f in fields(sm.Config))  # each has a flag, None = the preset's
RUNTIME_FLAGS = {"out", "resume", "data", "device", "workers", "compile", "log_every",
                 "ckpt_every", "stop_at", "bench"}  # may change on --resume; all others define the run


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument_group("data")
    a.add_argument("--dataset", choices=DATASETS, default=None,
                   help="default: imagefolder when --data is given, else cifar10")
    a.add_argument("--data", default=None, help="data root (default ./data); for imagefolder "
                   "the folder, or its parent holding train/")
    a.add_argument("--synthetic-size", type=int, default=1024, help="images of --dataset synthetic")
    a.add_argument("--min-crop", type=float, default=0.5, help="RandomResizedCrop minimum scale")
    a.add_argument("--workers", type=int, default=8, help="DataLoader workers (image folders)")
    m = p.add_argument_group("model (a preset, then any override)")
    m.add_argument("--preset", choices=sorted(sm.PRESETS), default=None,
                   help="default: vit_b16 for imagefolder, else cifar")
    m.add_argument("--img-size", type=int)
    m.add_argument("--patch-size", type=int)
    m.add_argument("--dim", type=int)
    m.add_argument("--depth", type=int)
    m.add_argument("--heads", type=int)
    m.add_argument("--mlp-ratio", type=float)
    m.add_argument("--num-proxies", type=int, help="P")
    m.add_argument("--mask-ratio", type=float)
    m.add_argument("--target", choices=("hog", "pixel"))
    m.add_argument("--baseline", action="store_true", default=None,
                   help="the paper's one-stream MIM comparison (no proxy bottleneck)")
    m.add_argument("--independent-mask", action="store_true", default=None,
                   help="draw the [MASK]/target set independently of the visible set")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=1)
    o.add_argument("--batch-size", type=int, default=256, help="global batch over all processes")
    o.add_argument("--blr", type=float, default=None, help="lr per 256 images: "
                   "lr = blr * batch-size / 256; default: the preset's (BLR)")
    o.add_argument("--min-lr", type=float, default=1e-6)
    o.add_argument("--warmup-epochs", type=float, default=None, help="default: 10%% of --epochs")
    o.add_argument("--weight-decay", type=float, default=0.05)
    o.add_argument("--clip", type=float, default=0.02, help="gradient-norm clip (0: off)")
    o.add_argument("--amp", choices=("bf16", "fp16", "none"), default="bf16",
                   help="autocast dtype; fp16 uses a GradScaler")
    o.add_argument("--seed", type=int, default=0)
    r = p.add_argument_group("run")
    r.add_argument("--out", default="out", help="folder for checkpoint.pt and log.jsonl")
    r.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    r.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    r.add_argument("--compile", action="store_true", help="torch.compile the model")
    r.add_argument("--log-every", type=int, default=20, help="steps between progress lines")
    r.add_argument("--ckpt-every", type=int, default=500, help="steps between checkpoints")
    r.add_argument("--stop-at", type=int, default=None, help="save and exit after this step "
                   "(to split a run into jobs; --resume continues it)")
    r.add_argument("--bench", action="store_true", help="time the training step of SemanticMIM, "
                   "its baseline and a plain ViT on random images (and, with --dataset, the "
                   "loader alone), print images/s, and exit")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    for action in parser._actions:                          # which flags were given explicitly
        action.default = argparse.SUPPRESS
    args.given = sorted(vars(parser.parse_args(argv)))
    if args.dataset is None:
        args.dataset = "imagefolder" if args.data else "cifar10"
    if args.data is None:
        if args.dataset == "imagefolder":
            raise SystemExit("error: --dataset imagefolder needs --data DIR")
        args.data = "data"
    if args.preset is None:
        args.preset = "vit_b16" if args.dataset == "imagefolder" else "cifar"
    if args.blr is None:
        args.blr = BLR[args.preset]
    if args.warmup_epochs is None:
        args.warmup_epochs = 0.1 * args.epochs
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
        raise SystemExit("error: --resume continues the saved run, but these flags differ from "
                         "it: " + ", ".join(f"--{k.replace('_', '-')} {getattr(args, k)!r} "
                                             f"(saved {saved[k]!r})" for k in clash)
                         + "; drop them or start a new --out")
    for k, v in saved.items():  # everything not given now comes from the saved run
        if k not in args.given and k not in ("given", "resume", "stop_at"):
            setattr(args, k, v)
    return args


# --------------------------------------------------------------------------------------------
# Checkpoints: written atomically, with everything needed to continue bit for bit
# --------------------------------------------------------------------------------------------
def save_checkpoint(path, **state):
    """torch.save to a temporary file, then rename: a crash never leaves a half-written file."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def rng_state(gen, device):
    state = {"torch": torch.get_rng_state(), "batch": gen.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, gen, device):
    torch.set_rng_state(state["torch"])
    gen.set_state(state["batch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    if args.bench:
        device = setup_distributed(args.device)[2]
        return bench(args, build_config(args), device)
    rank, world, device = setup_distributed(args.device)
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    log_path = os.path.join(args.out, "log.jsonl")
    ckpt = None
    if args.resume:
        if not os.path.isfile(ckpt_path):
            raise SystemExit(f"error: --resume but no checkpoint at {ckpt_path}: check --out")
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        args = merge_resumed_args(args, ckpt["args"])
        cfg = sm.config_from_dict(ckpt["config"])
    else:
        if os.path.exists(ckpt_path):
            raise SystemExit(f"error: {ckpt_path} exists: pass --resume to continue that run, "
                             f"or choose another --out")
        cfg = build_config(args)
    if args.batch_size % world:
        raise SystemExit(f"error: --batch-size {args.batch_size} is not divisible by the "
                         f"{world} processes")
    torch.manual_seed(args.seed)
    gen = torch.Generator(device=device)
    gen.manual_seed(args.seed)
    model = sm.SemanticMIM(cfg).to(device)
    steps_per_epoch, batches = make_batches(args, cfg, rank, world, device, gen)
    total = args.epochs * steps_per_epoch
    warmup = round(args.warmup_epochs * steps_per_epoch)
    peak_lr = args.blr * args.batch_size / 256
    opt = make_optimizer(model, peak_lr, args.weight_decay)
    amp_dtype = AMP_DTYPES[args.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    step = 0
    if ckpt is not None:
        sm.load_weights(model, ckpt["model"], ckpt["config"])
        opt.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"], gen, device)
        step = ckpt["step"]
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        net = torch.compile(net)

    def checkpoint():
        if rank == 0:
            save_checkpoint(ckpt_path, model=model.state_dict(), optimizer=opt.state_dict(),
                            scaler=scaler.state_dict(), step=step,
                            epoch=step // steps_per_epoch,
                            batch_in_epoch=step % steps_per_epoch, rng=rng_state(gen, device),
                            config=asdict(cfg), args={k: v for k, v in vars(args).items()})
        if world > 1:
            dist.barrier()

    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        if ckpt is not None and os.path.exists(log_path):   # drop log lines past the checkpoint
            with open(log_path) as f:
                kept = [ln for ln in f if json.loads(ln)["step"] <= step]
            with open(log_path, "w") as f:
                f.writelines(kept)
        print(f"{'resuming' if ckpt else 'training'} {'baseline' if cfg.baseline else 'SemanticMIM'}"
              f" {asdict(cfg)} on {args.dataset}: {world} process(es) on {device}, "
              f"{steps_per_epoch} steps/epoch, {total} steps, lr {peak_lr:.3g}, "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters", flush=True)
    if step >= total:
        if rank == 0:
            print(f"nothing to do: the run in {args.out} is complete ({step}/{total} steps)")
        return model

    rows = slice(rank, None, world)
    loss_sum, loss_n, t0, step0 = torch.zeros((), device=device), 0, time.time(), step
    last_good = step if ckpt is not None else None
    signals = []  # SIGTERM (a scheduler's pre-emption) or SIGINT (Ctrl-C): save, then exit

    def on_signal(num, frame):
        if signals:                                         # the second one aborts at once
            raise KeyboardInterrupt
        signals.append(num)
        print(f"signal {num}: saving a checkpoint at the next progress line (again to abort)",
              flush=True)

    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    model.train()
    try:
        while step < total:
            epoch = step // steps_per_epoch
            for imgs in batches(epoch, step % steps_per_epoch):
                lr = lr_at(step, total, warmup, peak_lr, args.min_lr)
                for group in opt.param_groups:
                    group["lr"] = lr
                ids_keep, ids_mask = sm.random_masking(args.batch_size, cfg.num_patches,
                                                       cfg.num_masked, gen, device,
                                                       cfg.independent_mask, rows)
                loss = train_step(net, model, opt, scaler, imgs, ids_keep, ids_mask, amp_dtype,
                                  args.clip)
                step += 1
                loss_sum += loss
                loss_n += 1
                stop = step == total or step == args.stop_at
                save = stop or step % args.ckpt_every == 0
                if save or step % args.log_every == 0:
                    flag = torch.tensor(float(bool(signals)), device=device)
                    mean_loss, signalled = all_mean(torch.stack([loss_sum / loss_n, flag]),
                                                    world).tolist()
                    if not math.isfinite(mean_loss):
                        kept = (f"the last good checkpoint {ckpt_path} (step {last_good}) is "
                                f"intact" if last_good is not None else "no checkpoint was written")
                        raise SystemExit(f"error: loss is {mean_loss} between steps "
                                         f"{step - loss_n + 1} and {step}; stopped, {kept}. Try a "
                                         f"lower --blr, --amp none, or check the data")
                    if signalled:
                        stop = save = True
                    dt = time.time() - t0
                    ips = (step - step0) * args.batch_size / dt
                    eta = (total - step) * dt / (step - step0)
                    if rank == 0:
                        rec = {"step": step, "epoch": epoch, "loss": mean_loss, "lr": lr,
                               "img_per_s": ips, "time": time.time()}
                        with open(log_path, "a") as f:
                            f.write(json.dumps(rec) + "\n")
                        print(f"epoch {epoch} step {step}/{total} loss {mean_loss:.4f} "
                              f"lr {lr:.3g} {ips:.1f} img/s eta {eta / 60:.1f} min", flush=True)
                    loss_sum.zero_()
                    loss_n, t0, step0 = 0, time.time(), step
                if save:
                    checkpoint()
                    last_good = step
                if stop:
                    break
            if stop and step < total:
                if rank == 0:
                    print(f"stopped at step {step}; continue with --resume --out {args.out}")
                break
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    if world > 1:
        dist.destroy_process_group()
    return model


if __name__ == "__main__":
    main()
