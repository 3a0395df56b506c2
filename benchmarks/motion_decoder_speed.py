"""The motion decoder's two forms of the modulated convolution (issue 11).

    python benchmarks/motion_decoder_speed.py [--batch-sizes 1 2 8] [--repeats 5] [--threads 2]
                                              [--device cpu] [--dtype fp32]

Builds the full-size renderer on deterministic stand-in weights (tests/helpers/standin.py; speed does
not depend on the values) and decodes random adapted motion latents `[B, 32]` into the four motion
maps (`IMTRenderer.decode_motion`, 13 style-modulated convolutions) in both forms of
`stylegan.ModulatedConv2d`:

- grouped: the reference's arithmetic, one modulated and demodulated weight per sample and one
  grouped convolution (groups = B); the plain paths (`attention.fast_paths(False)`);
- batched: the style on the activations, one convolution with the shared weight, the demodulation
  on its output; the fast paths (default).

The forms take turns within every repeat; the table gives the median and fastest ms per frame after
one warm-up call each, and the largest difference of the maps relative to the map's largest value.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from imtalker_core.layers.attention import fast_paths  # noqa: E402
from tests.helpers.standin import standin_renderer  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FORMS = {"grouped": False, "batched": True}  # form → fast paths on


def timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 8])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads on a CPU")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    device = torch.device(args.device)
    model = standin_renderer(device, DTYPES[args.dtype])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device}, {args.dtype}, "  # noqa: T201
          f"{args.repeats} repeats")
    print("| batch | grouped ms/frame (median, min) | batched ms/frame (median, min) | speed-up (min) "  # noqa: T201
          "| max rel. difference |")
    print("| --- | --- | --- | --- | --- |")  # noqa: T201
    for batch in args.batch_sizes:
        latents = torch.randn(batch, model.cfg.latent_dim, generator=torch.Generator().manual_seed(batch))
        latents = latents.to(device, DTYPES[args.dtype])
        maps, times = {}, {name: [] for name in FORMS}
        for name, fast in FORMS.items():
            with fast_paths(fast):
                maps[name] = model.decode_motion(latents)
        for _ in range(args.repeats):
            for name, fast in FORMS.items():
                with fast_paths(fast):
                    times[name].append(timed(lambda: model.decode_motion(latents), device)[1] / batch * 1e3)
        diff = max(((b.float() - g.float()).abs().max() / g.float().abs().max()).item()
                   for g, b in zip(maps["grouped"], maps["batched"]))
        cells = [f"{statistics.median(times[n]):.1f}, {min(times[n]):.1f}" for n in FORMS]
        print(f"| {batch} | {cells[0]} | {cells[1]} | {min(times['grouped']) / min(times['batched']):.2f}× "  # noqa: T201
              f"| {diff:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
