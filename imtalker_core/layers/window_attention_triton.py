"""The synthesis network's shifted-window attention as one Triton kernel that never writes the map.

Same map as `attention.WindowAttention._forward_explicit` for projected queries, keys and values:
per window and head, `softmax(q·kᵀ·scale + bias + mask) · v`, with the learned relative-position
bias `[heads, n, n]` and, for shifted blocks, the region mask `[nW, n, n]` of the window's place in
its image. One program per window (from a few frames on; `heads_per_program`) keeps each head's `n × n` logits
(64 × 64 at the official window of 8) in registers in turn: the explicit route writes and reads that map
four times (product, bias, softmax, values) — 67 MB a frame per block at the 256² level in fp16, where a
head is only 4 channels wide, against 16 MB of queries, keys, values and output. The window's mask
(16 KB of float32) is read once for all its heads: with one program per (window, head), as first
written, it was read once per head, 134 MB a frame per shifted 256² block from the L2 cache, 8× the
tensors the block attends to; the heads of one window also share the cache lines of its token rows.

Float32 logits and softmax in every precision; half-precision inputs are multiplied on tensor cores
with float32 accumulation, float32 inputs in IEEE float32 (never TF32), and the probabilities are
rounded to the values' dtype for the second product, as the explicit route's `softmax(...) @ v`
does. Results equal the explicit route's up to rounding (the scale is applied to the float32
logits instead of the queries). Head widths are zero-padded to 16 (`tl.dot`'s smallest tile), which
adds exact zeros to the products; windows of up to 64 tokens, padded to a power of two ≥ 16.

Triton is optional, as for `anchor_argmax_triton` (whose availability probe this shares): without
it, or on a CPU without `TRITON_INTERPRET=1`, `unsupported_reason` says why and the torch code runs
(`attention.window_kernel`: by default the kernel for fp16/bf16 on CUDA, 23 % faster renderer frames on
an H200 at batch 32).
"""
from __future__ import annotations

import contextlib

import torch

# The availability probe, the dtypes both kernels read and CUDA's grid limit are the argmax kernel's.
from .anchor_argmax_triton import MAX_GRID_Y, SUPPORTED_DTYPES, available, tl, triton, unavailable_reason

MAX_TOKENS = 64
MAX_HEAD_DIM = 64
NUM_WARPS = 4
# Heads per program: None → as many of a window's heads as keep `PROGRAMS_PER_PROCESSOR` programs for every
# multiprocessor (all of them from a few frames on: the mask read once per window; fewer at batch 1, where
# 1,024 or 256 windows alone would leave the GPU half idle); a number forces it (1: the first form, one
# program per window and head), for A/B runs (benchmarks/window_kernel_speed.py).
HEADS_PER_PROGRAM = None
PROGRAMS_PER_PROCESSOR = 8

__all__ = ["available", "unavailable_reason", "unsupported_reason", "window_attention_triton"]


