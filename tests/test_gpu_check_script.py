"""benchmarks/gpu_check.sh, checked without a GPU: a typo there costs a whole lent GPU session.

- every step it defines is listed in `all_steps` and the reverse, and every default step exists;
- every benchmark script a step runs exists, and every `--option` a step passes is one that script defines;
- the usage examples in its header name real steps, and its two-call split is the default steps.
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


def test_the_usage_examples_name_real_steps():
    text = SCRIPT.read_text()
    all_steps = set(_array(text, "all_steps"))
    examples = [line.split("gpu_check.sh", 1)[1].split("#")[0].split()
                for line in text.splitlines() if line.startswith("#   bash benchmarks/gpu_check.sh")]
    assert len(examples) >= 3
    for names in examples:
        assert set(names) <= all_steps, set(names) - all_steps
    # The two-call split covers the default steps exactly.
    split = [names for names in examples if len(names) > 2]
    assert sorted(sum(split, [])) == sorted(_array(text, "default_steps"))
