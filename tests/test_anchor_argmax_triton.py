"""The Triton anchor argmax kernel (issue 11) against the torch reduction, and its dispatch.

Without a GPU the kernel runs through Triton's CPU interpreter, which must be switched on before
triton is imported: one subprocess (`TRITON_INTERPRET=1`) computes the kernel's picks for every case
below and FullAttention's outputs through the dispatch, and the tests here compare them with
`attention.head_mean_argmax`:

- random inputs: heads 2–8, keys 64–200 (not all multiples of the 64-key block), head widths 8, 16
  and 24 (zero-padded to tl.dot's tiles), float32/float16/bfloat16, shared (batch-1) and per-frame
  keys, strided queries, power-of-two and other scales, every query block size: the same picks;
- exact ties (duplicated keys in one block and across blocks): the lowest index, as torch.argmax;
- the attended values from the first pass (`anchor_attention_triton`): the same picks, and values equal
  to `scaled_dot_product_attention`'s in float32 up to the rounding of the weights to v's dtype;
- near-ties below float32 rounding: a pick whose head-mean weight (float64) is within 1e-6 relative
  of the best; a clear 1e-3 margin: the larger key;
- the dispatch: CPU tensors never reach the kernel; "auto"/"triton" use it where allowed, "torch"
  never; forced "triton" raises where it cannot run, "auto" falls back (also after a kernel failure
  and under torch.compile); the module imports and reports clearly without triton.

On a CUDA machine `test_cuda_kernel_matches_torch` also runs the compiled kernel at the official
anchor shape.
"""
from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from imtalker_core.layers import anchor_argmax_triton as K
from imtalker_core.layers import attention as A
from tests.helpers.triton_interpreter import count_calls, interpreter_fixture, interpreter_problem

ROOT = Path(__file__).resolve().parent.parent
# Relative head-mean weight (float64) by which a pick may fall short of the best: float32 rounding of
# the logits, the normaliser and exp in two different orders stays far below it.
NEAR_TIE = 1e-6

