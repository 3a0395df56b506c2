"""Keys that tell when a tensor was replaced, moved, cast or modified in place: for inference caches built
from parameters (the window attention's bias, the synthesis network's folded conv weights)."""
from __future__ import annotations

import torch


def version(tensor: torch.Tensor) -> int:
    """The in-place version counter, or -1 for inference tensors, which keep none."""
    return -1 if tensor.is_inference() else tensor._version


def tensor_key(tensor: torch.Tensor | None) -> tuple | None:
    """(storage address, version, device, dtype) of `tensor`, or None for None. Not traceable by
    torch.compile: callers build their result directly while compiling."""
    return None if tensor is None else (tensor.data_ptr(), version(tensor), tensor.device, tensor.dtype)
