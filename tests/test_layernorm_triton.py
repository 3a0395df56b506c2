"""The Triton LayerNorm kernel (issue 11) against `F.layer_norm`, and its use in the shifted-window blocks.

Without a GPU the kernel runs through Triton's CPU interpreter in one subprocess (`TRITON_INTERPRET=1`):
direct calls over 32, 64 and 24 channels (padded to a power of two), row counts that do not fill the last
program, rows strided as a NCHW map's tokens, float32/float16/bfloat16, one and two outputs; and whole
SwinBlocks (plain and shifted) with `layernorm_kernel("triton")`. The dispatch runs in this process.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from imtalker_core.layers import attention as A
from imtalker_core.layers import layernorm_triton as K
from tests.helpers.triton_interpreter import count_calls, interpreter_fixture, record_counted

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# name → (leading shape, channels, dtype, two outputs, strided)
CASES = {
    "fp32-32-two": ((2, 100), 32, torch.float32, True, False),
    "fp16-64-one-strided": ((2, 81), 64, torch.float16, False, True),
    "bf16-24-two-strided": ((3, 50), 24, torch.bfloat16, True, True),
    "fp32-64-one": ((5, 7), 64, torch.float32, False, False),
}


def case_inputs(name: str):
    """Seeded input `[B, N, C]` (a view of a `[B, C, N]` map when strided) and two LayerNorms."""
    lead, channels, dtype, _, strided = CASES[name]
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    x = torch.randn(*lead, channels, generator=g) * 3 + 1
    if strided:
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    norms = [torch.nn.LayerNorm(channels) for _ in range(2)]
    with torch.no_grad():
        for norm in norms:
            norm.weight.copy_(torch.randn(channels, generator=g))
            norm.bias.copy_(torch.randn(channels, generator=g))
    return x.to(dtype), [norm.to(dtype) for norm in norms]


def swin_blocks() -> dict[int, A.SwinBlock]:
    torch.manual_seed(3)
    blocks = {shift: A.SwinBlock(16, 32, 2, 8, shift).eval() for shift in (0, 4)}
    with torch.no_grad():
        for block in blocks.values():
            for norm in (block.norm_q, block.norm_kv, block.norm_ffn):
                norm.weight.normal_()
                norm.bias.normal_()
    return blocks


def _interpreter_worker(out_path: str) -> None:
    assert K.available("cpu"), K.unavailable_reason("cpu")
    results: dict[str, torch.Tensor] = {}
    for name, case in CASES.items():
        x, norms = case_inputs(name)
        out = K.layer_norm_triton(x, *(norms if case[3] else norms[:1]))
        for i, tensor in enumerate(out if case[3] else (out,)):
            results[f"direct/{name}/{i}"] = tensor
    calls = count_calls(K, "layer_norm_triton")
    A.LAYERNORM_KERNEL_DEVICE_TYPES = ("cpu",)
    x = torch.randn(2, 16, 32, 32, generator=torch.Generator().manual_seed(5))
    for shift, block in swin_blocks().items():
        with torch.no_grad(), A.layernorm_kernel("triton"), A.window_kernel("torch"):
            record_counted(results, f"block/{shift}", calls, block, x)
    torch.save(results, out_path)


interpreted = interpreter_fixture("tests.test_layernorm_triton")


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_equals_layer_norm(interpreted, name):
    x, norms = case_inputs(name)
    dtype, two = CASES[name][2], CASES[name][3]
    for i, norm in enumerate(norms if two else norms[:1]):
        got = interpreted[f"direct/{name}/{i}"]
        expected = F.layer_norm(x.float(), (x.shape[-1],), norm.weight.float(), norm.bias.float(), norm.eps)
        assert got.dtype == dtype and got.shape == x.shape
        assert (got.float() - expected).abs().max().item() <= TOLERANCE[dtype] * expected.abs().max().item()
    assert f"direct/{name}/1" in interpreted or not two


@pytest.mark.parametrize("shift", [0, 4])
def test_swin_blocks_through_the_kernel(interpreted, shift):
    x = torch.randn(2, 16, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), A.layernorm_kernel("torch"):
        expected = swin_blocks()[shift](x)
    assert int(interpreted[f"block/{shift}/calls"]) == 2  # norm_q + norm_kv together, then norm_ffn
    torch.testing.assert_close(interpreted[f"block/{shift}"], expected, rtol=0, atol=2e-5)


def test_dispatch(monkeypatch):
    """"auto": half precision only; never CPU tensors or autograd; "torch" never; bad inputs named."""
    calls = []

    def stand_in(x, *norms):
        calls.append(x.dtype)
        outs = tuple(torch.zeros_like(x) for _ in norms)
        return outs if len(norms) == 2 else outs[0]

    monkeypatch.setattr(K, "layer_norm_triton", stand_in)
    monkeypatch.setattr(K, "unavailable_reason", lambda device=None: None)
    block = swin_blocks()[0]
    x = torch.randn(1, 16, 32, 32)
    with torch.no_grad():
        block(x)  # CPU tensors: not a kernel device type
    monkeypatch.setattr(A, "LAYERNORM_KERNEL_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(A, "_kernel_failures", {})
    assert A.layernorm_kernel_mode() == "auto"
    block(x)  # autograd on
    with torch.no_grad(), A.window_kernel("torch"):
        block(x)  # "auto", float32: torch's
        with A.layernorm_kernel("torch"):
            block.to(torch.bfloat16)(x.bfloat16())
        assert calls == []
        block(x.bfloat16())  # "auto", half precision: the kernel, twice per block
    assert calls == [torch.bfloat16, torch.bfloat16]
    q = torch.randn(4, 32)
    assert K.unsupported_reason(q, torch.nn.LayerNorm(32)) is None
    assert "channels" in K.unsupported_reason(torch.randn(4, 2000), torch.nn.LayerNorm(2000))
    assert "affine" in K.unsupported_reason(q, torch.nn.LayerNorm(32, elementwise_affine=False))
    assert "eps" in K.unsupported_reason(q, torch.nn.LayerNorm(32), torch.nn.LayerNorm(32, eps=1e-6))
    assert "dtype" in K.unsupported_reason(q.double(), torch.nn.LayerNorm(32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cuda_kernel_matches_torch(dtype):
    """The official 256² level's tokens (32 channels, channels-last map) through both LayerNorms."""
    torch.manual_seed(0)
    x = torch.randn(4, 32, 256, 256, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    seq = x.flatten(2).transpose(1, 2)
    norms = [torch.nn.LayerNorm(32).cuda().to(dtype) for _ in range(2)]
    with torch.no_grad():
        for norm in norms:
            norm.weight.normal_()
            norm.bias.normal_()
        got = K.layer_norm_triton(seq, *norms)
    for out, norm in zip(got, norms, strict=True):
        torch.testing.assert_close(out, norm(seq), rtol=0, atol=TOLERANCE[dtype] * 10)
