"""The Triton window-attention kernel (issue 11) against the explicit torch route, and its dispatch.

Without a GPU the kernel runs through Triton's CPU interpreter (`TRITON_INTERPRET=1`, set before triton
is imported), in one subprocess that computes every case below; the tests here compare the results
with `WindowAttention._forward_explicit` (the same map written out in torch):

- direct calls: head widths 4, 8 and 16 (zero-padded to tl.dot's 16), windows of 64 and of 9 tokens
  (padded to 16), with and without the shifted-window mask, strided inputs, float32/float16/bfloat16;
- whole SwinBlocks (plain and shifted) with `window_kernel("triton")` and CPU tensors allowed: the
  kernel runs once per block and the blocks' outputs match the torch route's;
- the dispatch (in this process): "auto" by default (the kernel for half precision), "triton" always,
  "torch" never; never for CPU tensors or under autograd; forced "triton" raises where the kernel cannot
  run, "auto" falls back (also after a kernel failure).

On a CUDA machine `test_cuda_kernel_matches_torch` also runs the compiled kernel at the official 256² shape.
"""
from __future__ import annotations

import logging

import pytest
import torch

from imtalker_core.layers import attention as A
from imtalker_core.layers import window_attention_triton as K
from tests.helpers.triton_interpreter import count_calls, interpreter_fixture, record_counted
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}

# name → (windows per image, images, tokens per window, heads, head width, masked, dtype, strided)
CASES = {
    "fp32-width-4-masked": (4, 2, 64, 4, 4, True, torch.float32, False),
    "fp32-width-8": (4, 2, 64, 2, 8, False, torch.float32, False),
    "fp16-width-4-masked-strided": (4, 1, 64, 8, 4, True, torch.float16, True),
    "bf16-width-16": (2, 2, 64, 2, 16, False, torch.bfloat16, False),
    "fp32-nine-tokens-masked": (3, 2, 9, 2, 8, True, torch.float32, True),
}


# Launch options: (case, heads per program) other than the default (all of a window's heads).
HEAD_GROUP_CASES = [("fp16-width-4-masked-strided", 1), ("fp16-width-4-masked-strided", 2),
                    ("fp32-nine-tokens-masked", 1)]


# Cases run with the bias gathered from a table `[T, heads]` through an index `[n, n]` in the kernel.
TABLE_CASES = ["fp32-width-4-masked", "fp16-width-4-masked-strided", "fp32-nine-tokens-masked"]


