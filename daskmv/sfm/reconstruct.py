"""``reconstruct``: one COLMAP model per scene row, scaled, exported for Gaussian splatting.

A scene row is what grouping the matched pairs by scene makes: lists of each pair's image ids, paths, sizes,
feature and match references and geometry. The op writes them into a pycolmap database, runs incremental
(COLMAP) or global (GLOMAP) mapping, keeps the largest model (the others are counted), fuses a metric scale
(:mod:`daskmv.sfm.scale`), and exports the model with undistorted images (:mod:`daskmv.sfm.export`) as the
scene's ``model`` artifact. A scene that cannot be reconstructed is a row error that says why; other scenes
go on.
"""

from __future__ import annotations

import difflib
import os
import shutil
import tempfile
from typing import Any

import numpy as np

from daskmv.errors import PipelineError, RowError
from daskmv.ops.base import Op, Output, Param, Row
from daskmv.ops.registry import register_op
from daskmv.sfm.database import SceneImage, ScenePair, write_database
from daskmv.sfm.match import geometry_of

MAPPERS = ("incremental", "global")
#: Per-scene folders in the worker's temporary directory: the scratch one (database, image links, raw models)
#: is removed when the scene is done, the model one is moved into the root as the ``model`` artifact.
SCRATCH_PREFIX, MODEL_PREFIX = "daskmv-sfm-", "daskmv-model-"


