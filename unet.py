"""A class-conditional UNet that reads the digit label the way Stable Diffusion reads a prompt.

The label is embedded as a short sequence of context tokens (Stable Diffusion: the text
encoder's output); transformer blocks inside the UNet attend to it with cross-attention,
whose projections are ``nn.Linear`` layers named ``Wq``, ``Wk``, ``Wv`` as in the tutorial,
so LoRA can find them by name.

Why at least two context tokens: with one key, softmax over keys is identically 1, the
attention output is Wv(context) whatever the query, and Wq and Wk receive exactly zero
gradient (the tutorial's bug). With several tokens the query selects among them.

Layout (fast preset, 28x28, ``patch_size`` 2, ``channels`` (64, 128)): the image is folded into
14x14x4 patches; conv_in -> level 0 at 14x14 (res) -> down to 7x7 -> level 1 (res + transformer)
-> middle (res, transformer, res) -> the mirrored up path with skip connections -> GroupNorm,
SiLU, conv_out -> unfolded back to 28x28. Each level after the first halves the resolution;
``attn_levels`` says which levels get a transformer block.

``arch="tutorial"`` (the tutorial preset) is the tutorial's network instead: one residual block per
level at 48, 24, 12, 6 and 3 pixels (channels 64..1024), each followed by a small cross-attention
to the label (``CrossAttentionBlock``: Wq, Wk, Wv ``attn_dim`` = 16 wide, a feed-forward 32 wide,
no self-attention), max-pooling on the way down, a 2x2 transposed convolution and one skip per
level on the way up, no middle block: nine cross-attentions in all.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F



# w is embedded as a step would be after this factor, as LCM's guidance_scale_embedding (w x 1000): one unit of w
# spans as many sinusoid periods as the 1,000 steps do
W_EMBED_SCALE = 1000.0


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of integer timesteps (Vaswani et al. 2017; Ho et al. 2020), (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def position_code(h, w, dim, device, dtype, max_period=100.0):
    """A fixed 2-D sine/cosine position code (h*w, dim) for a feature map's tokens, row-major.

    A quarter of the channels are sines and cosines of the row at ``dim // 4`` frequencies from 1 to
    1/max_period, a quarter the same of the column, as in ViT and MAE's 2-D sine-cosine embedding;
    channels left over (dim not a multiple of 4) are 0. It has no parameters, so a checkpoint does
    not change shape; it is what lets attention, and a LoRA on Wq/Wk/Wv, tell the top of a digit
    from its bottom (Stable Diffusion's transformer blocks have none and rely on convolution padding)."""
    q = dim // 4
    freqs = torch.exp(-math.log(max_period) * torch.arange(q, device=device, dtype=torch.float32) / max(q, 1))

    def axis(n):  # (n, 2q): sines, then cosines, of positions 0..n-1
        a = torch.arange(n, device=device, dtype=torch.float32)[:, None] * freqs
        return torch.cat([a.sin(), a.cos()], 1)
    code = torch.cat([axis(h)[:, None, :].expand(h, w, 2 * q), axis(w)[None, :, :].expand(h, w, 2 * q)], -1)
    return F.pad(code.reshape(h * w, 4 * q), (0, dim - 4 * q)).to(dtype)


def norm(channels):
    """GroupNorm with up to 8 groups (32 in Stable Diffusion, which has far wider layers)."""
    groups = math.gcd(channels, 8)
    return nn.GroupNorm(groups, channels)


class ResBlock(nn.Module):
    def __init__(self, c_in, c_out, time_dim, dropout=0.0):
        super().__init__()
        self.norm1 = norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, c_out)
        self.norm2 = norm(c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, t_emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_proj(t_emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head attention; self-attention when ``context`` is None, cross-attention otherwise."""

    def __init__(self, dim, num_heads, context_dim=None, inner_dim=None):
        super().__init__()
        self.num_heads = num_heads
        context_dim = context_dim or dim
        inner_dim = inner_dim or dim  # width of q, k, v: the block's channels in Stable Diffusion, 16 in the tutorial
        self.Wq = nn.Linear(dim, inner_dim, bias=False)
        self.Wk = nn.Linear(context_dim, inner_dim, bias=False)
        self.Wv = nn.Linear(context_dim, inner_dim, bias=False)
        self.Wo = nn.Linear(inner_dim, dim)

    def forward(self, x, context=None):
        context = x if context is None else context
        B, L, _ = x.shape
        H = self.num_heads
        q = self.Wq(x).view(B, L, H, -1).transpose(1, 2)  # (B, H, L, Dh)
        k = self.Wk(context).view(B, -1, H, q.shape[-1]).transpose(1, 2)  # (B, H, S, Dh)
        v = self.Wv(context).view(B, -1, H, q.shape[-1]).transpose(1, 2)
        if x.device.type == "cpu":
            # The plain formula: at these sizes (49 tokens) PyTorch's fused CPU kernel is slower, its bf16
            # backward most of all (experiments/performance/notes.md, "Attention on a CPU").
            w = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)  # (B, H, L, S)
            out = w.softmax(dim=-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(Dh)) v, fused
        return self.Wo(out.transpose(1, 2).reshape(B, L, -1))  # (B, L, H * Dh) -> (B, L, dim)


class TransformerBlock(nn.Module):
    """Stable Diffusion's BasicTransformerBlock: self-attention, cross-attention to the label, feed-forward."""

    def __init__(self, dim, num_heads, context_dim):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, num_heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Feature map (B, C, H, W) -> tokens (B, HW, C) (+ the position code) -> transformer block -> back, with a
    residual."""

    def __init__(self, channels, num_heads, context_dim, pos_emb=False):
        super().__init__()
        self.pos_emb = pos_emb
        self.norm = norm(channels)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.block = TransformerBlock(channels, num_heads, context_dim)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x, context):
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x))
        h = h.flatten(2).transpose(1, 2)  # (B, HW, C)
        if self.pos_emb:
            h = h + position_code(H, W, C, h.device, h.dtype)
        h = self.block(h, context)
        h = h.transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class CrossAttentionBlock(nn.Module):
    """The tutorial's cross-attention on a feature map: every pixel queries the label tokens.

    Post-norm as in the tutorial (and Vaswani et al. 2017): h = LayerNorm(x + attention(x, context)),
    then LayerNorm(h + feed-forward(h)); q, k, v are ``attn_dim`` wide, the feed-forward ``ff_dim``
    (none when 0). No self-attention: the pixels see each other only through the convolutions."""

    def __init__(self, channels, num_heads, context_dim, attn_dim, ff_dim):
        super().__init__()
        self.attn = Attention(channels, num_heads, context_dim, attn_dim)
        self.norm1 = nn.LayerNorm(channels)
        self.ff = nn.Sequential(nn.Linear(channels, ff_dim), nn.ReLU(), nn.Linear(ff_dim, channels)) if ff_dim else None
        self.norm2 = nn.LayerNorm(channels) if ff_dim else None

    def forward(self, x, context):
        B, C, H, W = x.shape
        h = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        h = self.norm1(h + self.attn(h, context))
        if self.ff is not None:
            h = self.norm2(h + self.ff(h))
        return h.transpose(1, 2).reshape(B, C, H, W)


class NoAttention(nn.Module):
    """Stands in for an attention block at levels without attention."""

    def forward(self, x, context):
        return x


class UNetLevel(nn.Module):
    """Residual blocks, each followed by an attention block (``attn(channels)``) when ``attn`` is given."""

    def __init__(self, c_ins, c_out, time_dim, dropout, attn=None):
        super().__init__()
        self.res = nn.ModuleList(ResBlock(c, c_out, time_dim, dropout) for c in c_ins)
        self.attn = nn.ModuleList(attn(c_out) if attn else NoAttention() for _ in c_ins)


class UNet(nn.Module):
    """``cfg.arch`` "sd": Stable Diffusion's layout; "tutorial": the tutorial's (see the module docstring)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.w_embed = None  # a speed adapter's guidance input (distill.py), not part of the base
        ch = cfg.channels
        td = cfg.time_dim
        self.time_mlp = nn.Sequential(nn.Linear(td, td), nn.SiLU(), nn.Linear(td, td))
        # num_classes + 1 rows: the last one is the "null" label used for classifier-free guidance
        self.label_emb = nn.Embedding(cfg.num_classes + 1, cfg.context_tokens * cfg.context_dim)
        # patch_size p > 1 folds each p x p patch into channels (space-to-depth, as the patching of
        # Hoogeboom et al. 2023 "simple diffusion" and DiT): p*p fewer positions at every level.
        self.conv_in = nn.Conv2d(cfg.in_channels * cfg.patch_size ** 2, ch[0], 3, padding=1)
        if cfg.arch == "tutorial":
            self._build_tutorial(cfg)
        else:
            self._build_sd(cfg)
        self.norm_out = norm(ch[0])
        self.conv_out = nn.Conv2d(ch[0], cfg.in_channels * cfg.patch_size ** 2, 3, padding=1)

    def _build_sd(self, cfg):
        ch, n, td = cfg.channels, cfg.num_res_blocks, cfg.time_dim

        def level(c_ins, c_out, i):
            attn = ((lambda c: SpatialTransformer(c, cfg.num_heads, cfg.context_dim, cfg.pos_emb))
                    if i in cfg.attn_levels else None)
            return UNetLevel(c_ins, c_out, td, cfg.dropout, attn)

        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        c_prev = ch[0]
        for i, c in enumerate(ch):
            self.down.append(level([c_prev] + [c] * (n - 1), c, i))
            if i < len(ch) - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
            c_prev = c
        self.mid1 = ResBlock(ch[-1], ch[-1], td, cfg.dropout)
        self.mid_attn = SpatialTransformer(ch[-1], cfg.num_heads, cfg.context_dim, cfg.pos_emb)
        self.mid2 = ResBlock(ch[-1], ch[-1], td, cfg.dropout)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i in reversed(range(len(ch))):
            # each block of the up path sees the previous output concatenated with a skip
            self.up.append(level([c_prev + ch[i]] + [2 * ch[i]] * (n - 1), ch[i], i))
            if i > 0:
                self.upsample.append(nn.Conv2d(ch[i], ch[i - 1], 3, padding=1))
            c_prev = ch[i] if i == 0 else ch[i - 1]

    def _build_tutorial(self, cfg):
        """The tutorial's encoder and decoder: no middle block; the deepest level's block is the bottom."""
        ch, n, td = cfg.channels, cfg.num_res_blocks, cfg.time_dim

        def level(c_ins, c_out, i):
            attn = ((lambda c: CrossAttentionBlock(c, cfg.num_heads, cfg.context_dim, cfg.attn_dim, cfg.ff_dim))
                    if i in cfg.attn_levels else None)
            return UNetLevel(c_ins, c_out, td, cfg.dropout, attn)

        self.down = nn.ModuleList(level([ch[max(i - 1, 0)]] + [c] * (n - 1), c, i) for i, c in enumerate(ch))
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i in reversed(range(len(ch) - 1)):
            # a 2x2 transposed convolution doubles the size and halves the channels; the skip of the same
            # size is concatenated to it, so the first block of each level sees 2 * ch[i] channels
            self.upsample.append(nn.ConvTranspose2d(ch[i + 1], ch[i], 2, stride=2))
            self.up.append(level([2 * ch[i]] + [ch[i]] * (n - 1), ch[i], i))

    def context(self, labels):
        """Labels (B,) -> context tokens (B, context_tokens, context_dim): the "prompt"."""
        return self.label_emb(labels).view(labels.shape[0], self.cfg.context_tokens, self.cfg.context_dim)

    def forward(self, x, t, labels, w=None):
        """x (B, C, H, W), t (B,) integer steps, labels (B,) in 0..num_classes -> predicted noise (B, C, H, W).

        ``w`` (B,), the guidance scale, is read only when a speed adapter gave the model ``w_embed`` (distill.py):
        its embedding is added to the step's before the time MLP, as diffusers' ``time_cond_proj`` adds LCM's."""
        t_in = timestep_embedding(t, self.cfg.time_dim)
        if w is not None and self.w_embed is not None:
            t_in = t_in + self.w_embed(timestep_embedding(w * W_EMBED_SCALE, self.cfg.time_dim))
        t_emb = self.time_mlp(t_in)
        ctx = self.context(labels)
        h = self.conv_in(F.pixel_unshuffle(x, self.cfg.patch_size))
        body = self._tutorial_body if self.cfg.arch == "tutorial" else self._sd_body
        h = body(h, t_emb, ctx)
        return F.pixel_shuffle(self.conv_out(F.silu(self.norm_out(h))), self.cfg.patch_size)

    def _sd_body(self, h, t_emb, ctx):
        skips = []
        for i, lvl in enumerate(self.down):
            for res, attn in zip(lvl.res, lvl.attn):
                h = res(h, t_emb)
                h = attn(h, ctx)
                skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.mid2(self.mid_attn(self.mid1(h, t_emb), ctx), t_emb)
        for i, lvl in enumerate(self.up):
            for res, attn in zip(lvl.res, lvl.attn):
                h = res(torch.cat([h, skips.pop()], dim=1), t_emb)
                h = attn(h, ctx)
            if i < len(self.upsample):
                h = self.upsample[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return h

    def _tutorial_body(self, h, t_emb, ctx):
        skips = []
        for i, lvl in enumerate(self.down):
            for res, attn in zip(lvl.res, lvl.attn):
                h = attn(res(h, t_emb), ctx)
            if i < len(self.down) - 1:
                skips.append(h)  # one skip per level, the level's last output
                h = F.max_pool2d(h, 2)
        for upsample, lvl in zip(self.upsample, self.up):
            h = torch.cat([skips.pop(), upsample(h)], dim=1)  # (B, 2 ch[i], H, W)
            for res, attn in zip(lvl.res, lvl.attn):
                h = attn(res(h, t_emb), ctx)
        return h


def count_parameters(module, trainable_only=False):
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
