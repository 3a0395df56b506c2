"""Our renderer against the reference implementation's, side by side in one process (CPU, float32).

    python benchmarks/reference_speed.py --reference-dir PATH/TO/IMTalker --frames 8 --repeats 5 \\
        --json reference_speed.json

`--reference-dir` is a checkout (or `git archive` extract) of github.com/bigai-nlco/IMTalker; this
script never downloads it and nothing of it is copied into this repository. Both renderers are built
from the same renderer file (`--renderer`, default: the deterministic stand-in weights of
tests/helpers/standin.py written in the official layout to a temporary folder), run in float32 on
the CPU with `--threads` threads, on the same source image (`--image`, resized to 512² if needed)
and the same motion latents (`--latents`: seeded normal `[N, 32]`, or the reference's motion
encoding of the first N frames of `--driving`).

What is timed, per frame (the source image's encoding is timed once, separately, for both):

- reference: its own audio-driven loop (app.py `run_audio_inference`; renderer/inference.py's
  video loop is the same after its per-frame motion encoding). Once per video it runs
  `dense_feature_encoder`, `latent_token_encoder`, `adapt` and `latent_token_decoder` on the
  source; then one frame at a time `adapt(z_t, identity)` → `latent_token_decoder` →
  `decode(m_t, m_source, f_source)`. `decode` redoes the source-only work every frame: the key
  and value projections of the four full-attention levels (8² … 64²), and the guided resampler's
  gathers from the 128² and 256² source features; it materialises the 8-head 4096×4096 softmax
  map at the 64² level and averages it over heads for the resampler's top-1.
- ours: `imtalker_core.render_batches` at each `--batch-sizes` (the identity is encoded once by
  `encode_identity`; each call prepares the source-only work once, then renders the batches).

Variants are interleaved (reference, ours b1, ours b2, …, the order rotated every repeat) over
`--repeats`, so a busy machine slows all of them alike; the table reports the median seconds per
frame of wall time and of process CPU time (all threads; less disturbed by other processes) and the
speedups against the reference. Agreement: our frames against the reference's frames for the same
latents (first repeat): mean and max absolute difference, PSNR (peak 1), share of values off by
more than 1e-3, checked against the parity tolerances of tests/data/parity/README.md.
`--profile N` also profiles N frames of each (torch.profiler, top operators by self CPU time).

On a machine shared with other work, timings with 2 or more threads mostly measure OpenMP threads
waiting for each other (a descheduled thread stalls every parallel operator, and the waiting counts
as CPU time); `--threads 1` then still compares the arithmetic of the two implementations.

The reference's renderer imports `timm.models.layers` (to_2tuple, trunc_normal_ — initialisation
only, the weights are then loaded), `torchvision.transforms` and `matplotlib.pyplot` (imported,
unused by the model classes). Those that are not installed are replaced, for the import only, by
small stand-in modules (reported under "shims"). The reference loads the renderer file with
`strict=True`; the derived buffers the official layout does not store (blur kernels, Swin index and
mask) are taken from the freshly built reference model, and any other missing key is an error.

Prints a markdown table; `--json OUT` writes every number plus the environment. Exit code 1 when the
frames are outside the parity tolerances.
"""
from __future__ import annotations

import argparse
import collections.abc
import contextlib
import datetime
import importlib
import importlib.util
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import imtalker_core as imt  # noqa: E402
from imtalker_core.errors import InputError  # noqa: E402
from tests.helpers.standin import MEDIA, manifest, write_official_layout  # noqa: E402

log = logging.getLogger("reference_speed")

IMAGE_SIZE = 512
LATENT_DIM = 32
CHECKPOINT_PREFIX = "gen."
# The parity tolerances for frames in float32 on a CPU (tests/data/parity/README.md).
TOLERANCE = {"mean_abs": 2e-5, "psnr_db": 60.0, "share_off": 0.01}
OFF_THRESHOLD = 1e-3
# Issue 11's CPU goal: at least this many times the reference's speed, same run, float32.
GOAL_SPEEDUP = 2.0
# The reference's renderer options (renderer/inference.py's defaults, app.py's AppConfig).
REFERENCE_OPTIONS = {"swin_res_threshold": 128, "num_heads": 8, "window_size": 8}


# --------------------------------------------------------------------------- the reference

def _to_2tuple(x):
    """timm's `to_2tuple`: an iterable is returned as a tuple, anything else doubled."""
    return tuple(x) if isinstance(x, collections.abc.Iterable) else (x, x)


def _shim_modules() -> dict[str, dict]:
    """Stand-ins for the reference renderer's small outside imports, by top-level package."""
    return {
        "timm": {"timm": {}, "timm.models": {},
                 "timm.models.layers": {"to_2tuple": _to_2tuple, "trunc_normal_": torch.nn.init.trunc_normal_}},
        "torchvision": {"torchvision": {}, "torchvision.transforms": {}},
        "matplotlib": {"matplotlib": {}, "matplotlib.pyplot": {}},
    }


