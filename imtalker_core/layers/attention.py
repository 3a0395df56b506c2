"""Attention layers of the renderer: full attention that can report its map, the guided
sparse resampler, and the transformer / shifted-window blocks of the synthesis network."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Queries per chunk when the head-averaged attention map is reduced to its argmax; bounds memory
# at heads × chunk × keys floats instead of heads × keys² (4096² at the 64² level).
ARGMAX_QUERY_CHUNK = 1024


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class FullAttention(nn.Module):
    """Multi-head attention with separate q/k/v projections (`q_proj`, `k_proj`, `v_proj`, `proj`).

    Sequences are `[B, N, C]`. With `return_argmax=True` it also returns, for every query, the
    key index with the largest head-averaged attention weight (`[B, N]`, int64): what the guided
    resampler needs, without materialising the `[B, heads, N, N]` map.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                return_argmax: bool = False):
        q = _split_heads(self.q_proj(query), self.num_heads)
        k = _split_heads(self.k_proj(key), self.num_heads)
        v = _split_heads(self.v_proj(value), self.num_heads)
        if not return_argmax:
            out = F.scaled_dot_product_attention(q, k, v)
            return self.proj(_merge_heads(out))
        outs, argmaxes = [], []
        # The map is reduced to an argmax that picks whole feature blocks, so it is computed in float32
        # even for half-precision models: fp16 logits could overflow and near-ties would flip often.
        kt, vf = k.float().transpose(-2, -1), v.float()
        for start in range(0, q.shape[2], ARGMAX_QUERY_CHUNK):
            qc = q[:, :, start:start + ARGMAX_QUERY_CHUNK].float()
            # parity: the reference scales the logits after the product, not the queries.
            attn = ((qc @ kt) * self.scale).softmax(dim=-1)
            outs.append((attn @ vf).to(v.dtype))
            argmaxes.append(attn.mean(dim=1).argmax(dim=-1))
        out = self.proj(_merge_heads(torch.cat(outs, dim=2)))
        return out, torch.cat(argmaxes, dim=1)


def guided_resample(value: torch.Tensor, anchor_argmax: torch.Tensor, anchor_size: int) -> torch.Tensor:
    """Guided sparse resampler (top-1): warp a fine feature map with the anchor level's attention.

    Every fine pixel lies in one anchor cell `l`; it takes the mean of the `r×r` block of `value`
    under the anchor cell `argmax[l]` that cell attends to most (`r = H / anchor_size`).

    value: `[B, C, H, W]`; anchor_argmax: `[B, anchor_size²]` key indices. Returns `[B, C, H, W]`.
    """
    b, c, h, w = value.shape
    ratio = h // anchor_size
    assert h == w == ratio * anchor_size, (value.shape, anchor_size)
    # parity: with one sample the softmax over the top-k weights is exactly 1, so each block is
    # averaged with weight 1/r² as in the reference.
    pooled = F.avg_pool2d(value, ratio).flatten(2)  # [B, C, anchor²]
    index = anchor_argmax.unsqueeze(1).expand(b, c, -1)
    warped = pooled.gather(2, index).view(b, c, anchor_size, anchor_size)
    return warped.repeat_interleave(ratio, dim=2).repeat_interleave(ratio, dim=3)


class TransformerBlock(nn.Module):
    """Pre-norm transformer block with learned query/key position embeddings (levels below the
    shifted-window threshold). Input and output `[B, C, H, W]`."""

    def __init__(self, dim: int, resolution: int, num_heads: int, mlp_ratio: float = 2.0):
        super().__init__()
        tokens = resolution * resolution
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = FullAttention(dim, num_heads)
        self.q_pos_embedding = nn.Parameter(torch.randn(1, tokens, dim))
        self.k_pos_embedding = nn.Parameter(torch.randn(1, tokens, dim))
        self.norm_ffn = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        # Indices 0 and 3 hold the weights (official layout: Linear, GELU, Dropout, Linear, Dropout).
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Identity(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        seq = x.flatten(2).transpose(1, 2)
        q = self.norm_q(seq + self.q_pos_embedding)
        k = self.norm_kv(seq + self.k_pos_embedding)
        v = self.norm_kv(seq)
        seq = seq + self.attn(q, k, v)
        seq = seq + self.mlp(self.norm_ffn(seq))
        return seq.transpose(1, 2).reshape(b, c, h, w)


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """`[B, H, W, C]` → `[B * nW, window², C]`, windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def window_reverse(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """Inverse of `window_partition`: `[B * nW, window², C]` → `[B, H, W, C]`."""
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


def relative_position_index(window: int) -> torch.Tensor:
    """Swin relative-position index `[window², window²]` into a `(2w-1)²` bias table."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def shifted_window_mask(resolution: int, window: int, shift: int) -> torch.Tensor:
    """Additive mask `[nW, window², window²]`: -100 between tokens from different regions of the
    cyclically shifted map, 0 within a region (the Swin convention)."""
    region = torch.zeros(1, resolution, resolution, 1)
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for hs in bounds:
        for ws in bounds:
            region[:, hs, ws, :] = label
            label += 1
    ids = window_partition(region, window).squeeze(-1)
    diff = ids.unsqueeze(1) - ids.unsqueeze(2)
    return torch.where(diff != 0, torch.tensor(-100.0), torch.tensor(0.0))


class WindowAttention(nn.Module):
    """Windowed multi-head attention with a learned relative-position bias (`q`, `k`, `v`, `proj`)."""

    def __init__(self, dim: int, num_heads: int, window: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        bw, n, c = q.shape
        q = _split_heads(self.q(q), self.num_heads) * self.scale
        k = _split_heads(self.k(k), self.num_heads)
        v = _split_heads(self.v(v), self.num_heads)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        attn = q @ k.transpose(-2, -1) + bias
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(bw // nw, nw, self.num_heads, n, n) + mask.to(attn.dtype)[None, :, None]
            attn = attn.view(bw, self.num_heads, n, n)
        out = attn.softmax(dim=-1) @ v
        return self.proj(_merge_heads(out))


class SwinBlock(nn.Module):
    """Shifted-window transformer block (levels at or above the threshold). `[B, C, H, W]` in/out."""

    def __init__(self, dim: int, resolution: int, num_heads: int, window: int, shift: int,
                 mlp_ratio: float = 2.0):
        super().__init__()
        if resolution <= window:
            window, shift = resolution, 0
        self.window = window
        self.shift = shift
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window)
        self.norm_ffn = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        # Indices 0 and 2 hold the weights (official layout: Linear, GELU, Linear, Dropout).
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        mask = shifted_window_mask(resolution, window, shift) if shift > 0 else None
        self.register_buffer("attn_mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        seq = x.flatten(2).transpose(1, 2)
        # parity: the reference normalises keys and values with the same LayerNorm and queries
        # with another, even though all three are the same tokens here.
        q = self.norm_q(seq).view(b, h, w, c)
        kv = self.norm_kv(seq).view(b, h, w, c)
        if self.shift:
            q = torch.roll(q, (-self.shift, -self.shift), dims=(1, 2))
            kv = torch.roll(kv, (-self.shift, -self.shift), dims=(1, 2))
        q_win = window_partition(q, self.window)
        kv_win = window_partition(kv, self.window)
        out = window_reverse(self.attn(q_win, kv_win, kv_win, self.attn_mask), self.window, h, w)
        if self.shift:
            out = torch.roll(out, (self.shift, self.shift), dims=(1, 2))
        seq = seq + out.reshape(b, h * w, c)
        seq = seq + self.mlp(self.norm_ffn(seq))
        return seq.transpose(1, 2).reshape(b, c, h, w)
