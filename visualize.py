"""Pictures of a train.py checkpoint (attention, reconstructions, loss curve); attention as numbers.

    python visualize.py out/checkpoint.pt                    # every figure, into out/figures/
    python visualize.py out/checkpoint.pt --compare base/checkpoint.pt --what compare
    python visualize.py out/checkpoint.pt --images cat.jpg --queries 3,4 0 --layers 2 -1
    python visualize.py out/checkpoint.pt --stats --compare base/checkpoint.pt mf/checkpoint.pt

The model is rebuilt from the config stored in the checkpoint; the images are either files
(resized and centre-cropped like the test split of an image folder) or indices into the test split
of the checkpoint's data set. All maps are computed by the small pure functions of sections 2-4
(tensors in, tensors or numbers out) and only drawn in section 6.

Attention maps are the paper's attention pictures (its Figure 1; the authors draw them with
attn_vis.py of github.com/yyk-wew/SemanticMIM): head-averaged softmax weights of a main block on
[PROXY; all N patches] of unmasked images (the downstream path, model.features), restricted to the
patch keys and NOT renormalised: the weight a query puts on the proxies is left out of its map
(the figures print it). --stats turns Figure 1 into numbers per main block (section 3): the same
head-averaged maps, renormalised over the patch keys, summarised over the first test images.
Shapes: B images, N patches on an h x w grid, P proxies, Q query patches, Nm masked patches.
"""
import argparse
import json
import math
import os
import shlex
import sys
import textwrap
from dataclasses import asdict

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

import common  # noqa: E402
import data  # noqa: E402
import semanticmim as sm  # noqa: E402

FIGURES = ("query", "reduce_mean", "proxy", "mask_proxy", "recon", "curve", "compare")
DPI, PANEL = 100, 1.6            # dots per inch, inches per image panel


# --------------------------------------------------------------------------------------------
# 1. Inputs: checkpoints and images (raw images are floats in [0, 1], (B, 3, S, S))
# --------------------------------------------------------------------------------------------
def load_model(path):
    """(model in eval mode, checkpoint dict); a one-line SystemExit for a missing or bad file."""
    try:
        model, ckpt = sm.load_checkpoint(path, map_location="cpu")
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    return model.eval(), ckpt


def load_image_files(paths, size):
    """Image files -> raw (B, 3, size, size): resized and centre-cropped as train.py's test
    transform of image folders, not normalised."""
    from PIL import Image
    to_tensor = data.folder_transform(size, False, (0.0,) * 3, (1.0,) * 3)  # identity Normalize
    imgs = []
    for path in paths:
        if not os.path.isfile(path):
            raise SystemExit(f"error: no image file {path}")
        try:
            imgs.append(to_tensor(Image.open(path).convert("RGB")))   # (3, size, size)
        except OSError as e:
            raise SystemExit(f"error: cannot read image {path} ({e})") from None
    return torch.stack(imgs)                                # (B, 3, size, size)


def test_split(ckpt_args, size, root=None):
    """The test split of the checkpoint's data set: (its size n, get) where get(indices) gives
    those images raw, (B, 3, size, size). Small data sets are read once and kept in memory."""
    name, root = ckpt_args["dataset"], root or ckpt_args["data"]
    if name == "imagefolder":
        ds = data.SeededFolder(data.find_image_folder(root, "val"), data.folder_transform(
            size, False, (0.0,) * 3, (1.0,) * 3), seed=0)   # the test transform: no randomness
        n, one = len(ds), (lambda i: data.readable(ds[(0, i)])[0])
    else:
        images, _ = data.load_memory_dataset(name, root, False, size,
                                              ckpt_args.get("synthetic_size", 1024))
        n, one = len(images), (lambda i: images[i])

    def get(indices):
        imgs = torch.stack([one(i) for i in indices])       # (B, C, h, w), uint8 or [0, 1]
        return data.to_model_input(imgs, size, (0.0,) * 3, (1.0,) * 3)  # (B, 3, size, size)
    return n, get


def load_dataset_images(ckpt_args, indices, size, root=None):
    """Images `indices` of the test split of the checkpoint's data set -> raw (B, 3, size, size)."""
    n, get = test_split(ckpt_args, size, root)
    bad = [i for i in indices if not 0 <= i < n]
    if bad:
        raise SystemExit(f"error: image index {bad[0]} is out of range: the "
                         f"{ckpt_args['dataset']} test split has {n} images (choose 0..{n - 1})")
    return get(indices)                                     # (B, 3, size, size)


def normalise(raw, ckpt):
    """Raw images -> model input, with the mean/std of the checkpoint's data set."""
    mean, std = data.MEAN_STD[ckpt["args"]["dataset"]]
    return data.to_model_input(raw, raw.shape[-1], mean, std)  # (B, 3, S, S)


