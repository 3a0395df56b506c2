"""Run a test module's Triton kernels through Triton's CPU interpreter, in a subprocess.

The interpreter must be switched on (`TRITON_INTERPRET=1`) before triton is imported, so the kernels of a
test module run in a fresh process: `interpreted_results(module, out_dir)` imports the module there, calls
its `_interpreter_worker(out_path)` (which saves its results with `torch.save`) and loads what it saved.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
HAS_TRITON = importlib.util.find_spec("triton") is not None


def _release(version: str) -> tuple[int, ...]:
    """The leading numbers of a version string ("3.3.1+git" → (3, 3, 1))."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def interpreter_problem(triton_version: str, numpy_version: str) -> str | None:
    """Why Triton's CPU interpreter cannot run the kernels with these versions, or None.

    Before triton 3.7 the interpreter turns a run-time loop bound (`range(0, n_keys, BLOCK_N)`) into a Python
    int with `int()` of a one-element array, which numpy refuses from 2.4 on ("only 0-dimensional arrays can
    be converted to Python scalars"); e.g. torch 2.7's triton 3.3.1 beside numpy 2.4. Compiled GPU kernels
    never take that path.
    """
    if _release(triton_version) < (3, 7) and _release(numpy_version) >= (2, 4):
        return (f"triton {triton_version}'s CPU interpreter cannot run with numpy {numpy_version} (fixed in "
                "triton 3.7): pip install 'numpy<2.4' in this test environment, or a torch whose triton is 3.7 "
                "or newer")
    return None


def interpreted_results(module: str, out_dir: Path) -> dict[str, torch.Tensor]:
    """`module`'s `_interpreter_worker` results (e.g. module "tests.test_window_attention_triton").

    Fails (not skips) on Linux without triton: it is in requirements-test.txt there.
    """
    if not HAS_TRITON:
        if sys.platform.startswith("linux"):
            pytest.fail("triton is not installed: pip install -r requirements-test.txt")
        pytest.skip("triton has no wheels for this platform")
    out = out_dir / "results.pt"
    code = f"from {module} import _interpreter_worker; _interpreter_worker({str(out)!r})"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    if result.returncode != 0:
        problem = interpreter_problem(importlib.metadata.version("triton"), np.__version__)
        pytest.fail((f"{problem}\n" if problem else "") + result.stderr[-3000:])
    return torch.load(out, weights_only=True)


def count_calls(module, name: str) -> list[int]:
    """Replace `module.name` (a function) by a wrapper that appends 1 to the returned list per call
    (for the workers, whose process ends after them: the wrapper is never removed)."""
    calls: list[int] = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    setattr(module, name, counted)
    return calls


def record_counted(results: dict[str, torch.Tensor], key: str, calls: list[int], fn, *args) -> None:
    """`results[key] = fn(*args)` and `results[key + "/calls"]`: how many calls it added to `calls` (a
    `count_calls` list)."""
    before = len(calls)
    results[key] = fn(*args)
    results[f"{key}/calls"] = torch.tensor(len(calls) - before)


def interpreter_fixture(module: str):
    """A module-scoped fixture `interpreted` giving `interpreted_results(module, ...)`, for the test module
    `module` to bind: `interpreted = interpreter_fixture("tests.test_x")`."""
    @pytest.fixture(scope="module")
    def interpreted(tmp_path_factory):
        return interpreted_results(module, tmp_path_factory.mktemp("triton"))

    return interpreted
