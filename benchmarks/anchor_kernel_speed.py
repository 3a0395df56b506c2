"""The anchor level's head-averaged attention argmax (issue 11): the torch chunked code against the
Triton kernel's launch options, at the official anchor shape.

    python benchmarks/anchor_kernel_speed.py [--batch-sizes 8 32] [--dtypes fp16 bf16 fp32] [--repeats 5]
                                             [--block-m 32 64 128] [--block-n 64 128] [--warps 4 8]

Queries `[B, 8, 4096, 16]` against one shared source's keys `[1, 8, 4096, 16]` (random normal values;
the speed does not depend on them), as `attention.FullAttention` hands them over at 64² (8 heads of
width 16, scale 1/4). Variants, taking turns within every repeat after one warm-up call each (which
also compiles the kernels):

- torch: `attention.head_mean_argmax`, the chunked float32 code (what CPUs and `argmax_kernel("torch")` run);
- kernel cuda-cores: `anchor_argmax_triton.head_mean_argmax_triton` with IEEE float32 products, the default
  launch (what float32 inputs get, and half inputs got before the tensor-core products);
- kernel tc mM nN wW: the products on TF32 tensor cores (exact for fp16/bf16 inputs; half precision only)
  with M queries and N keys per step and W warps per program;
- with values (half precision): what the anchor level needs, the picks and the attended values
  `[B, 8, 4096, 16]` of values `[1, 8, 4096, 16]`: "picks + sdpa values" (the default launch, then
  `attention.attend`, i.e. `scaled_dot_product_attention`; `attention.ANCHOR_VALUES_IN_KERNEL` off) against
  "picks and values in the kernel" (`anchor_attention_triton`, the default).

The table gives the median and fastest ms per frame, how many of the B·4096 picks differ from the
torch code's (near-ties below float32 rounding may) and, for the rows with values, their largest difference
from float32 attention. CUDA only for the kernel rows.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _timing import timed  # noqa: E402
from imtalker_core.layers import anchor_argmax_triton as kernel  # noqa: E402
from imtalker_core.layers.attention import attend, head_mean_argmax  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
HEADS, QUERIES, KEYS, WIDTH, SCALE = 8, 64 * 64, 64 * 64, 16, 0.25


def variants(dtype: torch.dtype, device: torch.device, args) -> dict:
    """name → function of (q, k, v) returning the picks `[B, Nq]` and the values `[B, H, Nq, d]` or None."""
    found = {"torch": lambda q, k, v: (head_mean_argmax(q, k, SCALE)[0], None)}
    if kernel.unavailable_reason(device) is not None:
        print(f"no kernel rows: {kernel.unavailable_reason(device)}")  # noqa: T201
        return found
    found["kernel cuda-cores"] = lambda q, k, v: (kernel.head_mean_argmax_triton(q, k, SCALE, tensor_cores=False),
                                                  None)
    if dtype in kernel.HALF_DTYPES:
        for block_m, block_n, warps in itertools.product(args.block_m, args.block_n, args.warps):
            found[f"kernel tc m{block_m} n{block_n} w{warps}"] = (
                lambda q, k, v, m=block_m, n=block_n, w=warps: (kernel.head_mean_argmax_triton(
                    q, k, SCALE, block_m=m, block_n=n, num_warps=w, tensor_cores=True), None))
        found["picks + sdpa values"] = lambda q, k, v: (kernel.head_mean_argmax_triton(q, k, SCALE), attend(q, k, v))
        found["picks and values in the kernel"] = lambda q, k, v: kernel.anchor_attention_triton(q, k, v, SCALE)
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--dtypes", nargs="+", default=["fp16", "bf16", "fp32"], choices=list(DTYPES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--block-m", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--block-n", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.set_grad_enabled(False)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, {name}, {args.repeats} repeats")  # noqa: T201
    print("| dtype | batch | variant | ms/frame (median, min) | picks ≠ torch | values, max diff |")  # noqa: T201
    print("| --- | --- | --- | --- | --- | --- |")  # noqa: T201
    for dtype_name, batch in itertools.product(args.dtypes, args.batch_sizes):
        dtype = DTYPES[dtype_name]
        g = torch.Generator(device=device).manual_seed(batch)
        q = torch.randn(batch, HEADS, QUERIES, WIDTH, device=device, generator=g).to(dtype)
        k = torch.randn(1, HEADS, KEYS, WIDTH, device=device, generator=g).to(dtype)
        v = torch.randn(1, HEADS, KEYS, WIDTH, device=device, generator=g).to(dtype)
        found, picks, values, times = variants(dtype, device, args), {}, {}, {}
        for label, fn in list(found.items()):
            try:
                picks[label], values[label] = fn(q, k, v)  # warm-up (compiles)
            except Exception as err:  # noqa: BLE001 - a launch option this GPU refuses: reported, the rest kept
                print(f"| {dtype_name} | {batch} | {label} | FAILED: {type(err).__name__}: "  # noqa: T201
                      f"{str(err).splitlines()[0][:200]} | | |")
                del found[label]
            times[label] = []
        for _ in range(args.repeats):
            for label, fn in found.items():
                times[label].append(timed(lambda: fn(q, k, v), device)[1] * 1e3 / batch)
        exact_values = attend(q.float(), k.float(), v.float()) if any(x is not None for x in values.values()) else None
        for label in found:
            differ = int((picks[label] != picks["torch"]).sum())
            diff = "" if values[label] is None else f"{(values[label].float() - exact_values).abs().max().item():.1e}"
            print(f"| {dtype_name} | {batch} | {label} | {statistics.median(times[label]):.3f}, "  # noqa: T201
                  f"{min(times[label]):.3f} | {differ} of {picks[label].numel()} | {diff} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
