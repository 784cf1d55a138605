"""Reading a run's outputs back: one row's array, or a torch Dataset over the output manifest.

References in the manifest (``outputs.zarr/resized/p000012#5``) are relative to the manifest's own
folder, so a copied or moved output root still reads. Reading one row touches only that row's chunk.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from daskmv.arrays import read_array_row
from daskmv.store import parse_ref

try:  # a torch Dataset when torch is there; a plain sequence otherwise
    from torch.utils.data import Dataset as _DatasetBase
except ImportError:  # pragma: no cover - torch is a dependency, but the loader should not need it
    _DatasetBase = object  # type: ignore[assignment,misc]


def _folder(manifest_path: str) -> str:
    return posixpath.dirname(str(manifest_path).rstrip("/")) or "."


def resolve_ref(manifest_path: str, ref: str) -> tuple[str, int]:
    """The array URL and row a reference points to, resolved against the manifest's folder."""
    path, row = parse_ref(ref)
    if "://" in path or path.startswith("/"):
        return path, row
    return posixpath.join(_folder(manifest_path), path), row


@lru_cache(maxsize=8)
def _manifest_index(manifest_path: str, column: str) -> dict[str, Any]:
    fs, path = url_to_fs(manifest_path)
    with fs.open(path, "rb") as fh:
        table = pq.read_table(fh, columns=["id", column])
    return dict(zip(table.column("id").to_pylist(), table.column(column).to_pylist()))


def load_output(manifest_path: str, row_id: str, column: str) -> np.ndarray:
    """One row's array output. ``column`` is the output name (``resized``) or its ``resized_path``."""
    ref_column = column if column.endswith("_path") else f"{column}_path"
    refs = _manifest_index(str(manifest_path), ref_column)
    if row_id not in refs:
        raise KeyError(f"no row with id {row_id!r} in {manifest_path}")
    ref = refs[row_id]
    if ref is None:
        raise ValueError(f"row {row_id!r} has no {column!r} output (its status is probably 'error')")
    url, row = resolve_ref(str(manifest_path), ref)
    return read_array_row(url, row)


class ManifestDataset(_DatasetBase):  # type: ignore[misc,valid-type]
    """A torch ``Dataset`` over an output manifest: each item is a dict of the asked ``columns``.

    An array output is named by its output name (``resized``) and comes back as a NumPy array
    (the default collate turns a batch of them into a tensor); other columns come back as values.
    Rows whose ``status`` is ``error`` are skipped unless ``include_errors``. Works in a
    ``DataLoader`` with ``num_workers > 0``: arrays are opened lazily in each loader process.
    """

    def __init__(self, manifest_path: str, columns: Sequence[str], include_errors: bool = False,
                 with_id: bool = True) -> None:
        self.manifest_path = str(manifest_path)
        frame = pd.read_parquet(self.manifest_path)
        if not include_errors and "status" in frame.columns:
            frame = frame[frame["status"] == "ok"]
        self.columns = list(columns)
        self.with_id = with_id
        self._kinds: dict[str, str] = {}
        for name in self.columns:
            if f"{name}_path" in frame.columns:
                self._kinds[name] = f"{name}_path"
            elif name in frame.columns:
                self._kinds[name] = name
            else:
                raise KeyError(f"{self.manifest_path} has no column or array output {name!r}")
        keep = ["id", *dict.fromkeys(self._kinds.values())]
        self.frame = frame[keep].reset_index(drop=True)

    def __len__(self) -> int:
        return len(self.frame)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.frame.iloc[index]
        item: dict[str, Any] = {"id": row["id"]} if self.with_id else {}
        for name, column in self._kinds.items():
            value = row[column]
            if column != name and (value is None or value != value):  # an error row has no array
                value = None
            elif column != name:
                url, r = resolve_ref(self.manifest_path, value)
                value = read_array_row(url, r)
            elif isinstance(value, np.generic):
                value = value.item()
            item[name] = value
        return item
