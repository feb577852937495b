"""Speed of the training step against the machine's limit: SemanticMIM, its one-stream baseline
and a plain ViT of the same tokens, taking turns; with --dataset also the loader alone.

    python experiments/bench.py                                   # the cifar preset, bf16
    python experiments/bench.py --amp none --batch-size 128 --dataset fashion_mnist --data data
    python experiments/bench.py --preset vit_b16 --device cuda --compile

It takes train.py's flags (preset, architecture overrides, --batch-size, --amp, --compile,
--device, --dataset/--data/--workers) and trains nothing: no checkpoint, no log. Printed per
model: images/s (median of 5 rounds of 5 steps, the models taking turns so that a machine whose
speed drifts slows them alike), the matmul FLOPs per image counted from the architecture
(forward and backward), the achieved FLOP/s as a fraction of the machine's peak (the best of 5
large matmuls of the same dtype, measured before and after the models; the higher counts) and the
peak memory.
"""
import os
import resource
import shlex
import statistics
import sys
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import semanticmim as sm  # noqa: E402
import train  # noqa: E402


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
    patches = model.features(imgs)[0][-1][1]               # (B, N, D)
    return F.mse_loss(model.head(model.norm(patches)).float(), model.target(imgs))


def bench_step(args, cfg, plain, device):
    """A training step of the model of cfg (plain: plain_vit_loss) on fixed random images,
    warmed up (and compiled); returns (step function, GiB of memory it took)."""
    amp_dtype = train.AMP_DTYPES[args.amp]
    torch.manual_seed(args.seed)
    cuda = device.type == "cuda"
    before = torch.cuda.memory_allocated(device) if cuda else 0
    model = sm.SemanticMIM(cfg).to(device)
    net = (lambda imgs, keep, mask: plain_vit_loss(model, imgs)) if plain else model
    net = torch.compile(net) if args.compile else net
    opt = train.make_optimizer(model, 1e-4, args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    gen = torch.Generator(device=device)
    gen.manual_seed(args.seed)
    imgs = torch.randn(args.batch_size, 3, cfg.img_size, cfg.img_size, device=device)

    def step():
        keep, mask = sm.random_masking(args.batch_size, cfg.num_patches, cfg.num_masked, gen,
                                       device, cfg.independent_mask)
        return train.train_step(net, model, opt, scaler, imgs, keep, mask, amp_dtype, args.clip,
                                args.micro_batch or args.batch_size)  # in parts: --micro-batch

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
    amp_dtype = train.AMP_DTYPES[args.amp]
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
    if "dataset" in args.given:                             # --dataset X: the loader too
        ips, step_ips = bench_loader(args, cfg, device), results["SemanticMIM"]["img_per_s"]
        where = (f"{args.workers} worker process(es)" if args.dataset == "imagefolder" else
                 f"in memory, augmented on {device}")
        results["loader"] = {"img_per_s": ips, "times_step": ips / step_ips}
        print(f"loader ({args.dataset}, {where}): {ips:.1f} img/s alone = {ips / step_ips:.1f} x "
              f"SemanticMIM's {step_ips:.1f} img/s: "
              + ("it keeps up" if ips > step_ips else "THE LOADER IS THE BOTTLENECK"), flush=True)
    return results


def bench_loader(args, cfg, device, batches=20):
    """Images/s of the training data of --dataset alone: reading, augmentation, normalisation,
    transfer to the device, as train.py feeds it; timed after the first batch (worker start)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(args.seed)
    steps, batches_of, _ = train.train_batches(args, cfg, 0, 1, device, gen)
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


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = train.parse_args(argv, prog="experiments/bench.py")
    device = train.setup_distributed(args.device)[2]
    args.amp = train.resolve_amp(args.amp, device)
    results = bench(args, train.build_config(args), device)
    print("command: " + shlex.join(["python", "experiments/bench.py"] + argv))
    return results


if __name__ == "__main__":
    main()