def denormalise(x, ckpt):
    """Model-space images (B, 3, S, S) -> raw [0, 1] images for display."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1)
                 for v in data.MEAN_STD[ckpt["args"]["dataset"]])  # (1, 3, 1, 1) each
    return (x * std + mean).clamp(0, 1)


def parse_queries(specs, grid):
    """'r,c' or a patch index -> row-major patch indices; default the centre and a corner."""
    if not specs:
        return [(grid // 2) * grid + grid // 2, 0]
    out = []
    for s in specs:
        try:
            rc = [int(v) for v in s.split(",")]
        except ValueError:
            rc = []
        if len(rc) not in (1, 2):
            raise SystemExit(f"error: query {s!r} is neither 'row,col' nor a patch index")
        if len(rc) == 2 and all(0 <= v < grid for v in rc):
            out.append(rc[0] * grid + rc[1])
        elif len(rc) == 1 and 0 <= rc[0] < grid * grid:
            out.append(rc[0])
        else:
            raise SystemExit(f"error: query {s} is out of range: the patch grid is {grid}x{grid} "
                             f"(rows and columns 0..{grid - 1}, indices 0..{grid * grid - 1})")
    return out


def resolve_layers(layers, depth):
    """1-based layer numbers, negative ones counted from the end (-1 = the last block)."""
    out = []
    for layer in layers:
        resolved = layer if layer > 0 else depth + 1 + layer
        if not 1 <= resolved <= depth:
            raise SystemExit(f"error: layer {layer} does not exist: the checkpoint has {depth} "
                             f"blocks (choose 1..{depth}, or -1 for the last)")
        out.append(resolved)
    return out


def query_name(q, grid):
    return f"r{q // grid}c{q % grid}"


# --------------------------------------------------------------------------------------------
# 2. Attention maps: pure functions on tensors
# --------------------------------------------------------------------------------------------
def main_attention(model, imgs, layer):
    """Per-head softmax weights of main block `layer` (1-based) on [PROXY; all N patches] of
    normalised images: (B, H, P+N, P+N), rows queries, columns keys, proxies first."""
    return model.features(imgs, layer, return_attn=True)[2][-1]


def patch_query_maps(attn, queries, P):
    """attn (B, H, P+N, P+N), Q patch indices -> (B, Q, N): each query's row averaged over
    heads, restricted to the patch keys, not renormalised."""
    rows = attn[:, :, P + torch.as_tensor(queries), P:]     # (B, H, Q, N)
    return rows.mean(1)                                     # (B, Q, N)


def proxy_maps(attn, P):
    """What each proxy gathers: its row over the patch keys, averaged over heads, (B, P, N)."""
    return attn[:, :, :P, P:].mean(1)                       # (B, P, N)


def reduce_mean_maps(query_maps, proxies):
    """The "reduce mean" of the authors' attn_vis.py: each patch-query map (B, Q, N) minus the
    mean of the proxy maps (B, P, N) over proxies (and, as proxy_maps already averaged them,
    heads), which removes the part of attention that every query shares."""
    return query_maps - proxies.mean(1, keepdim=True)       # (B, Q, N)


def mask_to_proxy_weights(mask_attn, P):
    """Mask-stream weights (B, H, Nm, P+Nm), proxies first among the keys -> (B, Nm, P): the
    head-averaged weight each [MASK] query puts on each proxy (not renormalised)."""
    return mask_attn[..., :P].mean(1)                       # (B, Nm, P)


def upsample(maps, grid, p):
    """Patch maps (..., N) -> (..., grid*p, grid*p): each value repeated over its patch."""
    x = maps.reshape(*maps.shape[:-1], grid, grid)          # (..., h, w)
    return x.repeat_interleave(p, -2).repeat_interleave(p, -1)  # (..., H, W)


def scatter_patches(values, ids, num_patches, fill=float("nan")):
    """Per-image values at patches ids: (B, K, ...) -> (B, N, ...), `fill` elsewhere."""
    out = values.new_full((values.shape[0], num_patches, *values.shape[2:]), fill)  # (B, N, ...)
    idx = ids.view(*ids.shape, *[1] * (values.ndim - 2)).expand_as(values)          # (B, K, ...)
    return out.scatter(1, idx, values)                      # (B, N, ...)


# --------------------------------------------------------------------------------------------
# 3. Attention statistics (Figure 1 of the paper as numbers): pure functions on tensors
# --------------------------------------------------------------------------------------------
# Every statistic is computed from the head-averaged attention of a main block on unmasked images,
# as the pictures; a query's "map" is its row over the N patch keys renormalised to sum 1 (the
# weight on the proxies is measured apart, as the proxy share). Each function returns per-item
# values, NaN where an item does not count; a statistic is the mean of its non-NaN values over
# all images (so batches add up exactly).
STATS = {  # name: (short label, what it is)
    "proxy_share": ("proxy share", "weight a patch query puts on the P proxies (before "
                    "renormalising)"),
    "distance": ("distance", "mean attention distance (Dosovitskiy et al. 2021), in patches: "
                 "sum over the patch keys of map x grid distance from the query"),
    "query_js": ("query JS", "query dependence: mean Jensen-Shannon divergence (bits, 0..1) "
                 "between the maps of two different query patches of an image (0 = every "
                 "query sees the same map)"),
    "fg_consistency": ("fg region", "foreground queries: mass of the map on the foreground / "
                       "the foreground's share of the patches (1 = chance)"),
    "bg_consistency": ("bg region", "background queries: mass of the map on the background / "
                       "the background's share of the patches (1 = chance)"),
    "proxy_js": ("proxy JS", "proxy diversity: mean Jensen-Shannon divergence (bits, 0..1) "
                 "between the maps of two different proxies (0 = all proxies gather the same "
                 "thing; '-' for fewer than 2 proxies)"),
}
# A patch is foreground when its raw mean intensity (over its pixels and channels, of the [0, 1]
# image before normalisation) is above the threshold of its data set. Fashion-MNIST garments lie
# on an exactly black background, so a background patch's mean is 0 (up to the ringing of the
# resize to the model's size); 0.1, a tenth of full intensity, keeps every patch that holds a
# real piece of the garment and drops those that only graze its edge. The synthetic images have
# no background: 0.5, their mean intensity, splits each smooth colour template into its brighter
# and darker part, regions of similar colour, which is enough to exercise the statistic. Other
# data sets (natural images) have no background a threshold can find: no region consistency.
FOREGROUND_THRESHOLD = {"fashion_mnist": 0.1, "synthetic": 0.5}


def foreground_patches(raw, p, threshold):
    """Raw [0, 1] images (B, 3, S, S) -> (B, N) bool: patches whose mean intensity over their
    pixels and channels is above `threshold`."""
    return sm.patchify(raw, p).mean(-1) > threshold         # (B, N)


def grid_distances(grid):
    """(N, N) Euclidean distances, in patches, between the patches of a grid x grid image
    (row-major order, as the patch tokens)."""
    r, c = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")  # (h, w) each
    pos = torch.stack([r.flatten(), c.flatten()], 1).float()  # (N, 2)
    return (pos[:, None] - pos[None]).norm(dim=-1)          # (N, N)


def proxy_share(attn, P):
    """attn (B, H, P+N, P+N) -> (B, N): the weight each patch query puts on the P proxy keys,
    averaged over heads, before any renormalising."""
    return attn[:, :, P:, :P].sum(-1).mean(1)               # (B, N)


def renormalised_maps(attn, P):
    """attn (B, H, P+N, P+N) -> (B, P+N, N): every query's row (proxies first) averaged over
    heads, restricted to the patch keys and renormalised to sum 1."""
    rows = attn[..., P:].mean(1)                            # (B, P+N, N)
    return rows / rows.sum(-1, keepdim=True)                # (B, P+N, N)


def attention_distance(maps, dist):
    """Mean attention distance of each patch query: maps (B, N, N) of the N patch queries, dist
    (N, N) from grid_distances -> (B, N), the map-weighted distance to the keys, in patches."""
    return (maps * dist).sum(-1)                            # (B, N)


def entropy_bits(p):
    """Entropy in bits of distributions over the last dim (0 log 0 = 0): (..., N) -> (...)."""
    return -torch.xlogy(p, p).sum(-1) / math.log(2)         # (...)


def js_divergence(p, q):
    """Jensen-Shannon divergence in bits, so in [0, 1], of distributions over the last dim:
    (..., N) twice -> (...). 0 for equal maps, 1 for maps on disjoint keys."""
    return entropy_bits((p + q) / 2) - (entropy_bits(p) + entropy_bits(q)) / 2  # (...)


def mean_pairwise_js(maps, budget=1 << 22):
    """maps (B, K, N) -> (B,): per image, the mean JS divergence over all pairs of two distinct
    rows; NaN when K < 2. Blocks of rows keep the (B, rows, K, N) intermediate under `budget`
    elements."""
    B, K, N = maps.shape
    if K < 2:
        return maps.new_full((B,), float("nan"))            # (B,)
    h = entropy_bits(maps)                                  # (B, K)
    step = max(1, budget // (B * K * N))
    total = torch.zeros(B, dtype=torch.float64)             # (B,)
    for i in range(0, K, step):
        rows = torch.arange(i, min(i + step, K))            # (r,)
        mid = (maps[:, rows, None] + maps[:, None]) / 2     # (B, r, K, N)
        js = entropy_bits(mid) - (h[:, rows, None] + h[:, None]) / 2  # (B, r, K)
        js[:, torch.arange(len(rows)), rows] = 0            # a row with itself is no pair
        total += js.clamp(0, 1).sum((1, 2)).double()        # (B,)
    return (total / (K * (K - 1))).to(maps.dtype)           # (B,)


def region_consistency(maps, fg):
    """maps (B, N, N) of the N patch queries, fg (B, N) bool -> (B, N): for each query, the mass
    of its map on its own region (foreground or background) divided by that region's share of
    the image's patches; 1 = chance. NaN where the query's region covers the whole image (the
    ratio is 1 by construction there); an empty region has no queries, so it never counts."""
    own = torch.where(fg[:, :, None], fg[:, None, :], ~fg[:, None, :])  # (B, N, N): same region
    mass = (maps * own).sum(-1)                             # (B, N)
    share = own.float().mean(-1)                            # (B, N)
    return (mass / share).masked_fill(share == 1, float("nan"))  # (B, N)


def layer_stats(attn, P, dist, fg=None):
    """All statistics of one main block's attention (B, H, P+N, P+N) on unmasked images, from
    head-averaged maps: name -> per-item values, (B, N) per patch query or (B,) per image, NaN
    where an item does not count. fg (B, N) bool, or None for no region consistency."""
    maps = renormalised_maps(attn, P)                       # (B, P+N, N)
    patch, prox = maps[:, P:], maps[:, :P]                  # (B, N, N), (B, P, N)
    out = {"proxy_share": proxy_share(attn, P),             # (B, N)
           "distance": attention_distance(patch, dist),     # (B, N)
           "query_js": mean_pairwise_js(patch)}             # (B,)
    if fg is not None:
        region = region_consistency(patch, fg)              # (B, N)
        out["fg_consistency"] = region.masked_fill(~fg, float("nan"))  # (B, N)
        out["bg_consistency"] = region.masked_fill(fg, float("nan"))   # (B, N)
    out["proxy_js"] = mean_pairwise_js(prox)                # (B,)
    return out


def sums_and_counts(values):
    """name -> per-item values -> name -> (sum, count) over the non-NaN items."""
    out = {}
    for name, v in values.items():
        ok = ~v.isnan()
        out[name] = (float(v[ok].double().sum()), int(ok.sum()))
    return out


def add_totals(a, b):
    """Two name -> (sum, count) dicts added."""
    return {k: (a[k][0] + b[k][0], a[k][1] + b[k][1]) for k in a}


def means(totals):
    """name -> (sum, count) -> name -> mean, None where nothing counted."""
    return {k: s / n if n else None for k, (s, n) in totals.items()}


def uniform_reference(P, grid):
    """The statistics of attention that has no structure at all: every query spreads its weight
    evenly over all P+N keys of a grid x grid image (proxy share P/(P+N), the grid's mean
    distance, query dependence and proxy diversity 0, region consistency 1 for any region; half
    the patches are taken as foreground)."""
    N = grid * grid
    attn = torch.full((1, 1, P + N, P + N), 1 / (P + N))    # (1, 1, P+N, P+N)
    fg = (torch.arange(N) < N // 2)[None]                   # (1, N)
    return means(sums_and_counts(layer_stats(attn, P, grid_distances(grid), fg)))


# --------------------------------------------------------------------------------------------
# 4. Reconstructions and HOG glyphs: pure functions on tensors
# --------------------------------------------------------------------------------------------
def unnormalise_pixel_prediction(pred, imgs, ids_mask, p):
    """Predicted normalised pixels (B, Nm, p*p*3) -> patches in the model's input space, using
    each masked patch's TRUE mean and std: the inverse of sm.pixel_target with the target's own
    statistics (the model never predicts them)."""
    true = sm.gather_tokens(sm.patchify(imgs, p), ids_mask)  # (B, Nm, p*p*3)
    mean, std = sm.patch_stats(true)                        # (B, Nm, 1) each
    return pred * std + mean                                # (B, Nm, p*p*3)


def paste_patches(imgs, patches, ids, p):
    """imgs (B, 3, S, S) with patches (B, K, p*p*3) written at the patch indices ids (B, K)."""
    x = sm.patchify(imgs, p)                                # (B, N, p*p*3)
    x = x.scatter(1, ids.unsqueeze(-1).expand_as(patches), patches)  # (B, N, p*p*3)
    return sm.unpatchify(x, p)                              # (B, 3, S, S)


def masked_input(raw, ids_keep, p, fill=0.5):
    """Raw images with every patch that is not visible to the model set to `fill`."""
    x = sm.patchify(raw, p)                                 # (B, N, p*p*3)
    visible = scatter_patches(torch.ones_like(ids_keep, dtype=torch.bool), ids_keep,
                              x.shape[1], False)            # (B, N)
    return sm.unpatchify(torch.where(visible[..., None], x, fill), p)  # (B, 3, S, S)


def hog_cells(t, grid, nbins=9):
    """HOG targets or predictions (B, N, 3*9*2*2), order (channel, bin, cell_row, cell_col) ->
    channel-averaged histograms on the image's cell grid, (B, 2*grid, 2*grid, 9)."""
    B = t.shape[0]
    x = t.reshape(B, grid, grid, 3, nbins, 2, 2).mean(3)    # (B, h, w, 9, 2, 2)
    x = x.permute(0, 1, 4, 2, 5, 3)                         # (B, h, 2, w, 2, 9)
    return x.reshape(B, 2 * grid, 2 * grid, nbins)          # (B, 2h, 2w, 9)


