"""lightx2v: fast Wan2.1 video generation."""

__version__ = "0.1.0"


def _map_source_kernels() -> None:
    """Make `lightx2v.kernels` importable from a source checkout.

    setup.py installs the Triton kernels of the top-level kernels/ folder as the
    subpackage lightx2v.kernels; run from a checkout (PYTHONPATH=.) that mapping does not
    exist, so it is registered here, and both ways import the same modules.
    """
    import importlib.util
    import sys
    from pathlib import Path

    name = "lightx2v.kernels"
    if name in sys.modules or importlib.util.find_spec(name) is not None:
        return
    src = Path(__file__).resolve().parent.parent / "kernels" / "__init__.py"
    if not src.is_file():
        return
    spec = importlib.util.spec_from_file_location(
        name, src, submodule_search_locations=[str(src.parent)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    globals()["kernels"] = module


_map_source_kernels()
