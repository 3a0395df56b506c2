"""Audio-driven motion: speech → wav2vec2 features → flow-matching generator → motion latents."""
from __future__ import annotations

import logging
import math

import numpy as np
import torch

from ..imtalker_core.media.audio import check_audio, to_mono_16k
from ..imtalker_core.timing import frame_count
from ..imtalker_core.pipeline import Identity, generate_motion
from ..imtalker_core.sampling import NOISE_MODES
from . import bridge
from .types import CONTROLS, GENERATOR, IDENTITY, MOTION, Controls, GeneratorModels, Motion

log = logging.getLogger(__name__)

MAX_SEED = 0xFFFF_FFFF_FFFF_FFFF


def pad_to_frames(waveform_16k: np.ndarray, frames: int, samples_per_frame: int) -> np.ndarray:
    """`[S]` → `[frames * samples_per_frame]`, extended by repeating the last sample (as the
    audio encoder does) or cut; so the returned clip is exactly the audio the motion covers."""
    target = frames * samples_per_frame
    if waveform_16k.shape[0] >= target:
        return waveform_16k[:target]
    return np.pad(waveform_16k, (0, target - waveform_16k.shape[0]), mode="edge")


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
                "controls": (CONTROLS, {"tooltip": "Optional pose / camera / gaze sequences (IMTALKER_CONTROLS)."}),
            },
        }

    RETURN_TYPES = (MOTION, "AUDIO", "FLOAT")
    RETURN_NAMES = ("motion", "audio", "fps")
    OUTPUT_TOOLTIPS = (
        "One motion latent per video frame (25 fps).",
        "The audio exactly as used: 16 kHz mono, as long as the frames (for Create Video / Render To Video).",
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
        controls = controls or Controls()
        latents = generate_motion(
            model, features, identity.motion, pose=controls.pose, cam=controls.cam, gaze=controls.gaze,
            cfg_scale=cfg_scale, steps=steps, seed=seed, noise=noise, noise_device="cpu",
            callback=bridge.Progress(windows * steps, "generating motion"), check_interrupt=bridge.check_interrupt)
        used_audio = bridge.make_audio(pad_to_frames(speech, frames, encoder.samples_per_frame), rate)
        return (Motion(latents.cpu(), float(fps)), used_audio, float(fps))
