"""Reading a run's outputs back: one row's array, or a torch Dataset over the output manifest.

References in the manifest (``outputs.zarr/resized/p000012#5``) are relative to the manifest's own
folder, so a copied or moved output root still reads. Reading one row touches only that row's bytes.

Reading back is the hot path of training, so each process keeps what it opened: a manifest's id table
(:func:`load_output`) and open arrays (:func:`daskmv.arrays.read_array_row`: metadata and shard
indexes), all tied to the manifest's *signature*: inode, size and times of a local file, or what the
filesystem's ``info`` says of a remote one (size, ETag, checksum, modification time). A rerun rewrites the
manifest, so nothing opened before it is used again: :func:`load_output` reads the new outputs, and a
:class:`ManifestDataset` made before the rerun refuses to read (:class:`ManifestChanged`) rather than
pair its old rows with new arrays. ``storage_options`` (as ``daskmv run`` takes them) open remote roots.
"""

from __future__ import annotations

import operator
import os
import posixpath
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from fsspec.core import split_protocol, url_to_fs

from daskmv.arrays import forget_arrays, options_key, read_array_row
from daskmv.store import parse_ref

try:  # a torch Dataset when torch is there; a plain sequence otherwise
    from torch.utils.data import Dataset as _DatasetBase
except ImportError:  # pragma: no cover - torch is a dependency, but the loader should not need it
    _DatasetBase = object  # type: ignore[assignment,misc]


#: A remote manifest's signature is asked again at most this often by a ManifestDataset (a local one: always).
REMOTE_RECHECK_S = 1.0
#: Manifests whose id tables a process keeps.
TABLES_KEPT = 8
#: What of a remote file's ``info`` tells one version from the next (whichever the filesystem reports).
_SIGNATURE_KEYS = ("size", "ETag", "etag", "e_tag", "md5Hash", "crc32c", "CRC", "generation", "VersionId",
                   "version_id", "mtime", "LastModified", "last_modified", "Last-Modified", "updated", "created",
                   "date_time", "ino")


class ManifestChanged(RuntimeError):
    """The manifest was rewritten (a rerun) after this ManifestDataset was made from it."""


def _is_local(url: str) -> bool:
    return split_protocol(url)[0] in (None, "file", "local")


def _normalise(manifest_path: Any) -> str:
    """A manifest's URL as a cache key: local paths made absolute, so a later ``chdir`` changes nothing."""
    text = os.fspath(manifest_path)
    return os.path.abspath(text) if split_protocol(text)[0] is None else text


def _folder(manifest_path: str) -> str:
    protocol, path = split_protocol(str(manifest_path))
    folder = posixpath.dirname(path.rstrip("/"))
    return f"{protocol}://{folder}" if protocol else (folder or ".")


def resolve_ref(manifest_path: str, ref: str) -> tuple[str, int]:
    """The array URL and row a reference points to, resolved against the manifest's folder."""
    path, row = parse_ref(ref)
    if "://" in path or path.startswith("/"):
        return path, row
    return posixpath.join(_folder(manifest_path), path), row


def manifest_signature(manifest_path: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, ...]:
    """What changes when the manifest is rewritten: a local file's inode, size and times (one ``stat``);
    for a remote one, the size, ETag, checksum or times its filesystem's ``info`` reports."""
    manifest_path = str(manifest_path)
    protocol, path = split_protocol(manifest_path)
    if protocol in (None, "file", "local"):
        st = os.stat(path)
        return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    fs, path = url_to_fs(manifest_path, **(storage_options or {}))
    fs.invalidate_cache(path)  # s3fs and friends keep listings: ask the store itself
    info = fs.info(path)
    return tuple((k, str(info[k])) for k in _SIGNATURE_KEYS if info.get(k) is not None)


