"""The csrc CUDA ops (lightx2v._C, torch.ops.lx2v_C) against the references (`pytest -m cuda`).

Skipped without a CUDA GPU or without the built extension (`pip install -e .` with a CUDA
torch and nvcc; LX2V_SKIP_CUDA_BUILD=1 leaves it out).

Tolerances as tests/test_kernels_cuda.py (DESIGN.md): a kernel may err at most ~2x what
PyTorch itself errs at the same output dtype against a float64 reference (relative L2,
`assert_within_principle`); PyTorch's error is that of the op's reference, fp32 arithmetic
rounded once to the output dtype. For FP8 the kernel applies the reference's own fp32
operations in its order, so the scale matches to fp32 noise in the statistics (rtol 1e-5)
and an e4m3 code differs only where that noise moves a value across a rounding tie.
Outputs are poisoned with NaN first so an unwritten element fails.
"""

import importlib.util
import logging

import pytest
import torch
from test_ops import EPS, adaln64, assert_within_principle, ln64, rms_rope64

from lightx2v.ops import dispatch, norm, rope

pytestmark = pytest.mark.cuda
if not torch.cuda.is_available() or importlib.util.find_spec("lightx2v._C") is None:
    pytest.skip("needs a CUDA GPU and the built lightx2v._C", allow_module_level=True)

csrc = dispatch.csrc()  # lightx2v.ops._cuda; imports lightx2v._C, registering lx2v_C ops
C = torch.ops.lx2v_C

TOKENS = [1, 7, 4097, 32760]
DIMS = [1536, 5120]
HEAD_DIM = 128
DEV = "cuda"


@pytest.fixture(scope="module", autouse=True)
def cuda_backend():
    """The lx2v wrappers must route the CUDA ops to csrc here; say why when they do not."""
    assert csrc.kernel_image_status() == "", csrc.kernel_image_status()
    assert dispatch.set_kernel_backend("cuda") == "cuda", dispatch.kernel_report()
    yield
    dispatch.set_kernel_backend()


def gen(seed):
    return torch.Generator(DEV).manual_seed(seed)


def nan_like(shape, dtype):
    return torch.full(shape, float("nan"), device=DEV).to(dtype)


def strided_rows(B, L, D, dtype, seed=0, scale=1.0, offset=0.0):
    """[B, L, D] rows of a wider buffer: row stride D + 64, data 32 elements in (aligned)."""
    g = gen(seed)
    buf = torch.randn(B, L, D + 64, generator=g, device=DEV) * scale
    buf = buf * (1 + 3 * torch.rand(B, L, 1, generator=g, device=DEV))  # per-token spread
    buf = buf + torch.randn(B, L, 1, generator=g, device=DEV) * offset  # per-token mean
    x = buf.to(dtype)[..., 32 : 32 + D]
    assert not x.is_contiguous() and x.stride(1) == D + 64
    return x


def modulation(D, seed=0):
    """shift, scale [2, D] as views of [2, 6, D] (batch stride 6·D), as in the block."""
    e = torch.randn(2, 6, D, generator=gen(seed), device=DEV) * 0.5
    return e[:, 0], e[:, 1]


