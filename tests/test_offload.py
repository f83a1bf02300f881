"""Block offload logic on the CPU: the slot/prefetch machinery, the disk reader, planning.

The CPU has no streams, so the ordering is checked with `HostSync`, a fake with the CUDA
contract: copies form one FIFO "copy stream"; `lazy=False` runs each copy when issued (a
copy into a slot still in use would corrupt the block about to run), `lazy=True` runs a
copy only when an event after it is waited on (a missing wait would let a block run on
stale weights). Every offloaded run must equal the resident run exactly.
"""

import dataclasses

import pytest
import torch
from torch import nn

from lightx2v.errors import CheckpointError, LX2VError
from lightx2v.models.wan.dit import WanDiT
from lightx2v.models.wan.tiny import random_dit_state, tiny_arch
from lightx2v.runtime.offload import (
    ALIGN,
    BlockLayout,
    BlockOffloadRunner,
    HostSync,
    StreamedBlocks,
    activation_bytes,
    apply_offload,
    load_dit_offloaded,
    make_runner,
    offloader_of,
    pack_arenas,
    plan_resident,
    remove_offload,
    spread,
    write_block_shards,
)
from lightx2v.runtime.runner import DiTRunner


def arch_of(task="i2v", layers=5):
    return dataclasses.replace(tiny_arch(task), num_layers=layers)


def model(task="i2v", layers=5, seed=0, quant=None) -> WanDiT:
    arch = arch_of(task, layers)
    m = WanDiT(arch)
    m.load_state_dict(random_dit_state(arch, seed))
    m = m.eval().requires_grad_(False)
    if quant:
        from lightx2v.quant.linear import quantize_dit

        quantize_dit(m, quant, keep_blocks=[1] if layers > 1 else [])  # mixed block shapes
    return m


def inputs(arch, seed=1, batch=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, 2, 4, 6, generator=g)
    y = torch.randn(batch, 20, 2, 4, 6, generator=g) if arch.is_i2v else None
    ctx = torch.randn(batch, 512, arch.text_dim, generator=g)
    ctx[:, 9:] = 0
    clip = torch.randn(batch, 257, arch.image_dim, generator=g) if arch.is_i2v else None
    return x, ctx, clip, y


def run_steps(dit, runner_cls=DiTRunner, steps=3, seed=1):
    """begin + a few steps; returns every step's output."""
    x, ctx, clip, y = inputs(dit.arch, seed)
    r = runner_cls(dit)
    r.begin(ctx, clip)
    outs = []
    for k in range(steps):
        t = torch.tensor([900.0 - 300 * k] * x.shape[0])
        outs.append(r(x + 0.1 * k, t, y))
    return outs


def assert_same(a, b):
    assert len(a) == len(b)
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u, v)


# ---------------------------------------------------------------------------------------
# layout, packing, planning


@pytest.mark.parametrize("quant", [None, "fp8"])
def test_layout_covers_every_tensor_aligned(quant):
    m = model(quant=quant)
    block = m.blocks[0]
    lay = BlockLayout(block, "blocks.0.")
    names = {e.key for e in lay.entries}
    want = {f"blocks.0.{k}" for k in block.state_dict()}
    assert names == want  # parameters and buffers (FP8 weight + scale are buffers)
    ends = 0
    for e in sorted(lay.entries, key=lambda e: e.offset):
        assert e.offset % ALIGN == 0 and e.offset >= ends
        ends = e.offset + e.nbytes
    assert lay.nbytes >= ends
    # views of a flat buffer reproduce the tensors
    flat = torch.zeros(lay.nbytes, dtype=torch.uint8)
    for v, t in zip(lay.views(flat), lay.current(), strict=True):
        v.data.copy_(t)
    for v, t in zip(lay.views(flat), lay.current(), strict=True):
        assert v.dtype == t.dtype and v.shape == t.shape and torch.equal(v, t)
        assert isinstance(v, nn.Parameter) == isinstance(t, nn.Parameter)


def test_pack_arenas_power_of_two_and_disjoint():
    fp8 = [404_000_000] * 40
    arena, place, used = pack_arenas(fp8, pinned=True)
    assert arena == 2 << 30 and len(used) == 8  # 5 blocks per 2 GiB arena: 16 GiB in all
    bf16 = [808_000_000] * 40
    arena, place, used = pack_arenas(bf16, pinned=True)
    assert sum(1 << (u - 1).bit_length() for u in used) == 32 << 30
    for sizes in (fp8, bf16, [5000, 300, 70_000, 1]):
        arena, place, used = pack_arenas(sizes, pinned=True)
        spans = sorted((a, off, off + n) for (a, off), n in zip(place, sizes, strict=True))
        for (a1, _, e1), (a2, b2, _) in zip(spans, spans[1:], strict=False):
            assert a1 != a2 or e1 <= b2
        assert all(off + n <= arena for (_, off), n in zip(place, sizes, strict=True))


