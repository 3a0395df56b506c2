"""End to end in a real ComfyUI: every example workflow runs on stand-in weights and tiny inputs.

Opt-in: runs only when `COMFYUI_DIR` names a ComfyUI source tree and the harness scripts of
`../shared/comfy` (or `$COMFY_HARNESS_DIR`) and its venv (`$COMFY_VENV`, default /tmp/comfyenv,
made by the harness's setup.sh, with this pack's requirements installed) exist. The server gets a
private base folder and port (`$COMFY_E2E_PORT`, default 8190), so a running ComfyUI is not
disturbed. Each workflow is converted to an API prompt with `ui_to_api` and run with run_api.py;
if the harness's Chromium is there, each is also loaded in the real frontend (run_ui.py --no-queue).
Inputs last one video frame (40 ms of audio, a one-frame driving video) because the full-size
renderer takes seconds per frame on a CPU; they replace the templates' example inputs under the same
names, which also checks that the pack's example installer never overwrites a user's file.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_nodes import load_pack
from tests.test_workflows import CORE_NODES, WORKFLOWS, ui_to_api

ROOT = Path(__file__).resolve().parent.parent
HARNESS = Path(os.environ.get("COMFY_HARNESS_DIR", ROOT.parent / "shared" / "comfy"))
COMFY_DIR = os.environ.get("COMFYUI_DIR")
VENV = Path(os.environ.get("COMFY_VENV", "/tmp/comfyenv"))
PORT = int(os.environ.get("COMFY_E2E_PORT", "8190"))
UPSCALER = "RealESRGAN_x2plus.pth"  # the name the photo workflow selects; here a tiny random 2× model
RESTORER = "RestoreFormer.pth"  # the name the face-restore template selects; here a tiny random RestoreFormer

pytestmark = [
    pytest.mark.skipif(not COMFY_DIR, reason="set COMFYUI_DIR to a ComfyUI source tree to run the e2e tests"),
    pytest.mark.skipif(not (HARNESS / "serve.sh").is_file(), reason=f"ComfyUI harness not found at {HARNESS}"),
    pytest.mark.skipif(not (VENV / "bin" / "python").exists(), reason=f"no harness venv at {VENV} (run setup.sh)"),
]


def tiny_upscaler_state() -> dict[str, torch.Tensor]:
    """A 2× 'RealESRGAN Compact' (SRVGGNetCompact, 8 features, 1 conv) as spandrel detects it.

    The architecture adds the nearest-upsampled input, so near-zero weights give a plain 2× upscale.
    """
    generator = torch.Generator().manual_seed(0)

    def conv(out_ch, in_ch):
        return torch.randn(out_ch, in_ch, 3, 3, generator=generator) * 0.01

    return {"body.0.weight": conv(8, 3), "body.0.bias": torch.zeros(8), "body.1.weight": torch.full((8,), 0.25),
            "body.2.weight": conv(8, 8), "body.2.bias": torch.zeros(8), "body.3.weight": torch.full((8,), 0.25),
            "body.4.weight": conv(3 * 2 * 2, 8), "body.4.bias": torch.zeros(12)}


# A random RestoreFormer as spandrel reads it (spandrel infers every size from the tensors): built in the harness
# venv, where spandrel lives.
RESTOREFORMER_SCRIPT = """
import sys, torch
from spandrel.architectures.RestoreFormer import RestoreFormerArch
from spandrel.architectures.RestoreFormer.__arch.restoreformer_arch import RestoreFormer
torch.manual_seed(0)
model = RestoreFormer(n_embed=32, embed_dim=16, ch=32, out_ch=3, ch_mult=(1, 1, 1, 1, 1, 1), num_res_blocks=1,
                      attn_resolutions=(16,), dropout=0.0, in_channels=3, resolution=512, z_channels=16,
                      double_z=False, enable_mid=True, head_size=8)