@contextlib.contextmanager
def _import_context(reference_dir: Path, shims: list[str]):
    """The reference folder first on `sys.path`, stand-ins for missing packages, and no `.pyc`
    files written into the reference checkout; all undone afterwards (imported modules stay)."""
    added = []
    for package, modules in _shim_modules().items():
        if importlib.util.find_spec(package) is not None:
            continue
        shims.append(package)
        for name, attrs in modules.items():
            module = types.ModuleType(name)
            module.__dict__.update(attrs)
            sys.modules[name] = module
            added.append(name)
    sys.path.insert(0, str(reference_dir))
    bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        yield
    finally:
        sys.dont_write_bytecode = bytecode
        sys.path.remove(str(reference_dir))
        for name in added:
            sys.modules.pop(name, None)


def import_reference(reference_dir: Path) -> tuple[type, list[str]]:
    """The reference's `IMTRenderer` class and the packages replaced by stand-ins."""
    if not (reference_dir / "renderer" / "models.py").is_file():
        raise InputError(f"--reference-dir {reference_dir} has no renderer/models.py; pass a checkout of "
                         "https://github.com/bigai-nlco/IMTalker (git clone, or git archive HEAD | tar -x)")
    if "renderer" in sys.modules:
        raise InputError("a module named 'renderer' is already imported; run this script in a fresh process")
    shims: list[str] = []
    with _import_context(reference_dir, shims):
        models = importlib.import_module("renderer.models")
    log.info("reference renderer imported from %s (stand-ins for: %s)", reference_dir, ", ".join(shims) or "none")
    return models.IMTRenderer, shims


def read_renderer_state(path: Path) -> dict[str, torch.Tensor]:
    """The renderer's entries of an official-layout file, without the `gen.` prefix.

    The reference keeps the `gen.` entries of `state_dict` and drops the rest; read here with
    `weights_only=True` (safetensors files are read with safetensors).
    """
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        raw = load_file(str(path))
    else:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        raw = raw.get("state_dict", raw)
    if any(k.startswith(CHECKPOINT_PREFIX) for k in raw):
        return {k[len(CHECKPOINT_PREFIX):]: v for k, v in raw.items() if k.startswith(CHECKPOINT_PREFIX)}
    return dict(raw)


def build_reference(renderer_cls: type, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The reference renderer with `state` loaded strictly (float32, CPU, eval mode).

    Only the derived buffers of the official manifest may be missing from `state`: they are
    computed by the model itself, so its own values complete the dict.
    """
    model = renderer_cls(types.SimpleNamespace(**REFERENCE_OPTIONS))
    own = model.state_dict()
    derived = {e["key"] for e in manifest()["renderer"]["entries"] if e["init"]["kind"] == "derived"}
    missing = set(own) - set(state)
    if not missing <= derived:
        raise InputError(f"the renderer file lacks {len(missing - derived)} entries the reference needs, e.g. "
                         f"{sorted(missing - derived)[:3]}; pass an official-layout renderer file")
    model.load_state_dict({**{k: own[k] for k in missing}, **state}, strict=True)
    return model.float().eval().requires_grad_(False)


class ReferenceLoop:
    """The reference's own inference steps (app.py `run_audio_inference`), one frame at a time."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @torch.no_grad()
    def encode_source(self, image: torch.Tensor) -> None:
        """Once per video: source features, identity, source motion latent and its motion maps."""
        m = self.model
        self.features, self.identity = m.dense_feature_encoder(image)
        self.source_latent = m.latent_token_encoder(image)
        self.source_maps = m.latent_token_decoder(m.adapt(self.source_latent, self.identity))

    @torch.no_grad()
    def render(self, latents: torch.Tensor) -> torch.Tensor:
        """Frames `[N, 3, 512, 512]` in [0, 1] for latents `[N, 32]`, rendered one by one."""
        m = self.model
        frames = []
        for t in range(latents.shape[0]):
            maps = m.latent_token_decoder(m.adapt(latents[t:t + 1], self.identity))
            frames.append(m.decode(maps, self.source_maps, self.features))
        return torch.cat(frames)


# --------------------------------------------------------------------------- ours

class OurLoop:
    """`imtalker_core`'s path: the identity encoded once, then `render_batches` per batch size."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def encode_source(self, image: torch.Tensor) -> None:
        self.identity = imt.encode_identity(self.model, image)

    def render(self, latents: torch.Tensor, batch_size: int) -> torch.Tensor:
        return torch.cat(list(imt.render_batches(self.model, self.identity, latents, batch_size=batch_size)))


# --------------------------------------------------------------------------- inputs

def load_source(path: Path) -> torch.Tensor:
    """`[1, 3, 512, 512]` float32 in [0, 1], resized as the reference does when not 512² (PIL bicubic)."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (IMAGE_SIZE, IMAGE_SIZE):
            im = im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
        pixels = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float().div(255).contiguous()


def make_latents(args, reference: ReferenceLoop) -> torch.Tensor:
    """Motion latents `[N, 32]` (float32) fed to both renderers."""
    if args.latents == "random":
        generator = torch.Generator().manual_seed(args.seed)
        return torch.randn(args.frames, LATENT_DIM, generator=generator)
    import cv2

    capture = cv2.VideoCapture(str(args.driving))
    frames = []
    while len(frames) < args.frames:
        ok, frame = capture.read()
        if not ok:
            break
        rgb = Image.fromarray(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
        frames.append(torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).float().div(255))
    capture.release()
    if len(frames) < args.frames:
        raise InputError(f"--driving {args.driving} has {len(frames)} readable frames, fewer than --frames "
                         f"{args.frames}; lower --frames or use --latents random")
    with torch.no_grad():
        return torch.cat([reference.model.latent_token_encoder(f[None]) for f in frames])


# --------------------------------------------------------------------------- measuring

def timed(fn) -> tuple[object, float, float]:
    """(result, wall seconds, process CPU seconds of all threads)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def agreement(ours: torch.Tensor, reference: torch.Tensor) -> dict[str, float | bool]:
    """Differences of two frame stacks in [0, 1], in float64, and whether they are within tolerance."""
    diff = (ours.double() - reference.double()).abs()
    mse = diff.pow(2).mean().item()
    out = {"mean_abs": diff.mean().item(), "max_abs": diff.max().item(),
           "psnr_db": 10 * math.log10(1 / mse) if mse else math.inf,
           "share_off": (diff > OFF_THRESHOLD).double().mean().item()}
    out["within_tolerance"] = (out["mean_abs"] <= TOLERANCE["mean_abs"] and out["psnr_db"] >= TOLERANCE["psnr_db"]
                               and out["share_off"] <= TOLERANCE["share_off"])
    return out


def profile(fn, top: int) -> list[dict]:
    """Top operators by self CPU time while running `fn` once."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [{"op": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6, "share": e.self_cpu_time_total / total,
             "calls": e.count} for e in events[:top]]


