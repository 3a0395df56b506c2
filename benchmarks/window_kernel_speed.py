"""The shifted-window attention kernel's launch options (issue 11), at the official window levels.

    python benchmarks/window_kernel_speed.py [--batch-sizes 1 8 32] [--dtypes fp16 bf16] [--repeats 5]
                                             [--variants auto/table 8/table 8/bias 1/bias]

Projected queries, keys and values `[B·nW, 64, C]` (random normal values; the speed does not depend on
them) and a random relative-position table `[225, 8]` with the Swin index `[64, 64]` into it (or the bias
gathered from them, `[8, 64, 64]`), as `attention.WindowAttention` hands them to
`window_attention_triton` at the synthesis network's two window levels: 256² (32 channels in 8 heads of
width 4, 1,024 windows an image) and 128² (64 channels, width 8, 256 windows), each plain and shifted (the
region mask `attention.shifted_window_mask`). Variants "H/table" or "H/bias": one program per window and
group of H heads ("auto": the default, all 8 from a few frames on; 1: one per window and head, the first
form), the kernel gathering the bias from the table through the index (`bias_index`, the default) or
reading it gathered.
They take turns within every repeat after one warm-up call each (which compiles the kernel).

The table gives the median and fastest ms per frame, and the largest difference from the first variant's
output (the same values and arithmetic: 0). CUDA only.
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
from imtalker_core.layers import window_attention_triton as kernel  # noqa: E402
from imtalker_core.layers.attention import relative_position_index, shifted_window_mask  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
HEADS, WINDOW, SHIFT = 8, 8, 4
LEVELS = {256: 32, 128: 64}  # resolution → channels


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"], choices=list(DTYPES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--variants", nargs="+", default=["auto/table", "8/table", "8/bias", "1/bias"],
                    help="heads per program / table or bias; the first is the baseline of the difference column")
    ap.add_argument("--levels", type=int, nargs="+", default=list(LEVELS), choices=list(LEVELS))
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.set_grad_enabled(False)
    reason = kernel.unavailable_reason(device)
    if reason is not None:
        print(f"the kernel cannot run here: {reason}")  # noqa: T201
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, {name}, {args.repeats} repeats")  # noqa: T201
    print("| level | shifted | dtype | batch | variant | ms/frame (median, min) | max diff |")  # noqa: T201
    print("| --- | --- | --- | --- | --- | --- | --- |")  # noqa: T201
    for resolution, shift, dtype_name, batch in itertools.product(args.levels, (0, SHIFT), args.dtypes,
                                                                   args.batch_sizes):
        channels, dtype = LEVELS[resolution], DTYPES[dtype_name]
        per_image = (resolution // WINDOW) ** 2
        g = torch.Generator(device=device).manual_seed(resolution + batch)
        q, k, v = (torch.randn(batch * per_image, WINDOW ** 2, channels, device=device, generator=g).to(dtype)
                   for _ in range(3))
        table = torch.randn((2 * WINDOW - 1) ** 2, HEADS, device=device, generator=g)
        index = relative_position_index(WINDOW).to(device)
        bias = table[index].permute(2, 0, 1).contiguous()  # [heads, n, n]
        mask = shifted_window_mask(resolution, WINDOW, shift).to(device) if shift else None
        scale = (channels // HEADS) ** -0.5

        def run(variant: str) -> torch.Tensor:
            group, form = variant.split("/")
            group = None if group == "auto" else int(group)
            if form == "table":
                return kernel.window_attention_triton(q, k, v, HEADS, scale, table, mask, group, index)
            return kernel.window_attention_triton(q, k, v, HEADS, scale, bias, mask, group)

        outputs = {variant: run(variant) for variant in args.variants}  # warm-up (compiles)
        times = {variant: [] for variant in args.variants}
        for _ in range(args.repeats):
            for variant in args.variants:
                times[variant].append(timed(lambda: run(variant), device)[1] * 1e3 / batch)
        baseline = outputs[args.variants[0]].float()
        for variant in args.variants:
            diff = (outputs[variant].float() - baseline).abs().max().item()
            print(f"| {resolution}² | {'yes' if shift else 'no'} | {dtype_name} | {batch} | {variant} | "  # noqa: T201
                  f"{statistics.median(times[variant]):.4f}, {min(times[variant]):.4f} | {diff:.1e} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
