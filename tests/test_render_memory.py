"""The automatic batch size (imtalker_core.render_memory) and where the command line and batch jobs use it."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile
import torch

from imtalker_core import batch_jobs, cli, render_memory, runner

GIB = 2**30


@pytest.fixture
def gpu_with_free(monkeypatch):
    """Pretend CUDA reports `free` bytes free (set `.free`)."""
    state = type("Free", (), {"free": 8 * GIB})()
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (state.free, 80 * GIB))
    return state


def test_auto_batch_size_on_a_cpu_and_on_a_gpu(gpu_with_free):
    assert render_memory.auto_batch_size("cpu", torch.float32) == render_memory.CPU_AUTO_BATCH == 1
    assert render_memory.auto_batch_size("mps", torch.float16) == render_memory.OTHER_AUTO_BATCH == 4
    # 80 % of 8 GiB, less 1 GiB fixed, in 96 MiB fp16 frames: 57 → the cap of 32.
    assert render_memory.auto_batch_size("cuda", torch.float16) == 32
    # fp32: (6.4 − 5.5 GiB) / 160 MiB → 5; with 0.5 GiB of weights still to load, (6.0 − 5.5) → 3.
    assert render_memory.auto_batch_size("cuda", torch.float32) == 5
    assert render_memory.auto_batch_size("cuda:0", torch.float32, reserve_bytes=GIB // 2) == 3
    gpu_with_free.free = GIB  # less than the fixed part: one frame at a time
    assert render_memory.auto_batch_size("cuda", torch.float32) == 1
    gpu_with_free.free = 3 * GIB
    assert render_memory.auto_batch_size("cuda", torch.float16, cap=8) == 8
    # Driving frames go through the motion encoder in the same batches: its 256 MiB a frame bounds them too.
    gpu_with_free.free = 8 * GIB
    assert render_memory.auto_batch_size("cuda", torch.float16, encodes_motion=True) == 25  # 6.4 GiB / 256 MiB


def test_weight_bytes_count_the_models_to_load():
    assert render_memory.weight_bytes(torch.float16, audio=False) == 2 * render_memory.RENDERER_PARAMETERS
    assert render_memory.weight_bytes(torch.float32) == 4 * (render_memory.RENDERER_PARAMETERS
                                                             + render_memory.AUDIO_MODEL_PARAMETERS)


def _captured_batch_size(monkeypatch, argv: list[str], auto: int) -> int:
    """The batch size `cli.main(argv)` hands the runner, with the device's automatic choice `auto`."""
    captured = {}

    def auto_batch_size(device, dtype, reserve_bytes=0, cap=32, encodes_motion=False):
        captured["encodes_motion"] = encodes_motion
        assert reserve_bytes == render_memory.weight_bytes(dtype, audio=argv[0] == "audio")
        return auto

    monkeypatch.setattr(render_memory, "auto_batch_size", auto_batch_size)
    monkeypatch.setattr(runner, "load_models", lambda *args, **kwargs: None)
    monkeypatch.setattr(runner, "video_to_video",
                        lambda *args, batch_size, **kwargs: captured.setdefault("batch_size", batch_size))
    monkeypatch.setattr(cli, "_run_stream",
                        lambda args, *rest: captured.setdefault("batch_size", args.batch_size) and None)
    assert cli.main(argv) == 0
    if "--batch-size" not in argv:  # the video command's batches also encode the driving frames
        assert captured["encodes_motion"] == (argv[0] == "video")
    return captured["batch_size"]


def test_the_command_line_resolves_batch_size_0(monkeypatch, tmp_path, media_dir):
    speech = tmp_path / "speech.wav"
    soundfile.write(speech, 0.3 * np.sin(np.linspace(0, 2000, 16000)).astype(np.float32), 16000)
    video = ["video", str(media_dir / "photo_512.png"), str(media_dir / "driving_short.mp4"), "-o",
             str(tmp_path / "out.mp4"), "--device", "cpu"]
    assert cli.build_parser().parse_args(video[:5]).batch_size == 0  # the default
    assert _captured_batch_size(monkeypatch, video, auto=24) == 24
    assert _captured_batch_size(monkeypatch, video + ["--batch-size", "3"], auto=24) == 3
    # A stream keeps its batches short so that frames keep coming.
    stream = ["audio", str(media_dir / "photo_512.png"), str(speech), "-o", str(tmp_path / "s.mp4"),
              "--device", "cpu", "--stream"]
    assert _captured_batch_size(monkeypatch, stream, auto=24) == cli.STREAM_AUTO_BATCH == 8
    assert _captured_batch_size(monkeypatch, stream, auto=2) == 2


def test_batch_jobs_resolve_batch_size_0_on_their_device(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(render_memory, "auto_batch_size", lambda device, dtype: seen.append((device, dtype)) or 12)
    monkeypatch.setattr(runner, "video_to_video", lambda *args, batch_size, **kwargs: batch_size)
    models = runner.Models(torch.nn.Linear(1, 1).to(torch.float16))
    job = batch_jobs.Job(row=2, kind="video", image=tmp_path / "i.png", driver=tmp_path / "d.mp4",
                         output=tmp_path / "o.mp4", options={**{n: o.default for n, o in batch_jobs.OPTIONS.items()
                                                                 if "video" in o.rows}})
    assert job.options["batch_size"] == 0
    assert batch_jobs.run_job(models, job, "cuda:1") == 12 and seen == [("cuda:1", torch.float16)]
    job = batch_jobs.Job(row=3, kind="video", image=job.image, driver=job.driver, output=job.output,
                         options={**job.options, "batch_size": 5})
    assert batch_jobs.run_job(models, job, "cuda:1") == 5 and len(seen) == 1
