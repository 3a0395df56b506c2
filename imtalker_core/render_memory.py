"""How much memory rendering takes, and how many frames to render at once when the user leaves it to us.

The budgets are measured (benchmarks/README.md):
- CPU, fp32: a batch of 2 raised peak memory by about 650 MiB over the loaded model (~325 MiB a frame);
  512 MiB a frame leaves room for allocator slack.
- CUDA, from the peak GPU memory (weights included) on an H200, eager, at batch 1/8/32/64: fp16/bf16
  0.86/1.57/2.75/4.84 GiB → 67 MiB a frame over a fixed ~0.7–1 GiB; fp32 1.30/5.79/6.09/9.44 GiB → 107 MiB
  a frame over up to 5.3 GiB (float32 convolutions take large cuDNN workspaces even at small batches).
  Budgets: the slope × 1.5, and the largest fixed part seen.
"""
from __future__ import annotations

import torch

CPU_BYTES_PER_FRAME = 512 << 20
#: Memory one 512² driving frame takes in the motion encoder (float32 activations of its first layers, with
#: room); not yet measured on a GPU, so the CPU figure serves everywhere.
MOTION_ENCODER_BYTES_PER_FRAME = 256 << 20
GPU_BYTES_PER_FRAME = {torch.float16: 96 << 20, torch.bfloat16: 96 << 20, torch.float32: 160 << 20}
GPU_FIXED_BYTES = {torch.float16: 1 << 30, torch.bfloat16: 1 << 30, torch.float32: 11 << 29}
#: Most frames an automatic batch holds: beyond this a GPU renders hardly faster (H200, fp16: 267 frames/s at
#: 32, 274 at 64).
MAX_AUTO_BATCH = 32
#: The automatic batch on a CPU for whole clips: one frame at a time is fastest there (a frame's activations
#: already exceed the caches; fp32, 2 threads: 0.94 s a frame at 1, 0.99 at 2, 1.08 at 4; benchmarks/speed.py
#: --device cpu --batch-sizes 1 2 4), needs the least memory and moves the progress bar every frame.
CPU_AUTO_BATCH = 1
#: Other devices without a memory query (MPS, XPU): not measured; a moderate batch.
OTHER_AUTO_BATCH = 4
#: The share of free device memory an automatic batch may plan on.
FREE_SHARE = 0.8
#: Parameters of the official models (renderer 124 M; generator 39 M and wav2vec2-base 95 M for audio).
RENDERER_PARAMETERS, AUDIO_MODEL_PARAMETERS = 124_000_000, 134_000_000


def bytes_per_frame(device: torch.device | str, dtype: torch.dtype) -> int:
    """The activation memory one rendered 512² frame is budgeted on `device` for a renderer in `dtype`."""
    if torch.device(device).type == "cuda":
        return GPU_BYTES_PER_FRAME.get(dtype, CPU_BYTES_PER_FRAME)
    return CPU_BYTES_PER_FRAME


def fixed_bytes(device: torch.device | str, dtype: torch.dtype) -> int:
    """Memory a render needs on `device` beside the weights whatever the batch (workspaces): 0 on a CPU."""
    return GPU_FIXED_BYTES.get(dtype, 0) if torch.device(device).type == "cuda" else 0


def batch_that_fits(free_bytes: int, per_frame: int, fixed: int = 0, cap: int = MAX_AUTO_BATCH) -> int:
    """Frames per batch that `FREE_SHARE` of `free_bytes` holds after `fixed` bytes, `per_frame` each: 1 to
    `cap` (1 also when not even one fits: the caller's memory manager may still free room)."""
    return max(1, min(cap, (int(FREE_SHARE * free_bytes) - int(fixed)) // int(per_frame)))


def frames_that_fit(free_bytes: int, device: torch.device | str, dtype: torch.dtype,
                    cap: int = MAX_AUTO_BATCH) -> int:
    """Rendered frames per batch that `free_bytes` on `device` hold for a renderer in `dtype`: 1 to `cap`."""
    return batch_that_fits(free_bytes, bytes_per_frame(device, dtype), fixed_bytes(device, dtype), cap)


def auto_batch_size(device: torch.device | str, dtype: torch.dtype, reserve_bytes: int = 0,
                    cap: int = MAX_AUTO_BATCH, encodes_motion: bool = False) -> int:
    """The batch size for rendering a whole clip on `device` when the user did not choose one: on CUDA what
    the free memory (`torch.cuda.mem_get_info`, less `reserve_bytes` still to be loaded, e.g. weights)
    holds, 1 to `cap`; on a CPU `CPU_AUTO_BATCH`, elsewhere `OTHER_AUTO_BATCH`. `encodes_motion`: the same
    batch also encodes driving frames, so it must fit the motion encoder's budget too."""
    device = torch.device(device)
    if device.type != "cuda":
        return CPU_AUTO_BATCH if device.type == "cpu" else OTHER_AUTO_BATCH
    free, _ = torch.cuda.mem_get_info(device)
    size = frames_that_fit(free - reserve_bytes, device, dtype, cap)
    if encodes_motion:
        size = min(size, batch_that_fits(free - reserve_bytes, MOTION_ENCODER_BYTES_PER_FRAME, cap=cap))
    return size


def weight_bytes(dtype: torch.dtype, audio: bool = True) -> int:
    """The official models' weights in `dtype`: the renderer, and with `audio` the generator and wav2vec2."""
    params = RENDERER_PARAMETERS + (AUDIO_MODEL_PARAMETERS if audio else 0)
    return params * torch.empty((), dtype=dtype).element_size()