state = model.state_dict()
RestoreFormerArch().load(state)  # the architecture spandrel will detect must accept it
torch.save(state, sys.argv[1])
"""


def write_restorer(path: Path) -> None:
    made = subprocess.run([str(VENV / "bin" / "python"), "-c", RESTOREFORMER_SCRIPT, str(path)],
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]


def write_inputs(input_dir: Path, media_dir: Path) -> None:
    """The templates' example inputs under their own names in `input/imtalker_examples/`, but tiny: the
    portrait, one frame of speech and a one-frame driving video with sound. Written before the
    server starts, so the pack's example installer must leave them alone (it never overwrites)."""
    import soundfile

    from imtalker_core.media.video import read_video, write_video

    examples = input_dir / "imtalker_examples"
    examples.mkdir(parents=True, exist_ok=True)
    shutil.copy(media_dir / "photo_512.png", examples / "photo_512.png")
    speech, rate = soundfile.read(str(media_dir / "speech_16k_mono.wav"), dtype="float32")
    clip = speech[rate: rate + rate // 25]  # 40 ms from 1 s in, where there is speech
    soundfile.write(str(examples / "speech_16k_mono.wav"), clip, rate)
    frame = np.stack(list(read_video(media_dir / "driving_short.mp4", max_frames=1)))
    write_video(examples / "driving_short.mp4", frame, 25, audio=(clip, rate))


@pytest.fixture(scope="module")
def comfy(tmp_path_factory, standin_dir, media_dir):
    """A ComfyUI server with this pack, stand-in models and tiny inputs; yields (env, base dir)."""
    base = tmp_path_factory.mktemp("comfy_base")
    models = base / "models"
    shutil.copytree(standin_dir, models / "imtalker")
    (models / "upscale_models").mkdir(parents=True)
    torch.save(tiny_upscaler_state(), models / "upscale_models" / UPSCALER)
    write_restorer(models / "upscale_models" / RESTORER)
    write_inputs(base / "input", media_dir)
    env = {**os.environ, "COMFY_DIR": COMFY_DIR, "COMFY_VENV": str(VENV), "COMFY_BASE": str(base),
           "COMFY_PORT": str(PORT), "COMFY_STATE_DIR": str(base / "state"), "COMFY_URL": f"http://127.0.0.1:{PORT}"}
    started = subprocess.run(["bash", str(HARNESS / "serve.sh"), f"ComfyUI-IMTalker={ROOT}"], env=env,
                             capture_output=True, text=True, timeout=400)
    assert started.returncode == 0, f"serve.sh failed:\n{started.stderr[-4000:]}"
    try:
        yield env, base
    finally:
        subprocess.run(["bash", str(HARNESS / "stop.sh"), "--unlink"], env=env, capture_output=True, timeout=60)


def get_json(env, route: str):
    import urllib.request
    with urllib.request.urlopen(env["COMFY_URL"] + route, timeout=60) as response:
        return json.load(response)


def object_info(env) -> dict:
    return get_json(env, "/object_info")


def run_script(env, *args, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV / "bin" / "python"), *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout)


def video_stats(path: Path) -> tuple[int, int, int, bool]:
    """(frames, width, height, has_audio) of an MP4."""
    import av
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(video=0))
        return frames, stream.width, stream.height, bool(container.streams.audio)


def test_pack_registers_all_nodes_and_core_table_matches_comfyui(comfy):
    env, _ = comfy
    info = object_info(env)
    ours = {k for k, v in info.items() if v.get("python_module", "").endswith("ComfyUI-IMTalker")}
    assert ours == set(load_pack().NODE_CLASS_MAPPINGS)  # every node of the pack, none failed to register
    assert len(ours) == 28
    assert info["IMTalkerLoadRenderer"]["input"]["required"]["renderer_name"][0] == ["renderer.ckpt", "generator.ckpt"]
    assert info["IMTalkerLoadGenerator"]["input"]["required"]["wav2vec2_folder"][0] == ["wav2vec2-base-960h"]
    for name, expected in CORE_NODES.items():
        live = info[name]
        assert live["output"] == expected["output"], name
        for section in ("required", "optional"):
            assert live["input_order"].get(section, []) == expected["input_order"][section], name
            for input_name, spec in expected["input"][section].items():
                live_kind = live["input"][section][input_name][0]
                assert (isinstance(live_kind, list) and isinstance(spec[0], list)) or live_kind == spec[0], \
                    f"{name}.{input_name}"


