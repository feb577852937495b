"""Pictures of a train.py checkpoint (attention, reconstructions, loss curve); attention as numbers.

    python visualize.py out/checkpoint.pt                    # every figure, into out/figures/
    python visualize.py out/checkpoint.pt --images cat.jpg --queries 3,4 0 --layers 2 -1
    python visualize.py out/checkpoint.pt --stats --compare base/checkpoint.pt mf/checkpoint.pt

Attention maps are the paper's attention pictures (its Figure 1; the authors draw them with
attn_vis.py of github.com/yyk-wew/SemanticMIM): head-averaged softmax weights of a main block on
[PROXY; all N patches] of unmasked images (the downstream path, model.features), restricted to the
patch keys and NOT renormalised: the weight a query puts on the proxies is left out of its map
(the figures print it); --stats turns them into numbers (section 3). Figure functions return
Figures; main saves them. Shapes: B images, N patches (h x w), P proxies, Q queries, Nm masked.
"""
import argparse
import math
import os
import shlex
import sys
from dataclasses import asdict

import matplotlib
import numpy as np
import torch
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

import semanticmim as sm
import train

FIGURES = ("query", "reduce_mean", "proxy", "mask_proxy", "recon", "curve", "compare")
DPI, PANEL, STATS_IMAGES = 100, 1.6, 1000  # dots per inch, inches per panel, --stats-images


# ---- 1. Inputs: images (raw: floats in [0, 1], (B, 3, S, S)), queries and layers -----------------
def load_images(ckpt_args, size, files=None, indices=None, first=None, root=None, batch=None):
    """The image loader -> (count, generator of raw batches of `batch` images, default all): the
    `files` (resized, centre-cropped); else images `indices`, or the `first`, of the test split."""
    if files:
        crop, imgs = train.folder_transform(size, train=False), []
        for path in files:
            try:
                imgs.append(crop(train.decode_image(path)))  # (3, size, size) uint8
            except Exception as e:                          # a missing file too
                raise SystemExit(f"error: cannot read image {path} ({type(e).__name__}): pass "
                                 f"existing JPEG or PNG files") from None
        return len(files), iter([torch.stack(imgs) / 255])
    name = ckpt_args["dataset"]
    images = train.load_split(name, root or ckpt_args.get("data"), "test", size,
                              ckpt_args.get("synthetic_size", 1024))[0]
    n = len(images)
    keys = [(0, i) for i in (range(min(first, n)) if indices is None else indices)]
    if any(i >= n for _, i in keys):                        # indices are >= 0 (train.NATURAL)
        raise SystemExit(f"error: image index {max(keys)[1]} is out of range: the {name} test "
                         f"split has {n} images (choose 0..{n - 1})")
    return len(keys), train.batches(images, keys, batch or len(keys), torch.device("cpu"), size,
                                    (0.0,) * 3, (1.0,) * 3)  # mean 0, std 1: raw


def normalise(x, ckpt, inverse=False):
    """Raw images -> model input with the checkpoint's data set's mean/std (inverse: -> raw)."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in train.MEAN_STD[ckpt["args"]["dataset"]])
    return (x * std + mean).clamp(0, 1) if inverse else (x - mean) / std  # (B, 3, S, S)


def parse_queries(specs, grid):
    """'r,c' or a patch index -> row-major patch indices; default the centre and a corner."""
    out = []
    for s in specs or [f"{grid // 2},{grid // 2}", "0"]:
        rc = [int(v) for v in s.split(",") if v.strip().removeprefix("-").isdecimal()]  # [r, c]
        if len(rc) != len(s.split(",")) or len(rc) not in (1, 2):
            raise SystemExit(f"error: query {s!r} is neither 'row,col' nor a patch index "
                             f"(write e.g. 3,4 or 28)")
        if not (all(0 <= v < grid for v in rc) if len(rc) == 2 else 0 <= rc[0] < grid * grid):
            raise SystemExit(f"error: query {s} is out of range: the patch grid is {grid}x{grid} "
                             f"(rows and columns 0..{grid - 1}, indices 0..{grid * grid - 1})")
        out.append(rc[0] * grid + rc[1] if len(rc) == 2 else rc[0])
    return out


def resolve_layers(layers, depth):
    """1-based layer numbers, negative ones counted from the end (-1 = the last block)."""
    for layer in layers:
        if not 1 <= (layer if layer > 0 else depth + 1 + layer) <= depth:
            raise SystemExit(f"error: layer {layer} does not exist: the checkpoint has {depth} "
                             f"blocks (choose 1..{depth}, or -1 for the last)")
    return [layer if layer > 0 else depth + 1 + layer for layer in layers]


# ---- 2. Pure functions on tensors: maps of attn (B, H, P+N, P+N) (proxies first), patches, HOG --
def patch_query_maps(attn, queries, P):
    """Q patch indices -> (B, Q, N): each query's row, head mean, patch keys, not renormalised."""
    return attn[:, :, P + torch.as_tensor(queries), P:].mean(1)  # (B, H, Q, N) -> (B, Q, N)