# name → (frames, key batch, heads, queries, keys, head width, dtype, scale, query block, inputs)
CASES = {
    "fp32-shared-keys-ragged": (2, 1, 8, 24, 100, 16, torch.float32, 0.25, 64, "ragged"),
    "fp16-per-frame-keys": (2, 2, 2, 50, 64, 16, torch.float16, 0.25, 16, "random"),
    "bf16-width-8-odd-scale": (2, 1, 4, 30, 200, 8, torch.bfloat16, 8 ** -0.5, 32, "random"),
    "fp32-width-24-strided": (2, 2, 3, 20, 97, 24, torch.float32, 24 ** -0.5, 16, "strided"),
    "fp32-one-frame": (1, 1, 2, 64, 64, 16, torch.float32, 0.3, 64, "random"),
    "exact-ties": (2, 1, 4, 24, 150, 16, torch.float32, 0.25, 64, "ties"),
    "near-ties": (1, 1, 4, 32, 100, 16, torch.float32, 0.25, 32, "near-ties"),
}
# The launch options on some cases: other key blocks and warps, and half inputs on CUDA cores instead of
# the (exact) tensor-core products.
OPTION_CASES = {
    "fp16-ieee-products-32-keys": ("fp16-per-frame-keys", dict(tensor_cores=False, block_n=32, num_warps=2)),
    "bf16-128-keys": ("bf16-width-8-odd-scale", dict(block_n=128, num_warps=8)),
    "fp32-16-keys": ("fp32-shared-keys-ragged", dict(block_n=16, tensor_cores=False)),
}
TIED_KEYS = (7, 30, 64, 129)  # two in the first 64-key block, one opening the second, one in the third
# The values' cases: case name → (value width, launch options).
VALUE_CASES = {
    "fp32-shared-keys-ragged": (16, {}),
    "fp16-per-frame-keys": (16, {}),
    "bf16-width-8-odd-scale": (24, {}),
    "fp32-width-24-strided": (8, dict(block_n=32)),
    "fp16-per-frame-keys/ieee": (16, dict(tensor_cores=False, block_n=128)),
}
# Largest difference from float32 SDPA per dtype: the weights are rounded to v's dtype for the product
# (flash attention's rounding), the values are of order 1.
VALUE_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def case_inputs(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded q `[B, H, Nq, d]` and k `[B or 1, H, Nk, d]` of a case (the same in every process)."""
    b, kb, h, nq, nk, d, dtype, _, _, kind = CASES[name]
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    if kind == "ties":
        # Small dyadic values: every product and sum is exact in any order, so duplicated keys tie
        # exactly in both implementations.
        q = torch.randint(-3, 4, (b, h, nq, d), generator=g).float() / 4
        k = torch.randint(-3, 4, (kb, h, nk, d), generator=g).float() / 4
        k[:, :, list(TIED_KEYS)] = 1.0
        q[:, :, :10] = 1.0  # these queries prefer the duplicated key by a wide margin
        return q.to(dtype), k.to(dtype)
    q = torch.randn(b, h, nq, d, generator=g)
    k = torch.randn(kb, h, nk, d, generator=g)
    if kind == "near-ties":
        # Query 0: keys 11 and 70 (different blocks) one float32 step apart in one component, far
        # below the rounding of the weights; query 1: key 40 beats key 20 by a clear 1e-3.
        k[0, :, 11] = q[0, :, 0]
        k[0, :, 70] = q[0, :, 0]
        k[0, :, 70, 3] = torch.nextafter(k[0, :, 70, 3], torch.tensor(float("inf")))
        k[0, :, 20] = q[0, :, 1]
        k[0, :, 40] = q[0, :, 1] * (1 + 1e-3)
    if kind == "ragged":
        # Every logit of the first queries is negative: a zero-padded key past Nk (logit 0) would win
        # unless the kernel masks it.
        k = k.abs()
        q[:, :, :4] = -q[:, :, :4].abs()
    if kind == "strided":
        # As FullAttention makes them: heads split from `[B, N, H·d]`, a non-contiguous view.
        q = q.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
        k = k.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
        assert not q.is_contiguous()
    return q.to(dtype), k.to(dtype)


def case_values(name: str) -> torch.Tensor:
    """Seeded v `[B or 1, H, Nk, dv]` for a VALUE_CASES entry, in its case's dtype (strided like its keys)."""
    b, kb, h, nq, nk, d, dtype, _, _, kind = CASES[name.split("/")[0]]
    v = torch.randn(kb, h, nk, VALUE_CASES[name][0], generator=torch.Generator().manual_seed(len(name)))
    if kind == "strided":
        v = v.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    return v.to(dtype)


def head_mean_weights64(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """The head-averaged softmax weights `[B, Nq, Nk]` in float64 from the float32-cast inputs."""
    q64, k64 = q.float().double(), k.float().double()
    logits = (q64 @ k64.transpose(-2, -1)) * scale
    return logits.softmax(dim=-1).mean(dim=1)


def assert_picks(q, k, scale, picks, exact: bool) -> None:
    """Every pick's weight is within NEAR_TIE of the best, and the picks equal torch's wherever the
    two are not near-tied (everywhere when `exact`)."""
    expected, _ = A.head_mean_argmax(q, k, scale)
    assert picks.dtype == torch.int64 and picks.shape == expected.shape
    weights = head_mean_weights64(q, k, scale)
    best = weights.max(dim=-1).values
    chosen = weights.gather(-1, picks.unsqueeze(-1)).squeeze(-1)
    assert (chosen >= best * (1 - NEAR_TIE)).all(), (chosen / best).min()
    differ = picks != expected
    if exact:
        assert not differ.any(), differ.nonzero()[:10]
    torch_chosen = weights.gather(-1, expected.unsqueeze(-1)).squeeze(-1)
    assert ((chosen - torch_chosen).abs()[differ] <= NEAR_TIE * best[differ]).all()


# --------------------------------------------------------------------------- the interpreter run

def _interpreter_worker(out_path: str) -> None:
    """Runs in the subprocess (TRITON_INTERPRET=1): the kernel's picks for every case, and
    FullAttention through the dispatch with CPU tensors allowed; saved with torch.save."""
    assert K.available("cpu") and K._interpreted(), K.unavailable_reason("cpu")
    results: dict[str, torch.Tensor] = {}
    for name, case in CASES.items():
        q, k = case_inputs(name)
        results[f"picks/{name}"] = K.head_mean_argmax_triton(q, k, case[7], block_m=case[8])
    for name, (case_name, options) in OPTION_CASES.items():
        q, k = case_inputs(case_name)
        results[f"options/{name}"] = K.head_mean_argmax_triton(q, k, CASES[case_name][7], **options)
    for name, (_, options) in VALUE_CASES.items():
        case = CASES[name.split("/")[0]]
        q, k = case_inputs(name.split("/")[0])
        picks, values = K.anchor_attention_triton(q, k, case_values(name), case[7], **options)
        results[f"values/{name}/picks"], results[f"values/{name}/values"] = picks, values
    calls = count_calls(K, "head_mean_argmax_triton")
    value_calls = count_calls(K, "anchor_attention_triton")
    A.ARGMAX_KERNEL_DEVICE_TYPES = ("cpu",)
    for dim, heads in ((32, 4), (64, 4)):  # head widths 8 (padded) and 16
        torch.manual_seed(dim)
        attn = A.FullAttention(dim, heads).eval()
        query, key, value = torch.randn(2, 48, dim), torch.randn(1, 64, dim), torch.randn(1, 64, dim)
        for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            attn_p = attn.to(dtype)
            inputs = [t.to(dtype) for t in (query, key, value)]
            for mode in ("auto", "triton", "torch"):
                for values_in_kernel in (True, False):
                    A.ANCHOR_VALUES_IN_KERNEL = values_in_kernel
                    before, values_before = len(calls), len(value_calls)
                    with torch.no_grad(), A.argmax_kernel(mode):
                        out, picks = attn_p(*inputs, return_argmax=True)
                    label = f"attention/{dim}/{precision}/{mode}/{'kernel' if values_in_kernel else 'sdpa'}-values"
                    results[f"{label}/out"], results[f"{label}/picks"] = out, picks
                    results[f"{label}/calls"] = torch.tensor([len(calls) - before, len(value_calls) - values_before])
    torch.save(results, out_path)


interpreted = interpreter_fixture("tests.test_anchor_argmax_triton")


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c[-1] in ("random", "ragged", "strided")])
def test_kernel_picks_equal_torch_on_random_inputs(interpreted, name):
    q, k = case_inputs(name)
    assert_picks(q, k, CASES[name][7], interpreted[f"picks/{name}"], exact=True)


