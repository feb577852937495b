"""Pictures of a train.py checkpoint: attention maps (PAPER.md §7), reconstructions, loss curve.

    python visualize.py out/checkpoint.pt                    # every figure, into out/figures/
    python visualize.py out/checkpoint.pt --compare base/checkpoint.pt --what compare
    python visualize.py out/checkpoint.pt --images cat.jpg --queries 3,4 0 --layers 2 -1

The model is rebuilt from the config stored in the checkpoint; the images are either files
(resized and centre-cropped like the test split of an image folder) or indices into the test split
of the checkpoint's data set. All maps are computed by the small pure functions of sections 2-3
(tensors in, tensors out) and only drawn in section 5.

Attention maps are head-averaged softmax weights of a main block on [PROXY; all N patches] of
unmasked images (the downstream path, model.features), restricted to the patch keys and NOT
renormalised: the weight a query puts on the proxies is left out of its map (the figures print
it). Shapes: B images, N patches on an h x w grid, P proxies, Q query patches, Nm masked patches.
"""
import argparse
import json
import math
import os

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

import semanticmim as sm  # noqa: E402
import train  # noqa: E402

FIGURES = ("query", "reduce_mean", "proxy", "mask_proxy", "recon", "curve", "compare")
DPI, PANEL = 100, 1.6            # dots per inch, inches per image panel


# --------------------------------------------------------------------------------------------
# 1. Inputs: checkpoints and images (raw images are floats in [0, 1], (B, 3, S, S))
# --------------------------------------------------------------------------------------------
def load_model(path):
    """(model in eval mode, checkpoint dict); a one-line SystemExit for a missing or bad file."""
    try:
        model, ckpt = sm.load_checkpoint(path, map_location="cpu")
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    return model.eval(), ckpt


def load_image_files(paths, size):
    """Image files -> raw (B, 3, size, size): resized and centre-cropped as train.py's test
    transform of image folders, not normalised."""
    from PIL import Image
    to_tensor = train.folder_transform(size, False, (0.0,) * 3, (1.0,) * 3)  # identity Normalize
    imgs = []
    for path in paths:
        if not os.path.isfile(path):
            raise SystemExit(f"error: no image file {path}")
        try:
            imgs.append(to_tensor(Image.open(path).convert("RGB")))   # (3, size, size)
        except OSError as e:
            raise SystemExit(f"error: cannot read image {path} ({e})") from None
    return torch.stack(imgs)                                # (B, 3, size, size)


def load_dataset_images(ckpt_args, indices, size, root=None):
    """Images `indices` of the test split of the checkpoint's data set -> raw (B, 3, size, size)."""
    name, root = ckpt_args["dataset"], root or ckpt_args["data"]
    if name == "imagefolder":
        import torchvision
        folder = train.find_image_folder(root, "val")
        try:
            ds = torchvision.datasets.ImageFolder(
                folder, transform=train.folder_transform(size, False, (0.0,) * 3, (1.0,) * 3))
        except (FileNotFoundError, RuntimeError) as e:
            raise SystemExit(f"error: {folder} is not an image folder ({e})") from None
        n, get = len(ds), (lambda i: ds[i][0])
    else:
        images, _ = train.load_memory_dataset(name, root, False, size,
                                              ckpt_args.get("synthetic_size", 1024))
        n, get = len(images), (lambda i: images[i])
    bad = [i for i in indices if not 0 <= i < n]
    if bad:
        raise SystemExit(f"error: image index {bad[0]} is out of range: the {name} test split "
                         f"has {n} images (choose 0..{n - 1})")
    imgs = torch.stack([get(i) for i in indices])           # (B, C, h, w), uint8 or [0, 1]
    return train.to_model_input(imgs, size, (0.0,) * 3, (1.0,) * 3)  # (B, 3, size, size)


def normalise(raw, ckpt):
    """Raw images -> model input, with the mean/std of the checkpoint's data set."""
    mean, std = train.MEAN_STD[ckpt["args"]["dataset"]]
    return train.to_model_input(raw, raw.shape[-1], mean, std)  # (B, 3, S, S)