def angles(L, seed=0):
    ang = torch.rand(L, HEAD_DIM // 2, generator=gen(seed), device=DEV, dtype=torch.float64)
    ang = ang * 100
    return ang.cos().float(), ang.sin().float(), ang


def bits(t):
    """fp8 tensors compare as their codes (torch.equal does not take float8)."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def rms64(x, w):
    xd = x.double()
    return xd / torch.sqrt((xd**2).mean(-1, keepdim=True) + EPS) * w.double()


# ---------------------------------------------------------------------------------------
# each op against its reference


@pytest.mark.parametrize("L", TOKENS)
@pytest.mark.parametrize("D", DIMS)
def test_rms_norm(L, D):
    x = strided_rows(2, L, D, torch.bfloat16, seed=L, scale=3)
    w = torch.randn(D, generator=gen(D), device=DEV)
    out = nan_like((2, L, D), torch.bfloat16)
    C.rms_norm(out, x, w, EPS)
    assert_within_principle(out, rms64(x, w), rope.rms_norm_ref(x, w))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_rms_norm_other_dtypes(dtype):
    x = strided_rows(2, 4097, 1536, dtype, seed=3, scale=3)
    w = torch.randn(1536, generator=gen(4), device=DEV)
    out = nan_like(x.shape, dtype)
    C.rms_norm(out, x, w, EPS)
    assert_within_principle(out, rms64(x, w), rope.rms_norm_ref(x, w))


@pytest.mark.parametrize("L", TOKENS)
@pytest.mark.parametrize("D", DIMS)
def test_qk_norm_rope(L, D):
    qkv = (torch.randn(2, L, 3 * D, generator=gen(L), device=DEV) * 4).bfloat16()
    q, k = qkv[..., :D], qkv[..., D : 2 * D]  # slices of a fused projection: row stride 3·D
    wq = torch.randn(D, generator=gen(D), device=DEV)
    wk = torch.randn(D, generator=gen(D + 1), device=DEV)
    cos, sin, ang = angles(L, seed=L)
    N = D // HEAD_DIM
    q_out, k_out = nan_like((2, L, N, HEAD_DIM), torch.bfloat16), nan_like((2, L, N, HEAD_DIM), torch.bfloat16)  # fmt: skip
    C.qk_norm_rope(q_out, k_out, q, k, wq, wk, cos, sin, EPS)
    for x, w, out in ((q, wq, q_out), (k, wk, k_out)):
        torch_out = rope.rope_fp32(rope.rms_norm_fp32(x, w, EPS), cos, sin).bfloat16()
        assert_within_principle(out, rms_rope64(x, w, ang), torch_out)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("L", TOKENS)
@pytest.mark.parametrize("D", DIMS)
def test_adaln_fp8(L, D, x_dtype):
    x = strided_rows(2, L, D, x_dtype, seed=L + 1, offset=5)  # fp32: the residual stream
    shift, scale = modulation(D, seed=L)
    q, s = nan_like((2, L, D), torch.float8_e4m3fn), nan_like((2, L, 1), torch.float32)
    C.adaln_fp8(q, s, x, shift, scale, EPS)
    q_ref, s_ref = norm.adaln_fp8_ref(x, shift, scale)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=0)
    assert_within_principle(q.float() * s, adaln64(x, shift, scale), q_ref.float() * s_ref)
    assert (q.view(torch.uint8) != q_ref.view(torch.uint8)).float().mean() < 1e-3


@pytest.mark.parametrize("L", [1, 4097])
@pytest.mark.parametrize("D", DIMS)
def test_affine_layer_norm_fp8(L, D):
    """affine=True: LN(x) · weight + bias (the norm before cross-attention), one table for
    the whole batch (stride 0), quantized per token like adaLN."""
    x = strided_rows(2, L, D, torch.float32, seed=L + 2, offset=5)
    w = torch.randn(D, generator=gen(D + 3), device=DEV) * 0.5 + 1
    b = torch.randn(D, generator=gen(D + 4), device=DEV) * 0.2
    q, s = csrc.affine_layer_norm_fp8(x, w, b, EPS)
    h32 = torch.nn.functional.layer_norm(x.float(), (D,), w, b, EPS)
    q_ref, s_ref = norm.quantize_fp8_per_token(h32)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=0)
    exact = ln64(x) * w.double() + b.double()
    assert_within_principle(q.float() * s, exact, q_ref.float() * s_ref)
    assert (q.view(torch.uint8) != q_ref.view(torch.uint8)).float().mean() < 1e-3


def test_adaln_fp8_outlier_channels():
    """Rows like a DiT residual stream: a few channels (the first included) 100× the rest,
    and a large per-token mean; the statistics must not cancel."""
    L, D = 4097, 5120
    x = strided_rows(2, L, D, torch.float32, seed=31, offset=20)
    x[..., [0, 7, 1000]] *= 100
    shift, scale = modulation(D, seed=32)
    q, s = norm.adaln_fp8(x, shift, scale)
    q_ref, s_ref = norm.adaln_fp8_ref(x, shift, scale)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=0)
    assert_within_principle(q.float() * s, adaln64(x, shift, scale), q_ref.float() * s_ref)


def test_adaln_fp8_constant_row_keeps_a_finite_scale():
    """x constant per row: LN(x) = 0, so h = shift; with shift = 0 the row is all zeros."""
    x = torch.full((1, 3, 1536), 2.5, device=DEV)
    zero = torch.zeros(1, 1536, device=DEV)
    q, s = nan_like((1, 3, 1536), torch.float8_e4m3fn), nan_like((1, 3, 1), torch.float32)
    C.adaln_fp8(q, s, x, zero, zero, EPS)
    assert q.float().eq(0).all() and torch.isfinite(s).all() and s.gt(0).all()
    torch.testing.assert_close(s, norm.adaln_fp8_ref(x, zero, zero)[1], rtol=0, atol=0)


@pytest.mark.parametrize("D", DIMS)  # 5120: the kernel specialised for that width
def test_adaln_fp8_nan_in_a_channel_reaches_the_scale(D):
    """A NaN in one channel's shift makes that batch row's h NaN in one channel only: amax,
    and with it the scale and every code, must be NaN (torch.amax propagates NaN; a plain
    fmax would drop it and quantize the row with a finite scale). The other batch row is
    untouched."""
    L = 33
    x = strided_rows(2, L, D, torch.float32, seed=41, offset=5)
    shift, scale = modulation(D, seed=42)
    shift = shift.clone()
    shift[1, D // 3] = float("nan")
    q, s = nan_like((2, L, D), torch.float8_e4m3fn), nan_like((2, L, 1), torch.float32)
    C.adaln_fp8(q, s, x, shift, scale, EPS)
    q_ref, s_ref = norm.adaln_fp8_ref(x, shift, scale)
    assert s_ref[1].isnan().all() and s[1].isnan().all()
    assert q[1].float().isnan().all()
    torch.testing.assert_close(s[0], s_ref[0], rtol=1e-5, atol=0)
    assert (q[0].view(torch.uint8) != q_ref[0].view(torch.uint8)).float().mean() < 1e-3


# ---------------------------------------------------------------------------------------
# through the lx2v custom ops (the path the model takes)


def test_lx2v_ops_run_the_csrc_kernels():
    """The lx2v ops' CUDA implementations call lx2v_C: the same bits as a direct call."""
    L, D, N = 4097, 1536, 12
    x = strided_rows(2, L, D, torch.float32, seed=5, offset=5)
    shift, scale = modulation(D, seed=6)
    q8, s8 = torch.ops.lx2v.adaln_fp8(x, shift, scale, EPS)
    q8_c, s8_c = torch.empty_like(q8), torch.empty_like(s8)
    C.adaln_fp8(q8_c, s8_c, x, shift, scale, EPS)
    assert torch.equal(q8.view(torch.uint8), q8_c.view(torch.uint8)) and torch.equal(s8, s8_c)

    h = q8.float().bfloat16()  # bf16 activations
    w = torch.randn(D, generator=gen(7), device=DEV)
    out = torch.ops.lx2v.rms_norm(h, w, EPS)
    out_c = torch.empty_like(out)
    C.rms_norm(out_c, h, w, EPS)
    assert torch.equal(out, out_c)

    cos, sin, _ = angles(L, seed=8)
    qo, ko = rope.qk_norm_rope(h, h * 2, w, w, cos[:, None], sin[:, None], N)  # [L, 1, Dh/2]
    qo_c, ko_c = torch.empty_like(qo), torch.empty_like(ko)
    C.qk_norm_rope(qo_c, ko_c, h, h * 2, w, w, cos, sin, EPS)
    assert torch.equal(qo, qo_c) and torch.equal(ko, ko_c)


def test_misaligned_and_strided_inputs_are_copied_by_the_wrapper():
    L, D = 33, 1536
    flat = torch.randn(2 * L * D + 1, generator=gen(9), device=DEV).bfloat16()
    x = flat[1:].view(2, L, D)  # starts 2 bytes past an aligned address
    assert x.data_ptr() % 16
    w = torch.randn(D, generator=gen(10), device=DEV)
    out = rope.rms_norm(x, w)
    assert_within_principle(out, rms64(x, w), rope.rms_norm_ref(x, w))
    xt = torch.randn(D, 2, L, generator=gen(11), device=DEV).permute(1, 2, 0)  # last stride 2L
    shift, scale = modulation(D, seed=12)
    q8, s8 = norm.adaln_fp8(xt, shift[:, None], scale[:1])  # [B, 1, D] and [1, D] modulation
    q8_ref, s8_ref = norm.adaln_fp8_ref(xt, shift, scale[:1].expand(2, D))
    torch.testing.assert_close(s8, s8_ref, rtol=1e-5, atol=0)


def test_shapes_the_kernels_refuse_fall_back_to_triton(caplog, monkeypatch):
    """D = 1540 (not a multiple of 8 bf16) and head dim 132: logged once, still correct."""
    monkeypatch.setattr(dispatch, "_shape_fallbacks_logged", set())
    L, D = 7, 1540
    x = (torch.randn(2, L, D, generator=gen(13), device=DEV) * 3).bfloat16()
    w = torch.randn(D, generator=gen(14), device=DEV)
    with caplog.at_level(logging.WARNING, logger="lightx2v.ops.dispatch"):
        out = rope.rms_norm(x, w)
    assert_within_principle(out, rms64(x, w), rope.rms_norm_ref(x, w))
    assert "lx2v_C.rms_norm does not take D=1540" in caplog.text
    D, dh = 1584, 132  # 12 heads of 132: chunks of 8 bf16 would straddle heads
    q = (torch.randn(2, L, D, generator=gen(15), device=DEV) * 3).bfloat16()
    w = torch.randn(D, generator=gen(16), device=DEV)
    ang = torch.rand(L, dh // 2, generator=gen(17), device=DEV, dtype=torch.float64) * 100
    qo, _ = rope.qk_norm_rope(q, q, w, w, ang.cos().float(), ang.sin().float(), D // dh)
    ref = rope.rope_fp32(rope.rms_norm_fp32(q, w, EPS), ang.cos().float(), ang.sin().float())
    assert_within_principle(qo, rms_rope64(q, w, ang), ref.bfloat16())


# ---------------------------------------------------------------------------------------
# schemas, checks, compile


def op_cases():
    L, D = 7, 1536
    x = strided_rows(2, L, D, torch.bfloat16, seed=18)
    x32 = strided_rows(2, L, D, torch.float32, seed=19, offset=5)
    w = torch.randn(D, device=DEV)
    cos, sin, _ = angles(L)
    shift, scale = modulation(D)
    n = D // HEAD_DIM
    return {
        "rms_norm": (C.rms_norm.default, (torch.empty(2, L, D, device=DEV).bfloat16(), x, w, EPS)),
        "qk_norm_rope": (
            C.qk_norm_rope.default,
            (torch.empty(2, L, n, HEAD_DIM, device=DEV).bfloat16(),
             torch.empty(2, L, n, HEAD_DIM, device=DEV).bfloat16(), x, x * 2, w, w, cos, sin, EPS),
        ),
        "adaln_fp8": (
            C.adaln_fp8.default,
            (torch.empty(2, L, D, device=DEV).to(torch.float8_e4m3fn),
             torch.empty(2, L, 1, device=DEV), x32, shift, scale, EPS),
        ),
        "affine_layer_norm_fp8": (  # the same kernel with the norm's weight and bias
            C.adaln_fp8.default,
            (torch.empty(2, L, D, device=DEV).to(torch.float8_e4m3fn),
             torch.empty(2, L, 1, device=DEV), x32, w[None].expand(2, D),
             (w * 0.1)[None].expand(2, D), EPS, True),
        ),
    }  # fmt: skip


@pytest.mark.parametrize("name", dispatch.CUDA_OPS)
def test_opcheck(name):
    op, args = op_cases()[name]
    utils = ["test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"]  # fmt: skip
    if name in ("adaln_fp8", "affine_layer_norm_fp8"):
        # test_schema compares each written argument before and after with allclose, which
        # has no float8 kernel; the marks themselves are checked by the next test.
        utils.remove("test_schema")
    torch.library.opcheck(op, args, test_utils=utils)


def test_schemas_mark_exactly_the_outputs_as_written():
    written = {"rms_norm": {"out"}, "qk_norm_rope": {"q_out", "k_out"},
               "adaln_fp8": {"out", "out_scale"}, "fp8_gemm": {"out"}, "fp8_gemm_gelu": {"out"},
               "fp8_gemm_residual": {"res"}}  # fmt: skip
    for name, outs in written.items():
        schema = getattr(C, name).default._schema
        marked = {a.name for a in schema.arguments if a.alias_info and a.alias_info.is_write}
        assert marked == outs, (name, marked)
        assert not schema.returns, name


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(1, 4, 64, device=DEV).bfloat16()
    w = torch.randn(64, device=DEV)
    out = torch.empty_like(x)
    with pytest.raises(RuntimeError, match="out must be BFloat16"):
        C.rms_norm(out.float(), x, w, EPS)
    with pytest.raises(RuntimeError, match="unit last stride"):
        C.rms_norm(out, x.transpose(1, 2).contiguous().transpose(1, 2)[:, :, :64], w, EPS)
    with pytest.raises(RuntimeError, match="16-byte boundaries"):
        C.rms_norm(out[:, :, :60], x[:, :, 2:62], w[:60], EPS)
    with pytest.raises(RuntimeError, match="multiple of 8"):  # aligned rows, D = 60
        C.rms_norm(torch.empty(1, 4, 60, device=DEV).bfloat16(), x[:, :, :60], w[:60], EPS)
    with pytest.raises(RuntimeError, match="weight must be float32"):
        C.rms_norm(out, x, w.bfloat16(), EPS)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        C.rms_norm(out.double(), x.double(), w, EPS)


def test_compiled_fullgraph_equals_eager():
    """The out-variant ops functionalize under torch.compile: same kernels, same bits."""
    L, D, N = 4097, 1536, 12
    x = strided_rows(2, L, D, torch.bfloat16, seed=20, scale=3)
    x32 = strided_rows(2, L, D, torch.float32, seed=21, offset=5)
    w = torch.randn(D, generator=gen(22), device=DEV)
    cos, sin, _ = angles(L, seed=23)
    shift, scale = modulation(D, seed=24)

    def f(x, x32, w, cos, sin, shift, scale):
        h = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        C.rms_norm(h, x, w, EPS)
        qo = torch.empty((2, L, N, D // N), dtype=x.dtype, device=x.device)
        ko = torch.empty_like(qo)
        C.qk_norm_rope(qo, ko, h, x, w, w, cos, sin, EPS)
        q8 = torch.empty(x32.shape, dtype=torch.float8_e4m3fn, device=x.device)
        s8 = torch.empty((2, L, 1), dtype=torch.float32, device=x.device)
        C.adaln_fp8(q8, s8, x32 + 1, shift, scale, EPS)
        return h, qo, ko, q8, s8

    args = (x, x32, w, cos, sin, shift, scale)
    eager = f(*args)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)(*args)
    for a, b in zip(eager, compiled, strict=True):
        assert torch.equal(bits(a), bits(b))


def test_compiled_through_lx2v_ops_when_not_deferred(monkeypatch):
    """With compile_deferred emptied the lx2v ops stay opaque in the graph and run csrc."""
    monkeypatch.setattr(dispatch, "compile_deferred", set())
    L, D, N = 4097, 1536, 12
    x = strided_rows(2, L, D, torch.float32, seed=25, offset=5)
    shift, scale = modulation(D, seed=26)
    w = torch.randn(D, generator=gen(27), device=DEV)
    cos, sin, _ = angles(L, seed=28)

    def f(x):
        q8, s8 = norm.adaln_fp8(x, shift, scale)
        h = rope.rms_norm(q8.float().bfloat16(), w)
        return q8, s8, *rope.qk_norm_rope(h, h, w, w, cos, sin, N)

    eager = f(x)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)(x)
    for a, b in zip(eager, compiled, strict=True):
        assert torch.equal(bits(a), bits(b))


def test_report_names_the_csrc_ops():
    report = dispatch.kernel_report()
    assert report["backend"] == "cuda" and report["csrc"].startswith("lightx2v._C built for")
    assert {op for op, b in report["ops"].items() if b == "cuda"} == set(dispatch.CUDA_OPS)
    major, minor = torch.cuda.get_device_capability()
    assert f"{major}." in csrc.compiled_arches()
