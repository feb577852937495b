"""Pre-train SemanticMIM (or its one-stream baseline) on one CPU, one GPU, or many with torchrun.

    python train.py                                  # laptop smoke run: CIFAR-10, 1 epoch
    python train.py --dataset fashion_mnist --data data --epochs 2
    torchrun --nproc_per_node=8 train.py --data /imagenet --epochs 300 --warmup-epochs 30 \
        --batch-size 2048                            # the authors' ViT-B/16 settings

--batch-size is the global batch: the same command trains the same model on 1 or 8 processes.
The learning rate is --blr * global batch / 256 (the authors' 1.6e-3 at batch 2048 is
--blr 2e-4, the vit_b16 preset's default; the cifar preset's is 1e-3). Checkpoints are written
every --ckpt-every steps, at the first progress line --ckpt-minutes after the last save, at the
end and on SIGTERM/SIGINT; --resume continues a run bit for bit, so a kill loses at most the
steps since the last save. A finished run prints its checkpoint and the probe.py and
visualize.py commands to run next.

The file reads top-down: 1 arguments, 2 distributed set-up, 3 data, 4 model and optimizer,
5 checkpoints, 6 the training loop (main). Data sets and transforms shared with probe.py and
visualize.py are in data.py, the checked flag types and the distributed set-up in common.py; the
speed benchmark is experiments/bench.py.
"""
import argparse
import json
import math
import os
import shlex
import signal
import time
from dataclasses import asdict, fields

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

import common
import data
import semanticmim as sm
from common import COUNT, FRACTION, NATURAL, NONNEGATIVE, POSITIVE, number

# --------------------------------------------------------------------------------------------
# 1. Arguments: every flag checked where it is parsed; a preset, then any override
# --------------------------------------------------------------------------------------------
# The base learning rate of each preset. vit_b16: the authors' 1.6e-3 at batch 2048. cifar: 1e-3,
# the rate of the README's Fashion-MNIST results (at 2e-4, one epoch of the former width-192
# cifar preset left the attention of the last block as good as uniform).
BLR = {"cifar": 1e-3, "vit_b16": 2e-4}


ARCH_FLAGS = tuple(f.name for f in fields(sm.Config))  # each has a flag, None = the preset's
RUNTIME_FLAGS = {"out", "resume", "data", "device", "workers", "compile", "log_every",
                 "ckpt_every", "ckpt_minutes", "stop_at"}  # may change on --resume; others may not


def build_parser(prog="train.py"):
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument_group("data")
    a.add_argument("--dataset", choices=data.DATASETS, default=None,
                   help="default: imagefolder when --data is given, else cifar10")
    a.add_argument("--data", default=None, help="data root (default ./data); for imagefolder "
                   "the folder, or its parent holding train/")
    a.add_argument("--synthetic-size", type=COUNT, default=1024,
                   help="images of --dataset synthetic")
    a.add_argument("--min-crop", type=FRACTION, default=0.5,
                   help="RandomResizedCrop minimum scale")
    a.add_argument("--workers", type=NATURAL, default=8, help="DataLoader workers (image folders)")
    m = p.add_argument_group("model (a preset, then any override)")
    m.add_argument("--preset", choices=sorted(sm.PRESETS), default=None,
                   help="default: vit_b16 for imagefolder, else cifar")
    m.add_argument("--img-size", type=COUNT)
    m.add_argument("--patch-size", type=COUNT)
    m.add_argument("--dim", type=COUNT)
    m.add_argument("--depth", type=COUNT)
    m.add_argument("--heads", type=COUNT)
    m.add_argument("--mlp-ratio", type=POSITIVE)
    m.add_argument("--num-proxies", type=NATURAL, help="P")
    m.add_argument("--mask-ratio", type=number(float, 0, 1, open_low=True, open_high=True))
    m.add_argument("--target", choices=("hog", "pixel"))
    m.add_argument("--baseline", action="store_true", default=None,
                   help="the paper's one-stream MIM comparison (no proxy bottleneck)")
    m.add_argument("--independent-mask", action="store_true", default=None,
                   help="draw the [MASK]/target set independently of the visible set")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=COUNT, default=1)
    o.add_argument("--batch-size", type=COUNT, default=256,
                   help="global batch over all processes")
    o.add_argument("--blr", type=POSITIVE, default=None, help="lr per 256 images: "
                   "lr = blr * batch-size / 256; default: the preset's (BLR)")
    o.add_argument("--min-lr", type=NONNEGATIVE, default=1e-6)
    o.add_argument("--warmup-epochs", type=NONNEGATIVE, default=None,
                   help="default: 10%% of --epochs")
    o.add_argument("--weight-decay", type=NONNEGATIVE, default=0.05)
    o.add_argument("--clip", type=NONNEGATIVE, default=0.02, help="gradient-norm clip (0: off)")
    o.add_argument("--amp", choices=("auto", "bf16", "fp16", "none"), default="auto",
                   help="autocast dtype; fp16 uses a GradScaler; auto: bf16 on a GPU, none on a "
                   "CPU (a CPU without bf16 instructions runs bf16 autocast ~10x slower)")
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
    r.add_argument("--stop-at", type=COUNT, default=None, help="save and exit after this step "
                   "(to split a run into jobs; --resume continues it)")
    return common.one_line_errors(p)