def denormalise(x, ckpt):
    """Model-space images (B, 3, S, S) -> raw [0, 1] images for display."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1)
                 for v in train.MEAN_STD[ckpt["args"]["dataset"]])  # (1, 3, 1, 1) each
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
    """PAPER.md §7 "reduce mean": each patch-query map (B, Q, N) minus the mean of the proxy
    maps (B, P, N) over proxies (and, as proxy_maps already averaged them, heads)."""
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
# 3. Reconstructions and HOG glyphs: pure functions on tensors
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
# 4. Running a model on the images
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


# --------------------------------------------------------------------------------------------
# 5. Drawing
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
    """compare_attn_layer<L>.png: the patch-query maps of two checkpoints side by side (the
    paper's Figure 1): a row per image, for each query a column per checkpoint."""
    p, grid, B = cfg.patch_size, cfg.img_size // cfg.patch_size, raw.shape[0]
    for la, lb in zip(*layers):
        heat = [upsample(attention_maps(m, normalise(raw, c), layer, queries)["query"], grid, p)
                for (m, c, _), layer in zip(runs, (la, lb))]  # 2 x (B, Q, H, W)
        fig, axes = grid_figure(B, 2 * len(queries), f"patch-query attention, layer {la}"
                                + (f" vs {lb}" if lb != la else ""))
        for b in range(B):
            for k, q in enumerate(queries):
                for j, (_, _, name) in enumerate(runs):
                    overlay(axes[b, 2 * k + j], raw[b], heat[j][b, k],
                            f"{name}, {query_name(q, grid)}", query=q, p=p, grid=grid)
        save(fig, out, f"compare_attn_layer{la}.png", written)


# --------------------------------------------------------------------------------------------
# 6. Command line
# --------------------------------------------------------------------------------------------
def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="checkpoint.pt written by train.py")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--images", nargs="+", metavar="FILE", help="image files to show")
    src.add_argument("--indices", nargs="+", type=int, default=[0, 1, 2],
                     help="images of the test split of the checkpoint's data set "
                     "(default: 0 1 2)")
    p.add_argument("--data", default=None, help="data root (default: the checkpoint's --data)")
    p.add_argument("--queries", nargs="+", metavar="R,C|I", default=None,
                   help="query patches as row,col or row-major index (default: centre and 0,0)")
    p.add_argument("--layers", nargs="+", type=int, default=[-1],
                   help="main blocks, 1-based; negative counts from the end (default: -1)")
    p.add_argument("--what", nargs="+", choices=FIGURES, default=None, metavar="FIGURE",
                   help=f"some of {', '.join(FIGURES)} (default: all; compare needs --compare)")
    p.add_argument("--compare", metavar="CKPT", help="second checkpoint (e.g. the baseline), "
                   "drawn beside the first on the same images and queries")
    p.add_argument("--log", default=None, help="log.jsonl (default: beside the checkpoint)")
    p.add_argument("--out", default=None, help="folder for the PNGs (default: "
                   "<checkpoint folder>/figures)")
    p.add_argument("--seed", type=int, default=0, help="seed of the masks (default: 0)")
    return p


def load_compare(path, cfg, layers):
    """(model, checkpoint, layers) of the --compare checkpoint; refused unless it cuts images of
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


def main(argv=None):
    args = build_parser().parse_args(argv)
    model, ckpt = load_model(args.checkpoint)
    cfg = model.cfg
    grid = cfg.img_size // cfg.patch_size
    what = set(args.what or [f for f in FIGURES if f != "compare" or args.compare])
    if "compare" in what and not args.compare:
        raise SystemExit("error: --what compare needs --compare OTHER_CHECKPOINT")
    queries = parse_queries(args.queries, grid)
    layers = resolve_layers(args.layers, cfg.depth)
    if args.compare:
        other, other_ckpt, other_layers = load_compare(args.compare, cfg, args.layers)
        names = [label(cfg), label(other.cfg)]
        names = names if names[0] != names[1] else [f"{n} {ab}" for n, ab in zip(names, "AB")]
        runs = [(model, ckpt, names[0]), (other, other_ckpt, names[1])]
    log_path = args.log or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)),
                                        "log.jsonl")
    if args.log and not os.path.isfile(args.log):
        raise SystemExit(f"error: no training log at {args.log}")
    if args.images:
        raw = load_image_files(args.images, cfg.img_size)   # (B, 3, S, S)
    else:
        raw = load_dataset_images(ckpt["args"], args.indices, cfg.img_size, args.data)
    imgs = normalise(raw, ckpt)                             # (B, 3, S, S)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "figures")
    os.makedirs(out, exist_ok=True)

    written = []
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
        figure_compare(raw, runs, queries, (layers, other_layers), cfg, out, written)
    print(f"wrote {len(written)} figure(s) to {out}:")
    for path in written:
        print("  " + os.path.basename(path))
    return written


if __name__ == "__main__":
    main()
