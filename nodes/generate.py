"""Audio-driven motion: speech → wav2vec2 features → flow-matching generator → motion latents."""
from __future__ import annotations

import logging
import math

import torch

from ..imtalker_core.media.audio import check_audio, to_mono_16k
from ..imtalker_core.timing import frame_count
from ..imtalker_core.pipeline import Identity, generate_motion
from ..imtalker_core.sampling import NOISE_MODES
from . import bridge
from .types import CONTROLS, GENERATOR, IDENTITY, MOTION, Controls, GeneratorModels, Motion

log = logging.getLogger(__name__)

MAX_SEED = 0xFFFF_FFFF_FFFF_FFFF


def fit_to_frames(waveform: torch.Tensor, sample_rate: int, frames: int, fps: float) -> torch.Tensor:
    """`[C, S]` audio at its own rate cut or padded (with silence) to exactly `frames` video frames,
    i.e. `ceil(frames * sample_rate / fps)` samples (the sample count Save Video keeps; the product
    is rounded to 6 decimals first so float error never adds a sample), so the sound ends with the
    last frame."""
    target = math.ceil(round(frames * sample_rate / fps, 6))
    if waveform.shape[-1] >= target:
        return waveform[..., :target]
    return torch.nn.functional.pad(waveform, (0, target - waveform.shape[-1]))


def fit_controls(controls: Controls | None, frames: int, fps: float) -> Controls:
    """`controls` at the generator's `fps` (linear resampling) and exactly `frames` long, their last frame
    held when they are shorter (`ControlSequence.fit(frames, "hold")`, logged). A difference of more than
    one frame is also shown on the node. None or no parts gives empty controls (no conditioning)."""
    if controls is None or not controls.parts:
        return Controls(fps=fps)
    at_rate = controls.resample(fps)
    if abs(at_rate.frames - frames) > 1:
        shorter = at_rate.frames < frames
        bridge.notify(f"IMTalker: the controls last {at_rate.seconds:.2f} s ({at_rate.frames} frames at {fps:g} fps) "
                      f"and the speech {frames / fps:.2f} s ({frames} frames); "
                      + ("their last value is held to the end" if shorter else "the rest of the controls is unused"),
                      logging.INFO if shorter else logging.WARNING)
    return at_rate.fit(frames, "hold")


class IMTalkerAudioToMotion:
    """Generates head and lip motion for the portrait from speech."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "generator": (GENERATOR, {"tooltip": "From IMTalker Load Generator."}),
                "identity": (IDENTITY, {"tooltip": "From IMTalker Encode Identity: motion starts from the "
                                                   "portrait's own pose and expression."}),
                "audio": ("AUDIO", {"tooltip": "Speech to lip-sync. Any sample rate or channel count: it is mixed "
                                               "to mono and resampled to 16 kHz. One video frame per 40 ms."}),
                "seed": ("INT", {"default": 42, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                                 "tooltip": "Seed of the sampling noise; the same seed gives the same motion on "
                                            "every device."}),
                "steps": ("INT", {"default": 10, "min": 2, "max": 100,
                                  "tooltip": "Flow-matching (Euler) steps per 2-second window; 10 as in the "
                                             "reference. More is slower and rarely better."}),
                "cfg_scale": ("FLOAT", {"default": 3.0, "min": 1.0, "max": 10.0, "step": 0.1,
                                        "tooltip": "Audio guidance: higher follows the speech more strongly "
                                                   "(3 as in the reference; 1 disables guidance and is faster)."}),
                "noise": (list(NOISE_MODES), {
                    "default": "reference",
                    "tooltip": "reference: the seed starts one noise stream and every 2-second window draws fresh "
                               "noise from it (the reference's default). fixed_per_window: every window starts "
                               "from the same noise (the reference's --fix_noise_seed); motion may repeat every "
                               "2 s."}),
            },
            "optional": {
                "controls": (CONTROLS, {
                    "tooltip": "Optional head pose / camera / eye gaze sequences (from the IMTalker Controls nodes). "
                               "They are resampled to 25 fps; when shorter than the speech their last value is "
                               "held, when longer the rest is unused (both shown on the node)."}),
            },
        }

    RETURN_TYPES = (MOTION, "AUDIO", "FLOAT")
    RETURN_NAMES = ("motion", "audio", "fps")
    OUTPUT_TOOLTIPS = (
        "One motion latent per video frame (25 fps).",
        "Your audio as given (its sample rate and channels), cut or padded with silence to exactly the video's "
        "length (for Create Video / Render To Video). The model's 16 kHz mono copy stays internal.",
        "The video frame rate (25).",
    )
    FUNCTION = "generate"
    CATEGORY = "IMTalker"
    DESCRIPTION = ("Listens to the speech with wav2vec2 and samples matching head and lip motion with IMTalker's "
                   "flow-matching generator, in 2-second windows. Render it with IMTalker Render.")

    def generate(self, generator: GeneratorModels, identity: Identity, audio: dict, seed: int, steps: int,
                 cfg_scale: float, noise: str = "reference", controls: Controls | None = None):
        waveform, sample_rate = bridge.audio_waveform(audio)
        encoder = bridge.ensure_loaded(generator.audio_encoder)
        rate, fps = encoder.sample_rate, encoder.fps
        speech = to_mono_16k(waveform, sample_rate, target=rate)
        check_audio(speech, "the audio")
        frames = frame_count(speech.shape[0], fps, rate)
        log.info("IMTalker: %.2f s of audio → %d frames at %d fps", speech.shape[0] / rate, frames, fps)
        # The encoder gets the clip as recorded (the reference normalises before padding).
        features = encoder(torch.from_numpy(speech), num_frames=frames)
        model = bridge.ensure_loaded(generator.generator)
        windows = math.ceil(frames / model.cfg.window_frames)
        controls = fit_controls(controls, frames, float(fps))
        latents = generate_motion(
            model, features, identity.motion, pose=controls.pose, cam=controls.cam, gaze=controls.gaze,
            cfg_scale=cfg_scale, steps=steps, seed=seed, noise=noise, noise_device="cpu",
            callback=bridge.Progress(windows * steps, "generating motion"), check_interrupt=bridge.check_interrupt)
        sound = bridge.make_audio(fit_to_frames(waveform, sample_rate, frames, fps), sample_rate)
        return (Motion(latents.cpu(), float(fps)), sound, float(fps))
