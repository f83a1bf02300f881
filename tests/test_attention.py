"""CPU tests of attention: the reference, the backend registry, and the 8-bit kernel's
quantisation math simulated in PyTorch (`attention_8bit_sim`), against fp32 exact attention.

Tolerances: the gate of the issue (rel-L2 ≤ 3%, cosine ≥ 0.999) for the INT8-Q·Kᵀ / bf16-P·V
path; for FP8 P·V, FP8's own rounding of P and V (e4m3: 3 mantissa bits, ≈2.6% rms each on
random normal data) puts the error at ≈3.6%, so that path is held to 5% / 0.999 here.
"""

import math

import pytest
import torch

from lightx2v.errors import LX2VError
from lightx2v.ops import attention as A


def rnd(*shape, seed=0, scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * scale
    if offset:
        x = x + offset * torch.randn(shape[-1], generator=g)
    return x


def test_ref_matches_sdpa():
    q, k, v = rnd(2, 33, 3, 16, seed=1), rnd(2, 20, 3, 16, seed=2), rnd(2, 20, 3, 16, seed=3)
    ref = A.attention_ref(q.double(), k.double(), v.double())
    assert A.rel_l2(A.attention_sdpa(q, k, v), ref) < 1e-5


def test_k_smoothing_leaves_softmax_unchanged():
    q, k = rnd(1, 40, 2, 128, seed=4).double(), rnd(1, 50, 2, 128, seed=5, offset=20).double()
    s = torch.einsum("bqhd,bkhd->bhqk", q, k).softmax(-1)
    ks = k - k.mean(1, keepdim=True)
    s2 = torch.einsum("bqhd,bkhd->bhqk", q, ks).softmax(-1)
    assert (s - s2).abs().max() < 1e-12


def test_int8_block_quantisation():
    x = rnd(2, 300, 3, 128, seed=6, scale=3.0)
    xq = A._quant_int8_blocks(x, 128)
    assert xq.shape == x.shape
    for b0 in range(0, 300, 128):  # error ≤ half a step of the block's own scale
        blk = x[:, b0 : b0 + 128]
        step = blk.abs().amax(dim=(1, 3), keepdim=True) / 127
        assert ((xq[:, b0 : b0 + 128] - blk).abs() <= step / 2 + 1e-6).all()
        levels = xq[:, b0 : b0 + 128] / step
        assert (levels - levels.round()).abs().max() < 1e-3
        assert levels.abs().max() <= 127 + 1e-3


def test_magic_int32_to_float_is_exact():
    # the kernel converts int32 Q·Kᵀ sums with (x + 0x4B400000) read as fp32 − 1.5·2²³;
    # exact for |x| < 2²², and |x| ≤ 127²·128 < 2²² for D = 128
    x = torch.cat(
        [torch.randint(-(2**22) + 1, 2**22, (100000,)), torch.tensor([0, 127 * 127 * 128])]
    )
    x = x.to(torch.int32)
    f = (x + 0x4B400000).view(torch.float32) - 12582912.0
    assert torch.equal(f, x.float())
    assert 127 * 127 * 128 < 2**22


@pytest.mark.parametrize("pv", ["bf16", "int8"])
@pytest.mark.parametrize("offset", [0.0, 10.0])
@pytest.mark.parametrize("Lq,Lk", [(300, 300), (77, 257)])
def test_sim_passes_gate(Lq, Lk, offset, pv):
    q = rnd(2, Lq, 2, 128, seed=7).bfloat16()
    k = rnd(2, Lk, 2, 128, seed=8, offset=offset).bfloat16()
    v = rnd(2, Lk, 2, 128, seed=9).bfloat16()
    ref = A.attention_ref(q.float(), k.float(), v.float())
    out = A.attention_8bit_sim(q, k, v, pv=pv, block_n=64)
    assert torch.isfinite(out).all()
    assert A.rel_l2(out, ref) <= A.GATE_REL_L2
    assert A.cosine(out, ref) >= A.GATE_COSINE


def test_smoothing_is_what_handles_offset_k():
    q = rnd(1, 256, 2, 128, seed=10)
    k = rnd(1, 256, 2, 128, seed=11, offset=30.0)
    v = rnd(1, 256, 2, 128, seed=12)
    ref = A.attention_ref(q, k, v)
    smoothed = A.attention_8bit_sim(q, k, v)
    qq = A._quant_int8_blocks(q * (128**-0.5 * math.log2(math.e)), 128)
    s = torch.einsum("bqhd,bkhd->bhqk", qq, A._quant_int8_blocks(k, 128))
    raw = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s / math.log2(math.e), -1), v)
    assert A.rel_l2(smoothed, ref) < 0.03 < A.rel_l2(raw, ref)