def load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def reference_commit(reference_dir: Path) -> str | None:
    """The checkout's commit, when it is a git work tree (an archive extract has none)."""
    if not (reference_dir / ".git").exists():
        return None
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        return subprocess.run(["git", "-C", str(reference_dir), "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    return None


# --------------------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference-dir", type=Path, required=True,
                    help="checkout of github.com/bigai-nlco/IMTalker (holds renderer/models.py)")
    ap.add_argument("--renderer", type=Path, default=None,
                    help="renderer file in the official layout (default: stand-in weights, written to a temp folder)")
    ap.add_argument("--image", type=Path, default=MEDIA / "photo_512.png", help="source portrait")
    ap.add_argument("--latents", choices=("random", "video"), default="random",
                    help="seeded normal latents, or the reference's motion encoding of --driving's frames")
    ap.add_argument("--driving", type=Path, default=MEDIA / "driving_short.mp4")
    ap.add_argument("--frames", type=int, default=8, help="frames rendered per variant and repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed frames per variant before the repeats")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", type=int, default=0, metavar="FRAMES",
                    help="also profile this many frames of each (0: no profile)")
    ap.add_argument("--profile-top", type=int, default=15)
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)
    for name in ("frames", "repeats", "threads"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name} {getattr(args, name)} must be at least 1")
    if min(args.batch_sizes) < 1:
        raise InputError(f"--batch-sizes {args.batch_sizes}: every batch size must be at least 1")
    if args.warmup < 0 or args.profile < 0:
        raise InputError("--warmup and --profile must be 0 or more")
    for name in ("image", "driving") if args.latents == "video" else ("image",):
        if not getattr(args, name).is_file():
            raise InputError(f"--{name} {getattr(args, name)} is not a file")
    if args.renderer is not None and not args.renderer.is_file():
        raise InputError(f"--renderer {args.renderer} is not a file")
    return args


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    renderer_cls, shims = import_reference(args.reference_dir.resolve())
    env = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
           "python": platform.python_version(), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
           "threads": torch.get_num_threads(), "load_average_start": load_average(),
           "reference_commit": reference_commit(args.reference_dir), "shims": shims}

    with tempfile.TemporaryDirectory() as tmp:
        path = args.renderer
        if path is None:
            path = write_official_layout("renderer", Path(tmp) / "renderer.ckpt")
        reference = ReferenceLoop(build_reference(renderer_cls, read_renderer_state(path)))
        ours = OurLoop(imt.load_renderer(path, device="cpu", dtype=torch.float32))
        env["weights"] = "stand-in" if args.renderer is None else str(args.renderer)

    image = load_source(args.image)
    latents = make_latents(args, reference)
    setup = {"reference": timed(lambda: reference.encode_source(image))[1],
             "ours": timed(lambda: ours.encode_source(image))[1]}

    variants = {"reference": reference.render}
    for b in args.batch_sizes:
        variants[f"ours b{b}"] = lambda x, b=b: ours.render(x, b)
    if args.warmup:
        for name, fn in variants.items():
            log.info("warm-up: %s", name)
            fn(latents[:args.warmup])

    names = list(variants)
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    frames = {}
    for repeat in range(args.repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            out, seconds, cpu_seconds = timed(lambda: variants[name](latents))
            wall[name].append(seconds / args.frames)
            cpu[name].append(cpu_seconds / args.frames)
            frames.setdefault(name, out)
            log.info("repeat %d/%d %s: %.2f s/frame (CPU %.2f s/frame)", repeat + 1, args.repeats, name,
                     wall[name][-1], cpu[name][-1])

    rows = []
    ref_wall, ref_cpu = statistics.median(wall["reference"]), statistics.median(cpu["reference"])
    for name in names:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        row = {"variant": name, "s_per_frame": w, "cpu_s_per_frame": c, "speedup": ref_wall / w,
               "cpu_speedup": ref_cpu / c, "wall_samples": wall[name], "cpu_samples": cpu[name]}
        if name != "reference":
            row["agreement"] = agreement(frames[name], frames["reference"])
        rows.append(row)
    env["load_average_end"] = load_average()

    profiles = {}
    if args.profile:
        part = latents[:args.profile]
        profiles["reference"] = profile(lambda: reference.render(part), args.profile_top)
        best = max(args.batch_sizes) if args.profile >= max(args.batch_sizes) else 1
        profiles[f"ours b{best}"] = profile(lambda: ours.render(part, best), args.profile_top)

    return {"env": env, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "setup_seconds": setup, "rows": rows, "profiles": profiles, "tolerance": TOLERANCE}


def report(result: dict) -> str:
    env, args = result["env"], result["args"]
    lines = [f"CPU {env['cpu']} ({env['cpu_count']} cores), torch {env['torch']}, {env['threads']} threads, fp32, "
             f"{env['weights']} weights; {args['frames']} frames × {args['repeats']} repeats, {args['latents']} "
             f"latents; load average {env['load_average_start']} → {env['load_average_end']}",
             f"source encoding (once): reference {result['setup_seconds']['reference']:.2f} s, "
             f"ours {result['setup_seconds']['ours']:.2f} s"
             + (f"; stand-ins for {', '.join(env['shims'])}" if env["shims"] else ""),
             "",
             "| variant | s/frame (median wall) | speedup | CPU s/frame | CPU speedup | PSNR vs ref | max abs diff "
             "| mean abs diff | share > 1e-3 | parity |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in result["rows"]:
        a = row.get("agreement")
        cells = ("—",) * 5 if a is None else (
            f"{a['psnr_db']:.1f} dB", f"{a['max_abs']:.2e}", f"{a['mean_abs']:.2e}", f"{100 * a['share_off']:.3f} %",
            "ok" if a["within_tolerance"] else "OUTSIDE")
        lines.append(f"| {row['variant']} | {row['s_per_frame']:.2f} | {row['speedup']:.2f}× | "
                     f"{row['cpu_s_per_frame']:.2f} | {row['cpu_speedup']:.2f}× | " + " | ".join(cells) + " |")
    best = max((r for r in result["rows"] if r["variant"] != "reference"), key=lambda r: r["speedup"])
    lines += ["", f"best of ours: {best['variant']}, {best['speedup']:.2f}× the reference (median wall time; "
              f"{best['cpu_speedup']:.2f}× in CPU time); goal ≥ {GOAL_SPEEDUP:g}×: "
              + ("met" if best["speedup"] >= GOAL_SPEEDUP else "not met")]
    for name, top in result["profiles"].items():
        lines += ["", f"profile, {name} ({args['profile']} frames): top operators by self CPU time",
                  "| op | self CPU s | share | calls |", "| --- | --- | --- | --- |"]
        lines += [f"| {e['op']} | {e['self_cpu_s']:.2f} | {100 * e['share']:.1f} % | {e['calls']} |" for e in top]
    return "\n".join(lines)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        args = parse_args(argv)
        result = run(args)
    except InputError as err:
        log.error("error: %s", err)
        return 2
    print(report(result))  # noqa: T201
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
        log.info("wrote %s", args.json)
    return 0 if all(r["agreement"]["within_tolerance"] for r in result["rows"] if "agreement" in r) else 1


if __name__ == "__main__":
    raise SystemExit(main())