def table_inputs(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded table `[T, heads]` (float32) and int64 index `[n, n]` for a case; T = 2n - 1, and a few
    entries of the index fall outside the table (the kernel clamps them into it)."""
    n, heads = CASES[name][2], CASES[name][3]
    g = torch.Generator().manual_seed(len(name))
    table = torch.randn(2 * n - 1, heads, generator=g)
    index = torch.randint(0, 2 * n - 1, (n, n), generator=g)
    index[0, :3] = torch.tensor([-5, 2 * n - 1, 10 ** 6])
    return table, index


def case_inputs(name: str):
    """Seeded q, k, v `[B·nW, n, C]`, bias `[heads, n, n]` and mask `[nW, n, n]` or None of a case."""
    windows, images, n, heads, width, masked, dtype, strided = CASES[name]
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    shape = (windows * images, n, heads * width)
    if strided:  # channels-major storage: a non-contiguous [windows, n, C] view, as a transposed projection gives
        q, k, v = (torch.randn(shape[0], shape[2], n, generator=g).transpose(1, 2) for _ in range(3))
    else:
        q, k, v = (torch.randn(*shape, generator=g) for _ in range(3))
    bias = torch.randn(heads, n, n, generator=g)
    mask = None
    if masked:  # the Swin convention: -100 between regions, 0 within
        regions = torch.randint(0, 3, (windows, n), generator=g)
        mask = torch.where(regions[:, :, None] != regions[:, None, :], -100.0, 0.0)
    return q.to(dtype), k.to(dtype), v.to(dtype), bias, mask


def explicit(q, k, v, heads, scale, bias, mask):
    """The map written out in float64: softmax(q·kᵀ·scale + bias + mask)·v per window and head."""
    w, n, c = q.shape
    split = [t.double().reshape(w, n, heads, c // heads).transpose(1, 2) for t in (q, k, v)]
    logits = split[0] @ split[1].transpose(-2, -1) * scale + bias.double()
    if mask is not None:
        logits = (logits.view(w // mask.shape[0], mask.shape[0], heads, n, n) + mask.double()[None, :, None])
        logits = logits.view(w, heads, n, n)
    return (logits.softmax(-1) @ split[2]).transpose(1, 2).reshape(w, n, c)


def swin_blocks():
    """A plain and a shifted block, head width 8, 16 windows of 64 tokens per 32² image."""
    blocks = {}
    for shift in (0, 4):
        torch.manual_seed(20 + shift)
        block = A.SwinBlock(16, 32, 2, 8, shift).eval()
        with torch.no_grad():
            block.attn.relative_position_bias_table.normal_()
        blocks[shift] = block
    return blocks


# --------------------------------------------------------------------------- the interpreter run

def _interpreter_worker(out_path: str) -> None:
    """Runs in the subprocess (TRITON_INTERPRET=1); saves every case's output with torch.save."""
    assert K.available("cpu"), K.unavailable_reason("cpu")
    results: dict[str, torch.Tensor] = {}
    for name, case in CASES.items():
        q, k, v, bias, mask = case_inputs(name)
        results[f"direct/{name}"] = K.window_attention_triton(q, k, v, case[3], case[4] ** -0.5, bias, mask)
    for name in TABLE_CASES:
        q, k, v, _, mask = case_inputs(name)
        table, index = table_inputs(name)
        results[f"table/{name}"] = K.window_attention_triton(q, k, v, CASES[name][3], CASES[name][4] ** -0.5,
                                                              table, mask, bias_index=index)
    for name, group in HEAD_GROUP_CASES:
        q, k, v, bias, mask = case_inputs(name)
        results[f"group/{name}/{group}"] = K.window_attention_triton(q, k, v, CASES[name][3], CASES[name][4] ** -0.5,
                                                                      bias, mask, heads_per_program=group)
    calls = count_calls(K, "window_attention_triton")
    A.WINDOW_KERNEL_DEVICE_TYPES = ("cpu",)
    x = torch.randn(2, 16, 32, 32, generator=torch.Generator().manual_seed(5))
    for from_table in (True, False):
        A.WINDOW_BIAS_FROM_TABLE = from_table
        for shift, block in swin_blocks().items():
            with torch.no_grad(), A.window_kernel("triton"):
                record_counted(results, f"block/{shift}/{'table' if from_table else 'bias'}", calls, block, x)
    torch.save(results, out_path)


interpreted = interpreter_fixture("tests.test_window_attention_triton")


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_equals_the_written_out_map(interpreted, name):
    q, k, v, bias, mask = case_inputs(name)
    heads, width, dtype = CASES[name][3], CASES[name][4], CASES[name][6]
    got = interpreted[f"direct/{name}"]
    assert got.dtype == dtype and got.shape == q.shape
    expected = explicit(q, k, v, heads, width ** -0.5, bias, mask)
    assert (got.double() - expected).abs().max().item() <= TOLERANCE[dtype] * expected.abs().max().item()
    # The mask matters here: without it the values differ (the test would not see a kernel ignoring it).
    if mask is not None:
        assert (explicit(q, k, v, heads, width ** -0.5, bias, None) - expected).abs().max().item() > 0.05


@pytest.mark.parametrize("name, group", HEAD_GROUP_CASES)
def test_heads_per_program_changes_nothing(interpreted, name, group):
    """One program per (window, head), or per pair of heads, computes each head as one per window does."""
    assert torch.equal(interpreted[f"group/{name}/{group}"], interpreted[f"direct/{name}"])


def test_heads_per_program_fills_the_gpu(monkeypatch):
    """All of a window's heads in one program once there are windows enough for 8 programs per
    multiprocessor (132 on an H100); fewer at batch 1 (1,024 windows at 256², 256 at 128²)."""
    h100 = type("Properties", (), {"multi_processor_count": 132})
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: h100)
    cuda = torch.device("cuda")
    assert K._heads_per_program(cuda, 32 * 1024, 8) == 8
    assert K._heads_per_program(cuda, 2 * 1024, 8) == 8
    assert K._heads_per_program(cuda, 1024, 8) == 4
    assert K._heads_per_program(cuda, 256, 8) == 1
    assert K._heads_per_program(cuda, 10, 8) == 1
    assert K._heads_per_program(torch.device("cpu"), 10, 8) == 8  # the interpreter: all