def proxy_maps(attn, P):
    """What each proxy gathers: its row over the patch keys, averaged over heads, (B, P, N)."""
    return attn[:, :, :P, P:].mean(1)                       # (B, P, N)


def reduce_mean_maps(query_maps, proxies):
    """The "reduce mean" of the authors' attn_vis.py: each patch-query map (B, Q, N) minus the
    mean of the proxy maps (B, P, N) over proxies (and, as proxy_maps already averaged them,
    heads), which removes the part of attention that every query shares."""
    return query_maps - proxies.mean(1, keepdim=True)       # (B, Q, N)


def mask_to_proxy_weights(mask_attn, P):
    """Mask-stream weights (B, H, Nm, P+Nm), proxies first -> (B, Nm, P): head mean, as they are."""
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


def unnormalise_pixel_prediction(pred, imgs, ids_mask, p):
    """Predicted normalised pixels (B, Nm, p*p*3) -> model-space patches, with TRUE patch stats."""
    mean, std = sm.patch_stats(sm.gather_tokens(sm.patchify(imgs, p), ids_mask))  # (B, Nm, 1)
    return pred * std + mean                                # (B, Nm, p*p*3)


def unpatchify(x, p):
    """(B, N, p*p*3) -> (B, 3, H, W): the inverse of sm.patchify for a square image."""
    h = math.isqrt(x.shape[1])
    x = x.reshape(-1, h, h, p, p, 3).permute(0, 5, 1, 3, 2, 4)  # (B, 3, h, p, w, p)
    return x.reshape(-1, 3, h * p, h * p)                   # (B, 3, H, W)


def paste_patches(imgs, patches, ids, p):
    """imgs (B, 3, S, S) with patches (B, K, p*p*3) written at the patch indices ids (B, K)."""
    x = sm.patchify(imgs, p)                                # (B, N, p*p*3)
    return unpatchify(x.scatter(1, ids.unsqueeze(-1).expand_as(patches), patches), p)


def masked_input(raw, ids_keep, p, fill=0.5):
    """Raw images with every patch that is not visible to the model set to `fill`."""
    visible = sm.gather_tokens(sm.patchify(raw, p), ids_keep)  # (B, Nv, p*p*3)
    return paste_patches(torch.full_like(raw, fill), visible, ids_keep, p)  # (B, 3, S, S)


def hog_cells(t, grid, nbins=9):
    """HOG (B, N, 108), order (channel, bin, cell row, cell col) -> channel means (B, 2h, 2w, 9)."""
    x = t.reshape(-1, grid, grid, 3, nbins, 2, 2).mean(3)   # (B, h, w, 9, 2, 2)
    return x.permute(0, 1, 4, 2, 5, 3).reshape(-1, 2 * grid, 2 * grid, nbins)  # (B, 2h, 2w, 9)


def edge_directions(nbins=9):
    """(nbins, 2) unit vectors (dx right, dy down) per HOG bin at its centre angle, along the edge:
    sm.hog_target bins theta = atan2(gx, gy): gradient (sin, cos) up to sign, edge (cos, -sin)."""
    theta = (torch.arange(nbins) + 0.5) * math.pi / nbins   # (nbins,)
    return torch.stack([theta.cos(), -theta.sin()], 1)      # (nbins, 2)


# ---- 3. Attention statistics (Figure 1 of the paper as numbers) ----------------------------------
MAPS = ("head-averaged softmax attention of each main block on [PROXY; all patches] of the "
        "unmasked images; a map is a query's row over the patch keys renormalised to sum 1; the "
        "statistics are means over every patch query of every image")  # so attn_stats.json says
STATS = {  # name: (short label, what it is)
    "proxy_share": ("proxy share", "weight a patch query puts on the P proxies (not renormalised)"),
    "distance": ("distance", "mean attention distance (Dosovitskiy et al. 2021), in patches: "
                 "sum over the patch keys of map x grid distance from the query"),
    "query_js": ("query JS", "query dependence: mean Jensen-Shannon divergence (bits, 0..1) "
                 "between the maps of two query patches of an image (0 = all see the same map)"),
    "fg_consistency": ("fg region", "foreground queries: mass of the map on the foreground / "
                       "the foreground's share of the patches (1 = chance)"),
    "bg_consistency": ("bg region", "background queries: mass of the map on the background / "
                       "the background's share of the patches (1 = chance)"),
    "proxy_js": ("proxy JS", "proxy diversity: mean JS divergence (bits, 0..1) between the maps "
                 "of two proxies (0 = all gather the same thing; '-' for fewer than 2 proxies)"),
}