def edge_directions(nbins=9):
    """(nbins, 2) unit vectors (dx right, dy down) drawn for each HOG bin: the edge orientation,
    perpendicular to the gradient. sm.hog_target bins theta = atan2(gx, gy), so the gradient
    points along (sin theta, cos theta) (up to sign) and the edge along (cos theta, -sin theta);
    each bin is drawn at its centre angle."""
    theta = (torch.arange(nbins) + 0.5) * math.pi / nbins   # (nbins,)
    return torch.stack([theta.cos(), -theta.sin()], 1)      # (nbins, 2)


def read_log(path):
    """train.py's log.jsonl -> list of records {"step", "loss", "lr", ...}."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------------------------
# 5. Running a model on the images
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def attention_maps(model, imgs, layer, queries):
    """Everything the attention figures draw for one model and layer, as (B, ., N) tensors."""
    P = model.cfg.num_proxies
    attn = main_attention(model, imgs, layer)               # (B, H, P+N, P+N)
    q = patch_query_maps(attn, queries, P)                  # (B, Q, N)
    prox = proxy_maps(attn, P)                              # (B, P, N)
    return {"query": q, "proxy": prox, "on_proxies": 1 - q.sum(-1),  # (B, Q): rows sum to 1
            "reduce_mean": reduce_mean_maps(q, prox)}       # (B, Q, N); NaN without proxies


@torch.no_grad()
def masked_prediction(model, imgs, seed):
    """One seeded mask per image and the model's prediction with its attention weights."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    ids_keep, ids_mask = sm.random_masking(imgs.shape[0], cfg.num_patches, cfg.num_masked, g,
                                           "cpu", cfg.independent_mask)  # (B, Nv), (B, Nm)
    pred, attn = model.predict(imgs, ids_keep, ids_mask, return_attn=True)  # (B, Nm, T)
    return ids_keep, ids_mask, pred, attn


