"""Inference layout of the synthesis network: channels-last activations, BatchNorm folding and the
up-sampling convs as 2×2 phase convs (issue 11).

    python benchmarks/layout_speed.py [--batch-sizes 1 2] [--repeats 7] [--threads 2] [--device cpu]
                                      [--dtype fp32] [--variants plain channels_last fold both phases all]
                                      [--kernels none window layernorm window+layernorm]

Builds the full-size renderer on deterministic stand-in weights (tests/helpers/standin.py; speed does
not depend on the values), encodes a random 512² source once, then renders motion latents → frames
through `pipeline.render_batch` under each variant of `synthesis.set_inference_layout`:

- plain:         channels_last=False, fold_batchnorm=False, upsample_phases=False
- channels_last: channels_last=True,  fold_batchnorm=False, upsample_phases=False
- fold:          channels_last=False, fold_batchnorm=True,  upsample_phases=False
- both:          channels_last=True,  fold_batchnorm=True,  upsample_phases=False
- phases:        channels_last=False, fold_batchnorm=False, upsample_phases=True
- all:           channels_last=True,  fold_batchnorm=True,  upsample_phases=True (the CPU default)

With `--kernels` each layout runs once per set of the synthesis network's Triton kernels (CUDA only):
"none" (the torch code), "window" (`attention.window_kernel`), "layernorm" (`attention.layernorm_kernel`)
or "window+layernorm"; named e.g. "both+window" ("none" keeps the layout's name). The anchor argmax keeps
its default (`attention.argmax_kernel`).

Every variant has its own copy of the model, so no variant rebuilds another's cached weights. The
variants take turns within every repeat (a busy, shared machine slows all of them alike) and the
table gives the median and the fastest milliseconds per frame of the whole `render_batch` and of the
synthesis network alone (same inputs), after one warm-up batch per variant; on a shared machine the
fastest run is the better estimate of the unloaded speed. The last columns compare each variant's frames
with the plain variant's: max abs difference and PSNR (peak 1).
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import imtalker_core as imt  # noqa: E402
from imtalker_core.layers import attention  # noqa: E402
from imtalker_core.pipeline import prepare_render_source, render_batch  # noqa: E402
from imtalker_core.renderer.synthesis import set_inference_layout  # noqa: E402
from _timing import timed  # noqa: E402
from tests.helpers.standin import standin_renderer  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# kernel set → (window_kernel mode, layernorm_kernel mode)
KERNEL_SETS = {"none": ("torch", "torch"), "window": ("triton", "torch"), "layernorm": ("torch", "triton"),
               "window+layernorm": ("triton", "triton")}
VARIANTS = {"plain": (False, False, False), "channels_last": (True, False, False), "fold": (False, True, False),
            "both": (True, True, False), "phases": (False, False, True), "all": (True, True, True)}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.double() - b.double()).pow(2).mean().item()
    return 10 * math.log10(1 / mse) if mse > 0 else math.inf


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads on a CPU")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--kernels", nargs="+", default=["none"], choices=list(KERNEL_SETS),
                    help="the Triton kernels of each variant's synthesis network (CUDA)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    device = torch.device(args.device)
    model = standin_renderer(device, DTYPES[args.dtype])
    torch.manual_seed(0)
    identity, source = prepare_render_source(model, imt.encode_identity(model, torch.rand(1, 3, 512, 512)))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device}, {args.dtype}, "  # noqa: T201
          f"{args.repeats} repeats")
    print("| batch | variant | render_batch ms/frame (median, min) | synthesis ms/frame (median, min) "  # noqa: T201
          "| max abs diff vs plain | PSNR dB |")
    print("| --- | --- | --- | --- | --- | --- |")  # noqa: T201
    models, kernels = {}, {}
    for layout in args.variants:
        copied = copy.deepcopy(model)
        set_inference_layout(copied, *VARIANTS[layout])
        for kernel_set in args.kernels:
            name = layout if kernel_set == "none" else f"{layout}+{kernel_set}"
            models[name], kernels[name] = copied, KERNEL_SETS[kernel_set]

    def run(name, fn, *inputs):  # fn(model, *inputs) under the variant's kernel modes
        window, layernorm = kernels[name]
        with attention.window_kernel(window), attention.layernorm_kernel(layernorm):
            return fn(models[name], *inputs)

    def render(name, *inputs):
        return run(name, render_batch, *inputs)

    def synthesize(name, aligned):
        return run(name, lambda model, x: model.frame_decoder(x), aligned)
    for batch in args.batch_sizes:
        latents = torch.randn(batch, model.cfg.latent_dim, generator=torch.Generator().manual_seed(batch))
        aligned = []
        hook = model.frame_decoder.register_forward_pre_hook(lambda module, inputs: aligned.append(inputs[0]))
        render_batch(model, identity, source, latents)
        hook.remove()
        times = {name: ([], []) for name in models}
        # Warm-up: builds every variant's cached weights (and compiles the Triton kernel).
        frames = {name: render(name, identity, source, latents).cpu() for name in models}
        for _ in range(args.repeats):
            for name in models:
                times[name][0].append(timed(lambda: render(name, identity, source, latents), device)[1])
                times[name][1].append(timed(lambda: synthesize(name, aligned[0]), device)[1])
        reference = frames.get("plain")
        for name in models:
            whole, synthesis = (f"{1e3 * statistics.median(t) / batch:.2f}, {1e3 * min(t) / batch:.2f}"
                                for t in times[name])
            if reference is None:
                diff, quality = "–", "–"
            else:
                diff = f"{(frames[name] - reference).abs().max().item():.2e}"
                quality = f"{psnr(frames[name], reference):.1f}"
            print(f"| {batch} | {name} | {whole} | {synthesis} | {diff} | {quality} |", flush=True)  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
