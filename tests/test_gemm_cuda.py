"""The FP8 GEMMs with fused epilogues (lightx2v._C_sm90, CUTLASS) on an H100/H200 (`-m cuda`).

Skipped without a compute capability 9.0 GPU or without the built lightx2v._C_sm90.

Tolerance as the other kernel tests (DESIGN.md): the kernel may err at most 2x what PyTorch
errs against the float64 product (relative L2), PyTorch being the unfused chain FP8Linear
ran before: torch._scaled_mm (fast accumulation, bf16 out) and the separate op. Outputs are
poisoned with NaN first, so an element the kernel does not write fails.
"""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from lightx2v.ops import gemm
from lightx2v.quant.fp8 import quantize_weight
from lightx2v.quant.linear import per_token_quant_fp8

pytestmark = pytest.mark.cuda
if (
    not torch.cuda.is_available()
    or torch.cuda.get_device_capability() != (9, 0)
    or importlib.util.find_spec("lightx2v._C_sm90") is None
):
    pytest.skip("needs an sm_90 GPU and the built lightx2v._C_sm90", allow_module_level=True)

DEV = "cuda"
C = torch.ops.lx2v_C


@pytest.fixture(scope="module", autouse=True)
def fused_backend():
    backend, why = gemm.epilogue_backend(DEV)
    assert backend == "cuda", why


def rel_l2(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-300)).item()


def operands(m, k, n, seed=0, bias=True):
    g = torch.Generator(DEV).manual_seed(seed)
    x = torch.randn(m, k, generator=g, device=DEV) * (
        1 + 3 * torch.rand(m, 1, generator=g, device=DEV)
    )
    a, sa = per_token_quant_fp8(x.to(torch.bfloat16))
    w = torch.randn(n, k, generator=g, device=DEV) * k**-0.5
    wq, sw = quantize_weight(w, "fp8")
    b = (torch.randn(n, generator=g, device=DEV) * 0.5).to(torch.bfloat16) if bias else None
    return a, sa, wq, sw.contiguous(), b


def product64(a, sa, w, sw, bias):
    y = (a.double() * sa.double().reshape(-1, 1)) @ (w.double() * sw.double()[:, None]).t()
    return y if bias is None else y + bias.double()


scaled_mm = gemm.scaled_mm


SHAPES = [  # (M, K, N): odd token counts, Wan's dims, K and N off the tile grid
    (1, 5120, 5120),
    (7, 1536, 1536),
    (4097, 5120, 13824),
    (32760, 5120, 5120),
    (300, 1552, 1568),
    (4097, 13824, 5120),
]


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_gemm_bias(m, k, n, bias):
    a, sa, w, sw, b = operands(m, k, n, bias=bias)
    out = torch.full((m, n), float("nan"), device=DEV).to(torch.bfloat16)
    C.fp8_gemm(out, a, sa.reshape(-1), w, sw, b)
    truth = product64(a, sa, w, sw, b)
    err, err_torch = rel_l2(out, truth), rel_l2(scaled_mm(a, sa, w, sw, b), truth)
    assert not out.isnan().any()
    assert err <= 2 * err_torch, (err, err_torch)


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_gemm_gelu(m, k, n):
    a, sa, w, sw, b = operands(m, k, n, seed=1)
    out = torch.full((m, n), float("nan"), device=DEV).to(torch.bfloat16)
    C.fp8_gemm_gelu(out, a, sa.reshape(-1), w, sw, b)
    truth = F.gelu(product64(a, sa, w, sw, b), approximate="tanh")
    chain = F.gelu(scaled_mm(a, sa, w, sw, b), approximate="tanh")
    err, err_torch = rel_l2(out, truth), rel_l2(chain, truth)
    assert not out.isnan().any()
    assert err <= 2 * err_torch, (err, err_torch)


