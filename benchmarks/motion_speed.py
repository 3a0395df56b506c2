"""The motion stages' speed (issue 11): the motion encoder's layouts and the motion decoder's two forms
of the modulated convolution.

    python benchmarks/motion_speed.py [--batch-sizes 1 2 8] [--repeats 5] [--threads 2]
                                      [--device cpu] [--dtype fp32]
                                      [--parts encoder decoder decoder_compiled encoder_compiled]

Builds the full-size renderer on deterministic stand-in weights (tests/helpers/standin.py; speed does
not depend on the values), then

- encoder: encodes random 512² images `[B, 3, 512, 512]` into motion latents (`IMTRenderer.encode_motion`,
  what every driving frame of a video costs) with `MotionEncoder.channels_last` False (NCHW) and True;
- decoder: decodes random adapted motion latents `[B, 32]` into the four motion maps
  (`IMTRenderer.decode_motion`, 13 style-modulated convolutions) in both forms of
  `stylegan.ModulatedConv2d`:

- grouped: the reference's arithmetic, one modulated and demodulated weight per sample and one
  grouped convolution (groups = B); the plain paths (`attention.fast_paths(False)`);
- batched: the style on the activations, one convolution with the shared weight, the demodulation
  on its output; the fast paths (default);

- decoder_compiled: the same decoder under `torch.compile` (inductor, mode "default"; the first call of
  each variant and batch size compiles) with its four blurs as depthwise convolutions (conv) or as sums
  of shifted copies (shifts, `stylegan.BLUR_BY_SHIFTS_WHEN_COMPILING`, the default);
- encoder_compiled: the motion encoder eager and as the compiled renderer runs it (`compiled.set_compile`
  "default", `compiled.motion_step`; the first call of each batch size compiles).

The variants take turns within every repeat; the tables give the median and fastest ms per frame after
one warm-up call each, and the largest difference of the outputs relative to the largest value.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _timing import timed  # noqa: E402
from imtalker_core import compiled  # noqa: E402
from imtalker_core.layers import stylegan  # noqa: E402
from imtalker_core.layers.attention import fast_paths  # noqa: E402
from tests.helpers.standin import standin_renderer  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FORMS = {"grouped": False, "batched": True}  # form → fast paths on
LAYOUTS = {"nchw": False, "channels_last": True}  # MotionEncoder.channels_last
BLURS = {"conv": False, "shifts": True}  # stylegan.BLUR_BY_SHIFTS_WHEN_COMPILING
COMPILED = {"eager": False, "compiled": True}  # the renderer's motion step
PARTS = {"encoder": LAYOUTS, "decoder": FORMS, "decoder_compiled": BLURS, "encoder_compiled": COMPILED}


def compare(variants: dict, run, batch: int, repeats: int, device: torch.device) -> str:
    """One markdown row: `run(setting)` timed per variant (turns within each repeat), ms per frame."""
    outputs = {name: run(setting) for name, setting in variants.items()}  # warm-up, and the outputs compared
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, setting in variants.items():
            times[name].append(timed(lambda: run(setting), device)[1] / batch * 1e3)
    names = list(variants)
    first, second = ([outputs[n]] if isinstance(outputs[n], torch.Tensor) else outputs[n] for n in names)
    diff = max(((b.float() - a.float()).abs().max() / a.float().abs().max()).item() for a, b in zip(first, second))
    cells = [f"{statistics.median(times[n]):.1f}, {min(times[n]):.1f}" for n in names]
    return f"| {batch} | {cells[0]} | {cells[1]} | {min(times[names[0]]) / min(times[names[1]]):.2f}× | {diff:.1e} |"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 8])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads on a CPU")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    ap.add_argument("--parts", nargs="+", default=["encoder", "decoder"], choices=list(PARTS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    model = standin_renderer(device, dtype)
    encoder = model.latent_token_encoder
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device}, {args.dtype}, "  # noqa: T201
          f"{args.repeats} repeats")

    def encode(images):
        def run(channels_last: bool):
            encoder.channels_last = channels_last
            try:
                return model.encode_motion(images)
            finally:
                encoder.channels_last = None
        return run

    def decode(latents):
        def run(fast: bool):
            with fast_paths(fast):
                return model.decode_motion(latents)
        return run

    compiled_decode = torch.compile(model.decode_motion)

    def decode_compiled(latents):
        def run(shifts: bool):
            # dynamo guards on the switch: each setting keeps its own compiled graph
            stylegan.BLUR_BY_SHIFTS_WHEN_COMPILING = shifts
            try:
                return compiled_decode(latents)
            finally:
                stylegan.BLUR_BY_SHIFTS_WHEN_COMPILING = True
        return run

    def encode_compiled(images):
        def run(compiling: bool):
            step = compiled.motion_step(model) if compiling else compiled.eager_motion
            return step(model, images).clone()  # out of a CUDA graph's memory, as the pipeline copies it
        return run

    if "encoder_compiled" in args.parts:
        compiled.set_compile(model, "default")
    for part in args.parts:
        variants = PARTS[part]
        a, b = variants
        print(f"\n{part}\n\n| batch | {a} ms/frame (median, min) | {b} ms/frame (median, min) "  # noqa: T201
              "| speed-up (min) | max rel. difference |\n| --- | --- | --- | --- | --- |")
        for batch in args.batch_sizes:
            g = torch.Generator().manual_seed(batch)
            if part in ("encoder", "encoder_compiled"):
                images = torch.rand(batch, 3, model.cfg.image_size, model.cfg.image_size, generator=g).to(device, dtype)
                run = encode(images) if part == "encoder" else encode_compiled(images)
            else:
                latents = torch.randn(batch, model.cfg.latent_dim, generator=g).to(device, dtype)
                run = decode(latents) if part == "decoder" else decode_compiled(latents)
            print(compare(variants, run, batch, args.repeats, device), flush=True)  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
