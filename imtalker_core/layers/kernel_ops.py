"""The Triton kernels as torch custom ops, so that code traced by `torch.compile` can call them.

Inductor cannot look inside `anchor_argmax_triton` / `window_attention_triton` (their launches go through
Python checks and a device context); registered as opaque ops with shape-only fake implementations, they
stay one call each in a compiled graph (and are captured like any other kernel in "reduce-overhead"'s
CUDA graphs), while inductor fuses everything around them. Eager code calls the kernels directly, not
through these ops, to skip the dispatcher. `attention` decides where each op is used (`argmax_kernel`,
`window_kernel`, `prepare_compiled_kernels`).
"""
# No `from __future__ import annotations`: torch.library reads the ops' schemas from real annotations.
from typing import Optional, Tuple

import torch

from . import anchor_argmax_triton, window_attention_triton


@torch.library.custom_op("imtalker::anchor_argmax", mutates_args=())
def anchor_argmax(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """`anchor_argmax_triton.head_mean_argmax_triton(q, k, scale)`: picks `[B, Nq]` int64."""
    return anchor_argmax_triton.head_mean_argmax_triton(q, k, scale)


@anchor_argmax.register_fake
def _anchor_argmax_fake(q, k, scale):
    return q.new_empty((q.shape[0], q.shape[2]), dtype=torch.int64)


@torch.library.custom_op("imtalker::anchor_attention", mutates_args=())
def anchor_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """`anchor_argmax_triton.anchor_attention_triton(q, k, v, scale)`: picks `[B, Nq]` int64 and values
    `[B, H, Nq, dv]` in v's dtype."""
    return anchor_argmax_triton.anchor_attention_triton(q, k, v, scale)


@anchor_attention.register_fake
def _anchor_attention_fake(q, k, v, scale):
    return (q.new_empty((q.shape[0], q.shape[2]), dtype=torch.int64),
            v.new_empty((q.shape[0], q.shape[1], q.shape[2], v.shape[3])))


@torch.library.custom_op("imtalker::window_attention", mutates_args=())
def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float,
                     bias: torch.Tensor, mask: Optional[torch.Tensor], heads_per_program: Optional[int] = None,
                     bias_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`window_attention_triton.window_attention_triton(...)`: `[B·nW, n, C]` in q's dtype."""
    return window_attention_triton.window_attention_triton(q, k, v, heads, scale, bias, mask, heads_per_program,
                                                           bias_index)


@window_attention.register_fake
def _window_attention_fake(q, k, v, heads, scale, bias, mask, heads_per_program=None, bias_index=None):
    return torch.empty_like(q, memory_format=torch.contiguous_format)
