"""Latency of streamed generation (imtalker_core.stream): cold start, time to first frame, steady frames/s.

    python benchmarks/stream_latency.py --device cpu --frames 3 --batch-size 1 --seconds 4
    python benchmarks/stream_latency.py --device cuda --batch-size 8 --first-batch-sizes 1 8 --frames 150
    python benchmarks/stream_latency.py --device cuda --models path/to/models/imtalker   # official files

Without `--models` the models are stand-ins (tests/helpers/standin.py, via benchmarks/_standin.py)
written once to `--work-dir` (a temporary folder by default) and converted to `.safetensors`, as
`python -m imtalker_core convert` does; wav2vec2 is a randomly initialised wav2vec2-base
(`--wav2vec2 base`, the official architecture, 95 M parameters) or a one-layer 768-wide one
(`--wav2vec2 small`). Speed does not depend on the weights' values. The portrait is random and the
audio synthetic (`--seconds` of 16 kHz tones and noise), so no media library is needed.

Measured, each on the same models:
- cold_start_s: model files → models on the device (as `runner.load_models`; safetensors), and the
  identity encoding of a portrait plus the renderer's source-only work (`prepare_identity`): once per
  avatar, not counted in the time to first frame;
- per run (audio mode × first batch size): `StreamTimings` of `stream_frames` stopped after `--frames`
  frames: first_frame_s (from the first `next()` until the first batch is on the CPU: audio features,
  the first window's Euler steps, the first render batch), the audio and per-window motion times, and
  steady_fps (frames per second after the first batch). Each run is preceded by an untimed warm-up run
  of one batch (CUDA kernels, allocator);
- chunked_vs_whole: how far chunked-mode audio features and motion are from the whole clip's (mean
  |diff| relative to the mean magnitude; random weights, so an upper bound on what real ones show).

CUDA times are read after `torch.cuda.synchronize()`. Prints one JSON object on stdout (logs on stderr);
`--json OUT` also writes it to a file.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from imtalker_core import (  # noqa: E402
    compiled,
    convert_to_safetensors,
    encode_identity,
    generate_motion,
    load_generator_and_audio_encoder,
    load_renderer,
    model_files,
)
from imtalker_core.compiled import COMPILE_MODES  # noqa: E402
from imtalker_core.stream import (  # noqa: E402
    ChunkedAudioFeatures,
    StreamTimings,
    prepare_identity,
    stream_frames,
)

log = logging.getLogger("stream_latency")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_standin_models(folder: Path, wav2vec2: str) -> Path:
    """Stand-in renderer and generator as `.safetensors`, and a random wav2vec2 folder."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from tests.helpers.standin import (
        PARITY,
        standin_state_dict,
        write_official_layout,
        write_small_wav2vec2,
    )

    folder.mkdir(parents=True, exist_ok=True)
    for kind in ("renderer", "generator"):
        target = folder / f"{kind}.safetensors"
        if not target.exists():
            ckpt = folder / f"{kind}.ckpt"
            write_official_layout(kind, ckpt, state=standin_state_dict(kind))
            convert_to_safetensors(ckpt, target)
            ckpt.unlink()
    w2v = folder / model_files.WAV2VEC2_DIR
    if not (w2v / "config.json").exists():
        if wav2vec2 == "small":
            write_small_wav2vec2(w2v)
        else:
            torch.manual_seed(0)
            Wav2Vec2Model(Wav2Vec2Config()).eval().save_pretrained(w2v)  # wav2vec2-base's architecture
            shutil.copy(PARITY / "tiny-wav2vec2" / "preprocessor_config.json", w2v)
    return folder


@dataclass
class Models:
    renderer: torch.nn.Module
    generator: torch.nn.Module
    audio_encoder: torch.nn.Module


def load_models(folder: Path, device: torch.device, dtype: torch.dtype) -> Models:
    """As `runner.load_models` (without its media imports): renderer, generator and wav2vec2 on `device`."""
    missing = model_files.missing_files(folder)
    if missing:
        raise SystemExit(f"{folder} lacks {', '.join(missing)}")
    renderer = load_renderer(model_files.model_path(folder, model_files.RENDERER_FILE), device, dtype)
    generator, encoder = load_generator_and_audio_encoder(model_files.model_path(folder, model_files.GENERATOR_FILE),
                                                          folder / model_files.WAV2VEC2_DIR, device, dtype)
    return Models(renderer, generator, encoder)


