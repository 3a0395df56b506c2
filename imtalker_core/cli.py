"""Command line: `python -m imtalker_core {audio,video,batch,convert,models,prepare-data,train-generator,
train-renderer} …` (see README)."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from . import model_files, render_memory
from .compiled import COMPILE_MODES
from .errors import IMTalkerError
from .precision import PRECISION_DTYPES
from .sampling import NOISE_MODES
from .validation import MAX_STEPS, MIN_STEPS, check_device

log = logging.getLogger("imtalker_core.cli")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: Most frames an automatic batch of a stream holds: larger batches would hold frames back longer.
STREAM_AUTO_BATCH = 8


def _device(name: str) -> str:
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return PRECISION_DTYPES[name]


def _auto_batch_size(args: argparse.Namespace, device: str, dtype: torch.dtype) -> int:
    """`--batch-size 0`: what the device holds once the models are on it (`render_memory.auto_batch_size`)."""
    audio = args.command == "audio"
    size = render_memory.auto_batch_size(device, dtype, reserve_bytes=render_memory.weight_bytes(dtype, audio),
                                         encodes_motion=args.command == "video")
    if audio and args.stream:
        size = min(size, STREAM_AUTO_BATCH)
    log.info("rendering %d frame(s) at a time (--batch-size 0 = auto)", size)
    return size


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", type=Path, help="source portrait (any common image format)")
    p.add_argument("-o", "--output", type=Path, required=True, help="output .mp4 path")
    _model_options(p)
    p.add_argument("--batch-size", type=int, default=0,
                   help="frames rendered at once; 0 (default) = auto: 1 on a CPU (the fastest there), on a GPU as "
                        f"many as its free memory holds, up to {render_memory.MAX_AUTO_BATCH} (with --stream up to "
                        f"{STREAM_AUTO_BATCH}, so that frames keep coming)")
    p.add_argument("--no-crop", action="store_true", help="use the whole image instead of a face crop")
    p.add_argument("--crop-scale", type=float, default=1.6, help="crop side = scale × detected face box")
    p.add_argument("--center-crop-if-no-face", action="store_true",
                   help="use a centred square when no face is found instead of stopping")
    p.add_argument("--paste-back", action="store_true", help="composite the face back into the full image")
    p.add_argument("--feather", type=float, default=0.1, help="paste-back edge softness (fraction of the crop)")
    p.add_argument("-v", "--verbose", action="store_true")


def _model_options(p: argparse.ArgumentParser, device_help: str = "auto, cpu, cuda, cuda:1, mps") -> None:
    p.add_argument("--models", type=Path, default=None,
                   help=f"models folder (default: {model_files.default_models_dir()})")
    p.add_argument("--no-download", action="store_true", help="never download missing model files")
    p.add_argument("--device", default="auto", help=device_help)
    p.add_argument("--precision", default="auto", choices=["auto", *PRECISION_DTYPES],
                   help="auto = fp16 on CUDA, fp32 elsewhere. fp32 is true float32 (the reference's frames); tf32 "
                        "= fp32 with TF32 on NVIDIA GPUs (1.4x faster than fp32 on an H200, frames 58.8 dB from "
                        "the reference's; fp16 54 dB)")
    p.add_argument("--compile", default="off", choices=COMPILE_MODES,
                   help="torch.compile the renderer's frames and the generator's steps (off; default; "
                        "reduce-overhead = CUDA graphs, the fastest: a 10 s clip in 0.6 instead of 1.6 s on an "
                        "H200). The first batch compiles: 40-80 s on a GPU, minutes on a CPU; pays for long "
                        "clips and many jobs (`batch`) on a GPU")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m imtalker_core",
                                     description="IMTalker talking-face generation from the command line.")
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("audio", help="image + speech → talking-face video")
    _common(a)
    a.add_argument("audio", type=Path, help="speech (wav, flac, mp3, m4a, or a video's audio track)")
    a.add_argument("--seed", type=int, default=42)
    a.add_argument("--steps", type=int, default=10,
                   help=f"flow-matching time points ({MIN_STEPS}–{MAX_STEPS}; 10 as the reference)")
    a.add_argument("--cfg", type=float, default=3.0, help="audio classifier-free guidance scale")
    a.add_argument("--pose", type=Path, help="per-frame head pose [T,3] (.npy/.txt/.csv/.pt)")
    a.add_argument("--cam", type=Path, help="per-frame camera [T,3] (.npy/.txt/.csv/.pt)")
    a.add_argument("--gaze", type=Path, help="per-frame eye gaze [T,2] (.npy/.txt/.csv)")
    a.add_argument("--controls-fit", choices=["hold", "trim_or_zero"], default="hold",
                   help="control files shorter than the speech: 'hold' repeats their last value (default); "
                        "'trim_or_zero' pads with zeros as the reference does (frontal head, eyes on the camera); "
                        "longer files are cut either way")
    a.add_argument("--noise", choices=list(NOISE_MODES), default="reference",
                   help="initial noise: 'reference' = seeded once, fresh for every 2 s window (the reference's "
                        "default); 'fixed_per_window' = every window starts from the same noise "
                        "(the reference's --fix_noise_seed)")
    a.add_argument("--noise-on-device", action="store_true",
                   help="draw the initial noise on the compute device (the reference on GPU); default CPU")
    _add_stream_options(a)
    v = sub.add_parser("video", help="image + driving video → reenacted video (driving audio kept)")
    _common(v)
    v.add_argument("driving", type=Path, help="driving video")
    v.add_argument("--mute", action="store_true", help="do not copy the driving video's audio")
    v.add_argument("--motion-mode", choices=["absolute", "relative"], default="absolute",
                   help="absolute: the driver's expression as it is (the reference); relative: the portrait keeps "
                        "its own resting expression and takes only the driver's changes from its first frame "
                        "(for a driver who is another person)")
    v.add_argument("--crop-driving", action="store_true",
                   help="find the face in the driving video and crop one steady square around it "
                        "(default: the whole frame is resized, as the reference does)")
    b = sub.add_parser("batch", help="many videos from a CSV list, over the GPUs of a torchrun/accelerate launch",
                       description="One job per row: image, audio or video, output, and any audio/video options "
                                   "as columns (see README, Many videos). Resumable: finished outputs are skipped. "
                                   "Several GPUs: torchrun --nproc_per_node N -m imtalker_core batch JOBS.csv")
    b.add_argument("jobs", type=Path, help="CSV job list (paths relative to its folder)")
    _model_options(b, "auto (cuda:LOCAL_RANK under a launcher, else cuda, mps or cpu), cpu, cuda, cuda:1, mps")
    b.add_argument("--overwrite", action="store_true", help="redo jobs whose output exists (default: skip them)")
    b.add_argument("--resume", action="store_true",
                   help="take over every job claimed by an earlier run that was killed (claims of processes gone "
                        "from this machine are taken over anyway); only when no other batch run is going")
    b.add_argument("--report", type=Path, default=None,
                   help="per-job status, seconds and error as .csv or .jsonl (written by the first process)")
    b.add_argument("-v", "--verbose", action="store_true")
    c = sub.add_parser("convert", help="checkpoint → .safetensors with only the model's weights")
    c.add_argument("source", type=Path)
    c.add_argument("output", type=Path)
    c.add_argument("--dtype", choices=list(DTYPES), default=None, help="cast floating weights")
    c.add_argument("--ema", action="store_true", help="take the generator's EMA weights")
    c.add_argument("--drop-wav2vec2", action="store_true",
                   help="leave out the generator file's wav2vec2 copy (kept by default, as the reference runs it); "
                        "the wav2vec2 folder's weights are then used")
    m = sub.add_parser("models", help="show (and fetch) the model files")
    m.add_argument("--models", type=Path, default=None)
    m.add_argument("--download", action="store_true", help="download missing files now")
    # Training (imtalker_core.training): each registers its subcommands with a `handler`; importing them
    # loads neither accelerate nor transformers.
    from .training.generator_train import register as register_generator_training
    from .training.renderer_train import register as register_renderer_training
    register_generator_training(sub)
    register_renderer_training(sub)
    return parser


def _add_stream_options(p: argparse.ArgumentParser) -> None:
    """Options of `audio --stream`: the video is written while it is generated (imtalker_core.stream)."""
    g = p.add_argument_group("streaming (write frames as each 2 s motion window is ready)")
    g.add_argument("--stream", action="store_true",
                   help="write a fragmented MP4 progressively: to -o FILE.mp4 (as FILE.partial.mp4 until done) "
                        "or to standard output with -o - (e.g. | ffplay -)")
    g.add_argument("--stream-raw", action="store_true",
                   help="with -o -: bare RGB24 frames (no header, no audio; size and rate are logged) instead of MP4")
    g.add_argument("--first-batch-size", type=int, default=None,
                   help="frames in the first rendered batch (default --batch-size; smaller = earlier first frame, "
                        "frames then equal the non-streamed ones only up to float rounding)")
    g.add_argument("--stream-audio", choices=["whole", "chunked"], default="whole",
                   help="wav2vec2 features of the whole clip first (exact, default) or per window from "
                        "nearby audio (time to first frame independent of the clip length; slightly different)")


def _streaming(args: argparse.Namespace):
    """None when `args` asks for no streaming; else the stream output: a path, or standard output's bytes.

    Raises `InputError` for streaming options without --stream, and for a terminal as standard output."""
    import sys

    from .errors import InputError

    stream = getattr(args, "stream", False) or getattr(args, "stream_raw", False)
    to_stdout = str(args.output) == "-"
    if not stream:
        extra = [flag for flag, value in (("--first-batch-size", getattr(args, "first_batch_size", None)),
                                          ("--stream-audio", getattr(args, "stream_audio", "whole") != "whole"),
                                          ("-o -", to_stdout)) if value]
        if extra:
            raise InputError(f"{' and '.join(extra)} only apply to streamed output: add --stream")
        return None
    if not to_stdout:
        return args.output
    if sys.stdout.isatty():
        raise InputError("standard output is a terminal, not a pipe: pipe the stream into a player "
                         "(… -o - | ffplay -) or write it to a file with -o FILE.mp4")
    return sys.stdout.buffer


def _run_stream(args: argparse.Namespace, output, models, crop, controls: dict, device: str, bars) -> str:
    """`audio --stream`: `runner.audio_to_stream`; a closed pipe leaves standard output quiet at exit."""
    import errno
    import os
    import sys

    from . import runner
    from .media.video import OutputWriteError

    try:
        runner.audio_to_stream(models, args.image, args.audio, output, crop, raw=args.stream_raw, seed=args.seed,
                               steps=args.steps, cfg_scale=args.cfg, **controls, batch_size=args.batch_size,
                               first_batch_size=args.first_batch_size, noise=args.noise,
                               noise_device=device if args.noise_on_device else "cpu", audio_mode=args.stream_audio,
                               progress=bars, controls_fit=args.controls_fit)
    except OutputWriteError as err:
        if err.errno == errno.EPIPE and output is sys.stdout.buffer:
            # Python flushes stdout at exit; into the closed pipe that would print a second error.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise
    return "standard output" if output is sys.stdout.buffer else str(args.output)


class _Bars:
    """One tqdm bar per stage, on stderr."""

    def __init__(self):
        from tqdm import tqdm
        self._tqdm = tqdm
        self.bars = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        bar = self.bars.get(stage)
        if bar is None:
            unit = {"render": "frame", "motion": "step"}.get(stage, "window")
            bar = self.bars[stage] = self._tqdm(total=total, desc=stage, unit=unit, leave=True)
        bar.total = total
        bar.update(done - bar.n)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def run(args: argparse.Namespace) -> int:
    from . import convert_to_safetensors, runner

    handler = getattr(args, "handler", None)
    if handler is not None:  # prepare-data, train-generator, train-renderer
        return handler(args)

    if args.command == "convert":
        stats = convert_to_safetensors(args.source, args.output, dtype=DTYPES.get(args.dtype), use_ema=args.ema,
                                       keep_wav2vec2=not args.drop_wav2vec2)
        log.info("wrote %s: %d tensors, %d values", args.output, stats["tensors"], stats["values"])
        return 0
    if args.command == "batch":
        from .batch_jobs import run_batch

        return run_batch(args.jobs, models_dir=args.models, device=args.device,
                         dtype=PRECISION_DTYPES.get(args.precision), download=not args.no_download,
                         overwrite=args.overwrite, resume=args.resume, report=args.report,
                         compile_mode=args.compile, allow_tf32=args.precision == "tf32")
    if args.command == "models":
        root = args.models or model_files.default_models_dir()
        if args.download:
            model_files.ensure_models(root, download=True)
        missing = model_files.missing_files(root)
        log.info("models folder: %s", root)
        log.info("missing: %s", ", ".join(missing) if missing else "nothing")
        return 1 if missing else 0
    device = str(check_device(_device(args.device)))
    dtype = _dtype(args.precision, device)
    if device == "cpu" and dtype != torch.float32:
        log.warning("--precision %s on the CPU is usually much slower than fp32 and less exact; use fp32",
                    args.precision)
    if args.batch_size == 0:
        args.batch_size = _auto_batch_size(args, device, dtype)
    crop = runner.CropSettings(crop=not args.no_crop, scale=args.crop_scale,
                               on_no_face="center" if args.center_crop_if_no_face else "error",
                               paste_back=args.paste_back, feather=args.feather,
                               crop_driving=getattr(args, "crop_driving", False),
                               no_face_hint="add --center-crop-if-no-face to use the centred square, or crop "
                                            "the photo yourself")
    # Every check that needs no model runs first: a mistake costs seconds, not a model load.
    stream_output = _streaming(args) if args.command == "audio" else None
    if args.command == "audio":
        controls = {name: runner.load_controls(getattr(args, name), width, name)
                    for name, width in (("pose", 3), ("cam", 3), ("gaze", 2))}
    if stream_output is not None:
        runner.check_stream_job(args.image, args.audio, stream_output, crop, raw=args.stream_raw, seed=args.seed,
                                steps=args.steps, cfg_scale=args.cfg, batch_size=args.batch_size,
                                first_batch_size=args.first_batch_size, noise=args.noise,
                                audio_mode=args.stream_audio, control_paths=(args.pose, args.cam, args.gaze))
    elif args.command == "audio":
        runner.check_audio_job(args.image, args.audio, args.output, crop, seed=args.seed, steps=args.steps,
                               cfg_scale=args.cfg, batch_size=args.batch_size, noise=args.noise,
                               control_paths=(args.pose, args.cam, args.gaze))
    else:
        runner.check_video_job(args.image, args.driving, args.output, crop, batch_size=args.batch_size)
    models = runner.load_models(args.models, device, dtype, audio=args.command == "audio",
                                download=not args.no_download, compile_mode=args.compile,
                                allow_tf32=args.precision == "tf32")
    bars = _Bars()
    try:
        if stream_output is not None:
            out = _run_stream(args, stream_output, models, crop, controls, device, bars)
        elif args.command == "audio":
            out = runner.audio_to_video(
                models, args.image, args.audio, args.output, crop, seed=args.seed, steps=args.steps,
                cfg_scale=args.cfg, **controls, batch_size=args.batch_size, noise=args.noise,
                noise_device=device if args.noise_on_device else "cpu",
                progress=bars, controls_fit=args.controls_fit)
        else:
            out = runner.video_to_video(models, args.image, args.driving, args.output, crop,
                                        batch_size=args.batch_size, keep_audio=not args.mute, progress=bars,
                                        motion_mode=args.motion_mode)
    finally:
        bars.close()
    log.info("wrote %s", out)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    0 done; 1 `models` found files missing; 2 a problem the user can fix (logged); 130 Ctrl+C;
    128 + the signal number when stopped by SIGTERM (143: timeout, `docker stop`) or SIGHUP
    (129: the terminal closed). While the command runs, SIGTERM and SIGHUP (where the platform
    has them) raise KeyboardInterrupt like Ctrl+C, so the video writer deletes its partial file
    on the way out; a repeat of the signal during that cleanup is ignored, and the previous
    handlers are restored before returning. Python only lets the main thread set handlers, so
    from any other thread the signals keep their previous behaviour.
    """
    import signal
    import threading

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    received: list[int] = []
    running = [True]

    def stop(signum: int, frame: object) -> None:
        if received or not running[0]:
            log.debug("ignoring %s: already stopping", signal.Signals(signum).name)
            return
        received.append(signum)
        raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")

    previous: dict[int, object] = {}
    try:
        if threading.current_thread() is threading.main_thread():
            for name in ("SIGTERM", "SIGHUP"):
                number = getattr(signal, name, None)
                if number is not None:
                    previous[number] = signal.signal(number, stop)
        return run(args)
    except IMTalkerError as err:
        log.error("%s", err)
        return 2
    except KeyboardInterrupt:
        if received:
            log.error("stopped by %s; no partial output was left", signal.Signals(received[0]).name)
            return 128 + received[0]
        log.error("interrupted; no partial output was left under the output name")
        return 130
    finally:
        running[0] = False
        for number, handler in previous.items():
            # getsignal/signal give None for a handler not set from Python; the default is the best guess.
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)
