"""Step-distilled sampling (schedule, x0 update, seeded re-noising) and LoRA merging.

Tolerance principle (DESIGN.md): merged weights (W + ΔW, one fp32 sum) and an explicit LoRA
forward (W·x + B·(A·x)) compute the same function in a different association, so in fp32
their outputs may differ by a few fp32 roundings accumulated through the tiny DiT: relative
L2 ≤ 1e-5 (~100 ulp). Requantized FP8 rows round twice (the original weight, then the merged
one), so their error against the exact merged weight may be up to ~2× one FP8 rounding.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from lightx2v.errors import LX2VError
from lightx2v.models.wan.dit import WanDiT
from lightx2v.models.wan.formats import official_to_diffusers
from lightx2v.models.wan.lora import (
    LoraSpec,
    merge_loras,
    merge_loras_into_state,
    parse_lora_args,
)
from lightx2v.models.wan.tiny import random_dit_state, tiny_arch
from lightx2v.quant.fp8 import dequantize_weight, weight_error
from lightx2v.schedule import (
    DistillFlowSampler,
    FlowSchedule,
    distill_settings,
    make_sampler,
)

# ---------------------------------------------------------------------------------------
# 4-step distilled sampler


def test_distill_schedule_matches_formula():
    s = make_sampler("distill4", 4, 5.0, seed=0)
    # LightX2V: sigma = t/1000 on the float32 grid linspace(1, 0, 1001), shifted, t_model = 1000·sigma'
    sig = [t / 1000 for t in (1000, 750, 500, 250)]
    shifted = [5 * x / (1 + 4 * x) for x in sig]
    want = torch.tensor(shifted, dtype=torch.float32)
    assert torch.allclose(s.sigmas[:4], want, rtol=2e-7, atol=0)
    assert s.sigmas[4] == 0
    assert torch.allclose(s.timesteps, want * 1000, rtol=2e-7, atol=0)
    assert s.sigmas[:4].tolist()[:2] == [1.0, 0.9375] and s.timesteps.tolist()[3] == 625.0
    # bit-exact against the upstream float32 construction
    grid = torch.linspace(1.0, 0.0, 1001, dtype=torch.float32)[:-1]
    grid = 5.0 * grid / (1 + 4.0 * grid)
    idx = [0, 250, 500, 750]
    assert torch.equal(s.sigmas[:4], grid[idx]) and torch.equal(s.timesteps, grid[idx] * 1000)


def exact_model(x0: torch.Tensor):
    """The true flow velocity for data x0: v = (x − x0)/sigma."""
    return lambda x, sigma: (x - x0) / sigma


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_distill_exact_velocity_lands_on_x0(dtype):
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(2, 16, 3, 4, 6, generator=g, dtype=dtype)
    x = torch.randn(x0.shape, generator=g, dtype=dtype)
    s = make_sampler("distill4", 4, 5.0, seed=7)
    model = exact_model(x0)
    for i in range(4):
        x = s.step(model(x, float(s.sigmas[i])), x)
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    assert torch.allclose(x, x0, rtol=0, atol=tol)


def test_distill_renoise_uses_the_generator_stream():
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(1, 4, 2, 3, 3, generator=g)
    x = torch.randn(x0.shape, generator=g)
    s = make_sampler("distill4", 4, 5.0, generator=torch.Generator().manual_seed(11))
    x1 = s.step(exact_model(x0)(x, 1.0), x)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(11))
    sig = float(s.sigmas[1])
    x0_pred = x - 1.0 * ((x - x0) / 1.0)
    assert torch.equal(x1, (1 - sig) * x0_pred + sig * noise)


def run_distill(seed=None, generator=None, v_seed=0):
    g = torch.Generator().manual_seed(v_seed)
    x = torch.randn(1, 4, 2, 3, 3, generator=g)
    s = make_sampler("distill4", 4, 5.0, seed=seed, generator=generator)
    for _ in range(4):
        x = s.step(torch.tanh(x) + 0.1, x)
    return x


def test_distill_is_deterministic_per_seed():
    a, b, c = run_distill(seed=3), run_distill(seed=3), run_distill(seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a, run_distill(generator=torch.Generator().manual_seed(3)))
    s = make_sampler("distill4", 4, 5.0, seed=3)  # reset restarts the seeded stream
    x = torch.zeros(1, 4, 2, 3, 3)
    first = s.step(x + 1, x)
    s.reset()
    assert torch.equal(first, s.step(x + 1, x))


def test_distill_settings_and_errors():
    assert distill_settings("unipc", 40, 5.0, None) == (40, 5.0, None, [])
    steps, guidance, shift, notes = distill_settings("distill4", 40, 5.0, 3.0)
    assert (steps, guidance, shift) == (4, 1.0, 3.0)
    assert len(notes) == 2 and "without CFG" in notes[1]
    assert distill_settings("distill4", None, None) == (4, 1.0, 5.0, [])  # unset: silent
    assert distill_settings("distill4", 4, 1.0, None) == (4, 1.0, 5.0, [])
    with pytest.raises(LX2VError, match="exactly 4 steps"):
        make_sampler("distill4", 40, 5.0, seed=0)
    with pytest.raises(LX2VError, match="seed"):
        make_sampler("distill4", 4, 5.0)
    with pytest.raises(LX2VError, match="decreasing"):
        FlowSchedule.distilled((250, 500), 5.0)
    with pytest.raises(LX2VError, match="unknown sampler"):
        make_sampler("distill3", 3)
    assert isinstance(make_sampler("distill4", 4, seed=0), DistillFlowSampler)


# ---------------------------------------------------------------------------------------
# LoRA

RANK = 4
# official module → has the LoRA a bias diff too
TARGETS = [
    "blocks.0.self_attn.q",
    "blocks.0.cross_attn.k",
    "blocks.1.ffn.0",
    "blocks.1.self_attn.v",
    "patch_embedding",
    "head.head",
]


@pytest.fixture(scope="module")
def base():
    arch = tiny_arch("i2v")
    model = WanDiT(arch)
    model.load_state_dict(random_dit_state(arch, seed=2))
    return model.eval()


def make_factors(model: nn.Module, seed=0, targets=TARGETS):
    """{official module: (A [r, in...], B [out, r...], alpha)} for linears and the conv."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in targets:
        w = model.get_submodule(name).weight
        a = torch.randn(RANK, *w.shape[1:], generator=g) * 0.1
        b = torch.randn(w.shape[0], RANK, *([1] * (w.dim() - 2)), generator=g) * 0.1
        out[name] = (a, b, 2.0)
    return out


