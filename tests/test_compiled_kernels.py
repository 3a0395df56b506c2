"""The Triton kernels inside torch.compile'd code (issue 11): `compiled.set_compile` prepares them
(`attention.prepare_compiled_kernels`) and the traced frames step calls them as custom ops
(`layers.kernel_ops`).

Without a GPU the kernels run through Triton's CPU interpreter in one subprocess (`TRITON_INTERPRET=1`),
with CPU tensors allowed, on the tiny renderer in bfloat16 (the "auto" modes use the kernels for half
precision only). The frames step is compiled whole with the "aot_eager" backend, which traces through
AOTAutograd with fake tensors (so the ops' fake implementations are exercised) without generating code.
"""
from __future__ import annotations

import logging

import pytest
import torch

from imtalker_core import compiled, render_frames
from imtalker_core.layers import attention as A
from tests.helpers.tiny_render import tiny_render_case
from tests.helpers.triton_interpreter import count_calls, interpreter_fixture

FRAMES = 4


def _interpreter_worker(out_path: str) -> None:
    """Runs in the subprocess: frames of the tiny bf16 renderer, eager and compiled, with the kernels'
    call counts; saved with torch.save."""
    from imtalker_core.layers import anchor_argmax_triton, window_attention_triton

    A.ARGMAX_KERNEL_DEVICE_TYPES = A.WINDOW_KERNEL_DEVICE_TYPES = ("cpu",)
    # The anchor kernel with the values (A.ANCHOR_VALUES_IN_KERNEL, the default); the picks-only one must not run.
    argmax_calls = count_calls(anchor_argmax_triton, "anchor_attention_triton")
    picks_only_calls = count_calls(anchor_argmax_triton, "head_mean_argmax_triton")
    window_calls = count_calls(window_attention_triton, "window_attention_triton")
    model, identity, motion = tiny_render_case(FRAMES)
    model = model.to(torch.bfloat16)
    results: dict[str, torch.Tensor] = {}

    def render(key: str, argmax_mode: str, window_mode: str) -> None:
        before = len(argmax_calls), len(window_calls)
        with A.argmax_kernel(argmax_mode), A.window_kernel(window_mode):
            results[key] = render_frames(model, identity, motion, batch_size=2)
        results[f"{key}/argmax calls"] = torch.tensor(len(argmax_calls) - before[0])
        results[f"{key}/window calls"] = torch.tensor(len(window_calls) - before[1])

    render("eager torch", "torch", "torch")
    render("eager kernels", "auto", "auto")
    compiled.set_compile(model, "default", backend="aot_eager")
    render("compiled kernels", "auto", "auto")
    results["prepared"] = torch.tensor([(name, "cpu", torch.bfloat16) in A._COMPILED_KERNELS
                                        for name in ("anchor argmax", "window attention")])
    # The A/B switch off: the picks-only kernel (its own custom op) and SDPA for the values.
    A.ANCHOR_VALUES_IN_KERNEL = False
    torch._dynamo.reset()
    compiled.set_compile(model, "off")
    compiled.set_compile(model, "default", backend="aot_eager")
    before = len(picks_only_calls)
    render("compiled picks-only kernel", "auto", "auto")
    results["compiled picks-only kernel/picks-only calls"] = torch.tensor(len(picks_only_calls) - before)
    A.ANCHOR_VALUES_IN_KERNEL = True
    torch._dynamo.reset()
    compiled.set_compile(model, "off")
    compiled.set_compile(model, "default", backend="aot_eager")
    render("compiled torch", "torch", "torch")
    results["prepared after torch"] = torch.tensor(len(A._COMPILED_KERNELS))
    results["picks-only calls"] = torch.tensor(len(picks_only_calls))
    torch.save(results, out_path)


interpreted = interpreter_fixture("tests.test_compiled_kernels")


