"""Peak tensor memory of one render batch on the GPU's code routes, measured on the CPU.

    python benchmarks/route_memory.py --batch-sizes 4 16 --dtype float32

Without a GPU the CUDA allocator's peak cannot be read, but what the renderer allocates per batch can:
this runs the full-size renderer (random weights: memory does not depend on the values) on the CPU with
the routes a CUDA device takes forced on (explicit window attention, values by `attend`, 256 MiB argmax
chunks) and counts the bytes of every tensor the batch creates while it is alive (a dispatch mode; weights,
the identity and the source cache are not counted). Compared: the window attention as one product per
level ("whole", before) and chunked by whole images ("chunked", `WindowAttention._forward_chunked`).

The figure is the live tensor bytes, not the allocator's reserve: a CUDA run adds cuDNN workspaces and the
caching allocator's fragmentation on top. Views are counted once, with the first tensor that holds the
storage. fp16 halves the model-dtype tensors; the argmax's float32 chunks stay float32.
"""
from __future__ import annotations

import argparse
import sys
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imtalker_core.layers import attention  # noqa: E402
from imtalker_core.renderer import IMTRenderer  # noqa: E402


class LiveBytes(TorchDispatchMode):
    """The peak of the bytes of storages created inside the block and still referenced."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.sizes: dict[int, int] = {}

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self.sizes:
            return
        self.sizes[key] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(tensor, self._free, key)

    def _free(self, key: int) -> None:
        size = self.sizes.pop(key, None)
        if size is not None:
            self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self._track(value)
        return out


def force_gpu_routes(window: str) -> None:
    """The CPU takes the routes of a CUDA device (module state; this script only)."""
    attention._values_from_probs = lambda device: False
    attention.ARGMAX_CHUNK_BYTES["cpu"] = attention.ARGMAX_CHUNK_BYTES["cuda"]
    if window == "chunked":
        attention.WindowAttention._forward_fast = attention.WindowAttention._forward_chunked
    else:
        attention.WindowAttention._forward_fast = attention.WindowAttention._forward_explicit


@torch.no_grad()
def batch_peak(renderer: IMTRenderer, batch: int, dtype: torch.dtype) -> int:
    cfg = renderer.cfg
    gen = torch.Generator().manual_seed(0)
    features = [torch.randn(1, c, s, s, generator=gen).to(dtype)
                for c, s in zip(cfg.feature_dims[::-1], cfg.spatial_dims[::-1])]
    vector = torch.randn(1, cfg.identity_dim, generator=gen).to(dtype)
    source = renderer.prepare_source(renderer.decode_motion(renderer.adapt(torch.zeros(1, cfg.latent_dim, dtype=dtype),
                                                                           vector)), features)
    latents = torch.randn(batch, cfg.latent_dim, generator=gen).to(dtype)
    with LiveBytes() as tracker:
        maps = renderer.decode_motion(renderer.adapt(latents, vector.expand(batch, -1)))
        frames = renderer.render(maps, source=source).float()
    del frames
    return tracker.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    renderer = IMTRenderer().eval().to(dtype)
    print(f"| batch | window attention | peak batch tensors ({args.dtype}) |")
    print("| --- | --- | --- |")
    for batch in args.batch_sizes:
        for window in ("whole", "chunked"):
            force_gpu_routes(window)
            peak = batch_peak(renderer, batch, dtype)
            print(f"| {batch} | {window} | {peak / 2**30:.2f} GiB |", flush=True)


if __name__ == "__main__":
    main()