@pytest.mark.parametrize("name", list(OPTION_CASES))
def test_launch_options_keep_the_picks(interpreted, name):
    case_name = OPTION_CASES[name][0]
    q, k = case_inputs(case_name)
    assert_picks(q, k, CASES[case_name][7], interpreted[f"options/{name}"], exact=True)


def test_launch_options_are_checked():
    q, k = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="TF32 would round"):
        K.head_mean_argmax_triton(q, k, 0.25, tensor_cores=True)
    with pytest.raises(ValueError, match="block_n=48"):
        K.head_mean_argmax_triton(q.half(), k.half(), 0.25, block_n=48)
    with pytest.raises(ValueError, match="block_m=8: use a power of two"):
        K.head_mean_argmax_triton(q, k, 0.25, block_m=8)


def test_exact_ties_pick_the_lowest_index(interpreted):
    q, k = case_inputs("exact-ties")
    picks = interpreted["picks/exact-ties"]
    assert (picks[:, :10] == TIED_KEYS[0]).all()
    assert_picks(q, k, 0.25, picks, exact=True)


def test_near_ties_stay_within_rounding_of_the_best(interpreted):
    q, k = case_inputs("near-ties")
    picks = interpreted["picks/near-ties"]
    weights = head_mean_weights64(q, k, 0.25)[0]
    gap = (weights[0, 11] - weights[0, 70]).abs() / weights[0].max()
    assert 0 < gap < 1e-7  # the crafted pair really is a near-tie below float32 rounding
    assert picks[0, 0].item() in (11, 70)
    assert picks[0, 1].item() == 40
    assert_picks(q, k, 0.25, picks, exact=False)


@pytest.mark.parametrize("name", list(VALUE_CASES))
def test_values_from_the_first_pass_equal_attention(interpreted, name):
    case_name = name.split("/")[0]
    q, k = case_inputs(case_name)
    v, scale = case_values(name), CASES[case_name][7]
    picks, values = interpreted[f"values/{name}/picks"], interpreted[f"values/{name}/values"]
    assert_picks(q, k, scale, picks, exact=True)
    expected = F.scaled_dot_product_attention(q.float(), k.float().expand(q.shape[0], -1, -1, -1),
                                              v.float().expand(q.shape[0], -1, -1, -1), scale=scale)
    assert values.dtype == v.dtype and values.shape == expected.shape and values.is_contiguous()
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(values.float(), expected, rtol=0, atol=VALUE_TOLERANCE[v.dtype])


