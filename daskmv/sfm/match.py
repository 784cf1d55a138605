"""``match``: descriptor matching and geometric verification, one pair row at a time.

Mutual nearest neighbours with Lowe's ratio test, computed in torch over row blocks of the similarity
matrix, so memory stays at ``block`` similarities whatever the feature counts (10,000 x 10,000 features
never form a full matrix); on the worker's GPU when it has one. A learned matcher can replace it (see
:mod:`daskmv.sfm.learned`). The putative matches are then verified by pycolmap's two-view geometry (RANSAC
on E/F/H, as COLMAP does); the inliers and the geometry are stored per pair, ready for a reconstruction.

Inputs are the features an earlier ``features`` step stored (``array:keypoints_path_a`` ...), or, with
``extract: true``, the two images of a pair manifest (``path_a``, ``path_b``): the matching job users script
today, with ``draw: true`` for a picture of the verified matches per pair.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any

import numpy as np

from daskmv.caches import ProcessCache
from daskmv.errors import PipelineError, RowError
from daskmv.ops.base import Op, Output, Param, Row
from daskmv.ops.registry import register_op

#: Two-view configurations with a usable geometry (pycolmap's TwoViewGeometryConfiguration names).
VERIFIED = ("CALIBRATED", "UNCALIBRATED", "PLANAR", "PANORAMIC", "PLANAR_OR_PANORAMIC")


def default_focal(width: int, height: int) -> float:
    """COLMAP's focal length guess when nothing better is known: 1.2 x the longer side."""
    return 1.2 * max(width, height)


#: Similarities per block by device kind: on CPU a block that stays in a core's cache (2^20 int32 = 4 MB:
#: 5,000 x 5,000 features in 27 ms, against 70 ms for 2^24 that spill to memory); a GPU wants large products.
DEFAULT_BLOCK = {"cpu": 1 << 20, "cuda": 1 << 26}

#: The length of a uint8 SIFT descriptor (COLMAP stores RootSIFT scaled to 512): distances are L2 / 512.
SIFT_NORM = 512


def mutual_nearest(desc_a: np.ndarray, desc_b: np.ndarray, ratio: float = 0.8, max_distance: float = 0.7,
                   block: int | None = None, device: str = "cpu") -> np.ndarray:
    """Matches [M, 2] (uint32) as COLMAP's SIFT matcher makes them: ``a`` and ``b`` are each other's nearest
    neighbour, and *both* directions pass the ratio test and lie within ``max_distance``. Memory: ``block``
    similarities at a time (None: :data:`DEFAULT_BLOCK` for the device).

    Neighbours are ranked by dot product, as COLMAP's brute-force matcher ranks them; the tests use exact L2
    distances between descriptors at unit length (uint8 SIFT at COLMAP's length of 512, float ones
    normalised). The reverse direction is searched only from the columns some row chose and kept (a pair
    that does not overlap has few), which is what drops most of its chance matches before RANSAC."""
    na, nb = len(desc_a), len(desc_b)
    if na == 0 or nb == 0:
        return np.zeros((0, 2), np.uint32)
    block = block or DEFAULT_BLOCK.get(device.split(":")[0], DEFAULT_BLOCK["cuda"])
    search = _IntegerSearch(desc_a, desc_b) if _integer_product(desc_a, desc_b, device) else \
        _FloatSearch(desc_a, desc_b, device)
    everything = np.arange(na)
    j1, j2 = search.best_two(None, forward=True, block=block)
    rows = everything[_passes(search.distance(everything, j1), search.distance(everything, j2), ratio, max_distance)]
    cols, slot = np.unique(j1[rows], return_inverse=True)
    i1, i2 = search.best_two(cols, forward=False, block=block)
    back = _passes(search.distance(i1, cols), search.distance(i2, cols), ratio, max_distance)
    keep = rows[back[slot] & (i1[slot] == rows)]
    return np.stack([keep, j1[keep]], axis=1).astype(np.uint32)


