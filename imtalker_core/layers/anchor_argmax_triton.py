"""The anchor level's head-averaged attention argmax (and its attended values) in two Triton kernels, no map.

Same reduction as `attention.head_mean_argmax`: for every query, the key with the largest
head-averaged softmax weight, from float32 logits `(q·kᵀ)·scale` (inputs cast to float32 exactly;
IEEE float32 dot products for float32 inputs, never TF32; for fp16/bf16 inputs, whose values and
products TF32 tensor cores hold exactly, the products on those: exact products, float32 sums), a
float32 softmax over the keys per head, the sum over heads (the mean's argmax) and the lowest key
index among equal best values. Two passes over blocks of `BLOCK_N` keys for each block of `BLOCK_M`
queries:

1. per (query, head): the running maximum `m` of the logits and the normaliser
   `z = Σ exp(l − m)` (online softmax, rescaled whenever `m` grows); stores `m` and `1/z`. With values
   `v` (`anchor_attention_triton`) the same pass is flash attention's forward: it also accumulates
   `Σ exp(l − m) v` from the weights it has just computed (for fp16/bf16 rounded to fp16 for the
   product on tensor cores, as `scaled_dot_product_attention`'s flash kernels round them to the
   inputs' dtype) and stores the attended values `[B, H, Nq, dv]`, so the anchor level needs no second
   attention;
2. per query: recomputes the logits block by block, sums `exp(l − m_h) · (1/z_h)` over the heads
   and keeps the best value and the lowest index reaching it.

The map `[B, H, Nq, Nk]` (17 GB of float32 at 64² with 32 frames) never exists; the extra memory
is `2 · B · H · Nq` floats. The head width `d` is zero-padded to a power of two ≥ 16 (`tl.dot`'s
smallest tile): the padded products are exact zeros, so the logits do not change.

The picks equal the torch code's except at near-ties: the dot products, the normaliser and `exp`
(Triton's fast float32 `exp` on NVIDIA GPUs, ~1e-7 relative) round differently from torch, so two
keys whose head-mean weights differ by less than about 1e-6 relative may swap; then either pick is
within that margin of the best (tests/test_anchor_argmax_triton.py).

Triton is optional: this module imports without it (`available()` is then False). Under
`TRITON_INTERPRET=1` (set before triton is imported) the kernels run on the CPU through Triton's
interpreter, which is how the tests check them without a GPU. `attention.FullAttention` chooses
between this and the torch code (`attention.argmax_kernel`).
"""
from __future__ import annotations

import contextlib
import math

import torch

try:  # optional: torch's CPU wheels do not ship triton
    import triton
    import triton.language as tl
except Exception as err:  # noqa: BLE001 - any failure to import means "no kernel", never a broken import
    triton = tl = None
    _IMPORT_ERROR = f"triton cannot be imported ({type(err).__name__}: {err})"
else:
    _IMPORT_ERROR = None

# Conservative tiles: 64 × 64 float32 logits per program (a few dozen registers per thread at 4 warps).
BLOCK_N = 64
BLOCK_M_CHOICES = (64, 32, 16)
# With the products on tensor cores, 128 queries per program over 8 warps where the GPU stays full: on an
# H200 (fp16, 32 frames at the official shape, benchmarks/anchor_kernel_speed.py) 0.148 ms a frame against
# 0.180 at 64 queries / 4 warps, 0.78 with CUDA-core products and 0.93 for the torch code.
TENSOR_CORE_BLOCK_M_CHOICES = (128, 64, 32, 16)
TENSOR_CORE_WIDE_WARPS = 8
# Head widths above this fall back to the torch code (the query tile would crowd the registers;
# the official anchor level has 16).
MAX_HEAD_DIM = 64
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Inputs whose products run on tensor cores (exactly: see `_logits`).
HALF_DTYPES = (torch.float16, torch.bfloat16)
NUM_WARPS = 4
# CUDA's limit on the second grid axis (frames · heads in pass 1).
MAX_GRID_Y = 65535

_device_reasons: dict[str, str | None] = {}