def test_gelu_epilogue_on_exact_products():
    """With one-hot weight rows and unit scales y = a[:, n % K] exactly, so the output must
    be GELU(y) rounded once to bf16, also in the negative tail where GELU is tiny (the
    sigmoid form does not cancel there) and where y is large."""
    m, k, n = 256, 256, 1024
    vals = torch.linspace(-12, 8, m * k, device=DEV).to(torch.float8_e4m3fn)  # exact values
    a = vals.view(m, k)
    cols = torch.arange(n, device=DEV) % k
    w = torch.zeros(n, k, device=DEV)
    w[torch.arange(n, device=DEV), cols] = 1
    w = w.to(torch.float8_e4m3fn)
    ones_m, ones_n = torch.ones(m, device=DEV), torch.ones(n, device=DEV)
    out = torch.full((m, n), float("nan"), device=DEV).to(torch.bfloat16)
    C.fp8_gemm_gelu(out, a, ones_m, w, ones_n, None)
    y = a.double()[:, cols]
    u = (2 / torch.pi) ** 0.5 * (y + 0.044715 * y**3)
    want = y / (1 + torch.exp(-2 * u))  # GELU(tanh) without cancellation, fp64
    normal = want.abs() > 2.0**-126  # bf16 normal range
    rel = ((out.double() - want) / want)[normal].abs().max().item()
    assert rel <= 2.0**-8, rel  # one bf16 rounding (≤ 2^-9) plus fast-math exp/divide
    assert (out.double()[~normal].abs() <= 2.0**-126).all()