def _passes(first: np.ndarray, second: np.ndarray, ratio: float, max_distance: float) -> np.ndarray:
    """COLMAP's tests on a query's two nearest distances (a missing second is ``inf``: the ratio passes)."""
    return (first <= max_distance) & (first < ratio * second)


class _Search:
    """The two searches of a pair's matching; subclasses say with what numbers and on what hardware."""

    def distance(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """Exact L2 between a[i] and b[j] at unit length (``inf`` where an index is -1: no such neighbour)."""
        missing = (i < 0) | (j < 0)
        d = self._distance(np.where(missing, 0, i), np.where(missing, 0, j))
        return np.where(missing, np.inf, d)

    def _distance(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """:meth:`distance` for valid indices."""
        raise NotImplementedError

    def best_two(self, queries: np.ndarray | None, forward: bool, block: int) -> tuple[np.ndarray, np.ndarray]:
        """For a's rows ``queries`` (forward; None: all) or b's, the indices of the two most similar on the other side
        (-1 where the other side has one item), ``block`` similarities at a time."""
        raise NotImplementedError


def _unit(desc: np.ndarray) -> np.ndarray:
    """Descriptors at unit length in float64: uint8 SIFT at COLMAP's 512, others normalised."""
    if desc.dtype == np.uint8:
        return desc.astype(np.float64) / SIFT_NORM
    d = desc.astype(np.float64)
    return d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)


class _IntegerSearch(_Search):
    """uint8 descriptors on CPU: torch's int8 product of the halved descriptors (exact integers, twice as
    fast as float32; non-negative operands run twice as fast again as signed ones), numpy's reductions
    (they vectorise along a row where torch's top-k does not: 5,000 x 5,000 in 17 ms against 57 ms), and
    exact integer distances. Each image's operands are prepared once per process (:class:`_Operands`), not
    once per pair: an image is in k pairs or more."""

    def __init__(self, desc_a: np.ndarray, desc_b: np.ndarray) -> None:
        self.a, self.b = _operands(desc_a), _operands(desc_b)

    def _distance(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        dot = np.einsum("ij,ij->i", self.a.wide[i], self.b.wide[j])
        d2 = (self.a.sq[i] + self.b.sq[j] - 2 * dot).astype(np.float64)
        return np.sqrt(np.clip(d2, 0, None)) / SIFT_NORM

    def best_two(self, queries: np.ndarray | None, forward: bool, block: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        query, index = (self.a, self.b) if forward else (self.b, self.a)
        q = query.half if queries is None else query.half[torch.from_numpy(queries)]
        others = index.half_t
        rows = max(1, block // others.shape[1])
        first, second = np.empty(len(q), np.int64), np.full(len(q), -1, np.int64)
        lowest = np.iinfo(np.int32).min
        for s in range(0, len(q), rows):
            sim = torch._int_mm(q[s : s + rows], others).numpy()
            first[s : s + rows] = at = sim.argmax(axis=1)
            if sim.shape[1] > 1:
                sim[np.arange(len(sim)), at] = lowest
                second[s : s + rows] = sim.argmax(axis=1)
        return first, second


class _Operands:
    """One image's uint8 descriptors as the integer search uses them: halved int8 rows (torch's int8
    product needs [n, 128] and its transpose [128, n] contiguous), int32 rows and squared norms for the
    exact distances."""

    def __init__(self, desc: np.ndarray) -> None:
        import torch

        self.half = torch.from_numpy(np.ascontiguousarray(desc >> 1).view(np.int8))
        self.half_t = self.half.T.contiguous()
        self.wide = desc.astype(np.int32)
        self.sq = np.einsum("ij,ij->i", self.wide, self.wide).astype(np.int64)
        self.nbytes = 2 * self.half.numel() + self.wide.nbytes


#: Operands of read-only descriptor arrays, kept per process: the entry holds the array, so its ``id`` is
#: not reused while it is kept.
_OPERANDS: ProcessCache[tuple[np.ndarray, _Operands]] = ProcessCache(64 << 20, size=lambda entry: entry[1].nbytes)


def _operands(desc: np.ndarray) -> _Operands:
    """``desc``'s operands, made once per process when the array is read-only, as rows read through array
    references are (their bytes cannot change while kept); a writable array is prepared afresh each time."""
    if desc.flags.writeable:
        return _Operands(desc)
    return _OPERANDS.get_or_make(id(desc), lambda: (desc, _Operands(desc)))[1]


class _FloatSearch(_Search):
    """Any descriptors, float32 products in torch on the device (a GPU's top-k is fast)."""

    def __init__(self, desc_a: np.ndarray, desc_b: np.ndarray, device: str) -> None:
        import torch

        self.unit_a, self.unit_b = _unit(desc_a), _unit(desc_b)
        self.sq_a, self.sq_b = (np.einsum("ij,ij->i", u, u) for u in (self.unit_a, self.unit_b))
        self.device = device
        self.tensors = [torch.from_numpy(u.astype(np.float32)).to(device) for u in (self.unit_a, self.unit_b)]

    def _distance(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        dot = np.einsum("ij,ij->i", self.unit_a[i], self.unit_b[j])
        return np.sqrt(np.clip(self.sq_a[i] + self.sq_b[j] - 2 * dot, 0, None))

    def best_two(self, queries: np.ndarray | None, forward: bool, block: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        query, index = self.tensors if forward else self.tensors[::-1]
        if queries is not None:
            query = query[torch.from_numpy(queries).to(self.device)]
        rows = max(1, block // len(index))
        k = min(2, len(index))
        top = torch.full((len(query), 2), -1, dtype=torch.long, device=query.device)
        for s in range(0, len(query), rows):
            top[s : s + rows, :k] = (query[s : s + rows] @ index.T).topk(k, dim=1).indices
        top = top.cpu().numpy()
        return top[:, 0], top[:, 1]


def _integer_product(desc_a: np.ndarray, desc_b: np.ndarray, device: str) -> bool:
    """Whether torch's int8 matrix product serves these descriptors (uint8 on CPU, where torch has it)."""
    return desc_a.dtype == np.uint8 and desc_b.dtype == np.uint8 and device == "cpu" and _int8_product_runs()


@functools.lru_cache(maxsize=1)
def _int8_product_runs() -> bool:
    """Whether this torch build runs ``_int_mm`` on CPU (checked once per process)."""
    import torch

    if not hasattr(torch, "_int_mm"):
        return False
    try:
        probe = torch.zeros((32, 128), dtype=torch.int8)
        torch._int_mm(probe, probe.T.repeat(1, 8).contiguous())
        return True
    except RuntimeError:
        return False


def camera(width: int, height: int, focal: float | None = None) -> Any:
    """A SIMPLE_RADIAL camera as COLMAP makes one for an image of unknown intrinsics."""
    import pycolmap

    f = focal or default_focal(width, height)
    return pycolmap.Camera(model="SIMPLE_RADIAL", width=int(width), height=int(height),
                           params=[f, width / 2, height / 2, 0.0])


def verify(kpts_a: np.ndarray, size_a: tuple[int, int], kpts_b: np.ndarray, size_b: tuple[int, int],
           matches: np.ndarray, max_error: float = 4.0, min_inliers: int = 15) -> tuple[np.ndarray, dict[str, Any]]:
    """RANSAC two-view geometry of putative ``matches``: (inlier matches, geometry as JSON-able dict)."""
    import pycolmap

    if len(matches) < min_inliers:
        return np.zeros((0, 2), np.uint32), {"config": "DEGENERATE"}
    options = pycolmap.TwoViewGeometryOptions()
    options.min_num_inliers = min_inliers
    options.ransac.max_error = max_error
    options.ransac.random_seed = 0  # the same inliers on every run and every retry
    options.ransac.max_num_trials = ransac_trials(len(matches), min_inliers, options.ransac.confidence,
                                                  options.ransac.max_num_trials)
    geometry = pycolmap.estimate_two_view_geometry(
        camera(*size_a), np.asarray(kpts_a[:, :2], np.float64), camera(*size_b), np.asarray(kpts_b[:, :2], np.float64),
        np.ascontiguousarray(matches, dtype=np.uint32), options)
    config = pycolmap.TwoViewGeometryConfiguration(int(geometry.config)).name
    inliers = np.asarray(geometry.inlier_matches, dtype=np.uint32).reshape(-1, 2)
    if config not in VERIFIED:
        inliers = np.zeros((0, 2), np.uint32)
    doc: dict[str, Any] = {"config": config}
    for key in ("F", "E", "H"):
        value = np.asarray(getattr(geometry, key))
        if value.size == 9 and np.isfinite(value).all() and np.abs(value).sum() > 0:
            doc[key] = value.tolist()
    return inliers, doc


def ransac_trials(n: int, min_inliers: int, confidence: float = 0.999, most: int = 10000) -> int:
    """Enough RANSAC trials to find, with ``confidence``, a geometry that has at least ``min_inliers`` of ``n``
    putative matches as inliers (7-point samples, the fundamental matrix's, the largest minimal set).

    A pair that overlaps has many matches and RANSAC stops early by itself; a pair that does not (tens of
    chance matches, a third of a retrieval's candidates) would otherwise run all 10,000 trials (0.3 s) to
    conclude so. With 35 putatives, 2,550 trials already find any geometry worth keeping."""
    ratio = min(1.0, min_inliers / max(n, 1))
    if ratio >= 1.0:  # every putative must be an inlier: RANSAC's own minimum is plenty (and what it checks)
        return min(most, 100)
    per_trial = -math.log1p(-(ratio**7))  # 0 when the ratio is tiny (thousands of putatives): no bound
    if per_trial <= 0:
        return most
    needed = -math.log1p(-confidence) / per_trial
    return int(min(most, max(100, math.ceil(needed))))


@register_op
class Match(Op):
    name = "match"
    help = ("Match two images' features (mutual nearest neighbour + ratio test in torch blocks, or a learned "
            "matcher) and verify them with pycolmap two-view geometry; stores the inlier matches per pair.")
    gpu = True
    min_partition_rows = 4
    requires = ("pycolmap",)
    params = {
        "ratio": Param(0.8, "Lowe's ratio test threshold"),
        "max_distance": Param(0.7, "largest descriptor distance (unit-normalised L2) of a match"),
        "block": Param(None, "similarities computed at once (memory: 4 bytes each; none: 2^20 on CPU, where a "
                       "block in cache is 2.6x faster than 2^24, and 2^26 on a GPU)", types=(int, type(None))),
        "max_error": Param(4.0, "RANSAC threshold in pixels"),
        "min_inliers": Param(15, "fewer verified matches than this: the pair has no geometry"),
        "model": Param(None, "a learned matcher instead of nearest neighbours: TorchScript file or module:factory",
                       path=True, types=(str, type(None))),
        "tile_above": Param(0, "learned matcher: pairs with an image side above this many pixels are matched tile "
                            "against tile, each call seeing one tile's keypoints a side (0: never)"),
        "tile_size": Param(2048, "tile side in pixels (as the features op tiles)"),
        "tile_overlap": Param(128, "pixels shared by neighbouring tiles (as the features op tiles)"),
        "extract": Param(False, "extract features from path_a/path_b here (a pair manifest with no features step)"),
        "features": Param({}, "extract: parameters of the features op (e.g. {max_features: 4096})"),
        "draw": Param(False, "store a picture of the verified matches per pair (reads both images)"),
    }

    def check_params(self) -> None:
        if self.config["model"]:
            from daskmv.ops.torch_model import check_model

            self.config["model"], _ = check_model(self.name, self.config["model"], None)
        if not 0 < self.config["ratio"] <= 1:
            raise PipelineError(f"op 'match': ratio must be in (0, 1], not {self.config['ratio']}")
        if self.config["tile_above"]:
            if not self.config["model"]:
                raise PipelineError("op 'match': tile_above is for learned matchers (model:); nearest-neighbour "
                                    "matching is bounded by block already")
            from daskmv.sfm.features import check_tiling

            check_tiling(self.name, self.config["tile_size"], self.config["tile_overlap"])
        if self.config["block"] is not None and self.config["block"] < 1:
            raise PipelineError(f"op 'match': block must be a positive number of similarities, not {self.config['block']}")
        self.extractor: Any = None
        if self.config["extract"]:
            from daskmv.sfm.features import Features

            self.extractor = Features(**self.config["features"])
        self.matcher: Any = None
        self.device = "cpu"

    def input_names(self) -> tuple[str, ...]:
        if self.config["extract"]:
            return ("image:path_a", "image:path_b")
        names = ("array:keypoints_path_a", "array:descriptors_path_a", "width_a", "height_a",
                 "array:keypoints_path_b", "array:descriptors_path_b", "width_b", "height_b")
        return names + (("image:path_a", "image:path_b") if self.config["draw"] else ())

    def output_specs(self) -> tuple[Output, ...]:
        outs = (Output("matches", "array", "uint32", "verified matches: keypoint index in a, in b"),
                Output("n_putative", "column", "int64", "matches before verification"),
                Output("n_inliers", "column", "int64", "verified matches"),
                Output("geometry", "column", "json", "two-view configuration and its F / E / H"))
        if self.config["extract"]:
            outs += (Output("keypoints_a", "array", "float32", "features of image a"),
                     Output("keypoints_b", "array", "float32", "features of image b"))
        if self.config["draw"]:
            outs += (Output("picture", "array", "uint8", "the two images side by side, verified matches drawn"),)
        return outs

    def row_bytes(self) -> int:
        return 64 << 10 if not self.config["draw"] else 1 << 20

    def setup(self, device: str) -> None:
        self.device = device
        if self.config["model"]:
            from daskmv.sfm.learned import LearnedMatcher

            self.matcher = LearnedMatcher(self.config["model"], device)
        if self.extractor is not None:
            self.extractor.setup(device)

    def process(self, rows: list[Row]) -> list[Row | BaseException]:
        return [self._one(row) for row in rows]

    def _features(self, row: Row, side: str) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        if self.extractor is not None:
            got = self.extractor._one({"image": row[f"image:path_{side}"]})
            return got["keypoints"], got["descriptors"], (got["width"], got["height"])
        kpts, desc = row[f"array:keypoints_path_{side}"], row[f"array:descriptors_path_{side}"]
        return kpts, desc, (int(row[f"width_{side}"]), int(row[f"height_{side}"]))

    def _one(self, row: Row) -> Row:
        ka, da, size_a = self._features(row, "a")
        kb, db, size_b = self._features(row, "b")
        c = self.config
        if self.matcher is not None and c["tile_above"] and max(*size_a, *size_b) > c["tile_above"]:
            from daskmv.sfm.learned import tiled_matches

            putative = tiled_matches(self.matcher, ka, da, size_a, kb, db, size_b, c["tile_size"], c["tile_overlap"])
        elif self.matcher is not None:
            putative = self.matcher(ka, da, kb, db)
        else:
            if da.shape[1:] != db.shape[1:]:
                raise RowError(f"descriptors of different sizes: {da.shape[1:]} and {db.shape[1:]}")
            putative = mutual_nearest(da, db, c["ratio"], c["max_distance"], c["block"], self.device)
        inliers, geometry = verify(ka, size_a, kb, size_b, putative, c["max_error"], c["min_inliers"])
        out: Row = {"matches": inliers, "n_putative": len(putative), "n_inliers": len(inliers), "geometry": geometry}
        if c["extract"]:
            out["keypoints_a"], out["keypoints_b"] = ka, kb
        if c["draw"]:
            from daskmv.sfm.draw import match_picture

            out["picture"] = match_picture(row["image:path_a"], ka, row["image:path_b"], kb, inliers)
        return out


def geometry_of(text: str | None) -> dict[str, Any]:
    """A stored geometry column value as a dict ({} when missing)."""
    if not text:
        return {}
    return json.loads(text) if isinstance(text, str) else dict(text)