if triton is not None:
    @triton.jit
    def _logits(q_base, k_base, stride_qn, stride_qd, stride_kn, stride_kd, offs_m, offs_n, offs_d,
                n_queries, n_keys, head_dim, scale,
                POST_SCALE: tl.constexpr, TENSOR_CORES: tl.constexpr):
        """Float32 logits `[BLOCK_M, BLOCK_N]` of one head; rows/keys outside the tensors read zeros.
        TENSOR_CORES (half-precision inputs only): the product on TF32 tensor cores, exact for them."""
        d_ok = offs_d < head_dim
        q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                    mask=(offs_m < n_queries)[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        kt = tl.load(k_base + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn,
                     mask=d_ok[:, None] & (offs_n < n_keys)[None, :], other=0.0).to(tl.float32)
        if not POST_SCALE:
            q = q * scale  # a power of two: exact, the same logits as scaling after the product
        if TENSOR_CORES:
            # fp16 and bf16 values (times a power of two) are exact in TF32 and their products exact in
            # float32: only the float32 accumulation may round differently, as the FMA order does.
            logits = tl.dot(q, kt, input_precision="tf32")
        else:
            logits = tl.dot(q, kt, input_precision="ieee")
        if POST_SCALE:
            logits = logits * scale  # parity: the reference scales the logits after the product
        return logits

    @triton.jit
    def _max_and_normaliser_kernel(
            q_ptr, k_ptr, v_ptr, m_ptr, rz_ptr, o_ptr,
            stride_qb, stride_qh, stride_qn, stride_qd,
            stride_kb, stride_kh, stride_kn, stride_kd,
            stride_vb, stride_vh, stride_vn, stride_vd,
            n_heads, n_queries, n_keys, head_dim, value_dim, scale,
            POST_SCALE: tl.constexpr, TENSOR_CORES: tl.constexpr, WITH_VALUES: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
        """Pass 1, one program per (query block, frame · head): `m` and `1/z` into `[B, H, Nq]` buffers;
        WITH_VALUES also the attended values into `o` `[B, H, Nq, dv]` (contiguous)."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // n_heads
        h = pid_bh % n_heads
        q_base = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        k_base = k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
        v_base = v_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        z = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        for start in range(0, n_keys, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            logits = _logits(q_base, k_base, stride_qn, stride_qd, stride_kn, stride_kd, offs_m, offs_n, offs_d,
                             n_queries, n_keys, head_dim, scale, POST_SCALE, TENSOR_CORES)
            logits = tl.where((offs_n < n_keys)[None, :], logits, float("-inf"))
            # Every block holds at least one real key, so m_new is finite and exp(m - m_new) is 0 at first.
            m_new = tl.maximum(m, tl.max(logits, axis=1))
            rescale = tl.exp(m - m_new)
            weights = tl.exp(logits - m_new[:, None])
            z = z * rescale + tl.sum(weights, axis=1)
            if WITH_VALUES:
                values = tl.load(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                                 mask=(offs_n < n_keys)[:, None] & (offs_dv < value_dim)[None, :], other=0.0)
                if TENSOR_CORES:
                    # The weights (in [0, 1]) rounded to fp16, to nearest: as fine as flash attention's fp16
                    # rounding and finer than its bf16 one, and exact in TF32 (which would truncate float32
                    # weights); then, like the logits, exact TF32 products of half values with float32 sums.
                    product = tl.dot(weights.to(tl.float16).to(tl.float32), values.to(tl.float32),
                                     input_precision="tf32")
                else:
                    product = tl.dot(weights, values.to(tl.float32), input_precision="ieee")
                acc = acc * rescale[:, None] + product
            m = m_new
        out = pid_bh.to(tl.int64) * n_queries + offs_m
        row_ok = offs_m < n_queries
        tl.store(m_ptr + out, m, mask=row_ok)
        tl.store(rz_ptr + out, tl.math.div_rn(tl.full([BLOCK_M], 1.0, tl.float32), z), mask=row_ok)
        if WITH_VALUES:
            o = o_ptr + out[:, None] * value_dim + offs_dv[None, :]
            tl.store(o, (acc / z[:, None]).to(o_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & (offs_dv < value_dim)[None, :])

    @triton.jit
    def _head_mean_argmax_kernel(
            q_ptr, k_ptr, m_ptr, rz_ptr, out_ptr,
            stride_qb, stride_qh, stride_qn, stride_qd,
            stride_kb, stride_kh, stride_kn, stride_kd,
            n_heads, n_queries, n_keys, head_dim, scale,
            POST_SCALE: tl.constexpr, TENSOR_CORES: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """Pass 2, one program per (query block, frame): the argmax over keys of Σ_h softmax weights."""
        pid_m = tl.program_id(0)
        b = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < n_queries
        best = tl.full([BLOCK_M], float("-inf"), tl.float32)
        best_index = tl.zeros([BLOCK_M], tl.int32)
        for start in range(0, n_keys, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            total = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            # Heads in order 0..H-1, one rounding per head: the order of torch's mean over the head axis.
            for h in range(0, n_heads):
                # The frame's offset in int64 (B·H·N·d may pass 2³¹); one head's fits in int32.
                q_base = q_ptr + b.to(tl.int64) * stride_qb + h * stride_qh
                k_base = k_ptr + b.to(tl.int64) * stride_kb + h * stride_kh
                logits = _logits(q_base, k_base, stride_qn, stride_qd, stride_kn, stride_kd, offs_m, offs_n,
                                 offs_d, n_queries, n_keys, head_dim, scale, POST_SCALE, TENSOR_CORES)
                stats = (b * n_heads + h).to(tl.int64) * n_queries + offs_m
                m = tl.load(m_ptr + stats, mask=row_ok, other=0.0)
                rz = tl.load(rz_ptr + stats, mask=row_ok, other=1.0)
                total += tl.exp(logits - m[:, None]) * rz[:, None]
            total = tl.where((offs_n < n_keys)[None, :], total, float("-inf"))
            block_best, block_index = tl.max(total, axis=1, return_indices=True,
                                             return_indices_tie_break_left=True)
            # Strictly greater: on equal values the earlier block, i.e. the lower key index, stays.
            better = block_best > best
            best_index = tl.where(better, block_index + start, best_index)
            best = tl.where(better, block_best, best)
        tl.store(out_ptr + b.to(tl.int64) * n_queries + offs_m, best_index.to(tl.int64), mask=row_ok)


def _interpreted() -> bool:
    """Whether the kernels were built by Triton's CPU interpreter (`TRITON_INTERPRET=1` at import)."""
    return triton is not None and type(_head_mean_argmax_kernel).__name__ == "InterpretedFunction"


def unavailable_reason(device: torch.device | str | None = None) -> str | None:
    """Why the kernels cannot run for tensors on `device` (default: the current CUDA device), or None.

    Never raises. Under the interpreter every device works (tensors are read through the host).
    """
    if triton is None:
        return _IMPORT_ERROR
    if _interpreted():
        return None
    device = torch.device("cuda" if device is None else device)
    if device.type != "cuda":
        return f"no Triton backend for {device.type} tensors (CUDA only, or TRITON_INTERPRET=1 for tests)"
    key = str(device)
    if key not in _device_reasons:
        _device_reasons[key] = _probe_cuda(device)
    return _device_reasons[key]


def _probe_cuda(device: torch.device) -> str | None:
    try:
        if not torch.cuda.is_available():
            return "torch sees no CUDA device"
        with torch.cuda.device(device):
            target = triton.runtime.driver.active.get_current_target()
    except Exception as err:  # noqa: BLE001 - any driver problem means "use the torch code", reported as such
        return f"no usable Triton GPU backend ({type(err).__name__}: {err})"
    if target.backend not in ("cuda", "hip"):
        return f"Triton's active backend is {target.backend!r}, not a GPU"
    return None


def available(device: torch.device | str | None = None) -> bool:
    """True when triton imports and has a usable backend for `device` (see `unavailable_reason`)."""
    return unavailable_reason(device) is None


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None) -> str | None:
    """Why these inputs are not for the kernels (shapes, dtypes, devices), or None. Never raises."""
    if q.dim() != 4 or k.dim() != 4:
        return f"q and k must be [B, H, N, d], got shapes {tuple(q.shape)} and {tuple(k.shape)}"
    b, h, nq, d = q.shape
    if k.shape[1] != h or k.shape[3] != d or k.shape[0] not in (1, b):
        return f"k {tuple(k.shape)} does not match q {tuple(q.shape)} (k batch must be 1 or B)"
    if q.dtype not in SUPPORTED_DTYPES or k.dtype not in SUPPORTED_DTYPES:
        return f"dtypes {q.dtype}/{k.dtype}: the kernel reads float32, float16 or bfloat16"
    if q.device != k.device:
        return f"q on {q.device}, k on {k.device}"
    if not (1 <= d <= MAX_HEAD_DIM):
        return f"head width {d} outside 1..{MAX_HEAD_DIM}"
    if b == 0 or nq == 0 or k.shape[2] == 0:
        return "empty queries or keys"
    if b * h > MAX_GRID_Y:
        return f"{b} frames × {h} heads exceed the launch grid's {MAX_GRID_Y}"
    if v is not None:
        if v.dim() != 4 or v.shape[:3] != k.shape[:3]:
            return f"v {tuple(v.shape)} does not match k {tuple(k.shape)} (v must be [B or 1, H, Nk, dv])"
        if v.dtype not in SUPPORTED_DTYPES or v.device != q.device:
            return f"v is {v.dtype} on {v.device}: the kernel reads float32, float16 or bfloat16 beside q"
        if not (1 <= v.shape[3] <= MAX_HEAD_DIM):
            return f"value width {v.shape[3]} outside 1..{MAX_HEAD_DIM}"
        if (q.dtype in HALF_DTYPES) != (v.dtype in HALF_DTYPES):
            return f"q is {q.dtype} and v {v.dtype}: both half precision or neither"
    return None


def _block_m(device: torch.device, frames: int, queries: int, choices: tuple[int, ...] = BLOCK_M_CHOICES) -> int:
    """Queries per program: the first of `choices` (largest first) that gives every multiprocessor two
    programs (one frame at 64² is 64 programs of 64 queries; an H100 has 132 multiprocessors)."""
    if device.type != "cuda":
        return choices[0]
    processors = torch.cuda.get_device_properties(device).multi_processor_count
    for block in choices:
        if frames * triton.cdiv(queries, block) >= 2 * processors:
            return block
    return choices[-1]


def head_mean_argmax_triton(q: torch.Tensor, k: torch.Tensor, scale: float, block_m: int | None = None,
                            block_n: int = BLOCK_N, num_warps: int | None = None,
                            tensor_cores: bool | None = None) -> torch.Tensor:
    """For every query, the key with the largest head-averaged softmax weight (see the module docstring).

    q: `[B, H, Nq, d]`; k: `[B or 1, H, Nk, d]` (batch 1: one source shared by the B frames, read in
    place, never copied); float32, float16 or bfloat16, any strides, on one device; `scale` a
    positive float (`d ** -0.5`). `block_m` overrides the queries per program (default: 64, or 32 or
    16 where too few programs would fill the GPU), `block_n` the keys per step (both powers of two from
    16 to 256) and `num_warps` the warps per program (default: 8 for 128 queries on tensor cores, else 4; tests and
    benchmarks). `tensor_cores` (None: when q and k are both fp16 or both bf16) computes the products on
    TF32 tensor cores, exact for half-precision values; False forces IEEE float32 products (CUDA cores)
    as for float32 inputs, for which True is refused (TF32 would round them). Returns the argmax
    `[B, Nq]` int64 on q's device, ties → the lowest key index.

    Raises RuntimeError when triton cannot run here and ValueError for inputs the kernel does not
    take; `unavailable_reason` / `unsupported_reason` say so beforehand.
    """
    picks, _ = _launch(q, k, None, scale, block_m, block_n, num_warps, tensor_cores)
    return picks


def anchor_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                            block_m: int | None = None, block_n: int = BLOCK_N, num_warps: int | None = None,
                            tensor_cores: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`head_mean_argmax_triton`'s picks and the attended values `softmax(q kᵀ · scale) v` per head,
    from the first pass's weights (flash attention's forward) instead of a second attention.

    v: `[B or 1, H, Nk, dv]` beside k, half precision where q is (or float32 where q is). The weights are
    float32, rounded to fp16 for the product with v on tensor cores (half inputs; IEEE float32 products of
    unrounded weights where `tensor_cores` is False or for float32), summed in float32 and divided by the
    normaliser. Returns (picks `[B, Nq]` int64, values `[B, H, Nq, dv]` contiguous in v's dtype). Launch
    options and errors as in `head_mean_argmax_triton`.
    """
    return _launch(q, k, v, scale, block_m, block_n, num_warps, tensor_cores)


def _launch(q, k, v, scale, block_m, block_n, num_warps, tensor_cores):
    reason = unsupported_reason(q, k, v)
    if reason is not None:
        raise ValueError(f"the Triton anchor argmax does not take these inputs: {reason}")
    for option, value in (("block_m", block_m), ("block_n", block_n)):
        if value is not None and (not 16 <= value <= 256 or value & (value - 1)):
            raise ValueError(f"{option}={value}: use a power of two from 16 to 256")
    half_inputs = q.dtype == k.dtype and q.dtype in HALF_DTYPES
    if tensor_cores and not half_inputs:
        raise ValueError(f"tensor_cores=True needs fp16 or bf16 q and k (got {q.dtype}/{k.dtype}): "
                         "TF32 would round float32 inputs")
    tensor_cores = half_inputs if tensor_cores is None else tensor_cores
    reason = unavailable_reason(q.device)
    if reason is not None:
        raise RuntimeError(f"the Triton anchor argmax cannot run: {reason}")
    b, h, nq, d = q.shape
    nk = k.shape[2]
    dv = v.shape[3] if v is not None else 1
    block_d = max(16, triton.next_power_of_2(d))
    if block_m is None:
        block_m = _block_m(q.device, b, nq, TENSOR_CORE_BLOCK_M_CHOICES if tensor_cores else BLOCK_M_CHOICES)
    if num_warps is None:
        num_warps = TENSOR_CORE_WIDE_WARPS if tensor_cores and block_m >= 128 else NUM_WARPS
    # A power-of-two scale commutes exactly with every rounding of the product (as in head_mean_argmax).
    post_scale = not _is_power_of_two(scale)
    shared = b > 1 and k.shape[0] == 1  # batch 1: every frame reads the same keys (and values)
    strides = (*q.stride(), 0 if shared else k.stride(0), *k.stride()[1:])
    m = torch.empty(b, h, nq, device=q.device, dtype=torch.float32)
    rz = torch.empty_like(m)
    out = torch.empty(b, nq, device=q.device, dtype=torch.int64)
    if v is None:  # the values code is compiled out (WITH_VALUES); any tensor fills its places
        values, value_strides = m, (0, 0, 0, 0)
    else:
        values = torch.empty(b, h, nq, dv, device=q.device, dtype=v.dtype)
        value_strides = (0 if shared else v.stride(0), *v.stride()[1:])
    sizes = (h, nq, nk, d)
    meta = dict(POST_SCALE=post_scale, TENSOR_CORES=tensor_cores, BLOCK_M=block_m, BLOCK_N=block_n,
                BLOCK_D=block_d, num_warps=num_warps)
    # Triton launches on the current CUDA device: make it q's.
    with torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext():
        _max_and_normaliser_kernel[(triton.cdiv(nq, block_m), b * h)](
            q, k, m if v is None else v, m, rz, values, *strides, *value_strides, *sizes, dv, float(scale),
            WITH_VALUES=v is not None, BLOCK_DV=max(16, triton.next_power_of_2(dv)), **meta)
        _head_mean_argmax_kernel[(triton.cdiv(nq, block_m), b)](q, k, m, rz, out, *strides, *sizes, float(scale),
                                                                **meta)
    return out, None if v is None else values


def _is_power_of_two(x: float) -> bool:
    return x > 0 and math.frexp(x)[0] == 0.5
