"""benchmarks/gpu_check.sh, checked without a GPU: a typo there costs a whole lent GPU session.

- every step it defines is listed in `all_steps` and the reverse, and every default step exists;
- every benchmark script a step runs exists, and every `--option` a step passes is one that script defines.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _array(text: str, name: str) -> list[str]:
    match = re.search(rf"^{name}=\(([^)]*)\)", text, flags=re.MULTILINE)
    assert match, f"{name}=( ... ) not found in {SCRIPT.name}"
    return match.group(1).split()


def _steps(text: str) -> dict[str, list[str]]:
    """Step name → its command's words (continuation lines joined, comments dropped)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    steps = {}
    for line in joined.splitlines():
        if line.startswith("step "):
            words = shlex.split(line, comments=True)
            steps[words[1]] = words[3:]
    return steps


def test_step_lists_agree():
    text = SCRIPT.read_text()
    steps = _steps(text)
    all_steps = _array(text, "all_steps")
    assert sorted(steps) == sorted(all_steps)
    assert len(all_steps) == len(set(all_steps))
    assert set(_array(text, "default_steps")) <= set(all_steps)


def test_every_option_exists_in_its_script():
    checked = 0
    for name, command in _steps(SCRIPT.read_text()).items():
        scripts = [word for word in command if word.startswith("benchmarks/") and word.endswith(".py")]
        if not scripts:
            continue
        source = (ROOT / scripts[0]).read_text()
        for option in (word for word in command if word.startswith("--")):
            assert f'"{option}"' in source, f"step {name}: {scripts[0]} defines no {option}"
            checked += 1
    assert checked > 30  # the parsing found the steps' options
