"""LayerNorm over narrow rows as one Triton kernel, with an optional second affine output.

The shifted-window blocks normalise tokens of 32 (256² level) and 64 (128²) channels: at batch 32 that is
2 M rows of 64 bytes in fp16, and torch's CUDA LayerNorm spends one thread block per row, far from the
memory bandwidth the work needs (on an H200 its kernel was ~9 % of an fp16 frame,
`benchmarks/profile_renderer.py`). Here one program normalises `BLOCK_R` rows at once. The blocks also
normalise the same tokens twice (`norm_q` and `norm_kv`, two LayerNorms with their own weights): with
`weight2`/`bias2` the kernel reads the tokens once and writes both.

Arithmetic: float32 mean and biased variance of each row (two passes over registers, as torch's), then
`(x − mean) · rsqrt(var + eps) · weight + bias` in float32, rounded once to the input's dtype. Results
equal `F.layer_norm` up to the rounding of the reductions' order (~1e-7 relative before the final
rounding). Triton is optional, as for the other kernels (`anchor_argmax_triton.unavailable_reason`):
`attention.layernorm_kernel` chooses between this and `F.layer_norm`.
"""
from __future__ import annotations

import contextlib

import torch

from .anchor_argmax_triton import SUPPORTED_DTYPES, available, tl, triton, unavailable_reason

# The lowest shifted-window level has 512 (one window over the whole 16² map).
MAX_CHANNELS = 1024
# Values per program: 64 rows of 32 channels (8 KB of fp16 in, 2 × 8 KB out), 32 rows of 64, ...
VALUES_PER_PROGRAM = 2048
NUM_WARPS = 4

__all__ = ["available", "unavailable_reason", "unsupported_reason", "layer_norm_triton"]


if triton is not None:
    @triton.jit
    def _layer_norm_kernel(x_ptr, w_ptr, b_ptr, out_ptr, w2_ptr, b2_ptr, out2_ptr,
                           rows, channels, stride_x, stride_out, eps,
                           TWO: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """One program per `BLOCK_R` rows; rows are `channels` contiguous values `stride_*` apart."""
        offs_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_c = tl.arange(0, BLOCK_C)
        c_ok = offs_c < channels
        ok = (offs_r < rows)[:, None] & c_ok[None, :]
        x = tl.load(x_ptr + offs_r[:, None] * stride_x + offs_c[None, :], mask=ok, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / channels
        centred = tl.where(ok, x - mean[:, None], 0.0)
        var = tl.sum(centred * centred, axis=1) / channels
        normed = centred * tl.math.rsqrt(var + eps)[:, None]
        w = tl.load(w_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
        out = offs_r[:, None] * stride_out + offs_c[None, :]
        tl.store(out_ptr + out, (normed * w[None, :] + b[None, :]).to(out_ptr.dtype.element_ty), mask=ok)
        if TWO:
            w2 = tl.load(w2_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
            b2 = tl.load(b2_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
            tl.store(out2_ptr + out, (normed * w2[None, :] + b2[None, :]).to(out2_ptr.dtype.element_ty), mask=ok)


def unsupported_reason(x: torch.Tensor, *norms: torch.nn.LayerNorm) -> str | None:
    """Why `x` `[..., C]` and these LayerNorms (one or two, each over C with weight and bias) are not for the
    kernel, or None. Never raises."""
    channels = x.shape[-1] if x.dim() else 0
    if x.dtype not in SUPPORTED_DTYPES:
        return f"dtype {x.dtype}: the kernel reads float32, float16 or bfloat16"
    if not 1 <= channels <= MAX_CHANNELS:
        return f"{channels} channels outside 1..{MAX_CHANNELS}"
    if x.numel() == 0:
        return "no rows"
    for norm in norms:
        if norm.normalized_shape != (channels,) or norm.weight is None or norm.bias is None:
            return f"LayerNorm {tuple(norm.normalized_shape)} (affine {norm.weight is not None}) over {channels}"
        if norm.weight.device != x.device:
            return f"LayerNorm on {norm.weight.device}, input on {x.device}"
        if norm.eps != norms[0].eps:
            return f"the two LayerNorms' eps differ ({norms[0].eps}, {norm.eps})"
    return None


def layer_norm_triton(x: torch.Tensor, norm: torch.nn.LayerNorm, norm2: torch.nn.LayerNorm | None = None):
    """`norm(x)` (and `norm2(x)` with `norm2`, from one read of `x`): x `[..., C]`, any leading strides
    where the rows can be viewed as `[R, C]` (else one contiguous copy is made); returns the same shape(s)
    in x's dtype, contiguous. Raises RuntimeError where triton cannot run and ValueError for inputs it does
    not take (`unsupported_reason`)."""
    norms = (norm,) if norm2 is None else (norm, norm2)
    reason = unsupported_reason(x, *norms)
    if reason is not None:
        raise ValueError(f"the Triton LayerNorm does not take these inputs: {reason}")
    reason = unavailable_reason(x.device)
    if reason is not None:
        raise RuntimeError(f"the Triton LayerNorm cannot run: {reason}")
    channels = x.shape[-1]
    rows = x.reshape(-1, channels)  # a view where the leading dims allow one
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, device=x.device, dtype=x.dtype)
    out2 = torch.empty_like(out) if norm2 is not None else out
    second = norm2 if norm2 is not None else norm
    block_c = triton.next_power_of_2(channels)
    block_r = max(1, VALUES_PER_PROGRAM // block_c)
    grid = (triton.cdiv(rows.shape[0], block_r),)
    with torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext():
        _layer_norm_kernel[grid](rows, norm.weight, norm.bias, out, second.weight, second.bias, out2,
                                 rows.shape[0], channels, rows.stride(0), out.stride(0), float(norm.eps),
                                 TWO=norm2 is not None, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=NUM_WARPS)
    if norm2 is None:
        return out.view(x.shape)
    return out.view(x.shape), out2.view(x.shape)