def test_spread_and_plan_resident():
    assert spread(40, 40) == list(range(40))
    s = spread(40, 10)
    assert len(s) == 10 and all(b - a == 4 for a, b in zip(s, s[1:], strict=False))
    assert spread(5, 0) == []
    sizes = [100] * 10
    assert plan_resident(sizes, 1000, 100) == set(range(10))  # all fit: no slots needed
    r = plan_resident(sizes, 999, 100)  # one must stream, and then two slots are needed
    assert len(r) == 7
    assert plan_resident(sizes, 250, 100) == set()
    assert plan_resident(sizes, 0, 100) == set()


def test_activation_estimate_scale():
    from lightx2v.config import ARCH_PRESETS

    a = ARCH_PRESETS["i2v-14b"]
    gb = activation_bytes(a, 1, 32760) / 1e9
    assert 5 < gb < 10  # 480P, batch 1


# ---------------------------------------------------------------------------------------
# block mode


@pytest.mark.parametrize(
    "task,quant,lazy",
    [("t2v", None, False), ("t2v", None, True), ("i2v", None, True), ("i2v", "fp8", False),
     ("i2v", "fp8", True)],
)  # fmt: skip
def test_block_offload_equals_resident(task, quant, lazy):
    ref = run_steps(model(task, quant=quant))
    m = model(task, quant=quant)
    sync = HostSync(lazy=lazy)
    off = apply_offload(m, "block", "cpu", sync=sync)
    assert isinstance(m.blocks, StreamedBlocks) and offloader_of(m) is off
    assert_same(run_steps(m, BlockOffloadRunner), ref)
    # 5 blocks: begin + 3 steps stream 4 x 5 blocks, each copied once (cyclic prefetch,
    # plus the one prefetched for a next step that never comes)
    assert sync.copies == 4 * 5 + 1
    # between iterations every block rests on its host copy
    for lay, rest in zip(off.layouts, off._resting, strict=True):
        assert all(a is b for a, b in zip(lay.current(), rest, strict=True))
    # WanDiT.forward streams too
    x, ctx, clip, y = inputs(m.arch)
    t = torch.tensor([500.0, 500.0])
    with torch.no_grad():
        assert torch.equal(m(x, t, ctx, clip, y), model(task, quant=quant)(x, t, ctx, clip, y))


def test_missing_wait_is_caught_by_lazy_fake(monkeypatch):
    """The harness has teeth: without the compute-side wait, the lazy fake gives stale weights."""
    ref = run_steps(model())
    m = model()
    off = apply_offload(m, "block", "cpu", sync=HostSync(lazy=True))
    monkeypatch.setattr(off.sync, "wait", lambda ev: None)
    out = run_steps(m)
    assert any(not torch.equal(a, b) for a, b in zip(out, ref, strict=True))


def test_prefetch_into_busy_slot_is_caught_by_eager_fake(monkeypatch):
    """And with copies run eagerly, prefetching into the slot of the running block is caught."""
    ref = run_steps(model())
    m = model()
    off = apply_offload(m, "block", "cpu", sync=HostSync(lazy=False))
    orig = off._fetch
    monkeypatch.setattr(
        off, "_fetch", lambda i, avoid: orig(i, None if avoid is None else 1 - avoid)
    )
    out = run_steps(m)
    assert any(not torch.equal(a, b) for a, b in zip(out, ref, strict=True))


def test_prefetch_order_is_cyclic_double_buffer():
    m = model(layers=4)
    off = apply_offload(m, "block", "cpu", sync=HostSync())
    off.trace = []
    for _ in range(2):
        for _b in m.blocks:
            pass
    tr = off.trace
    # first pass: block 0 fetched, then each block's successor is copied before it runs
    assert tr[:3] == [("copy", 0, 0), ("copy", 1, 1), ("run", 0, 0)]
    runs = [(i, s) for kind, i, s in tr if kind == "run"]
    assert runs == [(0, 0), (1, 1), (2, 0), (3, 1)] * 2
    copies = [(i, s) for kind, i, s in tr if kind == "copy"]
    assert copies == [(0, 0), (1, 1), (2, 0), (3, 1), (0, 0), (1, 1), (2, 0), (3, 1), (0, 0)]
    # each copy of block k+1 is issued before block k runs, and into the other slot
    for k in range(len(tr) - 1):
        if tr[k][0] == "run" and tr[k][2] is not None:
            prev_copy = [e for e in tr[:k] if e[0] == "copy"][-1]
            assert prev_copy[2] != tr[k][2] or prev_copy[1] == tr[k][1]