def _read_manifest(manifest_path: str, storage_options: dict[str, Any] | None,
                   columns: Sequence[str] | None = None) -> pd.DataFrame:
    options = None if _is_local(manifest_path) else (storage_options or None)
    return pd.read_parquet(manifest_path, columns=list(columns) if columns is not None else None,
                           storage_options=options)


def _columns_of(manifest_path: str, storage_options: dict[str, Any] | None) -> list[str]:
    import pyarrow.dataset as pads

    if manifest_path.endswith((".csv", ".csv.gz", ".tsv")):
        raise ValueError(f"{manifest_path}: read the Parquet output manifest beside it (manifest.parquet); "
                         "the CSV twin may point at exported files instead of arrays")
    if _is_local(manifest_path):
        return list(pads.dataset(split_protocol(manifest_path)[1], format="parquet").schema.names)
    fs, path = url_to_fs(manifest_path, **(storage_options or {}))
    return list(pads.dataset(path, format="parquet", filesystem=fs).schema.names)


def _array_columns(names: Sequence[str]) -> list[str]:
    return [n[: -len("_path")] for n in names if n.endswith("_path")]


@dataclass
class _Table:
    """One version of a manifest, as :func:`load_output` needs it: row positions by id, reference columns."""

    manifest: str
    options: dict[str, Any] | None
    signature: tuple[Any, ...]
    names: list[str]
    ids: dict[Any, int]
    columns: dict[str, list[Any]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def version(self) -> tuple[Any, ...]:
        return (self.manifest, options_key(self.options), self.signature)

    def column(self, name: str) -> list[Any]:
        with self.lock:
            if name not in self.columns:
                self.columns[name] = _read_manifest(self.manifest, self.options, [name])[name].tolist()
            return self.columns[name]


_TABLES: OrderedDict[tuple[str, str], _Table] = OrderedDict()
_TABLES_LOCK = threading.Lock()


def _after_fork() -> None:  # a lock held by another thread at fork time would stay held in the child
    global _TABLES_LOCK
    _TABLES_LOCK = threading.Lock()
    for table in list(_TABLES.values()):
        table.lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def _table(manifest: str, storage_options: dict[str, Any] | None) -> _Table:
    """The manifest's current id table: kept per process until the manifest's signature changes."""
    key = (manifest, options_key(storage_options))
    try:
        signature = manifest_signature(manifest, storage_options)
    except FileNotFoundError:
        raise FileNotFoundError(f"no manifest at {manifest}") from None
    with _TABLES_LOCK:
        table = _TABLES.get(key)
        if table is not None and table.signature == signature:
            _TABLES.move_to_end(key)
            return table
    if table is not None:  # rewritten since: the arrays opened for the old version must not be read again
        forget_arrays(table.version)
    names = _columns_of(manifest, storage_options)
    ids = _read_manifest(manifest, storage_options, ["id"])["id"].tolist()
    fresh = _Table(manifest, storage_options, signature, names, {row_id: i for i, row_id in enumerate(ids)})
    with _TABLES_LOCK:
        _TABLES[key] = fresh
        while len(_TABLES) > TABLES_KEPT:
            forget_arrays(_TABLES.popitem(last=False)[1].version)
    return fresh


def _read(url: str, row: int, storage_options: dict[str, Any] | None, version: Any, manifest: str,
          row_id: Any, name: str) -> np.ndarray:
    """Read one referenced row; a failure names the manifest, the row's id and the output."""
    try:
        return read_array_row(url, row, storage_options, version=version)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{manifest}: row {row_id!r}, output {name!r}: {exc} (was the output root "
                                "moved without its manifest, or partly deleted?)") from None
    except (OSError, IndexError, KeyError, ValueError) as exc:
        raise ValueError(f"{manifest}: row {row_id!r}, output {name!r}: cannot read row {row} of {url}: "
                         f"{type(exc).__name__}: {exc}") from exc


def load_output(manifest_path: str, row_id: str, column: str,
                storage_options: dict[str, Any] | None = None) -> np.ndarray:
    """One row's array output. ``column`` is the output name (``resized``) or its ``resized_path``.

    The manifest's ids are read once per process and kept until the manifest changes (a rerun), so
    calling this in a loop costs one ``stat`` of the manifest (an ``info`` request on a remote one)
    and one read of the row.
    ``storage_options`` open a remote manifest and its root (``{"anon": True}`` for a public bucket, ...).
    """
    manifest = _normalise(manifest_path)
    table = _table(manifest, storage_options)
    name = column[: -len("_path")] if column.endswith("_path") else column
    ref_column = f"{name}_path"
    if ref_column not in table.names and column in table.names and _holds_refs(table.column(column)):
        ref_column = column  # references under another name: thumb_path_a after a `pairs` step
    if ref_column not in table.names:
        arrays = ", ".join(_array_columns(table.names)) or "none"
        if name in table.names:
            raise ValueError(f"{name!r} in {manifest} is a column, not an array output (array outputs: {arrays}); "
                             "read it with pandas")
        raise KeyError(f"{manifest} has no array output {name!r} (array outputs: {arrays})")
    position = _position(table, manifest, row_id)
    ref = table.column(ref_column)[position]
    if ref is None or ref != ref:
        status = table.column("status")[position] if "status" in table.names else None
        error = table.column("error")[position] if "error" in table.names else None
        why = f": its status is {status!r}" + (f" ({error})" if isinstance(error, str) and error else "")
        raise ValueError(f"row {row_id!r} has no {name!r} output in {manifest}{why if status else ''}")
    url, row = resolve_ref(manifest, ref)
    return _read(url, row, storage_options or None, table.version, manifest, row_id, name)


def _position(table: _Table, manifest: str, row_id: str) -> int:
    position = table.ids.get(row_id)
    if position is None:
        raise KeyError(f"no row with id {row_id!r} in {manifest}")
    return position


def _holds_refs(values: Sequence[Any]) -> bool:
    """Whether a column's values are array references (``...outputs.zarr/<output>/<attempt>#<row>``)."""
    present = [v for v in values if isinstance(v, str)]
    return bool(present) and all("outputs.zarr/" in v and v.rpartition("#")[2].isdigit() for v in present[:100])


def artifact_path(manifest_path: str, row_id: str, output: str,
                  storage_options: dict[str, Any] | None = None) -> str:
    """Where one row's artifact output (a folder or file, e.g. a COLMAP model) is: a local path or a URL,
    resolved against the manifest's folder, so a moved root still resolves."""
    manifest = _normalise(manifest_path)
    table = _table(manifest, storage_options)
    column = output if output.endswith("_path") else f"{output}_path"
    if column not in table.names:
        raise KeyError(f"{manifest} has no artifact output {output!r}")
    rel = table.column(column)[_position(table, manifest, row_id)]
    if rel is None or rel != rel:
        raise ValueError(f"row {row_id!r} has no {output!r} artifact in {manifest}")
    if "://" in rel or rel.startswith("/"):
        return rel
    return posixpath.join(_folder(manifest), rel)


class ManifestDataset(_DatasetBase):  # type: ignore[misc,valid-type]
    """A torch ``Dataset`` over an output manifest: each item is a dict of the asked ``columns``.

    An array output is named by its output name (``resized``) and comes back as a NumPy array
    (the default collate turns a batch of them into a tensor); other columns come back as values.
    Rows whose ``status`` is ``error`` are skipped unless ``include_errors``. Works in a
    ``DataLoader`` with ``num_workers > 0``, forked or spawned: each loader process opens the arrays it
    reads once and keeps them (metadata and shard indexes), so an item costs one read per array output.
    ``storage_options`` open a remote manifest and its root. The dataset is the manifest as it was when
    made: reading after a rerun rewrote it raises :class:`ManifestChanged` (make a new dataset).
    """

    def __init__(self, manifest_path: str, columns: Sequence[str], include_errors: bool = False,
                 with_id: bool = True, storage_options: dict[str, Any] | None = None) -> None:
        self.manifest_path = _normalise(manifest_path)
        self.storage_options = dict(storage_options or {})
        try:
            self.signature = manifest_signature(self.manifest_path, self.storage_options)
        except FileNotFoundError:
            raise FileNotFoundError(f"no manifest at {self.manifest_path}") from None
        names = _columns_of(self.manifest_path, self.storage_options)
        self.columns = list(columns)
        self.with_id = with_id
        self._kinds: dict[str, str] = {}
        for name in self.columns:
            if f"{name}_path" in names:
                self._kinds[name] = f"{name}_path"
            elif name in names:
                self._kinds[name] = name
            else:
                raise KeyError(f"{self.manifest_path} has no column or array output {name!r} "
                               f"(array outputs: {', '.join(_array_columns(names)) or 'none'})")
        keep = ["id", *dict.fromkeys(self._kinds.values())]
        filter_errors = not include_errors and "status" in names
        frame = _read_manifest(self.manifest_path, self.storage_options,
                               list(dict.fromkeys([*keep, "status"])) if filter_errors else keep)
        if filter_errors:
            frame = frame[frame["status"] == "ok"]
        self.frame = frame[keep].reset_index(drop=True)
        # Per item, plain lists and arrays: no pandas on the hot path, and references parsed once.
        self._ids = self.frame["id"].tolist()
        self._values: dict[str, list[Any]] = {}
        self._refs: dict[str, tuple[list[str], np.ndarray, np.ndarray]] = {}
        for name, column in self._kinds.items():
            if column == name:
                self._values[name] = self.frame[column].tolist()
            else:
                self._refs[name] = self._parse_refs(self.frame[column].tolist())
        self._version = (self.manifest_path, options_key(self.storage_options), self.signature)
        self._local = _is_local(self.manifest_path)
        self._checked = time.monotonic()

    def _parse_refs(self, refs: list[Any]) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(array URLs, each row's index into them or -1, each row's row in its array)."""
        urls: dict[str, int] = {}
        codes = np.full(len(refs), -1, dtype=np.int64)
        rows = np.zeros(len(refs), dtype=np.int64)
        for i, ref in enumerate(refs):
            if ref is None or ref != ref:  # an error row has no array
                continue
            path, rows[i] = parse_ref(ref)
            codes[i] = urls.setdefault(path, len(urls))
        return [resolve_ref(self.manifest_path, f"{path}#0")[0] for path in urls], codes, rows

    def __len__(self) -> int:
        return len(self._ids)

    def _check_current(self) -> None:
        """Refuse to read once the manifest was rewritten (its arrays may be other rows' now, or gone)."""
        now = time.monotonic()
        if not self._local and now - self._checked < REMOTE_RECHECK_S:
            return
        self._checked = now
        try:
            current = manifest_signature(self.manifest_path, self.storage_options)
        except FileNotFoundError:
            current = None
        if current != self.signature:
            forget_arrays(self._version)
            raise ManifestChanged(f"{self.manifest_path} was {'removed' if current is None else 'rewritten'} after "
                                  "this ManifestDataset was made (a rerun?): make a new ManifestDataset to read "
                                  "the new outputs")

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self._ids)
        i = operator.index(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {index} is out of range: {self.manifest_path} has {n} rows here")
        self._check_current()
        row_id = self._ids[i]
        item: dict[str, Any] = {"id": row_id} if self.with_id else {}
        for name in self._kinds:
            if name in self._values:
                item[name] = self._values[name][i]
                continue
            urls, codes, rows = self._refs[name]
            code = codes[i]
            item[name] = None if code < 0 else _read(urls[code], int(rows[i]), self.storage_options or None,
                                                     self._version, self.manifest_path, row_id, name)
        return item