@register_op
class Reconstruct(Op):
    name = "reconstruct"
    help = ("Scene rows (matched pairs grouped by scene) -> a COLMAP model per scene with pycolmap, a metric "
            "scale, and a 3DGS-ready export (sparse/0 + undistorted images).")
    min_partition_rows = 1
    requires = ("pycolmap",)
    params = {
        "mapper": Param("incremental", "pycolmap's incremental_mapping (COLMAP) or global_mapping (GLOMAP)", MAPPERS),
        "min_images": Param(3, "fewer images with features than this: the scene is an error"),
        "threads": Param(1, "threads of the mapper and the undistortion. 1: the same inputs give the same model "
                         "to the bit, and scenes in parallel never oversubscribe; more (-1: all cores) speed up the "
                         "bundle adjustments of large scenes, but their sums are then ordered differently from run "
                         "to run and the model can differ (1,115 or 1,477 points for the 10 Sacre-Coeur photos)"),
        "depth_column": Param(None, "column of metric depth maps (.npy metres or 16-bit PNG millimetres) for the scale",
                              types=(str, type(None))),
        "position_columns": Param(None, "columns of known camera positions in metres, e.g. [x, y, z] (GPS in a local "
                                  "frame) for the scale", types=(list, tuple, type(None))),
        "scale_weights": Param({"depth": 1.0, "positions": 1.0}, "each cue's weight in the fused scale"),
        "iqr_k": Param(1.5, "scale samples beyond k x IQR from the quartiles are rejected"),
        "undistort": Param(True, "export undistorted images and PINHOLE cameras (what 3DGS code expects)"),
        "seed": Param(0, "the mapper's random seed (the same model on every run)"),
        "mapper_options": Param({}, "more of pycolmap's IncrementalPipelineOptions / GlobalPipelineOptions by name, "
                                "nested ones as dicts (as hloc's mapper_options), e.g. {ba_global_frames_ratio: 1.3, "
                                "ba_global_points_ratio: 1.3}: global bundle adjustments less often"),
    }

    #: pycolmap options that other parameters set.
    OWNED_OPTIONS = {"num_threads": "threads", "random_seed": "seed", "min_model_size": "min_images"}

    def check_params(self) -> None:
        cols = self.config["position_columns"]
        if cols is not None and (len(cols) != 3 or not all(isinstance(c, str) for c in cols)):
            raise PipelineError(f"op 'reconstruct': position_columns must name 3 columns (x, y, z), not {cols!r}")
        if self.config["min_images"] < 2:
            raise PipelineError("op 'reconstruct': min_images must be at least 2")
        if self.config["mapper_options"]:
            self._options()  # unknown names and wrong types are refused before any work starts

    def _options(self) -> Any:
        """pycolmap's options for the mapper, from the parameters."""
        import pycolmap

        c = self.config
        incremental = c["mapper"] == "incremental"
        options = pycolmap.IncrementalPipelineOptions() if incremental else pycolmap.GlobalPipelineOptions()
        extra = dict(c["mapper_options"])
        _check_option_names(options, extra, type(options).__name__)
        try:
            options.mergedict(extra)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise PipelineError(f"op 'reconstruct': mapper_options {extra!r} do not fit "
                                f"{type(options).__name__}: {exc}") from None
        options.num_threads = c["threads"]
        options.random_seed = c["seed"]
        options.min_model_size = c["min_images"]
        return options

    def input_names(self) -> tuple[str, ...]:
        names = ["id_a", "id_b", "url:path_a", "url:path_b", "width_a", "height_a", "width_b", "height_b",
                 "array:keypoints_path_a", "array:keypoints_path_b", "array:matches_path", "geometry"]
        depth = self.config["depth_column"]
        if depth:
            names += [f"url:{depth}_a", f"url:{depth}_b"]
        for col in self.config["position_columns"] or ():
            names += [f"{col}_a", f"{col}_b"]
        return tuple(names)

    def output_specs(self) -> tuple[Output, ...]:
        return (
            Output("model", "artifact", "path", "sparse/0/{cameras,images,points3D}.bin + images/ (undistorted)"),
            Output("n_images", "column", "int64", "images of the scene"),
            Output("n_registered", "column", "int64", "images in the kept (largest) model"),
            Output("unregistered", "column", "json", "names of the images not in the model"),
            Output("n_models", "column", "int64", "models the mapper made (the largest is kept)"),
            Output("n_pairs", "column", "int64", "verified image pairs"),
            Output("n_points", "column", "int64", "3D points of the model"),
            Output("reprojection_error", "column", "float64", "mean reprojection error in pixels"),
            Output("scale", "column", "float64", "factor applied to the model (metres per model unit, or normalising)"),
            Output("scale_spread", "column", "float64", "inlier scale samples' IQR over the scale (NaN: normalised)"),
            Output("scale_inliers", "column", "int64", "scale samples kept by the IQR rule"),
            Output("scale_source", "column", "string", "which cues gave the scale"),
            Output("top_view", "array", "uint8", "points and camera centres seen from above"),
            Output("pair_view", "array", "uint8", "verified matches of the scene's best pair"),
        )

    def row_bytes(self) -> int:
        return 1 << 20

    def published_columns(self, columns: list[str]) -> list[str]:
        """The scenes manifest keeps the scene's key and upstream errors, not its pairs' lists."""
        pairs = {"ids", "n", "n_ok", "errors", "matches_path", "geometry", "n_putative", "n_inliers"}
        return [c for c in columns if c not in pairs and not c.endswith(("_a", "_b"))]

    def process(self, rows: list[Row]) -> list[Row | BaseException]:
        return [self._one(row) for row in rows]

    # -- one scene ---------------------------------------------------------------------------------
    def _one(self, row: Row) -> Row:
        images, pairs = scene_contents(row, self.config)
        usable = [im for im in images.values() if im.keypoints is not None and len(im.keypoints)]
        if len(usable) < self.config["min_images"]:
            raise RowError(f"only {len(usable)} of {len(images)} images have features; a reconstruction needs at "
                           f"least {self.config['min_images']} (see the features step's errors)")
        verified = [p for p in pairs if len(p.matches)]
        if not verified:
            raise RowError(f"no verified image pair among {len(pairs)} pairs of {len(images)} images: "
                           "the images do not overlap (or are too blurred, too dark or too different)")
        work = tempfile.mkdtemp(prefix=SCRATCH_PREFIX)  # database, image links, raw models: gone on return
        model = tempfile.mkdtemp(prefix=MODEL_PREFIX)  # the artifact: the engine moves it into the root
        try:
            return self._reconstruct(row, usable, verified, len(images), work, model)
        except BaseException:
            shutil.rmtree(model, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _reconstruct(self, row: Row, usable: list[SceneImage], verified: list[ScenePair], n_images: int,
                     work: str, model: str) -> Row:
        from daskmv.sfm import draw, export, scale

        image_dir = os.path.join(work, "images")
        materialise(usable, image_dir)
        write_database(os.path.join(work, "database.db"), usable, verified)
        models = self._map(work, image_dir)
        if not models:
            raise RowError(f"the {self.config['mapper']} mapper found no model in {len(usable)} images and "
                           f"{len(verified)} verified pairs (no initial pair with enough parallax and inliers)")
        rec = max(models, key=lambda r: (r.num_reg_images(), r.num_points3D()))
        registered = {im.name for im in rec.images.values() if im.has_pose}
        depth, positions = self._cues(row, usable)
        fused = scale.estimate(rec, depth, positions, self.config["scale_weights"], self.config["iqr_k"])
        scale.apply(rec, fused.scale)
        model_dir = export.export_model(rec, image_dir, model, self.config["undistort"], self.config["threads"])
        points = np.array([p.xyz for p in rec.points3D.values()]).reshape(-1, 3)
        centres = np.array([im.projection_center() for im in rec.images.values() if im.has_pose]).reshape(-1, 3)
        top = draw.label(draw.top_down(points, centres), f"{len(registered)}/{n_images} registered")
        return {
            "model": model_dir, "n_images": n_images, "n_registered": len(registered),
            "unregistered": sorted(im.name for im in usable if im.name not in registered)
            + sorted(self._missing(row, usable)),
            "n_models": len(models), "n_pairs": len(verified), "n_points": rec.num_points3D(),
            "reprojection_error": float(rec.compute_mean_reprojection_error()),
            "scale": fused.scale, "scale_spread": fused.spread, "scale_inliers": fused.inliers,
            "scale_source": fused.source, "top_view": top, "pair_view": best_pair_view(usable, verified),
        }

    def _map(self, work: str, image_dir: str) -> list[Any]:
        import pycolmap

        out = os.path.join(work, "sparse")
        os.makedirs(out, exist_ok=True)
        db = os.path.join(work, "database.db")
        mapping = pycolmap.global_mapping if self.config["mapper"] == "global" else pycolmap.incremental_mapping
        found = mapping(db, image_dir, out, self._options())
        return [rec for rec in found.values() if rec.num_reg_images() > 0]

    def _cues(self, row: Row, usable: list[SceneImage]) -> tuple[dict[str, str], dict[str, np.ndarray]]:
        """Depth files and known positions by image name, from the scene row's lists."""
        names = {im.id: im.name for im in usable}
        depth: dict[str, str] = {}
        positions: dict[str, np.ndarray] = {}
        column, cols = self.config["depth_column"], self.config["position_columns"]
        for side in "ab":
            ids = row[f"id_{side}"]
            if column:
                for i, url in zip(ids, row[f"url:{column}_{side}"]):
                    if i in names and url:
                        depth[names[i]] = local_path(url)
            if cols:
                values = [row[f"{c}_{side}"] for c in cols]
                for k, i in enumerate(ids):
                    xyz = [v[k] for v in values]
                    if i in names and all(x is not None and x == x for x in xyz):
                        positions[names[i]] = np.array(xyz, np.float64)
        return depth, positions

    def _missing(self, row: Row, usable: list[SceneImage]) -> set[str]:
        """Images of the scene that never reached the mapper (their features failed), by file name."""
        have = {im.id for im in usable}
        missing = set()
        for side in "ab":
            for i, url in zip(row[f"id_{side}"], row[f"url:path_{side}"]):
                if i is not None and i not in have and url:
                    missing.add(os.path.basename(url))
        return missing

    def gallery(self, row: Row) -> list[tuple[str, Any]]:
        return [(name, row[name]) for name in ("top_view", "pair_view") if row.get(name) is not None]


def _check_option_names(options: Any, given: dict[str, Any], where: str) -> None:
    """Refuse names ``options`` (a pycolmap options object) does not have (listing the ones it has), a value
    where it has a group of options or the reverse, and the options other parameters set (at any depth: the
    pipelines copy theirs into the inner mapper's)."""
    known = options.todict()
    for name, value in given.items():
        path = f"{where}.{name}"
        if name in Reconstruct.OWNED_OPTIONS:
            raise PipelineError(f"op 'reconstruct': set {name!r} with the parameter "
                                f"{Reconstruct.OWNED_OPTIONS[name]!r}, not in mapper_options ({path})")
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else f"; it has {', '.join(sorted(known))}"
            raise PipelineError(f"op 'reconstruct': mapper_options: {where} has no option {name!r}{hint}")
        group = hasattr(getattr(options, name), "todict")
        if group != isinstance(value, dict):
            what = "a group of options: give a dict of them" if group else "a value, not a group of options"
            raise PipelineError(f"op 'reconstruct': mapper_options: {path} is {what}")
        if group:
            _check_option_names(getattr(options, name), value, path)
        elif not _same_kind(known[name], value):
            raise PipelineError(f"op 'reconstruct': mapper_options: {path} takes a {type(known[name]).__name__} "
                                f"(default {known[name]!r}), not {value!r}")


def _same_kind(default: Any, value: Any) -> bool:
    """Whether ``value`` fits an option whose default is ``default`` (numbers, flags and text; other kinds
    are left to pycolmap)."""
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, (int, float, str)):
        kinds = {int: (int,), float: (int, float), str: (str,)}[type(default)]
        return isinstance(value, kinds) and not isinstance(value, bool)
    return True