def test_resident_and_streamed_mix():
    ref = run_steps(model(layers=6))
    m = model(layers=6)
    off = apply_offload(m, "auto", "cpu", sync=HostSync(lazy=True))
    off.set_resident({0, 2, 3, 5})
    assert off.streamed_blocks == [1, 4]
    off.trace = []
    assert_same(run_steps(m), ref)
    copied = {i for kind, i, _ in off.trace if kind == "copy"}
    assert copied == {1, 4}
    # demote some, promote others; still equal
    off.set_resident({1})
    assert_same(run_steps(m), ref)
    off.set_resident(set(range(6)))  # everything resident: slots freed
    assert off._slots is None and off.gpu_bytes() == sum(off.block_bytes)
    assert_same(run_steps(m), ref)


def test_auto_plan_uses_budget():
    m = model(layers=6)
    off = apply_offload(m, "auto", "cpu", sync=HostSync())
    blk = off.block_bytes[0]
    act = activation_bytes(m.arch, 2, 12)
    margin = 1 << 29
    # budget for all blocks: all resident
    off.plan(m.arch, 2, 12, budget=6 * blk + act + margin + 10, allocated=0)
    assert off.resident_blocks == list(range(6))
    # re-planning for the same shape is a no-op; a new shape re-plans
    off.plan(m.arch, 2, 12, budget=0, allocated=0)
    assert off.resident_blocks == list(range(6))
    # `allocated` counts what is on the device now, resident blocks included
    off.plan(m.arch, 1, 12, budget=3 * blk + activation_bytes(m.arch, 1, 12) + margin + 10,
             allocated=off.gpu_bytes())  # fmt: skip
    assert len(off.resident_blocks) == 1 and len(off.streamed_blocks) == 5
    # block mode never plans
    m2 = model(layers=3)
    off2 = apply_offload(m2, "block", "cpu", sync=HostSync())
    off2.plan(m2.arch, 2, 12, budget=1 << 40, allocated=0)
    assert off2.resident_blocks == []


def test_release_then_replan():
    ref = run_steps(model(layers=4))
    m = model(layers=4)
    off = apply_offload(m, "auto", "cpu", sync=HostSync(lazy=True))
    big = 1 << 40
    off.plan(m.arch, 2, 12, budget=big, allocated=0)
    assert off.resident_blocks == [0, 1, 2, 3]
    off.release()
    assert off.gpu_bytes() == 0 and off.resident_blocks == []
    off.plan(m.arch, 2, 12, budget=big, allocated=0)  # same shape: planned again
    assert off.resident_blocks == [0, 1, 2, 3]
    assert_same(run_steps(m), ref)


def test_cfg_sequential_runners_share_one_offloader():
    m_ref = model()
    x, ctx, clip, y = inputs(m_ref.arch)
    t = torch.tensor([700.0])

    def two(dit):
        rs = [make_runner(dit), make_runner(dit)]
        for i, r in enumerate(rs):
            r.begin(ctx[i : i + 1], clip[i : i + 1])
        return [r(x[i : i + 1], t, y[i : i + 1]) for i, r in enumerate(rs)]

    ref = two(m_ref)
    m = model()
    apply_offload(m, "block", "cpu", sync=HostSync(lazy=True))
    assert isinstance(make_runner(m), BlockOffloadRunner)
    assert_same(two(m), ref)


def test_teacache_mixin_composes():
    from lightx2v.runtime.teacache import TeaCacheMixin

    class TeaOffload(TeaCacheMixin, BlockOffloadRunner):
        pass

    ref = model()
    x, ctx, clip, y = inputs(ref.arch)
    outs = {}
    for name, dit in (("ref", ref), ("off", model())):
        if name == "off":
            apply_offload(dit, "block", "cpu", sync=HostSync(lazy=True))
        r = TeaOffload(dit, threshold=0.0, steps=2, variant="e", coefficients=(0.0, 1.0))
        r.begin(ctx, clip)
        outs[name] = [r(x, torch.tensor([t, t]), y) for t in (900.0, 500.0)]
    assert_same(outs["off"], outs["ref"])


def test_break_out_of_loop_keeps_state_consistent():
    ref = run_steps(model())
    m = model()
    apply_offload(m, "block", "cpu", sync=HostSync(lazy=True))
    for k, _b in enumerate(m.blocks):
        if k == 2:
            break
    assert_same(run_steps(m), ref)


def test_errors():
    m = model(layers=2)
    with pytest.raises(LX2VError, match="--offload"):
        apply_offload(m, "gpu", "cpu")
    assert apply_offload(m, "none", "cpu") is None
    apply_offload(m, "block", "cpu", sync=HostSync())
    with pytest.raises(LX2VError, match="already offloaded"):
        apply_offload(m, "block", "cpu", sync=HostSync())
    with pytest.raises(RuntimeError, match="nested"):
        for _b in m.blocks:
            for _c in m.blocks:
                pass
    m2 = model(layers=2)
    with pytest.raises(LX2VError, match="sources"):
        apply_offload(m2, "disk", "cpu", sync=HostSync())


