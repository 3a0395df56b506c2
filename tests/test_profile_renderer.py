"""benchmarks/profile_renderer.py's module timer on a tiny renderer: every module of the frames step is found
and timed once per forward, and the hooks leave the frames unchanged."""
from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import torch

from imtalker_core import compiled, pipeline
from tests.helpers.tiny_render import tiny_render_case

ROOT = Path(__file__).resolve().parent.parent


def _profile_module():
    # As when the script runs: its folder on the path, for the benchmarks' shared `_timing` module.
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("profile_renderer", ROOT / "benchmarks" / "profile_renderer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_module_timer_times_every_module_of_the_frames_step_once_per_forward(monkeypatch):
    profile = _profile_module()
    model, identity, motion = tiny_render_case(2)
    modules = profile.profiled_modules(model)
    assert list(modules)[:2] == ["adapt", "latent_token_decoder"]
    assert sum(name.startswith("imt.") for name in modules) == len(model.imt)
    assert any(name.startswith("frame_decoder.transformer_blocks.") for name in modules)
    with torch.no_grad():
        ident, source = pipeline.prepare_render_source(model, identity)
        vector = ident.vector.expand(2, -1)
        plain = compiled.eager_frames(model, vector, source, motion)
        # Every module takes at least one more millisecond (a hook that runs before the timer's stop hook),
        # so its time cannot come from a stale or missing mark.
        for module in modules.values():
            module.register_forward_hook(lambda *_: time.sleep(0.001))
        timer = profile.ModuleTimer(modules, torch.device("cpu"))
        start = time.perf_counter()
        for _ in range(2):
            frames = compiled.eager_frames(model, vector, source, motion)
        total = time.perf_counter() - start
    assert all(len(marks) == 2 for marks in timer.marks.values())
    seconds = timer.seconds()
    assert all(s >= 0.002 for s in seconds.values()), seconds
    assert sum(seconds.values()) <= total
    timer.remove()
    timer.clear()
    with torch.no_grad():
        compiled.eager_frames(model, vector, source, motion)
    assert all(not marks for marks in timer.marks.values())  # removed hooks record nothing
    torch.testing.assert_close(frames, plain, rtol=0, atol=0)


def test_module_flops_count_each_module_once_and_add_up_to_at_most_the_step():
    from torch.utils.flop_counter import FlopCounterMode

    profile = _profile_module()
    model, identity, motion = tiny_render_case(1)
    modules = profile.profiled_modules(model)
    with torch.no_grad():
        ident, source = pipeline.prepare_render_source(model, identity)

        def step():
            return compiled.eager_frames(model, ident.vector, source, motion)

        flops = profile.module_flops(modules, step)
        with FlopCounterMode(display=False) as counter:
            step()
    assert set(flops) == set(modules)  # every module ran, and was counted
    assert all(flops[f"frame_decoder.resblocks.{i}"] > 0 for i in range(len(model.frame_decoder.resblocks)))
    assert flops["latent_token_decoder"] > 0
    assert 0 < sum(flops.values()) <= counter.get_total_flops()  # disjoint modules: never counted twice
    assert not any(module._forward_pre_hooks for module in modules.values())  # the capture hooks are gone
