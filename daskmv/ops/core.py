"""The basic image ops: ``decode`` (what the file holds), ``resize`` and ``stats``.

They use OpenCV primitives, which release the GIL and avoid float64 copies; the tests compare them
with plain NumPy references (:func:`stats_reference`) within documented tolerances.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from daskmv.errors import PipelineError
from daskmv.ops.base import Op, Output, Param, Row
from daskmv.ops.registry import register_op

INTERPOLATIONS = {
    "area": cv2.INTER_AREA,
    "linear": cv2.INTER_LINEAR,
    "cubic": cv2.INTER_CUBIC,
    "nearest": cv2.INTER_NEAREST,
    "lanczos": cv2.INTER_LANCZOS4,
}


def parse_size(value: Any, op: str) -> tuple[int, int]:
    """``224`` or ``[width, height]`` as a (width, height) pair of positive ints."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        size = (int(value), int(value))
    elif isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, np.integer)) for v in value):
        size = (int(value[0]), int(value[1]))
    else:
        raise PipelineError(f"op {op!r}: size must be an int or [width, height], not {value!r}")
    if min(size) < 1:
        raise PipelineError(f"op {op!r}: size must be positive, not {value!r}")
    return size


@register_op
class Decode(Op):
    name = "decode"
    help = "Record what each file holds: width, height, channels and format (the decode is shared)."
    inputs = ("image_info",)
    outputs = (
        Output("width", "column", "int64", "pixels, as stored in the file"),
        Output("height", "column", "int64", "pixels, as stored in the file"),
        Output("channels", "column", "int64", "1 gray, 3 colour, 4 with alpha"),
        Output("format", "column", "string", "jpeg, png, tiff, bmp, gif, webp or unknown"),
    )

    def process(self, rows: list[Row]) -> list[Row | BaseException]:
        keys = ("width", "height", "channels", "format")
        return [{k: row["image_info"][k] for k in keys} for row in rows]


@register_op
class Resize(Op):
    name = "resize"
    help = "Resize each image to a fixed size (stretching; no crop or pad)."
    inputs = ("image",)
    outputs = (Output("resized", "array", "uint8", "RGB [height, width, 3]"),)
    params = {
        "size": Param(224, "output size: an int for a square, or [width, height]", types=(int, list, tuple)),
        "interpolation": Param("area", "OpenCV interpolation", tuple(INTERPOLATIONS)),
    }

    def check_params(self) -> None:
        self.size = parse_size(self.config["size"], self.name)
        self.config["size"] = list(self.size)
        self.flag = INTERPOLATIONS[self.config["interpolation"]]

    def row_bytes(self) -> int:
        return self.size[0] * self.size[1] * 3

    def process(self, rows: list[Row]) -> list[Row | BaseException]:
        return [{"resized": cv2.resize(row["image"], self.size, interpolation=self.flag)} for row in rows]


@register_op
class Stats(Op):
    name = "stats"
    help = "Per-channel mean and standard deviation (0-255 scale) and a sharpness score."
    inputs = ("image",)
    outputs = (
        *(Output(f"mean_{c}", "column", "float64", f"mean of the {c.upper()} channel") for c in "rgb"),
        *(Output(f"std_{c}", "column", "float64", f"standard deviation of the {c.upper()} channel") for c in "rgb"),
        Output("sharpness", "column", "float64", "variance of the Laplacian of the gray image"),
    )

    def process(self, rows: list[Row]) -> list[Row | BaseException]:
        return [image_stats(row["image"]) for row in rows]


def image_stats(image: np.ndarray) -> dict[str, float]:
    """Mean/std per RGB channel and the variance of the 3x3 Laplacian of the gray image."""
    mean, std = cv2.meanStdDev(image)
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    _, lap_std = cv2.meanStdDev(cv2.Laplacian(gray, cv2.CV_32F, ksize=1))
    out = {f"mean_{c}": float(mean[i, 0]) for i, c in enumerate("rgb")}
    out.update({f"std_{c}": float(std[i, 0]) for i, c in enumerate("rgb")})
    out["sharpness"] = float(lap_std[0, 0]) ** 2
    return out


def stats_reference(image: np.ndarray) -> dict[str, float]:
    """The same statistics in plain float64 NumPy: the reference the tests hold :func:`image_stats` to."""
    pixels = image.reshape(-1, 3).astype(np.float64)
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float64)
    padded = np.pad(gray, 1, mode="reflect")
    lap = (
        padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:] - 4.0 * padded[1:-1, 1:-1]
    )
    out = {f"mean_{c}": float(pixels[:, i].mean()) for i, c in enumerate("rgb")}
    out.update({f"std_{c}": float(pixels[:, i].std()) for i, c in enumerate("rgb")})
    out["sharpness"] = float(lap.var())
    return out
