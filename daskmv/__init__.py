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


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'daskmv' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