def foreground_patches(raw, p, threshold):
    """Raw images (B, 3, S, S) -> (B, N) bool: patches of mean intensity above `threshold`."""
    return sm.patchify(raw, p).mean(-1) > threshold         # (B, N)


def grid_distances(grid):
    """(N, N) Euclidean distances, in patches, between the patches of a grid x grid image."""
    pos = torch.cartesian_prod(torch.arange(grid), torch.arange(grid)).float()  # (N, 2) row-major
    return (pos[:, None] - pos[None]).norm(dim=-1)          # (N, N)


def proxy_share(attn, P):
    """-> (B, N): the head-averaged weight of each patch query on the P proxy keys."""
    return attn[:, :, P:, :P].sum(-1).mean(1)               # (B, N)


def renormalised_maps(attn, P):
    """-> (B, P+N, N): every query's row (proxies first), head mean, on the patch keys, sum 1."""
    rows = attn[..., P:].mean(1)                            # (B, P+N, N)
    return rows / rows.sum(-1, keepdim=True)                # (B, P+N, N)


def attention_distance(maps, dist):
    """Maps (B, N, N) of the patch queries, dist (N, N) -> (B, N): mean attention distance."""
    return (maps * dist).sum(-1)                            # (B, N)


def js_divergence(p, q):
    """Jensen-Shannon divergence in bits (0: equal maps, 1: disjoint): (..., N) twice -> (...)."""
    def h(x):                                               # entropy in bits; 0 log 0 = 0
        return -torch.xlogy(x, x).sum(-1) / math.log(2)
    return h((p + q) / 2) - (h(p) + h(q)) / 2               # (...)


