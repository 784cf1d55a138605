"""Row-level helpers for batched image ops, free of torch so importing the ops stays quick.

Ops that compute in torch group a micro-batch's rows by image size (:func:`map_groups`), check each
row's inputs (:func:`rgb_image`, :func:`mask_image`) and turn any bad input into that row's error.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from daskmv.errors import RowError
from daskmv.ops.base import Op, Row

#: Most pixels in one tensor batch: 16 Mpx is 192 MB as float32 RGB, so a few intermediates fit anywhere.
MAX_BATCH_PIXELS = 1 << 24


def groups_by_size(images: Sequence[np.ndarray], max_pixels: int = MAX_BATCH_PIXELS) -> list[list[int]]:
    """Indices of same-sized images (``H, W``), each group one tensor batch of at most ``max_pixels``."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, image in enumerate(images):
        groups[image.shape[:2]].append(i)
    out = []
    for (h, w), indices in groups.items():
        step = max(1, max_pixels // max(1, h * w))
        out += [indices[k : k + step] for k in range(0, len(indices), step)]
    return out


def rgb_image(row: dict[str, Any], name: str) -> np.ndarray:
    """The row's RGB uint8 ``[H, W, 3]`` input ``name``, or a RowError saying what it is instead."""
    value = row.get(name)
    shape = getattr(value, "shape", None)
    if shape is None or len(shape) != 3 or shape[2] != 3 or value.dtype != np.uint8:
        raise RowError(f"input {name!r} is not an RGB uint8 image [H, W, 3] "
                       f"(got {type(value).__name__} {getattr(value, 'dtype', '')} {shape})")
    return value


def mask_image(row: dict[str, Any], name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The row's uint8 mask ``[H, W]`` (0-255) input ``name``, the size of the image it belongs to."""
    value = row.get(name)
    if getattr(value, "shape", None) != tuple(shape[:2]) or value.dtype != np.uint8:
        raise RowError(f"input {name!r} is not a uint8 mask of the image's size {tuple(shape[:2])} "
                       f"(got {type(value).__name__} {getattr(value, 'dtype', '')} {getattr(value, 'shape', None)})")
    return value


def per_row(rows: Sequence[dict[str, Any]], read: Any) -> tuple[list[Any], dict[int, BaseException]]:
    """``read(row)`` for every row; the rows it fails for are returned as errors, not raised."""
    values: list[Any] = []
    errors: dict[int, BaseException] = {}
    for i, row in enumerate(rows):
        try:
            values.append(read(row))
        except Exception as exc:
            values.append(None)
            errors[i] = exc
    return values, errors


def hex_color(text: str) -> tuple[float, float, float]:
    """``#808080`` as RGB floats in [0, 1]."""
    value = text.lstrip("#")
    if len(value) != 6 or any(ch not in "0123456789abcdefABCDEF" for ch in value):
        raise ValueError(f"not a #RRGGBB colour: {text!r}")
    return tuple(int(value[i : i + 2], 16) / 255.0 for i in (0, 2, 4))  # type: ignore[return-value]


def seed_for(row_id: Any, seed: int) -> int:
    """A 64-bit seed from a row id and a pipeline seed: the same row draws the same numbers on any run."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{row_id}".encode()).digest()[:8], "little")


def map_groups(rows: Sequence[dict[str, Any]], read: Any, compute: Any) -> list[Any]:
    """The batched shape of every image op: ``read(row)`` each row's inputs (a tuple whose first item is
    the image), group rows by image size, and ``compute(inputs, rows)`` one group at a time; returns one
    result per row, in order, with the rows whose inputs were bad as their exceptions."""
    values, errors = per_row(rows, read)
    results: list[Any] = [errors.get(i) for i in range(len(rows))]
    ok = [i for i in range(len(rows)) if i not in errors]
    for group in groups_by_size([values[i][0] for i in ok]):
        indices = [ok[g] for g in group]
        outs = compute([values[i] for i in indices], [rows[i] for i in indices])
        for i, out in zip(indices, outs):
            results[i] = out
    return results


#: The bytes of one RGB photo output when the image size is unknown (about 1 Mpx): what image ops report
#: as ``row_bytes`` so partitions are sized to the engine's output budget.
PHOTO_BYTES = 3 << 20


class MaskedImageOp(Op):
    """Base of ops that compute on an RGB image and its person mask, in torch on the worker's device.

    Subclasses name the parameter that holds the image input (``image_param``) and declare a ``mask``
    parameter; :meth:`read` checks both inputs of a row.
    """

    image_param: ClassVar[str] = "image"
    device: str = "cpu"

    def input_names(self) -> tuple[str, ...]:
        return (self.config[self.image_param], self.config["mask"])

    def row_bytes(self) -> int:
        return PHOTO_BYTES

    def setup(self, device: str) -> None:
        self.device = device

    def read(self, row: Row) -> tuple[np.ndarray, np.ndarray]:
        image = rgb_image(row, self.config[self.image_param])
        return image, mask_image(row, self.config["mask"], image.shape)