@pytest.mark.parametrize("v_off", [0.0, 20.0])
def test_sim_fp8pv(v_off):
    q, k = (
        rnd(1, 256, 2, 128, seed=13).bfloat16(),
        rnd(1, 512, 2, 128, seed=14, offset=5).bfloat16(),
    )
    v = rnd(1, 512, 2, 128, seed=15, offset=v_off).bfloat16()
    ref = A.attention_ref(q.float(), k.float(), v.float())
    out = A.attention_8bit_sim(q, k, v, pv="fp8")
    assert torch.isfinite(out).all()
    assert A.rel_l2(out, ref) <= 0.05
    assert A.cosine(out, ref) >= 0.999


def test_v_offset_only_for_large_means():
    mean = torch.tensor([0.01, 5.0, -5.0])
    vmax, vmin = torch.tensor([4.0, 9.0, -1.0]), torch.tensor([-4.0, 1.0, -9.0])
    assert torch.equal(A.v_offset(mean, vmax, vmin), torch.tensor([0.0, 5.0, -5.0]))


def test_registry_on_cpu():
    assert "sdpa" in A.available_attention_backends()
    prev = A.attention_backend()
    try:
        A.set_attention_backend("auto")
        if not torch.cuda.is_available():
            assert A.attention_backend() == "sdpa"
        with pytest.raises(LX2VError, match="not available"):
            A.set_attention_backend("no-such-backend")
        if not torch.cuda.is_available():
            with pytest.raises(LX2VError, match="lx2v-int8"):
                A.set_attention_backend("lx2v-int8")
            assert "lx2v-int8" in A.unavailable_attention_backends()
            assert "lx2v-int8-int8-ws" in A.unavailable_attention_backends()
        A.set_attention_backend("sdpa")
        with A.attention_backend_override("ref"):
            assert A.attention_backend() == "ref"
        assert A.attention_backend() == "sdpa"
    finally:
        A.set_attention_backend(prev)


def test_ws_backend_runs_short_keys_on_the_triton_kernel(monkeypatch):
    """lx2v-int8-int8-ws sends key lengths below WS_MIN_LK (the cross-attention's 257 and 512
    tokens) to the Triton INT8 kernel and longer ones to the CUDA kernel."""
    calls = []
    monkeypatch.setattr(A, "_attention_int8_op", lambda q, k, v, pv: calls.append(pv))
    q = torch.zeros(1, 8, 1, 128)
    for lk in (257, 512, A.WS_MIN_LK - 1, A.WS_MIN_LK, 32760):
        A.attention_lx2v_int8_int8_ws(q, torch.zeros(1, lk, 1, 128), torch.zeros(1, lk, 1, 128))
    assert calls == ["int8", "int8", "int8", "int8-ws", "int8-ws"]


def test_backend_limitation():
    assert A.backend_limitation("lx2v-int8-int8", 128, torch.bfloat16) is None
    assert "head dim 128" in A.backend_limitation("lx2v-int8", 32, torch.bfloat16)
    assert "bf16 or fp16" in A.backend_limitation("lx2v-int8-fp8", 128, torch.float32)
    assert A.backend_limitation("sdpa", 32, torch.float32) is None


def test_fit_replaces_auto_choice_and_rejects_named_backend(monkeypatch, caplog):
    """A model whose heads our kernels do not take (the embedded default: head dim 32):
    an "auto" choice falls back to sdpa with one log line; a named backend is an error."""
    A.register_attention_backend("lx2v-test", A.attention_sdpa)
    monkeypatch.setitem(A._auto_report, "choice", "lx2v-test")  # what "auto" decided
    prev = A.attention_backend()
    try:
        A.set_attention_backend("auto")
        assert A.attention_backend() == "lx2v-test"
        assert A.fit_attention_backend(128, torch.bfloat16) == "lx2v-test"
        with caplog.at_level("WARNING", logger=A.__name__):
            assert A.fit_attention_backend(32, torch.bfloat16) == "sdpa"
        assert A.attention_backend() == "sdpa"
        assert "head dim 128" in caplog.text and "using sdpa" in caplog.text

        A.set_attention_backend("lx2v-test")
        with pytest.raises(LX2VError, match="'lx2v-test' takes head dim 128.*auto or sdpa"):
            A.fit_attention_backend(32, torch.bfloat16)
        assert A.attention_backend() == "lx2v-test"
    finally:
        A.set_attention_backend(prev)
        A._BACKENDS.pop("lx2v-test", None)


