"""Plain-file copies of a row's outputs (``--export png``), beside the Zarr store, for users who want files.

For every row that finished, each image output (uint8, ``[H, W]`` or ``[H, W, 1|3|4]``) becomes
``png/<partition>/<id>_<name>.png`` and the row's column outputs ``png/<partition>/<id>_metadata.json``
(the names follow :attr:`Output.export_as`, so the relight pipeline writes ``<id>_output.png``,
``<id>_input.png``, ... as the hand-written scripts did). The partition's table gains a ``<name>_png``
column per image output with the file's path relative to the output root; ``manifest.csv`` puts those
paths in the ``<name>_path`` columns, so CSV users get plain files, while ``manifest.parquet`` keeps the
Zarr references there.

Files are written on the worker's loader threads while the next micro-batch computes; a partition's
marker is written only after all its files are, so a finished partition always has its PNGs.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from daskmv.ops.base import Output, looks_like_image
from daskmv.store import Store, partition_name

FORMATS = ("png",)
EXPORT_DIR = "png"
SUFFIX = "_png"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def exported(specs: Sequence[Output]) -> list[Output]:
    """The outputs that become PNG files: uint8 arrays."""
    return [s for s in specs if s.kind == "array" and s.dtype == "uint8"]


def file_stem(row_id: str) -> str:
    """A file-name-safe form of a row id; ids that had to change get a short hash, so two never collide."""
    safe = _UNSAFE.sub("_", row_id).lstrip(".")[:120] or "row"
    if safe != row_id:
        safe += "-" + hashlib.sha1(row_id.encode()).hexdigest()[:8]
    return safe


def export_row(store: Store, index: int, row: dict[str, Any], specs: Sequence[Output]) -> dict[str, str | None]:
    """Write one row's PNGs and metadata JSON; return ``{output name: path relative to the root}``."""
    folder = f"{EXPORT_DIR}/{partition_name(index)}"
    stem = file_stem(str(row["id"]))
    paths: dict[str, str | None] = {}
    for spec in exported(specs):
        value = row.get(spec.name)
        if not looks_like_image(value):
            paths[spec.name] = None
            continue
        rel = f"{folder}/{stem}_{spec.export_as or spec.name}.png"
        store.write_bytes(rel, encode_png(np.asarray(value)))
        paths[spec.name] = rel
    meta = {"id": row["id"], "source": row.get("url")}
    for spec in specs:
        if spec.kind == "column":
            value = row.get(spec.name)
            meta[spec.name] = json.loads(value) if spec.dtype == "json" and isinstance(value, str) else value
    meta["files"] = {name: path.rsplit("/", 1)[-1] for name, path in paths.items() if path}
    store.write_bytes(f"{folder}/{stem}_metadata.json", json.dumps(meta, indent=1, default=str).encode())
    return paths


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of an RGB(A) or gray uint8 image."""
    if image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGBA2BGRA)
    ok, data = cv2.imencode(".png", np.ascontiguousarray(image))  # OpenCV's default is its fastest level
    if not ok:
        raise ValueError(f"cannot encode an array of shape {image.shape} as PNG")
    return data.tobytes()