def test_remove_offload_restores_plain_model():
    ref = run_steps(model(quant="fp8"))
    m = model(quant="fp8")
    apply_offload(m, "auto", "cpu", sync=HostSync())
    offloader_of(m).set_resident({0})
    run_steps(m)
    remove_offload(m)
    assert type(m.blocks) is nn.ModuleList and offloader_of(m) is None
    assert_same(run_steps(m), ref)
    want = model(quant="fp8").state_dict()
    got = m.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


# ---------------------------------------------------------------------------------------
# disk mode


@pytest.mark.parametrize(
    "quant,depth,lazy",
    [(None, 2, False), (None, 2, True), (None, 3, True), (None, 5, False), ("fp8", 3, True)],
)
def test_disk_offload_equals_resident(tmp_path, quant, depth, lazy):
    ref = run_steps(model(quant=quant))
    m = model(quant=quant)
    sources = write_block_shards(m, tmp_path / "shards")
    assert len({s.file for s in sources.values()}) == 5  # one file per block
    sync = HostSync(lazy=lazy)
    off = apply_offload(m, "disk", "cpu", sources=sources, sync=sync, readers=3, staging=depth)
    # the blocks' weights left memory: streamed blocks rest on meta tensors
    assert all(t.is_meta for b in m.blocks._modules.values() for t in b.parameters())
    assert_same(run_steps(m), ref)
    assert off.source.reads >= 20
    with pytest.raises(LX2VError, match="disk"):
        off.set_resident({0})
    remove_offload(m)
    assert_same(run_steps(m), ref)


def test_disk_read_chunks_in_parallel(tmp_path, monkeypatch):
    from lightx2v.runtime.offload import TensorReader

    monkeypatch.setattr(TensorReader, "CHUNK", 1000)  # many pieces per tensor
    ref = run_steps(model(quant="fp8"), steps=2)
    m = model(quant="fp8")
    src = write_block_shards(m, tmp_path)
    apply_offload(m, "disk", "cpu", sources=src, sync=HostSync(lazy=True), readers=4)
    assert_same(run_steps(m, steps=2), ref)


def test_disk_truncated_shard_is_named(tmp_path):
    m = model(layers=3)
    src = write_block_shards(m, tmp_path)
    f = tmp_path / "block-002.safetensors"
    data = f.read_bytes()
    apply_offload(m, "disk", "cpu", sources=src, sync=HostSync())
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="block-002"):
        run_steps(m)


def test_disk_wrong_dtype_refused(tmp_path):
    m = model(layers=2, quant="fp8")
    src = write_block_shards(m, tmp_path)
    key = next(k for k in src if k.endswith("ffn.0.weight"))
    src[key] = dataclasses.replace(src[key], dtype=torch.int8)
    apply_offload(m, "disk", "cpu", sources=src, sync=HostSync())
    with pytest.raises(CheckpointError, match="expected torch.float8"):
        run_steps(m)


# ---------------------------------------------------------------------------------------
# loading checkpoints straight into the offloaded form


@pytest.mark.parametrize("mode", ["block", "disk"])
@pytest.mark.parametrize("layout", ["official", "diffusers"])
def test_load_checkpoint_offloaded(tiny_ckpts, layout, mode):
    from lightx2v.models.wan.formats import load_dit, open_checkpoint

    ckpt = open_checkpoint(tiny_ckpts["i2v", layout])
    ref = run_steps(load_dit(ckpt, torch.float32, "cpu"))
    m = load_dit_offloaded(ckpt, torch.float32, "cpu", mode)
    assert offloader_of(m) is not None
    assert_same(run_steps(m), ref)


@pytest.mark.parametrize("mode", ["block", "disk", "none", "auto"])
def test_load_converted_fp8_offloaded(tmp_path, mode):
    from lightx2v.models.wan.formats import load_dit, open_checkpoint
    from lightx2v.quant.convert import convert
    from lightx2v.quant.synthetic import write_synthetic_official

    arch = arch_of("i2v", 4)
    src = write_synthetic_official(tmp_path / "src", arch)
    dst = convert(src, tmp_path / "fp8", quant="fp8", keep_high_precision=[2], progress=False,
                  components=False)  # fmt: skip
    ckpt = open_checkpoint(dst)
    ref = run_steps(load_dit(ckpt, torch.float32, "cpu"))
    m = load_dit_offloaded(ckpt, torch.float32, "cpu", mode)
    assert (offloader_of(m) is not None) == (mode in ("block", "disk"))
    assert_same(run_steps(m), ref)
