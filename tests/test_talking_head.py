"""IMTalker Talking Head (the one-node path), in-process without ComfyUI, on stand-in weights.

Clips are 0.1 s (3 frames at 25 fps), since the full-size renderer costs seconds per frame on a CPU.
"""
from __future__ import annotations

import os

import av
import numpy as np
import pytest
import torch

from tests import test_nodes as shared
from tests.test_nodes import comfy_audio, node, run

# The node tests' fixtures (the pack, stand-in models, standalone folders, the test photo), by name.
pack, sub, env_dirs, renderer, generator, photo = (
    shared.pack, shared.sub, shared.env_dirs, shared.renderer, shared.generator, shared.photo)

NODE_ID = "IMTalkerTalkingHead"


def talking_head(pack, **inputs):
    """Call the node as ComfyUI does; returns its full answer (a dict with 'ui' for mp4, else a tuple)."""
    defaults = {"seed": 7, "steps": 2, "cfg_scale": 3.0, "noise": "reference", "crop": True, "batch_size": 4,
                "output": "frames", "filename_prefix": "tests/talking_head"}
    instance = node(pack, NODE_ID)
    return getattr(instance, instance.FUNCTION)(**{**defaults, **inputs})


def framed(photo, width):
    """The portrait on a grey canvas `width` px wide (the face stays where the detector finds it)."""
    canvas = torch.full((1, photo.shape[1], width, 3), 0.5)
    left = (width - photo.shape[2]) // 2
    canvas[:, :, left:left + photo.shape[2]] = photo
    return canvas


def test_definition_matches_the_composable_nodes(pack):
    cls = pack.NODE_CLASS_MAPPINGS[NODE_ID]
    assert pack.NODE_DISPLAY_NAME_MAPPINGS[NODE_ID] == "IMTalker Talking Head"
    spec = cls.INPUT_TYPES()
    assert list(spec["required"]) == ["renderer", "generator", "image", "audio", "seed", "steps", "cfg_scale",
                                      "noise", "crop", "batch_size", "output", "filename_prefix"]
    assert list(spec["optional"]) == ["controls"]
    kind, options = spec["required"]["crop"]
    assert kind == "BOOLEAN" and options["default"] is True
    assert spec["required"]["output"][0] == ["mp4", "frames"]
    motion_spec = pack.NODE_CLASS_MAPPINGS["IMTalkerAudioToMotion"].INPUT_TYPES()["required"]
    for name in ("seed", "steps", "cfg_scale", "noise"):
        assert spec["required"][name] == motion_spec[name], name
    assert cls.RETURN_TYPES == ("IMAGE", "AUDIO", "FLOAT", "STRING") and cls.OUTPUT_NODE
    assert "names no file" in cls.VALIDATE_INPUTS(filename_prefix="")
    assert cls.VALIDATE_INPUTS(filename_prefix="IMTalker/x") is True


def test_frames_are_pasted_back_into_the_photo(pack, renderer, generator, photo, media_dir):
    wide = framed(photo, 640)
    audio = comfy_audio(media_dir / "speech_44k_stereo.wav", 0.1)
    frames, sound, fps, path = talking_head(pack, renderer=renderer, generator=generator, image=wide, audio=audio)
    assert frames.shape == (3, 512, 640, 3) and frames.dtype == torch.float32 and frames.device.type == "cpu"
    assert torch.isfinite(frames).all() and 0.0 <= frames.min() and frames.max() <= 1.0
    # Only the face's neighbourhood changes: the canvas's far corners are the original pixels.
    assert torch.equal(frames[:, :, :8], wide[:, :, :8].expand(3, -1, -1, -1))
    assert torch.equal(frames[:, :, -8:], wide[:, :, -8:].expand(3, -1, -1, -1))
    assert not torch.equal(frames[0], wide[0])
    assert fps == 25.0 and path == ""
    # The user's audio as given: 44.1 kHz stereo, exactly 3 frames long (padded with silence).
    assert sound["sample_rate"] == 44100 and sound["waveform"].shape == (1, 2, round(3 * 44100 / 25))
    assert torch.equal(sound["waveform"][0, :, :4410], audio["waveform"][0])
    assert not sound["waveform"][0, :, 4410:].any()


