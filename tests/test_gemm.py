"""FP8 GEMM with fused epilogues (lightx2v/ops/gemm.py) on the CPU: the references, the
GELU form the kernel evaluates, the routing of the wrappers and of FP8Linear, and the
wrappers inside torch.compile with stand-in ops. The CUDA kernels are tested against these
references in tests/test_gemm_cuda.py."""

import math

import pytest
import torch
import torch.nn.functional as F

from lightx2v.ops import gemm
from lightx2v.ops.residual import residual_add_
from lightx2v.quant.fp8 import quantize_weight
from lightx2v.quant.linear import FP8Linear, per_token_quant_fp8


def operands(m=24, k=64, n=48, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    a, sa = per_token_quant_fp8(torch.randn(m, k, generator=g))
    wq, sw = quantize_weight(torch.randn(n, k, generator=g) * k**-0.5, "fp8")
    b = (torch.randn(n, generator=g) * 0.5).to(torch.bfloat16) if bias else None
    return a, sa, wq, sw, b


def product64(a, sa, w, sw, bias):
    y = (a.double() * sa.double().reshape(-1, 1)) @ (w.double() * sw.double()[:, None]).t()
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("bias", [True, False])
def test_references_are_the_scaled_product(bias):
    a, sa, w, sw, b = operands(bias=bias)
    y64 = product64(a, sa, w, sw, b)
    torch.testing.assert_close(
        gemm.fp8_gemm_fp32(a, sa, w, sw, b).double(), y64, rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(gemm.fp8_linear_ref(a, sa, w, sw, b), y64.to(torch.bfloat16))
    gelu = gemm.fp8_linear_gelu_ref(a, sa, w, sw, b)
    torch.testing.assert_close(gelu, F.gelu(y64, approximate="tanh").to(torch.bfloat16))


def test_residual_reference_gates_each_batch_row():
    a, sa, w, sw, b = operands(m=24)
    res = torch.randn(2, 12, 48)
    gate = torch.randn(2, 48)
    out = gemm.fp8_linear_residual_ref_(res.clone(), a, sa, w, sw, b, gate)
    y = product64(a, sa, w, sw, b).view(2, 12, 48)
    want = res.double() + y * gate.double()[:, None]
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    ungated = gemm.fp8_linear_residual_ref_(res.clone(), a, sa, w, sw, b, None)
    torch.testing.assert_close(ungated.double(), res.double() + y, rtol=1e-5, atol=1e-5)


def test_gelu_sigmoid_form_equals_tanh_form():
    """The kernel computes x·sigmoid(2u) for 0.5·x·(1 + tanh(u)); the two agree to fp64
    rounding everywhere, and the sigmoid form keeps its relative accuracy in the negative
    tail, where 1 + tanh(u) cancels."""
    x = torch.linspace(-12, 12, 20001, dtype=torch.float64)
    u = math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)
    sigmoid_form = x / (1 + torch.exp(-2 * u))
    body = x > -5  # beyond, torch's tanh form cancels even in fp64
    torch.testing.assert_close(
        sigmoid_form[body], F.gelu(x, approximate="tanh")[body], rtol=1e-8, atol=1e-300
    )
    x32 = x.float()
    u32 = math.sqrt(2 / math.pi) * (x32 + 0.044715 * x32**3)
    tail = (x < -3) & (x > -9)  # beyond -9 GELU is below 1e-17: both forms round to 0
    rel = lambda t: ((t.double() - sigmoid_form) / sigmoid_form)[tail].abs().max().item()  # noqa: E731
    assert rel(x32 / (1 + torch.exp(-2 * u32))) < 1e-4  # fp32 (x rounded to fp32: ~2e-5)
    assert rel(0.5 * x32 * (1 + torch.tanh(u32))) > 1e-2  # fp32, tanh form: cancellation


def test_cpu_runs_the_references():
    assert gemm.epilogue_backend("cpu")[0] == "ref"
    a, sa, w, sw, b = operands()
    torch.testing.assert_close(
        gemm.fp8_linear(a, sa, w, sw, b), gemm.fp8_linear_ref(a, sa, w, sw, b)
    )
    torch.testing.assert_close(
        gemm.fp8_linear_gelu(a, sa, w, sw, b), gemm.fp8_linear_gelu_ref(a, sa, w, sw, b)
    )
    res = torch.randn(2, 12, 48)
    gate = torch.randn(2, 1, 48)  # the [B, 1, D] modulation layout is accepted
    out = gemm.fp8_linear_residual_(res.clone(), a, sa, w, sw, b, gate)
    want = gemm.fp8_linear_residual_ref_(res.clone(), a, sa, w, sw, b, gate.squeeze(1))
    torch.testing.assert_close(out, want)


def test_fp8linear_fused_methods_fall_back_to_module_and_op():
    torch.manual_seed(0)
    lin = FP8Linear.from_linears([torch.nn.Linear(64, 48)], backend="ref")
    x = torch.randn(2, 12, 64)
    torch.testing.assert_close(lin.forward_gelu(x), F.gelu(lin(x), approximate="tanh"))
    res, gate = torch.randn(2, 12, 48), torch.randn(2, 48)
    torch.testing.assert_close(
        lin.forward_residual_(res.clone(), x, gate), residual_add_(res.clone(), lin(x), gate)
    )


def fused_route_linear(k=64, n=48) -> FP8Linear:
    """An FP8Linear on the route that fuses epilogues (the scaled_mm backend with fast
    accumulation); on the CPU gemm's wrappers run their references there."""
    torch.manual_seed(0)
    lin = FP8Linear.from_linears([torch.nn.Linear(k, n).bfloat16()], backend="ref")
    lin.backend = "scaled_mm"  # bypass selection: no _scaled_mm runs on this route
    assert lin._fuses_epilogues()
    return lin


def test_fp8linear_fused_methods_take_a_quantized_pair():
    """A (q, s) pair from a norm + FP8 op goes to the GEMM wrappers as it is."""
    lin = fused_route_linear()
    q, s = per_token_quant_fp8(torch.randn(24, 64))
    pair = (q.view(2, 12, 64), s.view(2, 12, 1))
    w, sw, b = lin.weight, lin.weight_scale, lin.bias
    h = lin.forward_gelu(pair)
    assert h.shape == (2, 12, 48) and h.dtype == torch.bfloat16
    torch.testing.assert_close(h.view(24, 48), gemm.fp8_linear_gelu_ref(q, s, w, sw, b))
    res, gate = torch.randn(2, 12, 48), torch.randn(2, 48)
    out = lin.forward_residual_(res.clone(), pair, gate)
    want = gemm.fp8_linear_residual_ref_(res.clone(), q, s, w, sw, b, gate)
    torch.testing.assert_close(out, want)


# ---------------------------------------------------------------------------------------
# the wrappers' CUDA route, with CPU stand-ins for the lx2v_C ops (where lightx2v._C is not
# loaded): which op is called with what, and that it compiles with fullgraph=True

_standin_lib = None
CALLS: list[str] = []  # the stand-in ops that ran


@pytest.fixture
def standin_ops(monkeypatch):
    global _standin_lib
    if not hasattr(torch.ops.lx2v_C, "fp8_gemm_residual") and _standin_lib is None:
        lib = torch.library.Library("lx2v_C", "FRAGMENT")
        lib.define("fp8_gemm(Tensor(a!) out, Tensor a, Tensor a_scale, Tensor b, "
                   "Tensor b_scale, Tensor? bias) -> ()")  # fmt: skip
        lib.define("fp8_gemm_gelu(Tensor(a!) out, Tensor a, Tensor a_scale, Tensor b, "
                   "Tensor b_scale, Tensor? bias) -> ()")  # fmt: skip
        lib.define("fp8_gemm_residual(Tensor(a!) res, Tensor a, Tensor a_scale, Tensor b, "
                   "Tensor b_scale, Tensor? bias, Tensor? gate) -> ()")  # fmt: skip

        def plain(out, a, sa, b, sb, bias):
            CALLS.append("fp8_gemm")
            out.copy_(gemm.fp8_linear_ref(a, sa, b, sb, bias))

        def gelu(out, a, sa, b, sb, bias):
            CALLS.append("fp8_gemm_gelu")
            out.copy_(gemm.fp8_linear_gelu_ref(a, sa, b, sb, bias))

        def residual(res, a, sa, b, sb, bias, gate):
            CALLS.append("fp8_gemm_residual")
            gemm.fp8_linear_residual_ref_(res, a, sa, b, sb, bias, gate)

        lib.impl("fp8_gemm", plain, "CPU")
        lib.impl("fp8_gemm_gelu", gelu, "CPU")
        lib.impl("fp8_gemm_residual", residual, "CPU")
        for name in ("fp8_gemm", "fp8_gemm_gelu", "fp8_gemm_residual"):
            torch.library.register_fake(f"lx2v_C::{name}", lambda *args: None, lib=lib)
        _standin_lib = lib
    elif _standin_lib is None:
        pytest.skip("lightx2v._C is loaded: tests/test_gemm_cuda.py covers the real ops")
    monkeypatch.setattr(gemm, "epilogue_backend", lambda device=None: ("cuda", "stand-in"))
    CALLS.clear()


def test_wrappers_call_the_ops(standin_ops):
    a, sa, w, sw, b = operands()
    res, gate = torch.randn(2, 12, 48), torch.randn(2, 48)

    def f(res, a, sa, w, sw, b, gate):
        h = gemm.fp8_linear_gelu(a, sa, w, sw, b)
        y = gemm.fp8_linear(a, sa, w, sw, b)
        gemm.fp8_linear_residual_(res, a, sa, w, sw, b, gate)
        return h, y

    eager_res = res.clone()
    h, y = f(eager_res, a, sa, w, sw, b, gate)
    assert CALLS == ["fp8_gemm_gelu", "fp8_gemm", "fp8_gemm_residual"]
    torch.testing.assert_close(h, gemm.fp8_linear_gelu_ref(a, sa, w, sw, b))
    torch.testing.assert_close(y, gemm.fp8_linear_ref(a, sa, w, sw, b))
    torch.testing.assert_close(
        eager_res, gemm.fp8_linear_residual_ref_(res.clone(), a, sa, w, sw, b, gate)
    )
    compiled_res = res.clone()
    hc, yc = torch.compile(f, fullgraph=True)(compiled_res, a, sa, w, sw, b, gate)
    torch.testing.assert_close(hc, h, rtol=0, atol=0)
    torch.testing.assert_close(compiled_res, eager_res, rtol=0, atol=0)
    assert CALLS[3:] == ["fp8_gemm_gelu", "fp8_gemm", "fp8_gemm_residual"]  # in the graph


def test_fp8linear_pair_reaches_the_ops_compiled(standin_ops):
    """The FFN up-projection on adaln_fp8's pair: the fused GELU GEMM, in a full graph."""
    lin = fused_route_linear()
    q, s = per_token_quant_fp8(torch.randn(24, 64))
    pair = (q.view(2, 12, 64), s.view(2, 12, 1))
    eager = lin.forward_gelu(pair)
    compiled = torch.compile(lambda p: lin.forward_gelu(p), fullgraph=True)(pair)
    assert CALLS == ["fp8_gemm_gelu", "fp8_gemm_gelu"]
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


def test_odd_shapes_do_not_reach_the_ops(standin_ops, monkeypatch):
    called = []
    monkeypatch.setattr(gemm, "_unfused", lambda *args: called.append("unfused") or False)
    a, sa, w, sw, b = operands(k=64, n=44)  # N=44: bf16 rows are not 16-byte multiples
    out = gemm.fp8_linear(a, sa, w, sw, b)
    torch.testing.assert_close(out, gemm.fp8_linear_ref(a, sa, w, sw, b))
    assert called == ["unfused"] and CALLS == []


def test_kernel_backend_ref_turns_the_fused_gemms_off():
    from lightx2v.ops import dispatch

    try:
        dispatch.set_kernel_backend("ref")
        assert gemm.epilogue_backend("cuda:0")[0] == "unfused"  # answered without probing
    finally:
        dispatch.set_kernel_backend()


def test_residual_wrapper_rejects_mismatched_shapes():
    a, sa, w, sw, b = operands(m=24, n=48)
    with pytest.raises(ValueError, match="does not hold"):
        gemm.fp8_linear_residual_(torch.zeros(2, 10, 48), a, sa, w, sw, b)
    with pytest.raises(ValueError, match="gate"):
        gemm.fp8_linear_residual_(torch.zeros(2, 12, 48), a, sa, w, sw, b, torch.zeros(3, 48))


def test_stale_extension_is_reported_not_raised(monkeypatch):
    """As tests/test_ops.py's test of the same name, for the FP8 GEMM module's status."""
    import importlib

    real_find_spec, real_import = importlib.util.find_spec, importlib.import_module
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "lightx2v._C_sm90" else real_find_spec(name, *a),
    )

    def import_module(name, *a):
        if name == "lightx2v.ops._cuda":
            raise RuntimeError("operator lx2v_C::fp8_gemm_residual does not exist")
        return real_import(name, *a)

    monkeypatch.setattr(importlib, "import_module", import_module)
    ok, why = gemm._sm90_module_status()
    assert not ok and "older than this checkout" in why