def test_sage_wrapper_leaves_the_callers_k_alone(monkeypatch):
    """sageattention 1.0.6 subtracts k's mean in place when it smooths k; the wrapper must
    hand it a smoothed copy (the model caches the cross-attention k across steps)."""
    import sys
    import types

    seen = {}

    def fake_sageattn(q, k, v, tensor_layout, is_causal, smooth_k=True):
        if smooth_k:
            k -= k.mean(dim=1, keepdim=True)  # what sageattention does
        seen.update(layout=tensor_layout, k_mean=k.mean(dim=1).abs().max().item())
        return A.attention_ref(q, k, v)

    monkeypatch.setitem(sys.modules, "sageattention", types.SimpleNamespace(sageattn=fake_sageattn))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    fn = A._load_sage()
    q, k, v = rnd(1, 33, 2, 128, seed=1), rnd(1, 40, 2, 128, seed=2, offset=3), rnd(1, 40, 2, 128)
    k0 = k.clone()
    out = fn(q, k, v)
    assert torch.equal(k, k0)
    assert seen["layout"] == "NHD" and seen["k_mean"] < 1e-5  # sage got a smoothed k
    torch.testing.assert_close(out, A.attention_ref(q, k0, v), rtol=1e-4, atol=1e-5)


def test_self_check_rejects_a_backend_that_writes_into_its_inputs():
    def smooths_k_in_place(q, k, v):
        k -= k.mean(dim=1, keepdim=True)  # softmax ignores it: the output stays exact
        return A.attention_ref(q, k, v)

    assert A.self_check(A.attention_sdpa, "cpu")[0]
    ok, msg = A.self_check(smooths_k_in_place, "cpu")
    assert not ok and "writes into its inputs" in msg


def test_custom_op_fake_kernel():
    q = torch.empty(2, 77, 3, 128, device="meta", dtype=torch.bfloat16)
    k = v = torch.empty(2, 257, 3, 128, device="meta", dtype=torch.bfloat16)
    out = torch.ops.lightx2v.attention_int8(q, k, v, "int8")
    assert out.shape == q.shape and out.dtype == q.dtype


def test_fa4_goes_through_a_custom_op_that_compiles(monkeypatch):
    """flash-attn-4's launcher cannot be traced by dynamo, so the backend calls it through
    the custom op lightx2v::fa4_attention (fake kernel: the output's shape); a stand-in
    module checks the call and that a fullgraph compile keeps it as one opaque op."""
    import sys
    import types

    calls = []

    def fake_fa4(q, k, v):
        calls.append(q.shape)
        return A.attention_ref(q, k, v), None  # (out, lse) like flash-attn-4

    cute = types.ModuleType("flash_attn.cute")
    cute.flash_attn_func = fake_fa4
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    q, k, v = (torch.randn(1, 33, 2, 16) for _ in range(3))
    eager = A._fa4_attention_op(q, k, v)
    assert torch.allclose(eager, A.attention_ref(q, k, v)) and calls == [q.shape]
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: A._fa4_attention_op(q, k, v) * 2, fullgraph=True)
    assert torch.allclose(compiled(q, k, v), 2 * eager)
    torch.library.opcheck(torch.ops.lightx2v.fa4_attention, (q, k, v))


# ---------------------------------------------------------------------------------------
# flashinfer-fp8: the wrapper's quantisation and calls, against a stand-in flashinfer whose
# single_prefill_with_kv_cache dequantises its e4m3 inputs with the per-head scales it is
# given (x = code · scale, as flashinfer's FA3 FP8 kernel does) and attends exactly in fp32.


