"""Peak memory of the audio-driven path against clip length (10 s, 60 s, 10 min by default).

Each length runs in a fresh process: speech is looped to the length, encoded by wav2vec2 (a small
random 768-wide stand-in: the real weights are not available offline), turned into motion by the
full-size generator (stand-in weights), rendered by a *tiny* renderer configuration (the full one costs
4–6 s per frame on a 2-core CPU; `--no-render` stops before rendering) and streamed into an H.264 MP4
with the audio muxed in. Peak RSS (VmHWM) is reported per stage.

    python benchmarks/memory_vs_length.py --seconds 10 60 600 [--models DIR]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rss import peak_rss_mb  # beside this script


def child(seconds: float, models: Path, out_dir: Path, render: bool) -> dict:
    import numpy as np
    import soundfile
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import imtalker_core as imt
    from imtalker_core.config import tiny_renderer_config
    from imtalker_core.media.audio import load_audio, to_mono_16k
    from imtalker_core.media.video import VideoWriter

    torch.set_grad_enabled(False)
    stats = {"seconds": seconds}
    speech = Path(__file__).resolve().parent.parent / "tests" / "data" / "media" / "speech_16k_mono.wav"
    wave, rate = load_audio(speech)
    reps = int(np.ceil(seconds * rate / wave.shape[1]))
    long_wave = np.tile(wave, (1, reps))[:, : int(seconds * rate)]
    audio_path = out_dir / f"speech_{int(seconds)}s.wav"
    soundfile.write(audio_path, long_wave.T, rate)
    del wave, long_wave
    stats["after_setup_mb"] = peak_rss_mb()

    generator = imt.load_generator(models / "generator.ckpt")
    encoder = imt.load_audio_encoder(models / "wav2vec2-base-960h")
    torch.manual_seed(0)
    renderer = imt.IMTRenderer(tiny_renderer_config()).eval()
    stats["after_load_mb"] = peak_rss_mb()

    t0 = time.perf_counter()
    wave, rate = load_audio(audio_path)
    wave16 = torch.from_numpy(to_mono_16k(wave, rate))
    features = encoder(wave16)
    stats["frames"] = features.shape[1]
    stats["audio_encode_s"] = time.perf_counter() - t0
    stats["after_audio_mb"] = peak_rss_mb()

    t0 = time.perf_counter()
    source = torch.rand(1, 3, 128, 128)
    identity = imt.encode_identity(renderer, source)
    motion = imt.generate_motion(generator, features, torch.zeros(1, 32), steps=2, cfg_scale=1.0)
    stats["generate_s"] = time.perf_counter() - t0
    stats["after_generate_mb"] = peak_rss_mb()
    del features

    if not render:
        stats["render_write_s"] = float("nan")
        stats["peak_mb"] = peak_rss_mb()
        return stats
    t0 = time.perf_counter()
    with VideoWriter(out_dir / f"out_{int(seconds)}s.mp4", 25, audio=(wave, rate)) as writer:
        for frames in imt.render_batches(renderer, identity, motion, batch_size=16):
            writer.write(frames.permute(0, 2, 3, 1))
    stats["render_write_s"] = time.perf_counter() - t0
    stats["peak_mb"] = peak_rss_mb()
    return stats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, nargs="+", default=[10, 60, 600])
    ap.add_argument("--models", type=Path, default=None, help="stand-in models folder (built if absent)")
    ap.add_argument("--no-render", action="store_true",
                    help="stop after audio encoding and motion generation (the length-dependent stages)")
    ap.add_argument("--child", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.models, args.out, not args.no_render)))  # noqa: T201 - read by the parent
        return 0
    from _standin import build_models_dir

    with tempfile.TemporaryDirectory() as tmp:
        models = build_models_dir(args.models or Path(tmp) / "models")
        rows = []
        for seconds in args.seconds:
            cmd = [sys.executable, __file__, "--child", str(seconds), "--models", str(models), "--out", tmp]
            out = subprocess.run(cmd + (["--no-render"] if args.no_render else []), check=True,
                                 capture_output=True, text=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{r['seconds']:>6.0f} s  {r['frames']:>6d} frames  peak RSS {r['peak_mb']:7.0f} MB "  # noqa: T201
                  f"(after load {r['after_load_mb']:.0f}, audio {r['after_audio_mb']:.0f}, "
                  f"generate {r['after_generate_mb']:.0f})  times: audio {r['audio_encode_s']:.1f} s, "
                  f"generate {r['generate_s']:.1f} s, render+write {r['render_write_s']:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
