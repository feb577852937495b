"""SemanticMIM (Yuan, Dou, Guo, Li, arXiv 2406.10673) in one file of plain PyTorch.

Contrastive learning *compresses* an image into one vector: semantic, but blind to where things
are. Masked image modeling (MIM) *reconstructs* masked patches from visible ones: it keeps
positions, but a patch can be predicted by copying its neighbours, so features stay local.
SemanticMIM chains the two phases named in the paper's abstract:

  compression     the visible patches ([IMG] tokens) and P learned [PROXY] tokens go through the
                  main transformer stack together, so the proxies gather the image;
  reconstruction  one [MASK] token per masked patch (a shared learned vector plus the patch's
                  position) goes through a second stack, the mask stack, that attends to the
                  proxies and to the [MASK] tokens, and never to an [IMG] token.

Everything the loss learns about the image passes the P proxies. There is no contrastive loss and
no loss on the proxies: the only objective is MIM regression on the [MASK] outputs (the HOG of each
masked patch, as the authors' MaskFeat variant, or its normalised pixels, as MAE).

Who attends to whom, at every depth i (SemanticMIM.predict):

    query ↓  key →   [PROXY]                     [IMG]     [MASK]
    [PROXY], [IMG]   main block i                main i    never
    [MASK]           mask block i, reading the   never     mask block i
                     proxies output by main i

Why two stacks and not one transformer with an attention mask: the authors' code
(maskfeat/maskfeat.py, MaskFeatViTOurs, in github.com/yyk-wew/SemanticMIM) gives the mask stream
its own weights, and mask block i reads the proxies *after* main block i. A shared-weight stack
with a block mask would share weights and read the proxies *entering* depth i; the tests check
that ours does neither. After pre-training only the main stack is kept, an ordinary ViT with P
prefix tokens (SemanticMIM.features); the mask stack, [MASK] token and head are for pre-training.

The baseline switch (Config.baseline) is the paper's comparison, one-stream MIM with the same code:
[PROXY; IMG; MASK] go through the main stack with full self-attention, so a [MASK] token may copy
its visible neighbours. With num_proxies=1 and mask_ratio=0.4 it has the settings of the authors'
MaskFeat baseline (configs/maskfeat/maskfeat_baseline_pretrain.py; its prefix token is a [CLS]).

Sections, in the order of the method: 1 the Config (every architecture setting; each checkpoint
stores it, and model_from_checkpoint rebuilds exactly that model), 2 patches and masking,
3 attention with separate query and key/value inputs and the pre-norm block, 4 the model,
5 the targets. Shapes: B images, N patches, P proxies, Nv visible and Nm masked patches, D width,
H heads, T target dims (108 for HOG with 2x2 cells per patch, p*p*3 for pixels).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


# ---- 1. Config and presets -----------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    """Every architecture setting; saved in each checkpoint and used to rebuild the model."""
    img_size: int = 32
    patch_size: int = 4
    dim: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    num_proxies: int = 8        # P; 8 in the authors' maskfeat_bottleneck_pretrain.py
    mask_ratio: float = 0.8     # ceil(N * mask_ratio) patches are masked in every image
    target: str = "hog"         # "hog" (the paper's MaskFeat variant) or "pixel" (MAE style)
    baseline: bool = False      # True: the paper's one-stream MIM comparison, no mask stack
    independent_mask: bool = False  # draw the [MASK]/target set independently of the visible set

    def __post_init__(self):
        p = self.patch_size
        if self.img_size % p:
            raise ValueError(f"image size {self.img_size} is not divisible by patch size {p}: "
                             f"choose an image size that is a multiple of {p}")
        if self.target not in ("hog", "pixel"):
            raise ValueError(f"unknown target {self.target!r}: choose 'hog' or 'pixel'")
        if self.target == "hog" and p % 2:
            raise ValueError(f"the HOG target uses 2x2 cells per patch, so the patch size must be "
                             f"even (got {p}): choose an even patch size or --target pixel")
        if self.dim % self.heads:
            raise ValueError(f"width {self.dim} is not divisible by {self.heads} heads")
        if not self.baseline and self.num_proxies < 1:
            raise ValueError("SemanticMIM needs at least one proxy (the [MASK] stream reads "
                             "only the proxies): set num_proxies >= 1")
        n = self.num_patches
        if not 0 < self.mask_ratio < 1 or math.ceil(n * self.mask_ratio) >= n:
            raise ValueError(f"mask ratio {self.mask_ratio} leaves no visible patch out of {n}: "
                             f"choose a ratio in (0, 1) that keeps at least one")

    @property
    def num_patches(self):
        return (self.img_size // self.patch_size) ** 2

    @property
    def num_masked(self):
        return math.ceil(self.num_patches * self.mask_ratio)

    @property
    def target_dim(self):
        return 3 * 9 * 2 * 2 if self.target == "hog" else self.patch_size ** 2 * 3


PRESETS = {
    # Small enough for a laptop CPU: 64 patches of 4x4 px, 4 blocks of width 128.
    "cifar": Config(img_size=32, patch_size=4, dim=128, depth=4, heads=4),
    # The authors' ViT-B/16 at 224 px, P 8, mask ratio 0.8
    # (configs/maskfeat/maskfeat_bottleneck_pretrain.py of github.com/yyk-wew/SemanticMIM).
    "vit_b16": Config(img_size=224, patch_size=16, dim=768, depth=12, heads=12),
}


# ---- 2. Patches and masking ----------------------------------------------------------------------
def patchify(imgs, p):
    """(B, 3, H, W) -> (B, N, p*p*3), patches in row-major order, pixels (row, col, channel)."""
    B, C, H, W = imgs.shape
    h, w = H // p, W // p
    x = imgs.reshape(B, C, h, p, w, p)                      # (B, C, h, p, w, p)
    x = x.permute(0, 2, 4, 3, 5, 1)                         # (B, h, w, p, p, C)
    return x.reshape(B, h * w, p * p * C)                   # (B, N, p*p*C)


def random_masking(batch, num_patches, num_masked, generator, device, independent=False):
    """Uniform random masks with exactly num_masked = ceil(N * ratio) masked patches per image, as
    the authors' mask generator (SimMIMMaskGeneratorOurs in beit/beit_model.py; ratio 0.8 for
    SemanticMIM, 0.4 for their MaskFeat baseline). Returns index tensors ids_keep (B, N - Nm) and
    ids_mask (B, Nm): fixed shapes per batch.

    With independent=True the [MASK]/target set is drawn apart from the visible set (they may
    overlap). The authors' generator has such an option (separate_mask_ratio) that draws
    ceil(N * separate_mask_ratio) targets, 118 of 196 at their 0.6; ours draws num_masked, the
    size of the masked set, so that the two modes have the same number of [MASK] queries.
    """
    noise = torch.rand(batch, num_patches, generator=generator, device=device)  # (B, N)
    order = noise.argsort(dim=1)                            # (B, N), a random permutation per image
    ids_keep = order[:, num_masked:]                        # (B, Nv)
    if independent:
        noise2 = torch.rand(batch, num_patches, generator=generator, device=device)  # (B, N)
        ids_mask = noise2.argsort(dim=1)[:, :num_masked]   # (B, Nm)
    else:
        ids_mask = order[:, :num_masked]                    # (B, Nm)
    # Sorted into raster order, the order in which the authors' boolean mask map selects tokens:
    # the model is order-equivariant, but so its tokens line up with theirs one for one.
    return ids_keep.sort(dim=1).values, ids_mask.sort(dim=1).values


def gather_tokens(x, ids):
    """x (B, N, C), ids (B, K) -> (B, K, C): the tokens at ids, per image."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


