"""Each test proves one claim of semanticmim.py / train.py and fails when the claim is false.

Run: python -m pytest -q test_semanticmim.py   (no network; a few minutes on 2 CPU cores)
"""
import gzip
import json
import math
import os
import signal
import struct
import subprocess
import sys
import urllib.error

import pytest
import torch

import semanticmim as sm
import train

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = dict(img_size=32, patch_size=4, dim=32, depth=3, heads=2, num_proxies=4)
# a tiny synthetic run of train.py: 128 images, global batch 16 -> 8 steps per epoch
RUN = ["--dataset", "synthetic", "--synthetic-size", "128", "--batch-size", "16", "--dim", "32",
       "--depth", "2", "--heads", "2", "--num-proxies", "4", "--log-every", "2"]


def tiny(**kw):
    return sm.Config(**{**TINY, **kw})


def masks(cfg, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return sm.random_masking(batch, cfg.num_patches, cfg.num_masked, g, "cpu")


def weights_of(path):
    return torch.load(path, weights_only=True)["model"]


# ---------------------------------------------------------------------------- patches, masks
def test_patchify_round_trip_and_layout():
    x = torch.randn(2, 3, 32, 32)
    p = sm.patchify(x, 4)
    assert p.shape == (2, 64, 48)
    # patch 1 is row 0, column 1: pixels (row, col, channel)
    assert torch.equal(p[0, 1], x[0, :, 0:4, 4:8].permute(1, 2, 0).reshape(-1))
    assert torch.equal(sm.unpatchify(p, 4), x)


def test_masking_counts_disjoint_random_per_image_and_seeded():
    B, N, Nm = 64, 64, math.ceil(64 * 0.8)
    g = torch.Generator().manual_seed(0)
    keep, mask = sm.random_masking(B, N, Nm, g, "cpu")
    assert keep.shape == (B, N - Nm) and mask.shape == (B, Nm)
    for k, m in zip(keep.tolist(), mask.tolist()):
        assert set(k).isdisjoint(m) and sorted(k + m) == list(range(N))
    assert len({tuple(m) for m in mask.tolist()}) == B          # every image its own mask
    again = sm.random_masking(B, N, Nm, torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(again[1], mask)                           # the caller's seed decides
    # a rank's rows of the global draw are the same rows as in the one-process draw
    k2, m2 = sm.random_masking(B, N, Nm, torch.Generator().manual_seed(0), "cpu",
                               rows=slice(1, None, 2))
    assert torch.equal(m2, mask[1::2]) and torch.equal(k2, keep[1::2])


def test_independent_mask_set_is_drawn_apart_from_the_visible_set():
    g = torch.Generator().manual_seed(0)
    keep, mask = sm.random_masking(64, 64, 52, g, "cpu", independent=True)
    assert keep.shape == (64, 12) and mask.shape == (64, 52)
    assert all(len(set(m)) == 52 for m in mask.tolist())
    overlaps = sum(len(set(k) & set(m)) for k, m in zip(keep.tolist(), mask.tolist()))
    assert overlaps > 0                                           # not the complement any more


# ---------------------------------------------------------------------------- attention
def test_sdpa_path_equals_explicit_softmax_path_and_fused_equals_split():
    torch.manual_seed(0)
    attn = sm.Attention(32, 4)
    q, kv = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    fast, none = attn(q, kv)
    slow, w = attn(q, kv, return_weights=True)
    assert none is None and w.shape == (2, 4, 5, 7)
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 5))
    fused, _ = attn(kv, kv)                                      # self-attention, one matmul
    split, _ = attn(kv, kv.clone())                              # same values, separate path
    torch.testing.assert_close(fused, split, atol=1e-6, rtol=1e-5)


