"""End to end in a real ComfyUI, as a user meets it: templates on first click in a fresh base folder, a minute of
audio and a minute of driving video in bounded memory, the user's own sound in the MP4, Cancel, a face restorer
after rendering, and the pack beside ComfyUI-VideoHelperSuite.

Opt-in like `tests/test_comfy_e2e.py` (same `COMFYUI_DIR`, harness and venv); the VideoHelperSuite check also needs
`VHS_DIR`, a checkout of github.com/Kosinkadink/ComfyUI-VideoHelperSuite (its own requirements installed in the
harness venv: imageio-ffmpeg). Slow on a CPU: about 6 minutes on two cores.

How the work is shortened: the official-size renderer takes about a second per frame on a CPU and the official-size
generator seconds per 2-second window, so the runs that make hundreds of frames (every template with the 10 s
example speech, the 60 s runs) load `renderer_tiny.safetensors` (the official structure at 128², few channels)
and `generator_tiny.safetensors` (2 narrow blocks), whose configurations ride in the files
(`checkpoints.config_metadata`). Only the two model files differ: wav2vec2, the nodes, the audio and video
decoding, the paste-back into the full-size photo and the MP4 encoding are the ones a user runs. The
60 s runs paste back into the 512² photo (audio) or read a 512² video frame by frame (video), so the full-size
frames still flow through memory: holding them would cost 1,500 × 3 MiB = 4.4 GiB, far over the +1 GiB bound.
Cancel is measured on the official-size renderer, whose frame time is what a CPU user waits for.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_comfy_e2e import (COMFY_DIR, HARNESS, PORT, RESTORER, UPSCALER, VENV, get_json, object_info,
                                  run_script, tiny_upscaler_state, video_stats, write_restorer)
from tests.test_workflows import WORKFLOWS, ui_to_api

ROOT = Path(__file__).resolve().parent.parent
VHS_DIR = os.environ.get("VHS_DIR")
TINY_RENDERER = "renderer_tiny.safetensors"
TINY_GENERATOR = "generator_tiny.safetensors"
LONG_SECONDS = 60
FPS = 25
MEMORY_BOUND = 1 << 30  # the bound: peak RSS within +1 GiB of idle

pytestmark = [
    pytest.mark.skipif(not COMFY_DIR, reason="set COMFYUI_DIR to a ComfyUI source tree to run the e2e tests"),
    pytest.mark.skipif(not (HARNESS / "serve.sh").is_file(), reason=f"ComfyUI harness not found at {HARNESS}"),
    pytest.mark.skipif(not (VENV / "bin" / "python").exists(), reason=f"no harness venv at {VENV} (run setup.sh)"),
]


def write_small_models(folder: Path) -> None:
    """`renderer_tiny.safetensors` (the official structure at 128², few channels) and
    `generator_tiny.safetensors` (2 blocks of width 32, reading the stand-in wav2vec2's 768-wide features),
    random and seeded, each recording its configuration."""
    from safetensors.torch import save_file

    from imtalker_core.checkpoints import config_metadata
    from imtalker_core.config import GeneratorConfig, tiny_renderer_config
    from imtalker_core.generator import MotionGenerator
    from imtalker_core.renderer import IMTRenderer

    torch.manual_seed(0)
    for model, name in ((IMTRenderer(tiny_renderer_config()), TINY_RENDERER),
                        (MotionGenerator(GeneratorConfig(hidden_size=32, depth=2, num_heads=2)), TINY_GENERATOR)):
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / name),
                  metadata=config_metadata(model.cfg))


def write_long_inputs(folder: Path, media_dir: Path) -> None:
    """60 s of the 44.1 kHz stereo speech, and a 60 s 512² driving video (the short clip looped) with sound."""
    import soundfile

    from imtalker_core.media.video import read_video, write_video

    folder.mkdir(parents=True)
    speech, rate = soundfile.read(str(media_dir / "speech_44k_stereo.wav"), dtype="float32", always_2d=True)
    samples = LONG_SECONDS * rate
    soundfile.write(str(folder / "speech_60s.wav"), np.resize(speech, (samples, speech.shape[1])), rate)
    clip = np.stack(list(read_video(media_dir / "driving_short.mp4")))
    frames = np.resize(clip, (LONG_SECONDS * FPS, *clip.shape[1:]))
    mono, mono_rate = soundfile.read(str(media_dir / "speech_16k_mono.wav"), dtype="float32")
    write_video(folder / "driving_60s.mp4", frames, FPS, audio=(np.resize(mono, LONG_SECONDS * mono_rate), mono_rate))


@pytest.fixture(scope="module")
def server(tmp_path_factory, standin_dir, media_dir):
    """A ComfyUI server in a fresh base folder: models only (the pack installs its example inputs itself), plus
    the long inputs under `input/long/`; VideoHelperSuite beside the pack when `VHS_DIR` is set."""
    base = tmp_path_factory.mktemp("comfy_fresh")
    models = base / "models"
    shutil.copytree(standin_dir, models / "imtalker")
    write_small_models(models / "imtalker")
    (models / "upscale_models").mkdir(parents=True)
    torch.save(tiny_upscaler_state(), models / "upscale_models" / UPSCALER)
    write_restorer(models / "upscale_models" / RESTORER)
    write_long_inputs(base / "input" / "long", media_dir)
    env = {**os.environ, "COMFY_DIR": COMFY_DIR, "COMFY_VENV": str(VENV), "COMFY_BASE": str(base),
           "COMFY_PORT": str(PORT), "COMFY_STATE_DIR": str(base / "state"), "COMFY_URL": f"http://127.0.0.1:{PORT}"}
    packs = [f"ComfyUI-IMTalker={ROOT}"] + ([f"ComfyUI-VideoHelperSuite={VHS_DIR}"] if VHS_DIR else [])
    started = subprocess.run(["bash", str(HARNESS / "serve.sh"), *packs], env=env, capture_output=True, text=True,
                             timeout=400)
    assert started.returncode == 0, f"serve.sh failed:\n{started.stderr[-4000:]}"
    try:
        yield env, base
    finally:
        subprocess.run(["bash", str(HARNESS / "stop.sh"), "--unlink"], env=env, capture_output=True, timeout=60)


def server_pid(env) -> int:
    return int((Path(env["COMFY_STATE_DIR"]) / f"comfy-{env['COMFY_PORT']}.pid").read_text().split()[0])


def server_log(env) -> str:
    return (Path(env["COMFY_STATE_DIR"]) / f"comfy-{env['COMFY_PORT']}.log").read_text(errors="replace")


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS since start or since the last reset) of a process, in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


def reset_peak(pid: int) -> None:
    """Start VmHWM afresh from the current RSS (Linux: write 5 to clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def template_prompt(env, name: str, tiny: bool = True) -> dict:
    """The template `name` as the frontend queues it, with the small model files when `tiny`."""
    path = ROOT / "workflows" / name
    prompt = ui_to_api(json.loads(path.read_text()), object_info(env))
    if tiny:
        for node in prompt.values():
            if node["class_type"] == "IMTalkerLoadRenderer":
                node["inputs"]["renderer_name"] = TINY_RENDERER
            if node["class_type"] == "IMTalkerLoadGenerator":
                node["inputs"]["generator_name"] = TINY_GENERATOR
    return prompt


def nodes_of(prompt: dict, class_type: str) -> list[dict]:
    return [node for node in prompt.values() if node["class_type"] == class_type]


def run_prompt(env, prompt: dict, tmp_path: Path, name: str, *extra, timeout: int = 1800):
    prompt_file = tmp_path / f"{name}.api.json"
    prompt_file.write_text(json.dumps(prompt))
    return run_script(env, HARNESS / "run_api.py", prompt_file, "--url", env["COMFY_URL"], "--json", *extra,
                      timeout=timeout)


def newest_mp4(base: Path, after: float) -> Path:
    written = [p for p in (base / "output").rglob("*.mp4") if p.stat().st_mtime >= after]
    assert written, "no MP4 written"
    return max(written, key=os.path.getmtime)


def audio_format(path: Path) -> tuple[int, int]:
    """(sample rate, channels) of an MP4's sound track."""
    import av
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        return stream.codec_context.sample_rate, stream.codec_context.channels


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_template_runs_on_first_click_in_a_fresh_base_folder(server, path, tmp_path):
    """The template's own inputs (the pack's example files, installed at start-up) and settings, as queued."""
    env, base = server
    assert (base / "input" / "imtalker_examples" / "photo_512.png").is_file()
    started = time.time() - 1
    result = run_prompt(env, template_prompt(env, path.name), tmp_path, path.stem)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    frames, width, height, has_audio = video_stats(newest_mp4(base, started))
    assert has_audio and frames > 0
    if "reenactment" in path.name:
        assert (frames, width, height) == (100, 128, 128)  # 4 s of driving video, the tiny renderer's crop size
    else:
        assert frames == 250  # 9.96 s of example speech at 25 fps
        # The photo's size wherever the face is pasted back; the renderer's own size otherwise.
        assert (width, height) in ((512, 512), (128, 128))


def measure_run(env, base, prompt, tmp_path, name):
    """Run `prompt`; returns (peak RSS over idle in bytes, the MP4 it wrote). Idle is the server's RSS after an
    identical warm-up has loaded every model, so the figure is what the run itself holds."""
    pid = server_pid(env)
    idle = memory_kib(pid)["VmRSS"]
    reset_peak(pid)
    started = time.time() - 1
    result = run_prompt(env, prompt, tmp_path, name)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    peak = memory_kib(pid)["VmHWM"]
    return (peak - idle) * 1024, newest_mp4(base, started)


def long_audio_prompt(env, seconds_file: str, seed: int) -> dict:
    prompt = template_prompt(env, "imtalker_audio_portrait.json")
    (audio,) = nodes_of(prompt, "LoadAudio")
    audio["inputs"]["audio"] = seconds_file
    (generate,) = nodes_of(prompt, "IMTalkerAudioToMotion")
    generate["inputs"]["seed"] = seed
    # Pasted back into the 512² photo while streaming, so full-size frames pass through memory.
    (video,) = nodes_of(prompt, "IMTalkerRenderToVideo")
    crop_id = next(k for k, v in prompt.items() if v["class_type"] == "IMTalkerCropFace")
    image_id = next(k for k, v in prompt.items() if v["class_type"] == "LoadImage")
    video["inputs"].update(crop=[crop_id, 1], original=[image_id, 0])
    return prompt


def test_a_minute_of_audio_stays_within_a_gigabyte_and_keeps_the_sound(server, tmp_path):
    env, base = server
    # Warm-up: the same graph on the example speech loads every model and fills ComfyUI's caches.
    warm = run_prompt(env, long_audio_prompt(env, "imtalker_examples/speech_16k_mono.wav", 1), tmp_path, "warm")
    assert warm.returncode == 0, warm.stdout[-4000:]
    grown, mp4 = measure_run(env, base, long_audio_prompt(env, "long/speech_60s.wav", 2), tmp_path, "audio60")
    frames, width, height, has_audio = video_stats(mp4)
    assert (frames, width, height, has_audio) == (LONG_SECONDS * FPS, 512, 512, True)
    assert audio_format(mp4) == (44100, 2)  # the input's rate and channels, not the model's 16 kHz mono
    print(f"60 s audio-driven: peak RSS {grown / 2**20:.0f} MiB over idle")
    assert grown <= MEMORY_BOUND, f"peak RSS grew by {grown / 2**20:.0f} MiB over idle"


def long_video_prompt(env, video: str) -> dict:
    prompt = template_prompt(env, "imtalker_video_reenactment.json")
    (motion,) = nodes_of(prompt, "IMTalkerVideoToMotion")
    motion["inputs"]["video"] = video
    return prompt


def test_a_minute_of_driving_video_stays_within_a_gigabyte(server, tmp_path):
    env, base = server
    warm = run_prompt(env, long_video_prompt(env, "imtalker_examples/driving_short.mp4"), tmp_path, "warm")
    assert warm.returncode == 0, warm.stdout[-4000:]
    grown, mp4 = measure_run(env, base, long_video_prompt(env, "long/driving_60s.mp4"), tmp_path, "video60")
    frames, _, _, has_audio = video_stats(mp4)
    assert frames == LONG_SECONDS * FPS and has_audio
    print(f"60 s video-driven: peak RSS {grown / 2**20:.0f} MiB over idle")
    assert grown <= MEMORY_BOUND, f"peak RSS grew by {grown / 2**20:.0f} MiB over idle"


def post(env, route: str, body: dict | None = None) -> dict:
    data = json.dumps(body or {}).encode()
    request = urllib.request.Request(env["COMFY_URL"] + route, data=data,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        text = response.read()
    return json.loads(text) if text.strip() else {}


def frame_times(env) -> list[float]:
    """Seconds per frame of every Render To Video run so far, from the node's log line."""
    return [float(ms) / 1000 for ms in re.findall(r"IMTalker: wrote \d+ frames to .* \(([\d.]+) ms a frame",
                                                    server_log(env))]


def test_cancel_stops_a_render_within_two_frames(server, tmp_path):
    """On the official-size renderer (about a second a frame here): Cancel once frames are coming out; the run
    must end (ComfyUI's execution_interrupted) within two frames' time of the request."""
    env, base = server
    prompt = long_audio_prompt(env, "imtalker_examples/speech_16k_mono.wav", 3)
    for loader in nodes_of(prompt, "IMTalkerLoadRenderer"):
        loader["inputs"]["renderer_name"] = "renderer.ckpt"
    short = json.loads(json.dumps(prompt))
    (audio,) = nodes_of(short, "LoadAudio")
    (generate,) = nodes_of(short, "IMTalkerAudioToMotion")
    generate["inputs"]["seed"] = 4
    # Frame time of this renderer on this machine: a short complete run (it also loads the models).
    clip = base / "input" / "long" / "speech_4_frames.wav"
    import soundfile
    speech, rate = soundfile.read(str(base / "input" / "imtalker_examples" / "speech_16k_mono.wav"), dtype="float32")
    soundfile.write(str(clip), speech[rate: rate + 4 * rate // FPS], rate)
    audio["inputs"]["audio"] = "long/speech_4_frames.wav"
    before = len(frame_times(env))
    result = run_prompt(env, short, tmp_path, "frame_time")
    assert result.returncode == 0, result.stdout[-4000:]
    frame_time = frame_times(env)[before]

    queued = post(env, "/prompt", {"prompt": prompt, "client_id": "imtalker-e2e"})
    prompt_id = queued["prompt_id"]
    output = base / "output"
    deadline = time.time() + 600
    # Frames are coming out once Render To Video's partial MP4 exists (created with the first frame).
    while time.time() < deadline:
        if any(p.stat().st_size > 0 for p in output.rglob("*.partial.mp4")):
            break
        time.sleep(0.05)
    else:
        pytest.fail("rendering never started")
    time.sleep(1.5 * frame_time)  # mid-frame
    asked = time.time()
    post(env, "/interrupt")
    while time.time() < deadline:
        entry = get_json(env, f"/history/{prompt_id}").get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None:
            break
        time.sleep(0.05)
    messages = dict(entry["status"]["messages"])
    assert "execution_interrupted" in messages, entry["status"]
    stopped_after = messages["execution_interrupted"]["timestamp"] / 1000 - asked
    print(f"Cancel: stopped {stopped_after:.3f} s after the request; a frame takes {frame_time:.2f} s; "
          f"messages {[(name, data['timestamp'] / 1000 - asked) for name, data in entry['status']['messages']]}")
    assert stopped_after <= 2 * frame_time
    assert not list(output.rglob("*.partial.mp4"))  # the half-written file is removed


def api_node(info: dict, class_type: str, **inputs) -> dict:
    """An API-format node with every required widget at its default, then `inputs` on top."""
    spec = info[class_type]["input"]
    values = {}
    for name, entry in spec.get("required", {}).items():
        kind, options = entry[0], (entry[1] if len(entry) > 1 else {})
        if isinstance(kind, list):
            values[name] = options.get("default", kind[0] if kind else None)
        elif "default" in options:
            values[name] = options["default"]
    values.update(inputs)
    return {"class_type": class_type, "inputs": values}


@pytest.mark.skipif(not VHS_DIR, reason="set VHS_DIR to a ComfyUI-VideoHelperSuite checkout")
def test_works_beside_videohelpersuite(server, tmp_path):
    """VHS Load Video → Crop Face → Encode Motion → Render → VHS Video Combine (with the video's sound)."""
    env, base = server
    info = object_info(env)
    assert "VHS_LoadVideo" in info and "VHS_VideoCombine" in info, "VideoHelperSuite did not register"
    prompt = {
        "1": api_node(info, "IMTalkerLoadRenderer", renderer_name=TINY_RENDERER),
        "2": api_node(info, "LoadImage", image="imtalker_examples/photo_512.png"),
        "3": api_node(info, "IMTalkerCropFace", image=["2", 0]),
        "4": api_node(info, "IMTalkerEncodeIdentity", renderer=["1", 0], image=["3", 0]),
        "5": api_node(info, "VHS_LoadVideo", video="imtalker_examples/driving_short.mp4", frame_load_cap=20),
        "6": api_node(info, "IMTalkerEncodeMotion", renderer=["1", 0], images=["5", 0], fps=25.0),
        "7": api_node(info, "IMTalkerRender", renderer=["1", 0], identity=["4", 0], motion=["6", 0]),
        "8": api_node(info, "VHS_VideoCombine", images=["7", 0], audio=["5", 2], frame_rate=25,
                      filename_prefix="IMTalker/vhs", format="video/h264-mp4", save_output=True),
    }
    started = time.time() - 1
    result = run_prompt(env, prompt, tmp_path, "vhs")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    frames, width, height, has_audio = video_stats(newest_mp4(base, started))
    assert (frames, width, height, has_audio) == (20, 128, 128, True)


def test_server_memory_reader_sees_growth(server):
    """The RSS probe the memory tests rely on does move: a 256 MiB allocation in a child shows in its VmHWM."""
    child = subprocess.Popen(["python3", "-c", "import time; b = bytearray(256 << 20); time.sleep(30)"])
    try:
        deadline = time.time() + 20
        while time.time() < deadline and memory_kib(child.pid).get("VmHWM", 0) < 200 << 10:
            time.sleep(0.05)
        assert memory_kib(child.pid)["VmHWM"] >= 200 << 10
    finally:
        child.kill()
