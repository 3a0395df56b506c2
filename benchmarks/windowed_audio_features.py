"""How far windowed wav2vec2 features are from whole-clip features, on the test speech.

Long clips are encoded by the transformer in overlapping windows (imtalker_core/generator/audio.py).
The real wav2vec2-base-960h weights are not available offline, so this runs with the random weights
at hand: the tiny parity wav2vec2 (tests/data/parity/tiny-wav2vec2, 2 layers, width 32) and a small random
768-wide one (1 layer). The test speech (10 s = 250 frames) is short, so windows are forced small here.

    python benchmarks/windowed_audio_features.py
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from imtalker_core.generator.audio import AudioEncoder  # noqa: E402
from imtalker_core.media.audio import load_audio, to_mono_16k  # noqa: E402
from tests.helpers.standin import PARITY, write_small_wav2vec2  # noqa: E402


def main() -> int:
    torch.set_grad_enabled(False)
    wave, rate = load_audio(ROOT / "tests" / "data" / "media" / "speech_16k_mono.wav")
    wave16 = torch.from_numpy(to_mono_16k(wave, rate))
    with tempfile.TemporaryDirectory() as tmp:
        encoders = {"tiny parity wav2vec2 (2 layers, 32 wide)": AudioEncoder.from_folder(PARITY / "tiny-wav2vec2"),
                    "small random wav2vec2 (1 layer, 768 wide)":
                        AudioEncoder.from_folder(write_small_wav2vec2(Path(tmp) / "w2v"))}
        for name, enc in encoders.items():
            enc.eval()
            whole = enc(wave16, window_frames=None)
            scale = whole.abs().mean().item()
            print(f"{name}: {whole.shape[1]} frames, mean |feature| {scale:.3f}")  # noqa: T201
            for window, overlap in ((100, 25), (150, 25), (150, 50)):
                win = enc(wave16, window_frames=window, overlap_frames=overlap)
                d = (win - whole).abs()
                print(f"  window {window} frames, overlap {overlap}: max |diff| {d.max():.2e}, "  # noqa: T201
                      f"mean |diff| {d.mean():.2e} ({d.mean().item() / scale:.2%} of mean |feature|)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
