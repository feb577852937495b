"""Each test proves one claim of the four scripts (no network; a few minutes on 2 CPU cores)."""
import argparse
import errno
import json
import math
import os
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import time
import urllib.error
import warnings
from dataclasses import asdict
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

import probe
import semanticmim as sm
import train
import visualize

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "experiments"))
import bench  # noqa: E402  experiments/bench.py

# ---- helpers: one tiny config, one tiny run, one way to run a script, one way to patch a step ----
TINY = dict(img_size=32, patch_size=4, dim=32, depth=3, heads=2, num_proxies=4)
# a tiny synthetic run of train.py: 128 images, global batch 16 -> 8 steps per epoch, fp32
TINY_RUN = ["--dataset", "synthetic", "--synthetic-size", "128", "--batch-size", "16", "--dim",
            "32", "--depth", "2", "--heads", "2", "--num-proxies", "4", "--log-every", "2",
            "--amp", "none"]
FOLDER_RUN = ["--preset", "cifar", "--dim", "32", "--depth", "1", "--heads", "2"]  # + --data DIR
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

def tiny(**kw):
    return sm.Config(**{**TINY, **kw})

def run(script, *args, timeout=120, **kw):
    """python SCRIPT ARGS in the repository root, one thread, output captured, time-limited."""
    return subprocess.run([sys.executable, os.path.join(HERE, script), *map(str, args)],
                          capture_output=True, text=True, cwd=kw.pop("cwd", HERE), env=ENV,
                          timeout=timeout, **kw)

TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")

def torchrun(script, *args, timeout=300):
    """The same under torchrun with 2 Gloo processes (a rank that never exits fails it)."""
    return subprocess.run([*TORCHRUN, os.path.join(HERE, script), *map(str, args)],
                          capture_output=True, text=True, cwd=HERE, env=ENV, timeout=timeout)

def start(argv, until, launcher=(sys.executable,)):
    """A real process in its own process group (as torchrun starts a rank), read until `until`."""
    p = subprocess.Popen([*launcher, os.path.join(HERE, argv[0]), *map(str, argv[1:])], cwd=HERE,
                         env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    assert any(until in line for line in p.stdout), p.stderr.read()
    return p

def patch_forward(monkeypatch, change):
    """SemanticMIM.forward returns change(n, loss) for the loss of its n-th call (1-based)."""
    forward, calls = sm.SemanticMIM.forward, []

    def patched(self, *a):
        calls.append(1)
        return change(len(calls), forward(self, *a))
    monkeypatch.setattr(sm.SemanticMIM, "forward", patched)

def one_line(main, argv, capsys):
    """A script's main on bad input -> (exit status, the one line it printed or exited with)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    code, err = e.value.code, capsys.readouterr().err
    return (1, code) if isinstance(code, str) else (code, err.strip())

def write_image_folder(root, split, per_class, colour, size=lambda i: (40 + i, 36), ext="png"):
    """root/split/class0 and class1, per_class solid images: image i of class c is colour(c, i)."""
    for c in range(2):
        d = root / split / f"class{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", size(i), colour(c, i)).save(d / f"{i}.{ext}")

def masks(cfg, batch, seed=0):
    return sm.random_masking(batch, cfg.num_patches, cfg.num_masked,
                             torch.Generator().manual_seed(seed), "cpu")

def weights_of(path):
    return torch.load(path, weights_only=True)["model"]

def seeded(**kw):
    """A tiny model seeded 0 (eval mode), its config, 2 random images and their masks."""
    torch.manual_seed(0)
    cfg = tiny(**kw)
    return sm.SemanticMIM(cfg).eval(), cfg, torch.randn(2, 3, 32, 32), *masks(cfg, 2)

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread is faster than two, and far faster on a busy 2-core machine."""
    threads, _ = torch.get_num_threads(), torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """runs/sm: SemanticMIM, HOG, at a high lr (far from its start); runs/base: baseline, pixels."""
    root = tmp_path_factory.mktemp("runs")
    train.main(TINY_RUN + ["--blr", "0.05", "--out", str(root / "sm")])
    train.main(TINY_RUN + ["--baseline", "--target", "pixel", "--out", str(root / "base")])
    return root

@pytest.fixture(scope="module")
def ckpt(runs):
    return str(runs / "sm" / "checkpoint.pt")

# ---- 1. the method: patches, masks, attention, information flow, targets, loss ------------------
def test_patchify_is_row_major_row_col_channel_the_pixel_target_per_patch_fp32_under_bf16():
    x = torch.randn(2, 3, 32, 32)
    p = sm.patchify(x, 4)
    assert p.shape == (2, 64, 48)
    assert torch.equal(p[0, 1], x[0, :, 0:4, 4:8].permute(1, 2, 0).reshape(-1))  # row 0, col 1
    assert torch.equal(visualize.unpatchify(p, 4), x)
    imgs = torch.rand(2, 3, 32, 32) * 5 + 3
    t = sm.pixel_target(imgs, 4)                                 # (2, 64, 48)
    torch.testing.assert_close(t.mean(-1), torch.zeros(2, 64), atol=1e-5, rtol=0)
    torch.testing.assert_close(t.std(-1), torch.ones(2, 64), atol=1e-4, rtol=0)
    patch = imgs[0, :, 4:8, 8:12].permute(1, 2, 0).reshape(-1)   # patch (1, 2)
    torch.testing.assert_close(t[0, 10], (patch - patch.mean()) / (patch.var() + 1e-6) ** 0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        t = sm.SemanticMIM(tiny()).target(imgs)                  # HOG
    assert t.dtype == torch.float32 and torch.equal(t, sm.hog_target(imgs, 4))

def test_masks_have_exactly_nm_sorted_uniform_patches_per_image_disjoint_unless_independent():
    """Nm = ceil(N x ratio), the authors' counts: 52/64 and 157/196 at 0.8, 79/196 at 0.4."""
    counts = [sm.Config(img_size=s, patch_size=p, mask_ratio=r).num_masked
              for s, p, r in ((32, 4, 0.8), (224, 16, 0.8), (224, 16, 0.4))]
    B, N, Nm = 64, 64, counts[0]
    keep, mask = sm.random_masking(B, N, Nm, torch.Generator().manual_seed(0), "cpu")
    assert counts == [52, 157, 79] and keep.shape == (B, N - Nm) and mask.shape == (B, Nm)
    for k, m in zip(keep.tolist(), mask.tolist()):
        assert set(k).isdisjoint(m) and sorted(k + m) == list(range(N))
        assert k == sorted(k) and m == sorted(m)                # raster order, both
    assert len({tuple(m) for m in mask.tolist()}) == B          # every image its own mask
    assert torch.equal(masks(tiny(), B)[1], masks(tiny(), B)[1])  # the caller's seed decides
    keep, mask = sm.random_masking(B, N, Nm, torch.Generator().manual_seed(0), "cpu", True)
    assert keep.shape == (B, N - Nm) and all(len(set(m)) == Nm for m in mask.tolist())
    assert sum(len(set(k) & set(m)) for k, m in zip(keep.tolist(), mask.tolist())) > 0  # apart
    freq = masks(tiny(), 4000)[1].flatten().bincount(minlength=64) / 4000    # (N,), 52/64 each
    assert (freq - 52 / 64).abs().max() < 0.03, freq

def test_sdpa_equals_explicit_softmax_fused_equals_split_and_block_ln1_normalises_q_and_kv():
    torch.manual_seed(0)
    attn, q, kv = sm.Attention(32, 4), torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    (fast, none), (slow, w) = attn(q, kv), attn(q, kv, return_weights=True)
    assert none is None and w.shape == (2, 4, 5, 7)
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 5))
    torch.testing.assert_close(attn(kv, kv)[0], attn(kv, kv.clone())[0], atol=1e-6, rtol=1e-5)
    blk = sm.Block(32, 2, 4.0)                      # ln1, its own weights, on query and keys
    with torch.no_grad():
        blk.norm1.weight.uniform_(0.5, 1.5)
    x, ctx = torch.randn(2, 3, 32), torch.randn(2, 4, 32)
    expect = x + blk.attn(blk.norm1(x), blk.norm1(torch.cat([ctx, x], 1)))[0]
    expect = expect + blk.mlp(blk.norm2(expect))
    out, weights = blk(x, ctx)
    torch.testing.assert_close(out, expect)
    assert weights is None and blk(x, ctx, return_weights=True)[1].shape == (2, 2, 3, 7)

def predict_with_hooks(model, imgs, keep, mask, hooks):
    handles = [mod.register_forward_hook(fn) for mod, fn in hooks]
    try:
        with torch.no_grad():
            return model.predict(imgs, keep, mask)[0]
    finally:
        for h in handles:
            h.remove()

@pytest.mark.parametrize("baseline", [False, True])
def test_mask_tokens_see_images_only_via_the_proxies_and_main_tokens_never_see_them(baseline):
    """New image, its proxies forced to the old one's: [MASK] predictions stay. Another [MASK]
    token: every main-stack output stays bit for bit. (The baseline: both move.)"""
    model, cfg, a, keep, mask = seeded(baseline=baseline)
    b, P, seen = torch.randn(2, 3, 32, 32), cfg.num_proxies, {}

    def every_block(fn):                                # fn(depth, output) -> new output or None
        return [(blk, lambda m, inp, out, i=i: fn(i, out)) for i, blk in enumerate(model.blocks)]
    pred_a = predict_with_hooks(model, a, keep, mask, every_block(
        lambda i, out: seen.__setitem__(i, out[0][:, :P].clone())))
    forced = predict_with_hooks(model, b, keep, mask, every_block(
        lambda i, out: (torch.cat([seen[i], out[0][:, P:]], 1), out[1])))
    assert not torch.allclose(pred_a, predict_with_hooks(model, b, keep, mask, []), atol=1e-4)
    assert torch.equal(pred_a, forced) != baseline
    rows = P + keep.shape[1]                                    # [PROXY; IMG] rows
    record = every_block(lambda i, out: seen.__setitem__(i, out[0][:, :rows].clone()))
    predict_with_hooks(model, a, keep, mask, record)
    before = dict(seen)
    with torch.no_grad():
        model.mask_token.add_(torch.randn_like(model.mask_token))
    predict_with_hooks(model, a, keep, mask, record)
    assert all(torch.equal(before[i], seen[i]) for i in before) != baseline

@pytest.mark.parametrize("baseline", [False, True])
def test_every_token_enters_with_its_own_position_entry_mask_tokens_too(baseline):
    """Inputs of the first block: [PROXY] k = proxy k + pos[k]; [IMG] and [MASK] at patch j get
    pos[P + j] (the mask stream's; the baseline's one stream: [MASK] rows last)."""
    model, cfg, imgs, keep, mask = seeded(baseline=baseline)
    P, Nv, seen = cfg.num_proxies, keep.shape[1], []
    first = [model.blocks[0]] + ([] if baseline else [model.mask_blocks[0]])
    predict_with_hooks(model, imgs, keep, mask, [(b, lambda m, i, o: seen.append(i[0]))
                                                 for b in first])
    with torch.no_grad():
        pos = model.pos_embed[0]                                        # (P+N, D)
        img = sm.gather_tokens(model.patch_embed(sm.patchify(imgs, 4)), keep)  # (B, Nv, D)
        want_mask = model.mask_token[0] + pos[P + mask]                  # (B, Nm, D)
        torch.testing.assert_close(model.mask_tokens(mask), want_mask)
        torch.testing.assert_close(seen[0][:, :P], (model.proxy + pos[:P]).expand(2, -1, -1))
        torch.testing.assert_close(seen[0][:, P:P + Nv], img + pos[P + keep])
        torch.testing.assert_close(seen[0][:, P + Nv:] if baseline else seen[1], want_mask)

def test_mask_blocks_read_the_main_blocks_proxies_at_the_same_depth_the_baseline_one_stream():
    model, cfg, imgs, keep, mask = seeded(depth=3)
    P = cfg.num_proxies

    def mask_outputs(bump_depth=None):
        outs = []
        hooks = [(mb, lambda m, i, o: outs.append(o[0].clone())) for mb in model.mask_blocks]
        if bump_depth is not None:                     # noise: a constant would cancel in LN
            hooks.append((model.blocks[bump_depth], lambda m, i, o: (torch.cat(
                [o[0][:, :P] + torch.randn_like(o[0][:, :P]), o[0][:, P:]], 1), o[1])))
        predict_with_hooks(model, imgs, keep, mask, hooks)
        return outs
    clean, bumped = mask_outputs(), mask_outputs(bump_depth=1)
    assert torch.equal(clean[0], bumped[0])          # mask block 0 is before main block 1's output
    assert not torch.allclose(clean[1], bumped[1])   # mask block 1 reads main block 1's proxies
    base, lengths = sm.SemanticMIM(tiny(baseline=True)), []  # one stream, the same main stack
    assert not hasattr(base, "mask_blocks") and sm.Config(num_proxies=0, baseline=True)
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(base) == count(model) - count(model.mask_blocks)
    hooks = [(blk, lambda m, i, o: lengths.append(o[0].shape[1])) for blk in base.blocks]
    predict_with_hooks(base, imgs, keep, mask, hooks)
    assert lengths == [cfg.num_proxies + keep.shape[1] + mask.shape[1]] * cfg.depth

