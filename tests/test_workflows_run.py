"""The control and motion-editing templates run, in process, as ComfyUI would execute them.

`execute` runs an API prompt (from `ui_to_api`) node by node in dependency order with the pack's nodes; the
two core nodes these templates use (LoadImage, LoadAudio) are stood in for by readers of the test media. Small
models keep it quick: a renderer of the official structure at 128² and a narrow generator, each recording its
configuration in its file, beside the stand-in wav2vec2; the speech is cut to two seconds (50 frames).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import tests.test_nodes as shared
from tests.test_nodes import comfy_audio
from tests.test_workflows import definitions, ui_to_api

# The node tests' fixtures (the pack, standalone folders), by name.
pack, env_dirs = shared.pack, shared.env_dirs

ROOT = Path(__file__).resolve().parent.parent
SECONDS = 2.0
FRAMES = 50


def write_small_models(folder: Path) -> None:
    from safetensors.torch import save_file

    from imtalker_core.checkpoints import config_metadata
    from imtalker_core.config import GeneratorConfig, tiny_renderer_config
    from imtalker_core.generator import MotionGenerator
    from imtalker_core.renderer import IMTRenderer

    torch.manual_seed(0)
    for model, name in ((IMTRenderer(tiny_renderer_config()), "renderer_small.safetensors"),
                        (MotionGenerator(GeneratorConfig(hidden_size=32, depth=2, num_heads=2)),
                         "generator_small.safetensors")):
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / name),
                  metadata=config_metadata(model.cfg))


@pytest.fixture(scope="module")
def workspace(env_dirs, tmp_path_factory, media_dir, monkeypatch_module):
    """Small models beside the stand-ins, and an input folder holding the templates' example files."""
    models, output = env_dirs
    write_small_models(models)
    inputs = tmp_path_factory.mktemp("input")
    (inputs / "imtalker_examples").mkdir()
    for name in ("photo_512.png", "speech_16k_mono.wav", "driving_short.mp4"):
        shutil.copy(media_dir / name, inputs / "imtalker_examples" / name)
    monkeypatch_module.setenv("IMTALKER_INPUT_DIR", str(inputs))
    yield inputs, output
    for name in ("renderer_small.safetensors", "generator_small.safetensors"):
        (models / name).unlink()


@pytest.fixture(scope="module")
def monkeypatch_module():
    patch = pytest.MonkeyPatch()
    yield patch
    patch.undo()


class LoadImage:
    def __init__(self, folder):
        self.folder = folder

    def __call__(self, image, **_):
        from imtalker_core.media.images import load_image
        return (torch.from_numpy(load_image(self.folder / image))[None], None)


class LoadAudio:
    def __init__(self, folder):
        self.folder = folder

    def __call__(self, audio, **_):
        return (comfy_audio(self.folder / audio, SECONDS),)


def execute(pack_module, prompt: dict, core: dict) -> dict:
    """Run an API prompt; returns {node id: outputs tuple}."""
    done: dict[str, tuple] = {}

    def value(v):
        return done[v[0]][v[1]] if isinstance(v, list) else v

    pending = dict(prompt)
    while pending:
        ready = [k for k, n in pending.items()
                 if all(not isinstance(v, list) or v[0] in done for v in n["inputs"].values())]
        assert ready, f"cycle or missing source among {sorted(pending)}"
        for key in ready:
            entry = pending.pop(key)
            inputs = {name: value(v) for name, v in entry["inputs"].items()}
            if entry["class_type"] in core:
                done[key] = core[entry["class_type"]](**inputs)
                continue
            instance = pack_module.NODE_CLASS_MAPPINGS[entry["class_type"]]()
            out = getattr(instance, instance.FUNCTION)(**inputs)
            done[key] = out["result"] if isinstance(out, dict) else out
    return done