def mean_pairwise_js(maps, budget=1 << 22):
    """maps (B, K, N) -> (B,): per image, the mean JS divergence over all pairs of two distinct
    rows; NaN when K < 2. Blocks of rows keep the (B, rows, K, N) intermediate under `budget`."""
    B, K, N = maps.shape
    if K < 2:
        return maps.new_full((B,), float("nan"))            # (B,)
    step, total = max(1, budget // (B * K * N)), torch.zeros(B, dtype=torch.float64)  # (B,)
    for i in range(0, K, step):
        rows = torch.arange(i, min(i + step, K))            # (r,)
        js = js_divergence(maps[:, rows, None], maps[:, None])  # (B, r, K), via (B, r, K, N)
        js[:, torch.arange(len(rows)), rows] = 0            # a row with itself is no pair
        total += js.clamp(0, 1).sum((1, 2)).double()        # (B,)
    return (total / (K * (K - 1))).to(maps.dtype)           # (B,)


def region_consistency(maps, fg):
    """maps (B, N, N) of the patch queries, fg (B, N) bool -> (B, N): each query's map mass on its
    own region (fg or bg) over the region's share of the patches (1 = chance; NaN: whole image)."""
    own = torch.where(fg[:, :, None], fg[:, None], ~fg[:, None])  # (B, N, N): same region
    share = own.float().mean(-1)                            # (B, N)
    return ((maps * own).sum(-1) / share).masked_fill(share == 1, float("nan"))  # (B, N)


def layer_stats(attn, P, dist, fg=None):
    """Every statistic of one main block's attention: name -> per-item values, (B, N) per patch
    query or (B,) per image, NaN where an item does not count. fg (B, N) bool or None (none)."""
    maps = renormalised_maps(attn, P)                       # (B, P+N, N)
    patch, prox = maps[:, P:], maps[:, :P]                  # (B, N, N), (B, P, N)
    out = {"proxy_share": proxy_share(attn, P), "distance": attention_distance(patch, dist),
           "query_js": mean_pairwise_js(patch)}             # (B, N), (B, N), (B,)
    if fg is not None:
        region = region_consistency(patch, fg)              # (B, N)
        out["fg_consistency"] = region.masked_fill(~fg, float("nan"))  # (B, N)
        out["bg_consistency"] = region.masked_fill(fg, float("nan"))   # (B, N)
    return {**out, "proxy_js": mean_pairwise_js(prox)}      # (B,)


def pooled_means(batches):
    """layer_stats of several batches -> name -> mean of all their non-NaN values (or None)."""
    values = {k: torch.cat([b[k].flatten() for b in batches]).double() for k in batches[0]}
    return {k: None if v.isnan().all() else float(v.nanmean()) for k, v in values.items()}


def uniform_reference(P, grid):
    """The statistics of attention spread evenly over all P+N keys (half the patches foreground)."""
    N = grid * grid
    attn, fg = torch.full((1, 1, P + N, P + N), 1 / (P + N)), torch.arange(N)[None] < N // 2
    return pooled_means([layer_stats(attn, P, grid_distances(grid), fg)])  # attn (1, 1, P+N, P+N)


@torch.no_grad()
def attention_stats(runs, batches, threshold):
    """Raw image batches through each (model, ckpt, name) -> per run, per block, name -> mean."""
    values = [[] for _ in runs]                             # per run, per batch, per block
    for raw in batches:                                     # (b, 3, S, S)
        for (model, ckpt, _), per_batch in zip(runs, values):
            cfg, attns = model.cfg, model.features(normalise(raw, ckpt), return_attn=True)[1]
            fg = None if threshold is None else foreground_patches(raw, cfg.patch_size, threshold)
            dist = grid_distances(cfg.img_size // cfg.patch_size)  # (N, N); attns: (b, H, P+N, P+N)
            per_batch.append([layer_stats(a, cfg.num_proxies, dist, fg) for a in attns])
    return [[pooled_means(block) for block in zip(*per_batch)] for per_batch in values]


# ---- 4. Figures: each function returns its matplotlib Figure(s); main saves them ----------------
def grid_figure(rows, cols, title):
    """A Figure of rows x cols image panels without ticks, at most 12 inches wide, and its axes."""
    size = min(PANEL, 12 / cols)
    fig = Figure(figsize=(size * cols, size * rows + 0.3), layout="tight")
    fig.suptitle(title, fontsize=8)
    return fig, fig.subplots(rows, cols, squeeze=False, subplot_kw={"xticks": [], "yticks": []})


def map_grid(raw, maps, title_of, title, p, query_of=None, cmap="jet", centred=False):
    """The overlay figure: rows x cols heat maps (rows, cols, N) over raw (rows or 1, cols or 1, 3,
    S, S); title_of(r, c) names a panel, query_of(r, c) the patch boxed; centred: scale about 0."""
    grid = math.isqrt(maps.shape[-1])
    heat = upsample(maps, grid, p)                          # (rows, cols, S, S)
    raw = raw.expand(*maps.shape[:2], -1, -1, -1).permute(0, 1, 3, 4, 2)  # (rows, cols, S, S, 3)
    fig, axes = grid_figure(*maps.shape[:2], title)
    for (r, c), ax in np.ndenumerate(axes):
        lim = float(heat[r, c].abs().max()) if centred else None
        ax.imshow(raw[r, c].numpy())
        ax.imshow(heat[r, c].numpy(), cmap=cmap, alpha=0.55, vmin=lim and -lim, vmax=lim)
        if query_of is not None:
            y, x = divmod(query_of(r, c), grid)
            ax.add_patch(Rectangle((x * p - 0.5, y * p - 0.5), p, p, fill=False, color="w",
                                   lw=1.5, clip_on=False))
        ax.set_title(title_of(r, c), fontsize=7)
    return fig


@torch.no_grad()
def attention_figures(raw, runs, queries, layers, what):
    """Query, reduce-mean, proxy figures of run 0; compare figures of all runs (i-th layers)."""
    (model, _, _), R, figs = runs[0], len(runs), {}
    p, P, grid = model.cfg.patch_size, model.cfg.num_proxies, math.isqrt(model.cfg.num_patches)
    names = [f"r{q // grid}c{q % grid}" for q in queries]
    for per_run in zip(*layers):
        attn = [m.features(normalise(raw, c), la, return_attn=True)[1][-1]  # (B, H, P+N, P+N)
                for (m, c, _), la in zip(runs if "compare" in what else runs[:1], per_run)]
        maps = [patch_query_maps(a, queries, m.cfg.num_proxies) for a, (m, _, _) in zip(attn, runs)]
        layer, on_proxies = per_run[0], 1 - maps[0].sum(-1)  # (B, Q): the rest of each row's 1
        for k, (q, name) in enumerate(zip(queries, names) if "query" in what else []):
            figs[f"attn_query_{name}_layer{layer}.png"] = map_grid(
                raw[None], maps[0][None, :, k], lambda _, b: f"image {b} (on proxies "
                f"{on_proxies[b, k]:.2f})", f"layer {layer}, query patch {name}: head-mean "
                f"attention over patch keys (not renormalised)", p, lambda *_: q)
        if "reduce_mean" in what:
            figs[f"attn_reduce_mean_layer{layer}.png"] = map_grid(
                raw[None], reduce_mean_maps(maps[0], proxy_maps(attn[0], P)).transpose(0, 1),
                lambda k, b: f"image {b}, {names[k]}", f"layer {layer}: query map minus the "
                f"proxies' mean map (red +, blue -)", p, lambda k, _: queries[k], "bwr", True)
        if "proxy" in what:
            figs[f"proxy_maps_layer{layer}.png"] = map_grid(
                raw[:, None], proxy_maps(attn[0], P), lambda b, k: f"image {b}, proxy {k}", f"layer"
                f" {layer}: what each proxy gathers (its attention over patch keys, head mean)", p)
        if "compare" in what:                               # the paper's Figure 1
            shown = " vs ".join(map(str, per_run)) if len(set(per_run)) > 1 else str(layer)
            figs[f"compare_attn_layer{layer}.png"] = map_grid(
                raw[:, None], torch.stack(maps, 2).flatten(1, 2),  # (B, Q, R, N) -> (B, Q*R, N)
                lambda _, c: f"{runs[c % R][2]}, {names[c // R]}", f"patch-query attention, "
                f"layer {shown}", p, lambda _, c: queries[c // R])  # per image a row
    return figs


@torch.no_grad()
def masked_prediction(model, imgs, seed):
    """A seeded mask per image -> ids_keep, ids_mask, prediction (B, Nm, T), attention weights."""
    cfg, g = model.cfg, torch.Generator().manual_seed(seed)
    ids_keep, ids_mask = sm.random_masking(imgs.shape[0], cfg.num_patches, cfg.num_masked, g,
                                           "cpu", cfg.independent_mask)
    return (ids_keep, ids_mask, *model.predict(imgs, ids_keep, ids_mask, return_attn=True))


def figure_mask_to_proxy(raw, ids_keep, ids_mask, mask_attn, layer, cfg):
    """mask_to_proxy_layer<L>.png: per image the masked input, argmax proxy, each proxy's weight."""
    p, grid, P, N = cfg.patch_size, cfg.img_size // cfg.patch_size, cfg.num_proxies, cfg.num_patches
    w = mask_to_proxy_weights(mask_attn, P)                 # (B, Nm, P)
    best = upsample(scatter_patches(w.argmax(-1).float(), ids_mask, N), grid, p)  # (B, H, W)
    per = upsample(scatter_patches(w, ids_mask, N).transpose(1, 2), grid, p)  # (B, P, H, W)
    shown = masked_input(raw, ids_keep, p).permute(0, 2, 3, 1)  # (B, H, W, 3); NaN: drawn clear
    colours = matplotlib.colormaps["tab10" if P <= 10 else "tab20"].resampled(P)
    fig, axes = grid_figure(len(raw), P + 2, f"mask block {layer}: attention of each [MASK] "
                            f"query on each proxy (head mean; the rest goes to [MASK] keys)")
    for b, row in enumerate(axes):
        for ax, name in zip(row, [f"image {b}, masked", "argmax proxy"]):
            ax.imshow((raw[b].permute(1, 2, 0) if ax is row[1] else shown[b]).numpy())
            ax.set_title(name, fontsize=7)
        row[1].imshow(best[b].numpy(), cmap=colours, vmin=-.5, vmax=P - .5, interpolation="nearest")
        for k, ax in enumerate(row[2:]):                    # one colour scale per image
            ax.imshow(shown[b].numpy())
            ax.imshow(per[b, k].numpy(), cmap="viridis", vmin=float(w[b].min()),
                      vmax=float(w[b].max()), interpolation="nearest")
            ax.set_title(f"proxy {k} (mean {w[b, :, k].mean():.2f})", fontsize=7, color=colours(k))
    return fig


def figure_recon(raw, imgs, ids_keep, ids_mask, pred, model, ckpt):
    """recon.png: image, masked input, prediction, target: pixels, or HOG as glyphs (in each masked
    cell a line per bin along its edge, as long as the cell times value / the target's largest)."""
    p, grid, N = model.cfg.patch_size, math.isqrt(model.cfg.num_patches), model.cfg.num_patches
    shown = masked_input(raw, ids_keep, p)                  # (B, 3, S, S)
    target = sm.gather_tokens(model.target(imgs), ids_mask)  # (B, Nm, T)
    panels = [("image", raw, None), ("masked input", shown, None)]  # (name, images, HOG cells)
    if model.cfg.target == "pixel":                         # the regression space: 0.5 + v/4
        recon = normalise(paste_patches(normalise(shown, ckpt), unnormalise_pixel_prediction(
            pred, imgs, ids_mask, p), ids_mask, p), ckpt, inverse=True)  # (B, 3, S, S)
        panels += [("prediction, with the\ntarget's patch mean/std", recon, None)] + [
            (f"{name}, per-patch\nnormalised (0.5+v/4)", (0.5 + paste_patches(torch.full_like(
                raw, -2.0), t, ids_mask, p) / 4).clamp(0, 1), None)  # black: not masked
            for name, t in (("prediction", pred), ("target", target))]
    else:
        panels += [(name, masked_input(raw * 0.6, ids_keep, p, fill=0.0), hog_cells(
            scatter_patches(t, ids_mask, N, 0.0), grid)) for name, t in
            (("predicted HOG", pred), ("target HOG", target))]  # (B, 2h, 2w, 9) cells
    show = upsample(scatter_patches(torch.ones_like(ids_mask).float(), ids_mask, N, 0.0), grid, 2)
    cell, d = p // 2, edge_directions().numpy()             # cell side in pixels; (9, 2)
    fig, axes = grid_figure(len(raw), len(panels), (
        "normalised-pixel target: the prediction is un-normalised with the true patches' mean and "
        "std" if model.cfg.target == "pixel" else "HOG target: per 2x2 cell, one line per "
        "orientation bin (edge direction), length ~ bin value, channel mean"))
    for (b, k), ax in np.ndenumerate(axes):
        name, images, cells = panels[k]
        ax.imshow(images[b].permute(1, 2, 0).numpy())
        ax.set_title(name, fontsize=7)
        if cells is not None:
            i, j = np.nonzero(show[b].numpy())              # the K masked cells
            vmax = float(panels[-1][2][b].max()) or 1.0
            half = 0.5 * cell * (cells[b].clamp(0, vmax) / vmax).numpy()[i, j, :, None] * d
            centre = np.stack([(j + 0.5) * cell - 0.5, (i + 0.5) * cell - 0.5], -1)[:, None]
            ends = np.stack([centre - half, centre + half], 2)  # (K, 9, 2, 2): (x, y) of both
            ax.add_collection(LineCollection(ends.reshape(-1, 2, 2), colors="yellow", lw=0.8))
    return fig


def figure_curve(recs, log_path):
    """curve.png: loss (left axis) and learning rate (right axis) against step."""
    steps, losses = [r["step"] for r in recs], [r["loss"] for r in recs]
    ax = Figure(figsize=(4, 2.6), layout="tight").subplots(subplot_kw={"xlabel": "step"})
    ax.plot(steps, losses, color="C0", marker="." if len(recs) < 30 else None)
    ax.set_ylabel("loss", color="C0")
    if min(losses) > 0 and max(losses) > 10 * min(losses):  # log scale when it spans decades
        ax.set_yscale("log")
    ax.set_title(os.path.basename(os.path.dirname(os.path.abspath(log_path))), fontsize=8)
    lr = ax.twinx()
    lr.plot(steps, [r["lr"] for r in recs], color="C1")
    lr.set_ylabel("lr", color="C1")
    return ax.figure


def figure_stats(results, names, refs, title):
    """attn_stats.png: per statistic a panel against depth, a line per model; uniform dashed."""
    keys = [k for k in STATS if any(layer.get(k) is not None for r in results for layer in r)]
    fig = Figure(figsize=(3.4 * min(3, len(keys)), 2.6 * -(-len(keys) // 3) + 0.4), layout="tight")
    fig.suptitle(title, fontsize=8)
    for i, k in enumerate(keys):
        ax = fig.add_subplot(-(-len(keys) // 3), min(3, len(keys)), i + 1)
        for j, r in enumerate(results):
            ax.plot(range(1, len(r) + 1), [np.nan if d.get(k) is None else d[k] for d in r],
                    marker="o", color=f"C{j}", label=names[j])
        ref = [d.get(k) for d in refs]
        same = all(v is not None and math.isclose(v, ref[0]) for v in ref)
        for j, v in [(j, v) for j, v in enumerate(ref[:1] if same else ref) if v is not None]:
            ax.axhline(v, ls="--", color="grey" if same else f"C{j}", lw=1,
                       label="uniform attention" if j == 0 else None)
        top = max(v for v in [*ref, *(d.get(k) for r in results for d in r)] if v is not None)
        ax.set_ylim(0, 1.08 * top or 1)                     # every statistic is >= 0
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_title(STATS[k][0], fontsize=8)
        ax.set_xlabel("layer", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.axes[0].legend(fontsize=6)
    return fig


# ---- 5. Command line -----------------------------------------------------------------------------
def build_parser():
    p = argparse.ArgumentParser(prog="visualize.py", description=__doc__.split("\n")[0])
    add, src = p.add_argument, p.add_mutually_exclusive_group()
    add("checkpoint", help="checkpoint.pt of train.py (first: --compare takes several paths)")
    src.add_argument("--images", nargs="+", metavar="FILE", help="image files to show")
    src.add_argument("--indices", nargs="+", type=train.NATURAL, default=[0, 1, 2], help="images "
                     "of the test split of the checkpoint's data set (default: 0 1 2)")
    add("--data", help="data root (default: the checkpoint's --data)")
    add("--queries", nargs="+", metavar="R,C|I",
        help="query patches as row,col or row-major index (default: centre and 0,0)")
    add("--layers", nargs="+", type=int, default=[-1],
        help="main blocks, 1-based; negative counts from the end (default: -1)")
    add("--what", nargs="+", choices=FIGURES, metavar="FIGURE", help=f"some of {', '.join(FIGURES)}"
        f" (default: all, compare only with --compare; with --stats, none)")
    add("--compare", nargs="+", metavar="CKPT", help="one or two other checkpoints (e.g. the "
        "baselines): the compare figure, and their --stats too")
    add("--stats", action="store_true", help="Figure 1 as numbers per block (proxy share, "
        "attention distance, query dependence, region consistency, proxy diversity) on the first "
        "--stats-images test images: a table per model, attn_stats.json beside the checkpoint, "
        "attn_stats.png in --out; no other figure unless --what names some")
    add("--stats-images", type=train.COUNT, metavar="N", help=f"with --stats: the first N test "
        f"images (default: {STATS_IMAGES}, or all if fewer)")
    add("--log", help="log.jsonl (default: beside the checkpoint)")
    add("--out", help="folder for the PNGs (default: <checkpoint folder>/figures)")
    add("--seed", type=train.NATURAL, default=0, help="seed of the masks (default: 0)")
    return train.one_line_errors(p)


def format_stat(d, k):
    """A cell of the --stats table: the label (d None), '-' for undefined, else 2 or 3 decimals."""
    return (STATS[k][0] if d is None else "-" if d[k] is None else
            f"{d[k]:.{2 if k == 'distance' else 3}f}")


def run_stats(args, argv, runs, ckpt):
    """--stats: print, and write to attn_stats.json, each run's statistics -> attn_stats.png."""
    dataset, want, cfg = ckpt["args"]["dataset"], args.stats_images or STATS_IMAGES, runs[0][0].cfg
    n, batches = load_images(ckpt["args"], cfg.img_size, first=want, root=args.data,
                             batch=25)  # ViT-B/16: 0.6 GB of attention weights per batch
    if n < want:
        print(f"note: the {dataset} test split has {n} images: using all of them")
    threshold, known = train.FOREGROUND_THRESHOLD.get(dataset), train.FOREGROUND_THRESHOLD
    if threshold is None:
        print(f"note: no region consistency: {dataset} images have no plain background a "
              f"threshold can tell from the object (only {' and '.join(known)})")
    results = attention_stats(runs, batches, threshold)
    keys, paths = list(results[0][0]), [args.checkpoint, *(args.compare or [])]
    refs = [{k: v for k, v in uniform_reference(m.cfg.num_proxies, math.isqrt(
        cfg.num_patches)).items() if k in keys} for m, _, _ in runs]
    print(f"attention of the main blocks on the first {n} images of the {dataset} test split: "
          f"head-averaged maps of every patch query, renormalised over the patch keys" + (
              "" if threshold is None else f"\nforeground: the patches whose raw mean intensity "
              f"is above {threshold}"))
    for (m, _, name), path, result, ref in zip(runs, paths, results, refs):  # a table per model
        print(f"\n{name}: {path} (P {m.cfg.num_proxies}, mask ratio {m.cfg.mask_ratio:g}, "
              f"depth {m.cfg.depth})")
        for title, d in [("layer", None), *enumerate(result, 1), ("uniform", ref)]:
            print(f"{title:<7}" + "".join(f"{format_stat(d, k):>13}" for k in keys))
    print("\n" + "\n".join(f"  {STATS[k][0]}: {STATS[k][1]}" for k in keys))
    report = dict(command="python visualize.py " + shlex.join(argv), images=dict(
        dataset=dataset, split="test", count=n, data=args.data or ckpt["args"].get("data")),
        maps=MAPS, foreground_threshold=threshold, statistics={k: STATS[k][1] for k in keys},
        models=[dict(name=name, checkpoint=path, config=asdict(m.cfg), uniform=ref, layers=[
            {"layer": i, **d} for i, d in enumerate(result, 1)])
            for (m, _, name), path, ref, result in zip(runs, paths, refs, results)])
    path = os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "attn_stats.json")
    train.write_json(path, report)
    print(f"wrote {path}")
    return figure_stats(results, [name for _, _, name in runs], refs, f"attention per main "
                        f"block, first {n} {dataset} test images (dashed: uniform attention)")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.compare and len(args.compare) > 2:
        raise SystemExit(f"error: --compare takes one or two checkpoints, got {len(args.compare)}")
    if args.stats_images is not None and not args.stats:
        raise SystemExit("error: --stats-images needs --stats")
    folder = os.path.dirname(os.path.abspath(args.checkpoint))
    out = train.check_output(args.out or os.path.join(folder, "figures"), folder=True)
    model, ckpt = train.load_model(args.checkpoint)
    cfg = model.cfg
    what = set(args.what or ([] if args.stats else FIGURES[:None if args.compare else -1]))
    if "compare" in what and not args.compare:
        raise SystemExit("error: --what compare needs --compare OTHER_CHECKPOINT")
    queries = parse_queries(args.queries, cfg.img_size // cfg.patch_size)
    runs, layers = [(model, ckpt)], [resolve_layers(args.layers, cfg.depth)]  # layers per run
    for path in args.compare or []:
        runs.append(train.load_model(path))
        oc = runs[-1][0].cfg
        if (oc.img_size, oc.patch_size) != (cfg.img_size, cfg.patch_size):
            raise SystemExit(f"error: cannot compare checkpoints of {cfg.img_size} px images in "
                             f"{cfg.patch_size} px patches and {oc.img_size} px in {oc.patch_size}"
                             f" px ({path}): both need the same image and patch size")
        layers.append(resolve_layers(args.layers, oc.depth))  # negative: from its own end
    names = ["baseline" if m.cfg.baseline else "SemanticMIM" for m, _ in runs]  # clash: + P, ratio
    names = [f"{n} P{m.cfg.num_proxies} m{m.cfg.mask_ratio:g}" if names.count(n) > 1 else n
             for n, (m, _) in zip(names, runs)]
    runs = [(m, c, f"{n} {chr(65 + i)}" if names.count(n) > 1 else n)
            for i, (n, (m, c)) in enumerate(zip(names, runs))]
    log_path = args.log or os.path.join(folder, "log.jsonl")
    if args.log and not os.path.isfile(args.log):
        raise SystemExit(f"error: no training log at {args.log}: pass the run's log.jsonl, or "
                         f"leave --log out")
    if what - {"curve"}:
        raw = next(load_images(ckpt["args"], cfg.img_size, args.images, args.indices,
                               root=args.data)[1])          # (B, 3, S, S)
        imgs = normalise(raw, ckpt)                         # (B, 3, S, S)
    os.makedirs(out, exist_ok=True)
    figs = {"attn_stats.png": run_stats(args, argv, runs, ckpt)} if args.stats else {}
    if cfg.num_proxies == 0 and what & {"reduce_mean", "proxy"}:
        print("note: this model has no proxies: skipped the reduce-mean and proxy maps")
        what -= {"reduce_mean", "proxy"}
    if what & {"query", "reduce_mean", "proxy", "compare"}:
        figs.update(attention_figures(raw, runs, queries, layers, what))
    if what & {"mask_proxy", "recon"}:
        ids_keep, ids_mask, pred, attn = masked_prediction(model, imgs, args.seed)
    if "mask_proxy" in what and cfg.baseline:
        print("note: the baseline has no mask stream: skipped the mask-to-proxy maps")
    elif "mask_proxy" in what:
        figs.update({f"mask_to_proxy_layer{la}.png": figure_mask_to_proxy(
            raw, ids_keep, ids_mask, attn["mask"][la - 1], la, cfg) for la in layers[0]})
    if "recon" in what:
        figs["recon.png"] = figure_recon(raw, imgs, ids_keep, ids_mask, pred, model, ckpt)
    recs = train.read_log(log_path) if "curve" in what and os.path.isfile(log_path) else []
    figs.update({"curve.png": figure_curve(recs, log_path)} if recs else {})
    if "curve" in what and not recs:
        print(f"note: {log_path} is empty: skipped the training curve" if os.path.isfile(log_path)
              else f"note: no training log at {log_path}: skipped the training curve")
    figs = dict(sorted(figs.items(), key=lambda f: f[0].startswith("compare")))  # compare last
    for name, fig in figs.items():                          # the one place figures are saved
        train.write_atomic(os.path.join(out, name), lambda tmp, fig=fig: fig.savefig(
            tmp, dpi=DPI, format="png"), "the figure")
    print(f"wrote {len(figs)} figure(s) to {out}:" + "".join(f"\n  {name}" for name in figs))
    return [os.path.join(out, name) for name in figs]


if __name__ == "__main__":
    train.run_main(main)
