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

import json
import math
from typing import Any

import numpy as np

from daskmv.errors import PipelineError, RowError
from daskmv.ops.base import Op, Output, Param, Row
from daskmv.ops.registry import register_op

#: Two-view configurations with a usable geometry (pycolmap's TwoViewGeometryConfiguration names).
VERIFIED = ("CALIBRATED", "UNCALIBRATED", "PLANAR", "PANORAMIC", "PLANAR_OR_PANORAMIC")


def default_focal(width: int, height: int) -> float:
    """COLMAP's focal length guess when nothing better is known: 1.2 x the longer side."""
    return 1.2 * max(width, height)


def mutual_nearest(desc_a: np.ndarray, desc_b: np.ndarray, ratio: float = 0.8, max_distance: float = 0.7,
                   block: int = 1 << 24, device: str = "cpu") -> np.ndarray:
    """Matches [M, 2] (uint32) that are each other's nearest neighbour, pass the ratio test and lie within
    ``max_distance`` (L2 between unit-normalised descriptors). Memory: ``block`` similarities at a time.

    Neighbours are ranked by dot product, as COLMAP's matcher does (SIFT descriptors are unit-normalised);
    the ratio test and ``max_distance`` use the exact distances of the two best. uint8 descriptors on CPU
    are multiplied as int8 (halved: exact integer dot products, twice as fast as float32)."""
    import torch

    na, nb = len(desc_a), len(desc_b)
    if na == 0 or nb == 0:
        return np.zeros((0, 2), np.uint32)
    A, B, integer = _operands(desc_a, desc_b, device)
    norm_a = torch.linalg.vector_norm(A.float(), dim=1).clamp_min(1e-12)
    norm_b = torch.linalg.vector_norm(B.float(), dim=1).clamp_min(1e-12)
    rows = max(1, block // nb)
    reduce = _top2_int8 if integer else _top2_torch
    best, second, best_sim, second_sim, col_max = reduce(A, B.T.contiguous() if integer else B.T, rows)
    norm_a, norm_b = norm_a.cpu().numpy(), norm_b.cpu().numpy()
    dist = np.sqrt(np.clip(2 - 2 * best_sim / (norm_a * norm_b[best]), 0, None))
    good = dist <= max_distance
    if nb >= 2:
        dist2 = np.sqrt(np.clip(2 - 2 * second_sim / (norm_a * norm_b[second]), 0, None))
        good &= dist < ratio * dist2
    keep = good & (best_sim >= col_max[best])  # a is also b's best (ties: both kept, as rare as they are)
    idx = np.nonzero(keep)[0]
    return np.stack([idx, best[idx]], axis=1).astype(np.uint32)


Top2 = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _top2_int8(A: Any, Bt: Any, rows: int) -> Top2:
    """Per row of ``A @ Bt``: best and second-best column and their similarities; per column: the largest.

    The product is torch's int8 matrix product; the reductions are numpy's, which vectorise along a row
    where torch's top-k does not (5,000 x 5,000: 17 ms against 57 ms)."""
    import torch

    na, nb = A.shape[0], Bt.shape[1]
    best, second = np.zeros(na, np.int64), np.zeros(na, np.int64)
    best_sim, second_sim = np.zeros(na, np.float64), np.zeros(na, np.float64)
    col_max = np.full(nb, np.iinfo(np.int32).min, np.int64)
    for s in range(0, na, rows):
        sim = torch._int_mm(A[s : s + rows], Bt).numpy()
        r = np.arange(len(sim))
        np.maximum(col_max, sim.max(axis=0), out=col_max)
        i1 = sim.argmax(axis=1)
        best[s : s + rows], best_sim[s : s + rows] = i1, sim[r, i1]
        if nb >= 2:
            sim[r, i1] = np.iinfo(np.int32).min
            i2 = sim.argmax(axis=1)
            second[s : s + rows], second_sim[s : s + rows] = i2, sim[r, i2]
    return best, second, best_sim, second_sim, col_max.astype(np.float64)


def _top2_torch(A: Any, Bt: Any, rows: int) -> Top2:
    """:func:`_top2_int8` for float operands, in torch on their device (a GPU's top-k is fast)."""
    import torch

    na, nb = A.shape[0], Bt.shape[1]
    k = min(2, nb)
    idx = torch.empty((na, k), dtype=torch.long, device=A.device)
    val = torch.empty((na, k), dtype=torch.float32, device=A.device)
    col_max: Any = None
    for s in range(0, na, rows):
        sim = A[s : s + rows] @ Bt
        top = sim.topk(k, dim=1)
        idx[s : s + rows], val[s : s + rows] = top.indices, top.values
        block_max = sim.amax(dim=0)
        col_max = block_max if col_max is None else torch.maximum(col_max, block_max)
    idx_np, val_np = idx.cpu().numpy(), val.double().cpu().numpy()
    last = k - 1
    return (idx_np[:, 0], idx_np[:, last], val_np[:, 0], val_np[:, last], col_max.double().cpu().numpy())


def _operands(desc_a: np.ndarray, desc_b: np.ndarray, device: str) -> tuple[Any, Any, bool]:
    """The descriptors as tensors for the similarity product: int8 for uint8 descriptors on CPU (when torch has
    an int8 matrix product), else unit-normalised float32."""
    import torch

    if desc_a.dtype == np.uint8 and desc_b.dtype == np.uint8 and device == "cpu" and hasattr(torch, "_int_mm"):
        A = torch.from_numpy(np.ascontiguousarray(desc_a >> 1).view(np.int8))
        B = torch.from_numpy(np.ascontiguousarray(desc_b >> 1).view(np.int8))
        try:
            torch._int_mm(A[:1].repeat(32, 1), B[:1].T.repeat(1, 8).contiguous())
            return A, B, True
        except RuntimeError:
            pass
    A = torch.nn.functional.normalize(torch.from_numpy(np.asarray(desc_a, np.float32)).to(device), dim=1)
    B = torch.nn.functional.normalize(torch.from_numpy(np.asarray(desc_b, np.float32)).to(device), dim=1)
    return A, B, False


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
        "block": Param(1 << 24, "similarities computed at once (memory: 4 bytes each)"),
        "max_error": Param(4.0, "RANSAC threshold in pixels"),
        "min_inliers": Param(15, "fewer verified matches than this: the pair has no geometry"),
        "model": Param(None, "a learned matcher instead of nearest neighbours: TorchScript file or module:factory",
                       path=True, types=(str, type(None))),
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
        if self.matcher is not None:
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
