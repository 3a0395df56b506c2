"""Rendering speed of the full-size renderer (stand-in weights), per batch size and precision.

    python benchmarks/render_speed.py [--frames 8] [--batch-sizes 1 4] [--dtypes fp32] [--device cpu]

Reports seconds per frame after one warm-up batch, plus the one-off identity encoding time.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import imtalker_core as imt  # noqa: E402
from _timing import sync  # noqa: E402
from tests.helpers.standin import standin_renderer  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--dtypes", nargs="+", default=["fp32"], choices=list(DTYPES))
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")  # noqa: T201
    for name in args.dtypes:
        model = standin_renderer(args.device, DTYPES[name])
        torch.manual_seed(0)
        image = torch.rand(1, 3, 512, 512)
        t0 = time.perf_counter()
        identity = imt.encode_identity(model, image)
        sync(torch.device(args.device))
        encode_s = time.perf_counter() - t0
        motion = torch.randn(args.frames, 32)
        for bs in args.batch_sizes:
            imt.render_frames(model, identity, motion[:bs], batch_size=bs)  # warm-up
            sync(torch.device(args.device))
            t0 = time.perf_counter()
            imt.render_frames(model, identity, motion, batch_size=bs)
            sync(torch.device(args.device))
            per_frame = (time.perf_counter() - t0) / args.frames
            print(f"{name}: identity {encode_s:.2f} s; batch {bs}: {per_frame:.3f} s/frame "  # noqa: T201
                  f"({1 / per_frame:.2f} frames/s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