def test_workflows_are_offered_as_templates(comfy):
    env, _ = comfy
    templates = get_json(env, "/api/workflow_templates")
    assert sorted(templates["ComfyUI-IMTalker"]) == [p.stem for p in WORKFLOWS]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_runs_in_comfyui(comfy, path, tmp_path):
    env, base = comfy
    prompt = ui_to_api(json.loads(path.read_text()), object_info(env))
    prompt_file = tmp_path / f"{path.stem}.api.json"
    prompt_file.write_text(json.dumps(prompt))
    result = run_script(env, HARNESS / "run_api.py", prompt_file, "--url", env["COMFY_URL"])
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    written = sorted((base / "output").rglob("*.mp4"), key=os.path.getmtime)
    assert written, result.stdout
    frames, width, height, has_audio = video_stats(written[-1])
    assert (frames, width, height, has_audio) == (1, 512, 512, True)  # photo_512.png: the photo's own size


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_loads_in_the_frontend(comfy, path, tmp_path):
    if not Path(os.environ.get("CHROMIUM", "/usr/bin/chromium")).exists():
        pytest.skip("no Chromium for the frontend check")
    env, _ = comfy
    result = run_script(env, HARNESS / "run_ui.py", path, tmp_path / "shot.png", "--no-queue",
                        "--url", env["COMFY_URL"], timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "dialog open after load" not in result.stderr, result.stderr


def test_rendering_shows_frame_previews_on_the_node(comfy, tmp_path):
    """While Render To Video works, the frontend gets previews of its frames over the websocket (a JPEG of
    the newest frame, as a sampler's previews), attributed to that node."""
    env, _ = comfy
    path = next(p for p in WORKFLOWS if p.stem == "imtalker_audio_portrait")
    prompt = ui_to_api(json.loads(path.read_text()), object_info(env))
    node = next(k for k, v in prompt.items() if v["class_type"] == "IMTalkerRenderToVideo")
    # A new output name: the node runs again even when an earlier test ran this workflow (ComfyUI's cache).
    prompt[node]["inputs"]["filename_prefix"] = "IMTalker/previews"
    prompt_file = tmp_path / "previews.api.json"
    prompt_file.write_text(json.dumps(prompt))
    result = run_script(env, ROOT / "tests" / "helpers" / "comfy_previews.py", prompt_file, "--url",
                        env["COMFY_URL"])
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    previews = json.loads(result.stdout)["previews"]
    assert previews and all(p["node"] == node for p in previews), previews
    assert {(p["format"], p["decoded"], tuple(p["size"])) for p in previews} == {("JPEG", "JPEG", (512, 512))}


def test_missing_model_is_reported_before_running(comfy, tmp_path):
    env, _ = comfy
    prompt = ui_to_api(json.loads(WORKFLOWS[0].read_text()), object_info(env))
    loader = next(k for k, v in prompt.items() if v["class_type"] == "IMTalkerLoadRenderer")
    prompt[loader]["inputs"]["renderer_name"] = "not_there.ckpt"
    prompt_file = tmp_path / "missing.api.json"
    prompt_file.write_text(json.dumps(prompt))
    result = run_script(env, HARNESS / "run_api.py", prompt_file, "--url", env["COMFY_URL"],
                        "--expect-error", "huggingface.co/cbsjtu01/IMTalker")
    assert result.returncode == 0, result.stdout[-4000:]
    assert "not_there.ckpt" in result.stdout