def _stand_in_flashinfer(monkeypatch):
    """Install a stand-in `flashinfer.prefill`; returns the list its calls are recorded in."""
    import sys
    import types

    calls = []

    def single_prefill_with_kv_cache(
        q, k, v, scale_q=None, scale_k=None, scale_v=None, o_dtype=None, causal=False,
        kv_layout="NHD", sm_scale=None, backend="auto", **rest,
    ):  # fmt: skip
        deq = [x.float() * s.float()[None, :, None] for x, s in ((q, scale_q), (k, scale_k),
                                                                  (v, scale_v))]  # fmt: skip
        p = (torch.einsum("qhd,khd->hqk", deq[0], deq[1]) * sm_scale).softmax(-1)
        out = torch.einsum("hqk,khd->qhd", p, deq[2]).to(o_dtype)
        calls.append(dict(q=q, k=k, v=v, sq=scale_q, sk=scale_k, sv=scale_v, o_dtype=o_dtype,
                          causal=causal, kv_layout=kv_layout, sm_scale=sm_scale, backend=backend,
                          rest=rest, out=out))  # fmt: skip
        return out

    prefill = types.ModuleType("flashinfer.prefill")
    prefill.single_prefill_with_kv_cache = single_prefill_with_kv_cache
    pkg = types.ModuleType("flashinfer")
    pkg.prefill = prefill
    monkeypatch.setitem(sys.modules, "flashinfer", pkg)
    monkeypatch.setitem(sys.modules, "flashinfer.prefill", prefill)
    return calls


def _fp8_inputs(B, Lq, Lk, H, D):
    """bf16 q, k, v whose heads differ in magnitude by 10× (one scale per tensor, or scales
    swapped between heads or batch elements, would show) and k with a per-channel offset."""
    mag = (10.0 ** torch.arange(H) / 10).view(1, 1, H, 1)
    q = (rnd(B, Lq, H, D, seed=21) * mag).bfloat16()
    k = (rnd(B, Lk, H, D, seed=22, offset=8.0) * mag.flip(2)).bfloat16()
    v = (rnd(B, Lk, H, D, seed=23) * mag * torch.arange(1, B + 1).view(B, 1, 1, 1)).bfloat16()
    return q, k, v


def _check_codes(codes, scale, x):
    """e4m3 codes [L, H, D] · per-head scale [H] reproduce x [L, H, D] to half an e4m3 step,
    and the scale is amax/448 rounded up by at most one bf16 step (the multiplier 448/amax
    rounded down), so that no code needed more than 448."""
    assert codes.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    assert scale.shape == (x.shape[1],)
    xf = x.float()
    amax = xf.abs().amax(dim=(0, 2))
    assert (scale >= amax / 448).all() and (scale <= amax / 448 * (1 + 2**-7)).all()
    c = codes.float()
    assert torch.isfinite(c).all() and c.abs().max() <= 448
    err = (c * scale[None, :, None] - xf).abs()
    assert (err <= xf.abs() * 2**-4 + scale[None, :, None] * 2**-9 * 1.001).all()


@pytest.mark.parametrize("B", [1, 2])
def test_flashinfer_fp8_wrapper(monkeypatch, B):
    calls = _stand_in_flashinfer(monkeypatch)
    Lq, Lk, H, D = 77, 130, 3, 64
    q, k, v = _fp8_inputs(B, Lq, Lk, H, D)
    q0, k0, v0 = q.clone(), k.clone(), v.clone()
    out = A._flashinfer_fp8_op(q, k, v)
    assert torch.equal(q, q0) and torch.equal(k, k0) and torch.equal(v, v0)
    assert out.shape == (B, Lq, H, D) and out.dtype == torch.bfloat16 and out.is_contiguous()

    assert len(calls) == B  # one single-request prefill per batch element, in order
    kc = k - k.mean(dim=1, keepdim=True)  # k smoothed as the wrapper does it
    for b, c in enumerate(calls):
        assert c["backend"] == "fa3" and c["kv_layout"] == "NHD" and c["causal"] is False
        assert c["o_dtype"] == torch.bfloat16 and c["sm_scale"] == pytest.approx(D**-0.5)
        assert c["q"].shape == (Lq, H, D) and c["k"].shape == c["v"].shape == (Lk, H, D)
        _check_codes(c["q"], c["sq"], q[b])
        _check_codes(c["k"], c["sk"], kc[b])
        _check_codes(c["v"], c["sv"], v[b])
        assert torch.equal(out[b], c["out"])

    # FP8 q, k, v with per-head scales: ≈4-5% from exact on such inputs (P is not rounded
    # by the stand-in); a scale off by a factor, or k not smoothed (≈20%), is far outside
    ref = A.attention_ref(q.float(), k.float(), v.float())
    assert A.rel_l2(out, ref) < 0.07 and A.cosine(out, ref) > 0.997


