"""Each test proves one claim of semanticmim.py / train.py and fails when the claim is false.

Run: python -m pytest -q test_semanticmim.py   (no network; a few minutes on 2 CPU cores)
Sections: semanticmim.py and train.py, then probe.py, then visualize.py.
"""
import json
import math
import os
import signal
import struct
import subprocess
import sys
import urllib.error
from dataclasses import asdict

import pytest
import torch

import data
import probe
import semanticmim as sm
import train
import visualize

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "experiments"))
import bench  # noqa: E402  experiments/bench.py
TINY = dict(img_size=32, patch_size=4, dim=32, depth=3, heads=2, num_proxies=4)
# a tiny synthetic run of train.py: 128 images, global batch 16 -> 8 steps per epoch
RUN = ["--dataset", "synthetic", "--synthetic-size", "128", "--batch-size", "16", "--dim", "32",
       "--depth", "2", "--heads", "2", "--num-proxies", "4", "--log-every", "2"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread is faster than two, and far faster on a busy 2-core machine
    (8 steps of train.main: 0.2 s with 1 thread, 1.5 to 16 s with 2, measured while loaded)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**kw):
    return sm.Config(**{**TINY, **kw})


def write_image_folder(root, split, per_class, colour, size=lambda i: (40 + i, 36), ext="png"):
    """root/split/class0 and class1, per_class solid images each: image i of class c has
    colour(c, i) and size(i)."""
    from PIL import Image
    for c in range(2):
        d = root / split / f"class{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", size(i), colour(c, i)).save(d / f"{i}.{ext}")


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
    with pytest.raises(ValueError, match="no checkpoint at"):
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
    torch.testing.assert_close(data.augment(x, 28, whole), x.float() / 255, atol=1e-5, rtol=0)
    flipped = whole.clone()
    flipped[:, 4] = 0.1
    torch.testing.assert_close(data.augment(x, 28, flipped), x.flip(-1).float() / 255,
                               atol=1e-5, rtol=0)
    out = data.augment(x, 32, torch.rand(2, 5))
    assert out.shape == (2, 1, 32, 32) and 0 <= out.min() and out.max() <= 1
    model_in = data.to_model_input(x, 32, (0.5,) * 3, (0.25,) * 3)
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
    x, y = data.load_memory_dataset("fashion_mnist", str(tmp_path), True, 32)
    assert x.shape == (6, 1, 28, 28) and x.dtype == torch.uint8 and y.tolist() == list(range(6))


