"""Fused ops on the CPU: references against hand math, dispatch rules, custom-op checks,
compile, and the Triton kernels themselves run by Triton's interpreter on CPU tensors.

Tolerance principle (DESIGN.md): an implementation may err at most ~2x what PyTorch itself
errs at the same output dtype against a float64 reference, measured as relative L2
(`assert_within_principle`). The floor for fp32 outputs is a few fp32 roundings (1e-6).
"""

import importlib.util
import logging
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lightx2v.config import WanArch
from lightx2v.errors import LX2VError
from lightx2v.models.wan.dit import RMSNorm, WanBlock, WanDiT, rope_angles
from lightx2v.ops import dispatch, norm, residual, rope
from lightx2v.ops.attention import attention

EPS = 1e-6
TOKENS = [1, 7, 33]
DIMS = [64, 96]  # 96 is not a power of two: masked lanes in the kernels
HEAD_DIM = 16


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-300)).item()


def assert_within_principle(out, ref64, torch_out, factor=2.0, floor=1e-6):
    assert not out.isnan().any(), "NaN in output"
    err, base = rel_l2(out, ref64), rel_l2(torch_out, ref64)
    assert err <= factor * base + floor, f"rel-L2 {err:.3e} > {factor} x PyTorch's {base:.3e}"


def randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def inputs(L, D, B=2, seed=0):
    """Residual stream with a per-token offset and spread (LN must remove both)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, D, generator=g) * (1 + 3 * torch.rand(B, L, 1, generator=g))
    x = x + torch.randn(B, L, 1, generator=g) * 5
    shift = torch.randn(B, D, generator=g) * 0.5
    scale = torch.randn(B, D, generator=g) * 0.5
    return x, shift, scale


def tables(L, dh, seed=0):
    g = torch.Generator().manual_seed(seed)
    ang = torch.rand(L, dh // 2, generator=g, dtype=torch.float64) * 100
    return ang.cos().float(), ang.sin().float(), ang


# ---------------------------------------------------------------------------------------
# hand math in float64


def ln64(x):
    x = x.double()
    mu = x.sum(-1, keepdim=True) / x.shape[-1]
    var = ((x - mu) ** 2).sum(-1, keepdim=True) / x.shape[-1]
    return (x - mu) / torch.sqrt(var + EPS)


def adaln64(x, shift, scale):
    return ln64(x) * (1 + scale.double()[:, None]) + shift.double()[:, None]


def rms_rope64(x, w, ang):
    """RMSNorm then rotation as complex multiplication by e^{i·angle}."""
    xd = x.double()
    h = xd / torch.sqrt((xd**2).mean(-1, keepdim=True) + EPS) * w.double()
    B, L, D = h.shape
    half = ang.shape[-1]
    z = torch.view_as_complex(h.reshape(B, L, D // (2 * half), half, 2).contiguous())
    z = z * torch.polar(torch.ones_like(ang), ang)[None, :, None]
    return torch.view_as_real(z).reshape(B, L, D // (2 * half), 2 * half)


# ---------------------------------------------------------------------------------------
# references against hand math


@pytest.mark.parametrize("L", TOKENS)
@pytest.mark.parametrize("D", DIMS)
def test_adaln_ref(L, D):
    x, shift, scale = inputs(L, D)
    ref64 = adaln64(x, shift, scale)
    assert rel_l2(norm.adaln_fp32(x, shift, scale, EPS), ref64) < 1e-6
    out = norm.adaln_ref(x, shift, scale)
    assert out.dtype == torch.bfloat16
    assert rel_l2(out, ref64) < 2**-8  # bf16 rounding: relative error ≤ 2^-9 per element


def test_adaln_fp8_ref_quantizes_per_token():
    x, shift, scale = inputs(33, 96)
    q, s = norm.adaln_fp8_ref(x, shift, scale)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (2, 33, 1) and s.dtype == torch.float32
    h = adaln64(x, shift, scale)
    torch.testing.assert_close(s.double(), h.abs().amax(-1, keepdim=True) / 448, rtol=1e-6, atol=0)
    assert q.float().abs().amax(-1).eq(448).all()  # each row's largest value maps to 448
    # e4m3 has 3 mantissa bits: round-to-nearest errs ≤ 2^-4 relative (normal range).
    assert rel_l2(q.double() * s.double(), h) < 2**-4


def test_fp8_zero_row_stays_finite():
    q, s = norm.quantize_fp8_per_token(torch.zeros(1, 2, 8))
    assert torch.isfinite(s).all() and q.float().eq(0).all()


def test_affine_layer_norm_ref():
    x, _, _ = inputs(7, 64)
    w, b = randn(64, seed=1), randn(64, seed=2)
    ref64 = ln64(x) * w.double() + b.double()
    assert rel_l2(norm.affine_layer_norm_ref(x, w, b, out_dtype=torch.float32), ref64) < 1e-6
    assert rel_l2(norm.affine_layer_norm_ref(x, w, b), ref64) < 2**-8


@pytest.mark.parametrize("D", DIMS)
def test_affine_layer_norm_fp8_ref_quantizes_per_token(D):
    x, _, _ = inputs(33, D)
    w, b = randn(D, seed=1), randn(D, seed=2)
    q, s = norm.affine_layer_norm_fp8_ref(x, w, b)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == (2, 33, 1)
    # the definition: the fp32 affine LN (affine_layer_norm's) quantized like adaln_fp8
    q2, s2 = norm.quantize_fp8_per_token(norm.affine_layer_norm_fp32(x, w, b, EPS))
    assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s, s2)
    h = ln64(x) * w.double() + b.double()
    torch.testing.assert_close(s.double(), h.abs().amax(-1, keepdim=True) / 448, rtol=1e-6, atol=0)
    assert q.float().abs().amax(-1).eq(448).all()
    # e4m3 round-to-nearest errs ≤ 2^-4 relative (normal range), as for adaln_fp8
    deq = q.double() * s.double()
    assert rel_l2(deq, h) < 2**-4
    assert rel_l2(deq, norm.affine_layer_norm_ref(x, w, b, out_dtype=torch.float32)) < 2**-4


def test_fp8_ops_fake_kernels_give_the_shapes():
    """On the meta device the custom ops run their fake kernels: q like x, s [B, L, 1]."""
    x = torch.empty(2, 7, 64, device="meta")
    w = torch.empty(64, device="meta")
    for q, s in (
        torch.ops.lx2v.affine_layer_norm_fp8(x, w, w, EPS),
        torch.ops.lx2v.adaln_fp8(x, x[:, 0], x[:, 0], EPS),
    ):
        assert q.shape == (2, 7, 64) and q.dtype == torch.float8_e4m3fn and q.is_meta
        assert s.shape == (2, 7, 1) and s.dtype == torch.float32


@pytest.mark.parametrize("D", DIMS)
def test_qk_norm_rope_ref(D):
    L = 7
    q, k = randn(2, L, D, seed=1) * 3, randn(2, L, D, seed=2)
    wq, wk = randn(D, seed=3), randn(D, seed=4)
    cos, sin, ang = tables(L, HEAD_DIM)
    qo, ko = rope.qk_norm_rope_ref(q, k, wq, wk, cos, sin, D // HEAD_DIM, EPS)
    assert qo.shape == (2, L, D // HEAD_DIM, HEAD_DIM)
    torch.testing.assert_close(qo.double(), rms_rope64(q, wq, ang), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ko.double(), rms_rope64(k, wk, ang), rtol=1e-5, atol=1e-5)


def test_qk_norm_rope_matches_model_path():
    """Against the unfused PyTorch path (RMSNorm → bf16 → RoPE → bf16), with real tables."""
    arch = WanArch("t2v", dim=96, ffn_dim=32, num_heads=3, num_layers=1)  # Dh = 32: 6/5/5 pairs
    grid = (2, 3, 4)
    cos, sin = WanDiT(arch).rope(grid, torch.device("cpu"))  # [L, 1, Dh/2]
    L = cos.shape[0]
    q = randn(2, L, 96, dtype=torch.bfloat16, seed=5)
    norm_q = RMSNorm(96, EPS)
    norm_q.weight.data = randn(96, seed=6)
    qo, _ = rope.qk_norm_rope(q, q, norm_q.weight, norm_q.weight, cos, sin, 3)
    model = rope_unfused(norm_q(q).unflatten(-1, (3, -1)), cos, sin)
    ang = torch.atan2(sin[:, 0].double(), cos[:, 0].double())
    ref64 = rms_rope64(q, norm_q.weight, ang)
    assert_within_principle(qo, ref64, model)


def test_gated_residual_ref_in_place():
    x, gate, _ = inputs(7, 64)
    y = randn(2, 7, 64, dtype=torch.bfloat16, seed=3)
    expect = x.double() + y.double() * gate.double()[:, None]
    ptr = x.data_ptr()
    out = residual.residual_add_(x, y, gate)
    assert out is x and x.data_ptr() == ptr
    assert rel_l2(x, expect) < 1e-6
    x2 = x.clone()
    residual.residual_add_(x2, y)
    torch.testing.assert_close(x2, x + y.float())


def test_wrappers_validate_shapes():
    x, shift, scale = inputs(7, 64)
    with pytest.raises(ValueError):
        norm.adaln(x, shift[:, :32], scale)
    with pytest.raises(ValueError):
        norm.adaln(x[0], shift, scale)
    with pytest.raises(ValueError):
        rope.qk_norm_rope(x, x, shift[0], shift[0], *tables(7, 16)[:2], num_heads=3)
    with pytest.raises(ValueError):
        residual.residual_add_(x.bfloat16(), x, shift)
    for fn in (norm.affine_layer_norm, norm.affine_layer_norm_fp8):
        with pytest.raises(ValueError, match="do not fit"):
            fn(x, shift[0], shift[0, :32])
        with pytest.raises(ValueError):
            fn(x[0], shift[0], shift[0])


def test_modulation_shapes_broadcast():
    x, shift, scale = inputs(7, 64)
    a = norm.adaln(x, shift[:, None], scale[:, None])
    torch.testing.assert_close(a, norm.adaln(x, shift, scale))
    one = norm.adaln(x, shift[:1], scale[:1])
    torch.testing.assert_close(one[1], norm.adaln(x[1:], shift[:1], scale[:1])[0])


# ---------------------------------------------------------------------------------------
# dispatch


def test_cpu_dispatch_is_reference_and_reported():
    report = dispatch.kernel_report()
    assert set(report) >= {"backend", "requested", "reason", "triton", "cuda_device", "ops"}
    assert set(report["ops"]) == set(dispatch.FUSED_OPS)
    if not torch.cuda.is_available():
        assert dispatch.kernel_backend() == "ref" and report["reason"] == "no CUDA device"
        assert not dispatch.use_kernels(torch.zeros(1), "adaln")


def test_requested_missing_backend_is_an_error():
    with pytest.raises(LX2VError):
        dispatch.set_kernel_backend("cutlass")
    if not torch.cuda.is_available():
        with pytest.raises(LX2VError, match="triton"):
            dispatch.set_kernel_backend("triton")
    assert dispatch.kernel_backend() in dispatch.BACKENDS  # a failed request changes nothing


def test_auto_fallback_logs_once(caplog):
    """One log line for the fallback (debug level on a CPU-only machine), not one per call."""
    if torch.cuda.is_available():
        pytest.skip("falls back only without CUDA")
    with caplog.at_level(logging.DEBUG, logger="lightx2v.ops.dispatch"):
        assert dispatch.set_kernel_backend("auto") == "ref"
        x, shift, scale = inputs(7, 64)
        for _ in range(3):
            norm.adaln(x, shift, scale)
    assert len(caplog.records) == 1 and "PyTorch reference" in caplog.records[0].getMessage()


def _first_op_under_env(backend: str, module: str, call: str) -> str:
    """stdout of a fresh interpreter with LX2V_KERNELS=backend that runs one fused op and
    prints the LX2VError it raises (import itself must not fail)."""
    code = (
        "import torch\n"
        f"from lightx2v.ops import {module}, dispatch\n"
        "from lightx2v.errors import LX2VError\n"
        "assert dispatch.kernel_report()['backend'] == 'missing'\n"
        "x = torch.randn(1, 3, 8)\n"
        "try:\n"
        f"    {call}\n"
        "except LX2VError as e:\n"
        "    print('LX2VError', e)\n"
    )
    env = {**os.environ, "LX2V_KERNELS": backend}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_env_request_for_missing_backend_fails_at_first_op():
    if torch.cuda.is_available():
        pytest.skip("triton may be present on a CUDA machine")
    out = _first_op_under_env("triton", "norm", "norm.adaln(x, x[:, 0], x[:, 0])")
    assert "LX2VError" in out and "no CUDA device" in out


def test_kernels_package_imports_from_source_tree():
    pkg = dispatch.kernels_package()
    assert pkg.__name__ == "lightx2v.kernels"
    if importlib.util.find_spec("triton") is not None:
        assert dispatch.kernel_module("norm").__name__ == "lightx2v.kernels.norm"


def test_cuda_backend_request_without_cuda_names_the_reason():
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    before = dispatch.kernel_report()
    with pytest.raises(LX2VError, match="'cuda' was requested but is unavailable: no CUDA device"):
        dispatch.set_kernel_backend("cuda")
    assert dispatch.kernel_report() == before  # a failed request changes nothing


def test_auto_without_cuda_is_reference_for_every_op():
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    assert dispatch.set_kernel_backend("auto") == "ref"
    assert {dispatch.op_backend(op) for op in dispatch.FUSED_OPS} == {"ref"}
    assert dispatch.op_backend("some_triton_only_op") == "ref"
    report = dispatch.kernel_report()
    assert report["csrc"] == "no CUDA device" and set(report["ops"].values()) == {"ref"}


def test_env_request_for_cuda_fails_at_first_op():
    if torch.cuda.is_available():
        pytest.skip("the CUDA ops may be built on a CUDA machine")
    out = _first_op_under_env("cuda", "rope", "rope.rms_norm(x, x[0, 0])")
    assert "LX2VError" in out and "'cuda'" in out and "no CUDA device" in out


@pytest.fixture
def fake_kernel_backends(monkeypatch):
    """Pretend csrc and Triton are available (or not) to test the per-op choice on a CPU.

    Yields set_available(cuda=..., triton=...); the real dispatch state comes back after.
    """
    saved, logged = dict(vars(dispatch._state)), set(dispatch._shape_fallbacks_logged)

    def set_available(cuda: bool, triton: bool) -> None:
        monkeypatch.setattr(dispatch, "_cuda_status", lambda: (cuda, "csrc status"))
        monkeypatch.setattr(dispatch, "_triton_status", lambda: (triton, "triton status"))

    yield set_available
    vars(dispatch._state).clear()
    vars(dispatch._state).update(saved)
    dispatch._shape_fallbacks_logged.clear()
    dispatch._shape_fallbacks_logged.update(logged)


def test_cuda_backend_covers_its_ops_and_triton_the_rest(fake_kernel_backends):
    fake_kernel_backends(cuda=True, triton=True)
    assert dispatch.set_kernel_backend("auto") == "cuda"
    for op in dispatch.FUSED_OPS:
        assert dispatch.op_backend(op) == ("cuda" if op in dispatch.CUDA_OPS else "triton"), op
    assert dispatch.op_backend("some_triton_only_op") == "triton"
    report = dispatch.kernel_report()
    assert report["ops"] == {op: dispatch.op_backend(op) for op in dispatch.FUSED_OPS}
    # `lx2v info` prints the reason: it names each backend's ops
    cuda_part, triton_part = report["reason"].split("; ")
    assert cuda_part == (
        "cuda for adaln_fp8, affine_layer_norm_fp8, rms_norm, qk_norm_rope — csrc status"
    )
    assert triton_part == ("triton for adaln, affine_layer_norm, gated_residual_ — triton status")
    assert dispatch.set_kernel_backend("cuda") == "cuda"
    assert dispatch.set_kernel_backend("triton") == "triton"
    assert {dispatch.op_backend(op) for op in dispatch.FUSED_OPS} == {"triton"}
    assert dispatch.set_kernel_backend("ref") == "ref"
    assert {dispatch.op_backend(op) for op in dispatch.FUSED_OPS} == {"ref"}


def test_auto_without_csrc_logs_one_line_and_uses_triton(fake_kernel_backends, caplog):
    fake_kernel_backends(cuda=False, triton=True)
    with caplog.at_level(logging.DEBUG, logger="lightx2v.ops.dispatch"):
        assert dispatch.set_kernel_backend("auto") == "triton"
    assert {dispatch.op_backend(op) for op in dispatch.FUSED_OPS} == {"triton"}
    assert len(caplog.records) == 1 and "csrc status" in caplog.records[0].getMessage()
    with pytest.raises(LX2VError, match="'cuda' was requested but is unavailable: csrc status"):
        dispatch.set_kernel_backend("cuda")


def test_cuda_without_triton_leaves_the_other_ops_on_the_reference(fake_kernel_backends):
    fake_kernel_backends(cuda=True, triton=False)
    assert dispatch.set_kernel_backend("cuda") == "cuda"
    for op in dispatch.FUSED_OPS:
        assert dispatch.op_backend(op) == ("cuda" if op in dispatch.CUDA_OPS else "ref"), op


def test_shape_the_csrc_kernel_refuses_falls_back_once(fake_kernel_backends, monkeypatch, caplog):
    """cuda_impl asks lightx2v.ops._cuda whether the kernel takes the input (a fake here)."""
    fake_kernel_backends(cuda=True, triton=True)
    dispatch.set_kernel_backend("auto")

    class FakeCsrc:
        @staticmethod
        def unsupported(op, x, **shape):
            return None if x.shape[-1] % 8 == 0 else f"D={x.shape[-1]}"

    monkeypatch.setattr(dispatch, "csrc", lambda: FakeCsrc)
    assert dispatch.cuda_impl("rms_norm", torch.zeros(1, 2, 64)) == "cuda"
    with caplog.at_level(logging.WARNING, logger="lightx2v.ops.dispatch"):
        for _ in range(3):
            assert dispatch.cuda_impl("rms_norm", torch.zeros(1, 2, 60)) == "triton"
    assert len(caplog.records) == 1 and "lx2v_C.rms_norm does not take D=60" in caplog.text
    assert dispatch.cuda_impl("adaln", torch.zeros(1, 2, 60)) == "triton"  # no csrc kernel


# ---------------------------------------------------------------------------------------
# custom ops: schemas, fake kernels, compile


def op_cases():
    x, shift, scale = inputs(7, 64)
    xb = x.bfloat16()
    w, b = randn(64, seed=1), randn(64, seed=2)
    cos, sin, _ = tables(7, HEAD_DIM)
    return {
        "adaln": (torch.ops.lx2v.adaln, (x, shift, scale, EPS, torch.bfloat16)),
        "adaln_fp8": (torch.ops.lx2v.adaln_fp8, (x, shift, scale, EPS)),
        "affine_layer_norm": (torch.ops.lx2v.affine_layer_norm, (x, w, b, EPS, torch.bfloat16)),
        "affine_layer_norm_fp8": (torch.ops.lx2v.affine_layer_norm_fp8, (x, w, b, EPS)),
        "rms_norm": (torch.ops.lx2v.rms_norm, (xb, w, EPS)),
        "qk_norm_rope": (
            torch.ops.lx2v.qk_norm_rope, (xb, xb * 2, w, b, cos, sin, 64 // HEAD_DIM, EPS)
        ),
        "gated_residual_": (torch.ops.lx2v.gated_residual_, (x.clone(), xb, shift)),
    }  # fmt: skip


@pytest.mark.parametrize("name", dispatch.FUSED_OPS)
def test_opcheck(name):
    op, args = op_cases()[name]
    torch.library.opcheck(op, args)


def test_residual_schema_marks_the_write():
    (arg_x, arg_y, arg_gate) = torch.ops.lx2v.gated_residual_.default._schema.arguments
    assert arg_x.alias_info is not None and arg_x.alias_info.is_write
    assert arg_y.alias_info is None and arg_gate.alias_info is None
    for name in dispatch.FUSED_OPS:
        if name == "gated_residual_":
            continue
        schema = getattr(torch.ops.lx2v, name).default._schema
        assert all(a.alias_info is None for a in schema.arguments), name


def block_through_ops(x, e, cos, sin, wq, wk, w3, b3):
    """A block-shaped chain of every custom op (called directly, so CPU traces the ops)."""
    shift, scale, gate = e.unbind(1)
    h = torch.ops.lx2v.adaln(x, shift, scale, EPS, torch.bfloat16)
    q, k = torch.ops.lx2v.qk_norm_rope(h, h * 2, wq, wk, cos, sin, 4, EPS)
    x = x.clone()
    torch.ops.lx2v.gated_residual_(x, (q + k).flatten(2), gate)
    h = torch.ops.lx2v.affine_layer_norm(x, w3, b3, EPS, torch.bfloat16)
    x = x + torch.ops.lx2v.rms_norm(h, wq, EPS).float()
    q8, s8 = torch.ops.lx2v.adaln_fp8(x, shift, scale, EPS)
    q3, s3 = torch.ops.lx2v.affine_layer_norm_fp8(x, w3, b3, EPS)
    return x, q8.float() * s8, q3.float() * s3


def block_through_wrappers(x, e, cos, sin, wq, wk, w3, b3):
    shift, scale, gate = e.unbind(1)
    h = norm.adaln(x, shift, scale)
    q, k = rope.qk_norm_rope(h, h * 2, wq, wk, cos, sin, 4)
    residual.residual_add_(x, (q + k).flatten(2), gate)  # mutates the input, as the block will
    h = norm.affine_layer_norm(x, w3, b3)
    x = x + rope.rms_norm(h, wq).float()
    q8, s8 = norm.adaln_fp8(x, shift, scale)
    q3, s3 = norm.affine_layer_norm_fp8(x, w3, b3)
    return x, q8.float() * s8, q3.float() * s3


def block_args():
    x, shift, _ = inputs(7, 64)
    e = randn(2, 3, 64, seed=4) * 0.5
    cos, sin, _ = tables(7, HEAD_DIM)
    return x, e, cos, sin, randn(64, seed=1), randn(64, seed=2), randn(64, seed=5), randn(64)


@pytest.mark.parametrize("fn", [block_through_ops, block_through_wrappers])
def test_compiled_fullgraph_equals_eager(fn):
    torch._dynamo.reset()
    args = block_args()
    eager_args = [a.clone() for a in args]
    eager = fn(*eager_args)
    compiled_args = [a.clone() for a in args]
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(*compiled_args)
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(compiled_args[0], eager_args[0])  # the in-place write, too


# ---------------------------------------------------------------------------------------
# the drop-in for WanBlock.forward (what dit.py will call), against the block itself


def rope_unfused(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as plain PyTorch: interleaved pairs as complex numbers, fp32, rounded back."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * torch.complex(cos, sin)).flatten(-2).to(x.dtype)


def unfused_block_forward(blk, x, e, cos, sin, cross_kv):
    """WanBlock.forward as plain PyTorch ops (the math before fusion); x is not modified."""
    D = x.shape[-1]
    dt = cross_kv[1].dtype
    mod = (blk.modulation.float() + e)[:, :, None]
    shift1, scale1, gate1, shift2, scale2, gate2 = mod.unbind(1)
    sa = blk.self_attn
    heads = (sa.num_heads, -1)
    h = torch.addcmul(shift1, F.layer_norm(x.float(), (D,), eps=blk.eps), 1 + scale1).to(dt)
    q, k, v = sa.project_qkv(h)
    q = rope_unfused(sa.norm_q(q).unflatten(-1, heads), cos, sin)
    k = rope_unfused(sa.norm_k(k).unflatten(-1, heads), cos, sin)
    y = sa.o(attention(q, k, v.unflatten(-1, heads)).flatten(2))
    x = torch.addcmul(x, y, gate1)
    w3, b3 = blk.norm3.weight.float(), blk.norm3.bias.float()
    h = F.layer_norm(x, (D,), w3, b3, blk.eps).to(dt)
    x = x + blk.cross_attn(h, cross_kv)
    h = torch.addcmul(shift2, F.layer_norm(x, (D,), eps=blk.eps), 1 + scale2).to(dt)
    return torch.addcmul(x, blk.ffn(h), gate2)


def random_block(arch: WanArch, dtype, device="cpu", seed=0):
    torch.manual_seed(seed)
    blk = WanBlock(arch)
    with torch.no_grad():
        for name, p in blk.named_parameters():
            if "norm" in name or "modulation" in name:  # ones/zeros by default: make them count
                p.copy_(torch.randn_like(p) * 0.3 + (name.endswith("weight")))
    blk = blk.to(device=device, dtype=dtype)
    for m in blk.modules():
        if isinstance(m, (torch.nn.LayerNorm, RMSNorm)):
            m.float()
    blk.modulation.data = blk.modulation.data.float()
    return blk.eval()


def block_inputs(arch, blk, grid, dtype, device="cpu", seed=1):
    """(x, e, cos, sin, cross_kv): the arguments of WanBlock.forward."""
    g = torch.Generator(device).manual_seed(seed)
    L = grid[0] * grid[1] * grid[2]
    x = torch.randn(2, L, arch.dim, generator=g, device=device)
    e = torch.randn(2, 6, arch.dim, generator=g, device=device) * 0.3
    ctx = torch.randn(2, 16, arch.dim, generator=g, device=device).to(dtype)
    ctx_img = torch.randn(2, 9, arch.dim, generator=g, device=device).to(dtype)
    ang = rope_angles(arch, grid, torch.device(device))[:, None]  # as WanDiT.rope builds them
    with torch.no_grad():
        kv = blk.cross_attn.kv(ctx, ctx_img if arch.is_i2v else None)
    return x, e, ang.cos().float(), ang.sin().float(), kv


@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_fused_block_equals_block(task):
    arch = WanArch(task, dim=96, ffn_dim=160, num_heads=3, num_layers=1)
    blk = random_block(arch, torch.float32)
    args = block_inputs(arch, blk, (2, 3, 4), torch.float32)
    with torch.no_grad():
        expect = unfused_block_forward(blk, *args)
        x_in = args[0].clone()
        got = blk(x_in, *args[1:])  # dit.py's block, through the fused ops
    assert got is x_in  # updated in place
    assert rel_l2(got, expect) < 1e-5


# ---------------------------------------------------------------------------------------
# the Triton kernels, run by Triton's interpreter on CPU tensors

# Triton decorates its own library functions (tl.sum, tl.max) when it is imported, so the
# interpreter must be switched on before that: these tests run in a child pytest with
# TRITON_INTERPRET=1, started by test_triton_kernels_under_interpreter.
triton_missing = importlib.util.find_spec("triton") is None
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def test_triton_kernels_under_interpreter():
    if triton_missing:
        pytest.skip("triton is not installed")
    if INTERPRETING:
        pytest.skip("this is the child run")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        __file__,
        # the attention pre-pass and the per-token FP8 quantisation kernel
        os.path.join(os.path.dirname(__file__), "test_attention.py"),
        os.path.join(os.path.dirname(__file__), "test_quant.py"),
        "-k",
        "interpreted",
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "skipped" not in out.stdout.splitlines()[-1]


@pytest.fixture
def interpreted(interpreting):
    """The kernel modules, their @triton.jit kernels interpreted on CPU tensors."""
    return {name: dispatch.kernel_module(name) for name in ("norm", "rope", "residual")}


def poisoned(shape, dtype):
    out = torch.empty(shape, dtype=torch.float32).fill_(float("nan"))
    return out.to(dtype)


# Triton 3.6's interpreter rounds fp32 → bf16 by truncation and loses the carry when fp32 →
# fp8 rounds up to a power of two (127.2 → 64), so here the kernels write fp32 and the
# checks cover their arithmetic; the bf16 and fp8 casts are checked on the GPU
# (tests/test_kernels_cuda.py). In fp32 PyTorch's own error is ~1e-7: the floor applies.


@pytest.mark.parametrize("L", TOKENS)
@pytest.mark.parametrize("D", DIMS)
def test_interpreted_adaln(interpreted, L, D):
    x, shift, scale = inputs(L, D + 7, seed=L + D)
    x = x[:, :, :D]  # a view with row stride D + 7
    shift = shift[:, :D].expand(2, D)
    out = poisoned((2, L, D), torch.float32)
    interpreted["norm"].layer_norm(x, out, EPS, shift=shift, scale=scale[:, :D])
    ref64 = adaln64(x, shift, scale[:, :D])
    assert_within_principle(out, ref64, norm.adaln_fp32(x, shift, scale[:, :D], EPS))


@pytest.mark.parametrize("D", DIMS)
def test_interpreted_adaln_fp8_scale(interpreted, D):
    x, shift, scale = inputs(33, D, seed=D)
    q, s = poisoned((2, 33, D), torch.float8_e4m3fn), torch.full((2, 33, 1), float("nan"))
    interpreted["norm"].layer_norm(x, q, EPS, shift=shift, scale=scale, out_scale=s)
    _, s_ref = norm.adaln_fp8_ref(x, shift, scale)
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
    assert not q.float().isnan().any()


@pytest.mark.parametrize("D", DIMS)
def test_interpreted_affine_layer_norm_fp8_scale(interpreted, D):
    x, _, _ = inputs(33, D, seed=D + 1)
    w, b = randn(D, seed=1), randn(D, seed=2)
    q, s = poisoned((2, 33, D), torch.float8_e4m3fn), torch.full((2, 33, 1), float("nan"))
    interpreted["norm"].layer_norm(x, q, EPS, weight=w, bias=b, out_scale=s)
    _, s_ref = norm.affine_layer_norm_fp8_ref(x, w, b)
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
    assert not q.float().isnan().any()


def test_interpreted_affine_layer_norm_noncontiguous(interpreted):
    x, _, _ = inputs(16, 64)
    x = x.transpose(0, 1)  # [16, 2, 64], batch stride 64, row stride 16·64
    w, b = randn(64, seed=1), randn(64, seed=2)
    out = poisoned(x.shape, torch.float32)
    interpreted["norm"].layer_norm(x, out, EPS, weight=w, bias=b)
    ref64 = ln64(x) * w.double() + b.double()
    torch_out = norm.affine_layer_norm_ref(x, w, b, out_dtype=torch.float32)
    assert_within_principle(out, ref64, torch_out)


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("L", TOKENS)
@pytest.mark.parametrize("D", DIMS)
def test_interpreted_qk_norm_rope(interpreted, per_head, L, D):
    qkv = randn(2, L, 3 * D, dtype=torch.bfloat16, seed=L) * 4
    q = qkv[..., :D]  # a slice of a fused qkv projection: row stride 3·D
    w = randn(D, seed=D)
    cos, sin, ang = tables(L, HEAD_DIM, seed=L)
    out = poisoned((2, L, D), torch.float32)
    interpreted["rope"].rms_norm_rope(q, out, w, EPS, cos=cos, sin=sin, per_head_table=per_head)
    ref64 = rms_rope64(q, w, ang).flatten(2)
    torch_out = rope.rope_fp32(rope.rms_norm_fp32(q, w, EPS), cos, sin).flatten(2)
    assert_within_principle(out, ref64, torch_out)


def test_interpreted_rms_norm(interpreted):
    x = randn(2, 7, 96, dtype=torch.bfloat16) * 3
    w = randn(96, seed=1)
    out = poisoned(x.shape, torch.float32)
    interpreted["rope"].rms_norm_rope(x, out, w, EPS)
    xd = x.double()
    ref64 = xd / torch.sqrt((xd**2).mean(-1, keepdim=True) + EPS) * w.double()
    assert_within_principle(out, ref64, rope.rms_norm_fp32(x, w, EPS))


@pytest.mark.parametrize("L", TOKENS)
@pytest.mark.parametrize("D", DIMS)
def test_interpreted_gated_residual(interpreted, L, D):
    x, gate, _ = inputs(L, D, seed=L)
    y = randn(2, L, D, dtype=torch.bfloat16, seed=D)
    ref64 = x.double() + y.double() * gate.double()[:, None]
    torch_out = x.clone()
    residual.gated_residual_ref_(torch_out, y, gate)
    interpreted["residual"].gated_residual_(x, y, gate, block=32)
    assert_within_principle(x, ref64, torch_out)


def test_stale_extension_is_reported_not_raised(monkeypatch):
    """A lightx2v._C built from an older checkout lacks an op whose fake kernel
    lightx2v.ops._cuda registers, and torch raises RuntimeError at that import: the status
    says to rebuild instead of the error escaping."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "lightx2v._C" else real_find_spec(name, *a),
    )

    def stale():
        raise RuntimeError("operator lx2v_C::fp8_gemm_residual does not exist")

    monkeypatch.setattr(dispatch, "csrc", stale)
    ok, why = dispatch._cuda_status()
    assert not ok and "older than this checkout" in why and "rebuild" in why