def test_fp8_per_head_edge_cases():
    x = rnd(2, 50, 3, 16, seed=24)
    x[0, :, 1] = 0.0  # an all-zero head: finite scale, zero codes
    x[1, :, 2] *= 1e4  # a head far above 448
    x[1, :, 0] *= 1e-4  # and one far below
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        xd = x.to(dt)
        codes, scale = A._fp8_per_head(xd)
        assert scale.shape == (2, 3) and torch.isfinite(scale).all() and (scale > 0).all()
        assert not codes[0, :, 1].float().any()
        for b in range(2):
            live = [h for h in range(3) if (b, h) != (0, 1)]
            c, s, xb = codes[b][:, live], scale[b][live], xd[b][:, live]
            if dt == torch.float16 and b == 1:  # fp16 caps the multiplier at 65504: coarser
                s = s[1:]  # codes for the tiny head; the other two are checked as usual
                c, xb = c[:, 1:], xb[:, 1:]
            _check_codes(c, s, xb)


def _flashinfer_loader_env(monkeypatch, capability=(9, 0)):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(A, "_unavailable", {})
    monkeypatch.setattr(A, "_BACKENDS", dict(A._BACKENDS))


def test_flashinfer_fp8_missing_is_a_clean_unavailable_entry(monkeypatch):
    import sys

    _flashinfer_loader_env(monkeypatch)
    monkeypatch.setitem(sys.modules, "flashinfer", None)  # import flashinfer → ImportError
    monkeypatch.setitem(sys.modules, "flashinfer.prefill", None)
    assert not A._try_load("flashinfer-fp8")
    why = A._unavailable["flashinfer-fp8"]
    assert why.startswith("ImportError: flashinfer-python is not installed"), why
    with pytest.raises(LX2VError, match="'flashinfer-fp8' is not available.*not installed"):
        A.set_attention_backend("flashinfer-fp8")


def test_flashinfer_fp8_needs_hopper(monkeypatch):
    _stand_in_flashinfer(monkeypatch)
    _flashinfer_loader_env(monkeypatch, capability=(10, 0))
    assert not A._try_load("flashinfer-fp8")
    assert "compute capability 9.x, not 10.0" in A._unavailable["flashinfer-fp8"]


def test_flashinfer_fp8_loads_and_fails_the_self_check(monkeypatch):
    """With flashinfer present on a Hopper GPU the backend loads and is named in the CLI's
    choices; the self-check rejects it (here on the CPU, with the stand-in kernel: its FP8 q
    and k alone fail the 3% gate on random inputs), as it did on an H200, so it is not one of
    "auto"'s candidates."""
    calls = _stand_in_flashinfer(monkeypatch)
    _flashinfer_loader_env(monkeypatch)
    assert "flashinfer-fp8" in A.ATTENTION_CHOICES
    assert "flashinfer-fp8" not in A.AUTO_CANDIDATES
    assert A._try_load("flashinfer-fp8"), A._unavailable
    ok, msg = A.self_check(A._BACKENDS["flashinfer-fp8"], "cpu")
    assert not ok and msg.startswith("rel-L2 "), msg
    assert len(calls) == 2 + 1 + 1 + 1  # one call per batch element of each case


def test_flashinfer_fp8_without_its_module_or_nvcc_is_one_clear_reason(monkeypatch):
    """flashinfer installed but its FP8 prefill module neither prebuilt nor built, and no
    nvcc: unavailable with one line, not a JIT traceback at the first forward."""
    import os
    import shutil
    import sys
    import types

    _stand_in_flashinfer(monkeypatch)
    _flashinfer_loader_env(monkeypatch)
    spec = types.SimpleNamespace(is_aot=False, jit_library_path=types.SimpleNamespace(
        exists=lambda: False))  # fmt: skip
    jit = types.ModuleType("flashinfer.jit")
    jit.gen_single_prefill_module = lambda *a: spec
    monkeypatch.setitem(sys.modules, "flashinfer.jit", jit)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv("CUDA_HOME", "/nonexistent-cuda")
    real_exists = os.path.exists
    monkeypatch.setattr(os.path, "exists", lambda p: False if "nvcc" in str(p) else real_exists(p))
    assert not A._try_load("flashinfer-fp8")
    assert "neither prebuilt nor built, and there is no nvcc" in A._unavailable["flashinfer-fp8"]
    monkeypatch.setattr(spec, "is_aot", True)  # prebuilt (tools/flashinfer_bundle.sh): loads
    monkeypatch.setattr(A, "_unavailable", {})
    assert A._try_load("flashinfer-fp8"), A._unavailable