def test_compiled_frames_step_calls_the_prepared_kernels(interpreted):
    assert interpreted["prepared"].tolist() == [True, True]
    eager, compiled_frames = interpreted["eager kernels"], interpreted["compiled kernels"]
    # Two batches of two frames: the anchor argmax once per batch, the window kernel once per window block.
    assert int(interpreted["eager kernels/argmax calls"]) == 2
    window_calls = int(interpreted["eager kernels/window calls"])
    assert window_calls >= 2 and window_calls % 2 == 0
    # Compiled: the same calls, plus one of each by prepare_compiled_kernels' check before tracing.
    assert int(interpreted["compiled kernels/argmax calls"]) == 2 + 1
    # The switch off: the picks-only kernel instead (the batches and its check), the same frames.
    assert int(interpreted["compiled picks-only kernel/argmax calls"]) == 0
    assert int(interpreted["compiled picks-only kernel/picks-only calls"]) == 2 + 1
    assert int(interpreted["picks-only calls"]) == 3
    torch.testing.assert_close(interpreted["compiled picks-only kernel"].float(), eager.float(), rtol=0, atol=2e-2)
    assert int(interpreted["compiled kernels/window calls"]) == window_calls + 1
    assert compiled_frames.shape == eager.shape and eager.shape[0] == FRAMES
    torch.testing.assert_close(compiled_frames.float(), eager.float(), rtol=0, atol=2e-2)


def test_the_kernels_follow_the_torch_code(interpreted):
    """The kernels' frames against the torch code's, eager and compiled (bf16 rounding apart)."""
    expected = interpreted["eager torch"].float()
    assert int(interpreted["eager torch/argmax calls"]) == int(interpreted["eager torch/window calls"]) == 0
    assert int(interpreted["compiled torch/argmax calls"]) == int(interpreted["compiled torch/window calls"]) == 0
    assert int(interpreted["prepared after torch"]) == 0  # "torch" modes: nothing prepared
    for key in ("eager kernels", "compiled kernels", "compiled torch"):
        torch.testing.assert_close(interpreted[key].float(), expected, rtol=0, atol=3e-2)


def test_prepare_leaves_out_what_fails_its_check(monkeypatch, caplog):
    """"auto": a kernel whose check fails stays out of compiled code (logged), the others go in; "triton":
    the failure raises; float32 in "auto" checks nothing."""
    checked = []

    def broken(device, dtype):
        checked.append("argmax")
        raise RuntimeError("no kernel for this GPU")

    monkeypatch.setattr(A, "ARGMAX_KERNEL_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(A, "WINDOW_KERNEL_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(A, "_COMPILED_KERNELS", set())
    monkeypatch.setattr(A, "_check_argmax_op", broken)
    monkeypatch.setattr(A, "_check_window_op", lambda device, dtype: checked.append("window"))
    cpu = torch.device("cpu")
    with caplog.at_level(logging.WARNING, logger=A.__name__):
        A.prepare_compiled_kernels(cpu, torch.bfloat16)
    assert A._COMPILED_KERNELS == {("window attention", "cpu", torch.bfloat16)}
    assert checked == ["argmax", "window"] and "no kernel for this GPU" in caplog.text
    with A.argmax_kernel("triton"), pytest.raises(RuntimeError, match="cannot run in compiled code"):
        A.prepare_compiled_kernels(cpu, torch.bfloat16)
    checked.clear()
    A.prepare_compiled_kernels(cpu, torch.float32)
    assert checked == [] and ("window attention", "cpu", torch.float32) not in A._COMPILED_KERNELS


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_compiled_frames_use_the_kernels(monkeypatch):
    """Inductor on a GPU: the tiny fp16 renderer's compiled frames step calls both kernels and its frames
    follow the eager torch code's."""
    from imtalker_core import encode_identity
    from imtalker_core.layers import anchor_argmax_triton, window_attention_triton

    calls = []
    for module, name in ((anchor_argmax_triton, "anchor_attention_triton"),
                         (window_attention_triton, "window_attention_triton")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    model, _, motion = tiny_render_case(FRAMES)
    model = model.cuda().half()
    size = model.cfg.image_size
    identity = encode_identity(model, torch.rand(1, 3, size, size, device="cuda", dtype=torch.float16))
    motion = motion.cuda().half()
    with A.argmax_kernel("torch"), A.window_kernel("torch"):
        expected = render_frames(model, identity, motion, batch_size=2).float()
    torch._dynamo.reset()
    try:
        compiled.set_compile(model, "default")
        frames = render_frames(model, identity, motion, batch_size=2).float()
    finally:
        compiled.set_compile(model, "off")
        torch._dynamo.reset()
    prepared = {(name, "cuda", torch.float16) for name in ("anchor argmax", "window attention")}
    assert prepared <= A._COMPILED_KERNELS
    assert "anchor_attention_triton" in calls and "window_attention_triton" in calls
    torch.testing.assert_close(frames, expected, rtol=0, atol=3e-2)
