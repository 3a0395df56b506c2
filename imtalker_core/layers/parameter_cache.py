"""Inference caches built from a module's parameters (the window attention's bias, the synthesis network's
folded conv weights): the keys that tell when a tensor was replaced, moved, cast or modified in place, and
the base class that drops the caches whenever the module is moved, cast or loaded."""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

T = TypeVar("T")


def version(tensor: torch.Tensor) -> int:
    """The in-place version counter, or -1 for inference tensors, which keep none."""
    return -1 if tensor.is_inference() else tensor._version


def tensor_key(tensor: torch.Tensor | None) -> tuple | None:
    """(storage address, version, device, dtype) of `tensor`, or None for None. Not traceable by
    torch.compile: callers build their result directly while compiling."""
    return None if tensor is None else (tensor.data_ptr(), version(tensor), tensor.device, tensor.dtype)


class ParameterCaches(nn.Module):
    """A module whose caches (plain attributes, outside the state dict) derive from its parameters.

    `drop_caches()` (each subclass says what it holds) runs on `.to()` / `.half()` / `.cuda()`, so an old
    copy is not kept alive, and on `load_state_dict`: inference tensors (a model loaded under
    torch.inference_mode, as ComfyUI runs nodes) keep no version counter, so a load could not be seen
    in a cache key.
    """

    def drop_caches(self) -> None:
        raise NotImplementedError

    def _cached(self, slot: str, trainable: torch.Tensor, key: Callable[[], tuple], build: Callable[[], T]) -> T:
        """`build()`, kept in the attribute `slot` as `(key(), result)` and reused while `key()` is unchanged.

        Built afresh on every call under autograd when `trainable` requires grad (so gradients flow), and
        while torch.compile traces (the keys read storage pointers and version counters, which cannot be
        traced; the compiled code keeps the result anyway).
        """
        if (torch.is_grad_enabled() and trainable.requires_grad) or torch.compiler.is_compiling():
            return build()
        current = key()
        entry = getattr(self, slot)
        if entry is None or entry[0] != current:
            entry = (current, build())
            setattr(self, slot, entry)
        return entry[1]

    def _apply(self, fn, *args, **kwargs):
        self.drop_caches()
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self.drop_caches()
        return super()._load_from_state_dict(*args, **kwargs)