def stats_chunk(cfg, budget=1 << 26):
    """Images per batch of the statistics: 100, fewer when the per-head weights of all blocks of
    a batch would pass `budget` elements (256 MiB in fp32)."""
    per_image = cfg.depth * cfg.heads * (cfg.num_proxies + cfg.num_patches) ** 2
    return max(1, min(100, budget // per_image))


@torch.no_grad()
def batch_stats(model, ckpt, raw, threshold):
    """Raw images (B, 3, S, S) through the main stack of one model -> per main block, name ->
    (sum, count) of the statistics of section 3. threshold: foreground threshold or None."""
    cfg = model.cfg
    fg = None if threshold is None else foreground_patches(raw, cfg.patch_size, threshold)  # (B, N)
    dist = grid_distances(cfg.img_size // cfg.patch_size)   # (N, N)
    imgs = normalise(raw, ckpt)                             # (B, 3, S, S)
    attns = model.features(imgs, cfg.depth, return_attn=True)[2]  # depth x (B, H, P+N, P+N)
    return [sums_and_counts(layer_stats(a, cfg.num_proxies, dist, fg)) for a in attns]


def attention_stats(runs, get, n, threshold):
    """The statistics of every main block of each (model, checkpoint, name) of `runs` over the
    images get(range(n)), read in batches: per run, a list (block 1..depth) of name -> mean."""
    totals = [None] * len(runs)
    chunk = min(stats_chunk(m.cfg) for m, _, _ in runs)
    for start in range(0, n, chunk):
        raw = get(range(start, min(n, start + chunk)))      # (b, 3, S, S)
        for j, (model, ckpt, _) in enumerate(runs):
            new = batch_stats(model, ckpt, raw, threshold)
            totals[j] = new if totals[j] is None else list(map(add_totals, totals[j], new))
    return [[means(t) for t in per_run] for per_run in totals]


# --------------------------------------------------------------------------------------------
# 6. Drawing
# --------------------------------------------------------------------------------------------
def hwc(img):
    """(3, H, W) tensor -> (H, W, 3) numpy for imshow."""
    return img.permute(1, 2, 0).numpy()


def grid_figure(rows, cols, title=None):
    """rows x cols image panels without ticks, at most 12 inches wide."""
    size = min(PANEL, 12 / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows + 0.3 * bool(title)),
                             squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=8)
    return fig, axes


def save(fig, out, name, written):
    path = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    written.append(path)


def overlay(ax, raw, heat, title, cmap="jet", query=None, p=None, grid=None, centred=False):
    """Raw image (3, H, W) with a heat map (H, W) on top and the query patch boxed."""
    ax.imshow(hwc(raw))
    lim = float(heat.abs().max()) if centred else None
    ax.imshow(heat.numpy(), cmap=cmap, alpha=0.55, vmin=-lim if centred else None,
              vmax=lim if centred else None)
    if query is not None:
        r, c = divmod(query, grid)
        ax.add_patch(Rectangle((c * p - 0.5, r * p - 0.5), p, p, fill=False, color="w", lw=1.5,
                               clip_on=False))
    ax.set_title(title, fontsize=7)


def draw_hog(ax, base, cells, show, cell, vmax):
    """HOG glyphs over a base image: in each cell where `show` (2h, 2w) is true, one line per bin
    along that bin's edge orientation, as long as the cell times value / vmax."""
    ax.imshow(hwc(base))
    i, j = np.nonzero(show.numpy())                         # cells to draw
    centre = np.stack([(j + 0.5) * cell - 0.5, (i + 0.5) * cell - 0.5], -1)  # (K, 2) (x, y)
    half = 0.5 * cell * (cells.clamp(0, vmax) / vmax).numpy()[i, j]  # (K, 9)
    d = edge_directions(cells.shape[-1]).numpy()            # (9, 2)
    offset = half[..., None] * d                            # (K, 9, 2)
    segs = np.stack([centre[:, None] - offset, centre[:, None] + offset], 2)  # (K, 9, 2, 2)
    ax.add_collection(LineCollection(segs.reshape(-1, 2, 2), colors="yellow", linewidths=0.8))


def figure_query_maps(raw, maps, queries, layer, cfg, out, written):
    """attn_query_<rc>_layer<L>.png for each query: its map over every image."""
    p, grid, B = cfg.patch_size, cfg.img_size // cfg.patch_size, raw.shape[0]
    heat = upsample(maps["query"], grid, p)                 # (B, Q, H, W)
    for k, q in enumerate(queries):
        name = query_name(q, grid)
        fig, axes = grid_figure(1, B, f"layer {layer}, query patch {name}: head-mean attention "
                                      f"over patch keys (not renormalised)")
        for b in range(B):
            overlay(axes[0, b], raw[b], heat[b, k],
                    f"image {b} (on proxies {maps['on_proxies'][b, k]:.2f})", query=q, p=p,
                    grid=grid)
        save(fig, out, f"attn_query_{name}_layer{layer}.png", written)


def figure_reduce_mean(raw, maps, queries, layer, cfg, out, written):
    """attn_reduce_mean_layer<L>.png: a row per query, a column per image."""
    p, grid, B = cfg.patch_size, cfg.img_size // cfg.patch_size, raw.shape[0]
    red = upsample(maps["reduce_mean"], grid, p)            # (B, Q, H, W)
    fig, axes = grid_figure(len(queries), B, f"layer {layer}: query map minus the proxies' "
                                             f"mean map (red +, blue -)")
    for k, q in enumerate(queries):
        for b in range(B):
            overlay(axes[k, b], raw[b], red[b, k], f"image {b}, {query_name(q, grid)}",
                    cmap="bwr", query=q, p=p, grid=grid, centred=True)
    save(fig, out, f"attn_reduce_mean_layer{layer}.png", written)


def figure_proxy_maps(raw, maps, layer, cfg, out, written):
    """proxy_maps_layer<L>.png: a row per image, a column per proxy."""
    p, grid, B = cfg.patch_size, cfg.img_size // cfg.patch_size, raw.shape[0]
    prox = upsample(maps["proxy"], grid, p)                 # (B, P, H, W)
    fig, axes = grid_figure(B, prox.shape[1], f"layer {layer}: what each proxy gathers (its "
                                              f"attention over patch keys, head mean)")
    for b in range(B):
        for k in range(prox.shape[1]):
            overlay(axes[b, k], raw[b], prox[b, k], f"image {b}, proxy {k}")
    save(fig, out, f"proxy_maps_layer{layer}.png", written)


def figure_mask_to_proxy(raw, ids_keep, ids_mask, mask_attn, layer, cfg, out, written):
    """mask_to_proxy_layer<L>.png: per image, the masked input, the masked patches coloured by
    the proxy they read most from, and each proxy's weight over the masked patches."""
    p, grid, P, N = cfg.patch_size, cfg.img_size // cfg.patch_size, cfg.num_proxies, cfg.num_patches
    w = mask_to_proxy_weights(mask_attn, P)                 # (B, Nm, P)
    best = scatter_patches(w.argmax(-1).float(), ids_mask, N)  # (B, N), NaN where not masked
    per = scatter_patches(w, ids_mask, N).transpose(1, 2)   # (B, P, N)
    best, per = upsample(best, grid, p), upsample(per, grid, p)  # (B, H, W), (B, P, H, W)
    shown = masked_input(raw, ids_keep, p)                  # (B, 3, H, W)
    colours = plt.get_cmap("tab10" if P <= 10 else "tab20", P)
    B = raw.shape[0]
    fig, axes = grid_figure(B, P + 2, f"mask block {layer}: attention of each [MASK] query on "
                                      f"each proxy (head mean; the rest goes to [MASK] keys)")
    for b in range(B):
        axes[b, 0].imshow(hwc(shown[b]))
        axes[b, 0].set_title(f"image {b}, masked", fontsize=7)
        axes[b, 1].imshow(hwc(raw[b]))
        axes[b, 1].imshow(best[b].numpy(), cmap=colours, vmin=-0.5, vmax=P - 0.5,
                          interpolation="nearest")
        axes[b, 1].set_title("argmax proxy", fontsize=7)
        lo, hi = float(w[b].min()), float(w[b].max())       # one colour scale per image
        for k in range(P):
            axes[b, k + 2].imshow(hwc(shown[b]))
            axes[b, k + 2].imshow(per[b, k].numpy(), cmap="viridis", vmin=lo, vmax=hi,
                                  interpolation="nearest")
            axes[b, k + 2].set_title(f"proxy {k} (mean {w[b, :, k].mean():.2f})", fontsize=7,
                                     color=colours(k))
    save(fig, out, f"mask_to_proxy_layer{layer}.png", written)


def figure_recon(raw, imgs, ids_keep, ids_mask, pred, model, ckpt, out, written):
    """recon.png: image, masked input, prediction, target (pixels; HOG drawn as glyphs)."""
    cfg = model.cfg
    p, grid, B = cfg.patch_size, cfg.img_size // cfg.patch_size, raw.shape[0]
    shown = masked_input(raw, ids_keep, p)                  # (B, 3, S, S)
    target = sm.gather_tokens(model.target(imgs), ids_mask)  # (B, Nm, T)
    if cfg.target == "pixel":
        patches = unnormalise_pixel_prediction(pred, imgs, ids_mask, p)  # (B, Nm, p*p*3)
        base = normalise(shown, ckpt)                       # (B, 3, S, S), model space
        recon = denormalise(paste_patches(base, patches, ids_mask, p), ckpt)  # (B, 3, S, S)

        def as_img(t):
            """The regression space itself (per-patch normalised) mapped to [0, 1] by 0.5 + v/4,
            black outside the masked patches."""
            x = paste_patches(torch.full_like(raw, -2.0), t, ids_mask, p)  # (B, 3, S, S)
            return (0.5 + x / 4).clamp(0, 1)

        panels = [("image", raw), ("masked input", shown),
                  ("prediction, with the\ntarget's patch mean/std", recon),
                  ("prediction, per-patch\nnormalised (0.5+v/4)", as_img(pred)),
                  ("target, per-patch\nnormalised (0.5+v/4)", as_img(target))]
        fig, axes = grid_figure(B, len(panels), "normalised-pixel target: the prediction is "
                                "un-normalised with the true patches' mean and std")
        for b in range(B):
            for k, (title, x) in enumerate(panels):
                axes[b, k].imshow(hwc(x[b]))
                axes[b, k].set_title(title, fontsize=7)
    else:
        N, cell = cfg.num_patches, p // 2
        dark = masked_input(raw * 0.6, ids_keep, p, fill=0.0)  # (B, 3, S, S)
        pred_c = hog_cells(scatter_patches(pred, ids_mask, N, 0.0), grid)    # (B, 2h, 2w, 9)
        targ_c = hog_cells(scatter_patches(target, ids_mask, N, 0.0), grid)  # (B, 2h, 2w, 9)
        show = upsample(scatter_patches(torch.ones_like(ids_mask, dtype=torch.float), ids_mask,
                                        N, 0.0), grid, 2).bool()  # (B, 2h, 2w) masked cells
        fig, axes = grid_figure(B, 4, "HOG target: per 2x2 cell, one line per orientation bin "
                                      "(edge direction), length ~ bin value, channel mean")
        for b in range(B):
            vmax = float(targ_c[b].max()) or 1.0
            axes[b, 0].imshow(hwc(raw[b]))
            axes[b, 0].set_title("image", fontsize=7)
            axes[b, 1].imshow(hwc(shown[b]))
            axes[b, 1].set_title("masked input", fontsize=7)
            draw_hog(axes[b, 2], dark[b], pred_c[b], show[b], cell, vmax)
            axes[b, 2].set_title("predicted HOG", fontsize=7)
            draw_hog(axes[b, 3], dark[b], targ_c[b], show[b], cell, vmax)
            axes[b, 3].set_title("target HOG", fontsize=7)
    save(fig, out, "recon.png", written)


def figure_curve(log_path, out, written):
    """curve.png: loss (left axis) and learning rate (right axis) against step."""
    recs = read_log(log_path)
    if not recs:
        print(f"note: {log_path} is empty: skipped the training curve")
        return
    steps, losses = [r["step"] for r in recs], [r["loss"] for r in recs]
    fig, ax = plt.subplots(figsize=(4, 2.6))
    ax.plot(steps, losses, color="C0", marker="." if len(recs) < 30 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss", color="C0")
    if min(losses) > 0 and max(losses) > 10 * min(losses):  # log scale when it spans decades
        ax.set_yscale("log")
    lr = ax.twinx()
    lr.plot(steps, [r["lr"] for r in recs], color="C1")
    lr.set_ylabel("lr", color="C1")
    ax.set_title(os.path.basename(os.path.dirname(os.path.abspath(log_path))) or log_path,
                 fontsize=8)
    save(fig, out, "curve.png", written)


def figure_compare(raw, runs, queries, layers, cfg, out, written):
    """compare_attn_layer<L>.png: the patch-query maps of two or three checkpoints side by side
    (the paper's Figure 1): a row per image, for each query a column per checkpoint. layers: per
    run, its list of resolved layers; the i-th of each are drawn together (named by the first)."""
    p, grid, B, R = cfg.patch_size, cfg.img_size // cfg.patch_size, raw.shape[0], len(runs)
    for per_run in zip(*layers):
        heat = [upsample(attention_maps(m, normalise(raw, c), layer, queries)["query"], grid, p)
                for (m, c, _), layer in zip(runs, per_run)]  # R x (B, Q, H, W)
        shown = " vs ".join(map(str, per_run)) if len(set(per_run)) > 1 else str(per_run[0])
        fig, axes = grid_figure(B, R * len(queries), f"patch-query attention, layer {shown}")
        for b in range(B):
            for k, q in enumerate(queries):
                for j, (_, _, name) in enumerate(runs):
                    overlay(axes[b, R * k + j], raw[b], heat[j][b, k],
                            f"{name}, {query_name(q, grid)}", query=q, p=p, grid=grid)
        save(fig, out, f"compare_attn_layer{per_run[0]}.png", written)


def format_stat(value, name):
    return "-" if value is None else f"{value:.2f}" if name == "distance" else f"{value:.3f}"


def stats_table(results, names, refs):
    """The printed table as lines: a row per main block and one for uniform attention, for each
    statistic a column per model (A, B, C when there are several); '-' where undefined."""
    m, depth = len(names), max(len(r) for r in results)
    keys = [k for k in STATS if any(k in layer for r in results for layer in r)]
    cells = [max(7, -(-len(STATS[k][0]) // m) + 1) for k in keys]  # width of a model's column
    head = "layer  " + "  ".join((STATS[k][0].center if m > 1 else STATS[k][0].rjust)(m * w)
                                 for k, w in zip(keys, cells))
    lines = [head]
    if m > 1:
        lines.append(" " * 7 + "  ".join("".join(chr(65 + j).rjust(w) for j in range(m))
                                         for w in cells))

    def row(title, per_model):                          # per_model: m dicts or None
        return title.ljust(7) + "  ".join(
            "".join(format_stat(None if d is None else d.get(k), k).rjust(w) for d in per_model)
            for k, w in zip(keys, cells))
    for layer in range(1, depth + 1):
        lines.append(row(str(layer), [r[layer - 1] if layer <= len(r) else None
                                      for r in results]))
    lines.append(row("uniform", refs))
    return [line.rstrip() for line in lines]


def figure_stats(results, names, refs, title, out, written):
    """attn_stats.png: a panel per statistic against depth (block 1..depth), a line per model,
    the statistic of uniform attention dashed (grey when it is the same for every model)."""
    keys = [k for k in STATS if any(layer.get(k) is not None for r in results for layer in r)]
    cols = min(3, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.6 * rows + 0.4), squeeze=False)
    for ax, k in zip(axes.flat, keys):
        for j, (r, name) in enumerate(zip(results, names)):
            y = [np.nan if layer.get(k) is None else layer[k] for layer in r]
            ax.plot(range(1, len(r) + 1), y, marker="o", color=f"C{j}", label=name)
        ref = [d.get(k) for d in refs]
        if all(v is not None and math.isclose(v, ref[0]) for v in ref):
            ax.axhline(ref[0], ls="--", color="grey", lw=1)
        else:
            for j, v in enumerate(ref):
                if v is not None:
                    ax.axhline(v, ls="--", color=f"C{j}", lw=1)
        top = max(v for v in [*ref, *(layer.get(k) for r in results for layer in r)]
                  if v is not None)
        ax.set_ylim(0, 1.08 * top or 1)                     # every statistic is >= 0
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_title(STATS[k][0], fontsize=8)
        ax.set_xlabel("layer", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes.flat[len(keys):]:
        ax.axis("off")
    handles = [Line2D([], [], color=f"C{j}", marker="o", label=name)
               for j, name in enumerate(names)]
    handles.append(Line2D([], [], color="grey", ls="--", label="uniform attention"))
    axes.flat[0].legend(handles=handles, fontsize=6)
    fig.suptitle(title, fontsize=8)
    save(fig, out, "attn_stats.png", written)


# --------------------------------------------------------------------------------------------
# 7. Command line
# --------------------------------------------------------------------------------------------
STATS_IMAGES = 1000              # default --stats-images


def build_parser():
    p = argparse.ArgumentParser(prog="visualize.py", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="checkpoint.pt written by train.py (put it first: "
                   "--compare takes several paths)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--images", nargs="+", metavar="FILE", help="image files to show")
    src.add_argument("--indices", nargs="+", type=common.NATURAL, default=[0, 1, 2],
                     help="images of the test split of the checkpoint's data set "
                     "(default: 0 1 2)")
    p.add_argument("--data", default=None, help="data root (default: the checkpoint's --data)")
    p.add_argument("--queries", nargs="+", metavar="R,C|I", default=None,
                   help="query patches as row,col or row-major index (default: centre and 0,0)")
    p.add_argument("--layers", nargs="+", type=int, default=[-1],
                   help="main blocks, 1-based; negative counts from the end (default: -1)")
    p.add_argument("--what", nargs="+", choices=FIGURES, default=None, metavar="FIGURE",
                   help=f"some of {', '.join(FIGURES)} (default: all, compare only with "
                   f"--compare; with --stats, none)")
    p.add_argument("--compare", nargs="+", metavar="CKPT", help="one or two other checkpoints "
                   "(e.g. the baselines) on the same images: their patch-query maps drawn beside "
                   "the first (the compare figure) and, with --stats, their statistics beside it")
    p.add_argument("--stats", action="store_true",
                   help="the paper's Figure 1 as numbers: per main block, the proxy share, mean "
                   "attention distance, query dependence, region consistency (Fashion-MNIST and "
                   "synthetic only) and proxy diversity of the head-averaged attention of every "
                   "patch query on the first --stats-images images of the test split (not "
                   "--images/--indices), printed as a table, written to attn_stats.json beside "
                   "the checkpoint and plotted against depth in attn_stats.png in --out; with "
                   "--compare every model, side by side. Draws no other figure unless --what "
                   "names some")
    p.add_argument("--stats-images", type=common.COUNT, default=None,
                   metavar="N", help=f"with --stats: the first N images of the test split "
                   f"(default: {STATS_IMAGES}, or all if it has fewer)")
    p.add_argument("--log", default=None, help="log.jsonl (default: beside the checkpoint)")
    p.add_argument("--out", default=None, help="folder for the PNGs (default: "
                   "<checkpoint folder>/figures)")
    p.add_argument("--seed", type=common.NATURAL, default=0, help="seed of the masks (default: 0)")
    return common.one_line_errors(p)


def load_compare(path, cfg, layers):
    """(model, checkpoint, layers) of a --compare checkpoint; refused unless it cuts images of
    the same size into the same patches. Negative layers count from its own end."""
    other, other_ckpt = load_model(path)
    oc = other.cfg
    if (oc.img_size, oc.patch_size) != (cfg.img_size, cfg.patch_size):
        raise SystemExit(f"error: cannot compare checkpoints of {cfg.img_size} px images in "
                         f"{cfg.patch_size} px patches and {oc.img_size} px in {oc.patch_size} px "
                         f"({path}): both need the same image and patch size")
    return other, other_ckpt, resolve_layers(layers, oc.depth)


def label(cfg):
    return "baseline" if cfg.baseline else "SemanticMIM"


def model_names(cfgs):
    """SemanticMIM / baseline from each config; names that clash get P and the mask ratio
    (e.g. "baseline P1 m0.4"), and names that still clash a letter A, B, C."""
    names = [label(c) for c in cfgs]
    names = [f"{n} P{c.num_proxies} m{c.mask_ratio:g}" if names.count(n) > 1 else n
             for n, c in zip(names, cfgs)]
    return [f"{n} {chr(65 + i)}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def run_stats(args, argv, runs, ckpt, grid, out, written):
    """--stats: the statistics of every run's main blocks on the first test images, printed,
    written to attn_stats.json beside the checkpoint and drawn in attn_stats.png."""
    dataset = ckpt["args"]["dataset"]
    n_split, get = test_split(ckpt["args"], runs[0][0].cfg.img_size, args.data)
    n = min(args.stats_images or STATS_IMAGES, n_split)
    if n < (args.stats_images or STATS_IMAGES):
        print(f"note: the {dataset} test split has {n_split} images: using all of them")
    threshold = FOREGROUND_THRESHOLD.get(dataset)
    if threshold is None:
        print(f"note: no region consistency: {dataset} images have no plain background a "
              f"threshold can tell from the object (only {' and '.join(FOREGROUND_THRESHOLD)})")
    results = attention_stats(runs, get, n, threshold)
    keys = list(results[0][0])
    refs = [{k: v for k, v in uniform_reference(m.cfg.num_proxies, grid).items() if k in keys}
            for m, _, _ in runs]
    names = [name for _, _, name in runs]
    print(f"attention of the main blocks on the first {n} images of the {dataset} test split: "
          f"head-averaged maps of every patch query, renormalised over the patch keys")
    if threshold is not None:
        print(f"foreground: the patches whose raw mean intensity is above {threshold}")
    for j, (m, c, name) in enumerate(runs):
        path = args.checkpoint if j == 0 else args.compare[j - 1]
        print(f"{chr(65 + j) + ' = ' if len(runs) > 1 else ''}{name}: {path} "
              f"(P {m.cfg.num_proxies}, mask ratio {m.cfg.mask_ratio:g}, depth {m.cfg.depth})")
    print("\n".join(stats_table(results, names, refs)))
    for k in keys:
        print(textwrap.fill(f"{STATS[k][0]}: {STATS[k][1]}", 100, initial_indent="  ",
                            subsequent_indent="    "))
    report = {
        "command": "python visualize.py " + shlex.join(argv),
        "images": {"dataset": dataset, "split": "test", "count": n,
                   "data": args.data or ckpt["args"].get("data")},
        "maps": "head-averaged softmax attention of each main block on [PROXY; all patches] of "
                "the unmasked images; a map is a query's row over the patch keys renormalised "
                "to sum 1; the statistics are means over every patch query of every image",
        "foreground_threshold": threshold,
        "statistics": {k: STATS[k][1] for k in keys},
        "models": [{"name": name, "checkpoint": path, "config": asdict(m.cfg), "uniform": ref,
                    "layers": [{"layer": i + 1, **layer} for i, layer in enumerate(res)]}
                   for (m, _, name), path, ref, res in zip(
                       runs, [args.checkpoint, *(args.compare or [])], refs, results)],
    }
    path = os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "attn_stats.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {path}")
    figure_stats(results, names, refs, f"attention per main block, first {n} {dataset} test "
                 f"images (dashed: uniform attention)", out, written)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.compare and len(args.compare) > 2:
        raise SystemExit(f"error: --compare takes one or two checkpoints, got "
                         f"{len(args.compare)}")
    if args.stats_images is not None and not args.stats:
        raise SystemExit("error: --stats-images needs --stats")
    model, ckpt = load_model(args.checkpoint)
    cfg = model.cfg
    grid = cfg.img_size // cfg.patch_size
    if args.what:
        what = set(args.what)
    else:
        what = set() if args.stats else {f for f in FIGURES if f != "compare" or args.compare}
    if "compare" in what and not args.compare:
        raise SystemExit("error: --what compare needs --compare OTHER_CHECKPOINT")
    queries = parse_queries(args.queries, grid)
    layers = resolve_layers(args.layers, cfg.depth)
    others = [load_compare(path, cfg, args.layers) for path in args.compare or []]
    names = model_names([cfg] + [o.cfg for o, _, _ in others])
    runs = [(model, ckpt, names[0])] + [(o, c, n) for (o, c, _), n in zip(others, names[1:])]
    log_path = args.log or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)),
                                        "log.jsonl")
    if args.log and not os.path.isfile(args.log):
        raise SystemExit(f"error: no training log at {args.log}")
    if what - {"curve"}:
        if args.images:
            raw = load_image_files(args.images, cfg.img_size)  # (B, 3, S, S)
        else:
            raw = load_dataset_images(ckpt["args"], args.indices, cfg.img_size, args.data)
        imgs = normalise(raw, ckpt)                         # (B, 3, S, S)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "figures")
    os.makedirs(out, exist_ok=True)

    written = []
    if args.stats:
        run_stats(args, argv, runs, ckpt, grid, out, written)
    if cfg.num_proxies == 0 and what & {"reduce_mean", "proxy"}:
        print("note: this model has no proxies: skipped the reduce-mean and proxy maps")
        what -= {"reduce_mean", "proxy"}
    for layer in layers:
        if what & {"query", "reduce_mean", "proxy"}:
            maps = attention_maps(model, imgs, layer, queries)
        if "query" in what:
            figure_query_maps(raw, maps, queries, layer, cfg, out, written)
        if "reduce_mean" in what:
            figure_reduce_mean(raw, maps, queries, layer, cfg, out, written)
        if "proxy" in what:
            figure_proxy_maps(raw, maps, layer, cfg, out, written)
    if what & {"mask_proxy", "recon"}:
        ids_keep, ids_mask, pred, attn = masked_prediction(model, imgs, args.seed)
    if "mask_proxy" in what and cfg.baseline:
        print("note: the baseline has no mask stream: skipped the mask-to-proxy maps")
    elif "mask_proxy" in what:
        for layer in layers:
            figure_mask_to_proxy(raw, ids_keep, ids_mask, attn["mask"][layer - 1], layer, cfg,
                                 out, written)
    if "recon" in what:
        figure_recon(raw, imgs, ids_keep, ids_mask, pred, model, ckpt, out, written)
    if "curve" in what and not os.path.isfile(log_path):
        print(f"note: no training log at {log_path}: skipped the training curve")
    elif "curve" in what:
        figure_curve(log_path, out, written)
    if "compare" in what:
        figure_compare(raw, runs, queries, [layers] + [la for _, _, la in others], cfg, out,
                       written)
    print(f"wrote {len(written)} figure(s) to {out}:")
    for path in written:
        print("  " + os.path.basename(path))
    return written


if __name__ == "__main__":
    main()