def parse_args(argv=None, prog="train.py"):
    parser = build_parser(prog)
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
# 2. Distributed: set-up and tear-down are common.py's; here the mean over the ranks
# --------------------------------------------------------------------------------------------
def all_mean(t, world):
    """Mean of a tensor over all ranks (a copy; t itself is left as it is)."""
    t = t.detach().clone()
    if world > 1:
        dist.all_reduce(t)
        t /= world
    return t


# --------------------------------------------------------------------------------------------
# 3. Data: small data sets live on the device as one uint8 tensor; image folders use workers
# --------------------------------------------------------------------------------------------
def make_batches(args, cfg, rank, world, device, gen):
    """Returns (steps_per_epoch, batches) where batches(epoch, start) yields this rank's
    normalised, augmented images (B/world, 3, S, S) on the device, from batch `start` on.

    Every rank draws the random numbers of the whole global batch from the shared generator
    and keeps its rows; DistributedSampler deals global position W*j + r to row j of rank r."""
    mean, std = data.MEAN_STD[args.dataset]
    local = args.batch_size // world
    rows = slice(rank, None, world)
    if args.dataset == "imagefolder":
        root = data.find_image_folder(args.data, "train")
        folder = data.SeededFolder(
            root, data.folder_transform(cfg.img_size, True, mean, std, args.min_crop), args.seed)
        keys = []  # the loader's sampler: refilled in place every epoch (persistent workers)
        loader = DataLoader(folder, batch_size=local, sampler=keys, drop_last=True,
                            num_workers=args.workers, pin_memory=device.type == "cuda",
                            persistent_workers=args.workers > 0, collate_fn=data.collate_images)
    else:
        images, _ = data.load_memory_dataset(args.dataset, args.data, True, cfg.img_size,
                                             args.synthetic_size)
        images = images.to(device)                          # (n, C, h, w) uint8, on the device
    n = len(folder) if args.dataset == "imagefolder" else len(images)
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
            yield from data.folder_batches(loader, device)
            return
        idx = torch.tensor(idx, device=device)
        for k in range(steps - start):
            r = torch.rand(args.batch_size, 5, generator=gen, device=device)[rows]  # (B, 5)
            x = data.augment(images[idx[k * local:(k + 1) * local]], cfg.img_size, r,
                             args.min_crop)                 # (B, C, S, S)
            yield data.to_model_input(x, cfg.img_size, mean, std)  # (B, 3, S, S)

    return steps, batches


# --------------------------------------------------------------------------------------------
# 4. Model and optimizer: the authors' AdamW groups, linear warm-up then cosine, per step (their
# configs/maskfeat/maskfeat_bottleneck_pretrain.py: lr 1.6e-3 at batch 2048, betas (0.9, 0.999),
# weight decay 0.05, gradient-norm clip 0.02, 30 warm-up epochs of 300, cosine to 1e-6)
# --------------------------------------------------------------------------------------------
NO_DECAY_TOKENS = ("pos_embed", "proxy", "mask_token")


def param_groups(model, weight_decay):
    """No weight decay on biases, norms and the learned tokens (the paramwise settings of the
    authors' configs/maskfeat/maskfeat_bottleneck_pretrain.py)."""
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


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}  # --amp -> dtype


def resolve_amp(amp, device):
    """--amp auto -> bf16 on a GPU, none on a CPU; any other choice stays."""
    return ("bf16" if device.type == "cuda" else "none") if amp == "auto" else amp



