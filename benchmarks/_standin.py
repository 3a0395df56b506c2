"""Stand-in model files for the benchmarks, built with the test suite's rule (no official files needed)."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.helpers.standin import standin_state_dict, write_official_layout, write_small_wav2vec2  # noqa: E402


def build_models_dir(folder: Path) -> Path:
    """A models folder with stand-in `renderer.ckpt`, `generator.ckpt` and a small 768-wide wav2vec2."""
    folder.mkdir(parents=True, exist_ok=True)
    for kind in ("renderer", "generator"):
        if not (folder / f"{kind}.ckpt").exists():
            write_official_layout(kind, folder / f"{kind}.ckpt", state=standin_state_dict(kind))
    if not (folder / "wav2vec2-base-960h" / "config.json").exists():
        write_small_wav2vec2(folder / "wav2vec2-base-960h")
    return folder