def write_lora(path, factors, style="official", alpha=True, diffs=None):
    tensors = {}
    for name, (a, b, al) in factors.items():
        if style == "official":
            key, down, up = f"diffusion_model.{name}", "lora_down.weight", "lora_up.weight"
        elif style == "diffusers":
            key = "transformer." + official_to_diffusers(name + ".weight")[: -len(".weight")]
            down, up = "lora_A.weight", "lora_B.weight"
        else:  # kohya / musubi
            key, down, up = (
                "lora_unet_" + name.replace(".", "_"),
                "lora_down.weight",
                "lora_up.weight",
            )
        tensors[f"{key}.{down}"] = a.contiguous()
        tensors[f"{key}.{up}"] = b.contiguous()
        if alpha:
            tensors[f"{key}.alpha"] = torch.tensor(al)
    tensors.update(diffs or {})
    save_file(tensors, str(path))
    return path


class LoraLinear(nn.Module):
    def __init__(self, base, a, b, scale):
        super().__init__()
        self.base, self.a, self.b, self.scale = base, a, b, scale

    def forward(self, x):
        return self.base(x) + self.scale * F.linear(F.linear(x, self.a), self.b)


class LoraPatchConv(nn.Module):
    def __init__(self, base, a, b, scale):
        super().__init__()
        self.base, self.a, self.b, self.scale = base, a, b, scale
        self.weight = base.weight  # WanDiT reads patch_embedding.weight.dtype

    def forward(self, x):
        h = F.conv3d(x, self.a, stride=self.base.stride)
        return self.base(x) + self.scale * F.conv3d(h, self.b)


def explicit_lora_model(model, factors, strength):
    m = copy.deepcopy(model)
    for name, (a, b, alpha) in factors.items():
        parent, _, leaf = name.rpartition(".")
        owner = m.get_submodule(parent) if parent else m
        cls = LoraPatchConv if name == "patch_embedding" else LoraLinear
        setattr(owner, leaf, cls(getattr(owner, leaf), a, b, strength * alpha / RANK))
    return m


def forward(model):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(1, 16, 2, 4, 6, generator=g)
    y = torch.randn(1, 20, 2, 4, 6, generator=g)
    ctx = torch.randn(1, 512, 32, generator=g)
    clip = torch.randn(1, 257, 160, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([700.0]), ctx, clip, y)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_merged_equals_explicit_lora_forward(base, tmp_path):
    targets = [t for t in TARGETS if t != "head.head"]  # Head reads its weight directly
    factors = make_factors(base, targets=targets)
    path = write_lora(tmp_path / "l.safetensors", factors)
    merged = copy.deepcopy(base)
    changed = merge_loras(merged, [LoraSpec(path, 0.8)])
    assert changed == sorted(n + ".weight" for n in targets)
    ref = forward(explicit_lora_model(base, factors, 0.8))
    out = forward(merged)
    assert rel(out, ref) < 1e-5
    assert rel(out, forward(base)) > 1e-3  # the LoRA does change the output


