"""Float32 that means float32: TF32 off for the pack's own CUDA calls unless asked for.

PyTorch lets cuDNN convolutions use TF32 by default (10-bit mantissa inputs), so a "float32"
render on an Ampere-or-newer GPU differs from a CPU float32 render at ~70 dB PSNR instead of
~1e-6. `fp32_matmul()` switches TF32 off (or on, with `allow_tf32=True`) for cuBLAS matmuls and
cuDNN convolutions inside the block and restores the caller's settings afterwards.

It changes process-wide backend flags for the duration of the block (PyTorch has no per-thread
setting), so a thread running other CUDA work at the same time sees them too. On a machine
without CUDA, or for a CPU device, it does nothing.

`model_fp32(model)` is the scope every entry point of the pack puts around a model's work (identity and
motion encoding, audio features, motion generation, rendering): true float32 for a float32 model on CUDA,
unless TF32 was allowed for that model (`set_allow_tf32`, the "tf32" precision of the nodes and the
command line: on an H200 1.4× faster than true fp32 in the renderer, frames 58.8 dB from the reference's
instead of 130 dB). Half-precision models are left alone.
"""
from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

#: The precisions a user may choose (besides "auto") and their weight dtypes: "tf32" is float32 weights whose
#: models may use TF32 on CUDA (`set_allow_tf32`), "fp32" true float32.
PRECISION_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

_tf32_allowed: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _legacy_flags() -> tuple[bool, bool] | None:
    """(matmul, cuDNN) TF32 flags through the legacy API, or None where they cannot be read: from
    torch 2.9 on, reading them raises once the per-backend `fp32_precision` settings were used in a
    way the legacy flags cannot express."""
    try:
        return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    except RuntimeError:
        return None


def _new_api_settings():
    """The objects holding torch ≥ 2.9's per-backend `fp32_precision` (cuBLAS matmul, cuDNN conv
    and RNN), or None on older torch."""
    cudnn = torch.backends.cudnn
    if not (hasattr(torch.backends.cuda.matmul, "fp32_precision") and hasattr(cudnn, "conv")
            and hasattr(cudnn, "rnn")):
        return None
    return torch.backends.cuda.matmul, cudnn.conv, cudnn.rnn


def _is_cuda(device) -> bool:
    if device is None:
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda"


@contextmanager
def fp32_matmul(allow_tf32: bool = False, device: torch.device | str | None = None) -> Iterator[None]:
    """Inside the block, float32 cuBLAS matmuls and cuDNN convolutions use TF32 only if
    `allow_tf32`; outside it, the caller's settings are back. A no-op when `device` is not a CUDA
    device (`device=None`: whenever CUDA is available). Half-precision work is unaffected.

        with fp32_matmul(allow_tf32=False, device=renderer_device):
            frames = renderer.render(...)
    """
    if not _is_cuda(device):
        yield
        return
    legacy = _legacy_flags()
    if legacy is not None:
        # The legacy setters keep both APIs consistent, so code inside the block may read either.
        try:
            torch.backends.cuda.matmul.allow_tf32 = allow_tf32
            torch.backends.cudnn.allow_tf32 = allow_tf32
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = legacy
    else:
        # The caller set the new API: speak it too, and put its exact settings back.
        settings = _new_api_settings()
        saved = [s.fp32_precision for s in settings]
        try:
            for s in settings:
                s.fp32_precision = "tf32" if allow_tf32 else "ieee"
            yield
        finally:
            for s, value in zip(settings, saved):
                s.fp32_precision = value


def tf32_state() -> dict[str, bool | str]:
    """The current TF32 settings, for reports and tests: {'matmul': ..., 'conv': ...}, booleans
    from the legacy flags where they can be read, else the new API's precision names."""
    legacy = _legacy_flags()
    if legacy is not None:
        return {"matmul": legacy[0], "conv": legacy[1]}
    matmul, conv, _ = _new_api_settings()
    return {"matmul": matmul.fp32_precision, "conv": conv.fp32_precision}


def set_allow_tf32(model: nn.Module, allow: bool = True) -> None:
    """Let `model_fp32` use TF32 for this float32 model's CUDA work (or not, the default). Kept beside the
    model, not on it: the state dict and ComfyUI's model management see the plain module."""
    if allow:
        _tf32_allowed.add(model)
    else:
        _tf32_allowed.discard(model)


def allows_tf32(model: nn.Module) -> bool:
    return model in _tf32_allowed


def model_fp32(model: nn.Module, allow_tf32: bool = False) -> contextlib.AbstractContextManager:
    """`fp32_matmul` for `model`'s work: TF32 off for a float32 model on CUDA unless `allow_tf32` or
    `set_allow_tf32(model)`; nothing for half-precision or non-CUDA models."""
    param = next(model.parameters(), None)
    if param is None or param.dtype != torch.float32:
        return contextlib.nullcontext()
    return fp32_matmul(allow_tf32 or allows_tf32(model), param.device)
