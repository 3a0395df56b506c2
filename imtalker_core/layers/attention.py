"""Attention layers of the renderer: full attention that can report its map, the guided
sparse resampler, and the transformer / shifted-window blocks of the synthesis network.

Two implementations of the expensive parts live side by side, chosen by `fast_paths()`:

- the plain paths (the code before issue 11, kept verbatim): the anchor level's float32 softmax
  map is used both for the attended values and for the head-averaged argmax, and window
  attention is written out with explicit matrix products;
- the fast paths (default): `scaled_dot_product_attention` for the attended values wherever the
  map itself is not needed, the argmax reduced chunk by chunk without the `probs @ v` product
  or the separate scaling pass (`head_mean_argmax`), shared source keys never copied per frame,
  and window attention from a cached bias: on a CPU in float32 inference an explicit product in
  cache-sized chunks, otherwise on a CPU `scaled_dot_product_attention`, on a GPU the explicit product
  over chunks of whole images;
- and, outside this module, the motion decoder's modulated convolutions with the style on the
  activations and one shared weight (`stylegan.ModulatedConv2d`) instead of per-sample weights and
  a grouped convolution.

Both compute the anchor picks from float32 logits with the same float32 arithmetic, so from the
same motion maps float32 picks are identical (tests/test_speed_paths.py) and half-precision models
change no more picks than before (the two motion decoder forms differ by rounding, which can flip a
near-tie pick, as another CPU or thread count can). The switch exists so that one process can time
and compare both.

On CUDA tensors the fast path takes the anchor picks from a fused Triton kernel where one can run
(`anchor_argmax_triton`: the same float32 reduction without the map; the picks may differ from
the torch code's only at near-ties below ~1e-6 relative); the values stay `attend`'s. Chosen by
`argmax_kernel(mode)`, a context manager like `fast_paths`:

- "auto" (default): the kernel for half-precision (fp16/bf16) CUDA tensors when triton is installed,
  has a GPU backend and takes the shapes; otherwise (and after a kernel failure, logged once) the torch
  chunked code. Float32 stays on the torch code: there the kernel is no faster (1.81 vs 1.81 ms for 8
  frames on an H200) and its summation order flipped a near-tie pick on the parity inputs (frames
  92.6 dB from the reference's instead of 130 dB), while fp32 is the precision that promises the
  reference's frames;
- "triton": the kernel for every CUDA tensor; raises RuntimeError where it cannot run (benchmarks);
- "torch": always the torch chunked code (`head_mean_argmax`).

CPU tensors and the plain path always use the torch code. Code traced by `torch.compile` calls the
kernels as custom ops (`kernel_ops`) where `prepare_compiled_kernels` (run by `compiled.set_compile`
before tracing) found them working for the model's device and dtype, else the torch code.

The shifted-window attention has a Triton kernel too (`window_attention_triton`: the map never leaves
registers), chosen by `window_kernel(mode)` with the same three modes and rules ("auto" by default:
the kernel for half precision on CUDA in inference; autograd always takes the torch code). On an H200
(fp16, batch 32, `benchmarks/layout_speed.py --kernels none window`) it took the renderer from 3.35 to
2.59 ms a frame, frames 69.5 dB from the plain layout's as with the torch route (fp16 rounding).

The synthesis network's LayerNorms (the shifted-window blocks' three, on rows of 32 and 64 channels, and
the other transformer blocks' feed-forward norm) have one too (`layernorm_triton`: many rows per program,
`norm_q` and `norm_kv` from one read), chosen by `layernorm_kernel(mode)`, same modes and rules, eager code
only (inductor fuses traced LayerNorms itself): 2.04 → 1.54 ms a frame on the H200 run above.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .parameter_cache import ParameterCaches, tensor_key

# Queries per chunk of the plain path's argmax; bounds memory at heads × chunk × keys floats
# instead of heads × keys² (4096² at the 64² level).
ARGMAX_QUERY_CHUNK = 1024

# Fast path: bytes of float32 map (all heads, all keys) per chunk of queries. A CPU works best
# while the chunk stays near its caches; a GPU wants chunks large enough to hide kernel launches
# but bounded so that peak memory does not grow with the batch (at batch 32 the whole 64² map
# would be 32 · 8 · 4096² · 4 B = 17 GB).
ARGMAX_CHUNK_BYTES = {"cpu": 8 << 20, "cuda": 256 << 20}
ARGMAX_CHUNK_BYTES_OTHER = 64 << 20

# Bytes of one window-attention map chunk (all heads) on the explicit (GPU) route; see
# WindowAttention._forward_chunked.
WINDOW_MAP_CHUNK_BYTES = 256 << 20
# Bytes of map per chunk of the CPU's float32 window attention (WindowAttention._forward_cpu): small enough
# to stay in the caches between the product, the softmax and the second product. One image's 256² level
# (8 heads of width 4) took 40 ms at 4 MiB (1 MiB: 46, 16 MiB: 71) against 55 ms through
# scaled_dot_product_attention; the 128² level (width 8) 11 against 23 ms (2 threads).
CPU_WINDOW_CHUNK_BYTES = 4 << 20

_FAST_PATHS = True

log = logging.getLogger(__name__)

ARGMAX_KERNEL_MODES = ("auto", "triton", "torch")
# Device types whose tensors may go to the Triton kernel (tests widen it to "cpu" under the interpreter).
ARGMAX_KERNEL_DEVICE_TYPES = ("cuda",)
_ARGMAX_KERNEL = "auto"
# Where the argmax kernel runs, the anchor level's attended values come from its first pass, which already
# computes every softmax weight (`anchor_argmax_triton.anchor_attention_triton`), instead of a second
# attention (`attend`: SDPA, whose exponentials at 64² with head width 16 cost about as much again).
# A switch for A/B runs (benchmarks/anchor_kernel_speed.py, profile_renderer.py --anchor-values).
ANCHOR_VALUES_IN_KERNEL = True
# The window kernel gathers the relative-position bias from its table through the index (a few KB every
# program shares) instead of reading the gathered bias (16 KB a head); the same float32 values. A switch for
# A/B runs (benchmarks/window_kernel_speed.py, profile_renderer.py --window-bias).
WINDOW_BIAS_FROM_TABLE = True

WINDOW_KERNEL_MODES = ("auto", "triton", "torch")
# Device types whose tensors may go to the window kernel (tests widen it to "cpu" under the interpreter).
WINDOW_KERNEL_DEVICE_TYPES = ("cuda",)
_WINDOW_KERNEL = "auto"

LAYERNORM_KERNEL_MODES = ("auto", "triton", "torch")
# Device types whose tensors may go to the LayerNorm kernel (tests widen it to "cpu" under the interpreter).
LAYERNORM_KERNEL_DEVICE_TYPES = ("cuda",)
_LAYERNORM_KERNEL = "auto"

# kernel name → why it failed in "auto" mode: the torch code from then on, without retrying each call.
_kernel_failures: dict[str, str] = {}
_logged_kernel_reasons: set[tuple[str, str]] = set()
# (kernel name, device type, dtype) that `prepare_compiled_kernels` ran successfully: the only kernels
# that code traced by torch.compile calls (as `kernel_ops` custom ops), since a failure inside a
# compiled graph cannot fall back to the torch code.
_COMPILED_KERNELS: set[tuple[str, str, torch.dtype]] = set()


@contextmanager
def fast_paths(enabled: bool = True) -> Iterator[None]:
    """Use the fast (default) or the plain attention and resampling paths inside the block.

    For benchmarks and tests that compare both in one process; not thread-safe (module state).
    """
    global _FAST_PATHS
    before, _FAST_PATHS = _FAST_PATHS, bool(enabled)
    try:
        yield
    finally:
        _FAST_PATHS = before


def fast_paths_enabled() -> bool:
    return _FAST_PATHS


@contextmanager
def _module_setting(name: str, value: str, choices: tuple[str, ...], what: str) -> Iterator[None]:
    """Set the module global `name` to `value` (one of `choices`) inside the block, then restore it."""
    if value not in choices:
        raise ValueError(f"{what} mode {value!r}: use one of {', '.join(choices)}")
    before = globals()[name]
    globals()[name] = value
    try:
        yield
    finally:
        globals()[name] = before


def argmax_kernel(mode: str = "auto"):
    """Compute the fast path's anchor picks with the Triton kernel, the torch code or whichever can
    run ("triton", "torch", "auto"; see the module docstring) inside the block. Not thread-safe."""
    return _module_setting("_ARGMAX_KERNEL", mode, ARGMAX_KERNEL_MODES, "argmax kernel")


def argmax_kernel_mode() -> str:
    return _ARGMAX_KERNEL


def window_kernel(mode: str = "auto"):
    """Compute the shifted-window attention with the Triton kernel, the torch code or whichever can run
    ("triton", "torch", "auto"; see the module docstring) inside the block. Not thread-safe."""
    return _module_setting("_WINDOW_KERNEL", mode, WINDOW_KERNEL_MODES, "window kernel")


def window_kernel_mode() -> str:
    return _WINDOW_KERNEL


def layernorm_kernel(mode: str = "auto"):
    """Compute the synthesis network's LayerNorms with the Triton kernel, the torch code or whichever can
    run ("triton", "torch", "auto"; see the module docstring) inside the block. Not thread-safe."""
    return _module_setting("_LAYERNORM_KERNEL", mode, LAYERNORM_KERNEL_MODES, "layernorm kernel")


def layernorm_kernel_mode() -> str:
    return _LAYERNORM_KERNEL


def _kernel_wanted(mode: str, x: torch.Tensor, device_types: tuple[str, ...]) -> bool:
    """Whether `mode` asks for a Triton kernel on this tensor: "triton" always, "auto" for fp16/bf16
    (float32 stays on the torch code, the precision that promises the reference's frames)."""
    return x.device.type in device_types and (mode == "triton" or (mode == "auto" and x.dtype != torch.float32))


def _use_kernel(name: str, mode: str, x: torch.Tensor, device_types: tuple[str, ...], kernel, *inputs) -> bool:
    """Whether kernel `name` computes this call: `kernel` is its module (`unavailable_reason(device)`,
    `unsupported_reason(*inputs)`), `x` the tensor whose device and dtype decide.

    Eager: "triton" raises RuntimeError where it cannot run; "auto" logs the reason once and uses the
    torch code, as after an earlier failure. Traced by torch.compile: only a kernel that
    `prepare_compiled_kernels` ran for this device and dtype (which settled its availability), for
    inputs it takes.
    """
    if not _kernel_wanted(mode, x, device_types):
        return False
    if torch.compiler.is_compiling():
        return (name, x.device.type, x.dtype) in _COMPILED_KERNELS and kernel.unsupported_reason(*inputs) is None
    reason = kernel.unavailable_reason(x.device) or kernel.unsupported_reason(*inputs)
    if mode == "triton":
        if reason is not None:
            raise RuntimeError(f"{name} kernel 'triton': the Triton kernel cannot run here: {reason}")
        return True
    reason = reason or _kernel_failures.get(name)
    if reason is not None:
        if (name, reason) not in _logged_kernel_reasons:
            _logged_kernel_reasons.add((name, reason))
            log.info("%s: the torch code instead of the Triton kernel: %s", name, reason)
        return False
    return True


def _call_kernel(name: str, mode: str, fn):
    """`fn()`, the kernel's result; in "auto" mode (eager) a failure is logged, remembered (the torch code
    from then on) and answered with None."""
    if mode == "triton" or torch.compiler.is_compiling():
        return fn()
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - e.g. a GPU or triton version the kernel does not compile for
        _kernel_failures[name] = f"the kernel failed earlier ({type(err).__name__}: {err})"
        log.warning("%s: the Triton kernel failed, using the torch code from now on", name, exc_info=True)
        return None


def _kernel_anchor(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The Triton kernel's picks `[B, Nq]` for `head_mean_argmax`'s inputs and the attended values
    `[B, H, Nq, dv]` (from the kernel, or `attend` when `ANCHOR_VALUES_IN_KERNEL` is off), or None where
    the torch code must compute them (see `argmax_kernel`)."""
    from . import anchor_argmax_triton as kernel

    with_values = ANCHOR_VALUES_IN_KERNEL
    inputs = (q, k, v) if with_values else (q, k)
    if not _use_kernel("anchor argmax", _ARGMAX_KERNEL, q, ARGMAX_KERNEL_DEVICE_TYPES, kernel, *inputs):
        return None
    compiling = torch.compiler.is_compiling()
    if with_values:
        launch = torch.ops.imtalker.anchor_attention if compiling else kernel.anchor_attention_triton
        return _call_kernel("anchor argmax", _ARGMAX_KERNEL, lambda: launch(q, k, v, scale))
    launch = torch.ops.imtalker.anchor_argmax if compiling else kernel.head_mean_argmax_triton
    picks = _call_kernel("anchor argmax", _ARGMAX_KERNEL, lambda: launch(q, k, scale))
    return None if picks is None else (picks, attend(q, k, v))


def prepare_compiled_kernels(device: torch.device, dtype: torch.dtype) -> None:
    """Before torch.compile traces a model on `device` in `dtype`: run each Triton kernel that the current
    modes (`argmax_kernel`, `window_kernel`) would use there once, eagerly, on small inputs (which also
    builds it), against the torch code; traced code then calls the kernels that worked (as `kernel_ops`
    custom ops). A kernel that fails is left out (logged) in "auto" mode and raises RuntimeError in "triton".
    `compiled.set_compile` calls this before a renderer's first compiled call.
    """
    from . import kernel_ops  # noqa: F401 - registers torch.ops.imtalker.*

    probe = torch.empty(0, device=device, dtype=dtype)
    checks = (("anchor argmax", _ARGMAX_KERNEL, ARGMAX_KERNEL_DEVICE_TYPES, _check_argmax_op),
              ("window attention", _WINDOW_KERNEL, WINDOW_KERNEL_DEVICE_TYPES, _check_window_op))
    for name, mode, device_types, check in checks:
        key = (name, device.type, dtype)
        _COMPILED_KERNELS.discard(key)
        if not _kernel_wanted(mode, probe, device_types):
            continue
        try:
            check(device, dtype)
        except Exception as err:  # noqa: BLE001 - reported; "triton" mode raises, "auto" keeps the torch code
            if mode == "triton":
                raise RuntimeError(f"{name} kernel 'triton': the Triton kernel cannot run in compiled code "
                                   f"({type(err).__name__}: {err})") from err
            log.warning("%s: compiled code keeps the torch code; the Triton kernel failed its check: %s: %s",
                        name, type(err).__name__, err)
            continue
        _COMPILED_KERNELS.add(key)


def _check_argmax_op(device: torch.device, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 32, 16, generator=g).to(device, dtype)
    k, v = (torch.randn(1, 2, 80, 16, generator=g).to(device, dtype) for _ in range(2))
    expected, expected_values = head_mean_argmax(q, k, 0.25, v)
    if ANCHOR_VALUES_IN_KERNEL:
        picks, values = torch.ops.imtalker.anchor_attention(q, k, v, 0.25)
        tolerance = 1e-4 if dtype == torch.float32 else 5e-2
        if not torch.allclose(values.float(), expected_values.float(), atol=tolerance, rtol=tolerance):
            raise RuntimeError(f"its values differ from the torch code's by "
                               f"{(values.float() - expected_values.float()).abs().max().item():.3g}")
    else:
        picks = torch.ops.imtalker.anchor_argmax(q, k, 0.25)
    if (picks != expected).float().mean().item() > 0.05:  # near-ties aside, the same picks
        raise RuntimeError("its picks disagree with the torch code's")


def _check_window_op(device: torch.device, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    attn = WindowAttention(32, 4, 4).eval().to(device, dtype)
    with torch.no_grad():
        attn.relative_position_bias_table.copy_(torch.randn(attn.relative_position_bias_table.shape, generator=g))
        q, k, v = (torch.randn(8, 16, 32, generator=g).to(device, dtype) for _ in range(3))
        mask = shifted_window_mask(8, 4, 2).to(device)
        bias, index = attn.kernel_bias()  # in the form compiled code will pass
        out = attn.proj(torch.ops.imtalker.window_attention(attn.q(q), attn.k(k), attn.v(v), attn.num_heads,
                                                            attn.scale, bias, mask, None, index))
        expected = attn._forward_explicit(q, k, v, mask)
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    if not torch.allclose(out.float(), expected.float(), atol=tolerance, rtol=tolerance):
        raise RuntimeError(f"its output differs from the torch code's by {(out - expected).abs().max().item():.3g}")


def _layer_norms(seq: torch.Tensor, *norms: nn.LayerNorm) -> tuple[torch.Tensor, ...]:
    """`norm(seq)` for each of one or two LayerNorms: in eager inference, where `layernorm_kernel` allows,
    the Triton kernel (one read of `seq` for both); else torch's. Traced code keeps torch's (inductor
    fuses it with its neighbours)."""
    if _FAST_PATHS and not torch.is_grad_enabled():
        from . import layernorm_triton as kernel

        if _use_kernel("layer norm", _LAYERNORM_KERNEL, seq, LAYERNORM_KERNEL_DEVICE_TYPES, kernel, seq, *norms):
            out = _call_kernel("layer norm", _LAYERNORM_KERNEL, lambda: kernel.layer_norm_triton(seq, *norms))
            if out is not None:
                return out if len(norms) == 2 else (out,)
    return tuple(norm(seq) for norm in norms)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """`[B, N, heads·d]` → `[B, heads, N, d]` (a view)."""
    return rearrange(x, "b n (h d) -> b h n d", h=heads)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """`[B, heads, N, d]` → `[B, N, heads·d]`, heads major in the channels."""
    return rearrange(x, "b h n d -> b n (h d)")


def _is_power_of_two(x: float) -> bool:
    return x > 0 and math.frexp(x)[0] == 0.5


def _fold_batch(q: torch.Tensor, kv_batch: int) -> tuple[torch.Tensor, int]:
    """`[B, H, N, d]` queries against keys of batch 1 → `[1, H, B·N, d]` and B (else unchanged, 1).

    Every query's row of the attention map depends on that query and the keys only, so frames
    that share one source can be stacked along the query axis: the same arithmetic per row, B×
    larger matrix products, and no per-frame copies of the source keys and values.
    """
    b, h, n, d = q.shape
    if kv_batch != 1 or b == 1:
        return q, 1
    return q.transpose(0, 1).reshape(1, h, b * n, d), b


def _unfold_batch(x: torch.Tensor, b: int) -> torch.Tensor:
    """Inverse of `_fold_batch` for `[1, H, B·N, e]` → `[B, H, N, e]` (a view)."""
    if b == 1:
        return x
    _, h, bn, e = x.shape
    return x.view(h, b, bn // b, e).transpose(0, 1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`softmax(q kᵀ / √d) v` per head in the inputs' dtype (`scaled_dot_product_attention`).

    q: `[B, H, Nq, d]`; k, v: `[B or 1, H, Nk, d]` (batch 1: one source shared by B frames).
    Returns `[B, H, Nq, d]`.
    """
    q, b = _fold_batch(q, k.shape[0])
    return _unfold_batch(F.scaled_dot_product_attention(q, k, v), b)


def argmax_chunk_rows(device: torch.device, groups: int, heads: int, keys: int,
                      chunk_bytes: int | None = None) -> int:
    """Queries per chunk so that one float32 map chunk `[groups, heads, rows, keys]` fits the budget."""
    budget = chunk_bytes or ARGMAX_CHUNK_BYTES.get(device.type, ARGMAX_CHUNK_BYTES_OTHER)
    return max(1, budget // (groups * heads * keys * 4))


def head_mean_argmax(q: torch.Tensor, k: torch.Tensor, scale: float, v: torch.Tensor | None = None,
                     chunk_bytes: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """For every query, the key with the largest head-averaged attention weight.

    q: `[B, H, Nq, d]`; k: `[B or 1, H, Nk, d]`; any float dtype. The weights are exactly the plain
    path's: float32 logits `(q·kᵀ)·scale`, float32 softmax over keys per head, mean over heads,
    argmax (ties → the lowest key index, as `torch.argmax`). Only one chunk of queries
    `[·, H, rows, Nk]` exists at a time (`chunk_bytes`, default `ARGMAX_CHUNK_BYTES`).

    With `v` (`[B or 1, H, Nk, dv]`) it also returns the attended values `[B, H, Nq, dv]` (in
    `v.dtype`) from the same float32 probabilities: cheaper than a second attention on a CPU,
    where the map is already there; on a GPU `attend` in the model's dtype is far cheaper.

    Returns (argmax `[B, Nq]` int64, values or None).
    """
    qf, b = _fold_batch(q, k.shape[0])
    groups, heads, rows_total, _ = qf.shape
    qf = qf.float()
    # A power-of-two scale (1/4 at the official anchor level: head width 16) commutes exactly with
    # every rounding of the product, so it is applied to the small query tensor instead of to
    # the big map: one pass over the map fewer, bit for bit the plain path's logits.
    post_scale = not _is_power_of_two(scale)
    if not post_scale:
        qf = qf * scale
    kt = k.float().transpose(-2, -1)
    vf = v.float() if v is not None else None
    rows = argmax_chunk_rows(q.device, groups, heads, kt.shape[-1], chunk_bytes)
    picks, outs = [], []
    for start in range(0, rows_total, rows):
        logits = torch.matmul(qf[:, :, start:start + rows], kt)
        if post_scale:
            logits.mul_(scale)  # parity: the reference scales the logits after the product
        probs = logits.softmax(dim=-1)
        del logits  # lets the allocator reuse the block for the next chunk
        if vf is not None:
            outs.append(torch.matmul(probs, vf).to(v.dtype))
        picks.append(probs.mean(dim=1).argmax(dim=-1))
    argmax = torch.cat(picks, dim=1).view(q.shape[0], q.shape[2])
    values = _unfold_batch(torch.cat(outs, dim=2), b) if vf is not None else None
    return argmax, values


def _values_from_probs(device: torch.device) -> bool:
    """Whether the anchor level takes its values from the float32 map (see `head_mean_argmax`)."""
    return device.type == "cpu"


class FullAttention(nn.Module):
    """Multi-head attention with separate q/k/v projections (`q_proj`, `k_proj`, `v_proj`, `proj`).

    Sequences are `[B, N, C]`. With `return_argmax=True` it also returns, for every query, the
    key index with the largest head-averaged attention weight (`[B, N]`, int64): what the guided
    resampler needs, without materialising the `[B, heads, N, N]` map.

    Keys and values that depend only on the source can be projected once (`project_kv`) and
    passed as `kv=`; then `key` and `value` are not needed.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def project_kv(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected keys and values `[B, heads, N, C/heads]` of key/value sequences `[B, N, C]`."""
        return (_split_heads(self.k_proj(key), self.num_heads),
                _split_heads(self.v_proj(value), self.num_heads))

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None, value: torch.Tensor | None = None,
                return_argmax: bool = False, kv: tuple[torch.Tensor, torch.Tensor] | None = None):
        if not _FAST_PATHS:
            if kv is not None:
                raise ValueError("the plain path takes key and value sequences, not projected kv")
            return self._forward_plain(query, key, value, return_argmax)
        q = _split_heads(self.q_proj(query), self.num_heads)
        k, v = kv if kv is not None else self.project_kv(key, value)
        if not return_argmax:
            return self.proj(_merge_heads(attend(q, k, v)))
        from_kernel = _kernel_anchor(q, k, v, self.scale)
        if from_kernel is not None:
            argmax, out = from_kernel
        elif _values_from_probs(q.device):
            argmax, out = head_mean_argmax(q, k, self.scale, v)
        else:
            # parity: the picks come from float32 logits in every precision (see head_mean_argmax);
            # the values are an ordinary attention in the model's dtype.
            argmax, _ = head_mean_argmax(q, k, self.scale)
            out = attend(q, k, v)
        return self.proj(_merge_heads(out)), argmax

    def _forward_plain(self, query, key, value, return_argmax):
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


def pool_for_resample(value: torch.Tensor, anchor_size: int) -> torch.Tensor:
    """The guided resampler's block means: `[B, C, H, W]` → `[B, C, anchor_size²]`.

    Depends only on the source features, so it can be computed once per identity.
    """
    h, w = value.shape[-2:]
    ratio = h // anchor_size
    assert h == w == ratio * anchor_size, (value.shape, anchor_size)
    # parity: with one sample the softmax over the top-k weights is exactly 1, so each block is
    # averaged with weight 1/r² as in the reference.
    return F.avg_pool2d(value, ratio).flatten(2)


def resample_pooled(pooled: torch.Tensor, anchor_argmax: torch.Tensor, anchor_size: int,
                    size: int) -> torch.Tensor:
    """Warp with precomputed block means: pooled `[1 or B, C, anchor²]`, argmax `[B, anchor²]`
    → `[B, C, size, size]`, every anchor cell's pick repeated over its `r×r` fine pixels."""
    b = anchor_argmax.shape[0]
    c = pooled.shape[1]
    ratio = size // anchor_size
    index = anchor_argmax.unsqueeze(1).expand(b, c, -1)
    warped = pooled.expand(b, -1, -1).gather(2, index).view(b, c, anchor_size, 1, anchor_size, 1)
    # Nearest ×r upsampling as one broadcast copy (same values as two repeat_interleave calls).
    return warped.expand(b, c, anchor_size, ratio, anchor_size, ratio).reshape(b, c, size, size)


def guided_resample(value: torch.Tensor, anchor_argmax: torch.Tensor, anchor_size: int) -> torch.Tensor:
    """Guided sparse resampler (top-1): warp a fine feature map with the anchor level's attention.

    Every fine pixel lies in one anchor cell `l`; it takes the mean of the `r×r` block of `value`
    under the anchor cell `argmax[l]` that cell attends to most (`r = H / anchor_size`).

    value: `[B, C, H, W]`; anchor_argmax: `[B, anchor_size²]` key indices. Returns `[B, C, H, W]`.
    """
    if _FAST_PATHS:
        return resample_pooled(pool_for_resample(value, anchor_size), anchor_argmax, anchor_size,
                               value.shape[-1])
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
        seq = seq + self.mlp(_layer_norms(seq, self.norm_ffn)[0])
        return seq.transpose(1, 2).reshape(b, c, h, w)


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """`[B, H, W, C]` → `[B * nW, window², C]`, windows in row-major order."""
    return rearrange(x, "b (nh wh) (nw ww) c -> (b nh nw) (wh ww) c", wh=window, ww=window)


def window_reverse(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """Inverse of `window_partition`: `[B * nW, window², C]` → `[B, H, W, C]`."""
    return rearrange(windows, "(b nh nw) (wh ww) c -> b (nh wh) (nw ww) c", nh=h // window, nw=w // window,
                     wh=window)


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


class WindowAttention(ParameterCaches):
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
        # (key, bias) of the last additive bias built by `attention_bias`; a plain attribute, so the
        # state dict is unchanged. The key changes whenever the table or the mask is replaced,
        # moved, cast or modified in place (load_state_dict), so a stale bias is never used.
        self._bias_cache: tuple[tuple, torch.Tensor] | None = None
        self._kernel_table_cache: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None

    def drop_caches(self) -> None:
        self._bias_cache = None
        self._kernel_table_cache = None

    def _bias(self) -> torch.Tensor:
        """The gathered relative-position bias `[1, heads, n, n]`."""
        n = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, -1).permute(2, 0, 1).unsqueeze(0)

    def attention_bias(self, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """The additive bias of the fast path: `[1, heads, n, n]` without a mask, `[1, nW·heads, n, n]`
        (windows major, heads minor) with the shifted-window mask `[nW, n, n]`; in `dtype`.

        Computed once and reused while the table and the mask are unchanged (inference); under
        autograd with a trainable table it is rebuilt every call so gradients flow.
        """
        table = self.relative_position_bias_table
        return self._cached(
            "_bias_cache", table,
            lambda: (tensor_key(table), dtype, None if mask is None else (tensor_key(mask), mask.shape)),
            lambda: self._build_bias(mask, dtype))

    def kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The window kernel's bias inputs as `WINDOW_BIAS_FROM_TABLE` asks: `kernel_bias_table()`, or the
        gathered bias `[heads, n, n]` in float32 and no index; cached."""
        if WINDOW_BIAS_FROM_TABLE:
            return self.kernel_bias_table()
        return self.attention_bias(None, torch.float32)[0], None

    def kernel_bias_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The window kernel's bias inputs: the table `[(2w-1)², heads]` in float32 and the index `[n, n]` in
        int32, both contiguous; cached like `attention_bias` (rebuilt under autograd and while compiling)."""
        table, index = self.relative_position_bias_table, self.relative_position_index
        return self._cached("_kernel_table_cache", table, lambda: (tensor_key(table), tensor_key(index)),
                            lambda: (table.float().contiguous(), index.to(torch.int32).contiguous()))

    def _build_bias(self, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        bias = self._bias().to(dtype)
        if mask is None:
            return bias
        nw, n = mask.shape[0], mask.shape[1]
        # Summed once here instead of added to every window's logits on every call; the mask's
        # -100 entries make exp() vanish either way, so the order of the two sums does not matter.
        return (bias + mask.to(dtype)[:, None]).reshape(1, nw * self.num_heads, n, n)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        """q, k, v: `[B·nW, n, C]` windows (image-major); mask `[nW, n, n]` or None → `[B·nW, n, C]`."""
        # SDPA with an additive bias pays on the CPU only: on an H200 it made the whole renderer ~13 %
        # slower than the explicit product (fp16, batch 32: 229 vs 287 frames/s with the rest fast).
        if _FAST_PATHS:
            if not torch.is_grad_enabled():
                out = self._forward_kernel(q, k, v, mask)
                if out is not None:
                    return out
            if q.device.type == "cpu":
                # Half precision keeps SDPA, which accumulates its softmax in float32; autograd (training) too.
                if q.dtype == torch.float32 and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
                    return self._forward_cpu(q, k, v, mask)
                return self._forward_fast(q, k, v, mask)
            return self._forward_chunked(q, k, v, mask)
        return self._forward_explicit(q, k, v, mask)

    def _forward_kernel(self, q, k, v, mask):
        """The projections in torch, the attention in one Triton kernel (`window_attention_triton`), or
        None where the torch code must run (see `window_kernel`)."""
        from . import window_attention_triton as kernel

        heads = self.num_heads
        if not _use_kernel("window attention", _WINDOW_KERNEL, q, WINDOW_KERNEL_DEVICE_TYPES, kernel,
                           q, k, v, heads, mask):
            return None
        bias, index = self.kernel_bias()
        compiling = torch.compiler.is_compiling()
        launch = torch.ops.imtalker.window_attention if compiling else kernel.window_attention_triton
        out = _call_kernel("window attention", _WINDOW_KERNEL,
                           lambda: launch(self.q(q), self.k(k), self.v(v), heads, self.scale, bias, mask, None,
                                          index))
        return None if out is None else self.proj(out)

    def _forward_chunked(self, q, k, v, mask, chunk_bytes: int | None = None):
        """The explicit product over groups of whole images, so that one group's map `[windows, heads, n, n]`
        stays within `chunk_bytes` (default `WINDOW_MAP_CHUNK_BYTES`): at the 256² level the map of a batch
        of 32 is 2 GB in fp16, and the product, the bias sum and the softmax each hold one (the largest term
        of the renderer's peak memory). Every window is computed as in `_forward_explicit`."""
        bw, n, _ = q.shape
        per_image = mask.shape[0] if mask is not None else 1
        per_window = self.num_heads * n * n * q.element_size()
        rows = max(1, (chunk_bytes or WINDOW_MAP_CHUNK_BYTES) // (per_window * per_image)) * per_image
        if rows >= bw:
            return self._forward_explicit(q, k, v, mask)
        return torch.cat([self._forward_explicit(q[i:i + rows], k[i:i + rows], v[i:i + rows], mask)
                          for i in range(0, bw, rows)])

    def _forward_explicit(self, q, k, v, mask):
        bw, n, _ = q.shape
        q = _split_heads(self.q(q), self.num_heads) * self.scale
        k = _split_heads(self.k(k), self.num_heads)
        v = _split_heads(self.v(v), self.num_heads)
        bias = self._bias()
        attn = q @ k.transpose(-2, -1) + bias
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(bw // nw, nw, self.num_heads, n, n) + mask.to(attn.dtype)[None, :, None]
            attn = attn.view(bw, self.num_heads, n, n)
        out = attn.softmax(dim=-1) @ v
        return self.proj(_merge_heads(out))

    def _forward_cpu(self, q, k, v, mask, chunk_bytes: int | None = None):
        """The explicit product in chunks of window-heads that stay in the caches (`CPU_WINDOW_CHUNK_BYTES`):
        per chunk `baddbmm(bias, q, kᵀ, alpha=scale)`, softmax, `bmm` with the values. Window-heads run
        windows major, heads minor, so the cached bias (`[nW·heads, n, n]` with the shift mask, else
        `[heads, n, n]`) repeats along them with its own length as the period."""
        bw, n, _ = q.shape
        h = self.num_heads
        bias = self.attention_bias(mask, q.dtype)[0]
        period, total = bias.shape[0], bw * h
        target = max(1, (chunk_bytes or CPU_WINDOW_CHUNK_BYTES) // (n * n * q.element_size()))
        if target >= period:  # whole periods per chunk: one repeated bias block serves every chunk
            rows = target // period * period
            block = bias.repeat(rows // period, 1, 1)
        else:  # a divisor of the period, so that no chunk straddles two periods
            rows = next(r for r in range(target, 0, -1) if period % r == 0)
            block = None

        def split(x: torch.Tensor) -> torch.Tensor:
            return rearrange(x, "b n (h d) -> (b h) n d", h=h).contiguous()

        qh, kh, vh = split(self.q(q)), split(self.k(k)), split(self.v(v))
        out = torch.empty_like(qh)
        for start in range(0, total, rows):
            end = min(start + rows, total)
            offset = start % period
            chunk_bias = block[:end - start] if block is not None else bias[offset:offset + end - start]
            logits = torch.baddbmm(chunk_bias, qh[start:end], kh[start:end].transpose(1, 2), alpha=self.scale)
            torch.bmm(logits.softmax(dim=-1), vh[start:end], out=out[start:end])
        return self.proj(rearrange(out, "(b h) n d -> b n (h d)", h=h))

    def _forward_fast(self, q, k, v, mask):
        bw = q.shape[0]
        h = self.num_heads
        bias = self.attention_bias(mask, q.dtype)
        # With a mask the windows of one image become "heads" ([B, nW·heads, n, d]) so that the
        # per-window bias broadcasts over the images instead of being copied B times.
        groups = bw // mask.shape[0] if mask is not None else bw

        def heads(x: torch.Tensor) -> torch.Tensor:
            return rearrange(x, "(g w) n (h d) -> g (w h) n d", g=groups, h=h)

        out = F.scaled_dot_product_attention(heads(self.q(q)), heads(self.k(k)), heads(self.v(v)),
                                             attn_mask=bias, scale=self.scale)
        out = rearrange(out, "g (w h) n d -> (g w) n (h d)", h=h)
        return self.proj(out)


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
        q, kv = (t.view(b, h, w, c) for t in _layer_norms(seq, self.norm_q, self.norm_kv))
        if self.shift:
            q = torch.roll(q, (-self.shift, -self.shift), dims=(1, 2))
            kv = torch.roll(kv, (-self.shift, -self.shift), dims=(1, 2))
        q_win = window_partition(q, self.window)
        kv_win = window_partition(kv, self.window)
        out = window_reverse(self.attn(q_win, kv_win, kv_win, self.attn_mask), self.window, h, w)
        if self.shift:
            out = torch.roll(out, (self.shift, self.shift), dims=(1, 2))
        seq = seq + out.reshape(b, h * w, c)
        seq = seq + self.mlp(_layer_norms(seq, self.norm_ffn)[0])
        return seq.transpose(1, 2).reshape(b, c, h, w)