@pytest.mark.parametrize("m,k,n", [*SHAPES, (300, 1552, 1540)])  # N % 16 != 0: fp32 rows
@pytest.mark.parametrize("gated", [True, False])
def test_gemm_residual(m, k, n, gated):
    batch = 2 if m % 2 == 0 else 1
    a, sa, w, sw, b = operands(m, k, n, seed=2)
    g = torch.Generator(DEV).manual_seed(3)
    res0 = torch.randn(batch, m // batch, n, generator=g, device=DEV)
    gate = torch.randn(batch, n, generator=g, device=DEV) if gated else None
    res = res0.clone()
    C.fp8_gemm_residual(res, a, sa.reshape(-1), w, sw, b, gate)
    y64 = product64(a, sa, w, sw, b).view(res.shape)
    inc64 = y64 * (gate.double()[:, None] if gated else 1.0)
    # the torch chain; _scaled_mm needs N % 16 == 0, so it runs on zero-padded weight rows
    pad = -n % 16
    wp = torch.cat([w, w.new_zeros(pad, k)]) if pad else w
    sp = torch.cat([sw, sw.new_ones(pad)]) if pad else sw
    bp = torch.cat([b, b.new_zeros(pad)]) if pad else b
    y = scaled_mm(a, sa, wp, sp, bp)[:, :n].reshape(res.shape).float()
    chain = res0 + (y * gate[:, None] if gated else y)
    err, err_torch = rel_l2(res - res0, inc64), rel_l2(chain - res0, inc64)
    assert not res.isnan().any()
    assert err <= 2 * err_torch, (err, err_torch)


def test_wrappers_fall_back_on_odd_n(monkeypatch):
    calls = []
    op = C.fp8_gemm
    monkeypatch.setattr(C, "fp8_gemm", lambda *args: calls.append(1) or op(*args))
    a, sa, w, sw, b = operands(64, 256, 200)  # N=200: a multiple of 8, fused
    ref = gemm.fp8_linear_ref(a, sa, w, sw, b)
    assert rel_l2(gemm.fp8_linear(a, sa, w, sw, b), ref) < 1e-2
    assert calls == [1]
    a, sa, w, sw, b = operands(64, 256, 132)  # N=132: bf16 rows not 16-byte multiples
    out = gemm.fp8_linear(a, sa, w, sw, b)  # neither kernel takes it: the reference
    assert rel_l2(out, gemm.fp8_linear_ref(a, sa, w, sw, b)) < 1e-2
    assert calls == [1]


def test_bad_inputs_raise_clear_errors():
    a, sa, w, sw, b = operands(16, 256, 256)
    out = torch.empty(16, 256, device=DEV, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="b must be float8_e4m3fn"):
        C.fp8_gemm(out, a, sa.reshape(-1), w.to(torch.bfloat16), sw, b)
    with pytest.raises(RuntimeError, match="K=8 must be a positive multiple of 16"):
        C.fp8_gemm(out, a[:, :8].contiguous(), sa.reshape(-1), w[:, :8].contiguous(), sw, b)
    with pytest.raises(RuntimeError, match=r"a_scale must be \[16\]"):
        C.fp8_gemm(out, a, sa[:8].reshape(-1), w, sw, b)
    res = torch.zeros(2, 8, 256, device=DEV)
    with pytest.raises(RuntimeError, match=r"gate must be float32 \[B, N\]"):
        C.fp8_gemm_residual(res, a, sa.reshape(-1), w, sw, b, torch.zeros(3, 256, device=DEV))


@pytest.mark.parametrize("name", ["fp8_gemm", "fp8_gemm_gelu", "fp8_gemm_residual"])
def test_opcheck(name):
    a, sa, w, sw, b = operands(96, 256, 128)
    if name == "fp8_gemm_residual":
        args = (torch.randn(2, 48, 128, device=DEV), a, sa.reshape(-1), w, sw, b,
                torch.randn(2, 128, device=DEV))  # fmt: skip
    else:
        args = (torch.empty(96, 128, device=DEV, dtype=torch.bfloat16), a, sa.reshape(-1), w,
                sw, b)  # fmt: skip
    # test_schema compares arguments before and after with allclose, which has no float8
    # kernel: the same check follows by hand (tests/test_csrc_cuda.py checks the marks)
    utils = ["test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"]
    torch.library.opcheck(getattr(C, name).default, args, test_utils=utils)
    inputs = [t.clone() for t in args[1:]]
    getattr(C, name)(*args)
    for before, after in zip(inputs, args[1:], strict=True):
        assert torch.equal(before.view(torch.uint8), after.view(torch.uint8))


def test_compiled_equals_eager():
    a, sa, w, sw, b = operands(512, 1536, 1536)
    a2, sa2, w2, sw2, b2 = operands(512, 1536, 1536, seed=4)
    g = torch.Generator(DEV).manual_seed(5)
    res0 = torch.randn(2, 256, 1536, generator=g, device=DEV)
    gate = torch.randn(2, 1536, generator=g, device=DEV)

    def f(res):
        h = gemm.fp8_linear_gelu(a, sa, w, sw, b)
        y = gemm.fp8_linear(a, sa, w, sw, b)
        gemm.fp8_linear_residual_(res, a2, sa2, w2, sw2, b2, gate)
        return res, h, y

    eager = f(res0.clone())
    compiled = torch.compile(f, fullgraph=True)(res0.clone())
    for c, e in zip(compiled, eager, strict=True):
        torch.testing.assert_close(c, e, rtol=0, atol=0)


def test_fp8_block_fused_matches_unfused(monkeypatch):
    """A quantized 1.3B-shaped block runs its FFN GELU and its three residual updates in the
    fused kernels (counted), and differs from the unfused chain by less than twice the chain's own
    distance from the fp32 block."""
    import copy

    from lightx2v.config import WanArch
    from lightx2v.models.wan.dit import WanDiT
    from lightx2v.quant.linear import quantize_dit

    arch = WanArch("t2v", dim=1536, ffn_dim=8960, num_heads=12, num_layers=1)
    torch.manual_seed(0)
    model = WanDiT(arch).to(DEV)
    with torch.no_grad():
        model.blocks[0].modulation.normal_(0, 0.1)
    block32 = copy.deepcopy(model.blocks[0])
    block = quantize_dit(model.to(torch.bfloat16), "fp8", backend="scaled_mm").blocks[0]
    L = 1024
    x = torch.randn(2, L, arch.dim, device=DEV)
    e = torch.randn(2, 6, arch.dim, device=DEV) * 0.1
    ang = torch.rand(L, 1, arch.dim // arch.num_heads // 2, device=DEV) * 3
    cos, sin = ang.cos(), ang.sin()
    ctx = torch.randn(2, 77, arch.dim, device=DEV)
    calls = []
    for name in ("fp8_gemm_gelu", "fp8_gemm_residual"):
        op = getattr(C, name)
        monkeypatch.setattr(
            C, name, lambda *args, op=op, name=name: calls.append(name) or op(*args)
        )
    with torch.no_grad():
        ref = block32(x.clone(), e, cos, sin, block32.cross_attn.kv(ctx, None))
        kv = block.cross_attn.kv(ctx.to(torch.bfloat16), None)
        fused = block(x.clone(), e, cos, sin, kv)
        # FFN up; attention output (gate 1), cross-attention output (no gate), FFN down (gate 2)
        assert sorted(calls) == ["fp8_gemm_gelu"] + ["fp8_gemm_residual"] * 3, calls
        monkeypatch.setattr(gemm, "epilogue_backend", lambda device=None: ("unfused", "test"))
        unfused = block(x.clone(), e, cos, sin, kv)
        assert len(calls) == 4  # the unfused run used none of them
    d = lambda t: t - x  # noqa: E731  (the block's update of the residual stream)
    assert rel_l2(d(fused), d(unfused)) < 2 * rel_l2(d(unfused), d(ref))
