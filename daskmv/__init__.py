"""daskmv: turn a manifest of images or videos into processed datasets on Dask clusters.

    import daskmv
    result = daskmv.run("images.parquet", "resize,stats", out="out/")
    frame = result.manifest()
"""

from daskmv.engine import RunOptions, RunResult, run
from daskmv.errors import DaskmvError, ManifestError, PipelineError, RunError, StoreError, UsageError
from daskmv.manifest import Manifest, read_manifest
from daskmv.ops import Op, Output, Param, register_op
from daskmv.pipeline import Pipeline, register_pipeline

__version__ = "0.1.0"

__all__ = [
    "run", "RunOptions", "RunResult", "read_manifest", "Manifest", "Pipeline", "register_pipeline",
    "Op", "Output", "Param", "register_op",
    "DaskmvError", "UsageError", "ManifestError", "PipelineError", "StoreError", "RunError",
]