def test_block_ln1_normalises_query_and_keys_with_its_own_weights():
    torch.manual_seed(0)
    blk = sm.Block(32, 2, 4.0)
    with torch.no_grad():
        blk.norm1.weight.uniform_(0.5, 1.5)
    x, ctx = torch.randn(2, 3, 32), torch.randn(2, 4, 32)
    kv = blk.norm1(torch.cat([ctx, x], 1))
    expect = x + blk.attn(blk.norm1(x), kv)[0]
    expect = expect + blk.mlp(blk.norm2(expect))
    torch.testing.assert_close(blk(x, ctx), expect)


# ---------------------------------------------------------------------------- information flow
def run_with_hooks(model, imgs, keep, mask, hooks):
    handles = [mod.register_forward_hook(fn) for mod, fn in hooks]
    try:
        with torch.no_grad():
            return model.predict(imgs, keep, mask)
    finally:
        for h in handles:
            h.remove()


def test_mask_tokens_see_images_only_through_the_proxies():
    """Change the image but force the proxies every mask block reads to their values for the
    old image: the [MASK] predictions must not move. The baseline, where [MASK] attends to
    [IMG] directly, fails the same check (so the check can fail)."""
    for baseline in (False, True):
        torch.manual_seed(0)
        cfg = tiny(baseline=baseline)
        model, P = sm.SemanticMIM(cfg).eval(), cfg.num_proxies
        a, b = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
        keep, mask = masks(cfg, 2)
        seen = {}

        def record(i):
            def hook(mod, inp, out):
                seen[i] = out[:, :P].clone()
            return hook

        def force(i):
            def hook(mod, inp, out):
                out = out.clone()
                out[:, :P] = seen[i]
                return out
            return hook

        pred_a = run_with_hooks(model, a, keep, mask,
                                [(blk, record(i)) for i, blk in enumerate(model.blocks)])
        pred_b_forced = run_with_hooks(model, b, keep, mask,
                                       [(blk, force(i)) for i, blk in enumerate(model.blocks)])
        pred_b = run_with_hooks(model, b, keep, mask, [])
        assert not torch.allclose(pred_a, pred_b, atol=1e-4)     # the image does reach [MASK]
        if baseline:
            assert not torch.allclose(pred_a, pred_b_forced, atol=1e-4)
        else:
            assert torch.equal(pred_a, pred_b_forced)


def test_img_and_proxy_tokens_never_see_mask_tokens():
    """Change the [MASK] token: every main-stack output must stay bit for bit the same
    (and in the one-stream baseline it does not)."""
    for baseline in (False, True):
        torch.manual_seed(0)
        cfg = tiny(baseline=baseline)
        model = sm.SemanticMIM(cfg).eval()
        imgs = torch.randn(2, 3, 32, 32)
        keep, mask = masks(cfg, 2)
        n_main = cfg.num_proxies + keep.shape[1]                 # [PROXY; IMG] rows

        def main_outputs():
            outs = []
            run_with_hooks(model, imgs, keep, mask,
                           [(blk, lambda m, i, o: outs.append(o[:, :n_main].clone()))
                            for blk in model.blocks])
            return outs

        before = main_outputs()
        with torch.no_grad():
            model.mask_token.add_(torch.randn_like(model.mask_token))
        after = main_outputs()
        same = all(torch.equal(x, y) for x, y in zip(before, after))
        assert same != baseline


def test_mask_block_reads_the_proxies_output_by_the_main_block_of_the_same_depth():
    torch.manual_seed(0)
    cfg = tiny(depth=3)
    model, P = sm.SemanticMIM(cfg).eval(), cfg.num_proxies
    imgs = torch.randn(2, 3, 32, 32)
    keep, mask = masks(cfg, 2)

    def mask_outputs(perturb_depth=None):
        outs = []
        hooks = [(mb, lambda m, i, o: outs.append(o.clone())) for mb in model.mask_blocks]
        if perturb_depth is not None:
            def bump(mod, inp, out):
                out = out.clone()
                out[:, :P] += torch.randn_like(out[:, :P])  # a constant would cancel in LN
                return out
            hooks.append((model.blocks[perturb_depth], bump))
        run_with_hooks(model, imgs, keep, mask, hooks)
        return outs

    clean, bumped = mask_outputs(), mask_outputs(perturb_depth=1)
    assert torch.equal(clean[0], bumped[0])          # mask block 0 is before main block 1's output
    assert not torch.allclose(clean[1], bumped[1])   # mask block 1 reads main block 1's proxies