def run_template(pack_module, name: str, workspace) -> tuple[dict, dict]:
    inputs, _ = workspace
    prompt = ui_to_api(json.loads((ROOT / "workflows" / name).read_text()), definitions())
    for entry in prompt.values():
        if entry["class_type"] == "IMTalkerLoadRenderer":
            entry["inputs"]["renderer_name"] = "renderer_small.safetensors"
        if entry["class_type"] == "IMTalkerLoadGenerator":
            entry["inputs"]["generator_name"] = "generator_small.safetensors"
    core = {"LoadImage": LoadImage(inputs), "LoadAudio": LoadAudio(inputs)}
    return prompt, execute(pack_module, prompt, core)


def of_type(prompt: dict, class_type: str) -> str:
    return next(k for k, v in prompt.items() if v["class_type"] == class_type)


def check_video(path: str, frames: int) -> None:
    import av
    with av.open(path) as container:
        assert sum(1 for _ in container.decode(video=0)) == frames
        assert container.streams.audio


def test_keyframed_head_turn_template_runs_and_the_controls_reach_the_generator(pack, workspace):
    prompt, outputs = run_template(pack, "imtalker_head_turn_keyframes.json", workspace)
    (controls,) = outputs[of_type(prompt, "IMTalkerControlsKeyframes")]
    assert controls.parts == ("pose", "gaze") and controls.fps == 25
    assert torch.equal(controls.gaze, torch.zeros_like(controls.gaze))  # eyes on the camera throughout
    assert controls.pose[:, 1].max().item() == pytest.approx(20 * torch.pi / 180, abs=1e-6)
    motion, _, _ = outputs[of_type(prompt, "IMTalkerAudioToMotion")]
    assert motion.frames == FRAMES
    check_video(outputs[of_type(prompt, "IMTalkerRenderToVideo")][0], FRAMES)
    # The same generation without the controls moves differently: they reach the generator.
    key = of_type(prompt, "IMTalkerAudioToMotion")
    inputs = {name: (outputs[v[0]][v[1]] if isinstance(v, list) else v)
              for name, v in prompt[key]["inputs"].items() if name != "controls"}
    free, _, _ = pack.NODE_CLASS_MAPPINGS["IMTalkerAudioToMotion"]().generate(**inputs)
    assert not torch.allclose(free.latents, motion.latents)


def test_blend_of_speech_and_relative_video_motion_template_runs(pack, workspace):
    prompt, outputs = run_template(pack, "imtalker_blend_audio_video.json", workspace)
    speech, _, _ = outputs[of_type(prompt, "IMTalkerAudioToMotion")]
    (relative,) = outputs[of_type(prompt, "IMTalkerRelativeMotion")]
    (identity,) = outputs[of_type(prompt, "IMTalkerEncodeIdentity")]
    # Relative motion starts at the portrait's own latent.
    assert torch.allclose(relative.latents[0], identity.motion.reshape(-1).float().cpu(), atol=1e-6)
    (looped,) = outputs[of_type(prompt, "IMTalkerLoopMotion")]
    assert looped.frames == speech.frames == FRAMES
    (blended,) = outputs[of_type(prompt, "IMTalkerBlendMotion")]
    # The template's curve: all speech for the first second (weight 0 up to 1 s), then the video's share grows.
    assert torch.equal(blended.latents[:25], speech.latents[:25])
    assert not torch.allclose(blended.latents[-1], speech.latents[-1])
    check_video(outputs[of_type(prompt, "IMTalkerRenderToVideo")][0], FRAMES)


def test_speech_with_head_pose_and_gaze_from_a_video_template_runs(pack, workspace):
    prompt, outputs = run_template(pack, "imtalker_pose_gaze_from_video.json", workspace)
    (controls,) = outputs[of_type(prompt, "IMTalkerPoseGazeFromVideoFile")]
    assert controls.parts == ("pose", "gaze") and controls.fps == 25
    assert controls.frames == 100  # the 4 s driving clip, read from the file
    assert torch.equal(controls.pose[0], torch.zeros(3))  # neutral = first: relative to the first frame
    assert controls.pose.abs().max() > 0.01  # and the head does move
    motion, _, _ = outputs[of_type(prompt, "IMTalkerAudioToMotion")]
    assert motion.frames == FRAMES
    check_video(outputs[of_type(prompt, "IMTalkerRenderToVideo")][0], FRAMES)
