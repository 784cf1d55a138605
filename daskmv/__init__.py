"""daskmv: turn a manifest of images or videos into processed datasets on Dask clusters.

    import daskmv
    result = daskmv.run("images.parquet", "resize,stats", out="out/")
    frame = result.manifest()

Names are imported on first use, so a worker process that only runs partitions never imports the
driver's modules (dask.dataframe, the engine).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "run": "daskmv.engine", "RunOptions": "daskmv.engine", "RunResult": "daskmv.engine",
    "read_manifest": "daskmv.manifest", "Manifest": "daskmv.manifest",
    "Pipeline": "daskmv.pipeline", "register_pipeline": "daskmv.pipeline",
    "Op": "daskmv.ops", "Output": "daskmv.ops", "Param": "daskmv.ops", "register_op": "daskmv.ops",
    "DaskmvError": "daskmv.errors", "UsageError": "daskmv.errors", "ManifestError": "daskmv.errors",
    "PipelineError": "daskmv.errors", "StoreError": "daskmv.errors", "RunError": "daskmv.errors",
}

__all__ = sorted(_EXPORTS)


def _hide_folder_named_sparse() -> None:
    """A COLMAP project has a ``sparse/`` folder; from a notebook or script run there, ``import sparse`` finds
    it as a namespace package, and dask.array (which tries the pydata ``sparse`` library) fails with
    "module 'sparse' has no attribute 'SparseArray'". A namespace package is found only when no real
    ``sparse`` is installed, so hiding it loses nothing."""
    import importlib.util
    import sys

    if "sparse" in sys.modules:
        return
    try:
        spec = importlib.util.find_spec("sparse")
    except (ImportError, ValueError):
        return
    if spec is not None and spec.origin is None and spec.submodule_search_locations is not None:
        sys.modules["sparse"] = None  # type: ignore[assignment]  # `import sparse` raises ImportError


_hide_folder_named_sparse()


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'daskmv' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