def test_baseline_is_one_stream_with_the_same_main_stack():
    cfg = tiny()
    semantic, base = sm.SemanticMIM(cfg), sm.SemanticMIM(tiny(baseline=True))
    assert not hasattr(base, "mask_blocks")
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(base) == count(semantic) - count(semantic.mask_blocks)
    keep, mask = masks(cfg, 2)
    lengths = []
    run_with_hooks(base, torch.randn(2, 3, 32, 32), keep, mask,
                   [(blk, lambda m, i, o: lengths.append(o.shape[1])) for blk in base.blocks])
    assert lengths == [cfg.num_proxies + keep.shape[1] + mask.shape[1]] * cfg.depth


def test_features_path_is_the_main_stack_on_all_patches():
    torch.manual_seed(0)
    cfg = tiny()
    model = sm.SemanticMIM(cfg).eval()
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        proxy, patches, attn = model.features(imgs, layer=2, return_attn=True)
        x = torch.cat(model.embed(imgs), 1)
        for blk in model.blocks[:2]:
            x = blk(x)
    assert proxy.shape == (2, 4, 32) and patches.shape == (2, 64, 32) and len(attn) == 2
    torch.testing.assert_close(torch.cat([proxy, patches], 1), x)
    with pytest.raises(ValueError, match="layer 4 does not exist"):
        model.features(imgs, layer=4)


