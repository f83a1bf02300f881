"""Quality report: per-layer weight error of a quantization and what it predicts.

Per layer: e = ‖W − deq(q(W))‖_F / ‖W‖_F over the (fused) weight.

Predicted output error of the whole DiT (`predicted_output_rel_l2`), a first-order argument:
1. One quantized linear. Per-row scaled rounding makes ΔW (and the activation error Δx)
   behave like noise uncorrelated with the inputs, so E‖ΔW·x‖² ≈ e_W²·‖W·x‖² (a random
   direction x sees the Frobenius average of W and ΔW alike). The input is quantized
   with the same e4m3/int8 recipe per token, so its relative error e_x is of the same size
   as e_W (activations are at least as heavy-tailed as weights; we take e_x ≈ e_W and
   cover the difference with the margin below). The two errors are independent, so the
   layer's output error is √(e_W² + e_x²) ≈ √2·e_W.
2. The network. Every block adds its branches to an fp32 residual stream; the output is
   the head applied to the sum. A first-order perturbation of each branch moves the output
   by at most that branch's relative error times its share of the output, and the shares
   of all branches sum to about one, so the output's relative error is bounded by the
   largest branch error: √2·max_l e_l. Products of two quantized layers inside one branch
   (q·kᵀ in attention, ffn.2 after ffn.0) add their relative errors in quadrature: a factor
   √2 more.
3. Margin ×1.5 for what the first-order view ignores (softmax and GELU curvature, e_x
   somewhat above e_W on outlier-heavy tokens).

  predicted = 1.5 · √2 · √2 · max_l e_l = 3 · max_l e_l

For FP8 e4m3 (3 mantissa bits) e_l ≈ 2.2–2.6 % on Gaussian-like weights, so the prediction
is ≈ 7–8 %; measured tiny-model errors are ≈ 3–4 % (tests/test_quant.py asserts
measured ≤ predicted). INT8 per-channel (uniform step amax/127) is ≈ 3–4× tighter.
"""

from __future__ import annotations

import math

import torch

from lightx2v.quant.fp8 import weight_error

PREDICTION_FACTOR = 3.0  # see the module docstring: 1.5 (margin) · √2 (activations) · √2 (chains)


def model_weight_errors(model: torch.nn.Module, scheme: str, keep_blocks=()) -> dict[str, float]:
    """Per fused block linear of an (unquantized) WanDiT: relative weight error of `scheme`."""
    from lightx2v.quant.linear import block_linears

    errs: dict[str, float] = {}
    keep = set(keep_blocks)
    for i, block in enumerate(model.blocks):
        if i in keep:
            continue
        for name, parts in block_linears(model.arch.is_i2v).items():
            ws = [block.get_submodule(p).weight.detach() for p in parts]
            errs[f"blocks.{i}.{name}"] = weight_error(torch.cat(ws), scheme)
    return errs


def summarize(errors: dict[str, float], scheme: str) -> dict:
    if not errors:
        return {"scheme": scheme, "layers": 0, "max": 0.0, "mean": 0.0, "rms": 0.0,
                "worst": None, "predicted_output_rel_l2": 0.0}  # fmt: skip
    vals = list(errors.values())
    worst = max(errors, key=errors.get)
    return {
        "scheme": scheme,
        "layers": len(vals),
        "max": max(vals),
        "mean": sum(vals) / len(vals),
        "rms": math.sqrt(sum(v * v for v in vals) / len(vals)),
        "worst": worst,
        "predicted_output_rel_l2": PREDICTION_FACTOR * max(vals),
    }


def format_table(errors: dict[str, float], summary: dict, limit: int | None = None) -> str:
    """Per-layer table (worst first when `limit` is set) and a summary line."""
    rows = sorted(errors.items(), key=lambda kv: -kv[1]) if limit else list(errors.items())
    if limit:
        rows = rows[:limit]
    width = max([len(k) for k, _ in rows] + [5])
    lines = [f"{'layer':<{width}}  rel. weight error ‖W−deq(q(W))‖/‖W‖"]
    lines += [f"{k:<{width}}  {v:.3e}" for k, v in rows]
    lines.append(
        f"{summary['scheme']}: {summary['layers']} layers, mean {summary['mean']:.3e}, "
        f"max {summary['max']:.3e} ({summary['worst']}); predicted DiT output rel. L2 "
        f"<= {summary['predicted_output_rel_l2']:.3e}"
    )
    return "\n".join(lines)