def test_flashinfer_fp8_custom_op_compiles(monkeypatch):
    """Like fa4: a fullgraph compile keeps the op opaque (dynamo never sees flashinfer)."""
    calls = _stand_in_flashinfer(monkeypatch)
    q, k, v = _fp8_inputs(2, 33, 40, 2, 64)
    eager = A._flashinfer_fp8_op(q, k, v)
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: A._flashinfer_fp8_op(q, k, v) * 2, fullgraph=True)
    assert torch.equal(compiled(q, k, v), 2 * eager) and len(calls) == 4
    torch.library.opcheck(torch.ops.lightx2v.flashinfer_fp8_attention, (q, k, v))


# ---------------------------------------------------------------------------------------
# the 8-bit kernels' pre-pass (statistics and quantisation), run by Triton's interpreter on
# CPU tensors. The interpreter must be on before triton is imported: tests/test_ops.py's
# test_triton_kernels_under_interpreter runs these (`-k interpreted`) in a child pytest
# with TRITON_INTERPRET=1. The main kernel moves tiles by TMA, which the interpreter does
# not model: it is tested on the GPU (tests/test_attention_cuda.py).


@pytest.fixture
def kernels_interpreted(interpreting):
    from lightx2v.kernels import attention as K

    return K


def _per_head(x: torch.Tensor) -> torch.Tensor:
    """[B, L, H, D] → [B·H, L, D] in fp32."""
    B, L, H, D = x.shape
    return x.float().permute(0, 2, 1, 3).reshape(B * H, L, D)