@pytest.mark.parametrize("style", ["diffusers", "kohya"])
def test_key_styles_merge_identically(base, tmp_path, style):
    factors = make_factors(base)
    official = write_lora(tmp_path / "a.safetensors", factors, "official")
    other = write_lora(tmp_path / "b.safetensors", factors, style)
    m1, m2 = copy.deepcopy(base), copy.deepcopy(base)
    merge_loras(m1, [LoraSpec(official)])
    merge_loras(m2, [LoraSpec(other)])
    for k, v in m1.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k


def test_missing_alpha_means_scale_one(base, tmp_path):
    factors = make_factors(base, targets=TARGETS[:1])
    a = write_lora(tmp_path / "a.safetensors", factors, "diffusers", alpha=False)
    w0 = base.blocks[0].self_attn.q.weight
    m = copy.deepcopy(base)
    merge_loras(m, [LoraSpec(a)])
    fa, fb, _ = factors[TARGETS[0]]
    assert torch.allclose(m.blocks[0].self_attn.q.weight, w0 + fb @ fa, atol=1e-6)


def test_strength_scales_and_loras_add(base, tmp_path):
    path = write_lora(tmp_path / "l.safetensors", make_factors(base))
    deltas = {}
    for s in (0.0, 0.5, 1.0):
        m = copy.deepcopy(base)
        merge_loras(m, [LoraSpec(path, s)])
        deltas[s] = m.blocks[1].ffn[0].weight - base.blocks[1].ffn[0].weight
    assert torch.equal(deltas[0.0], torch.zeros_like(deltas[0.0]))
    assert torch.allclose(deltas[0.5], 0.5 * deltas[1.0], atol=1e-6)
    two = copy.deepcopy(base)
    merge_loras(two, [f"{path}:0.5", f"{path}:0.5"])
    one = copy.deepcopy(base)
    merge_loras(one, [f"{path}:1"])
    assert torch.allclose(two.blocks[1].ffn[0].weight, one.blocks[1].ffn[0].weight, atol=1e-7)


def test_diff_keys_and_state_dict_path(base, tmp_path):
    g = torch.Generator().manual_seed(4)
    diffs = {
        "diffusion_model.blocks.0.self_attn.q.diff_b": torch.randn(64, generator=g),
        "diffusion_model.blocks.0.norm3.diff": torch.randn(64, generator=g),
        "diffusion_model.blocks.1.modulation.diff": torch.randn(1, 6, 64, generator=g),
        "diffusion_model.head.diff_m": torch.randn(1, 2, 64, generator=g),
    }
    path = write_lora(tmp_path / "d.safetensors", make_factors(base), diffs=diffs)
    m = copy.deepcopy(base)
    merge_loras(m, [LoraSpec(path, 0.5)])
    sd0, sd1 = base.state_dict(), m.state_dict()
    for key, name in [("blocks.0.self_attn.q.diff_b", "blocks.0.self_attn.q.bias"),
                      ("blocks.0.norm3.diff", "blocks.0.norm3.weight"),
                      ("blocks.1.modulation.diff", "blocks.1.modulation"),
                      ("head.diff_m", "head.modulation")]:  # fmt: skip
        want = sd0[name] + 0.5 * diffs["diffusion_model." + key].reshape(sd0[name].shape)
        assert torch.allclose(sd1[name], want, atol=1e-7), name
    state = merge_loras_into_state(dict(base.state_dict()), [LoraSpec(path, 0.5)])
    for k, v in sd1.items():
        assert torch.equal(v, state[k]), k


def test_bf16_weights_merge_in_fp32(base, tmp_path):
    path = write_lora(tmp_path / "l.safetensors", make_factors(base))
    m = copy.deepcopy(base).cast(torch.bfloat16)
    w = m.blocks[1].ffn[0].weight.clone()
    merge_loras(m, [LoraSpec(path)])
    ref = copy.deepcopy(base)
    merge_loras(ref, [LoraSpec(path)])
    delta = ref.blocks[1].ffn[0].weight - base.blocks[1].ffn[0].weight
    assert m.blocks[1].ffn[0].weight.dtype == torch.bfloat16
    assert torch.equal(m.blocks[1].ffn[0].weight, (w.float() + delta).to(torch.bfloat16))