def test_heads_per_program_is_checked():
    q = torch.randn(4, 64, 32)
    for group in (0, 3, 16):
        with pytest.raises(ValueError, match=f"heads_per_program={group}: use a divisor of the 8 heads"):
            K.window_attention_triton(q, q, q, 8, 0.5, torch.zeros(8, 64, 64), None, heads_per_program=group)


@pytest.mark.parametrize("name", TABLE_CASES)
def test_bias_gathered_in_the_kernel(interpreted, name):
    q, k, v, _, mask = case_inputs(name)
    table, index = table_inputs(name)
    heads, width, dtype = CASES[name][3], CASES[name][4], CASES[name][6]
    bias = table[index.clamp(0, table.shape[0] - 1)].permute(2, 0, 1)  # [heads, n, n]
    expected = explicit(q, k, v, heads, width ** -0.5, bias, mask)
    got = interpreted[f"table/{name}"]
    assert (got.double() - expected).abs().max().item() <= TOLERANCE[dtype] * expected.abs().max().item()
    # The clamped entries matter: with a zero bias there the values differ.
    assert (explicit(q, k, v, heads, width ** -0.5, bias * (index >= 0) * (index < table.shape[0]), mask)
            - expected).abs().max().item() > 1e-3


@pytest.mark.parametrize("bias_from", ["table", "bias"])
@pytest.mark.parametrize("shift", [0, 4])
def test_swin_blocks_through_the_kernel(interpreted, shift, bias_from):
    """A SwinBlock in "triton" mode (one kernel call), the bias gathered by the kernel from the table
    (`attention.WINDOW_BIAS_FROM_TABLE`, the default) or read gathered: the CPU torch route's output."""
    block = swin_blocks()[shift]
    x = torch.randn(2, 16, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = block(x)  # the CPU's torch route
    assert int(interpreted[f"block/{shift}/{bias_from}/calls"]) == 1
    torch.testing.assert_close(interpreted[f"block/{shift}/{bias_from}"], expected, rtol=0, atol=2e-5)


# --------------------------------------------------------------------------- the dispatch

@pytest.fixture
def fake_kernel(monkeypatch):
    """CPU tensors allowed and a stand-in kernel (output all 7 before the projection) that records its calls."""
    calls = []

    def stand_in(q, k, v, heads, scale, bias, mask, heads_per_program=None, bias_index=None):
        calls.append(q.dtype)
        return torch.full_like(q, 7.0)

    monkeypatch.setattr(A, "WINDOW_KERNEL_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(A, "_kernel_failures", {})
    monkeypatch.setattr(K, "unavailable_reason", lambda device=None: None)
    monkeypatch.setattr(K, "window_attention_triton", stand_in)
    return calls


def test_cpu_tensors_and_autograd_never_reach_the_kernel(monkeypatch):
    calls = []
    monkeypatch.setattr(K, "window_attention_triton", lambda *args: calls.append(1))
    monkeypatch.setattr(K, "unavailable_reason", lambda device=None: None)
    block = swin_blocks()[4]
    x = torch.randn(1, 16, 32, 32)
    assert A.window_kernel_mode() == "auto"
    with torch.no_grad():
        for mode in A.WINDOW_KERNEL_MODES:
            with A.window_kernel(mode):
                block(x)  # CPU tensors: not a kernel device type
    monkeypatch.setattr(A, "WINDOW_KERNEL_DEVICE_TYPES", ("cpu",))
    with A.window_kernel("triton"):
        block(x)  # autograd on: the kernel has no backward
    assert calls == []
    with pytest.raises(ValueError, match="window kernel mode 'fast'"):
        with A.window_kernel("fast"):
            pass


def test_modes_choose_the_kernel_or_the_torch_code(fake_kernel):
    """"auto": the kernel for half precision only; "triton": always; "torch": never."""
    block = swin_blocks()[4]
    x = torch.randn(1, 16, 32, 32)
    with torch.no_grad():
        expected = block(x)  # "auto", float32: the torch code
        with A.window_kernel("torch"):
            assert torch.equal(block(x), expected)
            block.to(torch.bfloat16)(x.bfloat16())
        assert fake_kernel == []
        block(x.bfloat16())  # "auto", half precision: the kernel
        assert fake_kernel == [torch.bfloat16]
        block.float()
        with A.window_kernel("triton"):
            assert not torch.equal(block(x), expected)
    assert fake_kernel == [torch.bfloat16, torch.float32]


def test_forced_kernel_raises_and_auto_falls_back(fake_kernel, monkeypatch, caplog):
    block = swin_blocks()[0].to(torch.bfloat16)
    x = torch.randn(1, 16, 32, 32).bfloat16()
    with torch.no_grad():
        with A.window_kernel("torch"):
            expected = block(x)
        monkeypatch.setattr(K, "unavailable_reason", lambda device=None: "no GPU backend in this test")
        with A.window_kernel("triton"), pytest.raises(RuntimeError, match="no GPU backend in this test"):
            block(x)
        with caplog.at_level(logging.INFO, logger=A.__name__):
            assert torch.equal(block(x), expected)  # "auto": the torch code, the reason logged
        assert "no GPU backend in this test" in caplog.text and fake_kernel == []
        monkeypatch.setattr(K, "unavailable_reason", lambda device=None: None)
        calls = []

        def broken(*args):
            calls.append(1)
            raise RuntimeError("cannot compile for this GPU")

        monkeypatch.setattr(K, "window_attention_triton", broken)
        with caplog.at_level(logging.WARNING, logger=A.__name__):
            assert torch.equal(block(x), expected) and torch.equal(block(x), expected)
        assert calls == [1] and "Triton kernel failed" in caplog.text  # not retried on every call
        with A.window_kernel("triton"), pytest.raises(RuntimeError, match="cannot compile"):
            block(x)


def test_unsupported_inputs_are_named():
    q = torch.randn(4, 64, 16)
    assert K.unsupported_reason(q, q, q, 4, None) is None
    assert "head width" in K.unsupported_reason(q, q, q, 3, None)
    assert "tokens per window" in K.unsupported_reason(torch.randn(4, 81, 16), torch.randn(4, 81, 16),
                                                        torch.randn(4, 81, 16), 4, None)
    assert "mask" in K.unsupported_reason(q, q, q, 4, torch.zeros(3, 64, 64))
    assert "dtypes" in K.unsupported_reason(q, q.half(), q, 4, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cuda_kernel_matches_torch(dtype):
    """The official 256² level: 32 channels in 8 heads (width 4), 1,024 windows of 64 tokens per image."""
    torch.manual_seed(0)
    block = A.SwinBlock(32, 256, 8, 8, 4).eval().cuda().to(dtype)
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_()
        x = torch.randn(2, 32, 256, 256, device="cuda", dtype=dtype)
        with A.window_kernel("torch"):
            expected = block(x)
        with A.window_kernel("triton"):
            got = block(x)
    torch.testing.assert_close(got.float(), expected.float(), rtol=0, atol=TOLERANCE[dtype] * 10)