def scene_contents(row: Row, config: dict[str, Any]) -> tuple[dict[str, SceneImage], list[ScenePair]]:
    """The scene's images (with features where they have them) and pairs, from a scene row's lists."""
    images: dict[str, SceneImage] = {}
    names: set[str] = set()
    for side in "ab":
        for i, url, w, h, kp in zip(row[f"id_{side}"], row[f"url:path_{side}"], row[f"width_{side}"],
                                    row[f"height_{side}"], row[f"array:keypoints_path_{side}"]):
            if i is None or i in images:
                if i in images and images[i].keypoints is None and kp is not None:
                    images[i].keypoints = kp
                continue
            name = os.path.basename(str(url)) or str(i)
            if name in names:
                name = f"{i}_{name}".replace("/", "_")
            names.add(name)
            images[i] = SceneImage(i, name, url, int(w) if w == w and w is not None else 0,
                                   int(h) if h == h and h is not None else 0, kp)
    pairs = []
    for a, b, matches, geometry in zip(row["id_a"], row["id_b"], row["array:matches_path"], row["geometry"]):
        if a is None or b is None or matches is None:
            continue
        pairs.append(ScenePair(a, b, np.asarray(matches).reshape(-1, 2), geometry_of(geometry)))
    return images, pairs


def local_path(url: str) -> str:
    """A local path for ``url`` (``file://`` stripped); other schemes are fetched by the caller."""
    return url[len("file://"):] if url.startswith("file://") else url