def test_fused_and_fp8_models(base, tmp_path):
    from lightx2v.quant.linear import quantize_dit

    factors = make_factors(base)
    path = write_lora(tmp_path / "l.safetensors", factors)
    merged = copy.deepcopy(base)
    merge_loras(merged, [LoraSpec(path)])

    fused = quantize_dit(copy.deepcopy(base), "bf16")  # fused projections, fp32 weights
    merge_loras(fused, [LoraSpec(path)])
    assert rel(forward(fused), forward(merged)) < 1e-5

    fp8 = quantize_dit(copy.deepcopy(base), "fp8", backend="ref")
    qkv = fp8.blocks[1].self_attn.qkv
    before = qkv.weight.clone(), qkv.weight_scale.clone()
    merge_loras(fp8, [LoraSpec(path)])
    d = base.arch.dim
    # v (rows 2d..3d) got the LoRA; q, k rows are bit-identical
    assert torch.equal(qkv.weight[: 2 * d].view(torch.uint8), before[0][: 2 * d].view(torch.uint8))
    assert torch.equal(qkv.weight_scale[: 2 * d], before[1][: 2 * d])
    for blk, fused_name, rows, src in [(1, "self_attn.qkv", slice(2 * d, 3 * d), "self_attn.v"),
                                       (0, "self_attn.qkv", slice(0, d), "self_attn.q"),
                                       (0, "cross_attn.kv_proj", slice(0, d), "cross_attn.k"),
                                       (1, "ffn.0", slice(None), "ffn.0")]:  # fmt: skip
        q = fp8.blocks[blk].get_submodule(fused_name)
        got = dequantize_weight(q.weight[rows], q.weight_scale[rows])
        want = merged.blocks[blk].get_submodule(src).weight
        budget = 2 * weight_error(want, "fp8")
        assert rel(got, want) <= budget, (fused_name, rel(got, want), budget)


# ---------------------------------------------------------------------------------------
# errors and parsing


def test_spec_parsing(tmp_path):
    assert LoraSpec.parse("a.safetensors:0.7") == LoraSpec(tmp_path.__class__("a.safetensors"), 0.7)
    assert LoraSpec.parse("a.safetensors").strength == 1.0
    assert str(LoraSpec.parse("C:/x/a.safetensors").path) == "C:/x/a.safetensors"
    assert LoraSpec.parse("a.safetensors:-1").strength == -1.0
    with pytest.raises(LX2VError, match="finite"):
        LoraSpec.parse("a.safetensors:nan")
    with pytest.raises(LX2VError, match="not found"):
        parse_lora_args([str(tmp_path / "missing.safetensors") + ":0.5"])


def test_bad_files_and_keys(base, tmp_path):
    m = copy.deepcopy(base)
    with pytest.raises(LX2VError, match="not found"):
        merge_loras(m, [LoraSpec(tmp_path / "nope.safetensors")])
    pth = tmp_path / "l.pth"
    pth.write_bytes(b"x")
    with pytest.raises(LX2VError, match="only .safetensors"):
        merge_loras(m, [LoraSpec(pth)])
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 20)
    with pytest.raises(LX2VError, match="not a readable safetensors"):
        merge_loras(m, [LoraSpec(junk)])

    a, b = torch.zeros(RANK, 64), torch.zeros(64, RANK)
    cases = {
        "unknown target": ({"diffusion_model.blocks.9.self_attn.q.lora_down.weight": a,
                            "diffusion_model.blocks.9.self_attn.q.lora_up.weight": b},
                           r"not in this model.*blocks\.9\.self_attn\.q"),
        "unknown form": ({"diffusion_model.blocks.0.self_attn.q.hada_w1": a}, "no known LoRA form"),
        "half a pair": ({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": a},
                        "only one of"),
        "bad shape": ({"diffusion_model.blocks.0.ffn.0.lora_down.weight": a,
                       "diffusion_model.blocks.0.ffn.0.lora_up.weight": b}, "do not fit"),
        "text encoder": ({"lora_te_text_model_encoder_layers_0_q.lora_down.weight": a,
                          "lora_te_text_model_encoder_layers_0_q.lora_up.weight": b},
                         "not in this model"),
    }  # fmt: skip
    for what, (tensors, match) in cases.items():
        path = tmp_path / f"{what.replace(' ', '_')}.safetensors"
        save_file(tensors, str(path))
        with pytest.raises(LX2VError, match=match):
            merge_loras(m, [LoraSpec(path)])
    for k, v in m.state_dict().items():  # nothing was half-merged
        assert torch.equal(v, base.state_dict()[k]), k