# ---------------------------------------------------------------------------- targets
def naive_hog(img, p, nbins=9):
    """The authors' HOG written out pixel by pixel in plain Python, for one image (3, H, W)."""
    C, H, W = img.shape
    a = img.tolist()
    refl = lambda i, n: -i if i < 0 else (2 * (n - 1) - i if i >= n else i)
    px = lambda c, y, x: a[c][refl(y, H)][refl(x, W)]
    g = [math.exp(-0.5 * ((i - (p - 1) / 2) / (p // 2)) ** 2) for i in range(p)]
    total = sum(u * v for u in g for v in g)
    cell = p // 2
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


@pytest.mark.parametrize("size,patch,batch", [(224, 16, 1), (32, 4, 2)])
def test_hog_equals_naive_loop(size, patch, batch):
    torch.manual_seed(0)
    imgs = torch.randn(batch, 3, size, size, dtype=torch.float64)
    hog = sm.hog_target(imgs, patch)
    assert hog.shape == (batch, (size // patch) ** 2, 108)
    for i in range(batch):
        expect = torch.tensor(naive_hog(imgs[i], patch), dtype=torch.float64)
        torch.testing.assert_close(hog[i], expect, atol=1e-10, rtol=1e-8)


def test_hog_works_at_other_sizes_and_refuses_odd_patches():
    assert sm.hog_target(torch.randn(1, 3, 48, 48), 8).shape == (1, 36, 108)
    with pytest.raises(ValueError, match="even"):
        sm.Config(patch_size=3, img_size=33)


def test_pixel_target_is_normalised_per_patch():
    imgs = torch.rand(2, 3, 32, 32) * 5 + 3
    t = sm.pixel_target(imgs, 4)
    assert t.shape == (2, 64, 48)
    torch.testing.assert_close(t.mean(-1), torch.zeros(2, 64), atol=1e-5, rtol=0)
    torch.testing.assert_close(t.std(-1), torch.ones(2, 64), atol=1e-4, rtol=0)
    patch = imgs[0, :, 4:8, 8:12].permute(1, 2, 0).reshape(-1)   # patch (1, 2)
    torch.testing.assert_close(t[0, 10], (patch - patch.mean()) / (patch.var() + 1e-6) ** 0.5)


def test_loss_is_mse_on_masked_patches_only():
    torch.manual_seed(0)
    cfg = tiny(target="pixel")
    model = sm.SemanticMIM(cfg)
    imgs = torch.randn(2, 3, 32, 32)
    keep, mask = masks(cfg, 2)
    with torch.no_grad():
        pred = model.predict(imgs, keep, mask)
        target = sm.pixel_target(imgs, 4)
        expect = ((pred - sm.gather_tokens(target, mask)) ** 2).mean()
        assert pred.shape == (2, cfg.num_masked, 48)
        torch.testing.assert_close(model(imgs, keep, mask), expect)


@pytest.mark.parametrize("baseline", [False, True])
def test_tiny_model_overfits_one_batch(baseline):
    torch.manual_seed(0)
    cfg = tiny(baseline=baseline, dim=64, target="pixel")
    model = sm.SemanticMIM(cfg)
    imgs = torch.randn(8, 3, 32, 32)
    keep, mask = masks(cfg, 8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0)
    losses = []
    for _ in range(200):
        loss = model(imgs, keep, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


# ---------------------------------------------------------------------------- config, checkpoints
def test_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="not divisible by patch size 4"):
        sm.Config(img_size=30)
    with pytest.raises(ValueError, match="at least one proxy"):
        sm.Config(num_proxies=0)
    sm.Config(num_proxies=0, baseline=True)                      # the baseline may have none
    with pytest.raises(ValueError, match="expects 32x32"):
        sm.SemanticMIM(tiny()).embed(torch.randn(1, 3, 28, 28))
    assert sm.PRESETS["vit_b16"].num_patches == 196 and sm.PRESETS["cifar"].num_patches == 64


def test_checkpoint_round_trip_and_architecture_mismatch(tmp_path):
    torch.manual_seed(0)
    cfg = tiny()
    model = sm.SemanticMIM(cfg)
    path = str(tmp_path / "checkpoint.pt")
    from dataclasses import asdict
    train.save_checkpoint(path, model=model.state_dict(), config=asdict(cfg))
    assert os.listdir(tmp_path) == ["checkpoint.pt"]             # no temporary file left
    loaded, _ = sm.load_checkpoint(path)
    assert loaded.cfg == cfg
    imgs = torch.randn(2, 3, 32, 32)
    keep, mask = masks(cfg, 2)
    assert torch.equal(loaded.predict(imgs, keep, mask), model.predict(imgs, keep, mask))
    one_proxy = sm.SemanticMIM(tiny(num_proxies=1))
    with pytest.raises(ValueError, match="num_proxies=4 in the checkpoint but 1 in the model"):
        sm.load_weights(one_proxy, model.state_dict(), asdict(cfg))
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        sm.load_checkpoint(str(tmp_path / "missing.pt"))


# ---------------------------------------------------------------------------- train.py pieces
def test_lr_schedule_and_parameter_groups():
    lrs = [train.lr_at(s, 100, 10, 1.0, 1e-6) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))         # cosine decreases
    assert lrs[-1] < 1e-3
    model = sm.SemanticMIM(tiny())
    decay, no_decay = train.param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    assert {"pos_embed", "proxy", "mask_token", "norm.weight", "head.bias"} <= nd
    assert all(names[id(p)].endswith("weight") and p.ndim == 2 for p in decay["params"])
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0


def test_batch_augmentation_crops_and_flips():
    x = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    whole = torch.tensor([[1.0, 0.5, 0.5, 0.5, 0.9]] * 2)      # scale 1, ratio 1, centred, no flip
    torch.testing.assert_close(train.augment(x, 28, whole), x.float() / 255, atol=1e-5, rtol=0)
    flipped = whole.clone()
    flipped[:, 4] = 0.1
    torch.testing.assert_close(train.augment(x, 28, flipped), x.flip(-1).float() / 255,
                               atol=1e-5, rtol=0)
    out = train.augment(x, 32, torch.rand(2, 5))
    assert out.shape == (2, 1, 32, 32) and 0 <= out.min() and out.max() <= 1
    model_in = train.to_model_input(x, 32, (0.5,) * 3, (0.25,) * 3)
    assert model_in.shape == (2, 3, 32, 32)                      # grayscale -> 3 channels


def test_fashion_mnist_reads_the_offline_idx_files(tmp_path):
    """The documented offline route: IDX files unpacked into ROOT/FashionMNIST/raw/."""
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", 6), ("t10k", 4)):
        imgs = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8)
        (raw / f"{split}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 2051, n, 28, 28) + imgs.numpy().tobytes())
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 2049, n) + bytes(range(n)))
    x, y = train.load_memory_dataset("fashion_mnist", str(tmp_path), True, 32)
    assert x.shape == (6, 1, 28, 28) and x.dtype == torch.uint8 and y.tolist() == list(range(6))


def test_no_network_gives_one_line_naming_the_offline_choices(monkeypatch, tmp_path):
    def offline(*a, **k):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(train.torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(SystemExit, match="offline choices: --dataset fashion_mnist"):
        train.load_memory_dataset("cifar10", str(tmp_path), True, 32)


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(SystemExit, match="no such folder"):
        train.main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="not an image folder"):
        train.main(["--data", str(tmp_path), "--out", str(tmp_path / "o"), "--workers", "0"])
    with pytest.raises(SystemExit, match="image size 30 is not divisible by patch size 4"):
        train.main(RUN + ["--img-size", "30", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="no checkpoint at"):
        train.main(RUN + ["--resume", "--out", str(tmp_path / "o")])


def test_image_folder_training_with_workers(tmp_path):
    """--data DIR reads DIR/train when present; a seeded worker pipeline trains end to end."""
    from PIL import Image
    for c in range(2):
        d = tmp_path / "train" / f"class{c}"
        d.mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (40 + i, 36), (40 * c + i, 90, 200)).save(d / f"{i}.png")
    out = str(tmp_path / "run")
    args = ["--data", str(tmp_path), "--preset", "cifar", "--dim", "32", "--depth", "1",
            "--heads", "2", "--batch-size", "8", "--workers", "2", "--out", out]
    train.main(args)
    assert weights_of(os.path.join(out, "checkpoint.pt"))["pos_embed"].shape == (1, 72, 32)


@pytest.mark.parametrize("baseline", [False, True])
def test_analytic_flop_count_equals_torch_flop_counter(baseline, monkeypatch):
    """--bench's FLOPs per image equal what torch's FlopCounterMode counts in a training step
    (attention written out as matmuls, since the counter does not see the CPU SDPA kernel)."""
    from torch.utils.flop_counter import FlopCounterMode

    def math_sdpa(q, k, v):
        return (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1) @ v

    monkeypatch.setattr(sm.F, "scaled_dot_product_attention", math_sdpa)
    cfg = tiny(baseline=baseline)
    model = sm.SemanticMIM(cfg)
    keep, mask = masks(cfg, 2)
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(2, 3, 32, 32), keep, mask).backward()
    counts = counter.get_flop_counts()["Global"]
    matmuls = sum(v for k, v in counts.items() if "convolution" not in str(k))  # not the HOG
    assert matmuls == 2 * train.flops_per_image(cfg)


# ---------------------------------------------------------------------------- runs
def test_exact_resume_is_bitwise(tmp_path):
    """Stopped mid-epoch at step 5 and resumed == uninterrupted (2 epochs of 8 steps)."""
    args = RUN + ["--epochs", "2", "--amp", "bf16"]
    train.main(args + ["--out", str(tmp_path / "full")])
    train.main(args + ["--out", str(tmp_path / "split"), "--stop-at", "5"])
    assert torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)["step"] == 5
    train.main(["--resume", "--out", str(tmp_path / "split")])
    a, b = weights_of(tmp_path / "full" / "checkpoint.pt"), weights_of(tmp_path / "split" /
                                                                      "checkpoint.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(ln)["step"] for ln in open(tmp_path / "split" / "log.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == 16      # no duplicated log lines
    with pytest.raises(SystemExit, match="exists: pass --resume"):
        train.main(args + ["--out", str(tmp_path / "full")])
    with pytest.raises(SystemExit, match="--epochs 3 .*saved 2"):
        train.main(["--resume", "--epochs", "3", "--out", str(tmp_path / "full")])


def test_sigterm_saves_at_the_next_progress_line_and_resume_is_still_exact(tmp_path,
                                                                          monkeypatch):
    """A pre-empted job (SIGTERM during step 3) saves at step 4 (--log-every 2) and exits;
    --resume then ends with the weights of the uninterrupted run."""
    args = RUN + ["--epochs", "2"]
    before = signal.getsignal(signal.SIGTERM)
    train.main(args + ["--out", str(tmp_path / "full")])
    forward, calls = sm.SemanticMIM.forward, []

    def preempted(self, *a):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return forward(self, *a)

    monkeypatch.setattr(sm.SemanticMIM, "forward", preempted)
    train.main(args + ["--out", str(tmp_path / "split")])
    assert torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)["step"] == 4
    monkeypatch.setattr(sm.SemanticMIM, "forward", forward)
    train.main(["--resume", "--out", str(tmp_path / "split")])
    a = weights_of(tmp_path / "full" / "checkpoint.pt")
    b = weights_of(tmp_path / "split" / "checkpoint.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert signal.getsignal(signal.SIGTERM) is before            # handlers are restored


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    forward = sm.SemanticMIM.forward
    calls = []

    def poisoned(self, *a):
        calls.append(1)
        loss = forward(self, *a)
        return loss * float("nan") if len(calls) > 6 else loss

    monkeypatch.setattr(sm.SemanticMIM, "forward", poisoned)
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"loss is nan .*checkpoint .* \(step 4\) is intact"):
        train.main(RUN + ["--ckpt-every", "4", "--log-every", "1", "--out", str(out)])
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_two_gloo_processes_equal_one_process_on_the_same_global_batch(tmp_path):
    args = RUN + ["--epochs", "2", "--amp", "none", "--blr", "0.05", "--clip", "0"]
    one = tmp_path / "one"
    train.main(args + ["--out", str(one)])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                    "--standalone", os.path.join(HERE, "train.py"), *args,
                    "--out", str(tmp_path / "two")], check=True, env=env, cwd=HERE,
                   capture_output=True)
    a, b = weights_of(one / "checkpoint.pt"), weights_of(tmp_path / "two" / "checkpoint.pt")
    torch.manual_seed(0)
    init = sm.SemanticMIM(sm.config_from_dict(
        torch.load(one / "checkpoint.pt", weights_only=True)["config"])).state_dict()
    moved = max((a[k] - init[k]).abs().max().item() for k in a)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert moved > 1e-2 and diff < 1e-5, (moved, diff)


def test_train_py_end_to_end_in_a_subprocess(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), *RUN, "--baseline",
                        "--target", "pixel", "--out", str(out)],
                       capture_output=True, text=True, cwd=HERE)
    assert r.returncode == 0, r.stderr
    assert "step 8/8" in r.stdout and "img/s" in r.stdout
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "log.jsonl"]
    log = [json.loads(ln) for ln in open(out / "log.jsonl")]
    assert [rec["step"] for rec in log] == [2, 4, 6, 8]
    assert all(math.isfinite(rec["loss"]) and rec["img_per_s"] > 0 for rec in log)
    model, ckpt = sm.load_checkpoint(str(out / "checkpoint.pt"))
    assert model.cfg.baseline and model.cfg.target == "pixel" and ckpt["step"] == 8
