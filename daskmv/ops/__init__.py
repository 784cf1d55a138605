"""The op registry and the built-in ops. Importing this package registers every built-in."""

from daskmv.ops.base import LOADER_INPUTS, Op, Output, Param, Row
from daskmv.ops.registry import REGISTRY, get_op_class, register_op
from daskmv.ops import core, degrade, relight, retinex, segment, torch_model  # noqa: F401  (registration)

__all__ = ["LOADER_INPUTS", "Op", "Output", "Param", "Row", "REGISTRY", "get_op_class", "register_op"]

from daskmv import sfm  # noqa: E402,F401  (registers the structure-from-motion ops and the sfm pipeline)
from daskmv.video import ops as _video_ops  # noqa: E402,F401  (registers video, frame and the frames pipeline)
from daskmv.splat import op as _splat_op  # noqa: E402,F401  (registers splat)