# ---- 3. Attention whose queries and keys/values are separate inputs, and the pre-norm block ------
class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)   # one weight; its q rows apply to the queries only
        self.proj = nn.Linear(dim, dim)

    def forward(self, q_in, kv_in, return_weights=False):
        """q_in (B, Lq, D) attends over kv_in (B, Lk, D) -> (B, Lq, D), (B, H, Lq, Lk) or None."""
        B, Lq, D = q_in.shape
        Lk, H = kv_in.shape[1], self.heads
        if q_in is kv_in:                                   # self-attention: one fused matmul
            qkv = self.qkv(q_in)                            # (B, L, 3D)
            q, kv = qkv[..., :D], qkv[..., D:]              # (B, L, D), (B, L, 2D)
        else:
            q = F.linear(q_in, self.qkv.weight[:D], self.qkv.bias[:D])       # (B, Lq, D)
            kv = F.linear(kv_in, self.qkv.weight[D:], self.qkv.bias[D:])     # (B, Lk, 2D)
        q = q.reshape(B, Lq, H, D // H).transpose(1, 2)     # (B, H, Lq, Dh)
        k, v = kv.reshape(B, Lk, 2, H, D // H).permute(2, 0, 3, 1, 4)  # 2 x (B, H, Lk, Dh)
        if return_weights:                                  # explicit softmax, for pictures
            weights = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)  # (B, H, Lq, Lk)
            out = weights @ v                               # (B, H, Lq, Dh)
        else:
            weights = None
            out = F.scaled_dot_product_attention(q, k, v)   # (B, H, Lq, Dh)
        out = out.transpose(1, 2).reshape(B, Lq, D)         # (B, Lq, D)
        return self.proj(out), weights


class Block(nn.Module):
    """Pre-norm block: x = x + Attn(LN1(x), LN1([ctx; x])); x = x + MLP(LN2(x)); ctx=None is
    self-attention. As the authors' maskfeat/maskfeat_backbone.py, LN1 normalises queries and
    keys/values; their separate q and kv Linears are one qkv Linear here (same maths; its q rows
    on the queries only), so that self-attention runs one fused matmul."""
    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x, ctx=None, return_weights=False):
        """x (B, L, D), ctx (B, Lc, D) or None -> x (B, L, D), weights (B, H, L, Lc+L) or None."""
        if ctx is None:
            h = kv = self.norm1(x)                          # (B, L, D)
        else:
            kv = self.norm1(torch.cat([ctx, x], dim=1))     # (B, Lc + L, D): LN is per token
            h = kv[:, ctx.shape[1]:]                        # (B, L, D)
        a, weights = self.attn(h, kv, return_weights)
        x = x + a
        x = x + self.mlp(self.norm2(x))
        return x, weights                                   # weights: None unless asked