def materialise(images: list[SceneImage], folder: str) -> None:
    """Make every image readable as ``folder/<name>``: a symlink to a local file, a copy of a remote one."""
    import fsspec

    os.makedirs(folder, exist_ok=True)
    for image in images:
        target = os.path.join(folder, image.name)
        path = local_path(image.url)
        if "://" not in path:
            os.symlink(os.path.abspath(path), target)
        else:
            with fsspec.open(image.url, "rb") as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)


def best_pair_view(images: list[SceneImage], pairs: list[ScenePair]) -> np.ndarray:
    """The verified matches of the pair with the most inliers, drawn on its two images."""
    import cv2

    from daskmv.sfm import draw

    by_id = {im.id: im for im in images}
    pair = max((p for p in pairs if p.a in by_id and p.b in by_id), key=lambda p: len(p.matches))
    a, b = by_id[pair.a], by_id[pair.b]
    pictures = []
    for im in (a, b):
        data = cv2.imread(local_path(im.url), cv2.IMREAD_COLOR)
        if data is None:
            data = np.zeros((max(im.height, 1), max(im.width, 1), 3), np.uint8)
        pictures.append(cv2.cvtColor(data, cv2.COLOR_BGR2RGB))
    return draw.match_picture(pictures[0], a.keypoints, pictures[1], b.keypoints, pair.matches, height=240, most=100)
