"""Structure from motion at dataset scale: a manifest of photos (one row per image, a ``scene`` column) in,
one COLMAP model per scene out, ready for Gaussian splatting.

One short module per step, in the order the ``sfm`` pipeline runs them:

- :mod:`~daskmv.sfm.features`: ``features`` op: SIFT (pycolmap or OpenCV) or a learned extractor, giant
  images tiled; keypoints and descriptors stored as arrays;
- :mod:`~daskmv.sfm.retrieval`: ``global_descriptor`` op: a VLAD vector per image for retrieval pairs;
- the ``pairs`` reshape (:mod:`daskmv.reshape`): exhaustive, sequential (+ loop closures), retrieval, auto;
- :mod:`~daskmv.sfm.match`: ``match`` op: blockwise mutual nearest neighbours in torch (or a learned matcher),
  pycolmap two-view verification; also alone over a user's own pair manifest;
- the ``group`` reshape: matched pairs become one row per scene;
- :mod:`~daskmv.sfm.reconstruct`: ``reconstruct`` op: pycolmap database (:mod:`~daskmv.sfm.database`),
  incremental or global mapping, metric scale (:mod:`~daskmv.sfm.scale`), export (:mod:`~daskmv.sfm.export`).

:mod:`~daskmv.sfm.synthetic` renders scenes with known cameras (tests, benchmarks, the demo) and
:mod:`~daskmv.sfm.evaluate` scores a model against them. Each op is usable alone; pycolmap is imported only
when an op computes.
"""

from daskmv.ops.registry import register_pipeline
from daskmv.sfm import features, match, reconstruct, retrieval  # noqa: F401  (registration)

#: The steps of ``--pipeline sfm``; set any step's parameters as ``{sfm: {pairs: {mode: retrieval, k: 20}}}``.
SFM_STEPS = [
    {"op": "features"},
    {"op": "global_descriptor"},
    {"op": "pairs", "params": {"by": "scene", "default_group": "all", "mode": "auto", "column": "global", "k": 20}},
    {"op": "match"},
    {"op": "group", "params": {"by": "scene", "default_group": "all"}},
    {"op": "reconstruct"},
]
register_pipeline("sfm", SFM_STEPS)