def test_initialisation_is_the_authors():
    """trunc-normal std 0.02: positions, proxies, [MASK], every Linear weight; Linear biases 0;
    LayerNorm 1 and 0, eps 1e-6 (the cifar preset: each tensor large enough to measure)."""
    torch.manual_seed(0)
    model = sm.SemanticMIM(sm.PRESETS["cifar"])
    norms = {n for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    assert len(norms) == 17 and all(model.get_submodule(n).eps == 1e-6 for n in norms)
    for name, p in model.named_parameters():
        module, _, kind = name.rpartition(".")
        if module in norms or kind == "bias":
            assert p.eq(float(module in norms and kind == "weight")).all(), name
        else:                                          # smallest: [MASK], 128 values
            assert abs(p.std() - 0.02) < 0.003 and abs(p.mean()) < 0.005, (name, p.std())

def test_features_are_the_main_stack_on_all_patches_block_by_block():
    model, _, imgs, _, _ = seeded()
    with torch.no_grad():
        (outs, attn), x = model.features(imgs, 2, return_attn=True), torch.cat(model.embed(imgs), 1)
        for i, blk in enumerate(model.blocks[:2]):
            x, w = blk(x, return_weights=True)
            torch.testing.assert_close(torch.cat(outs[i], 1), x)
            torch.testing.assert_close(attn[i], w)
    assert outs[0][0].shape == (2, 4, 32) and outs[0][1].shape == (2, 64, 32)
    assert len(model.features(imgs)[0]) == 3 and model.features(imgs)[1] == []
    with pytest.raises(ValueError, match="layer 4 does not exist"):
        model.features(imgs, 4)
    with pytest.raises(ValueError, match="expects 32x32"):
        model.features(torch.randn(1, 3, 28, 28))

def naive_hog(img, p, nbins=9):
    """The authors' HOG written out pixel by pixel in plain Python, for one image (3, H, W)."""
    (C, H, W), a = img.shape, img.tolist()
    refl = lambda i, n: -i if i < 0 else (2 * (n - 1) - i if i >= n else i)
    px = lambda c, y, x: a[c][refl(y, H)][refl(x, W)]
    g = [math.exp(-0.5 * ((i - (p - 1) / 2) / (p // 2)) ** 2) for i in range(p)]
    total, cell = sum(u * v for u in g for v in g), p // 2
    hist = [[[[0.0] * (W // cell) for _ in range(H // cell)] for _ in range(nbins)]
            for _ in range(C)]
    for c in range(C):
        for y in range(H):
            for x in range(W):
                gx = sum(w * (px(c, y + d, x - 1) - px(c, y + d, x + 1))
                         for w, d in ((1, -1), (2, 0), (1, 1)))
                gy = sum(w * (px(c, y - 1, x + d) - px(c, y + 1, x + d))
                         for w, d in ((1, -1), (2, 0), (1, 1)))
                b = math.floor(math.atan2(gx, gy) / math.pi * nbins) % nbins
                weight = g[y % p] * g[x % p] / total
                hist[c][b][y // cell][x // cell] += math.hypot(gx, gy) * weight
    for c in range(C):
        for cy in range(H // cell):
            for cx in range(W // cell):
                norm = math.sqrt(sum(hist[c][b][cy][cx] ** 2 for b in range(nbins)))
                for b in range(nbins):
                    hist[c][b][cy][cx] /= max(norm, 1e-12)
    return [[hist[c][b][py * 2 + r][qx * 2 + s] for c in range(C) for b in range(nbins)
             for r in range(2) for s in range(2)]
            for py in range(H // p) for qx in range(W // p)]

@pytest.mark.parametrize("size,patch,batch", [(224, 16, 1), (32, 4, 2), (48, 8, 1)])
def test_hog_equals_naive_loop(size, patch, batch):  # an odd patch: TRAIN_ERRORS
    torch.manual_seed(0)
    imgs = torch.randn(batch, 3, size, size, dtype=torch.float64)
    expect = torch.tensor([naive_hog(im, patch) for im in imgs], dtype=torch.float64)  # (B, N, 108)
    torch.testing.assert_close(sm.hog_target(imgs, patch), expect, atol=1e-10, rtol=1e-8)

@pytest.mark.parametrize("baseline", [False, True])
def test_tiny_model_overfits_one_batch(baseline):
    torch.manual_seed(0)
    cfg = tiny(baseline=baseline, dim=64, target="pixel")
    model, imgs, (keep, mask) = sm.SemanticMIM(cfg), torch.randn(8, 3, 32, 32), masks(cfg, 8)
    opt, losses = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0), []
    for _ in range(200):
        loss = model(imgs, keep, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])

def test_loss_is_mse_on_masked_patches_only_and_a_checkpoint_rebuilds_its_own_model(tmp_path):
    model, cfg, imgs, keep, mask = seeded(target="pixel")
    with torch.no_grad():
        pred = model.predict(imgs, keep, mask)[0]
        expect = ((pred - sm.gather_tokens(sm.pixel_target(imgs, 4), mask)) ** 2).mean()
        assert pred.shape == (2, cfg.num_masked, 48)
        torch.testing.assert_close(model(imgs, keep, mask), expect)
    path = str(tmp_path / "checkpoint.pt")
    torch.save(dict(model=model.state_dict(), config=asdict(cfg)), path)
    loaded, _ = train.load_model(path)
    assert loaded.cfg == cfg and not loaded.training
    assert torch.equal(loaded.predict(imgs, keep, mask)[0],
                       model.eval().predict(imgs, keep, mask)[0])
    torch.save(dict(model=model.state_dict(), config=asdict(tiny(num_proxies=1))), path)
    with pytest.raises(SystemExit, match="size mismatch for pos_embed"):  # another shape
        train.load_model(path)

# ---- 2. pre-training: schedule, data, runs, resume, processes -----------------------------------
def test_lr_schedule_parameter_groups_and_the_lr_is_blr_x_global_batch_over_256_warmed_up(runs):
    """runs/sm (--blr 0.05, batch 16, 8 steps): peak 0.05 * 16 / 256, round(0.8) = 1 warm-up
    step (a tenth of the run); the optimizer holds the lr that the log reports."""
    lrs = [train.lr_at(s, 100, 10, 1.0, 1e-6) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] < 1e-3  # cosine down
    model = sm.SemanticMIM(tiny())
    decay, no_decay = train.make_optimizer(model, 1e-3, 0.05).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert {"pos_embed", "proxy", "mask_token", "norm.weight", "head.bias"} <= {
        names[id(p)] for p in no_decay["params"]}
    assert all(names[id(p)].endswith("weight") and p.ndim == 2 for p in decay["params"])
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0
    log = train.read_log(runs / "sm" / "log.jsonl")
    assert [r["lr"] for r in log] == pytest.approx(
        [train.lr_at(s - 1, 8, 1, 0.05 * 16 / 256) for s in (2, 4, 6, 8)], rel=1e-12)
    groups = torch.load(runs / "sm" / "checkpoint.pt", weights_only=True)["optimizer"]
    assert [g["lr"] for g in groups["param_groups"]] == [log[-1]["lr"]] * 2

def test_clip_bounds_the_gradient_norm_and_independent_mask_reaches_the_masks_of_every_step(
        tmp_path, monkeypatch):
    """--clip c: AdamW steps on the gradient scaled to norm c where its norm is above c.
    --independent-mask: every step draws its [MASK] set apart; the checkpoint keeps it."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    norms, real, seen = [], sm.random_masking, []           # norms: at every optimizer step
    monkeypatch.setattr(sm, "random_masking", lambda *a: seen.append(a[-1]) or real(*a))
    hook = register_optimizer_step_pre_hook(lambda opt, *_: norms.append(float(torch.cat(
        [p.grad.flatten() for g in opt.param_groups for p in g["params"]]).norm())))
    try:
        for clip, stop in (("0", "2"), ("1e-3", "1")):      # 0: off; the same first step
            train.main(TINY_RUN + ["--clip", clip, "--stop-at", stop, "--independent-mask",
                                   "--out", str(tmp_path / clip)])
    finally:
        hook.remove()
    assert norms[0] > 1e-2 and norms[2] == pytest.approx(1e-3, rel=1e-4), norms
    saved = torch.load(tmp_path / "0" / "checkpoint.pt", weights_only=True)["config"]
    assert seen == [True] * 3 and saved["independent_mask"] is True

def test_the_defaults_are_the_authors_settings(ckpt):
    """train.py on a folder: their ViT-B/16, lr 1.6e-3 at batch 2048, AdamW betas (0.9, 0.999),
    wd 0.05, clip 0.02, cosine to 1e-6, crops of scale (0.5, 1), no autocast on a CPU; probe.py:
    AdamW lr 4e-3, wd 1e-4, batch 1024, 100 epochs; kNN k 20, T 0.07."""
    a, p = train.parse_args(["--data", "x"]), probe.build_parser().parse_args([ckpt])
    probe.load(p)                                   # None: the default of the probe (not --dense)
    assert sm.PRESETS[a.preset] == sm.Config(224, 16, 768, 12, 12, 4.0, 8, 0.8, "hog", False)
    assert (a.dataset, a.blr * 2048 / 256, a.weight_decay, a.clip, a.min_lr, a.min_crop) == (
        "imagefolder", pytest.approx(1.6e-3), 0.05, 0.02, 1e-6, 0.5)
    assert train.make_optimizer(sm.SemanticMIM(tiny()), 1, 0).defaults["betas"] == (0.9, 0.999)
    assert train.resolve_amp("auto", torch.device("cpu")) == "none"  # a GPU's: the cluster test
    assert (p.lr, p.weight_decay, p.probe_batch_size, p.epochs, p.k, p.temperature) == (
        4e-3, 1e-4, 1024, 100, 20, 0.07)

def test_batches_crop_and_flip_and_every_epoch_visits_every_image_once_in_a_new_order(monkeypatch):
    x = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    whole = torch.tensor([[1.0, 0.5, 0.5, 0.5, 0.9]] * 2)      # scale 1, ratio 1, centred, no flip
    torch.testing.assert_close(train.augment(x, 28, whole), x.float() / 255, atol=1e-5, rtol=0)
    flipped = torch.tensor([[1.0, 0.5, 0.5, 0.5, 0.1]] * 2)    # the same, flipped
    torch.testing.assert_close(train.augment(x, 28, flipped), x.flip(-1).float() / 255,
                               atol=1e-5, rtol=0)
    out = train.augment(x, 32, torch.rand(2, 5))
    assert out.shape == (2, 1, 32, 32) and 0 <= out.min() and out.max() <= 1
    assert train.to_model_input(x, 32, (0.5,) * 3, (0.25,) * 3).shape == (2, 3, 32, 32)
    # each epoch its own order, the same again (resume); from batch 3: that order from image 48
    monkeypatch.setattr(train, "batches", lambda images, keys, *a: [i for _, i in keys])
    args = train.parse_args(TINY_RUN)
    steps, epoch, _ = train.train_batches(args, train.build_config(args), 0, 1,
                                          torch.device("cpu"), torch.Generator())
    orders = [epoch(e, 0) for e in (0, 1, 2)]
    assert steps == 8 and all(sorted(o) == list(range(128)) for o in orders)
    assert len({tuple(o) for o in orders}) == 3 and epoch(1, 3) == orders[1][3 * 16:]

def test_offline_fashion_mnist_reads_idx_files_and_no_network_names_the_offline_choices(
        tmp_path, monkeypatch):
    raw = tmp_path / "FashionMNIST" / "raw"                # the documented offline route
    raw.mkdir(parents=True)
    for split, n in (("train", 6), ("t10k", 4)):
        imgs = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8)
        (raw / f"{split}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 2051, n, 28, 28) + imgs.numpy().tobytes())
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 2049, n) + bytes(range(n)))
    x, y, classes = train.load_split("fashion_mnist", str(tmp_path), "train", 32)
    assert x.shape == (6, 1, 28, 28) and x.dtype == torch.uint8 and y.tolist() == list(range(6))
    assert len(classes) == 10
    monkeypatch.setattr(train.torchvision.datasets, "CIFAR10",
                        mock.Mock(side_effect=urllib.error.URLError("no network")))
    with pytest.raises(SystemExit, match="offline choices: --dataset fashion_mnist"):
        train.load_split("cifar10", str(tmp_path), "train", 32)

def test_image_files_of_every_format_decode_to_the_rgb_pixels_pil_sees_with_or_without_decoders(
        tmp_path, monkeypatch):
    """torchvision.io: JPEG, PNG (16-bit scaled, where PIL clips), odd sizes; PIL: BMP, TIFF, and
    every format on a torchvision without decoders (0.29 deprecates them for TorchCodec)."""
    rgb = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    files = {"rgb.jpg": Image.fromarray(rgb), "gray.jpg": Image.fromarray(rgb[..., 0]),
             "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"), "rgb.tiff": Image.fromarray(rgb),
             "rgba.png": Image.fromarray(np.dstack([rgb, rgb[..., :1]])),
             "palette.png": Image.fromarray(rgb).convert("P"), "rgb.bmp": Image.fromarray(rgb)}
    for name, im in files.items():
        im.save(tmp_path / name)
        x = train.decode_image(str(tmp_path / name))
        with Image.open(tmp_path / name) as f:
            expect = torch.from_numpy(np.array(f.convert("RGB"))).permute(2, 0, 1)
        assert x.dtype == torch.uint8 and torch.equal(x, expect), name
    deep = rgb[..., 0].astype(np.uint16) * 256 + rgb[..., 1]    # 16-bit: both bytes differ
    Image.fromarray(deep).save(tmp_path / "deep.png")
    expect = {name: train.decode_image(str(tmp_path / name)) for name in [*files, "deep.png"]}
    assert torch.equal(expect["deep.png"], torch.from_numpy(rgb[..., 0]).expand(3, -1, -1))
    crop = train.folder_transform(32, True)(expect["rgb.jpg"])
    assert crop.shape == (3, 32, 32) and crop.dtype == torch.uint8
    monkeypatch.delattr(train.torchvision.io, "decode_image")
    for name in expect:
        assert torch.equal(train.decode_image(str(tmp_path / name)), expect[name]), name

def test_image_folder_augmentation_is_a_function_of_seed_epoch_and_index(tmp_path):
    write_image_folder(tmp_path, "train", 3, lambda c, i: (40 * c + i, 90, 200))
    Image.linear_gradient("L").convert("RGB").save(tmp_path / "train" / "class1" / "1.png")
    images, labels, classes = train.load_split("imagefolder", str(tmp_path), "train", 32,
                                               augment=True, seed=0)
    assert classes == ["class0", "class1"] and labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(images[(2, 4)][0], images[(2, 4)][0])  # any worker, any order, any time
    assert not torch.equal(images[(2, 4)][0], images[(3, 4)][0])  # another epoch, another crop
    keys = [(0, i) for i in range(6)]

    def every(n, **k):                                      # all 6 images, in batches of n
        return torch.cat(list(train.batches(images, keys, n, torch.device("cpu"), 32, (0,) * 3,
                                            (1,) * 3, **k)))
    assert every(6).shape == (6, 3, 32, 32) and torch.equal(every(6), every(2, workers=2))

def test_image_folder_training_cuts_workers_to_the_cpus_and_stops_at_an_unreadable_image(tmp_path):
    """--workers 64: a note, no PyTorch warning; a truncated file stops in one line, unused."""
    write_image_folder(tmp_path, "train", 8, lambda c, i: (40 * c + i, 90, 200))
    out, cpus = tmp_path / "run", len(os.sched_getaffinity(0))
    argv = ["train.py", "--data", tmp_path, *FOLDER_RUN, "--batch-size", "8", "--workers", "64",
            "--epochs", "2", "--log-every", "1", "--out", out]
    r = run(*argv, "--stop-at", "2")
    assert r.returncode == 0 and "worker" not in r.stderr, r.stderr
    assert f"note: --workers 64 is more than the {cpus} CPUs here: using {cpus}" in r.stdout
    assert weights_of(out / "checkpoint.pt")["pos_embed"].shape == (1, 72, 32)  # cifar: P = 8
    saved = {f: (out / f).read_bytes() for f in ("checkpoint.pt", "log.jsonl")}
    bad = tmp_path / "train" / "class1" / "3.png"
    good = bad.read_bytes()
    bad.write_bytes(good[:len(good) // 2])
    r = run(*argv, "--resume")                                 # one line: no traceback
    assert (r.returncode, r.stderr.strip()) == (1, f"error: cannot read image {bad} (OSError: "
                                                   f"image file is truncated): remove or replace "
                                                   f"that file, then run again")
    assert {f: (out / f).read_bytes() for f in saved} == saved
    bad.write_bytes(good)
    r = run(*argv, "--resume")
    assert r.returncode == 0 and "step 4/4" in r.stdout, r.stderr

def test_on_a_cluster_workers_share_the_node_lines_name_nodes_v100s_get_fp16_rank_0_downloads(
        monkeypatch, capsys):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")             # torchrun's processes on this node
    assert train.usable_workers(8) == 2 and capsys.readouterr().out == (
        "note: --workers 8 is more than the 16 CPUs here shared by 8 processes: using 2\n")
    assert train.launcher(32) == "torchrun --nnodes=4 --nproc_per_node=8"  # 4 nodes of 8
    assert train.launcher(8) == "torchrun --nproc_per_node=8"
    for native, amp in ((True, "bf16"), (False, "fp16")):  # an A100 or H100; a V100 or T4
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True: native or including_emulation)
        assert train.resolve_amp("auto", torch.device("cuda")) == amp
    # under torchrun rank 0 downloads the data set, then the others read it
    events, ds = [], mock.Mock(data=torch.zeros(2, 4, 4, 3), targets=[0, 1], classes=["a", "b"])
    monkeypatch.setattr(train.torchvision.datasets, "CIFAR10",  # downloads and reads, offline
                        lambda *a, **k: events.append("load") or ds)
    for rank, order in ((0, ["load", "barrier"]), (1, ["barrier", "load"])):
        monkeypatch.setattr(train, "dist", mock.Mock(get_rank=lambda: rank, get_world_size=lambda:
                            2, barrier=lambda: events.append("barrier")))  # and is_initialized
        events.clear(), train.load_split("cifar10", "data", "train", 32)
        assert events == order

def test_a_log_not_of_the_checkpoint_moves_aside_and_a_run_ends_naming_the_next_commands(
        tmp_path, capsys):
    """A log without checkpoint, or beside a checkpoint.pt replaced by another run's: set aside."""
    out, old = tmp_path / "my run", '{"step": 2, "loss": 9.0}\n{"step": 4, "loss": 9.0}\n' * 3
    out.mkdir()
    (out / "log.jsonl").write_text(old)
    for again in (False, True):                             # and when there is nothing to do
        train.main(TINY_RUN + ["--out", str(out)] + (["--resume"] if again else []))
        path = str(out / "checkpoint.pt")
        quoted = "'" + path + "'"                           # shell-quoted: the folder has a space
        lines, timm_file = capsys.readouterr().out.splitlines(), "'" + str(out / "timm.pth") + "'"
        assert lines[-5:] == [f"checkpoint: {path}", "next:", f"  python probe.py {quoted}",
                              f"  python visualize.py {quoted}", f"  python probe.py {quoted} "
                              f"--timm {timm_file}   # the encoder for timm, to fine-tune"]
        assert ("nothing to do" in lines[-6]) == again
        assert any("is the log of another run: moved it to" in s for s in lines) != again
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "log.None.jsonl", "log.jsonl", "run.lock"]
    assert (out / "log.None.jsonl").read_text() == old      # kept, as it was
    log = train.read_log(out / "log.jsonl")                 # a record per progress line
    assert [r["step"] for r in log] == [2, 4, 6, 8] and all(r["img_per_s"] > 0 for r in log)
    other = tmp_path / "other"
    train.main(TINY_RUN + ["--dim", "64", "--stop-at", "4", "--out", str(other)])
    shutil.copy(other / "checkpoint.pt", out / "checkpoint.pt")
    runs_of = lambda d: [(r["step"], r["run"]) for r in train.read_log(d / "log.jsonl")]
    second, aside = runs_of(other)[0][1], out / f"log.{log[0]['run']}.jsonl"
    train.main(["--resume", "--out", str(out)])
    assert f"moved it to {aside}; a new log starts" in capsys.readouterr().out
    assert runs_of(out) == [(6, second), (8, second)] and len(train.read_log(aside)) == 4

@pytest.mark.parametrize("amp,stop,saved", [("bf16", ["--stop-at", "5"], 5), ("none", [], 3)])
def test_a_stopped_run_resumes_bitwise_to_the_uninterrupted_run(amp, stop, saved, tmp_path,
                                                                monkeypatch, capsys):
    """--stop-at 5 saves at step 5; a SIGTERM in step 3 right after it, not at step 4's line. A
    log line cut short by a kill is dropped on reading; --resume logs each step once."""
    args, before = TINY_RUN + ["--epochs", "2", "--amp", amp], signal.getsignal(signal.SIGTERM)
    split, log = tmp_path / "split", tmp_path / "split" / "log.jsonl"
    train.main(args + ["--out", str(tmp_path / "full")])
    with monkeypatch.context() as m:
        if not stop:                                            # a pre-empted job
            patch_forward(m, lambda n, x: n == 3 and os.kill(os.getpid(), signal.SIGTERM) or x)
        train.main(args + ["--out", str(split)] + stop)
    assert torch.load(split / "checkpoint.pt", weights_only=True)["step"] == saved
    with open(log, "a") as f:
        f.write('{"step": 6, "epoch": 0, "lo')                # kill -9 while writing step 6
    capsys.readouterr()
    assert [r["step"] for r in train.read_log(log)] == [s for s in (2, 4) if s < saved] + [saved]
    assert "ends in a line cut short (a kill while writing): dropped it" in capsys.readouterr().out
    train.main(["--resume", "--out", str(split)])
    a, b = (weights_of(tmp_path / d / "checkpoint.pt") for d in ("full", "split"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in train.read_log(log)]
    assert steps == sorted(set(steps)) and steps[-1] == 16      # no duplicated log lines
    assert signal.getsignal(signal.SIGTERM) is before            # handlers are restored
    log.write_text('{"step": 2}\nnot json\n{"step": 4}\n')
    with pytest.raises(SystemExit, match="line 2 is not JSON: repair or remove that line"):
        train.read_log(log)

@pytest.mark.parametrize("minutes,saved", [(0, None), (1e-9, 4)])
def test_ckpt_minutes_saves_at_the_first_progress_line_once_due_a_second_signal_aborts(
        minutes, saved, tmp_path, monkeypatch):
    """Two SIGTERMs in step 6 (Ctrl-C twice): KeyboardInterrupt there, no save, no line of step 6
    (one would save). --ckpt-every far: --ckpt-minutes due at once saved at step 4; 0 never."""
    def twice(n, loss):
        for _ in range(2 if n == 6 else 0):
            os.kill(os.getpid(), signal.SIGTERM)
        return loss
    patch_forward(monkeypatch, twice)
    with pytest.raises(KeyboardInterrupt):
        train.main(TINY_RUN + ["--ckpt-every", "1000", "--ckpt-minutes", str(minutes),
                               "--out", str(tmp_path)])
    path = tmp_path / "checkpoint.pt"
    assert (torch.load(path, weights_only=True)["step"] if path.exists() else None) == saved
    assert set(os.listdir(tmp_path)) - {"checkpoint.pt"} == {"log.jsonl", "run.lock"}
    assert [r["step"] for r in train.read_log(tmp_path / "log.jsonl")] == [2, 4]  # 6 ended it

def test_non_finite_loss_stops_keeps_the_last_good_checkpoint_and_resume_cuts_the_log_back(
        tmp_path, monkeypatch):
    """NaN from step 7: checkpoint at 4, log to 6; --resume logs 5 and 6 anew, once, then 7, 8."""
    with monkeypatch.context() as m:
        patch_forward(m, lambda n, loss: loss * float("nan") if n > 6 else loss)
        with pytest.raises(SystemExit, match=r"loss is nan .*checkpoint .* \(step 4\) is intact"):
            train.main(TINY_RUN + ["--ckpt-every", "4", "--log-every", "1", "--out", str(tmp_path)])
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 4 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert [r["step"] for r in train.read_log(tmp_path / "log.jsonl")] == [1, 2, 3, 4, 5, 6]
    train.main(["--resume", "--out", str(tmp_path)])
    assert [r["step"] for r in train.read_log(tmp_path / "log.jsonl")] == list(range(1, 9))

def test_micro_batches_that_may_change_on_resume_and_two_gloo_processes_equal_the_full_batch(
        tmp_path):
    """The same global batch, clipped after accumulating: 1 process in micro-batches of 4 then
    8 (resumed), 2 processes in micro-batches of 4, give the weights of full batches."""
    args = TINY_RUN + ["--epochs", "2", "--blr", "0.05"]
    train.main(args + ["--out", str(tmp_path / "one")])
    train.main(args + ["--micro-batch", "4", "--stop-at", "5", "--out", str(tmp_path / "micro")])
    train.main(["--resume", "--micro-batch", "8", "--out", str(tmp_path / "micro")])
    r = torchrun("train.py", *args, "--micro-batch", "4", "--out", tmp_path / "two")
    assert r.returncode == 0, r.stderr
    a, *others = (weights_of(tmp_path / d / "checkpoint.pt") for d in ("one", "micro", "two"))
    torch.manual_seed(0)
    init = sm.SemanticMIM(sm.Config(**torch.load(tmp_path / "one" / "checkpoint.pt",
                                                 weights_only=True)["config"])).state_dict()
    moved = max((a[k] - init[k]).abs().max().item() for k in a)
    diffs = [max((a[k] - b[k]).abs().max().item() for k in a) for b in others]
    assert moved > 1e-2 and max(diffs) < 1e-5, (moved, diffs)

@pytest.mark.parametrize("baseline,plain", [(False, False), (True, False), (True, True)])
def test_analytic_flop_count_equals_torch_flop_counter(baseline, plain, monkeypatch):
    """bench's FLOPs per image = FlopCounterMode's in a step (SDPA as matmuls: CPU's is unseen)."""
    from torch.utils.flop_counter import FlopCounterMode
    monkeypatch.setattr(sm.F, "scaled_dot_product_attention", lambda q, k, v: (
        q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1) @ v)
    model, cfg, imgs, keep, mask = seeded(baseline=baseline)
    with FlopCounterMode(display=False) as counter:
        (bench.plain_vit_loss(model, imgs) if plain else model(imgs, keep, mask)).backward()
    counts = counter.get_flop_counts()["Global"]
    matmuls = sum(v for k, v in counts.items() if "convolution" not in str(k))  # not the HOG
    assert matmuls == 2 * bench.flops_per_image(cfg, plain)

def test_bench_reports_the_models_and_times_the_training_batches(tmp_path, monkeypatch, capsys):
    """3 models; the loader: the real (B, 3, S, S) batches train.py gets (folder, workers)."""
    results = bench.main(TINY_RUN + ["--batch-size", "8"])
    loader = results.pop("loader")                      # --dataset given: the loader is timed
    assert set(results) == {"SemanticMIM", "baseline", "plain ViT"} and loader["img_per_s"] > 0
    assert loader["times_step"] == pytest.approx(loader["img_per_s"]
                                                 / results["SemanticMIM"]["img_per_s"])
    for name, r in results.items():
        assert r["img_per_s"] > 0 and r["memory_gib"] > 0 and 0 < r["peak_fraction"]
        cfg = sm.Config(**{**TINY, "depth": 2, "baseline": name != "SemanticMIM"})
        assert r["gflop_per_img"] == pytest.approx(
            bench.flops_per_image(cfg, plain=name == "plain ViT") / 1e9)
    out = capsys.readouterr().out
    assert "matmul peak" in out and "% of peak" in out and "bookkeeping costs" in out
    assert "command: python experiments/bench.py --dataset synthetic" in out
    assert "loader (synthetic, in memory, augmented on cpu)" in out
    write_image_folder(tmp_path, "train", 12, lambda c, i: (40 * c + i, 90, 200),
                       size=lambda i: (50, 40), ext="jpg")
    args = train.parse_args(["--data", str(tmp_path), "--preset", "cifar", "--batch-size", "4",
                             "--workers", "2"])
    cfg, shapes, real = train.build_config(args), [], train.batches

    def counting(*a, **k):
        for x in real(*a, **k):
            shapes.append(tuple(x.shape))
            yield x
    monkeypatch.setattr(train, "batches", counting)
    clock = iter(range(100))                            # perf_counter: 1 s per call
    monkeypatch.setattr(bench.time, "perf_counter", lambda: float(next(clock)))
    assert bench.bench_loader(args, cfg, torch.device("cpu"), batches=3) == 3 * 4 / 1.0  # img/s
    assert shapes == [(4, 3, 32, 32)] * 4               # 1 warm-up + 3 timed batches

def test_a_failed_save_or_log_write_stops_in_one_line_and_keeps_the_last_good_checkpoint(
        tmp_path, monkeypatch, capsys):
    """A full disk at the 2nd save: one line (folder, cause, what next), no temp file, step 4;
    at the first log line: one line, no checkpoint."""
    real, out, full = torch.save, tmp_path / "run", OSError(errno.ENOSPC, "No space left on device")

    def full_disk(obj, path, *a, **k):
        if os.path.exists(out / "checkpoint.pt"):
            open(path, "wb").write(b"partial")
            raise full
        return real(obj, path, *a, **k)
    monkeypatch.setattr(torch, "save", full_disk)
    status, line = one_line(train.main, TINY_RUN + ["--ckpt-every", "4", "--out", str(out)], capsys)
    assert (status, line) == (1, f"error: could not write the checkpoint {out}/checkpoint.pt (No "
                                 f"space left on device); the checkpoint of step 4 is intact: free "
                                 f"space or fix the folder {out}, then run again with --resume")
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "log.jsonl", "run.lock"]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 4
    monkeypatch.setattr(train, "open", lambda path, mode="r", *a, **k: open(path, mode, *a, **k)
                        if mode != "a" else mock.Mock(side_effect=full)(), raising=False)  # log
    status, line = one_line(train.main, TINY_RUN + ["--out", str(tmp_path / "b")], capsys)
    assert status == 1 and line.startswith(f"error: could not write the log {tmp_path}/b/log.jsonl"
                                           f" (No space left on device); no checkpoint was written")

@pytest.mark.parametrize("launch", ["torchrun", "process group"])
def test_sigterm_with_image_folder_workers_saves_after_that_step_and_resumes(launch, tmp_path):
    """torchrun signals each rank's process group, a scheduler every process: the workers live
    on, the run saves after the step (no progress line due before the end), --resume goes on."""
    write_image_folder(tmp_path, "train", 32, lambda c, i: (100 * c + i, 90, 200))
    argv = ["train.py", "--data", tmp_path, *FOLDER_RUN, "--batch-size", "16", "--workers", "2",
            "--epochs", "100", "--log-every", "1000", "--out", tmp_path / "run"]
    p = start(argv, "training SemanticMIM", TORCHRUN if launch == "torchrun" else (sys.executable,))
    time.sleep(2)
    (os.kill if launch == "torchrun" else os.killpg)(p.pid, signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    step = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"]
    assert 0 < step < 400 and "exited unexpectedly" not in err, err
    r = run(*argv, "--resume", "--stop-at", step + 1)
    assert r.returncode == 0 and f"stopped at step {step + 1}" in r.stdout, r.stderr

def test_ctrl_c_on_a_pipe_whose_reader_died_still_saves_without_a_traceback(tmp_path):
    """`train.py | tee x`: Ctrl-C ends tee too, and a print to the broken pipe stops no save."""
    p = start(["train.py", *TINY_RUN, "--epochs", "400", "--log-every", "1", "--out", tmp_path],
              "step 1/")
    p.stdout.close()                                        # the reader is gone
    p.send_signal(signal.SIGINT)
    assert p.wait(timeout=60) == 0 and "Traceback" not in p.stderr.read()
    assert 0 < torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] < 3200

def test_resume_refuses_other_data_and_follows_the_same_images_to_another_path_bitwise(
        tmp_path, capsys):
    for name, ext in (("a", "png"), ("other", "bmp")):      # the same count and classes
        write_image_folder(tmp_path / name, "train", 8, lambda c, i: (40 * c + i, 9, 2), ext=ext)
    argv = ["--data", str(tmp_path / "a"), *FOLDER_RUN, "--batch-size", "8", "--workers", "0",
            "--epochs", "2", "--amp", "none"]
    out = tmp_path / "it's run"                             # the hint is shell-quoted
    train.main(argv + ["--out", str(tmp_path / "full")])
    train.main(argv + ["--out", str(out), "--stop-at", "2"])
    assert capsys.readouterr().out.splitlines()[-1] == (f"stopped at step 2; continue with "
                                                        f"--resume --out {shlex.quote(str(out))}")
    extra = tmp_path / "a" / "train" / "class0" / "x.png"
    shutil.copy(tmp_path / "a" / "train" / "class0" / "0.png", extra)  # an image added since
    for data, differ in (("a", "17 images (saved 16), other files"), ("other", "other files")):
        with pytest.raises(SystemExit, match=re.escape(f"trained on other data than --data holds "
                                                       f"now ({differ}): resume on the run's")):
            train.main(["--resume", "--out", str(out), "--data", str(tmp_path / data)])
    extra.unlink()
    os.rename(tmp_path / "a", tmp_path / "moved")           # the same images elsewhere
    train.main(["--resume", "--out", str(out), "--data", str(tmp_path / "moved")])
    a, b = (weights_of(d / "checkpoint.pt") for d in (tmp_path / "full", out))
    assert all(torch.equal(a[k], b[k]) for k in a)

def test_the_training_step_makes_no_device_tensor_from_python_values_and_reads_none_back(
        tmp_path, monkeypatch):
    """torch.tensor(..., device=), .item(), .tolist() wait for a GPU: 8 or 16 steps, as many."""
    calls, tensor, counts = [], torch.tensor, []
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: calls.append("device" in k) or tensor(
        *a, **k))
    for name in ("item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, lambda self, f=getattr(torch.Tensor, name): (
            calls.append(True), f(self))[1])
    for n in (128, 256):
        train.main(TINY_RUN + ["--synthetic-size", str(n), "--log-every", "100", "--out",
                               str(tmp_path / str(n))])
        counts.append(sum(calls) - sum(counts))
    assert counts[0] == counts[1] > 0, counts

def test_one_run_per_folder_while_its_run_lives_and_free_once_it_dies(tmp_path):
    """A live lock holder stops a run and a torchrun in one line naming its PID; killed -9: free."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, train; l = train."
                               "lock_folder(sys.argv[1], 0, 1, 'cpu'); print('held', flush=True); "
                               "time.sleep(120)", str(tmp_path)], cwd=HERE, env=ENV,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        line = (f"error: {tmp_path} is in use by another run (PID {holder.pid}): wait for it to "
                f"end or choose another --out")
        r = run("train.py", *TINY_RUN, "--out", tmp_path)
        assert (r.returncode, r.stderr, r.stdout) == (1, line + "\n", "")
        r = torchrun("train.py", *TINY_RUN, "--out", tmp_path)  # torchrun adds its own report
        assert r.returncode != 0 and line in r.stderr.splitlines()
        assert os.listdir(tmp_path) == ["run.lock"]
    finally:
        holder.kill()
        holder.wait()
    assert run("train.py", *TINY_RUN, "--out", tmp_path).returncode == 0

# ---- 3. bad input: one line each, exit status 1 (2 for a flag), nothing written -----------------
FLAG = "error: argument {}: {} is not allowed: it must be {} (see train.py --help)"
TRAIN_ERRORS = [([flag, v], FLAG.format(flag, v, rule)) for flag, v, rule in (
    ("--batch-size", "0", "an integer >= 1"), ("--blr", "nan", "a number > 0"),
    ("--workers", "-1", "an integer >= 0"), ("--epochs", "0", "an integer >= 1"),
    ("--mask-ratio", "1", "a number in (0, 1)"), ("--min-crop", "1.5", "a number in (0, 1]"),
    ("--clip", "inf", "a number >= 0"), ("--ckpt-minutes", "-5", "a number >= 0"))] + [
    # argv (after --out TMP/o; {run}: the ckpt fixture's folder), the line or its start
    (["--blr=-1e-3"], FLAG.format("--blr", "-1e-3", "a number > 0")),
    (["--dim", "x"], "error: argument --dim: 'x' is not an integer (see train.py --help)"),
    (["--data", "{tmp}/nowhere"], "error: no such folder {tmp}/nowhere: pass --data DIR"),
    (["--data", "{tmp}/empty"], "error: {tmp}/empty is not an image folder"),
    (["--dataset", "imagefolder"], "error: --dataset imagefolder needs --data DIR"),
    (TINY_RUN + ["--img-size", "30"], "error: image size 30 is not divisible by patch size 4"),
    (TINY_RUN + ["--img-size", "33", "--patch-size", "3"], "error: the HOG target uses 2x2 "
     "cells per patch, so the patch size must be even (got 3)"),
    (TINY_RUN + ["--num-proxies", "0"], "error: SemanticMIM needs at least one proxy"),
    (TINY_RUN + ["--batch-size", "512"], "error: 128 images give no full batch of 512: lower "
                                         "--batch-size"),
    (TINY_RUN + ["--resume"], "error: no checkpoint at {tmp}/o/checkpoint.pt"),
    (TINY_RUN + ["--out", "{run}"], "error: {run}/checkpoint.pt exists: pass --resume to continue "
                                    "that run, or choose another --out"),
    (["--resume", "--epochs", "3", "--out", "{run}"], "error: --resume continues the saved run, "
     "but these flags differ from it: --epochs 3 (saved 1); drop them or start a new --out"),
    (TINY_RUN + ["--stop-at", "9"], "error: --stop-at 9 is not between step 0 and the last "
                                    "step 8: pass a step in that range, or leave it out"),
    (["--resume", "--stop-at", "8", "--out", "{run}"], "error: --stop-at 8 is not between step 8 "
     "and the last step 8"),                                # the run is complete: it would not stop
    (["--resume", "--out", "{tmp}/weights"], "error: {tmp}/weights/checkpoint.pt is not a "
     "checkpoint written by train.py (no optimizer, scaler, rng, step, args)"),  # config, model
    (["--resume", "--out", "{tmp}/cuda"], "error: {tmp}/cuda/checkpoint.pt was trained on cuda, "
     "and its random stream of masks and crops continues only there: resume with --device cuda"),
    (TINY_RUN + ["--micro-batch", "5"], "error: --micro-batch 5 does not divide the 16 images of "
                                        "each process's batch: pass a divisor of 16"),
    (["--out", "{tmp}/weights/checkpoint.pt"], "error: {tmp}/weights/checkpoint.pt is not a "
                                               "folder: choose another path"),
    (["--out", "{tmp}/weights/checkpoint.pt/a"], "error: {tmp}/weights/checkpoint.pt/a cannot be "
     "written: {tmp}/weights/checkpoint.pt is a file: choose another path")]

@pytest.mark.parametrize("argv,message", TRAIN_ERRORS)
def test_every_bad_train_input_is_one_line_and_writes_nothing(argv, message, ckpt, tmp_path,
                                                              capsys):
    for folder in ("empty", "weights", "cuda"):
        (tmp_path / folder).mkdir()
    saved = torch.load(ckpt, weights_only=True)
    torch.save({k: v for k, v in saved.items() if k in ("config", "model")},
               tmp_path / "weights" / "checkpoint.pt")
    torch.save({**saved, "rng": {**saved["rng"], "batch": torch.zeros(16, dtype=torch.uint8)}},
               tmp_path / "cuda" / "checkpoint.pt")               # a CUDA generator's state
    fill = lambda s: s.replace("{tmp}", str(tmp_path)).replace("{run}", os.path.dirname(ckpt))
    status, line = one_line(train.main, ["--out", str(tmp_path / "o")] + [fill(a) for a in argv],
                            capsys)
    assert status == (2 if "argument" in message else 1) and "\n" not in line
    assert line.startswith(fill(message)), line
    assert sorted(os.listdir(tmp_path)) == ["cuda", "empty", "weights"]

def bad_checkpoints(good, root):
    """{kind: (path, the message's core)}: each unusable file as ROOT/KIND/checkpoint.pt."""
    ckpt, raw = torch.load(good, weights_only=True), open(good, "rb").read()
    incomplete = "is not a complete checkpoint: not the zip archive torch.save writes"
    cases = {"truncated": (raw[:len(raw) // 2], incomplete), "empty": (b"", incomplete),
             "random bytes": (os.urandom(4000), incomplete), "text": (b"text\n", incomplete),
             "pickled objects": ({**ckpt, "args": argparse.Namespace(**ckpt["args"])},
                                 "was not loaded: it holds objects other than tensors and plain "
                                 "values, and loading it could run code"),
             "not from train.py": ({"weights": ckpt["model"]},
                                   "is not a checkpoint written by train.py (no config, model"),
             "other version": ({**ckpt, "config": {**ckpt["config"], "new_setting": 1}},
                               "unknown settings ['new_setting']: it was written by another "
                               "version of semanticmim.py"),
             "NaN weights": ({**ckpt, "model": {**ckpt["model"], "blocks.1.attn.qkv.weight":
                                                torch.full((96, 32), float("nan"))}},
                             "holds non-finite weights (first: blocks.1.attn.qkv.weight): it "
                             "cannot be used; take an earlier checkpoint")}
    for kind, name, value in (("one NaN", "blocks.0.mlp.0.bias", math.nan),   # among finite
                              ("one infinity", "norm.weight", -math.inf)):
        t = ckpt["model"][name].clone()
        t[5] = value
        cases[kind] = ({**ckpt, "model": {**ckpt["model"], name: t}},
                       f"holds non-finite weights (first: {name})")
    for kind, (content, message) in cases.items():
        path = root / kind.replace(" ", "_") / "checkpoint.pt"
        path.parent.mkdir(parents=True)
        path.write_bytes(content) if isinstance(content, bytes) else torch.save(content, path)
        cases[kind] = (str(path), message)
    return cases

@pytest.mark.parametrize("script", ["train.py", "probe.py", "visualize.py"])
def test_every_bad_checkpoint_is_one_line_naming_the_file_and_left_untouched(script, ckpt,
                                                                             tmp_path, capsys):
    main = {"train.py": train.main, "probe.py": probe.main, "visualize.py": visualize.main}[script]
    for kind, (path, message) in bad_checkpoints(ckpt, tmp_path).items():
        before, folder = open(path, "rb").read(), os.path.dirname(path)
        argv = (["--resume", "--out", folder] if script == "train.py" else
                [path, "--out", os.path.join(folder, "x")])
        status, line = one_line(main, argv, capsys)
        assert status == 1 and "\n" not in line, (kind, line)
        assert line.startswith(f"error: {path}") and message in line, (kind, line)
        assert open(path, "rb").read() == before and os.listdir(folder) == ["checkpoint.pt"]
    if script != "train.py":
        missing = str(tmp_path / "none" / "checkpoint.pt")
        assert one_line(main, [missing], capsys) == (
            1, f"error: no checkpoint at {missing}: pass the checkpoint.pt that train.py wrote "
               f"in its --out folder")

def test_bad_inputs_end_in_one_line_without_a_traceback_in_real_processes(ckpt, tmp_path):
    bad = bad_checkpoints(ckpt, tmp_path)
    for argv, status, message in (
            (["train.py", *TINY_RUN, "--batch-size", "0"], 2, "--batch-size: 0 is not allowed"),
            (["experiments/bench.py", "--batch-size", "-4"], 2, "--batch-size: -4 is not allowed"),
            (["probe.py", bad["truncated"][0]], 1, "is not a complete checkpoint"),
            (["visualize.py", bad["pickled objects"][0]], 1, "loading it could run code")):
        r = run(*argv, cwd=tmp_path)
        assert r.returncode == status and r.stdout == "", (argv, r.stdout, r.stderr)
        assert r.stderr.count("\n") == 1 and message in r.stderr, r.stderr

# ---- 4. probe.py: the classifiers, the features, whole runs, processes, bad input ----------------
def test_linear_probe_learns_separable_features_not_random_labels_and_scores_the_test_split():
    """Quadrants of two random hyperplanes (a margin kept): linearly separable, not clustered.
    One-hot-like features: 100% on test features of the same law, 0% on test features moved one
    class on, chance when only the test labels are permuted (chance: 0.25)."""
    g = torch.Generator().manual_seed(0)

    def acc(x, y, n, test_f, test_y, epochs=100, batch=256):    # trained on the first n
        conf = probe.fit_head(lambda e: x[:n], lambda e: y[:n], test_f, test_y, 4, epochs, 4e-3,
                              1e-4, batch)
        return (conf.trace() / conf.sum()).item()
    x = torch.randn(4000, 16, generator=g)                  # (n, 16)
    f = x @ torch.nn.functional.normalize(torch.randn(16, 2, generator=g), dim=0)  # (n, 2)
    x, f = x[(f.abs() > 0.5).all(1)], f[(f.abs() > 0.5).all(1)]
    y, n = (f[:, 0] > 0).long() * 2 + (f[:, 1] > 0).long(), len(x) * 2 // 3  # 4 classes
    rand = y[torch.randperm(len(y), generator=g)]
    assert acc(x, y, n, x[n:], y[n:]) >= 0.98 and acc(x, rand, n, x[n:], rand[n:]) < 0.45
    y = torch.randint(4, (600,), generator=g)
    x = torch.nn.functional.one_hot(y, 4).float() + 0.1 * torch.randn(600, 4, generator=g)
    assert acc(x, y, 400, x[400:], y[400:], 20, 100) == 1
    assert acc(x, y, 400, x[400:].roll(1, 1), y[400:], 20, 100) == 0
    assert acc(x, y, 400, x[400:], y[400:][torch.randperm(200, generator=g)], 20, 100) < 0.45

def test_dense_scores_are_a_naive_per_class_loop_and_ignored_pixels_count_nowhere():
    g = torch.Generator().manual_seed(0)
    y, pred = torch.randint(4, (2, 3, 8, 8), generator=g)   # label maps, predictions (3, 8, 8)
    y[y == 3], y[:, 0] = 1, 255                             # class 3 never labelled; a row ignored
    row = probe.scores(probe.confusion(y, pred, 4), list("wxyz"), dense=True)
    keep, ious = y != 255, []
    for c in range(4):
        union = (((y == c) | (pred == c)) & keep).sum().item()
        ious.append(((y == c) & (pred == c) & keep).sum().item() / union if union else 0.0)
    assert row["class_iou"] == pytest.approx(dict(zip("wxyz", ious)))
    assert row["miou"] == pytest.approx(sum(ious[:3]) / 3)  # over the classes in the labels
    assert row["pixel_acc"] == pytest.approx(((y == pred) & keep).sum().item() / keep.sum().item())
    pred[:, 0] = (pred[:, 0] + 1) % 4                       # other guesses on ignored pixels
    assert probe.scores(probe.confusion(y, pred, 4), list("wxyz"), dense=True) == row

def test_dense_head_labels_each_patchs_pixels_from_that_patch_in_row_major_order():
    """Patch features one-hot in their class: every pixel well inside its patch is labelled
    right (the rest, where bilinear upsampling blends two patches, is IGNORE: left out)."""
    g = torch.Generator().manual_seed(0)
    cls = torch.randint(3, (300, 4, 4), generator=g)       # (n, h, w): a class per patch
    f = torch.nn.functional.one_hot(cls, 3).float().flatten(1)  # (n, h*w*3), row-major patches
    y = cls.repeat_interleave(4, 1).repeat_interleave(4, 2)  # (n, 16, 16): 4x4 pixels a patch
    ring = torch.ones(4, 4, dtype=torch.bool)
    ring[1:3, 1:3] = False
    y[:, ring.repeat(4, 4)] = 255
    conf = probe.fit_head(lambda e: f[:200], lambda e: y[:200], f[200:], y[200:], 3, 10, 0.5,
                          0.0, 20, dim=3)
    assert conf.sum() == 100 * 16 * 4 and probe.scores(conf, "abc", True)["miou"] == 1.0
    flipped = f[200:].view(100, 4, 4, 3).transpose(1, 2).flatten(1)  # column-major: wrong
    assert probe.scores(probe.fit_head(lambda e: f[:200], lambda e: y[:200], flipped, y[200:], 3,
                                       10, 0.5, 0.0, 20, dim=3), "abc", True)["miou"] < 0.6

def test_dense_crops_and_flips_image_and_label_map_alike(monkeypatch):
    g, x = torch.Generator().manual_seed(0), torch.zeros(64, 1, 32, 32, dtype=torch.uint8)
    for i, (r, c) in enumerate(torch.randint(0, 20, (64, 2), generator=g).tolist()):
        x[i, :, r:r + 12, c:c + 6] = 255                    # a bar off centre: flips show
    monkeypatch.setattr(probe, "dense_split", lambda *a: (x, (x[:, 0] > 0).byte() * 3, "wxyz"))
    args = probe.build_parser().parse_args(["c.pt", "--dense", "single", "--min-crop", "0.5"])
    args.dataset = "synthetic"
    labels, _, batches, maps = probe.load_split(args, "train", 32, 0, 1, torch.device("cpu"))
    fg = torch.cat(list(batches(1, True))).mean(1) * 0.25 + 0.5 > 0.5  # unnormalised: (n, S, S)
    agree = lambda m: ((m > 0) == fg).float().mean()      # noqa: E731
    assert agree(maps(1)) > 0.99 and agree(maps(2)) < 0.95 and agree(labels) < 0.95  # bars: 7%
    assert maps(1).unique().tolist() == [0, 3]              # nearest: no blended labels

def test_dense_probe_reads_frozen_patch_tokens_of_garments_with_background(ckpt, monkeypatch):
    """No gradient reaches the network; the rows are each block's patch tokens and the raw
    pixels of each patch, of single images at the model's size labelled class+1 on the
    foreground (for synthetic images, mean above 0.5), 0 elsewhere."""
    grads, features = [], sm.SemanticMIM.features
    monkeypatch.setattr(sm.SemanticMIM, "features", lambda self, *a, **k: grads.append(
        torch.is_grad_enabled()) or features(self, *a, **k))
    report, feats = probe.main([ckpt, "--dense", "single", "--layer", "all", "--epochs", "2",
                                "--rows", "checkpoint", "pixels"])
    assert grads and not any(grads)
    model, _ = train.load_model(ckpt)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), torch.load(
        ckpt)["model"].values()))
    assert [(r["row"], r["layer"], r["dims"]) for r in report["rows"]] == [
        ("checkpoint", 1, 32), ("checkpoint", 2, 32), ("raw pixels", None, 48)]
    assert report["num_classes"] == 11 and set(report["rows"][0]["class_iou"]) == {
        "background", *map(str, range(10))}
    x, labels, _ = train.load_split("synthetic", "data", "test", 32, 128)
    x = train.to_model_input(x, 32, *train.MEAN_STD["synthetic"])  # (n, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(feats["checkpoint", "map", 1][1], model.features(x, 1)[0][0][1]
                              .flatten(1), atol=1e-5)
    assert torch.allclose(feats["pixels", "pixels", None][1], sm.patchify(x, 4).flatten(1),
                          atol=1e-5)
    args = probe.build_parser().parse_args([ckpt, "--dense", "single"])
    probe.load(args)
    raw = train.to_model_input(train.load_split("synthetic", "data", "test", 32, 128)[0], 32,
                               (0,) * 3, (1,) * 3).mean(1)  # (n, S, S) in [0, 1]
    assert torch.equal(probe.dense_split(args, "test", 32)[1].long(),
                       (raw > 0.5) * (labels[:, None, None] + 1))
    args.dense = "mosaic"                                   # four classes, a garment a quarter
    quarters = probe.dense_split(args, "test", 32)[1].unfold(1, 16, 16).unfold(2, 16, 16)
    assert all(len(set(q.tolist())) == 4 for q in quarters.flatten(3).amax(3).flatten(1))

def test_dense_voc_reads_torchvisions_layout_and_refuses_a_label_outside_its_classes(ckpt,
                                                                                  tmp_path):
    """A VOC 2012 tree of 3 train and 2 val images as torchvision's VOCSegmentation reads it:
    palette masks, 255 on boundaries; images and masks squashed to the model's size."""
    def palette(m):                                         # a palette PNG, as VOC's masks
        im = Image.fromarray(m)
        im.putpalette(list(range(256)) * 3)
        return im
    base = tmp_path / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / d).mkdir(parents=True)
    for split, names in (("train", "abc"), ("val", "de")):
        (base / "ImageSets/Segmentation" / f"{split}.txt").write_text("\n".join(names))
        for i, name in enumerate(names):
            m = np.zeros((40, 50), np.uint8)
            m[10:30, 5 + 5 * i:30 + 5 * i], m[8:10] = 1 + 7 * i, 255  # a class, a boundary
            Image.fromarray(np.stack([m * 10] * 3, -1)).save(base / "JPEGImages" / f"{name}.jpg")
            palette(m).save(base / "SegmentationClass" / f"{name}.png")
    report, _ = probe.main([ckpt, "--dense", "voc", "--data", str(tmp_path), "--epochs", "2",
                            "--out", str(tmp_path / "voc.json")])
    assert (report["train_images"], report["test_images"], report["num_classes"]) == (3, 2, 21)
    assert list(report["rows"][0]["class_iou"])[:3] == ["background", "aeroplane", "bicycle"]
    args = probe.build_parser().parse_args([ckpt, "--dense", "voc", "--data", str(tmp_path)])
    probe.load(args)
    x, maps, _ = probe.dense_split(args, "test", 32)       # val: classes 1 and 8, 255 kept
    assert x.shape == (2, 3, 32, 32) and maps.unique().tolist() == [0, 1, 8, 255]
    m[0, 0] = 40                                            # not a VOC class
    palette(m).save(base / "SegmentationClass" / "e.png")
    with pytest.raises(SystemExit, match=r"error: .*e.png holds label 40, not one of VOC's 21 "):
        probe.dense_split(args, "test", 32)

def test_knn_is_dinos_weighted_vote_and_batched_equals_their_loop_per_image():
    def unit(*degrees):                                     # (n, 2), cos(angle) = similarity
        a = torch.tensor(degrees, dtype=torch.float64).deg2rad()
        return torch.stack([a.cos(), a.sin()], 1).float()
    test = unit(0)
    # one class-1 neighbour at similarity 0.9, two class-0 at 0.5, a far class 2: k = 3
    train_f, train_y = unit(25.84, 60, -60, 180), torch.tensor([1, 0, 0, 2])
    # weighting decides: e^(0.9/0.07) > 2 e^(0.5/0.07), though counting says class 0
    assert probe.knn_predict(train_f, train_y, test, 3, k=3).item() == 1
    # ... and the temperature: at T = 1, e^0.9 < 2 e^0.5
    assert probe.knn_predict(train_f, train_y, test, 3, k=3, temperature=1.0).item() == 0
    # the norm of the features does not matter (cosine similarity)
    assert probe.knn_predict(train_f * torch.tensor([[5.0], [0.1], [3.0], [1.0]]), train_y,
                             test * 7, 3, k=3).item() == 1
    # only the k nearest vote: class 1 at 0.9 vs four class-0 at 0.85 (e^(0.05/0.07) < 4)
    train_f, train_y = unit(25.84, 31.79, -31.79, 31.8, -31.8), torch.tensor([1, 0, 0, 0, 0])
    assert probe.knn_predict(train_f, train_y, test, 2, k=1).item() == 1
    assert probe.knn_predict(train_f, train_y, test, 2, k=5).item() == 0
    # k larger than the training set: all vote
    assert probe.knn_predict(train_f, train_y, test, 2, k=20).item() == 0
    g = torch.Generator().manual_seed(0)                    # batched: DINO's loop, per image
    train_f, test_f = torch.randn(300, 8, generator=g), torch.randn(70, 8, generator=g)
    train_y, expected = torch.randint(5, (300,), generator=g), []
    for q in torch.nn.functional.normalize(test_f, dim=1):  # DINO's one-hot formulation
        top, idx = (torch.nn.functional.normalize(train_f, dim=1) @ q).topk(20)
        one_hot = torch.nn.functional.one_hot(train_y[idx], 5).float()  # (k, C)
        expected.append((one_hot * (top / 0.07).exp()[:, None]).sum(0).argmax().item())
    for chunk in (1, 16, 256):
        assert probe.knn_predict(train_f, train_y, test_f, 5, chunk=chunk).tolist() == expected

def test_pooling_dims_and_layer_select_the_block():
    torch.manual_seed(0)
    model, x, ln = sm.SemanticMIM(tiny()).eval(), torch.randn(5, 3, 32, 32), probe.layer_norm
    with torch.no_grad():
        feats = probe.pool_features(model, x, [1, 2, 3], ["patch", "proxy", "both"])  # one pass
        for layer in (1, 2, 3):
            proxy, patch = model.features(x, layer)[0][-1]  # (B, P, D), (B, N, D) of that block
            want = {"patch": ln(patch.mean(1)), "proxy": ln(proxy.mean(1))}
            want["both"] = torch.cat([want["patch"], want["proxy"]], 1)
            for pool, w in want.items():
                assert feats[pool, layer].shape == (5, 64 if pool == "both" else 32)
                assert torch.allclose(feats[pool, layer], w, atol=1e-6)
    assert not torch.allclose(feats["patch", 3], feats["patch", 2], atol=1e-3)
    f = feats["patch", 3]                                   # parameter-free LayerNorm
    assert torch.allclose(f.mean(1), torch.zeros(5), atol=1e-5)
    assert torch.allclose(f.var(1, unbiased=False), torch.ones(5), atol=1e-2)

def test_probe_end_to_end_writes_the_table_and_is_deterministic(ckpt, capsys):
    out = os.path.join(os.path.dirname(ckpt), "a.json")
    args = [ckpt, "--pool", "both", "--layer", "1", "--epochs", "30", "--out", out]
    report, feats = probe.main(args)
    assert json.load(open(out)) == report
    assert re.search(r"\ncheckpoint both L1: linear \d+\.\d\d%  kNN \d+\.\d\d%  \(64 dims",
                     capsys.readouterr().out)
    assert [(r["row"], r["dims"]) for r in report["rows"]] == [
        ("checkpoint", 64), ("random weights", 64), ("raw pixels", 3 * 32 * 32)]
    assert report["command"] == "python probe.py " + " ".join(args)
    assert report["seed"] == 0 and report["wall_time_s"] > 0 and report["layer"] == 1
    assert (report["train_images"], report["test_images"], report["num_classes"]) == (128, 32, 10)
    assert min(report["rows"][2]["linear_top1"], report["rows"][2]["knn_top1"]) >= 0.95  # pixels
    # the rows are what they claim: the checkpoint's block-1 features of the data in order,
    # the same network at its initialisation (train.py's seed), the normalised pixels
    model, _ = train.load_model(ckpt)
    torch.manual_seed(0)
    nets = {"checkpoint": model, "random": sm.SemanticMIM(model.cfg).eval()}
    for i, split in enumerate(("train", "test")):
        x = train.load_split("synthetic", "data", split, 32, 128)[0]
        x = train.to_model_input(x, 32, *train.MEAN_STD["synthetic"])  # (n, 3, 32, 32)
        for name, net in nets.items():
            with torch.no_grad():
                want = probe.pool_features(net, x, [1], ["both"])["both", 1]
            assert torch.allclose(feats[name, "both", 1][i], want, atol=1e-5)
        assert torch.allclose(feats["pixels", "pixels", None][i], probe.layer_norm(x.flatten(1)),
                              atol=1e-5)
    assert not torch.allclose(feats["checkpoint", "both", 1][0], feats["random", "both", 1][0],
                              atol=1e-2)
    assert probe.main(args)[0]["rows"] == report["rows"]

def test_probe_progress_lines_every_ten_seconds_and_at_the_end(monkeypatch, capsys):
    clock = iter([0.0, 5.0, 11.0, 12.0, 30.0])               # a real run: the next test
    monkeypatch.setattr(probe.time, "time", lambda: next(clock))
    update = probe.progress("features", 100, "images")      # started at 0 s
    for done in (10, 40, 50, 100):        # 5 s: quiet; 11 s: a line; 12 s: quiet; 30 s: the end
        update(done)
    assert capsys.readouterr().out.splitlines() == [
        "features: 40/100 images 3.6 images/s eta 0.3 min",
        "features: 100/100 images 3.3 images/s eta 0.0 min"]

def test_probe_py_in_a_subprocess_reports_each_step_writes_json_and_stops_on_ctrl_c_in_one_line(
        ckpt, tmp_path):
    r = run("probe.py", ckpt, "--epochs", "10")
    assert r.returncode == 0, r.stderr
    for line in ("checkpoint patch L2: linear", "wrote " + os.path.dirname(ckpt),
                 "checkpoint features, train: 128/128 images",
                 "raw pixels features, train: 128/128 images", "checkpoint features, test: 32/32 "
                 "images", "linear probe, checkpoint patch L2: 10/10 epochs", "linear probe, raw "
                 "pixels: 10/10 epochs"):        # each extraction and classifier reports its end
        assert line in r.stdout
    report = json.load(open(os.path.join(os.path.dirname(ckpt), "probe_patch_L2.json")))
    assert [row["dims"] for row in report["rows"]] == [32, 32, 3072]
    assert all(0 <= r["linear_top1"] <= 1 and 0 <= r["knn_top1"] <= 1 for r in report["rows"])
    p = start(["probe.py", ckpt, "--epochs", "100000", "--out", tmp_path / "r"], "train: 128/")
    p.send_signal(signal.SIGINT)
    assert p.communicate(timeout=60)[1] == "stopped by Ctrl-C\n" and p.returncode == 1
    assert os.listdir(tmp_path) == []

@pytest.mark.parametrize("head", [["--pool", "proxy"], ["--dense", "mosaic"]])
def test_two_gloo_processes_give_the_features_and_accuracies_of_one(head, ckpt, tmp_path):
    """Shards gathered in order, augmentation per image: 2 processes equal 1, --augmented too."""
    args = [ckpt, "--augmented", "--epochs", "3", "--batch-size", "24", *head]
    one, feats_one = probe.main(args + ["--out", str(tmp_path / "one.json")])
    script = tmp_path / "run_probe.py"                      # each rank saves its features
    script.write_text(f"import os, sys, torch\nsys.path.insert(0, {HERE!r})\nimport probe\n"
                      f"report, feats = probe.main(sys.argv[1:])\ntorch.save(feats, "
                      f"{str(tmp_path)!r} + '/f' + os.environ['RANK'] + '.pt')\n")
    r = torchrun(script, *args, "--out", tmp_path / "two.json")  # a hang fails, not waits
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.load(open(tmp_path / "two.json"))
    assert two["processes"] == 2 and two["command"].startswith("torchrun --nproc_per_node=2")
    assert two["rows"] == one["rows"]
    feats_two, shard = (torch.load(tmp_path / f"f{r}.pt") for r in (0, 1))
    assert {len(tr) for tr, _ in shard.values()} == {64}    # gathered to rank 0 alone
    for name, (tr, te) in feats_one.items():
        assert torch.allclose(tr, feats_two[name][0], atol=1e-5)
        assert torch.allclose(te, feats_two[name][1], atol=1e-5)

def test_augmented_probe_trains_each_epoch_on_new_crops_and_the_raw_pixel_row_has_a_memory_cap(
        ckpt, tmp_path, monkeypatch, capsys):
    """--augmented: epoch e's own crops, the same on every call, not e+1's nor the plain images'."""
    seen = []
    monkeypatch.setattr(probe, "fit_head", lambda features_of_epoch, *a, **k: seen.extend(
        features_of_epoch(e) for e in (0, 1, 0)) or torch.eye(10, dtype=torch.long))
    _, feats = probe.main([ckpt, "--augmented", "--rows", "pixels", "--epochs", "2", "--out",
                           str(tmp_path / "p.json")])
    assert torch.equal(seen[0], seen[2]) and not torch.allclose(seen[0], seen[1], atol=0.1)
    assert not torch.allclose(seen[0], feats["pixels", "pixels", None][0], atol=0.1)
    monkeypatch.setattr(probe, "PIXELS_GIB", 1e-3)          # 160 images x 3072 x 4 B: 1.8e-3
    report, _ = probe.main([ckpt, "--epochs", "1", "--out", str(tmp_path / "p.json")])
    assert [r["row"] for r in report["rows"]] == ["checkpoint", "random weights"]  # left out
    assert "note: no raw-pixel row: it would hold 0.00183 GiB on one" in capsys.readouterr().out
    status, line = one_line(probe.main, [ckpt, "--rows", "pixels"], capsys)  # or refused
    assert status == 1 and line.startswith("error: --rows pixels would hold 0.00183 GiB of raw")

def test_image_folder_probe_reads_train_and_val_and_cuts_more_workers_than_cpus_with_a_note(
        ckpt, tmp_path, monkeypatch, capsys):
    for split, n in (("train", 6), ("val", 3)):
        write_image_folder(tmp_path, split, n, lambda c, i: (200 * c + i, 90, 40))
    report, _ = probe.main([ckpt, "--dataset", "imagefolder", "--data", str(tmp_path), "--workers",
                            "0", "--epochs", "5", "--augmented", "--probe-batch-size", "4"])
    assert (report["train_images"], report["test_images"], report["num_classes"]) == (12, 6, 2)
    assert report["rows"][2]["linear_top1"] == 1.0 and report["rows"][2]["knn_top1"] == 1.0
    name = "probe_patch_L2_imagefolder_aug.json"              # default name: data set differs
    assert os.path.isfile(os.path.join(os.path.dirname(ckpt), name))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)  # one CPU
    with warnings.catch_warnings():
        warnings.filterwarnings("error", ".*worker processes")  # DataLoader's, were 3 started
        probe.main([ckpt, "--dataset", "imagefolder", "--data", str(tmp_path), "--workers", "3",
                    "--rows", "pixels", "--epochs", "1", "--out", str(tmp_path / "p.json")])
    assert "note: --workers 3 is more than the 1 CPUs here: using 1" in capsys.readouterr().out

@pytest.mark.parametrize("which", ["sm", "base", "random P 1", "random P 0"])
def test_timm_export_loads_strictly_and_timm_computes_our_features_block_by_block(
        which, runs, tmp_path, capsys):
    """probe.py --timm: timm's VisionTransformer loads the file strictly (no head); the line and
    the train.py command it prints build a model with a new head whose features, pooled feature
    and every block's patch outputs equal ours (trained SemanticMIM, baseline; random weights)."""
    import timm
    path = runs / which / "checkpoint.pt"
    if which.startswith("random"):                          # random weights, other shapes
        torch.manual_seed(0)
        cfg = tiny(num_proxies=int(which[-1]), baseline=which.endswith("0"), patch_size=8)
        path = tmp_path / "checkpoint.pt"
        torch.save(dict(config=asdict(cfg), model=sm.SemanticMIM(cfg).state_dict(),
                        args={"dataset": "cifar10"}), path)
    (ours, _), file = train.load_model(str(path)), tmp_path / "timm.pth"
    probe.main([str(path), "--timm", str(file)])
    headless = timm.models.VisionTransformer(**probe.timm_kwargs(ours.cfg), num_classes=0)
    headless.load_state_dict(torch.load(file, weights_only=True), strict=True)
    lines, x = capsys.readouterr().out.splitlines(), torch.randn(3, 3, 32, 32)
    line = next(s for s in lines if "timm.create_model" in s)
    command = next(s for s in lines if s.startswith("  torchrun --nproc_per_node=8 train.py"))
    p = argparse.ArgumentParser(allow_abbrev=False)  # as timm's train.py parses these flags
    for flag, kind in (("--model", str), ("--pretrained-path", str), ("--gp", str),
                       ("--num-classes", int), ("--drop-path", float)):
        p.add_argument(flag, type=kind)
    p.add_argument("--pretrained", action="store_true")
    p.add_argument("--model-kwargs", nargs="*", default={}, action=timm.utils.ParseKwargs)
    a = p.parse_known_args(shlex.split(command)[3:])[0]     # after torchrun ... train.py
    train_py = timm.create_model(  # its call (v1.0.28: lines 512-535, main: 543-565; no wheel)
        a.model, pretrained=a.pretrained, in_chans=3, num_classes=a.num_classes, drop_rate=0.0,
        drop_path_rate=a.drop_path, drop_block_rate=None, global_pool=a.gp, bn_momentum=None,
        bn_eps=None, scriptable=False, checkpoint_path="", pretrained_cfg_overlay=dict(
            file=a.pretrained_path, num_classes=-1), **a.model_kwargs)
    for model in (eval(line.split("model = ")[1], {"timm": timm}), train_py):
        assert model.eval().head.weight.shape == (10, ours.cfg.dim)  # a new head, 10 classes
        with torch.no_grad():
            outs, _ = ours.features(x)
            f = model.forward_features(x)                   # (B, P+N, D)
            blocks = model.forward_intermediates(x, intermediates_only=True, output_fmt="NLC")
            close = dict(atol=1e-6, rtol=0)
            torch.testing.assert_close(f, torch.cat(outs[-1], 1), **close)
            torch.testing.assert_close(model.forward_head(f, pre_logits=True),
                                       probe.layer_norm(outs[-1][1].mean(1)), **close)
            for mine, theirs in zip(outs, blocks, strict=True):
                torch.testing.assert_close(theirs, mine[1], **close)


def test_the_authors_randaugment_runs_every_op_at_its_top_magnitude_on_the_installed_pillow():
    """The command's --aa (and finetune.py's) reaches timm's magnitude cap 10, where
    PosterizeIncreasing keeps 0 bits: Pillow 13 raises there (a fine-tune stopped in its first
    epoch); under requirements.txt's pillow<13 it gives black."""
    from timm.data.auto_augment import rand_augment_transform
    aa = probe.AUTHORS_RECIPE[probe.AUTHORS_RECIPE.index("--aa") + 1]
    image = Image.fromarray(np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3))
    for op in rand_augment_transform(aa, {}).ops:
        op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0  # the cap every op can reach
        out = np.asarray(op(image))                             # every op runs
        assert op.name != "PosterizeIncreasing" or out.max() == 0

ARG = "error: argument {}: {} (see probe.py --help)"
PROBE_ERRORS = [  # argv with {ckpt}, {tmp}, {noproxy} filled in; the one line or its start
    (["{ckpt}", "--layer", "3"], "error: --layer 3 does not exist: this checkpoint has main "
                                 "blocks 1..2"),
    (["{ckpt}", "--layer", "0"], "error: --layer 0 does not exist"),
    (["{ckpt}", "--layer", "x"], ARG.format("--layer", "'x' is neither a block number nor 'all'")),
    (["{ckpt}", "--epochs", "0"], ARG.format("--epochs", "0 is not allowed: it must be an "
                                             "integer >= 1")),
    (["{ckpt}", "--min-crop", "1.5"], ARG.format("--min-crop", "1.5 is not allowed: it must "
                                                 "be a number in (0, 1]")),
    (["{ckpt}", "--augmented", "--pool", "patch", "proxy"], "error: --augmented recomputes the "
     "features every epoch: give one --pool and one --layer"),
    (["{noproxy}", "--pool", "proxy"], "error: --pool proxy needs proxies, but this checkpoint "
                                       "has none (num_proxies 0): use --pool patch"),
    (["{ckpt}", "--dataset", "imagefolder"], "error: --dataset imagefolder needs --data DIR"),
    (["{ckpt}", "--dataset", "imagefolder", "--data", "{tmp}/no"], "error: no such folder "
                                                                    "{tmp}/no"),
    (["{ckpt}", "--dataset", "imagefolder", "--data", "{tmp}"], "error: the probe needs a "
     "held-out split: {tmp}/train and {tmp}/val"),
    (["{ckpt}", "--dataset", "imagefolder", "--data", "{tmp}/mixed"], "error: {tmp}/mixed/val "
     "has other classes than {tmp}/mixed/train (only in train: class1; only in val: class2): "
     "give both the same class folders"),  # labels are folder ranks: other folders mislabel
    (["{ckpt}", "--dense", "voc", "--data", "{tmp}"], "error: no folder {tmp}/VOCdevkit/VOC2012/"
     "SegmentationClass: pass --data ROOT holding VOC 2012 as torchvision's VOCSegmentation"),
    (["{ckpt}", "--dense", "single", "--pool", "proxy"], "error: --dense probes the map of patch "
     "tokens: leave out --pool"),
    (["{ckpt}", "--dense", "mosaic", "--dataset", "cifar10"], "error: --dense mosaic labels "
     "garments on a black background, not cifar10 images"),
    *[(["{ckpt}", flag, path], "error: " + why) for flag in ("--out", "--timm") for path, why in (
        ("{ckpt}", "{ckpt} is the checkpoint being read (it would be replaced): choose another"),
        ("{tmp}/no/f", "{tmp}/no/f cannot be written: {tmp}/no does not exist: choose another"),
        ("{tmp}/noproxy.pt/r", "{tmp}/noproxy.pt/r cannot be written: {tmp}/noproxy.pt is a file"),
        ("{tmp}/train", "{tmp}/train is a folder: choose another path"))]]

@pytest.mark.parametrize("argv,message", PROBE_ERRORS)
def test_every_bad_probe_input_is_one_line(argv, message, ckpt, tmp_path, capsys):
    (tmp_path / "train" / "a").mkdir(parents=True)         # an image folder without val/
    for split in ("train", "val"):
        write_image_folder(tmp_path / "mixed", split, 2, lambda c, i: (200 * c, 90, 40))
    os.rename(tmp_path / "mixed" / "val" / "class1", tmp_path / "mixed" / "val" / "class2")
    cfg = tiny(depth=1, num_proxies=0, baseline=True)
    torch.save({"config": asdict(cfg), "model": sm.SemanticMIM(cfg).state_dict(),
                "args": {"dataset": "synthetic"}}, tmp_path / "noproxy.pt")
    fill = lambda s: s.replace("{tmp}", str(tmp_path)).replace("{ckpt}", ckpt).replace(
        "{noproxy}", str(tmp_path / "noproxy.pt"))
    status, line = one_line(probe.main, [fill(a) for a in argv], capsys)
    assert status == (2 if "argument" in message else 1) and "\n" not in line
    assert line.startswith(fill(message)), line

# ---- 5. visualize.py: figures, images, bad input, maps and statistics on hand-made attention -----
def assert_pngs(folder, names):
    """Each a PNG that PIL decodes, > 400 colours (empty titled axes: 256; our figures: 700+)."""
    for name in names:
        with open(os.path.join(folder, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", f"{name} is not a PNG"
        with Image.open(os.path.join(folder, name)) as im:
            colours = im.convert("RGB").getcolors(maxcolors=1 << 24)
            assert min(im.size) >= 150 and len(colours) > 400, (name, im.size, len(colours))

def test_every_figure_and_the_compare_figure_are_drawn_in_process(runs, tmp_path):
    written = visualize.main([str(runs / "sm" / "checkpoint.pt"), "--compare",
                              str(runs / "base" / "checkpoint.pt"), "--out", str(tmp_path),
                              "--queries", "3,4", "0", "--indices", "0", "5"])
    names = ["attn_query_r3c4_layer2.png", "attn_query_r0c0_layer2.png",
             "attn_reduce_mean_layer2.png", "proxy_maps_layer2.png", "mask_to_proxy_layer2.png",
             "recon.png", "curve.png", "compare_attn_layer2.png"]
    assert written == [str(tmp_path / n) for n in names]
    assert sorted(os.listdir(tmp_path)) == sorted(names)
    assert_pngs(tmp_path, names)

def test_a_subprocess_with_the_defaults_draws_the_baseline_into_its_checkpoint_folder(runs):
    """Defaults: <checkpoint folder>/figures, centre and corner queries; no mask stream: a note."""
    r = run("visualize.py", runs / "base" / "checkpoint.pt", "--layers", "1", "-1", "--what",
            "query", "recon", "mask_proxy")
    assert r.returncode == 0 and "note: the baseline has no mask stream" in r.stdout, r.stderr
    names = [f"attn_query_{q}_layer{la}.png" for la in (1, 2) for q in ("r4c4", "r0c0")]
    assert sorted(os.listdir(runs / "base" / "figures")) == sorted(names + ["recon.png"])
    assert all(n in r.stdout for n in names)
    assert_pngs(runs / "base" / "figures", names + ["recon.png"])

def test_image_files_and_a_folders_val_split_are_resized_centre_cropped_and_class_checked(
        ckpt, tmp_path):
    """--images FILES, or the DIR/val images of a checkpoint trained on --data DIR, as input."""
    files = [str(tmp_path / f"img{i}.png") for i in range(2)]
    for i, size in enumerate([(50, 40), (20, 20)]):
        Image.new("RGB", size, (30 + 100 * i, 120, 200)).save(files[i])
    n, batches = visualize.load_images(None, 32, files=files)
    raw = next(batches)
    assert n == 2 and raw.shape == (2, 3, 32, 32) and raw.min() >= 0 and raw.max() <= 1
    assert torch.allclose(raw[1, :, 5, 5], torch.tensor([130, 120, 200]) / 255, atol=1e-2)
    written = visualize.main([ckpt, "--images", *files, "--what", "proxy", "--out", str(tmp_path)])
    assert written == [str(tmp_path / "proxy_maps_layer2.png")]
    assert_pngs(tmp_path, ["proxy_maps_layer2.png"])
    for split, blue in (("train", 200), ("val", 100)):
        write_image_folder(tmp_path / "data", split, 4, lambda c, i: (40 * c + i, 90, blue))
    out = tmp_path / "run"
    train.main(["--data", str(tmp_path / "data"), *FOLDER_RUN, "--batch-size", "8", "--workers",
                "0", "--amp", "none", "--out", str(out)])
    args = torch.load(out / "checkpoint.pt", weights_only=True)["args"]
    raw = next(visualize.load_images(args, 32, indices=[0, 7])[1])     # 7: image 3 of class 1
    assert raw.shape == (2, 3, 32, 32)
    assert torch.allclose(raw[1, :, 16, 16], torch.tensor([43, 90, 100]) / 255, atol=1e-2)
    visualize.main([str(out / "checkpoint.pt"), "--indices", "7", "--what", "recon"])
    assert_pngs(out / "figures", ["recon.png"])
    os.rename(tmp_path / "data" / "val" / "class1", tmp_path / "data" / "val" / "class2")
    with pytest.raises(SystemExit, match="val has other classes than .*only in val: class2"):
        visualize.main([str(out / "checkpoint.pt"), "--what", "recon"])   # labels would lie

VIS_ERRORS = [  # argv ({sm}, {tmp} filled in; --out TMP/fig added), a regex of the one line
    (["{tmp}/none.pt"], "no checkpoint at .*none.pt: pass the checkpoint.pt"),
    (["{sm}", "--images", "{tmp}/none.png"], "cannot read image .*none.png \\(FileNotFound"),
    (["{sm}", "--images", "{tmp}/bad.png"], "cannot read image .*bad.png .*: pass existing JPEG"),
    (["{sm}", "--queries", "8,0"], "query 8,0 is out of range: the patch grid is 8x8 \\(rows"),
    (["{sm}", "--queries", "64"], "query 64 is out of range: .* indices 0..63"),
    (["{sm}", "--queries", "1,2,3"], "query '1,2,3' is neither 'row,col' nor a patch index \\("),
    (["{sm}", "--queries", "a,b"], "query 'a,b' is neither .*write e.g. 3,4"),
    (["{sm}", "--layers", "3"], "layer 3 does not exist: the checkpoint has 2 blocks \\(choose"),
    (["{sm}", "--layers", "-3"], "layer -3 does not exist: .*or -1 for the last"),
    (["{sm}", "--indices", "999"], "index 999 is out of range: .* 32 images \\(choose 0..31\\)"),
    (["{sm}", "--indices", "-1"], "argument --indices: -1 is not allowed"),
    (["{sm}", "--what", "compare"], "--what compare needs --compare OTHER_CHECKPOINT"),
    (["{sm}", "--log", "{tmp}/none.jsonl"], "no training log at .*none.jsonl: pass the run's"),
    (["{sm}", "--compare", "{tmp}/o"], "compare .* 32 px images in 4 px patches and 24 px"),
    (["{sm}", "--stats-images", "5"], "--stats-images needs --stats$"),
    (["{sm}", "--stats", "--compare", *["{sm}"] * 3], "--compare takes one or two .*, got 3$"),
    (["{sm}", "--out", "{tmp}/bad.png"], "bad.png is not a folder: choose another path$"),
    (["{sm}", "--out", "{tmp}/bad.png/f"], "/f cannot be written: .*bad.png is a file: choose")]

@pytest.mark.parametrize("argv,message", VIS_ERRORS)
def test_every_bad_visualize_input_is_one_line_naming_the_fix_and_writes_nothing(
        argv, message, runs, tmp_path, capsys):
    cfg = tiny(img_size=24)                                            # 24 px in 4 px patches
    torch.save({"config": asdict(cfg), "model": sm.SemanticMIM(cfg).state_dict()}, tmp_path / "o")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    _, line = one_line(visualize.main, ["--out", str(tmp_path / "fig")] + [
        a.format(sm=runs / "sm" / "checkpoint.pt", tmp=tmp_path) for a in argv], capsys)
    assert line.startswith("error: ") and "\n" not in line and re.search(message, line), line
    assert not (tmp_path / "fig").exists() and not (runs / "sm" / "figures").exists()

# ---- attention maps, on hand-made attention (B, H, P+N, P+N): rows queries, proxies first
def test_attention_maps_index_the_right_rows_upsample_puts_values_on_pixels_hog_glyphs_edges():
    P, H, N, queries = 3, 2, 16, [5, 0, 15]
    attn = torch.rand(2, H, P + N, P + N).softmax(-1)
    maps = visualize.patch_query_maps(attn, queries, P)
    assert maps.shape == (2, 3, N) and all(torch.allclose(maps[:, j], attn.mean(1)[:, P + q, P:])
                                           for j, q in enumerate(queries))
    prox = visualize.proxy_maps(attn, P)
    assert torch.allclose(prox[:, 1], (attn[:, 0, 1, P:] + attn[:, 1, 1, P:]) / 2)
    proxies_mean = attn[:, :, :P, P:].mean((1, 2))                     # over heads and proxies
    assert torch.allclose(visualize.reduce_mean_maps(maps, prox), maps - proxies_mean[:, None])
    mask_attn = torch.rand(2, H, 7, P + 7).softmax(-1)                 # [MASK]: proxies first
    w = visualize.mask_to_proxy_weights(mask_attn, P)
    assert w.shape == (2, 7, P) and torch.allclose(w[1, 4, 2], mask_attn[1, :, 4, 2].mean())
    maps = torch.arange(2 * 16, dtype=torch.float).reshape(2, 16)      # a 4x4 grid, upsampled
    img = visualize.upsample(maps, 4, 3)
    assert img.shape == (2, 12, 12) and img[1, 3:6, 6:9].eq(maps[1, 1 * 4 + 2]).all()
    img, dirs = torch.zeros(1, 3, 32, 32), visualize.edge_directions()  # glyphs: edges
    img[..., 16:] = 1.0                                                # vertical edge at x = 16
    for x, (i, j), along in ((img, (5, 7), 1), (img.transpose(-1, -2), (7, 5), 0)):
        d = dirs[visualize.hog_cells(sm.hog_target(x, 4), 8)[0, i, j].argmax()].abs()  # (dx, dy)
        assert d[along] > 0.9 and d[1 - along] < 0.2                   # a cell beside the edge
    t = torch.zeros(1, 64, 108)                # patch (r, c) cell (i, j) is image cell (2r+i, 2c+j)
    t[0, 9, 1 * 36 + 4 * 4 + 1 * 2 + 0] = 3.0  # patch (1, 1): channel 1, bin 4, cell (1, 0)
    assert visualize.hog_cells(t, 8)[0, 3, 2, 4] == 1.0                # the channel mean

def test_mask_to_proxy_comes_from_the_seeded_mask_stream_and_unnormalised_pixels_recover_it():
    """A pixel prediction unnormalised with the target's statistics recovers the image."""
    model, _, imgs, _, _ = seeded(target="pixel")
    ids_keep, ids_mask, pred, attn = visualize.masked_prediction(model, imgs, seed=3)
    assert torch.equal(visualize.masked_prediction(model, imgs, seed=3)[1], ids_mask)
    assert pred.shape == (2, 52, 48) and attn["mask"][0].shape == (2, 2, 52, 4 + 52)  # P = 4
    imgs = imgs * 2 + 1
    pred = sm.gather_tokens(model.target(imgs), ids_mask)              # a perfect prediction
    patches = visualize.unnormalise_pixel_prediction(pred, imgs, ids_mask, 4)
    masked = visualize.masked_input(imgs, ids_keep, 4, fill=0.0)
    assert masked.eq(0).sum() == 2 * 52 * 48                           # the masked patches blank
    assert torch.allclose(visualize.paste_patches(masked, patches, ids_mask, 4), imgs, atol=1e-5)

# ---- --stats: Figure 1 of the paper as numbers, on hand-made attention with known answers
def stats_of(attn, P, grid, fg=None):
    """The statistics of one attention tensor (B, H, P+N, P+N), as --stats reports them."""
    dist = visualize.grid_distances(grid)
    return visualize.pooled_means([visualize.layer_stats(attn, P, dist, fg)])

def test_stats_of_uniform_attention_are_the_uniform_reference_proxy_share_before_renormalising():
    P, grid, N = 3, 4, 16
    attn, fg = torch.full((2, 2, P + N, P + N), 1 / (P + N)), torch.zeros(2, N, dtype=torch.bool)
    fg[0, :5], fg[1, 3:14] = True, True
    got = stats_of(attn, P, grid, fg)
    by_hand = sum(math.dist(divmod(a, grid), divmod(b, grid))
                  for a in range(N) for b in range(N)) / N ** 2   # mean distance, self included
    assert got == pytest.approx({"distance": by_hand, "proxy_share": P / (P + N), "query_js": 0,
                                 "proxy_js": 0, "fg_consistency": 1, "bg_consistency": 1}, abs=1e-6)
    assert visualize.uniform_reference(P, grid) == pytest.approx(got, abs=1e-6)
    P, grid, N = 2, 2, 4                       # the proxies' share: before renormalising
    attn = torch.zeros(1, 2, P + N, P + N)
    attn[0, :, :, 0] = 1                                           # both heads on proxy 0
    assert visualize.proxy_share(attn, P).eq(1).all()
    attn[0, 1] = 0
    attn[0, 1, :, P + 3] = 1                                       # head 1 on patch 3 instead
    got = stats_of(attn, P, grid)
    maps = visualize.renormalised_maps(attn, P)                    # head mean, then renormalise
    assert got["proxy_share"] == pytest.approx(0.5) and torch.equal(maps[0], torch.eye(N)[[3] * 6])
    assert got["distance"] == pytest.approx(sum(math.dist(divmod(q, 2), (1, 1))
                                                for q in range(N)) / N)
    assert got["query_js"] == 0                                    # every query on patch 3

def test_stats_attention_on_itself_has_distance_0_disjoint_maps_js_1_identical_0_pairs_too():
    P, grid, N = 2, 4, 16
    attn = torch.zeros(1, 1, P + N, P + N)
    attn[0, 0, P:, P:] = torch.eye(N)                              # each patch on itself
    attn[0, 0, 0, P + 3] = attn[0, 0, 1, P + 9] = 1                # proxies on different patches
    got = stats_of(attn, P, grid)
    assert got["distance"] == 0 and got["proxy_share"] == 0
    assert got["query_js"] == pytest.approx(1) and got["proxy_js"] == pytest.approx(1)
    attn = torch.randn(2, 2, 3 + 16, 3 + 16).softmax(-1)
    attn[:, :, 1:3] = attn[:, :, :1]                               # every proxy as proxy 0
    assert stats_of(attn, 3, 4)["proxy_js"] == pytest.approx(0, abs=1e-6)
    assert stats_of(torch.randn(2, 2, 1 + 16, 1 + 16).softmax(-1), 1, 4)["proxy_js"] is None
    maps = torch.eye(N)[[1 * grid + 2] * N][None]                 # all on patch (1, 2)
    dist = visualize.attention_distance(maps, visualize.grid_distances(grid))  # from (0, 0): √5
    assert dist[0, 0] == pytest.approx(math.sqrt(5))
    # JS in bits: disjoint 1, equal 0, and a half overlap by hand: H(.75, .25) - (0 + 1) / 2
    p, q, r = torch.tensor([[1., 0, 0], [0, 1, 0], [.5, .5, 0]])
    assert visualize.js_divergence(p, q) == pytest.approx(1) and visualize.js_divergence(p, p) == 0
    h = -(.75 * math.log2(.75) + .25 * math.log2(.25))
    assert visualize.js_divergence(p, r) == pytest.approx(h - 0.5)
    assert visualize.mean_pairwise_js(torch.stack([p, p, q])[None]) == pytest.approx(2 / 3)
    maps = torch.randn(3, 6, 10).softmax(-1)                       # in blocks: the double loop
    loop = torch.tensor([sum(visualize.js_divergence(maps[b, i], maps[b, j])
                             for i in range(6) for j in range(6) if i != j) / 30
                         for b in range(3)])
    for budget in (1, 1 << 22):                                    # one row per block, all rows
        assert torch.allclose(visualize.mean_pairwise_js(maps, budget), loop, atol=1e-6)
    assert visualize.mean_pairwise_js(maps[:, :1]).isnan().all()  # one row: no pair

def test_stats_region_consistency_is_mass_on_own_region_over_its_share_fg_the_raw_mean():
    grid, N = 4, 16
    fg = torch.zeros(3, N, dtype=torch.bool)
    fg[0, :4], fg[2] = True, True                     # image 1: no foreground; image 2: all of it
    attn = torch.full((3, 1, N, N), 1 / N)                         # no proxies (P = 0)
    attn[0, 0] = fg[0].float() / 4                                 # every query on the foreground
    got = stats_of(attn, 0, grid, fg)
    assert got["fg_consistency"] == pytest.approx(N / 4)           # N / |fg|
    assert got["bg_consistency"] == 0                              # image 1 is not counted
    assert got["proxy_js"] is None and got["proxy_share"] == 0
    # by hand, 4 patches, foreground = patch 0: a foreground query with half its mass on it
    # scores .5 / (1/4); a background query with .75 on the background scores .75 / (3/4)
    maps = torch.tensor([[[.5, .5, 0, 0], [.25, .25, .5, 0], [1, 0, 0, 0], [0, 0, 0, 1]]])
    r = visualize.region_consistency(maps, torch.tensor([[True, False, False, False]]))
    assert torch.allclose(r, torch.tensor([[2.0, 1.0, 0.0, 4 / 3]]))
    # a region that covers the image scores 1 by construction and is left out
    assert visualize.region_consistency(maps, torch.ones(1, 4, dtype=torch.bool)).isnan().all()
    raw = torch.zeros(2, 3, 8, 8)              # foreground: a patch's raw mean (2x2 of 4 px)
    raw[0, :, 0:4, 4:8] = 0.3                                      # patch 1: mean 0.3
    raw[0, 0, 4:8, 0:4] = 0.25                                     # patch 2: one channel, 0.083
    fg = visualize.foreground_patches(raw, 4, 0.1)
    assert fg.tolist() == [[False, True, False, False], [False] * 4]

def stats_tables(text):
    """--stats output -> [(the line naming a model, {row title: cells})], a table per model."""
    lines, out = text.splitlines(), []
    for i in (i for i, s in enumerate(lines) if s.startswith("layer ")):
        end = next(j for j in range(i, len(lines)) if lines[j].startswith("uniform"))
        out.append((lines[i - 1], {s.split()[0]: s.split()[1:] for s in lines[i + 1:end + 1]}))
    return out

def test_stats_cli_prints_a_table_and_writes_the_json_beside_the_checkpoint(runs, tmp_path, capsys):
    ckpt, out = runs / "sm" / "checkpoint.pt", tmp_path / "fig"
    written = visualize.main([str(ckpt), "--stats", "--out", str(out)])
    assert written == [str(out / "attn_stats.png")] and os.listdir(out) == ["attn_stats.png"]
    assert_pngs(out, ["attn_stats.png"])                               # and no other figure
    text = capsys.readouterr().out
    assert "note: the synthetic test split has 32 images: using all of them" in text
    assert next(s for s in text.splitlines() if s.startswith("layer")).split() == (
        "layer proxy share distance query JS fg region bg region proxy JS".split())
    [(head, rows)] = stats_tables(text)
    assert head == f"SemanticMIM: {ckpt} (P 4, mask ratio 0.8, depth 2)"
    assert list(rows) == ["1", "2", "uniform"] and all(len(v) == 6 for v in rows.values())
    report = json.load(open(runs / "sm" / "attn_stats.json"))
    assert report["command"] == f"python visualize.py {ckpt} --stats --out {out}"
    assert (report["images"]["dataset"], report["images"]["count"]) == ("synthetic", 32)
    assert report["foreground_threshold"] == train.FOREGROUND_THRESHOLD["synthetic"]
    assert set(report["statistics"]) == set(visualize.STATS) and report["maps"]
    [entry] = report["models"]
    assert entry["name"] == "SemanticMIM" and entry["config"]["num_proxies"] == 4
    assert entry["uniform"] == pytest.approx(visualize.uniform_reference(4, 8))
    assert [layer["layer"] for layer in entry["layers"]] == [1, 2]
    for layer, row in zip(entry["layers"], (rows["1"], rows["2"])):
        assert set(layer) == set(visualize.STATS) | {"layer"} and 0 < layer["proxy_share"] < 1
        assert 0 < layer["distance"] < math.dist((0, 0), (7, 7)) and 0 <= layer["query_js"] <= 1
        assert 0 <= layer["proxy_js"] <= 1 and layer["fg_consistency"] > 0 < layer["bg_consistency"]
        assert [float(v) for v in row] == pytest.approx(
            [layer[k] for k in visualize.STATS], abs=0.006)         # the table prints the JSON
    model, c = train.load_model(str(ckpt))                  # the definitions, written plainly
    raw = next(visualize.load_images(c["args"], 32, first=1000)[1])    # the 32 test images
    with torch.no_grad():
        attn = model.features(visualize.normalise(raw, c), 2, return_attn=True)[1][-1].mean(1)
    maps = attn[:, 4:, 4:] / attn[:, 4:, 4:].sum(-1, keepdim=True)  # (B, N, N), P = 4
    one = [{k: v for k, v in layer.items() if k != "layer"} for layer in entry["layers"]]
    assert one[1]["proxy_share"] == pytest.approx(float(attn[:, 4:, :4].sum(-1).mean()))
    assert one[1]["distance"] == pytest.approx(
        float((maps * visualize.grid_distances(8)).sum(-1).mean()), rel=1e-5)
    batches = visualize.load_images(c["args"], 32, first=32, batch=7)[1]  # 5 batches pool to it
    pooled = visualize.attention_stats([(model, c, "x")], batches, report["foreground_threshold"])
    assert pooled[0] == [pytest.approx(layer, rel=1e-5) for layer in one]

def test_stats_compare_prints_a_table_per_model_and_draws_attn_stats_png(runs, tmp_path, capsys):
    """SemanticMIM, the baseline and a 3-block MaskFeat baseline (P 1, ratio 0.4) named apart."""
    torch.manual_seed(0)
    cfg = tiny(num_proxies=1, mask_ratio=0.4, baseline=True)         # 3 blocks
    torch.save({"config": asdict(cfg), "model": sm.SemanticMIM(cfg).state_dict(),
                "args": {"dataset": "synthetic"}}, tmp_path / "maskfeat.pt")
    written = visualize.main([str(runs / "sm" / "checkpoint.pt"), "--stats", "--stats-images",
                              "8", "--compare", str(runs / "base" / "checkpoint.pt"),
                              str(tmp_path / "maskfeat.pt"), "--what", "compare", "--indices",
                              "0", "--out", str(tmp_path)])
    names = ["attn_stats.png", "compare_attn_layer2.png"]         # layers -1: 2, 2 and 3
    assert written == [str(tmp_path / n) for n in names]
    assert_pngs(tmp_path, names)
    tables = stats_tables(capsys.readouterr().out)
    models = ["SemanticMIM", "baseline P4 m0.8", "baseline P1 m0.4"]
    assert [head.split(":")[0] for head, _ in tables] == models
    assert [list(rows) for _, rows in tables] == [["1", "2", "uniform"]] * 2 + [
        ["1", "2", "3", "uniform"]]
    assert tables[2][1]["3"][-1] == tables[2][1]["uniform"][-1] == "-"  # P 1: no proxy JS
    report = json.load(open(runs / "sm" / "attn_stats.json"))
    assert report["images"]["count"] == 8 and [m["name"] for m in report["models"]] == models
    assert [len(m["layers"]) for m in report["models"]] == [2, 2, 3]
    assert all(layer["proxy_js"] is None for layer in report["models"][2]["layers"])
    assert [m["uniform"]["proxy_share"] for m in report["models"]] == pytest.approx(
        [4 / 68, 4 / 68, 1 / 65])

def test_stats_skip_region_consistency_without_a_black_background(runs, tmp_path, capsys,
                                                                  monkeypatch):
    """Natural images (CIFAR-10, stood in by synthetic): no region columns, a note, no threshold."""
    c = torch.load(runs / "sm" / "checkpoint.pt", weights_only=True)
    torch.save({**c, "args": {**c["args"], "dataset": "cifar10"}}, tmp_path / "cifar.pt")
    real = train.load_split
    monkeypatch.setattr(train, "load_split", lambda name, root, split, size, *_: real(
        "synthetic", None, split, size, 128))
    visualize.main([str(tmp_path / "cifar.pt"), "--stats", "--stats-images", "5", "--out",
                    str(tmp_path / "fig")])
    text = capsys.readouterr().out
    assert "note: no region consistency: cifar10 images have no plain background" in text
    assert "fg region" not in text
    report = json.load(open(tmp_path / "attn_stats.json"))
    assert report["foreground_threshold"] is None
    assert set(report["models"][0]["layers"][0]) == set(visualize.STATS) - {
        "fg_consistency", "bg_consistency"} | {"layer"}

# ---- 6. the repository ---------------------------------------------------------------------------
# Files of the authors' repository (github.com/yyk-wew/SemanticMIM) and of MMPreTrain that the
# code cites by name (and run_probe.py, which a probe test writes); all else is a file here.
AUTHORS = set("""maskfeat/maskfeat.py maskfeat/maskfeat_backbone.py attn_vis.py
    configs/maskfeat/maskfeat_bottleneck_pretrain.py configs/maskfeat/maskfeat_baseline_pretrain.py
    configs/maskfeat/maskfeat_cls_linear_probing.py configs/maskfeat/maskfeat_cls_ft.py
    maskfeat_cls_ft.py maskfeat_bottleneck_pretrain.py maskfeat_baseline_pretrain.py
    maskfeat_cls_linear_probing.py _linear_probing.py mmpretrain/models/selfsup/maskfeat.py
    beit/beit_model.py beit/beit_backbone.py seg_linear_probing.py run_probe.py
    voc_utils/segment_utils.py""".split())

def test_no_tracked_file_refers_to_a_file_outside_the_repository():
    """No path climbs out of the repository; each .py/.md/.sh named is tracked or in AUTHORS."""
    try:
        tracked = subprocess.run(["git", "ls-files", "--cached", "--others",
                                  "--exclude-standard"], cwd=HERE, capture_output=True, text=True,
                                 check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    names, outside = set(tracked) | {os.path.basename(f) for f in tracked}, []
    for f in tracked:
        try:
            text = open(os.path.join(HERE, f), encoding="utf-8").read()
        except (UnicodeDecodeError, IsADirectoryError, FileNotFoundError):
            continue                                        # figures; files being deleted
        text = re.sub(r"https?://\S+", "", text)            # links are not files
        for m in re.finditer(r"(?:\.\./)+[\w./-]*|[\w./-]*\w\.(?:py|md|sh)\b", text):
            ref = m.group(0)
            if ref.startswith(".."):                        # from a docs page up to README.md
                ref = os.path.normpath(os.path.join(os.path.dirname(f), ref))
            if ref.startswith("..") or not {ref, ref.lstrip("./")} & names and ref not in AUTHORS:
                outside.append(f"{f}: {ref}")
    assert outside == []

def test_every_link_of_the_readme_and_docs_reaches_a_file_and_its_heading():
    """Each #anchor is a heading there (GitHub: lower case, no punctuation, hyphens for spaces)."""
    pages = ["README.md"] + [f"docs/{f}" for f in os.listdir(os.path.join(HERE, "docs"))
                             if f.endswith(".md")]
    read, broken = lambda path: open(os.path.join(HERE, path), encoding="utf-8").read(), []
    for page in pages:
        for target, anchor in re.findall(r"\]\((?!http)([^)#\s]*)(?:#([\w-]+))?\)", read(page)):
            path = os.path.normpath(os.path.join(os.path.dirname(page), target)) if target else page
            if not os.path.exists(os.path.join(HERE, path)):
                broken.append(f"{page}: {target}")
            elif anchor and anchor not in [re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(
                    " ", "-") for h in re.findall(r"^#+ (.*)$", read(path), re.M)]:
                broken.append(f"{page}: {target}#{anchor}")
    assert len(pages) > 4 and broken == []

def test_results_tables_in_the_pages_are_what_summarize_writes_from_the_results_files():
    """No results table is typed: README.md's and docs/results.md's are experiments/summarize.py's
    rendering of the committed experiments/results/*.json (`summarize.py --pages` rewrites them)."""
    import summarize                                        # experiments/summarize.py
    pages = summarize.pages()
    for path, text in pages.items():
        assert open(path, encoding="utf-8").read() == text, f"run summarize.py --pages: {path}"
    shown = [m.group(2, 3) for text in pages.values() for m in summarize.MARKED.finditer(text)]
    results = [f[:-5] for f in os.listdir(summarize.RESULTS) if f.endswith(".json")]
    assert sorted(name for name, kind in shown if kind == "all") == sorted(results)
    long8 = summarize.load(os.path.join(summarize.RESULTS, "long8.json"))["runs"]
    assert summarize.summary(long8) in pages[summarize.PAGES[0]]      # the README's one table
