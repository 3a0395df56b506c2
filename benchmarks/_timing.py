"""Wall-clock timing of one call for the benchmark scripts, waiting for a GPU's queued work on both sides."""
from __future__ import annotations

import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """(`fn()`'s result, seconds it took, the device's queued work included)."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start