if triton is not None:
    @triton.jit
    def _window_attention_kernel(
            q_ptr, k_ptr, v_ptr, bias_ptr, index_ptr, mask_ptr, out_ptr,
            stride_qw, stride_qn, stride_qc, stride_kw, stride_kn, stride_kc,
            stride_vw, stride_vn, stride_vc, stride_ow, stride_on, stride_oc,
            n_tokens, head_dim, n_heads, table_rows, windows_per_image, heads_per_program, scale,
            HAS_MASK: tl.constexpr, BIAS_TABLE: tl.constexpr, IEEE: tl.constexpr, BF16: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """One program per (window, group of `heads_per_program` heads): those heads' attended values
        `[n, d]` of one window, one head after another. BIAS_TABLE: `bias_ptr` is the table `[T, heads]`
        and `index_ptr` the `[n, n]` int32 index into it; else `bias_ptr` is the bias `[heads, n, n]`."""
        window = tl.program_id(0).to(tl.int64)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        n_ok = offs_n < n_tokens
        d_ok = offs_d < head_dim
        tile_ok = n_ok[:, None] & d_ok[None, :]
        pair = offs_n[:, None] * n_tokens + offs_n[None, :]
        pair_ok = n_ok[:, None] & n_ok[None, :]
        # -inf on the padded keys, and the window's mask: the same for all its heads, so read once.
        extra = tl.where(n_ok[None, :], 0.0, float("-inf"))
        if HAS_MASK:
            place = window % windows_per_image
            extra += tl.load(mask_ptr + place * n_tokens * n_tokens + pair, mask=pair_ok, other=0.0)
        if BIAS_TABLE:  # the same for every head and window: a few KB that stay in the L1 cache
            index = tl.load(index_ptr + pair, mask=pair_ok, other=0)
            # Never outside the table, whatever the index holds (the loader checks it; this keeps reads safe).
            index = tl.minimum(tl.maximum(index, 0), table_rows - 1)
        for i in range(0, heads_per_program):
            head = tl.program_id(1) * heads_per_program + i
            channels = head * head_dim + offs_d
            q = tl.load(q_ptr + window * stride_qw + offs_n[:, None] * stride_qn + channels[None, :] * stride_qc,
                        mask=tile_ok, other=0.0)
            kt = tl.load(k_ptr + window * stride_kw + channels[:, None] * stride_kc + offs_n[None, :] * stride_kn,
                         mask=d_ok[:, None] & n_ok[None, :], other=0.0)
            v = tl.load(v_ptr + window * stride_vw + offs_n[:, None] * stride_vn + channels[None, :] * stride_vc,
                        mask=tile_ok, other=0.0)
            if IEEE:
                logits = tl.dot(q, kt, input_precision="ieee")
            elif BF16:
                # bfloat16 values are exact in TF32, so this is the bfloat16 product (exact products, float32
                # sums); Triton's CPU interpreter has no bfloat16 tl.dot (wrong values), the GPU does either.
                logits = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="tf32")
            else:
                logits = tl.dot(q, kt)
            logits = logits * scale
            if BIAS_TABLE:
                bias = tl.load(bias_ptr + index * n_heads + head, mask=pair_ok, other=0.0)
            else:
                bias = tl.load(bias_ptr + head * n_tokens * n_tokens + pair, mask=pair_ok, other=0.0)
            logits = (logits + bias) + extra  # the bias, then the mask, in the explicit route's order
            weights = tl.exp(logits - tl.max(logits, axis=1)[:, None])
            probs = weights / tl.sum(weights, axis=1)[:, None]
            if IEEE:
                out = tl.dot(probs, v, input_precision="ieee")
            elif BF16:
                out = tl.dot(probs.to(tl.bfloat16).to(tl.float32), v.to(tl.float32), input_precision="tf32")
            else:
                out = tl.dot(probs.to(v.dtype), v)
            tl.store(out_ptr + window * stride_ow + offs_n[:, None] * stride_on + channels[None, :] * stride_oc,
                     out.to(out_ptr.dtype.element_ty), mask=tile_ok)


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                       mask: torch.Tensor | None) -> str | None:
    """Why these inputs are not for the kernel (shapes, dtypes, devices), or None. Never raises."""
    if not (q.dim() == k.dim() == v.dim() == 3) or not (q.shape == k.shape == v.shape):
        return f"q, k and v must be equal [windows, n, C], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
    windows, n, channels = q.shape
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        return f"dtypes {q.dtype}/{k.dtype}/{v.dtype}: the kernel reads one of float32, float16 or bfloat16"
    if not (q.device == k.device == v.device):
        return f"q, k, v on {q.device}, {k.device}, {v.device}"
    if heads < 1 or channels % heads or not (1 <= channels // heads <= MAX_HEAD_DIM):
        return f"{channels} channels in {heads} heads: head width must divide them and be at most {MAX_HEAD_DIM}"
    if not (1 <= n <= MAX_TOKENS):
        return f"{n} tokens per window: the kernel takes 1..{MAX_TOKENS}"
    if windows == 0:
        return "no windows"
    if heads > MAX_GRID_Y:
        return f"{heads} heads exceed the launch grid's {MAX_GRID_Y}"
    if mask is not None and (mask.dim() != 3 or mask.shape[1:] != (n, n) or windows % mask.shape[0]):
        return f"mask {tuple(mask.shape)} is not [windows per image, {n}, {n}] for {windows} windows"
    return None


def _heads_per_program(device: torch.device, windows: int, heads: int) -> int:
    """The largest divisor of `heads` that still gives every multiprocessor `PROGRAMS_PER_PROCESSOR`
    programs (1 if none does); all heads off CUDA (the interpreter)."""
    if device.type != "cuda":
        return heads
    wanted = PROGRAMS_PER_PROCESSOR * torch.cuda.get_device_properties(device).multi_processor_count
    for group in sorted((g for g in range(1, heads + 1) if heads % g == 0), reverse=True):
        if windows * (heads // group) >= wanted:
            return group
    return 1


def window_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float,
                            bias: torch.Tensor, mask: torch.Tensor | None = None,
                            heads_per_program: int | None = None, bias_index: torch.Tensor | None = None
                            ) -> torch.Tensor:
    """Windowed attention of projected windows (see the module docstring).

    q, k, v: `[B·nW, n, C]` (windows image-major, heads major in the channels: `C = heads·d`), one dtype
    of float32 / float16 / bfloat16, any strides; bias `[heads, n, n]` (the gathered relative-position
    bias); mask `[nW, n, n]` additive (the shifted blocks' region mask) or None; both read in float32.
    With `bias_index` (`[n, n]` integers in `0..T-1`; others are clamped into the table) `bias` is instead
    the relative-position table `[T, heads]` and the kernel gathers `bias[h, i, j] = table[index[i, j], h]`
    itself (the same float32 values), reading a few KB that every program shares instead of 16 KB a head.
    `heads_per_program` (a divisor of `heads`; default `HEADS_PER_PROGRAM`, None: see there) is a launch option
    for tests and benchmarks. Returns `[B·nW, n, C]` in q's dtype, heads major in the channels (ready for the
    output projection).

    Raises RuntimeError when triton cannot run here and ValueError for inputs it does not take.
    """
    group = heads_per_program if heads_per_program is not None else HEADS_PER_PROGRAM
    group = _heads_per_program(q.device, q.shape[0], heads) if group is None else group
    if group < 1 or heads % group:
        raise ValueError(f"heads_per_program={group}: use a divisor of the {heads} heads")
    reason = unavailable_reason(q.device)
    if reason is not None:
        raise RuntimeError(f"the Triton window attention cannot run: {reason}")
    reason = unsupported_reason(q, k, v, heads, mask)
    if reason is not None:
        raise ValueError(f"the Triton window attention does not take these inputs: {reason}")
    windows, n, channels = q.shape
    if bias_index is None:
        bias = bias.to(device=q.device, dtype=torch.float32).reshape(heads, n, n).contiguous()
        index = bias  # unread
    else:
        if bias_index.shape != (n, n) or bias.dim() != 2 or bias.shape[1] != heads:
            raise ValueError(f"bias table {tuple(bias.shape)} and index {tuple(bias_index.shape)}: "
                             f"expected [T, {heads}] and [{n}, {n}]")
        bias = bias.to(device=q.device, dtype=torch.float32).contiguous()
        index = bias_index.to(device=q.device, dtype=torch.int32).contiguous()
    if mask is not None:
        mask = mask.to(device=q.device, dtype=torch.float32).contiguous()
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    meta = dict(HAS_MASK=mask is not None, BIAS_TABLE=bias_index is not None, IEEE=q.dtype == torch.float32,
                BF16=q.dtype == torch.bfloat16, BLOCK_N=max(16, triton.next_power_of_2(n)),
                BLOCK_D=max(16, triton.next_power_of_2(channels // heads)), num_warps=NUM_WARPS)
    strides = (*q.stride(), *k.stride(), *v.stride(), *out.stride())
    with torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext():
        _window_attention_kernel[(windows, heads // group)](
            q, k, v, bias, index, bias if mask is None else mask, out, *strides,
            n, channels // heads, heads, bias.shape[0], mask.shape[0] if mask is not None else 1, group,
            float(scale), **meta)
    return out