def test_no_network_gives_one_line_naming_the_offline_choices(monkeypatch, tmp_path):
    def offline(*a, **k):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(data.torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(SystemExit, match="offline choices: --dataset fashion_mnist"):
        data.load_memory_dataset("cifar10", str(tmp_path), True, 32)


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(SystemExit, match="no such folder"):
        train.main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="not an image folder"):
        train.main(["--data", str(tmp_path), "--out", str(tmp_path / "o"), "--workers", "0"])
    with pytest.raises(SystemExit, match="image size 30 is not divisible by patch size 4"):
        train.main(RUN + ["--img-size", "30", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="no checkpoint at"):
        train.main(RUN + ["--resume", "--out", str(tmp_path / "o")])


# ---------------------------------------------------------------------------- bad input, one line each
def cli_error(main, argv, capsys):
    """A script's main on bad input -> (exit status, the one line it printed or exited with)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    code, err = e.value.code, capsys.readouterr().err
    return (1, code) if isinstance(code, str) else (code, err.strip())


SCRIPTS = {"train.py": train.main, "probe.py": probe.main, "visualize.py": visualize.main,
           "experiments/bench.py": bench.main}
BAD_FLAGS = [  # script, arguments, what the one line says after "error: argument "
    ("train.py", ["--batch-size", "0"], "--batch-size: 0 is not allowed: it must be an integer >= 1"),
    ("train.py", ["--blr", "nan"], "--blr: nan is not allowed: it must be a number > 0"),
    ("train.py", ["--blr=-1e-3"], "--blr: -1e-3 is not allowed: it must be a number > 0"),
    ("train.py", ["--workers", "-1"], "--workers: -1 is not allowed: it must be an integer >= 0"),
    ("train.py", ["--epochs", "0"], "--epochs: 0 is not allowed: it must be an integer >= 1"),
    ("train.py", ["--mask-ratio", "1"], "--mask-ratio: 1 is not allowed: it must be a number in (0, 1)"),
    ("train.py", ["--min-crop", "1.5"], "--min-crop: 1.5 is not allowed: it must be a number in (0, 1]"),
    ("train.py", ["--clip", "inf"], "--clip: inf is not allowed: it must be a number >= 0"),
    ("train.py", ["--dim", "x"], "--dim: 'x' is not an integer"),
    ("train.py", ["--ckpt-minutes", "-5"], "--ckpt-minutes: -5 is not allowed: it must be a number >= 0"),
    ("experiments/bench.py", ["--batch-size", "-4"], "--batch-size: -4 is not allowed: it must be an integer >= 1"),
    ("probe.py", ["x.pt", "--k", "0"], "--k: 0 is not allowed: it must be an integer >= 1"),
    ("probe.py", ["x.pt", "--temperature", "0"], "--temperature: 0 is not allowed: it must be a number > 0"),
    ("probe.py", ["x.pt", "--epochs", "0"], "--epochs: 0 is not allowed: it must be an integer >= 1"),
    ("probe.py", ["x.pt", "--lr", "nan"], "--lr: nan is not allowed: it must be a number > 0"),
    ("probe.py", ["x.pt", "--layer", "last"], "--layer: 'last' is neither a block number nor 'all'"),
    ("visualize.py", ["x.pt", "--stats", "--stats-images", "0"], "--stats-images: 0 is not allowed: it must be an integer >= 1"),
    ("visualize.py", ["x.pt", "--indices", "-2"], "--indices: -2 is not allowed: it must be an integer >= 0"),
    ("visualize.py", ["x.pt", "--seed", "1.5"], "--seed: '1.5' is not an integer"),
]


@pytest.mark.parametrize("script,argv,message", BAD_FLAGS)
def test_every_numeric_flag_is_checked_where_it_is_parsed(script, argv, message, capsys,
                                                          tmp_path):
    status, line = cli_error(SCRIPTS[script], argv + ["--out", str(tmp_path / "o")], capsys)
    assert status == 2 and line == f"error: argument {message} (see {script} --help)"
    assert os.listdir(tmp_path) == []


def bad_checkpoints(good, root):
    """{kind: (path, the message's core)}: every kind of file that is not a usable checkpoint,
    each as ROOT/KIND/checkpoint.pt (where train.py --resume looks)."""
    ckpt, raw = torch.load(good, weights_only=True), open(good, "rb").read()
    files = {"truncated": raw[:len(raw) // 2], "random bytes": os.urandom(4000),
             "text": b"not a checkpoint\n", "empty": b""}
    cases = {k: (v, "is not a complete checkpoint: not the zip archive torch.save writes")
             for k, v in files.items()}
    import argparse
    objects = {"pickled objects": ({**ckpt, "args": argparse.Namespace(**ckpt["args"])},
                                   "was not loaded: it holds objects other than tensors and "
                                   "plain values (argparse.Namespace), and loading it could "
                                   "run code"),
               "not from train.py": ({"weights": ckpt["model"]},
                                     "is not a checkpoint written by train.py (no config, model"),
               "other version": ({**ckpt, "config": {**ckpt["config"], "new_setting": 1}},
                                 "unknown settings ['new_setting']: it was written by another "
                                 "version of semanticmim.py")}
    out = {}
    for kind, (content, message) in {**cases, **objects}.items():
        path = root / kind.replace(" ", "_") / "checkpoint.pt"
        path.parent.mkdir(parents=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            torch.save(content, path)
        out[kind] = (str(path), message)
    return out


def test_every_bad_checkpoint_is_one_line_in_each_script_and_left_untouched(ckpt, tmp_path,
                                                                            capsys):
    """train.py --resume, probe.py and visualize.py open checkpoints through one function:
    each kind of bad file gives exit status 1 and one line naming the file and the fault."""
    for kind, (path, message) in bad_checkpoints(ckpt, tmp_path).items():
        before = open(path, "rb").read()
        folder = os.path.dirname(path)
        for script, argv in (("train.py", ["--resume", "--out", folder]),
                             ("probe.py", [path, "--out", os.path.join(folder, "p.json")]),
                             ("visualize.py", [path, "--out", os.path.join(folder, "fig")])):
            status, line = cli_error(SCRIPTS[script], argv, capsys)
            assert status == 1 and "\n" not in line, (kind, script, line)
            assert line.startswith(f"error: {path}") and message in line, (kind, script, line)
            assert open(path, "rb").read() == before and os.listdir(folder) == ["checkpoint.pt"]
    missing = str(tmp_path / "none" / "checkpoint.pt")
    for main, argv in ((probe.main, [missing]), (visualize.main, [missing])):
        assert cli_error(main, argv, capsys) == (1, f"error: no checkpoint at {missing}: pass "
                                                    f"the checkpoint.pt that train.py wrote in "
                                                    f"its --out folder")
    # a file with the weights but not the training state cannot be resumed
    os.makedirs(tmp_path / "weights")
    torch.save({k: v for k, v in torch.load(ckpt, weights_only=True).items()
                if k in ("config", "model")}, tmp_path / "weights" / "checkpoint.pt")
    status, line = cli_error(train.main, ["--resume", "--out", str(tmp_path / "weights")],
                             capsys)
    assert status == 1 and "is not a checkpoint written by train.py (no optimizer, scaler, " \
                           "rng, step, args)" in line


def test_bad_inputs_end_in_one_line_without_a_traceback_in_real_processes(ckpt, tmp_path):
    """The same errors from the command line: exit status, one line on stderr, no traceback."""
    bad = bad_checkpoints(ckpt, tmp_path)
    cases = [(["train.py", *RUN, "--batch-size", "0"], 2, "--batch-size: 0 is not allowed"),
             (["probe.py", bad["truncated"][0]], 1, "is not a complete checkpoint"),
             (["visualize.py", bad["pickled objects"][0]], 1, "loading it could run code")]
    for argv, status, message in cases:
        r = subprocess.run([sys.executable, os.path.join(HERE, argv[0]), *argv[1:]],
                           capture_output=True, text=True, cwd=tmp_path, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == status and r.stdout == "", (argv, r.stdout, r.stderr)
        assert r.stderr.count("\n") == 1 and message in r.stderr, r.stderr


def test_an_unreadable_image_stops_training_with_its_name_and_the_checkpoint_intact(tmp_path):
    """With 2 DataLoader workers: a truncated file met after the first checkpoint stops the run
    (exit 1, one line naming the file, no traceback) before any step uses the batch; the
    checkpoint and the log stay as they were, and --resume continues once it is fixed."""
    write_image_folder(tmp_path, "train", 8, lambda c, i: (40 * c + i, 90, 200))
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(HERE, "train.py"), "--data", str(tmp_path), "--dim",
           "32", "--depth", "1", "--heads", "2", "--preset", "cifar", "--batch-size", "8",
           "--workers", "2", "--epochs", "2", "--log-every", "1", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd + ["--stop-at", "2"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    saved = {f: (out / f).read_bytes() for f in ("checkpoint.pt", "log.jsonl")}
    bad = tmp_path / "train" / "class1" / "3.png"
    good = bad.read_bytes()
    bad.write_bytes(good[:len(good) // 2])
    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"error: cannot read image {bad} (OSError: image "
                                             f"file is truncated): remove or replace that file, "
                                             f"then run again"]
    assert {f: (out / f).read_bytes() for f in saved} == saved
    bad.write_bytes(good)
    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "step 4/4" in r.stdout, r.stderr


def test_unreadable_images_in_probe_and_pictures_name_the_file(ckpt, tmp_path, capsys):
    for split, n in (("train", 4), ("val", 2)):
        write_image_folder(tmp_path, split, n, lambda c, i: (200 * c + i, 90, 40))
    bad = tmp_path / "val" / "class0" / "1.png"
    bad.write_text("not an image")
    status, line = cli_error(probe.main, [ckpt, "--dataset", "imagefolder", "--data",
                                          str(tmp_path), "--workers", "2"], capsys)
    assert status == 1 and line.startswith(f"error: cannot read image {bad} (Unidentified")
    folder_ckpt = tmp_path / "run" / "checkpoint.pt"
    train.main(["--data", str(tmp_path), "--dim", "32", "--depth", "1", "--heads", "2",
                "--preset", "cifar", "--batch-size", "4", "--workers", "0",
                "--out", str(folder_ckpt.parent)])
    status, line = cli_error(visualize.main, [str(folder_ckpt), "--indices", "1",
                                              "--what", "query"], capsys)
    assert status == 1 and line.startswith(f"error: cannot read image {bad} (Unidentified")


def test_a_new_run_over_a_run_that_saved_nothing_starts_a_fresh_log(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 2, "loss": 9.0}\n{"step": 4, "loss": 9.0}\n' * 3)
    train.main(RUN + ["--out", str(out)])
    assert "holds an earlier run that wrote no checkpoint: starting a new log" in \
        capsys.readouterr().out
    assert [json.loads(ln)["step"] for ln in open(out / "log.jsonl")] == [2, 4, 6, 8]


@pytest.mark.parametrize("minutes,saved", [(0, None), (1e-9, 4)])
def test_ckpt_minutes_saves_at_the_first_progress_line_once_due(minutes, saved, tmp_path,
                                                                 monkeypatch):
    """Killed at step 6 with --ckpt-every far away: --ckpt-minutes (here: due at once) had
    saved at the progress line of step 4; with 0 nothing was saved."""
    calls, forward = [], sm.SemanticMIM.forward

    def killed(self, *a):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return forward(self, *a)
    monkeypatch.setattr(sm.SemanticMIM, "forward", killed)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train.main(RUN + ["--ckpt-every", "1000", "--ckpt-minutes", str(minutes),
                          "--out", str(out)])
    path = out / "checkpoint.pt"
    assert (torch.load(path, weights_only=True)["step"] if path.exists() else None) == saved


def test_a_finished_run_ends_with_its_checkpoint_and_the_next_commands(tmp_path, capsys):
    out = tmp_path / "my run"
    for _ in range(2):                                      # and again when there is nothing to do
        train.main(RUN + ["--out", str(out)] + (["--resume"] if _ else []))
        path = str(out / "checkpoint.pt")
        quoted = "'" + path + "'"                           # shell-quoted: the folder has a space
        assert capsys.readouterr().out.splitlines()[-4:] == [
            f"checkpoint: {path}", "next:", f"  python probe.py {quoted}",
            f"  python visualize.py {quoted}"]


def test_image_folder_training_with_workers(tmp_path):
    """--data DIR reads DIR/train when present; a seeded worker pipeline trains end to end."""
    write_image_folder(tmp_path, "train", 8, lambda c, i: (40 * c + i, 90, 200))
    out = str(tmp_path / "run")
    args = ["--data", str(tmp_path), "--preset", "cifar", "--dim", "32", "--depth", "1",
            "--heads", "2", "--batch-size", "8", "--workers", "2", "--out", out]
    train.main(args)
    assert weights_of(os.path.join(out, "checkpoint.pt"))["pos_embed"].shape == (1, 72, 32)


@pytest.mark.parametrize("baseline,plain", [(False, False), (True, False), (True, True)])
def test_analytic_flop_count_equals_torch_flop_counter(baseline, plain, monkeypatch):
    """The benchmark's FLOPs per image equal what torch's FlopCounterMode counts in a training step
    (attention written out as matmuls, since the counter does not see the CPU SDPA kernel)."""
    from torch.utils.flop_counter import FlopCounterMode

    def math_sdpa(q, k, v):
        return (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1) @ v

    monkeypatch.setattr(sm.F, "scaled_dot_product_attention", math_sdpa)
    cfg = tiny(baseline=baseline)
    model = sm.SemanticMIM(cfg)
    keep, mask = masks(cfg, 2)
    imgs = torch.randn(2, 3, 32, 32)
    with FlopCounterMode(display=False) as counter:
        (bench.plain_vit_loss(model, imgs) if plain else model(imgs, keep, mask)).backward()
    counts = counter.get_flop_counts()["Global"]
    matmuls = sum(v for k, v in counts.items() if "convolution" not in str(k))  # not the HOG
    assert matmuls == 2 * bench.flops_per_image(cfg, plain)


def test_bench_reports_the_three_models(capsys):
    results = bench.main(RUN + ["--amp", "none", "--batch-size", "8"])
    assert set(results) == {"SemanticMIM", "baseline", "plain ViT", "loader"}
    loader = results.pop("loader")                      # --dataset given: the loader is timed
    assert loader["img_per_s"] > 0
    assert loader["times_step"] == pytest.approx(loader["img_per_s"]
                                                 / results["SemanticMIM"]["img_per_s"])
    for name, r in results.items():
        assert r["img_per_s"] > 0 and r["memory_gib"] > 0 and 0 < r["peak_fraction"]
        cfg = sm.Config(**{**TINY, "depth": 2, "baseline": name != "SemanticMIM"})
        expect = bench.flops_per_image(cfg, plain=name == "plain ViT")
        assert r["gflop_per_img"] == pytest.approx(expect / 1e9)
    out = capsys.readouterr().out
    assert "matmul peak" in out and "% of peak" in out and "bookkeeping costs" in out
    assert "command: python experiments/bench.py --dataset synthetic" in out
    assert "loader (synthetic, in memory, augmented on cpu)" in out


def test_bench_loader_times_the_training_batches(tmp_path, monkeypatch):
    """bench_loader times the batches train.py would get (image folder, with workers): every
    timed batch is a real (B, 3, S, S) batch, and the rate is those images over the time."""
    write_image_folder(tmp_path, "train", 12, lambda c, i: (40 * c + i, 90, 200),
                       size=lambda i: (50, 40), ext="jpg")
    args = train.parse_args(["--data", str(tmp_path), "--preset", "cifar", "--batch-size", "4",
                             "--workers", "2"])
    cfg = train.build_config(args)
    shapes, real = [], train.make_batches

    def counting(*a):
        steps, batches = real(*a)
        def each(epoch, start):
            for x in batches(epoch, start):
                shapes.append(tuple(x.shape))
                yield x
        return steps, each
    monkeypatch.setattr(train, "make_batches", counting)
    clock = iter(range(100))                            # perf_counter: 1 s per call
    monkeypatch.setattr(bench.time, "perf_counter", lambda: float(next(clock)))
    ips = bench.bench_loader(args, cfg, torch.device("cpu"), batches=3)
    assert shapes == [(4, 3, 32, 32)] * 4               # 1 warm-up + 3 timed batches
    assert ips == 3 * 4 / 1.0                           # 12 images between two clock reads
    with pytest.raises(SystemExit, match="lower --batch-size"):
        bench.bench_loader(train.parse_args(["--data", str(tmp_path), "--batch-size", "16",
                                           "--workers", "0"]),
                           cfg, torch.device("cpu"))


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
                   capture_output=True, timeout=300)        # a rank that never exits fails it
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
                       capture_output=True, text=True, cwd=HERE,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert "step 8/8" in r.stdout and "img/s" in r.stdout
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "log.jsonl"]
    log = [json.loads(ln) for ln in open(out / "log.jsonl")]
    assert [rec["step"] for rec in log] == [2, 4, 6, 8]
    assert all(math.isfinite(rec["loss"]) and rec["img_per_s"] > 0 for rec in log)
    model, ckpt = sm.load_checkpoint(str(out / "checkpoint.pt"))
    assert model.cfg.baseline and model.cfg.target == "pixel" and ckpt["step"] == 8


# ---------------------------------------------------------------------------- the repository
# Files of the authors' repository (github.com/yyk-wew/SemanticMIM) and of MMPreTrain that the
# code cites by name; every other file name must be a file of this repository.
AUTHORS_FILES = {"maskfeat/maskfeat.py", "maskfeat/maskfeat_backbone.py", "attn_vis.py",
                 "configs/maskfeat/maskfeat_bottleneck_pretrain.py", "maskfeat_cls_ft.py",
                 "configs/maskfeat/maskfeat_baseline_pretrain.py", "maskfeat_bottleneck_pretrain.py",
                 "maskfeat_baseline_pretrain.py",
                 "configs/maskfeat/maskfeat_cls_linear_probing.py", "maskfeat_cls_linear_probing.py",
                 "configs/maskfeat/maskfeat_cls_ft.py", "mmpretrain/models/selfsup/maskfeat.py",
                 "beit/beit_model.py", "beit/beit_backbone.py", "seg_linear_probing.py",
                 "run_probe.py"}  # the last: a script a probe test writes into its tmp_path


def test_no_tracked_file_refers_to_a_file_outside_the_repository():
    """The repository reads alone: no relative path that climbs out of it, and every .py/.md/.sh
    file named in a tracked file is tracked here, or is one of the authors' files it cites."""
    import re
    try:
        tracked = subprocess.run(["git", "ls-files", "--cached", "--others",
                                  "--exclude-standard"], cwd=HERE, capture_output=True, text=True,
                                 check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    names = set(tracked) | {os.path.basename(f) for f in tracked}
    outside = []
    for f in tracked:
        try:
            text = open(os.path.join(HERE, f), encoding="utf-8").read()
        except (UnicodeDecodeError, IsADirectoryError):
            continue                                        # figures
        text = re.sub(r"https?://\S+", "", text)            # links are not files
        for m in re.finditer(r"\.\./|[\w./-]*\w\.(?:py|md|sh)\b", text):
            ref = m.group(0)
            if ref == ".." + "/" or (ref not in names and ref not in AUTHORS_FILES
                                and ref.lstrip("./") not in names):
                outside.append(f"{f}: {ref}")
    assert outside == []


# ============================================================================ probe.py
# RUN (128 train / 32 test images, 10 classes) in fp32 with a high lr so that
# the trained weights are far from their initialisation (the "random weights" row)
TRAIN = RUN + ["--amp", "none", "--blr", "0.05"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train.main(TRAIN + ["--out", str(out)])
    return str(out / "checkpoint.pt")


def synthetic_inputs(split_train=True):
    """The synthetic split as probe.py reads it: normalised images (n, 3, 32, 32), labels."""
    x, y = data.load_memory_dataset("synthetic", "data", split_train, 32, 128)
    return data.to_model_input(x, 32, *data.MEAN_STD["synthetic"]), y


# ---------------------------------------------------------------------------- classifiers
def test_linear_probe_learns_separable_features_and_not_random_labels():
    """Quadrants of two random hyperplanes (a margin kept): linearly separable, not clustered."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 16, generator=g)                  # (n, 16)
    f = x @ torch.nn.functional.normalize(torch.randn(16, 2, generator=g), dim=0)  # (n, 2)
    x, f = x[(f.abs() > 0.5).all(1)], f[(f.abs() > 0.5).all(1)]
    y = (f[:, 0] > 0).long() * 2 + (f[:, 1] > 0).long()     # 4 classes
    tr, te = slice(0, len(x) * 2 // 3), slice(len(x) * 2 // 3, None)

    def acc(labels):
        return probe.linear_probe(lambda e: x[tr], labels[tr], x[te], labels[te], 4, epochs=100,
                                  batch_size=256)

    assert acc(y) >= 0.98
    shuffled = y[torch.randperm(len(y), generator=g)]
    assert acc(shuffled) < 0.45                             # chance is 0.25


def unit(*degrees):
    a = torch.tensor(degrees, dtype=torch.float64).deg2rad()
    return torch.stack([a.cos(), a.sin()], 1).float()      # (n, 2), cos(angle) = similarity


def test_knn_is_dinos_weighted_vote():
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


def test_batched_knn_equals_dinos_loop_per_image():
    g = torch.Generator().manual_seed(0)
    train_f, test_f = torch.randn(300, 8, generator=g), torch.randn(70, 8, generator=g)
    train_y = torch.randint(5, (300,), generator=g)
    expected = []
    for q in torch.nn.functional.normalize(test_f, dim=1):  # DINO's one-hot formulation
        sim = torch.nn.functional.normalize(train_f, dim=1) @ q
        top, idx = sim.topk(20)
        one_hot = torch.nn.functional.one_hot(train_y[idx], 5).float()  # (k, C)
        expected.append((one_hot * (top / 0.07).exp()[:, None]).sum(0).argmax().item())
    for chunk in (1, 16, 256):
        pred = probe.knn_predict(train_f, train_y, test_f, 5, chunk=chunk)
        assert pred.tolist() == expected


# ---------------------------------------------------------------------------- features
def test_pooling_dims_and_layer_select_the_block():
    torch.manual_seed(0)
    model = sm.SemanticMIM(sm.Config(dim=32, depth=3, heads=2, num_proxies=4)).eval()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        for layer in (1, 2, 3):
            proxy, patch = model.features(x, layer)          # (B, P, D), (B, N, D)
            ln = torch.nn.functional.layer_norm
            want = {"patch": ln(patch.mean(1), (32,), eps=1e-6),
                    "proxy": ln(proxy.mean(1), (32,), eps=1e-6)}
            want["both"] = torch.cat([want["patch"], want["proxy"]], 1)
            for pool, w in want.items():
                f = probe.pool_features(model, x, layer, pool)
                assert f.shape == (5, 64 if pool == "both" else 32)
                assert torch.allclose(f, w, atol=1e-6)
        last = probe.pool_features(model, x, None, "patch")
        assert torch.equal(last, probe.pool_features(model, x, 3, "patch"))
        assert not torch.allclose(last, probe.pool_features(model, x, 2, "patch"), atol=1e-3)
    f = probe.pool_features(model, x, 3, "patch")            # parameter-free LayerNorm
    assert torch.allclose(f.mean(1), torch.zeros(5), atol=1e-5)
    assert torch.allclose(f.var(1, unbiased=False), torch.ones(5), atol=1e-2)
    assert probe.pixel_features(x).shape == (5, 3 * 32 * 32)


# ---------------------------------------------------------------------------- runs
def test_probe_end_to_end_writes_the_table_and_is_deterministic(ckpt):
    out = os.path.join(os.path.dirname(ckpt), "a.json")
    args = [ckpt, "--pool", "both", "--layer", "1", "--epochs", "30", "--out", out]
    report, feats = probe.main(args)
    assert json.load(open(out)) == report
    assert [r["row"] for r in report["rows"]] == ["checkpoint", "random weights", "raw pixels"]
    assert [r["dims"] for r in report["rows"]] == [64, 64, 3 * 32 * 32]
    assert report["command"] == "python probe.py " + " ".join(args)
    assert report["seed"] == 0 and report["wall_time_s"] > 0 and report["layer"] == 1
    assert (report["train_images"], report["test_images"], report["num_classes"]) == (128, 32, 10)
    pixels = report["rows"][2]
    assert pixels["linear_top1"] >= 0.95 and pixels["knn_top1"] >= 0.95  # separable classes
    # the rows are what they claim: the checkpoint's block-1 features of the data in order,
    # the same network at its initialisation (train.py's seed), the normalised pixels
    model, _ = sm.load_checkpoint(ckpt)
    torch.manual_seed(0)
    init = sm.SemanticMIM(model.cfg).eval()
    for split, i in ((True, 0), (False, 1)):
        x, _ = synthetic_inputs(split)
        with torch.no_grad():
            assert torch.allclose(feats[("checkpoint", "both", 1)][i],
                                  probe.pool_features(model.eval(), x, 1, "both"), atol=1e-5)
            assert torch.allclose(feats[("random", "both", 1)][i],
                                  probe.pool_features(init, x, 1, "both"), atol=1e-5)
        assert torch.allclose(feats[("pixels", "pixels", None)][i], probe.pixel_features(x),
                              atol=1e-5)
    assert not torch.allclose(feats[("checkpoint", "both", 1)][0],
                              feats[("random", "both", 1)][0], atol=1e-2)
    again, _ = probe.main(args)
    assert again["rows"] == report["rows"]


def test_probe_progress_lines_every_ten_seconds_and_at_the_end(ckpt, monkeypatch, capsys):
    clock = iter([0.0, 5.0, 11.0, 12.0, 30.0])
    monkeypatch.setattr(probe.time, "time", lambda: next(clock))
    update = probe.progress("features", 100, "images")      # started at 0 s
    for done in (10, 40, 50, 100):        # 5 s: quiet; 11 s: a line; 12 s: quiet; 30 s: the end
        update(done)
    assert capsys.readouterr().out.splitlines() == [
        "features: 40/100 images 3.6 images/s eta 0.3 min",
        "features: 100/100 images 3.3 images/s eta 0.0 min"]
    monkeypatch.undo()                    # a real probe: each extraction and classifier reports
    probe.main([ckpt, "--rows", "checkpoint", "pixels", "--epochs", "3",
                "--out", os.path.join(os.path.dirname(ckpt), "progress.json")])
    out = capsys.readouterr().out
    for line in ("checkpoint features, train: 128/128 images",
                 "checkpoint features, test: 32/32 images",
                 "raw pixels features, train: 128/128 images",
                 "linear probe, checkpoint patch L2: 3/3 epochs",
                 "linear probe, raw pixels: 3/3 epochs"):
        assert line in out


def test_probe_py_in_a_subprocess_writes_json_next_to_the_checkpoint(ckpt):
    r = subprocess.run([sys.executable, os.path.join(HERE, "probe.py"), ckpt, "--epochs", "10"],
                       capture_output=True, text=True, cwd=HERE,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert "linear top-1" in r.stdout and "kNN top-1" in r.stdout and "raw pixels" in r.stdout
    report = json.load(open(os.path.join(os.path.dirname(ckpt), "probe_patch_L2.json")))
    assert [row["dims"] for row in report["rows"]] == [32, 32, 3072]
    assert all(0 <= row["linear_top1"] <= 1 and 0 <= row["knn_top1"] <= 1
               for row in report["rows"])


def test_two_gloo_processes_give_the_features_and_accuracies_of_one(ckpt, tmp_path):
    """Sharded extraction gathered in data-set order, and augmentation drawn per image, not per
    process: a 2-process torchrun equals one process, --augmented included."""
    args = [ckpt, "--augmented", "--epochs", "3", "--batch-size", "24", "--pool", "proxy"]
    one, feats_one = probe.main(args + ["--out", str(tmp_path / "one.json")])
    script = tmp_path / "run_probe.py"
    script.write_text(f"import sys, torch\nsys.path.insert(0, {HERE!r})\nimport probe\n"
                      f"report, feats = probe.main(sys.argv[1:])\n"
                      f"if report is not None:\n"
                      f"    torch.save(feats, {str(tmp_path / 'f.pt')!r})\n")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", str(script), *args,
                        "--out", str(tmp_path / "two.json")],
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=HERE,
                       capture_output=True, text=True, timeout=300)  # a hang fails, not waits
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.load(open(tmp_path / "two.json"))
    assert two["processes"] == 2 and two["command"].startswith("torchrun --nproc_per_node=2")
    assert two["rows"] == one["rows"]
    feats_two = torch.load(tmp_path / "f.pt")
    for name, (tr, te) in feats_one.items():
        assert torch.allclose(tr, feats_two[name][0], atol=1e-5)
        assert torch.allclose(te, feats_two[name][1], atol=1e-5)


def test_image_folder_probe_reads_train_and_val(ckpt, tmp_path):
    for split, n in (("train", 6), ("val", 3)):
        write_image_folder(tmp_path, split, n, lambda c, i: (200 * c + i, 90, 40))
    args = [ckpt, "--dataset", "imagefolder", "--data", str(tmp_path), "--workers", "0",
            "--epochs", "5", "--augmented", "--probe-batch-size", "4"]
    report, feats = probe.main(args)
    assert (report["train_images"], report["test_images"], report["num_classes"]) == (12, 6, 2)
    assert report["rows"][2]["linear_top1"] == 1.0 and report["rows"][2]["knn_top1"] == 1.0
    name = "probe_patch_L2_imagefolder_aug.json"              # default name: data set differs
    assert os.path.isfile(os.path.join(os.path.dirname(ckpt), name))


def test_probe_bad_inputs_give_clear_errors(ckpt, tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint at"):
        probe.main([str(tmp_path / "none.pt")])
    with pytest.raises(SystemExit, match=r"--layer 3 does not exist: .* blocks 1\.\.2"):
        probe.main([ckpt, "--layer", "3"])
    with pytest.raises(SystemExit, match=r"--layer 0 does not exist"):
        probe.main([ckpt, "--layer", "0"])
    with pytest.raises(SystemExit, match="imagefolder needs --data"):
        probe.main([ckpt, "--dataset", "imagefolder"])
    (tmp_path / "imgs" / "train" / "a").mkdir(parents=True)
    with pytest.raises(SystemExit, match="needs a held-out split"):
        probe.main([ckpt, "--dataset", "imagefolder", "--data", str(tmp_path / "imgs")])
    cfg = sm.Config(dim=32, depth=1, heads=2, num_proxies=0, baseline=True)
    path = str(tmp_path / "noproxy.pt")
    torch.save({"config": asdict(cfg), "model": sm.SemanticMIM(cfg).state_dict(),
                "args": {"dataset": "synthetic"}}, path)
    with pytest.raises(SystemExit, match="has none .*use --pool patch"):
        probe.main([path, "--pool", "proxy"])


# ============================================================================ visualize.py
VIS_RUN = RUN + ["--amp", "none"]  # bf16 autocast is slow on CPU and changes nothing drawn here
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny checkpoints: SemanticMIM with the HOG target, the baseline with pixels."""
    root = tmp_path_factory.mktemp("runs")
    train.main(VIS_RUN + ["--out", str(root / "sm")])
    train.main(VIS_RUN + ["--baseline", "--target", "pixel", "--out", str(root / "base")])
    return root


def assert_pngs(folder, names):
    """Each file is a PNG that PIL decodes, with more colours than blank panels and text have
    (an empty 2x3 grid of titled axes has 256; our figures have 700 to 15000)."""
    from PIL import Image
    for name in names:
        path = os.path.join(folder, name)
        assert os.path.isfile(path), f"{name} not written"
        with open(path, "rb") as f:
            assert f.read(8) == PNG, f"{name} is not a PNG"
        with Image.open(path) as im:
            colours = im.convert("RGB").getcolors(maxcolors=1 << 24)
            assert min(im.size) >= 150 and len(colours) > 400, (name, im.size, len(colours))


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return sm.SemanticMIM(tiny(**kw)).eval()


# ---------------------------------------------------------------------------- end to end
def test_all_figures_and_compare_in_process(runs, tmp_path):
    out = tmp_path / "fig"
    written = visualize.main([str(runs / "sm" / "checkpoint.pt"), "--compare",
                              str(runs / "base" / "checkpoint.pt"), "--out", str(out),
                              "--queries", "3,4", "0", "--indices", "0", "5"])
    names = ["attn_query_r3c4_layer2.png", "attn_query_r0c0_layer2.png",
             "attn_reduce_mean_layer2.png", "proxy_maps_layer2.png", "mask_to_proxy_layer2.png",
             "recon.png", "curve.png", "compare_attn_layer2.png"]
    assert sorted(os.path.basename(p) for p in written) == sorted(names)
    assert sorted(os.listdir(out)) == sorted(names)
    assert_pngs(out, names)


def test_baseline_pixel_figures_in_a_subprocess_with_default_out(runs):
    """Defaults: out = <checkpoint folder>/figures, last layer, centre and corner queries; the
    baseline has no mask stream, which is said, not failed on."""
    ckpt = runs / "base" / "checkpoint.pt"
    r = subprocess.run([sys.executable, os.path.join(HERE, "visualize.py"), str(ckpt),
                        "--layers", "1", "-1", "--what", "query", "recon", "mask_proxy"],
                       capture_output=True, text=True, cwd=HERE,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert "no mask stream" in r.stdout
    names = ["attn_query_r4c4_layer1.png", "attn_query_r0c0_layer1.png",
             "attn_query_r4c4_layer2.png", "attn_query_r0c0_layer2.png", "recon.png"]
    assert sorted(os.listdir(runs / "base" / "figures")) == sorted(names)
    assert all(n in r.stdout for n in names)
    assert_pngs(runs / "base" / "figures", names)


def test_image_files_as_input(runs, tmp_path):
    from PIL import Image
    files = []
    for i, size in enumerate([(50, 40), (20, 20)]):
        files.append(str(tmp_path / f"img{i}.png"))
        Image.new("RGB", size, (30 + 100 * i, 120, 200)).save(files[-1])
    raw = visualize.load_image_files(files, 32)
    assert raw.shape == (2, 3, 32, 32) and raw.min() >= 0 and raw.max() <= 1
    assert torch.allclose(raw[1, :, 5, 5], torch.tensor([130, 120, 200]) / 255, atol=1e-2)
    out = tmp_path / "fig"
    written = visualize.main([str(runs / "sm" / "checkpoint.pt"), "--images", *files,
                              "--what", "proxy", "--out", str(out)])
    assert [os.path.basename(p) for p in written] == ["proxy_maps_layer2.png"]
    assert_pngs(out, ["proxy_maps_layer2.png"])


def test_image_folder_checkpoint_reads_its_val_split(tmp_path):
    """A checkpoint trained on --data DIR shows DIR/val images (resized, centre-cropped)."""
    for split, blue in (("train", 200), ("val", 100)):
        write_image_folder(tmp_path / "data", split, 4, lambda c, i: (40 * c + i, 90, blue))
    run = tmp_path / "run"
    train.main(["--data", str(tmp_path / "data"), "--preset", "cifar", "--dim", "32", "--depth",
                "1", "--heads", "2", "--batch-size", "8", "--workers", "0", "--amp", "none",
                "--out", str(run)])
    raw = visualize.load_dataset_images(
        torch.load(run / "checkpoint.pt", weights_only=True)["args"], [0, 7], 32)
    assert raw.shape == (2, 3, 32, 32)
    assert torch.allclose(raw[1, :, 16, 16], torch.tensor([43, 90, 100]) / 255, atol=1e-2)
    written = visualize.main([str(run / "checkpoint.pt"), "--indices", "7", "--what", "recon"])
    assert [os.path.basename(p) for p in written] == ["recon.png"]
    assert_pngs(run / "figures", ["recon.png"])


def test_bad_inputs_give_one_line_errors(runs, tmp_path):
    sm_ckpt = str(runs / "sm" / "checkpoint.pt")
    out = ["--out", str(tmp_path / "fig")]
    cases = [([str(tmp_path / "none.pt")], "no checkpoint at"),
             ([sm_ckpt, "--images", str(tmp_path / "none.png")], "no image file"),
             ([sm_ckpt, "--queries", "8,0"], "query 8,0 is out of range: the patch grid is 8x8"),
             ([sm_ckpt, "--queries", "64"], "query 64 is out of range"),
             ([sm_ckpt, "--queries", "1,2,3"], "neither 'row,col' nor a patch index"),
             ([sm_ckpt, "--queries", "a,b"], "neither"),
             ([sm_ckpt, "--layers", "3"], "layer 3 does not exist: the checkpoint has 2 blocks"),
             ([sm_ckpt, "--layers", "-3"], "layer -3 does not exist"),
             ([sm_ckpt, "--indices", "999"], "image index 999 is out of range"),
             ([sm_ckpt, "--what", "compare"], "needs --compare"),
             ([sm_ckpt, "--log", str(tmp_path / "none.jsonl")], "no training log at")]
    for argv, message in cases:
        with pytest.raises(SystemExit, match=message):
            visualize.main(argv + out)
    cfg = sm.Config(img_size=24, patch_size=4, dim=32, depth=2, heads=2, num_proxies=4)
    other = str(tmp_path / "other.pt")
    torch.save({"config": asdict(cfg), "model": sm.SemanticMIM(cfg).state_dict()}, other)
    with pytest.raises(SystemExit, match="cannot compare .*32 px .*4 px patches and 24 px"):
        visualize.main([sm_ckpt, "--compare", other] + out)
    assert not os.path.exists(tmp_path / "fig") or not os.listdir(tmp_path / "fig")


# ---------------------------------------------------------------------------- attention maps
def test_attention_weights_are_the_blocks_own_softmax():
    """Recomputed by hand from the block's LN1 and qkv weights: rows sum to 1, and equal."""
    model = tiny_model()
    imgs = torch.randn(2, 3, 32, 32)
    P, H, D = 4, 2, 32
    for layer in (1, 3):
        attn = visualize.main_attention(model, imgs, layer)            # (B, H, P+N, P+N)
        assert attn.shape == (2, H, P + 64, P + 64)
        assert torch.allclose(attn.sum(-1), torch.ones(2, H, P + 64), atol=1e-5)
        proxy, img = model.embed(imgs)
        x = torch.cat([proxy, img], 1)
        with torch.no_grad():
            for blk in model.blocks[:layer - 1]:
                x = blk(x)
            blk = model.blocks[layer - 1]
            h = blk.norm1(x)
            W, b = blk.attn.qkv.weight, blk.attn.qkv.bias
            q = (h @ W[:D].T + b[:D]).reshape(2, -1, H, D // H).transpose(1, 2)
            k = (h @ W[D:2 * D].T + b[D:2 * D]).reshape(2, -1, H, D // H).transpose(1, 2)
            expected = torch.softmax(q @ k.transpose(-2, -1) * (D // H) ** -0.5, dim=-1)
        assert torch.allclose(attn, expected, atol=1e-6)


def test_query_proxy_and_reduce_mean_maps_index_the_right_rows():
    P, H, N = 3, 2, 16
    attn = torch.rand(2, H, P + N, P + N).softmax(-1)
    queries = [5, 0, 15]
    maps = visualize.patch_query_maps(attn, queries, P)
    assert maps.shape == (2, 3, N)
    for j, q in enumerate(queries):
        assert torch.allclose(maps[:, j], attn.mean(1)[:, P + q, P:])
    prox = visualize.proxy_maps(attn, P)
    assert torch.allclose(prox[:, 1], (attn[:, 0, 1, P:] + attn[:, 1, 1, P:]) / 2)
    red = visualize.reduce_mean_maps(maps, prox)
    proxies_mean = attn[:, :, :P, P:].mean((1, 2))                       # over heads and proxies
    assert torch.allclose(red, maps - proxies_mean[:, None])
    # the mask stream: [MASK] queries' weights on the P proxies, the first P keys
    mask_attn = torch.rand(2, H, 7, P + 7).softmax(-1)
    w = visualize.mask_to_proxy_weights(mask_attn, P)
    assert w.shape == (2, 7, P) and torch.allclose(w[1, 4, 2], mask_attn[1, :, 4, 2].mean())


def test_upsample_puts_each_patch_value_on_its_pixels():
    maps = torch.arange(2 * 16, dtype=torch.float).reshape(2, 16)      # a 4x4 grid
    img = visualize.upsample(maps, 4, 3)
    assert img.shape == (2, 12, 12)
    assert img[1, 3:6, 6:9].eq(maps[1, 1 * 4 + 2]).all()               # patch row 1, col 2


def test_mask_to_proxy_comes_from_the_mask_stream_of_the_model():
    model = tiny_model()
    imgs = torch.randn(2, 3, 32, 32)
    ids_keep, ids_mask, pred, attn = visualize.masked_prediction(model, imgs, seed=3)
    again = visualize.masked_prediction(model, imgs, seed=3)
    assert torch.equal(again[1], ids_mask)                             # seeded masks
    assert pred.shape == (2, model.cfg.num_masked, 108)
    assert attn["mask"][0].shape == (2, 2, model.cfg.num_masked, 4 + model.cfg.num_masked)


# ---------------------------------------------------------------------------- reconstructions
def test_pixel_unnormalisation_with_target_statistics_recovers_the_image():
    model = tiny_model(target="pixel")
    imgs = torch.randn(2, 3, 32, 32) * 2 + 1
    g = torch.Generator().manual_seed(0)
    ids_keep, ids_mask = sm.random_masking(2, 64, 52, g, "cpu")
    pred = sm.gather_tokens(model.target(imgs), ids_mask)              # a perfect prediction
    patches = visualize.unnormalise_pixel_prediction(pred, imgs, ids_mask, 4)
    masked = visualize.masked_input(imgs, ids_keep, 4, fill=0.0)
    assert masked.eq(0).sum() == 2 * 52 * 48                           # the masked patches blank
    recon = visualize.paste_patches(masked, patches, ids_mask, 4)
    assert torch.allclose(recon, imgs, atol=1e-5)


def test_hog_glyphs_point_along_the_edges():
    """A vertical edge gives vertical glyphs and a horizontal edge horizontal ones."""
    img = torch.zeros(1, 3, 32, 32)
    img[..., 16:] = 1.0                                               # vertical edge at x = 16
    cells = visualize.hog_cells(sm.hog_target(img, 4), 8)              # (1, 16, 16, 9)
    dirs = visualize.edge_directions()
    dx, dy = dirs[cells[0, 5, 7].argmax()].abs()                       # a cell left of the edge
    assert dy > 0.9 and dx < 0.2
    dx, dy = dirs[visualize.hog_cells(sm.hog_target(img.transpose(-1, -2), 4), 8)[0, 7, 5]
                  .argmax()].abs()
    assert dx > 0.9 and dy < 0.2
    # the cell layout: patch (r, c) cell (i, j) is image cell (2r + i, 2c + j)
    t = torch.zeros(1, 64, 108)
    t[0, 9, 1 * 36 + 4 * 4 + 1 * 2 + 0] = 3.0                  # patch (1, 1): channel 1, bin 4,
    #                                                            cell (1, 0)
    assert visualize.hog_cells(t, 8)[0, 3, 2, 4] == 1.0                # channel mean


# ============================================================================ visualize.py --stats
# Figure 1 of the paper as numbers: hand-made attention tensors with known answers, then the CLI.
def stats_of(attn, P, grid, fg=None):
    """The statistics of one attention tensor (B, H, P+N, P+N), as --stats reports them."""
    values = visualize.layer_stats(attn, P, visualize.grid_distances(grid), fg)
    return visualize.means(visualize.sums_and_counts(values))


def test_stats_of_uniform_attention_are_the_uniform_reference():
    P, grid, N = 3, 4, 16
    attn = torch.full((2, 2, P + N, P + N), 1 / (P + N))
    fg = torch.zeros(2, N, dtype=torch.bool)
    fg[0, :5], fg[1, 3:14] = True, True
    got = stats_of(attn, P, grid, fg)
    by_hand = sum(math.dist(divmod(a, grid), divmod(b, grid))
                  for a in range(N) for b in range(N)) / N ** 2   # mean distance, self included
    assert got["distance"] == pytest.approx(by_hand)
    assert got["proxy_share"] == pytest.approx(P / (P + N))
    assert got["query_js"] == pytest.approx(0, abs=1e-6)
    assert got["proxy_js"] == pytest.approx(0, abs=1e-6)
    assert got["fg_consistency"] == pytest.approx(1) and got["bg_consistency"] == pytest.approx(1)
    assert visualize.uniform_reference(P, grid) == pytest.approx(got, abs=1e-6)


def test_stats_attention_on_the_query_itself_has_distance_zero_and_disjoint_maps_js_one():
    P, grid, N = 2, 4, 16
    attn = torch.zeros(1, 1, P + N, P + N)
    attn[0, 0, P:, P:] = torch.eye(N)                              # each patch on itself
    attn[0, 0, 0, P + 3] = attn[0, 0, 1, P + 9] = 1                # proxies on different patches
    got = stats_of(attn, P, grid)
    assert got["distance"] == 0 and got["proxy_share"] == 0
    assert got["query_js"] == pytest.approx(1) and got["proxy_js"] == pytest.approx(1)
    # a query that looks 1 row down and 2 columns right looks sqrt(5) patches away
    maps = torch.zeros(1, N, N)
    maps[0, 0, 1 * grid + 2] = 1
    dist = visualize.attention_distance(maps, visualize.grid_distances(grid))
    assert dist[0, 0] == pytest.approx(math.sqrt(5))
    # JS in bits: disjoint 1, equal 0, and a half overlap by hand: H(.75, .25) - (0 + 1) / 2
    p, q, r = torch.tensor([[1., 0, 0], [0, 1, 0], [.5, .5, 0]])
    assert visualize.js_divergence(p, q) == pytest.approx(1)
    assert visualize.js_divergence(p, p) == 0
    h = -(.75 * math.log2(.75) + .25 * math.log2(.25))
    assert visualize.js_divergence(p, r) == pytest.approx(h - 0.5)
    # two equal maps and one disjoint: pairs 0, 1, 1
    assert visualize.mean_pairwise_js(torch.stack([p, p, q])[None]) == pytest.approx(2 / 3)


def test_stats_pairwise_js_in_blocks_equals_the_double_loop():
    torch.manual_seed(0)
    maps = torch.randn(3, 6, 10).softmax(-1)
    loop = torch.tensor([sum(visualize.js_divergence(maps[b, i], maps[b, j])
                             for i in range(6) for j in range(6) if i != j) / 30
                         for b in range(3)])
    for budget in (1, 1 << 22):                                    # one row per block, all rows
        assert torch.allclose(visualize.mean_pairwise_js(maps, budget), loop, atol=1e-6)
    assert visualize.mean_pairwise_js(maps[:, :1]).isnan().all()  # one row: no pair


def test_stats_proxy_share_is_the_weight_on_the_proxies_before_renormalising():
    P, grid, N = 2, 2, 4
    attn = torch.zeros(1, 2, P + N, P + N)
    attn[0, :, :, 0] = 1                                           # both heads on proxy 0
    assert visualize.proxy_share(attn, P).eq(1).all()
    attn[0, 1] = 0
    attn[0, 1, :, P + 3] = 1                                       # head 1 on patch 3 instead
    got = stats_of(attn, P, grid)
    assert got["proxy_share"] == pytest.approx(0.5)
    maps = visualize.renormalised_maps(attn, P)                    # head mean, then renormalise
    assert torch.equal(maps[0], torch.eye(N)[[3] * (P + N)])
    assert got["distance"] == pytest.approx(sum(math.dist(divmod(q, 2), (1, 1))
                                                for q in range(N)) / N)
    assert got["query_js"] == 0                                    # every query on patch 3


def test_stats_region_consistency_is_mass_on_own_region_over_its_share():
    grid, N = 4, 16
    fg = torch.zeros(3, N, dtype=torch.bool)
    fg[0, :4] = True                                  # image 1: no foreground; image 2: all of it
    fg[2] = True
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


def test_stats_identical_proxies_have_diversity_zero_and_one_proxy_none():
    torch.manual_seed(0)
    P, grid, N = 3, 4, 16
    attn = torch.randn(2, 2, P + N, P + N).softmax(-1)
    attn[:, :, 1:P] = attn[:, :, :1]                               # every proxy as proxy 0
    assert stats_of(attn, P, grid)["proxy_js"] == pytest.approx(0, abs=1e-6)
    attn = torch.randn(2, 2, 1 + N, 1 + N).softmax(-1)
    assert stats_of(attn, 1, grid)["proxy_js"] is None


def test_stats_foreground_is_the_raw_mean_intensity_of_a_patch():
    raw = torch.zeros(2, 3, 8, 8)                                  # 2x2 patches of 4 px
    raw[0, :, 0:4, 4:8] = 0.3                                      # patch 1: mean 0.3
    raw[0, 0, 4:8, 0:4] = 0.25                                     # patch 2: one channel, 0.083
    fg = visualize.foreground_patches(raw, 4, 0.1)
    assert fg.tolist() == [[False, True, False, False], [False] * 4]


def test_stats_cli_prints_the_table_and_writes_json_beside_the_checkpoint(runs, tmp_path, capsys,
                                                                        monkeypatch):
    ckpt = runs / "sm" / "checkpoint.pt"
    out = tmp_path / "fig"
    written = visualize.main([str(ckpt), "--stats", "--out", str(out)])
    text = capsys.readouterr().out
    assert [os.path.basename(p) for p in written] == ["attn_stats.png"]   # no other figure
    assert os.listdir(out) == ["attn_stats.png"]
    assert_pngs(out, ["attn_stats.png"])
    assert "the synthetic test split has 32 images: using all of them" in text
    lines = text.splitlines()
    assert next(s for s in lines if s.startswith("layer")).split() == [
        "layer", "proxy", "share", "distance", "query", "JS", "fg", "region", "bg", "region",
        "proxy", "JS"]
    rows = {s.split()[0]: s.split()[1:] for s in lines
            if s.split() and s.split()[0] in ("1", "2", "uniform")}
    assert sorted(rows) == ["1", "2", "uniform"] and all(len(v) == 6 for v in rows.values())

    report = json.load(open(runs / "sm" / "attn_stats.json"))
    assert report["command"] == f"python visualize.py {ckpt} --stats --out {out}"
    assert (report["images"]["dataset"], report["images"]["count"]) == ("synthetic", 32)
    assert report["foreground_threshold"] == visualize.FOREGROUND_THRESHOLD["synthetic"]
    assert set(report["statistics"]) == set(visualize.STATS)
    (entry,) = report["models"]
    assert entry["name"] == "SemanticMIM" and entry["config"]["num_proxies"] == 4
    assert entry["uniform"] == pytest.approx(visualize.uniform_reference(4, 8))
    assert [layer["layer"] for layer in entry["layers"]] == [1, 2]
    for layer, row in zip(entry["layers"], (rows["1"], rows["2"])):
        assert set(layer) == set(visualize.STATS) | {"layer"}
        assert 0 < layer["proxy_share"] < 1 and 0 < layer["distance"] < math.dist((0, 0), (7, 7))
        assert 0 <= layer["query_js"] <= 1 and 0 <= layer["proxy_js"] <= 1
        assert layer["fg_consistency"] > 0 and layer["bg_consistency"] > 0
        assert [float(v) for v in row] == pytest.approx(
            [layer[k] for k in visualize.STATS], abs=0.006)         # the table prints the JSON

    # the numbers are the definitions, written plainly, on the 32 test images
    model, c = visualize.load_model(str(ckpt))
    n, get = visualize.test_split(c["args"], 32)
    with torch.no_grad():
        attn = visualize.main_attention(model, visualize.normalise(get(range(n)), c), 2)
    P, mean_attn = 4, attn.mean(1)                                 # (B, P+N, P+N)
    maps = mean_attn[:, P:, P:] / mean_attn[:, P:, P:].sum(-1, keepdim=True)
    last = entry["layers"][1]
    assert last["proxy_share"] == pytest.approx(float(mean_attn[:, P:, :P].sum(-1).mean()))
    assert last["distance"] == pytest.approx(
        float((maps * visualize.grid_distances(8)).sum(-1).mean()), rel=1e-5)
    # batches add up to the same numbers as one batch
    monkeypatch.setattr(visualize, "stats_chunk", lambda cfg: 7)
    batched = visualize.attention_stats([(model, c, "x")], get, n, 0.5)[0]
    for layer, again in zip(entry["layers"], batched):
        assert again == pytest.approx({k: v for k, v in layer.items() if k != "layer"}, rel=1e-5)


def test_stats_compare_two_checkpoints_side_by_side_and_attn_stats_png(runs, tmp_path, capsys):
    """Three models: SemanticMIM, the one-switch baseline and a 3-block baseline with the
    authors' MaskFeat settings (one proxy, mask ratio 0.4), named apart by P and ratio."""
    torch.manual_seed(0)
    cfg = sm.Config(dim=32, depth=3, heads=2, num_proxies=1, mask_ratio=0.4, baseline=True)
    third = tmp_path / "maskfeat.pt"
    torch.save({"config": asdict(cfg), "model": sm.SemanticMIM(cfg).state_dict(),
                "args": {"dataset": "synthetic"}}, third)
    out = tmp_path / "fig"
    written = visualize.main([str(runs / "sm" / "checkpoint.pt"), "--stats", "--stats-images",
                              "8", "--compare", str(runs / "base" / "checkpoint.pt"), str(third),
                              "--what", "compare", "--indices", "0", "--out", str(out)])
    names = ["attn_stats.png", "compare_attn_layer2.png"]         # layers -1: 2, 2 and 3
    assert sorted(os.path.basename(p) for p in written) == names
    assert_pngs(out, names)
    text = capsys.readouterr().out
    assert "A = SemanticMIM: " in text and "B = baseline P4 m0.8: " in text
    assert "C = baseline P1 m0.4: " in text
    lines = text.splitlines()
    head = lines.index(next(s for s in lines if s.startswith("layer")))
    assert lines[head + 1].split() == ["A", "B", "C"] * 6
    row3 = lines[head + 4].split()                                 # block 3: only model C
    assert row3[0] == "3" and row3[1:3] == ["-", "-"] and row3[3] != "-"
    assert row3[-3:] == ["-", "-", "-"]                            # proxy JS: P 1 has none
    report = json.load(open(runs / "sm" / "attn_stats.json"))
    assert report["images"]["count"] == 8
    assert [m["name"] for m in report["models"]] == ["SemanticMIM", "baseline P4 m0.8",
                                                     "baseline P1 m0.4"]
    assert [len(m["layers"]) for m in report["models"]] == [2, 2, 3]
    assert all(layer["proxy_js"] is None for layer in report["models"][2]["layers"])
    assert [m["uniform"]["proxy_share"] for m in report["models"]] == pytest.approx(
        [4 / 68, 4 / 68, 1 / 65])


def test_stats_skip_region_consistency_without_a_black_background(runs, tmp_path, capsys,
                                                                 monkeypatch):
    """A data set of natural images (here CIFAR-10, its images stood in by synthetic ones):
    no region columns, a note, and a null threshold."""
    c = torch.load(runs / "sm" / "checkpoint.pt", weights_only=True)
    c["args"] = {**c["args"], "dataset": "cifar10"}
    torch.save(c, tmp_path / "cifar.pt")
    real = visualize.test_split
    monkeypatch.setattr(visualize, "test_split", lambda args, size, root=None: real(
        {"dataset": "synthetic", "data": None, "synthetic_size": 128}, size))
    visualize.main([str(tmp_path / "cifar.pt"), "--stats", "--stats-images", "5",
                    "--out", str(tmp_path / "fig")])
    text = capsys.readouterr().out
    assert "note: no region consistency: cifar10 images have no plain background" in text
    assert "fg region" not in text
    report = json.load(open(tmp_path / "attn_stats.json"))
    assert report["foreground_threshold"] is None
    assert set(report["models"][0]["layers"][0]) == set(visualize.STATS) - {
        "fg_consistency", "bg_consistency"} | {"layer"}


def test_stats_bad_flags_give_one_line_errors(runs, tmp_path):
    ckpt = str(runs / "sm" / "checkpoint.pt")
    cases = [(["--stats-images", "5"], "^error: --stats-images needs --stats$"),
             (["--stats", "--compare", ckpt, ckpt, ckpt],
              "^error: --compare takes one or two checkpoints, got 3$")]
    for argv, message in cases:
        with pytest.raises(SystemExit, match=message):
            visualize.main([ckpt, *argv, "--out", str(tmp_path / "fig")])
    assert not os.path.exists(tmp_path / "fig")