def test_crop_off_animates_the_whole_image_as_the_composable_nodes_do(pack, renderer, generator, photo, media_dir):
    audio = comfy_audio(media_dir / "speech_16k_mono.wav", 0.1)
    kwargs = {"seed": 3, "steps": 2, "cfg_scale": 2.0, "noise": "fixed_per_window"}
    frames, sound, _, _ = talking_head(pack, renderer=renderer, generator=generator, image=photo, audio=audio,
                                       crop=False, batch_size=1, **kwargs)
    assert frames.shape == (3, 512, 512, 3)
    assert sound["sample_rate"] == 16000 and sound["waveform"].shape == (1, 1, 3 * 640)
    # The same frame as Encode Identity → Audio To Motion → Render on the uncropped photo.
    (identity,) = run(pack, "IMTalkerEncodeIdentity", renderer=renderer, image=photo)
    motion, _, _ = run(pack, "IMTalkerAudioToMotion", generator=generator, identity=identity, audio=audio, **kwargs)
    first = type(motion)(motion.latents[:1], motion.fps)
    (expected,) = run(pack, "IMTalkerRender", renderer=renderer, identity=identity, motion=first, batch_size=1)
    assert torch.equal(frames[:1], expected)


def test_mp4_carries_the_original_audio_and_the_photo_size(pack, sub, renderer, generator, photo, media_dir,
                                                          env_dirs, monkeypatch):
    bridge = sub("nodes.bridge")
    stages = []

    class RecordingProgress(bridge.Progress):
        def __init__(self, total, what):
            super().__init__(total, what)
            stages.append([what, total, 0])

        def __call__(self, done, total):
            super().__call__(done, total)
            stages[-1][2] = done

    monkeypatch.setattr(bridge, "Progress", RecordingProgress)
    odd = framed(photo, 641)  # an odd width: the MP4 is padded to an even size
    audio = comfy_audio(media_dir / "speech_44k_stereo.wav", 0.1)
    out = talking_head(pack, renderer=renderer, generator=generator, image=odd, audio=audio, output="mp4",
                       batch_size=2)
    poster, sound, _, path = out["result"]
    assert out["ui"]["images"][0]["subfolder"] == "tests" and out["ui"]["animated"] == (True,)
    assert os.path.isfile(path) and path.startswith(str(env_dirs[1])) and path.endswith(".mp4")
    assert out["ui"]["images"][0]["filename"] == os.path.basename(path)
    assert poster.shape == (1, 512, 641, 3)
    assert sound["sample_rate"] == 44100 and sound["waveform"].shape == (1, 2, round(3 * 44100 / 25))
    with av.open(path) as container:
        video = container.streams.video[0]
        assert (video.width, video.height) == (642, 512)
        assert sum(1 for _ in container.decode(video=0)) == 3
    with av.open(path) as container:
        (stream,) = container.streams.audio
        assert (stream.sample_rate, stream.channels) == (44100, 2)
        decoded = np.concatenate([f.to_ndarray() for f in container.decode(audio=0)], axis=1)
    target = round(3 * 44100 / 25)  # 0.12 s: the audio is cut/padded to the frames, not left at 0.1 s
    assert decoded.shape[0] == 2 and target <= decoded.shape[1] <= target + 2048
    # Progress came per stage, and rendering reached every frame (in batches of 2).
    assert [s[0] for s in stages if s[0] in ("generating motion", "rendering frames")] == [
        "generating motion", "rendering frames"]
    assert stages[-1] == ["rendering frames", 3, 3]


def test_no_face_is_reported_before_any_model_runs(pack, sub, renderer, generator, media_dir, monkeypatch):
    encode = pack.NODE_CLASS_MAPPINGS["IMTalkerEncodeIdentity"]
    monkeypatch.setattr(encode, "encode", lambda *a, **k: pytest.fail("the renderer ran before the face check"))
    blank = torch.full((1, 300, 400, 3), 0.5)
    audio = comfy_audio(media_dir / "speech_16k_mono.wav", 0.1)
    with pytest.raises(sub("imtalker_core.errors").InputError, match="turn 'crop' off"):
        talking_head(pack, renderer=renderer, generator=generator, image=blank, audio=audio)
    with pytest.raises(sub("imtalker_core.errors").InputError, match="names no file"):
        talking_head(pack, renderer=renderer, generator=generator, image=blank, audio=audio, output="mp4",
                     filename_prefix="IMTalker/")
    with pytest.raises(sub("imtalker_core.errors").InputError, match="AUDIO"):
        talking_head(pack, renderer=renderer, generator=generator, image=blank, audio=torch.zeros(3))


def test_cancel_between_stages(pack, sub, renderer, generator, photo, media_dir, monkeypatch):
    """Cancel pressed during the face crop stops the node before the identity is encoded."""
    bridge = sub("nodes.bridge")

    class Cancelled(Exception):
        pass

    def cancelled():
        raise Cancelled

    monkeypatch.setattr(bridge, "check_interrupt", cancelled)
    encode = pack.NODE_CLASS_MAPPINGS["IMTalkerEncodeIdentity"]
    monkeypatch.setattr(encode, "encode", lambda *a, **k: pytest.fail("encoded after Cancel"))
    with pytest.raises(Cancelled):
        talking_head(pack, renderer=renderer, generator=generator, image=photo,
                     audio=comfy_audio(media_dir / "speech_16k_mono.wav", 0.1))
