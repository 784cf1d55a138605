"""``features``: local features per image (SIFT through pycolmap or OpenCV, or a learned extractor).

One row per image in, two arrays out: ``keypoints`` ``[N, 6]`` float32 in COLMAP's affine layout (x, y, a11,
a12, a21, a22; pixel centres at +0.5 like COLMAP) in full-image coordinates, and ``descriptors`` ``[N, D]``
(uint8 RootSIFT for SIFT, float32 for learned ones), plus the image size the reconstruction needs.

**Giant images** (a side above ``tile_above``) are cut into ``tile_size`` tiles that overlap by
``tile_overlap`` pixels and extracted tile by tile at full resolution, so the extractor's memory (SIFT's scale
space is about 30 bytes per pixel) is bounded by the tile, not the image. Each tile owns the central part of
itself (its overlaps split halfway with its neighbours): a keypoint is kept only from the tile that owns its
position, which removes the duplicates the overlaps make without any search. Keypoints are then in
full-image coordinates: nearest-neighbour matching never needs to know about tiles (a learned matcher on such
images can go tile against tile: :func:`daskmv.sfm.learned.tiled_matches`).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from daskmv.errors import PipelineError, RowError
from daskmv.ops.base import Op, Output, Param, Row
from daskmv.ops.registry import register_op

BACKENDS = ("pycolmap", "opencv")


def tiles(width: int, height: int, size: int, overlap: int) -> list[tuple[int, int, int, int, tuple[float, ...]]]:
    """Tiles covering an image: (x0, y0, x1, y1, owned) where ``owned`` = (ox0, oy0, ox1, oy1) is the part of
    the plane whose keypoints this tile keeps; the owned parts tile the image exactly, and the outer tiles own
    what lies beyond its borders (a learned extractor's keypoint a little outside still has a tile)."""
    def starts(extent: int) -> list[int]:
        if extent <= size:
            return [0]
        step = size - overlap
        n = int(np.ceil((extent - overlap) / step))
        return [min(k * step, extent - size) for k in range(n)]

    out = []
    xs, ys = starts(width), starts(height)
    for j, y0 in enumerate(ys):
        for i, x0 in enumerate(xs):
            x1, y1 = min(x0 + size, width), min(y0 + size, height)
            ox0 = -np.inf if i == 0 else (x0 + min(xs[i - 1] + size, width)) / 2
            ox1 = np.inf if i == len(xs) - 1 else (xs[i + 1] + x1) / 2
            oy0 = -np.inf if j == 0 else (y0 + min(ys[j - 1] + size, height)) / 2
            oy1 = np.inf if j == len(ys) - 1 else (ys[j + 1] + y1) / 2
            out.append((x0, y0, x1, y1, (ox0, oy0, ox1, oy1)))
    return out


def check_tiling(op: str, size: int, overlap: int) -> None:
    """Refuse a tiling whose overlap is under 16 px or above a quarter of the tile (the rule of every op
    that tiles: features, and a learned matcher's tile pairs)."""
    if not 64 <= overlap * 4 <= size:
        raise PipelineError(f"op {op!r}: tile_overlap must be between 16 px and a quarter of tile_size "
                            f"(got overlap {overlap}, size {size})")


def owned(keypoints: np.ndarray, owned_part: tuple[float, ...]) -> np.ndarray:
    """Which keypoints (full-image COLMAP layout, pixel centres at +0.5) lie in a tile's owned part."""
    ox0, oy0, ox1, oy1 = owned_part
    x, y = keypoints[:, 0] - 0.5, keypoints[:, 1] - 0.5
    return (x >= ox0) & (x < ox1) & (y >= oy0) & (y < oy1)


class Extractor:
    """SIFT on a gray uint8 array, returning (keypoints [N, 6] float32, descriptors [N, 128] uint8)."""

    def __init__(self, backend: str, max_features: int, peak_threshold: float, upright: bool,
                 device: str = "cpu") -> None:
        self.backend, self.device = backend, device
        self.max_features, self.peak_threshold, self.upright = max_features, peak_threshold, upright
        self.local = threading.local()  # pycolmap's extractor keeps buffers: one per loader thread

    def __call__(self, gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.backend == "opencv":
            return self._opencv(gray)
        return self._pycolmap(gray)

    def _pycolmap(self, gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import pycolmap

        ex = getattr(self.local, "pycolmap", None)
        if ex is None:
            options = pycolmap.FeatureExtractionOptions()
            options.num_threads = 1
            options.max_image_size = max(gray.shape) + 1  # the op resizes; pycolmap never should
            options.sift.max_num_features = self.max_features
            options.sift.peak_threshold = self.peak_threshold
            options.sift.upright = self.upright
            gpu = self.device.startswith("cuda") and pycolmap.has_cuda  # pycolmap-cuda12 builds
            if gpu:
                options.use_gpu, options.gpu_index = True, str(int(self.device.partition(":")[2] or 0))
            device = pycolmap.Device.cuda if gpu else pycolmap.Device.cpu
            ex = self.local.pycolmap = pycolmap.FeatureExtractor.create(options, device)
        kps, desc = ex.extract_from_uint8_array(np.ascontiguousarray(gray))
        keypoints = np.array([(k.x, k.y, k.a11, k.a12, k.a21, k.a22) for k in kps], dtype=np.float32).reshape(-1, 6)
        return keypoints, np.asarray(desc.data, dtype=np.uint8).reshape(-1, 128)

    def _opencv(self, gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import cv2

        sift = getattr(self.local, "opencv", None)
        if sift is None:
            sift = self.local.opencv = cv2.SIFT_create(nfeatures=self.max_features,
                                                       contrastThreshold=self.peak_threshold * 6)
        kps, desc = sift.detectAndCompute(gray, None)
        if not kps:
            return np.zeros((0, 6), np.float32), np.zeros((0, 128), np.uint8)
        keypoints = np.array([_affine(k.pt[0] + 0.5, k.pt[1] + 0.5, k.size / 2, 0.0 if self.upright else k.angle)
                              for k in kps], dtype=np.float32)
        return keypoints, root_sift_uint8(desc)


def _affine(x: float, y: float, scale: float, angle_deg: float) -> tuple[float, ...]:
    a = np.radians(angle_deg)
    c, s = scale * np.cos(a), scale * np.sin(a)
    return (x, y, c, -s, s, c)


def root_sift_uint8(desc: np.ndarray) -> np.ndarray:
    """Float SIFT descriptors as COLMAP stores them: L1-normalised, square-rooted, scaled by 512 into uint8."""
    d = desc.astype(np.float32)
    d /= np.maximum(d.sum(axis=1, keepdims=True), 1e-12)
    return np.clip(np.round(np.sqrt(d) * 512), 0, 255).astype(np.uint8)


#: COLMAP's grey image: Rec. 709 luma rounded half up, bit for bit what ``pycolmap.Bitmap`` makes of a colour
#: image. OpenCV's RGB2GRAY (Rec. 601) differs by 1.3 levels on average, which was enough to make the mapper
#: on the 10 Sacre-Coeur photos land on models of 745 to 1,441 points by seed, where COLMAP's grey (and
#: threshold) give 1,444 points for every seed.
GREY_WEIGHTS = np.array([0.2126, 0.7152, 0.0722], np.float32)


#: The shortest image side features are looked for on (SIFT's smallest octave is then a few pixels; a 1 px wide image
#: crashed OpenImageIO's resize inside pycolmap, taking the worker with it).
MIN_SIDE = 16


#: pycolmap's default SIFT peak (contrast) threshold.
PEAK_THRESHOLD = 0.02 / 3


def colmap_grey(image: np.ndarray) -> np.ndarray:
    """The grey uint8 image COLMAP's SIFT would see for ``image`` (grey, or RGB / RGBA uint8)."""
    if image.ndim == 2:
        return image
    if image.shape[2] == 1:
        return image[..., 0]
    rgb = image[..., :3].astype(np.float32)
    r, g, b = GREY_WEIGHTS  # products and sums one at a time in float32, as COLMAP's C++ does: ties agree
    return (r * rgb[..., 0] + g * rgb[..., 1] + b * rgb[..., 2] + np.float32(0.5)).astype(np.uint8)


def to_full_image(keypoints: np.ndarray, sx: float, sy: float) -> np.ndarray:
    """Keypoints found on an image resized by 1/sx, 1/sy, in the full image's coordinates, as COLMAP maps
    them back: positions multiplied (no half-pixel shift) and the affine shape's rows scaled with them
    (COLMAP scales its columns instead: the same to within |sx - sy|, a few hundredths of a per cent)."""
    out = keypoints.copy()
    out[:, [0, 2, 3]] *= np.float32(sx)
    out[:, [1, 4, 5]] *= np.float32(sy)
    return out


def extract(gray: np.ndarray, extractor: Any, tile_above: int = 0, tile_size: int = 2048,
            tile_overlap: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Features of a gray image, tiled when a side is above ``tile_above`` (0: never)."""
    h, w = gray.shape[:2]
    if not tile_above or max(h, w) <= tile_above:
        return extractor(gray)
    kps, descs = [], []
    for x0, y0, x1, y1, owned_part in tiles(w, h, tile_size, tile_overlap):
        k, d = extractor(np.ascontiguousarray(gray[y0:y1, x0:x1]))
        if not len(k):
            continue
        k = k.copy()
        k[:, 0] += x0
        k[:, 1] += y0
        keep = owned(k, owned_part)
        kps.append(k[keep])
        descs.append(d[keep])
    if not kps:
        return np.zeros((0, 6), np.float32), np.zeros((0, 128), np.uint8)
    return np.concatenate(kps), np.concatenate(descs)


@register_op
class Features(Op):
    name = "features"
    help = ("Local features per image: SIFT (pycolmap or OpenCV) or a learned extractor; giant images tiled. "
            "Stores keypoints [N,6] and descriptors [N,D].")
    inputs = ("image",)
    gpu = True  # used by pycolmap builds with CUDA and by learned extractors; SIFT runs on CPU otherwise
    min_partition_rows = 1
    version = "1"
    params = {
        "backend": Param("pycolmap", "SIFT implementation", BACKENDS),
        "model": Param(None, "a learned extractor instead of SIFT: TorchScript file or module:factory "
                       "(gray [1,1,H,W] in [0,1] -> keypoints [N,2], descriptors [N,D])", path=True,
                       types=(str, type(None))),
        "max_features": Param(8192, "most features per image (per tile for tiled images)"),
        "max_image_size": Param(3200, "images with a longer side are downscaled to it first (unless tiled)"),
        "peak_threshold": Param(PEAK_THRESHOLD, "SIFT's contrast threshold (pycolmap's peak_threshold, its default)"),
        "upright": Param(False, "one orientation per keypoint (for upright cameras)"),
        "tile_above": Param(0, "tile images with a side above this many pixels at full resolution (0: never)"),
        "tile_size": Param(2048, "tile side in pixels"),
        "tile_overlap": Param(128, "pixels shared by neighbouring tiles"),
    }

    def check_params(self) -> None:
        c = self.config
        if c["tile_above"]:
            check_tiling(self.name, c["tile_size"], c["tile_overlap"])
        if c["model"]:
            from daskmv.ops.torch_model import check_model

            c["model"], _ = check_model(self.name, c["model"], None)
        self.extractor: Any = None

    def output_specs(self) -> tuple[Output, ...]:
        dtype = "float32" if self.config["model"] else "uint8"
        return (Output("keypoints", "array", "float32", "x, y, a11, a12, a21, a22 per keypoint (full image)"),
                Output("descriptors", "array", dtype, "one descriptor per keypoint"),
                Output("width", "column", "int64", "image width in pixels"),
                Output("height", "column", "int64", "image height in pixels"),
                Output("n_features", "column", "int64", "keypoints found"))

    def row_bytes(self) -> int:
        return self.config["max_features"] * (24 + 128)

    def spec(self) -> dict[str, Any]:
        from daskmv.ops.torch_model import file_identity

        spec = super().spec()
        if self.config["model"] and ":" not in self.config["model"]:
            spec["files"] = {self.config["model"]: file_identity(self.config["model"])}
        return spec

    def gallery(self, row: Row) -> list[tuple[str, Any]]:
        """Where the keypoints fall (a dot each, on the image's frame): gaps, clusters or tile seams show."""
        from daskmv.sfm.draw import keypoint_map

        keypoints, w, h = row.get("keypoints"), row.get("width"), row.get("height")
        if keypoints is None or not w or not h:
            return []
        return [(f"{len(keypoints)} keypoints", keypoint_map(np.asarray(keypoints), int(w), int(h)))]

    def setup(self, device: str) -> None:
        c = self.config
        if c["model"]:
            from daskmv.sfm.learned import LearnedExtractor

            self.extractor = LearnedExtractor(c["model"], device, c["max_features"])
        else:
            self.extractor = Extractor(c["backend"], c["max_features"], c["peak_threshold"], c["upright"], device)

    def process(self, rows: list[Row]) -> list[Row | BaseException]:
        return [self._one(row) for row in rows]

    def _grey(self, image: np.ndarray) -> np.ndarray:
        """COLMAP's grey for pycolmap's SIFT (its features then equal pycolmap's own); OpenCV's (Rec. 601,
        what ``cv2.imread(..., IMREAD_GRAYSCALE)`` gives and learned extractors are trained on) otherwise."""
        import cv2

        if self.config["model"] or self.config["backend"] != "pycolmap":
            return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
        return colmap_grey(image)

    def _downscale(self, gray: np.ndarray) -> np.ndarray:
        """``gray`` with its longer side at ``max_image_size`` (each side rounded, as COLMAP rounds): for
        pycolmap's SIFT, resized by pycolmap's own Bitmap as its extractor resizes (its features then equal
        pycolmap's for large images too); with OpenCV's area filter for the other extractors."""
        h, w = gray.shape[:2]
        size = self.config["max_image_size"]
        factor = size / max(h, w)
        new_w, new_h = round(w * factor), round(h * factor)  # Python's and C++'s rounding agree off the .5 ties
        if min(new_w, new_h) < MIN_SIDE:
            raise RowError(f"the image is {w}x{h}: at max_image_size {size} its short side would be "
                           f"{min(new_w, new_h)} px, too thin for features (at least {MIN_SIDE})")
        if not self.config["model"] and self.config["backend"] == "pycolmap":
            import pycolmap

            bitmap = pycolmap.Bitmap.from_array(gray)
            bitmap.thumbnail(size)
            return np.ascontiguousarray(np.asarray(bitmap.to_array()).reshape(bitmap.height, bitmap.width))
        import cv2

        return cv2.resize(gray, (new_w, new_h), interpolation=cv2.INTER_AREA)

    def _one(self, row: Row) -> Row:
        gray = self._grey(row["image"])
        h, w = gray.shape[:2]
        c = self.config
        if min(h, w) < MIN_SIDE:
            raise RowError(f"the image is {w}x{h}: too small for features (a side of at least {MIN_SIDE} px)")
        tiled = bool(c["tile_above"]) and max(h, w) > c["tile_above"]
        if not tiled and max(h, w) > c["max_image_size"]:
            gray = self._downscale(gray)
        if gray.std() < 1.0:
            raise RowError(f"the image is blank (a single grey level, {w}x{h}): no features")
        keypoints, descriptors = extract(gray, self.extractor, c["tile_above"] if tiled else 0, c["tile_size"],
                                         c["tile_overlap"])
        if gray.shape[:2] != (h, w):
            keypoints = to_full_image(keypoints, w / gray.shape[1], h / gray.shape[0])
        return {"keypoints": keypoints, "descriptors": descriptors, "width": w, "height": h,
                "n_features": len(keypoints)}