@pytest.mark.parametrize("values_from", ["kernel", "sdpa"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("dim", [32, 64], ids=["width-8", "width-16"])
def test_full_attention_through_the_kernel(interpreted, dim, precision, values_from):
    """With CPU tensors allowed under the interpreter: "triton" calls the kernel once per forward,
    "torch" never, "auto" for half precision only (float32 keeps the reference's picks); with
    ANCHOR_VALUES_IN_KERNEL the kernel that also gives the values, else the picks-only one and attend.
    The picks match and the values are close to the CPU route's."""
    res = {mode: {part: interpreted[f"attention/{dim}/{precision}/{mode}/{values_from}-values/{part}"]
                  for part in ("out", "picks", "calls")}
           for mode in ("auto", "triton", "torch")}
    used = torch.tensor([0, 1] if values_from == "kernel" else [1, 0])  # picks-only calls, with-values calls
    assert torch.equal(res["auto"]["calls"], used * (0 if precision == "fp32" else 1))
    assert torch.equal(res["triton"]["calls"], used) and not res["torch"]["calls"].any()
    tolerance = {"fp32": 1e-5, "bf16": 2e-2}[precision]
    for mode in ("auto", "triton"):
        assert torch.equal(res[mode]["picks"], res["torch"]["picks"])
        torch.testing.assert_close(res[mode]["out"], res["torch"]["out"], rtol=0, atol=tolerance)


# --------------------------------------------------------------------------- dispatch, in process

@pytest.fixture
def attention_inputs():
    """A half-precision attention and inputs: "auto" considers the kernel for these (not for float32)."""
    torch.manual_seed(3)
    attn = A.FullAttention(32, 4).eval().to(torch.bfloat16)
    return attn, *(torch.randn(shape).to(torch.bfloat16) for shape in ((2, 48, 32), (1, 48, 32), (1, 48, 32)))


def _forward(attn, query, key, value):
    with torch.no_grad():
        return attn(query, key, value, return_argmax=True)


@pytest.mark.parametrize("mode", A.ARGMAX_KERNEL_MODES)
def test_cpu_tensors_never_reach_the_kernel(monkeypatch, attention_inputs, mode):
    def refuse(*args, **kwargs):
        raise AssertionError("the kernel was called with CPU tensors")

    monkeypatch.setattr(K, "head_mean_argmax_triton", refuse)
    monkeypatch.setattr(K, "anchor_attention_triton", refuse)
    monkeypatch.setattr(K, "unavailable_reason", lambda device=None: None)
    attn, query, key, value = attention_inputs
    with A.argmax_kernel("torch"):
        expected_out, expected_picks = _forward(attn, query, key, value)
    with A.argmax_kernel(mode):
        assert A.argmax_kernel_mode() == mode
        out, picks = _forward(attn, query, key, value)
    assert torch.equal(picks, expected_picks) and torch.equal(out, expected_out)


@pytest.fixture
def fake_kernel(monkeypatch):
    """CPU tensors allowed and a stand-in kernel whose picks (all key 5) show where they came from."""
    calls = []

    def stand_in(q, k, scale):
        calls.append((q.shape, k.shape, scale))
        return torch.full(q.shape[:1] + q.shape[2:3], 5, dtype=torch.int64)

    def stand_in_with_values(q, k, v, scale):
        return stand_in(q, k, scale), A.attend(q, k, v)

    monkeypatch.setattr(A, "ARGMAX_KERNEL_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(A, "_kernel_failures", {})
    monkeypatch.setattr(K, "unavailable_reason", lambda device=None: None)
    monkeypatch.setattr(K, "head_mean_argmax_triton", stand_in)
    monkeypatch.setattr(K, "anchor_attention_triton", stand_in_with_values)
    return calls


def test_modes_choose_the_kernel_or_the_torch_code(fake_kernel, attention_inputs):
    attn, query, key, value = attention_inputs
    with A.argmax_kernel("torch"):
        torch_out, torch_picks = _forward(attn, query, key, value)
    assert not fake_kernel and not (torch_picks == 5).all()
    for mode in ("auto", "triton"):
        out, picks = _forward(attn, query, key, value) if mode == "auto" else (None, None)
        if mode == "triton":
            with A.argmax_kernel("triton"):
                out, picks = _forward(attn, query, key, value)
        assert (picks == 5).all() and picks.shape == (2, 48)
        # The values are attend's (SDPA), not the float32 map's: equal to bf16 rounding.
        torch.testing.assert_close(out, torch_out, rtol=0, atol=2e-2)
    assert len(fake_kernel) == 2 and fake_kernel[0][2] == attn.scale
    with A.fast_paths(False), A.argmax_kernel("triton"):  # the plain path never uses it
        _, plain_picks = _forward(attn, query, key.expand(2, -1, -1), value.expand(2, -1, -1))
    assert torch.equal(plain_picks, torch_picks) and len(fake_kernel) == 2


def test_auto_keeps_float32_on_the_torch_code(fake_kernel, attention_inputs):
    """fp32 promises the reference's frames; the kernel's summation order may flip a near-tie there."""
    attn, query, key, value = (x.float() for x in attention_inputs)
    with A.argmax_kernel("torch"):
        expected = _forward(attn, query, key, value)[1]
    picks = _forward(attn, query, key, value)[1]  # "auto"
    assert torch.equal(picks, expected) and not fake_kernel
    with A.argmax_kernel("triton"):  # forced: still the kernel
        assert (_forward(attn, query, key, value)[1] == 5).all() and len(fake_kernel) == 1


def test_forced_kernel_raises_where_it_cannot_run(fake_kernel, monkeypatch, attention_inputs, caplog):
    attn, query, key, value = attention_inputs
    monkeypatch.setattr(K, "unavailable_reason", lambda device=None: "no GPU backend in this test")
    with A.argmax_kernel("triton"), pytest.raises(RuntimeError, match="no GPU backend in this test"):
        _forward(attn, query, key, value)
    with A.argmax_kernel("torch"):
        expected = _forward(attn, query, key, value)[1]
    with caplog.at_level(logging.INFO, logger=A.__name__):
        picks = _forward(attn, query, key, value)[1]  # "auto": the torch code, with the reason logged
    assert torch.equal(picks, expected) and not fake_kernel
    assert "no GPU backend in this test" in caplog.text


def test_auto_falls_back_after_a_kernel_failure(fake_kernel, monkeypatch, attention_inputs, caplog):
    attn, query, key, value = attention_inputs
    calls = []

    def broken(*args):
        calls.append(1)
        raise RuntimeError("cannot compile for this GPU")

    monkeypatch.setattr(K, "head_mean_argmax_triton", broken)
    monkeypatch.setattr(K, "anchor_attention_triton", broken)
    with A.argmax_kernel("torch"):
        expected = _forward(attn, query, key, value)[1]
    with caplog.at_level(logging.WARNING, logger=A.__name__):
        first = _forward(attn, query, key, value)[1]
        second = _forward(attn, query, key, value)[1]
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert len(calls) == 1  # not retried on every call
    assert "Triton kernel failed" in caplog.text
    with A.argmax_kernel("triton"), pytest.raises(RuntimeError, match="cannot compile"):
        _forward(attn, query, key, value)


def test_traced_code_uses_the_torch_code(fake_kernel, monkeypatch, attention_inputs):
    attn, query, key, value = attention_inputs
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with A.argmax_kernel("triton"):
        picks = _forward(attn, query, key, value)[1]
    assert not fake_kernel and not (picks == 5).all()


def test_unsupported_inputs_are_named():
    q, k = torch.randn(2, 4, 8, 16), torch.randn(1, 4, 8, 16)
    assert K.unsupported_reason(q, k) is None
    assert "head width" in K.unsupported_reason(torch.randn(1, 2, 8, 80), torch.randn(1, 2, 8, 80))
    assert "dtypes" in K.unsupported_reason(q.double(), k.double())
    assert "batch" in K.unsupported_reason(q, torch.randn(3, 4, 8, 16))
    assert "empty" in K.unsupported_reason(q[:, :, :0], k)
    with pytest.raises(ValueError, match="auto, triton, torch"):
        with A.argmax_kernel("fast"):
            pass
    assert A.argmax_kernel_mode() == "auto"


NO_TRITON_SCRIPT = """
import sys
sys.modules["triton"] = None  # as on a machine with torch's CPU wheel only
import torch
from imtalker_core.layers import anchor_argmax_triton as K
from imtalker_core.layers import attention as A
assert not K.available() and not K.available("cpu")
assert "triton cannot be imported" in K.unavailable_reason("cuda"), K.unavailable_reason("cuda")
q = torch.randn(1, 2, 8, 16)
try:
    K.head_mean_argmax_triton(q, q, 0.25)
except RuntimeError as err:
    assert "triton cannot be imported" in str(err)
else:
    raise AssertionError("no error without triton")
A.ARGMAX_KERNEL_DEVICE_TYPES = ("cpu",)
attn = A.FullAttention(32, 2)
x = torch.randn(1, 8, 32)
with torch.no_grad():
    picks = attn(x, x, x, return_argmax=True)[1]
    with A.argmax_kernel("torch"):
        assert torch.equal(attn(x, x, x, return_argmax=True)[1], picks)
    with A.argmax_kernel("triton"):
        try:
            attn(x, x, x, return_argmax=True)
        except RuntimeError as err:
            assert "triton cannot be imported" in str(err)
        else:
            raise AssertionError("forced triton ran without triton")
"""


def test_without_triton_the_module_imports_and_says_why():
    result = subprocess.run([sys.executable, "-c", NO_TRITON_SCRIPT], check=False, cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


# --------------------------------------------------------------------------- on a GPU

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_kernel_matches_torch(dtype):
    """The compiled kernel at the official anchor shape (8 heads of width 16, 4096 keys), shared and
    per-frame keys: picks equal torch's except near-ties, the values from its first pass equal float32
    attention's up to the weights' rounding, and FullAttention uses it in "auto"."""
    if not K.available("cuda"):
        pytest.fail(f"triton cannot run on this GPU: {K.unavailable_reason('cuda')}")
    g = torch.Generator(device="cuda").manual_seed(0)
    for kb in (1, 2):
        q = torch.randn(2, 8, 1024, 16, device="cuda", generator=g).to(dtype)
        k = torch.randn(kb, 8, 4096, 16, device="cuda", generator=g).to(dtype)
        expected, _ = A.head_mean_argmax(q, k, 0.25)
        # Half inputs: the tensor-core products (default) and the CUDA-core ones.
        v = torch.randn(kb, 8, 4096, 16, device="cuda", generator=g).to(dtype)
        exact_values = A.attend(q.float(), k.float(), v.float())
        for tensor_cores in (None, False) if dtype != torch.float32 else (None,):
            picks = K.head_mean_argmax_triton(q, k, 0.25, tensor_cores=tensor_cores)
            assert_picks(q, k, 0.25, picks, exact=False)
            assert (picks != expected).float().mean() < 1e-3
            picks_too, values = K.anchor_attention_triton(q, k, v, 0.25, tensor_cores=tensor_cores)
            assert torch.equal(picks_too, picks)
            torch.testing.assert_close(values.float(), exact_values, rtol=0, atol=VALUE_TOLERANCE[dtype])
    attn = A.FullAttention(128, 8).cuda().to(dtype).eval()
    query = torch.randn(2, 4096, 128, device="cuda", generator=g).to(dtype)
    source = torch.randn(1, 4096, 128, device="cuda", generator=g).to(dtype)
    with torch.no_grad():
        with A.argmax_kernel("torch"):
            torch_out, torch_picks = attn(query, source, source, return_argmax=True)
        with A.argmax_kernel("triton"):
            out, picks = attn(query, source, source, return_argmax=True)
    assert (picks != torch_picks).float().mean() < 1e-3
    # The values from the kernel's first pass against SDPA's: each rounds the weights its own way.
    torch.testing.assert_close(out.float(), torch_out.float(), rtol=0,
                               atol=1e-5 if dtype == torch.float32 else 2e-2)


def test_interpreter_problem_names_the_triton_and_numpy_that_cannot_work_together():
    """A failed interpreter run says when it is triton < 3.7 beside numpy >= 2.4 (torch 2.7's triton 3.3.1
    with today's numpy), and what to install."""
    problem = interpreter_problem("3.3.1", "2.4.6")
    assert "triton 3.3.1" in problem and "numpy 2.4.6" in problem and "numpy<2.4" in problem
    assert interpreter_problem("3.6.0+git1234", "2.4.0") is not None
    for versions in (("3.7.0", "2.4.6"), ("3.9.0", "2.4.6"), ("3.3.1", "2.3.5"), ("3.3.1", "1.26.4")):
        assert interpreter_problem(*versions) is None, versions
