import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def interpreting():
    """Skips unless this is the child pytest that tests/test_ops.py starts with
    TRITON_INTERPRET=1 (Triton's interpreter must be on before triton is imported)."""
    import importlib.util

    if importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs in the child pytest with TRITON_INTERPRET=1")


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory):
    """Tiny random checkpoints, same seed in both layouts: {(task, layout): path}."""
    from lightx2v.models.wan.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    for task in ("t2v", "i2v"):
        for layout in ("official", "diffusers"):
            path = root / f"{task}-{layout}"
            write_tiny_checkpoint(path, task, layout, seed=0)
            out[task, layout] = path
    return out
