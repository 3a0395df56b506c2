"""Peak memory of pasting generated face crops back into a large photo (8000x8000, 3 frames by default).

Each case runs in a fresh process and reports its peak RSS (VmHWM) and the increase over the process
just before the case starts (torch imported, the original photo and the generated 512 px frames made):

* ``output_only``: only allocate and fill the ``[T, H, W, 3]`` float32 result, the least any batch
  paste-back can hold (``T * H * W * 12`` bytes);
* ``legacy``: the paste-back as first written (T full copies, a full-image float64 mask, a full float
  conversion of the original), kept here as the "before";
* ``paste_back``: `imtalker_core.media.face.paste_back` (the batch form);
* ``frame_only``: only allocate and fill one ``[H, W, 3]`` float32 frame, the least a streamed paste can hold;
* ``iter_fresh`` / ``iter_buffer``: `iter_paste_back` streaming frame by frame, a new array per frame / one
  reused buffer (what a video writer should use).

    python benchmarks/pasteback_memory.py [--size 8000] [--frames 3] [--box 3200] [--dtype float32 uint8]

The crop box is a ``--box`` px square centred in the photo (a 2000 px face at the reference's 1.6x);
``--pad`` places it half across the top-left corner instead. Results are checked against ``legacy``
on a small copy of the case before anything is measured.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from rss import peak_rss_mb  # beside this script

CASES = ("output_only", "legacy", "paste_back", "frame_only", "iter_fresh", "iter_buffer")


def legacy_paste_back(frames, box, original, feather=0.1, chunk=16):
    """The paste-back before bounding its memory (copied from the first implementation)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    gen = torch.as_tensor(frames)
    base = (original.astype(np.float32) / 255.0 if original.dtype == np.uint8
            else original.astype(np.float32, copy=False))
    height, width = base.shape[:2]
    ramp_px = feather * box.size

    def axis_weights(start, count):
        centres = np.arange(count, dtype=np.float64) + 0.5
        low = centres - start if start > 0 else np.full(count, np.inf)
        end = start + box.size
        high = end - centres if end < count else np.full(count, np.inf)
        ramp = np.clip(np.minimum(low, high) / ramp_px, 0.0, 1.0)
        return ramp * ramp * (3.0 - 2.0 * ramp)

    mask = np.outer(axis_weights(box.y0, height), axis_weights(box.x0, width)).astype(np.float32)
    out = np.empty((gen.shape[0], height, width, 3), dtype=np.float32)
    out[:] = base
    ix0, iy0, ix1, iy1 = box.inside()
    weight = mask[iy0:iy1, ix0:ix1, None]
    background = base[iy0:iy1, ix0:ix1]
    inside = weight > 0
    for start in range(0, gen.shape[0], chunk):
        part = gen[start:start + chunk].to(torch.float32).permute(0, 3, 1, 2)
        if part.shape[-1] != box.size:
            part = F.interpolate(part, size=(box.size, box.size), mode="bilinear", antialias=True,
                                 align_corners=False)
        resized = part.permute(0, 2, 3, 1).numpy()
        region = resized[:, iy0 - box.y0:iy1 - box.y0, ix0 - box.x0:ix1 - box.x0]
        blended = background + weight * (region - background)
        out[start:start + chunk, iy0:iy1, ix0:ix1] = np.where(inside, blended, background)
    return out


def make_inputs(size: int, frames: int, box_side: int, dtype: str, pad: bool):
    import numpy as np

    from imtalker_core.media.face import CropBox

    rng = np.random.default_rng(0)
    if dtype == "uint8":
        original = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    else:
        original = rng.random((size, size, 3), dtype=np.float32)
    generated = rng.random((frames, 512, 512, 3), dtype=np.float32)
    start = -box_side // 2 if pad else (size - box_side) // 2
    return original, generated, CropBox(start, start, box_side, size, size)


def run_case(case: str, original, generated, box) -> float:
    """Run one case; returns a checksum so the work cannot be skipped."""
    import numpy as np

    from imtalker_core.media.face import _fill_float32, iter_paste_back, paste_back

    height, width = original.shape[:2]
    if case == "output_only":
        out = np.empty((generated.shape[0], height, width, 3), dtype=np.float32)
        for frame in out:
            _fill_float32(frame, original)
        return float(out[:, ::97, ::97].sum())
    if case == "legacy":
        return float(legacy_paste_back(generated, box, original)[:, ::97, ::97].sum())
    if case == "paste_back":
        return float(paste_back(generated, box, original)[:, ::97, ::97].sum())
    if case == "frame_only":
        frame = np.empty((height, width, 3), dtype=np.float32)
        total = 0.0
        for _ in range(generated.shape[0]):
            _fill_float32(frame, original)
            total += float(frame[::97, ::97].sum())
        return total
    if case == "iter_fresh":
        return sum(float(f[::97, ::97].sum()) for f in iter_paste_back(generated, box, original))
    if case == "iter_buffer":
        buffer = np.empty((height, width, 3), dtype=np.float32)
        return sum(float(f[::97, ::97].sum()) for f in iter_paste_back(generated, box, original, out=buffer))
    raise ValueError(case)


def child(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import torch

    torch.set_num_threads(1)  # the same in every case; memory, not speed, is measured
    original, generated, box = make_inputs(args.size, args.frames, args.box, args.dtype[0], args.pad)
    before = peak_rss_mb()
    checksum = run_case(args.child, original, generated, box)
    peak = peak_rss_mb()
    return {"case": args.child, "before_mb": before, "peak_mb": peak, "added_mb": peak - before,
            "checksum": checksum}


def check_small(box_side: int, dtype: str, pad: bool) -> None:
    """The new forms give the legacy values on a small version of the case (sizes / 20)."""
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from imtalker_core.media.face import iter_paste_back, paste_back

    original, generated, box = make_inputs(400, 3, max(2, box_side // 20), dtype, pad)
    want = legacy_paste_back(generated, box, original)
    np.testing.assert_allclose(paste_back(generated, box, original), want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.stack(list(iter_paste_back(generated, box, original))), want, rtol=0, atol=1e-6)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=8000, help="side of the square photo in pixels")
    ap.add_argument("--frames", type=int, default=3)
    ap.add_argument("--box", type=int, default=3200, help="side of the crop box in pixels")
    ap.add_argument("--pad", action="store_true", help="place the box half across the top-left corner")
    ap.add_argument("--dtype", nargs="+", choices=("float32", "uint8"), default=["float32", "uint8"],
                    help="dtype of the original photo (load_image gives float32)")
    ap.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    ap.add_argument("--child", choices=CASES, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(child(args)))
        return 0
    for dtype in args.dtype:
        check_small(args.box, dtype, args.pad)
    print(f"{args.frames} frames of 512 px pasted into a {args.size}x{args.size} photo, {args.box} px box"
          f"{' across the corner' if args.pad else ''}; one output frame is "
          f"{args.size * args.size * 12 / 2**20:.0f} MB", flush=True)
    print(f"{'original':>8}  {'case':<12} {'peak RSS MB':>11} {'added MB':>9}", flush=True)
    for dtype in args.dtype:
        for case in args.cases:
            cmd = [sys.executable, __file__, "--child", case, "--size", str(args.size), "--frames",
                   str(args.frames), "--box", str(args.box), "--dtype", dtype] + (["--pad"] if args.pad else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{dtype:>8}  {case:<12} {r['peak_mb']:11.0f} {r['added_mb']:9.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