# ---- 4. The model --------------------------------------------------------------------------------
class SemanticMIM(nn.Module):
    """Main stack over [PROXY; IMG], mask stack over [MASK] reading [PROXY]; with cfg.baseline
    no mask stack, and [PROXY; IMG; MASK] through the main stack (module docstring)."""
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        D, P, N = cfg.dim, cfg.num_proxies, cfg.num_patches
        self.patch_embed = nn.Linear(cfg.patch_size ** 2 * 3, D)   # a linear map of patchify
        # P proxy entries, then N patch entries, as the authors' table (whose one prefix entry is
        # their [CLS]'s): a proxy's entry adds to its learned token, so it adds no capacity, but
        # it keeps the layout of a standard ViT with prefix tokens, to which the weights map 1:1.
        self.pos_embed = nn.Parameter(torch.zeros(1, P + N, D))
        self.proxy = nn.Parameter(torch.zeros(1, P, D))            # the P [PROXY] tokens
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))       # the one shared [MASK] token
        self.blocks = nn.ModuleList(Block(D, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        if not cfg.baseline:  # separate weights, same depth
            self.mask_blocks = nn.ModuleList(
                Block(D, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(D, eps=1e-6)                      # final LayerNorm
        self.head = nn.Linear(D, cfg.target_dim)                   # linear head for the target
        self.init_weights()

    def init_weights(self):
        """As the authors' maskfeat/maskfeat.py: trunc-normal std 0.02 for the tokens, the
        positions and Linear weights; Linear biases zero; LayerNorm eps 1e-6 (set in the layers).
        Their patch embedding is a Conv2d whose bias keeps PyTorch's default uniform init; ours is
        the equivalent Linear, and its bias starts at zero like every other Linear bias."""
        for t in (self.pos_embed, self.proxy, self.mask_token):
            nn.init.trunc_normal_(t, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def embed(self, imgs):
        """Images -> [PROXY] tokens (B, P, D) and all N [IMG] tokens (B, N, D), with positions."""
        B, _, H, W = imgs.shape
        if H != self.cfg.img_size or W != self.cfg.img_size:
            raise ValueError(f"images are {H}x{W} but the model expects "
                             f"{self.cfg.img_size}x{self.cfg.img_size}: resize them first")
        P = self.cfg.num_proxies
        img = self.patch_embed(patchify(imgs, self.cfg.patch_size))   # (B, N, D)
        img = img + self.pos_embed[:, P:]                              # (B, N, D)
        proxy = (self.proxy + self.pos_embed[:, :P]).expand(B, -1, -1)  # (B, P, D)
        return proxy, img

    def mask_tokens(self, ids_mask):
        """[MASK] token at each masked patch, with that patch's position: (B, Nm, D).

        These inputs hold nothing of the image, only the shared vector and a position, so a
        [MASK] query may attend to the other [MASK] tokens without a leak: whatever of the image
        they carry at depth i, they read from the proxies, as the query itself does."""
        P, B = self.cfg.num_proxies, ids_mask.shape[0]
        pos = self.pos_embed[:, P:].expand(B, -1, -1)           # (B, N, D)
        return self.mask_token + gather_tokens(pos, ids_mask)    # (B, Nm, D)

    def predict(self, imgs, ids_keep, ids_mask, return_attn=False):
        """Predicted targets at the masked patches (B, Nm, T), and a dict of per-depth attention
        weights (empty lists unless return_attn): 'main' (B, H, P+Nv, P+Nv) and, for SemanticMIM,
        'mask' (B, H, Nm, P+Nm) with the proxies first among the keys."""
        P = self.cfg.num_proxies
        proxy, img = self.embed(imgs)                           # (B, P, D), (B, N, D)
        x = torch.cat([proxy, gather_tokens(img, ids_keep)], 1)  # (B, P+Nv, D) = [PROXY; IMG]
        m = self.mask_tokens(ids_mask)                          # (B, Nm, D) = [MASK]
        attn = {"main": [], "mask": []}
        if self.cfg.baseline:                                   # one stream [PROXY; IMG; MASK]
            x = torch.cat([x, m], 1)                            # (B, P+Nv+Nm, D)
            for blk in self.blocks:
                x, w = blk(x, return_weights=return_attn)
                attn["main"] += [w] if return_attn else []
            m = x[:, -m.shape[1]:]                              # (B, Nm, D)
        else:
            for blk, mblk in zip(self.blocks, self.mask_blocks):
                # compression: [PROXY; IMG] attend to [PROXY; IMG]
                x, w = blk(x, return_weights=return_attn)       # (B, P+Nv, D)
                # reconstruction: [MASK] attends to [PROXY (output of this depth); MASK]
                m, wm = mblk(m, x[:, :P], return_weights=return_attn)  # (B, Nm, D)
                attn["main"] += [w] if return_attn else []
                attn["mask"] += [wm] if return_attn else []
        return self.head(self.norm(m)), attn                    # (B, Nm, T)

    def forward(self, imgs, ids_keep, ids_mask):
        """The training objective: MSE between prediction and target on masked patches only."""
        pred, _ = self.predict(imgs, ids_keep, ids_mask)        # (B, Nm, T)
        target = gather_tokens(self.target(imgs), ids_mask)     # (B, Nm, T)
        return F.mse_loss(pred.float(), target)

    @torch.no_grad()
    def target(self, imgs):
        """Per-patch regression target of all N patches, (B, N, T), in fp32, without gradient.

        Autocast is off here: under bf16 the Sobel convolutions would run in bf16 (8 mantissa
        bits), gradients near a bin edge would change bin, and the target, the thing learned,
        would depend on the precision of the run."""
        with torch.autocast(imgs.device.type, enabled=False):
            imgs = imgs.float()
            if self.cfg.target == "hog":
                return hog_target(imgs, self.cfg.patch_size)
            return pixel_target(imgs, self.cfg.patch_size)

    def features(self, imgs, depth=None, return_attn=False):
        """Downstream path: the main stack alone on [PROXY; all N IMG], no masking, through block
        `depth` (default the last). Returns (outs, attn): for each block 1..depth its proxy
        outputs (B, P, D) and patch outputs (B, N, D), from the residual stream (no final norm);
        and with return_attn each block's weights (B, H, P+N, P+N), else an empty list."""
        depth = self.cfg.depth if depth is None else depth
        if not 1 <= depth <= self.cfg.depth:
            raise ValueError(f"layer {depth} does not exist: choose 1..{self.cfg.depth}")
        P = self.cfg.num_proxies
        x = torch.cat(self.embed(imgs), 1)                      # (B, P+N, D)
        outs, attn = [], []
        for blk in self.blocks[:depth]:
            x, w = blk(x, return_weights=return_attn)           # (B, P+N, D)
            outs.append((x[:, :P], x[:, P:]))                   # (B, P, D), (B, N, D)
            attn += [w] if return_attn else []
        return outs, attn


def model_from_checkpoint(ckpt):
    """The model of a checkpoint dict {"config", "model"}: its stored Config, loaded strictly.
    Departure, on purpose: the authors' configs/maskfeat/maskfeat_cls_ft.py and _linear_probing.py
    build a 1-proxy model and load the 8-proxy checkpoint non-strictly: mmengine warns of the size
    mismatch, the [CLS] and position table are not loaded, VisionTransformerOurs.init_weights
    (maskfeat/maskfeat_backbone.py) skips pos_embed under a pretrained load, so both stay zero,
    and frozen_stages=12 keeps them zero through linear probing."""
    model = SemanticMIM(Config(**ckpt["config"]))
    model.load_state_dict(ckpt["model"], strict=True)
    return model


# ---- 5. Targets ----------------------------------------------------------------------------------
def hog_target(imgs, patch_size, nbins=9):
    """HOG of the (normalised) images as MMPreTrain's MaskFeat HOG generator
    (mmpretrain/models/selfsup/maskfeat.py, used by the authors' code), (B, N, 3*9*2*2).

    Departure, on purpose: that generator hard-codes a 14x14 patch grid (224 px, patch 16); this
    one takes any image size divisible by an even patch size (CIFAR: 32 px, patch 4), 2x2 cells
    per patch (tested at 224/16 and 32/4 against a naive loop). Order (channel, bin, cell r, c)."""
    B, C, H, W = imgs.shape
    p, cell = patch_size, patch_size // 2
    d = torch.arange(-1, 2, dtype=imgs.dtype, device=imgs.device)  # made there: no host sync
    wx = torch.outer(2 - d.abs(), d.flip(0))                # (3, 3) [[1, 0, -1], [2, 0, -2], ...]
    x = F.pad(imgs, (1, 1, 1, 1), mode="reflect")           # (B, C, H+2, W+2)
    gx = F.conv2d(x, wx.expand(C, 1, 3, 3), groups=C)       # (B, C, H, W), depthwise Sobel
    gy = F.conv2d(x, wx.t().expand(C, 1, 3, 3), groups=C)   # (B, C, H, W)
    mag = torch.sqrt(gx ** 2 + gy ** 2)                     # theirs: stack().norm(), <=1 ulp off
    phase = torch.atan2(gx, gy)                             # this argument order, as the authors
    bins = torch.floor(phase / math.pi * nbins).long() % nbins  # 9 unsigned 20-degree bins
    n = torch.arange(p, dtype=imgs.dtype, device=imgs.device)
    g = torch.exp(-0.5 * ((n - n.mean()) / (p // 2)) ** 2)  # (p,) Gaussian, std = p / 2
    window = g[:, None] * g[None, :]                        # (p, p)
    mag = mag * (window / window.sum()).repeat(H // p, W // p)  # weighted within its patch
    hist = torch.zeros(B, C, nbins, H, W, dtype=imgs.dtype, device=imgs.device)
    hist.scatter_add_(2, bins.unsqueeze(2), mag.unsqueeze(2))  # (B, C, 9, H, W), hard assignment
    hist = hist.reshape(B, C, nbins, H // cell, cell, W // cell, cell).sum((4, 6))  # (B,C,9,Hc,Wc)
    hist = F.normalize(hist, p=2, dim=2)                    # L2 over the 9 bins of each cell
    h, w = H // p, W // p
    hist = hist.reshape(B, C, nbins, h, 2, w, 2)            # (B, C, 9, h, 2, w, 2)
    hist = hist.permute(0, 3, 5, 1, 2, 4, 6)                # (B, h, w, C, 9, 2, 2)
    return hist.reshape(B, h * w, C * nbins * 4)            # (B, N, 108)


def patch_stats(patches):
    """Per-patch mean and std (B, N, 1) of patches (B, N, p*p*3), as the pixel target uses them:
    the unbiased variance, as MAE's code (torch.var's default), plus 1e-6."""
    return patches.mean(-1, keepdim=True), (patches.var(-1, keepdim=True) + 1e-6) ** 0.5


def pixel_target(imgs, patch_size):
    """Each patch's pixels normalised by that patch's own mean and std, (B, N, p*p*3)."""
    x = patchify(imgs, patch_size)                          # (B, N, p*p*3)
    mean, std = patch_stats(x)
    return (x - mean) / std