@pytest.mark.parametrize("L", [77, 1100])  # one partial chunk; a full and a partial one
def test_interpreted_stats_kernel(kernels_interpreted, L):
    K = kernels_interpreted
    B, H, D = 2, 3, 128
    # k a strided view (heads of a wider tensor), v with a large per-channel mean
    k = rnd(B, L, H + 1, D, seed=L).bfloat16()[:, :, 1:]
    v = (rnd(B, L, H, D, seed=L + 1, offset=4.0) * 3).bfloat16()
    nch = -(-L // K.STATS_CHUNK)
    part = torch.full((4, B * H, nch, D), float("nan"))
    K._stats_kernel[(nch, B * H)](
        k, v, part, L, H, nch, B * H * nch * D,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        CHUNK=K.STATS_CHUNK, BT=16, D=D, WITH_V=True, num_warps=4,
    )  # fmt: skip
    kf, vf = _per_head(k), _per_head(v)
    torch.testing.assert_close(part[0].sum(1), kf.sum(1), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(part[1].sum(1), vf.sum(1), rtol=1e-5, atol=1e-3)
    assert torch.equal(part[2].amax(1), vf.amax(1))
    assert torch.equal(part[3].amin(1), vf.amin(1))


def test_interpreted_quantize_qkv_int8(kernels_interpreted):
    K = kernels_interpreted
    B, Lq, Lk, H, D = 2, 70, 150, 2, 128
    q = rnd(B, Lq, H, D, seed=11).bfloat16()
    k = rnd(B, Lk, H, D, seed=12, offset=6.0).bfloat16()
    v = (rnd(B, Lk, H, D, seed=13, offset=3.0) * 2).bfloat16()
    z = K.quantize_qkv(q, k, v, 64, 128, "int8")
    assert (z["Lq_pad"], z["Lk_pad"]) == (128, 256)

    def same_codes(x8, scales, block, want):
        """INT8 codes × per-block scales against the simulation's block quantisation: equal
        but for one step where the two fp32 evaluation orders round a near-tie apart."""
        step = scales.repeat_interleave(block, dim=1)[:, : want.shape[1], None]
        got = x8[:, : want.shape[1]].float() * step
        assert ((got - want).abs() <= step * 1.001).all()
        assert ((got - want).abs() <= step * 1e-3).float().mean() > 0.999

    # q · D^-½ · log2(e), one scale per 64 rows; padded rows are zero
    mult = D**-0.5 * math.log2(math.e)
    q8 = z["q8"].view(B * H, 128, D)
    same_codes(q8, z["qs"], 64, _per_head(A._quant_int8_blocks(q.float() * mult, 64)))
    assert not q8[:, Lq:].any()

    # k smoothed by its per-channel mean, one scale per 128 rows
    kc = k.float() - k.float().mean(1, keepdim=True)
    k8 = z["k8"].view(B * H, 256, D)
    same_codes(k8, z["ks"], 128, _per_head(A._quant_int8_blocks(kc, 128)))
    assert not k8[:, Lk:].any()

    # v: transposed [B·H, D, Lk_pad], (v − offset) / (amax / 127) rounded half away from 0
    vf = _per_head(v)
    off = K.v_offset(vf.mean(1), vf.amax(1), vf.amin(1))
    torch.testing.assert_close(z["v_mean"], off)
    amax = torch.maximum(vf.amax(1) - off, off - vf.amin(1))
    torch.testing.assert_close(z["v_scale"], amax / 127)
    codes = A._round_away((vf - off[:, None]) / (amax / 127)[:, None])
    got = z["vt8"].transpose(1, 2)  # [B·H, Lk_pad, D]
    assert (got[:, :Lk].float() - codes).abs().max() <= 1  # ±1 where fp32 rounding ties
    assert (got[:, :Lk].float() == codes).float().mean() > 0.999
    assert not got[:, Lk:].any()


def test_interpreted_quantize_qkv_sm90_layout(kernels_interpreted):
    """The pre-pass in the CUDA kernel's layout equals the plain pre-pass relaid out by the
    torch reference (swizzled rows; v per 128-key block in the tensor cores' key order)."""
    K = kernels_interpreted
    B, Lq, Lk, H, D = 1, 70, 150, 2, 128
    q = rnd(B, Lq, H, D, seed=21).bfloat16()
    k = rnd(B, Lk, H, D, seed=22, offset=3.0).bfloat16()
    v = rnd(B, Lk, H, D, seed=23).bfloat16()
    plain = K.quantize_qkv(q, k, v, 64, 128, "int8")
    sm90 = K.quantize_qkv(q, k, v, 64, 128, "int8", layout="sm90")
    want = K.sm90_relayout(plain)
    for name in ("q8", "k8", "vt8", "qs", "ks", "v_mean", "v_scale"):
        assert torch.equal(sm90[name], want[name]), name
    assert not torch.equal(sm90["vt8"], plain["vt8"])
    with pytest.raises(ValueError, match="layout"):
        K.quantize_qkv(q, k, v, 64, 128, "fp8", layout="sm90")


def test_sm90_relayout_reference():
    """The torch reference of the "sm90" layout against the definition, element by element:
    q8/k8 byte (r, c) lands at chunk (c // 16) ^ (r % 8); v's key t of channel d lands in
    block t // 128 at the position whose key order entry is t % 32 (within its 32)."""
    pytest.importorskip("triton")
    from lightx2v.kernels import attention as K

    BH, Lp = 2, 256
    g = torch.Generator().manual_seed(0)
    z = {
        "q8": torch.randint(-127, 128, (BH, 128, 128), generator=g, dtype=torch.int8),
        "k8": torch.randint(-127, 128, (BH, Lp, 128), generator=g, dtype=torch.int8),
        "vt8": torch.randint(-127, 128, (BH, 128, Lp), generator=g, dtype=torch.int8),
    }
    out = K.sm90_relayout(z)
    for r, c in [(0, 0), (1, 0), (7, 17), (9, 127), (100, 64)]:
        pos = ((c // 16) ^ (r % 8)) * 16 + c % 16
        assert out["k8"][1, r, pos] == z["k8"][1, r, c]
        assert out["q8"][0, r, pos] == z["q8"][0, r, c]
    order = K.SM90_KEY_ORDER
    assert order == [0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15,
                     16, 17, 24, 25, 18, 19, 26, 27, 20, 21, 28, 29, 22, 23, 30, 31]  # fmt: skip
    vt = out["vt8"].view(BH, Lp // 128, 128, 128)
    for d, t in [(0, 0), (3, 9), (5, 130), (127, 255), (64, 40)]:
        kpos = 32 * ((t % 128) // 32) + order.index(t % 32)
        pos = ((kpos // 16) ^ (d % 8)) * 16 + kpos % 16
        assert vt[1, t // 128, d, pos] == z["vt8"][1, d, t]