# --------------------------------------------------------------------------------------------
# 5. Checkpoints: written atomically, with everything needed to continue bit for bit
# --------------------------------------------------------------------------------------------
TRAINING_STATE = ("config", "model", "optimizer", "scaler", "rng", "step", "args")  # --resume


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


def print_next_steps(ckpt_path, world=1):
    """The last lines of a finished run: its checkpoint and the commands to run on it next."""
    path = shlex.quote(ckpt_path)
    launcher = f"torchrun --nproc_per_node={world}" if world > 1 else "python"
    print(f"checkpoint: {ckpt_path}\nnext:\n  {launcher} probe.py {path}\n"
          f"  python visualize.py {path}", flush=True)


# --------------------------------------------------------------------------------------------
# 6. Training: the loop, progress lines, checkpoints, the end
# --------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    rank, world, device = common.setup_distributed(args.device)
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    log_path = os.path.join(args.out, "log.jsonl")
    ckpt = None
    if args.resume:
        if not os.path.isfile(ckpt_path):
            raise SystemExit(f"error: --resume but no checkpoint at {ckpt_path}: check --out")
        try:
            ckpt = sm.read_checkpoint(ckpt_path, needs=TRAINING_STATE)
            cfg = sm.config_from_dict(ckpt["config"])
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        args = merge_resumed_args(args, ckpt["args"])
    else:
        if os.path.exists(ckpt_path):
            raise SystemExit(f"error: {ckpt_path} exists: pass --resume to continue that run, "
                             f"or choose another --out")
        cfg = build_config(args)
    args.amp = resolve_amp(args.amp, device)
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
        try:
            sm.load_weights(model, ckpt["model"], ckpt["config"])
            opt.load_state_dict(ckpt["optimizer"])
            scaler.load_state_dict(ckpt["scaler"])
            set_rng_state(ckpt["rng"], gen, device)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise SystemExit(f"error: {ckpt_path} could not be resumed "
                             f"({' '.join(str(e).split())[:300]})") from None
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
        elif ckpt is None and os.path.exists(log_path):     # a run that died before saving
            print(f"note: {log_path} holds an earlier run that wrote no checkpoint: "
                  f"starting a new log", flush=True)
            os.remove(log_path)
        print(f"{'resuming' if ckpt else 'training'} {'baseline' if cfg.baseline else 'SemanticMIM'}"
              f" {asdict(cfg)} on {args.dataset}: {world} process(es) on {device}, "
              f"{steps_per_epoch} steps/epoch, {total} steps, lr {peak_lr:.3g}, "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters", flush=True)
    if step >= total:
        if rank == 0:
            print(f"nothing to do: the run in {args.out} is complete ({step}/{total} steps)")
            print_next_steps(ckpt_path)
        return model

    rows = slice(rank, None, world)
    loss_sum, loss_n, t0, step0 = torch.zeros((), device=device), 0, time.time(), step
    last_good = step if ckpt is not None else None
    saved_at = time.time()                                  # for --ckpt-minutes
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
                    due = 0 < args.ckpt_minutes <= (time.time() - saved_at) / 60
                    flags = torch.tensor([float(bool(signals)), float(due)], device=device)
                    mean_loss, signalled, due = all_mean(  # every rank decides alike
                        torch.cat([(loss_sum / loss_n).view(1), flags]), world).tolist()
                    if not math.isfinite(mean_loss):
                        kept = (f"the last good checkpoint {ckpt_path} (step {last_good}) is "
                                f"intact" if last_good is not None else "no checkpoint was written")
                        raise SystemExit(f"error: loss is {mean_loss} between steps "
                                         f"{step - loss_n + 1} and {step}; stopped, {kept}. Try a "
                                         f"lower --blr, --amp none, or check the data")
                    if signalled:
                        stop = save = True
                    save = save or due > 0
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
                    last_good, saved_at = step, time.time()
                if stop:
                    break
            if stop and step < total:
                if rank == 0:
                    print(f"stopped at step {step}; continue with --resume --out {args.out}")
                break
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    if rank == 0 and step == total:
        print_next_steps(ckpt_path, world)
    if world > 1:
        del net                                             # DDP holds the process group
        common.end_distributed(device)
    return model


if __name__ == "__main__":
    main()
