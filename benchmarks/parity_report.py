"""How close this machine's frames are to the reference's, per precision (stand-in weights).

    python benchmarks/parity_report.py [--device cpu] [--dtypes fp32 fp16 bf16] [--threads 1 2]

For each precision: the golden frames of tests/data/parity (the reference, float32 on a CPU) against
ours — mean |error|, PSNR (dB, peak 1), share of values off by > 1e-3, max — and the anchor argmax
picks that differ from our float32 ones. Half precisions are also compared with our float32 frames
on the same device. On CUDA, TF32 is switched off for the float32 run so it is true float32.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import imtalker_core as imt  # noqa: E402
from imtalker_core.renderer.transfer import CoarseTransfer  # noqa: E402
from tests.helpers.standin import parity_file, standin_state_dict  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def errors(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    diff = (a.double().cpu() - b.double().cpu()).abs()
    mse = diff.pow(2).mean().item()
    return {"mean": diff.mean().item(), "psnr": 10 * math.log10(1 / mse) if mse else math.inf,
            "off": (diff > 1e-3).double().mean().item(), "max": diff.max().item()}


def render(model, golden, device) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Frames `[2, 3, 512, 512]` (float32, CPU), the anchor picks `[2, 4096]` and seconds taken."""
    picks = {}
    anchor = [m for m in model.imt if isinstance(m, CoarseTransfer)][-1]
    hook = anchor.register_forward_hook(lambda mod, args, out: picks.update(argmax=out[1].cpu()))
    images = {k: golden[k].permute(0, 3, 1, 2).float().div(255) if golden[k].dim() == 4
              else golden[k].permute(2, 0, 1)[None].float().div(255) for k in ("source_u8", "driving_u8")}
    start = time.perf_counter()
    identity = imt.encode_identity(model, images["source_u8"].to(device))
    motion = imt.encode_motion(model, images["driving_u8"].to(device))
    frames = imt.render_frames(model, identity, motion, batch_size=2)
    hook.remove()
    return frames, picks["argmax"], time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", nargs="+", default=["fp32"], choices=list(DTYPES))
    ap.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    golden = load_file(parity_file("renderer_golden.safetensors"))
    state = standin_state_dict("renderer")
    print(f"torch {torch.__version__}, device {args.device}")  # noqa: T201
    print("| precision | threads | vs | mean abs | PSNR dB | share > 1e-3 | max | anchor picks changed | s |")  # noqa: T201
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")  # noqa: T201
    for threads in args.threads:
        torch.set_num_threads(threads)
        reference32 = None
        for name in ["fp32"] + [d for d in args.dtypes if d != "fp32"]:
            model = imt.IMTRenderer().eval()
            model.load_state_dict(state, strict=False)
            model = model.to(args.device, DTYPES[name])
            frames, picks, seconds = render(model, golden, args.device)
            rows = [("golden", errors(frames, golden["frames"]))]
            changed = "—"
            if reference32 is None:
                reference32 = (frames, picks)
            else:
                rows.append(("our fp32", errors(frames, reference32[0])))
                changed = f"{int((picks != reference32[1]).sum())} of {picks.numel()}"
            for against, e in rows:
                print(f"| {name} | {threads} | {against} | {e['mean']:.2e} | {e['psnr']:.1f} | "  # noqa: T201
                      f"{100 * e['off']:.3f} % | {e['max']:.2e} | {changed} | {seconds:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