def synthetic_speech(seconds: float, seed: int = 0) -> np.ndarray:
    """16 kHz mono: syllable-like tone bursts over low noise, in [-1, 1]."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    envelope = np.clip(np.sin(2 * np.pi * 3.1 * t), 0, None) ** 2
    pitch = 120 + 40 * np.sin(2 * np.pi * 0.4 * t)
    voice = np.sin(2 * np.pi * np.cumsum(pitch) / 16000) + 0.3 * np.sin(4 * np.pi * np.cumsum(pitch) / 16000)
    return (0.3 * envelope * voice + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_stream(models, prepared, wave, frames: int, **settings) -> StreamTimings:
    """Run `stream_frames` until `frames` frames are out (then stop it); its timings."""
    timings = StreamTimings()
    stream = stream_frames(models.renderer, models.generator, models.audio_encoder, prepared, wave,
                           timings=timings, **settings)
    try:
        for _ in stream:
            if timings.frames >= frames:
                break
    finally:
        stream.close()
    return timings


def relative_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().mean() / b.float().abs().mean()).item()


def chunked_vs_whole(models, prepared, wave, context: int, lookahead: int, steps: int, seed: int) -> dict:
    encoder, generator = models.audio_encoder, models.generator
    device = next(encoder.parameters()).device
    whole = encoder(torch.from_numpy(wave).to(device), window_frames=1500)
    window = generator.cfg.window_frames
    chunker = ChunkedAudioFeatures(encoder, window, context, lookahead)
    chunked = torch.cat([f for _, f in chunker.windows([wave])], dim=1)
    motion = {name: generate_motion(generator, feats, prepared.identity.motion, steps=steps, seed=seed)
              for name, feats in (("whole", whole), ("chunked", chunked))}
    return {"context_frames": context, "lookahead_frames": lookahead,
            "features_rel_mean_abs_diff": relative_diff(chunked, whole),
            "motion_rel_mean_abs_diff": relative_diff(motion["chunked"], motion["whole"])}


def environment(device: torch.device) -> dict:
    env = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
           "python": platform.python_version(), "device": str(device), "threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default="auto", choices=["auto", *DTYPES], help="auto = fp16 on CUDA, else fp32")
    ap.add_argument("--models", type=Path, default=None, help="a models folder with the official files")
    ap.add_argument("--work-dir", type=Path, default=None, help="where stand-in files are written (and kept)")
    ap.add_argument("--wav2vec2", choices=["base", "small"], default="base", help="stand-in wav2vec2 size")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of the synthetic speech")
    ap.add_argument("--frames", type=int, default=100, help="frames rendered per run (then the stream stops)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--first-batch-sizes", type=int, nargs="+", default=None,
                    help="first batch sizes to time (default: 1 and --batch-size)")
    ap.add_argument("--audio-modes", nargs="+", choices=["whole", "chunked"], default=["whole", "chunked"])
    ap.add_argument("--context-frames", type=int, default=100)
    ap.add_argument("--lookahead-frames", type=int, default=25)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--no-compare", action="store_true", help="skip the chunked-vs-whole comparison")
    ap.add_argument("--compile", choices=COMPILE_MODES, default="off",
                    help="torch.compile the renderer and the generator (imtalker_core.compiled); the untimed "
                         "warm-up run then renders two batches, so that both batch shapes are compiled")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    device = torch.device(args.device)
    precision = ("fp16" if device.type == "cuda" else "fp32") if args.precision == "auto" else args.precision
    first_sizes = args.first_batch_sizes or sorted({1, args.batch_size})

    temp = None
    if args.models is None:
        work = args.work_dir or Path(temp := tempfile.mkdtemp(prefix="imtalker_stream_"))
        log.info("writing stand-in model files to %s", work)
        models_dir = build_standin_models(work, args.wav2vec2)
    else:
        models_dir = args.models
    try:
        result = {"environment": environment(device), "precision": precision,
                  "models": "official files" if args.models else f"stand-ins (wav2vec2 {args.wav2vec2})",
                  "settings": {"seconds": args.seconds, "frames": args.frames, "batch_size": args.batch_size,
                               "steps": args.steps, "cfg": args.cfg, "compile": args.compile}}
        sync(device)
        t0 = time.perf_counter()
        models = load_models(models_dir, device, DTYPES[precision])
        sync(device)
        cold = {"load_models_s": time.perf_counter() - t0}
        for model in (models.renderer, models.generator):
            compiled.set_compile(model, args.compile)
        torch.manual_seed(0)
        portrait = torch.rand(1, 3, models.renderer.cfg.image_size, models.renderer.cfg.image_size)
        t0 = time.perf_counter()
        identity = encode_identity(models.renderer, portrait)
        sync(device)
        cold["encode_identity_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        prepared = prepare_identity(models.renderer, identity)
        sync(device)
        cold["prepare_identity_s"] = time.perf_counter() - t0
        result["cold_start_s"] = cold
        log.info("cold start: %s", {k: round(v, 3) for k, v in cold.items()})

        wave = synthetic_speech(args.seconds)
        runs = []
        for mode in args.audio_modes:
            for first in first_sizes:
                settings = {"cfg_scale": args.cfg, "steps": args.steps, "seed": args.seed,
                            "batch_size": args.batch_size, "first_batch_size": first, "audio_mode": mode,
                            "context_frames": args.context_frames, "lookahead_frames": args.lookahead_frames}
                # Warm-up: one batch, or under compile two (the first batch's shape and the others').
                timed_stream(models, prepared, wave, first + (args.batch_size if args.compile != "off" else 0),
                             **settings)
                timings = timed_stream(models, prepared, wave, args.frames, **settings)
                row = {"audio_mode": mode, "first_batch_size": first, **timings.as_dict()}
                row["first_window_motion_s"] = timings.windows[0].motion_s if timings.windows else None
                row["first_window_audio_s"] = timings.windows[0].audio_s if timings.windows else None
                runs.append(row)
                log.info("%s audio, first batch %d: first frame after %.1f ms, %s frames/s after it", mode, first,
                         1000 * timings.first_frame_s, f"{timings.steady_fps:.2f}" if timings.steady_fps else "-")
        result["runs"] = runs
        if not args.no_compare:
            result["chunked_vs_whole"] = chunked_vs_whole(models, prepared, wave, args.context_frames,
                                                          args.lookahead_frames, args.steps, args.seed)
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
    text = json.dumps(result, indent=2)
    sys.stdout.write(text + "\n")
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
