"""Read, validate and partition manifests.

A manifest is a CSV or Parquet table (a local path or any fsspec URL), one row per item. It is read
lazily, one source partition at a time: a Parquet file's row groups with pyarrow, CSV files and Parquet
datasets (folders) as a Dask dataframe. Before any work starts, :meth:`Manifest.check` makes one pass over
the columns that identify rows and refuses, with one clear line, an empty table, a missing required column,
null or duplicate ids, or file paths with an unknown URL scheme. Problems that belong to single rows
(a missing or corrupt file) are not checked here: they become row errors during the run.

Every row gets a stable string ``id``: the ``--id-column`` values, else an ``id`` column already in
the table, else one derived from the path (its stem plus a hash of the whole path, see
:func:`derive_id`). Ids and paths are text, whatever they look like: ``007`` stays ``007``.

The pre-flight pass also hashes each row's identity (its id, its path and the other columns the
pipeline reads), so that a partition's hash says exactly which work it holds: a resumed run recomputes
a partition whose rows changed, even under the same ids.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import dask
import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import split_protocol
from fsspec.registry import registry as fsspec_registry

from daskmv.errors import ManifestError
from daskmv.paths import resolve_path

ID_COLUMN = "id"
#: With ``partition_by``, a group must fit in one task: more rows than this is a clear error.
MAX_GROUP_ROWS = 1_000_000
CSV_BLOCKSIZE = "16MB"
_STEM_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def derive_id(path: str) -> str:
    """A readable, deterministic id for a file path: ``<stem>-<16 hex digits of sha1(path)>``.

    The stem keeps ids readable in listings; the hash of the full path keeps ``a/0001.jpg`` and
    ``b/0001.jpg`` apart. Duplicate paths give duplicate ids, which the pre-flight check refuses.
    """
    stem = posixpath.splitext(posixpath.basename(path.rstrip("/")))[0]
    stem = _STEM_UNSAFE.sub("_", stem)[:48] or "row"
    return f"{stem}-{hashlib.sha1(path.encode('utf-8')).hexdigest()[:16]}"


def check_scheme(url: str) -> str | None:
    """Return the URL's protocol (None for a plain path); unknown protocols are a ManifestError."""
    protocol, _ = split_protocol(url)
    if protocol is None or protocol in ("file", "local"):
        return protocol
    if protocol not in fsspec.available_protocols() and protocol not in fsspec_registry:
        raise ManifestError(f"unknown URL scheme '{protocol}://' in {url!r}")
    return protocol


def filesystem_for(url: str, storage_options: dict[str, Any] | None = None) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem for a URL, with a clear error when its package is not installed."""
    protocol = check_scheme(url) or "file"
    try:
        return fsspec.filesystem(protocol, **(storage_options or {}))
    except ImportError as exc:
        raise ManifestError(f"{protocol}:// URLs need an extra package: {exc}") from None


def _format_of(url: str) -> str:
    name = url.rstrip("/").lower()
    if name.endswith((".csv", ".csv.gz", ".csv.bz2", ".csv.zst", ".tsv")):
        return "csv"
    if name.endswith((".parquet", ".pq", ".parq")):
        return "parquet"
    return ""


class ParquetFile:
    """A single Parquet file read with pyarrow, one source partition per row group.

    The same partitions, with the same dtypes, as ``dd.read_parquet(url, split_row_groups=True)`` (the tests
    compare them), without importing dask.dataframe in the driver: 0.4 s and 15 MB of every run.
    """

    def __init__(self, url: str, fs: fsspec.AbstractFileSystem) -> None:
        self.url, self.fs = url, fs
        with fs.open(url, "rb") as fh:
            schema = pq.ParquetFile(fh).schema_arrow
        self.columns = list(self._to_pandas(schema.empty_table()).columns)

    def partitions(self, columns: Sequence[str] | None = None) -> Iterator[pd.DataFrame]:
        with self.fs.open(self.url, "rb") as fh:
            pf = pq.ParquetFile(fh)
            for i in range(pf.num_row_groups):
                table = pf.read_row_group(i, columns=None if columns is None else list(columns),
                                          use_pandas_metadata=True)
                frame = self._to_pandas(table)
                yield frame if columns is None else frame[list(columns)]

    @staticmethod
    def _to_pandas(table: pa.Table) -> pd.DataFrame:
        """As Dask converts a row group: strings as ``string[pyarrow]`` (its ``dataframe.convert-string``
        setting, on by default), dates and decimals as Arrow dtypes, the index from the pandas metadata."""
        mapper = None
        if dask.config.get("dataframe.convert-string", None) in (None, True):
            arrow_dtypes = {pa.string(): pd.StringDtype("pyarrow"), pa.large_string(): pd.StringDtype("pyarrow"),
                            pa.date32(): pd.ArrowDtype(pa.date32()), pa.date64(): pd.ArrowDtype(pa.date64())}

            def mapper(t: pa.DataType) -> Any:
                return arrow_dtypes.get(t) or (pd.ArrowDtype(t) if pa.types.is_decimal(t) else None)

        return table.to_pandas(use_threads=False, ignore_metadata=False, types_mapper=mapper)


class DaskSource:
    """CSV files and Parquet datasets (folders): a Dask dataframe, planned and computed in this process."""

    def __init__(self, ddf: Any) -> None:
        self.ddf = ddf
        self.columns = [str(c) for c in ddf.columns]

    def partitions(self, columns: Sequence[str] | None = None) -> Iterator[pd.DataFrame]:
        ddf = self.ddf[list(columns)] if columns is not None else self.ddf
        with dask.config.set(scheduler="sync"):  # in this process, even when a Client is the default
            parts = ddf.to_delayed()
        for part in parts:
            yield part.compute(scheduler="sync")


@dataclass
class Manifest:
    """A manifest opened lazily: its source (row groups or a Dask dataframe) plus what is needed to give
    rows ids and paths.

    ``n_rows`` and ``partition_rows_count`` are known after :meth:`check`.
    """

    url: str
    format: str
    source: ParquetFile | DaskSource
    path_column: str
    id_column: str | None
    base: str
    limit: int | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    n_rows: int | None = None
    row_hashes: np.ndarray | None = None
    identity_columns: tuple[str, ...] = ()
    partition_by: str | None = None
    group_starts: np.ndarray | None = None

    @property
    def columns(self) -> list[str]:
        return [str(c) for c in self.source.columns]

    @property
    def key_column(self) -> str:
        """The column whose values must be unique: the id column, or the path ids derive from."""
        return self.id_column or self.path_column

    def require(self, columns: Sequence[str]) -> None:
        """Refuse the manifest if any of ``columns`` is missing."""
        missing = [c for c in columns if c not in self.columns]
        if missing:
            raise ManifestError(
                f"manifest {self.url} has no column {', '.join(repr(c) for c in missing)} "
                f"(columns: {', '.join(self.columns)})"
            )

    def _source_partitions(self, columns: Sequence[str] | None = None) -> Iterator[pd.DataFrame]:
        """Yield the source partitions in order, read in this process, truncated to ``limit``."""
        remaining = self.limit
        parts = self.source.partitions(columns)
        while remaining is None or remaining > 0:
            try:
                with _dask_pandas_deprecations_ignored():
                    df = next(parts, None)
            except Exception as exc:  # corrupt or unreadable manifest data
                raise ManifestError(f"cannot read manifest {self.url}: {type(exc).__name__}: {exc}") from None
            if df is None:
                return
            if remaining is not None:
                df = df.iloc[:remaining]
                remaining -= len(df)
            yield df.reset_index(drop=True)

    def check(self, identity_columns: Sequence[str] = ()) -> Manifest:
        """The pre-flight pass: count rows, refuse empty manifests, null/duplicate ids, bad schemes; hash
        each row's identity (key, path and ``identity_columns``: the other columns a pipeline reads)."""
        key = self.key_column
        self.require([key])
        has_paths = self.path_column in self.columns
        identity = [c for c in identity_columns if c in self.columns]
        cols = list(dict.fromkeys([key, *([self.path_column] if has_paths else []), *identity]))
        if self.partition_by:
            self.require([self.partition_by])
        n_rows = 0
        hashes: list[np.ndarray] = []
        row_hashes: list[np.ndarray] = []
        groups: list[pd.Series] = []
        schemes: set[str] = set()
        for df in self._source_partitions(list(dict.fromkeys([*cols, *filter(None, [self.partition_by])]))):
            n_rows += len(df)
            if len(df) == 0:
                continue
            keys = df[key]
            if keys.isna().any():
                row = int(np.flatnonzero(keys.isna().to_numpy())[0]) + n_rows - len(df)
                raise ManifestError(f"manifest {self.url}: column {key!r} is empty in row {row}")
            hashes.append(_hash_keys(keys))
            row_hashes.append(_hash_rows(df[cols]))
            if self.partition_by:
                groups.append(df[self.partition_by].astype(str))
            if has_paths:
                schemes |= _schemes_in(df[self.path_column])
        self.n_rows = n_rows
        if self.n_rows == 0:
            raise ManifestError(f"manifest {self.url} has no rows")
        for scheme in sorted(schemes):
            check_scheme(f"{scheme}://")
        _refuse_duplicates(self, np.concatenate(hashes))
        self.row_hashes = np.concatenate(row_hashes)
        self.identity_columns = tuple(cols)
        if self.partition_by:
            self.group_starts = _group_starts(self, pd.concat(groups, ignore_index=True))
        return self

    def chunk_bounds(self, partition_rows: int) -> np.ndarray:
        """Where each partition starts (and, last, the row count): every ``partition_rows`` rows, or with
        ``partition_by``, at the first group boundary at or after that many rows (groups are never cut)."""
        if self.n_rows is None:
            raise RuntimeError("call check() first")
        if self.group_starts is None:
            return np.append(np.arange(0, self.n_rows, partition_rows), self.n_rows)
        sizes = np.diff(np.append(self.group_starts, self.n_rows))
        too_big = np.flatnonzero(sizes > MAX_GROUP_ROWS)
        if too_big.size:
            raise ManifestError(f"manifest {self.url}: a group of {self.partition_by!r} has {int(sizes[too_big[0]]):,} "
                                f"rows, more than one task takes ({MAX_GROUP_ROWS:,}); split it")
        bounds, filled = [0], 0
        for start, size in zip(self.group_starts, sizes):
            if filled >= partition_rows:
                bounds.append(int(start))
                filled = 0
            filled += int(size)
        return np.array([*bounds, self.n_rows])

    def partition_count(self, partition_rows: int) -> int:
        """How many partitions :meth:`partitions` yields (known after :meth:`check`)."""
        return len(self.chunk_bounds(partition_rows)) - 1

    def partition_hashes(self, partition_rows: int) -> list[str]:
        """A digest of each partition's rows (ids, paths, the columns the pipeline reads), so a marker is
        only trusted for exactly the same work."""
        if self.row_hashes is None:
            raise RuntimeError("call check() first")
        bounds = self.chunk_bounds(partition_rows)
        return [hashlib.sha256(self.row_hashes[a:b].astype("<u8").tobytes()).hexdigest()[:20]
                for a, b in zip(bounds[:-1], bounds[1:])]

    def partition_hash(self, index: int, partition_rows: int) -> str:
        return self.partition_hashes(partition_rows)[index]

    def partitions(self, partition_rows: int) -> Iterator[pd.DataFrame]:
        """Yield row chunks of exactly ``partition_rows`` rows (the last may be shorter), each with a
        string ``id`` column.

        Chunk ``k`` is rows ``k * partition_rows`` up to the next chunk, whatever the source's own
        partitions (many small Parquet row groups are merged, large ones split), so the split is the
        same on every run of the same manifest and a resumed run finds its finished partitions again.
        The driver holds at most one chunk and one source partition.
        """
        if partition_rows < 1:
            raise ManifestError("partition_rows must be at least 1")
        sizes = iter(np.diff(self.chunk_bounds(partition_rows)).tolist())
        want = next(sizes, 0)
        pending: list[pd.DataFrame] = []
        held = 0
        for df in self._source_partitions():
            pending.append(df)
            held += len(df)
            while want and held >= want:
                chunk, pending, held = _take(pending, want)
                yield self.with_ids(chunk)
                want = next(sizes, 0)

    def with_ids(self, df: pd.DataFrame) -> pd.DataFrame:
        """Put a string ``id`` column first: copied from the id column or derived from the path."""
        if self.id_column is not None:
            ids = df[self.id_column].astype(str)
        else:
            ids = pd.Series([derive_id(str(p)) for p in df[self.path_column]], index=df.index)
        rest = df.drop(columns=[ID_COLUMN]) if ID_COLUMN in df.columns else df
        out = rest.copy()
        out.insert(0, ID_COLUMN, ids.astype(object).astype(str))
        return out

    def resolve(self, path: str) -> str:
        """The URL of a row's file: relative paths resolve against the manifest's own folder."""
        return resolve_path(path, self.base)


def _group_starts(manifest: Manifest, keys: pd.Series) -> np.ndarray:
    """Row numbers where a new value of the partition key begins; its rows must be consecutive."""
    codes, _ = pd.factorize(keys)
    starts = np.flatnonzero(np.diff(codes, prepend=-1))
    if len(starts) != len(np.unique(codes)):
        seen: set[int] = set()
        for start in starts:
            if codes[start] in seen:
                raise ManifestError(f"manifest {manifest.url}: the rows of {manifest.partition_by}="
                                    f"{keys.iloc[start]!r} are not together; sort the manifest by "
                                    f"{manifest.partition_by!r} to keep each group in one task")
            seen.add(codes[start])
    return starts


@contextlib.contextmanager
def _dask_pandas_deprecations_ignored() -> Iterator[None]:
    """dask 2026.7 calls a pandas API that pandas 3.1 deprecates: nothing for a user to act on, and fatal
    where warnings are errors. Ignored here only, never in the user's process at large."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The inplace keyword in DataFrame.reset_index")
        yield


def _take(frames: list[pd.DataFrame], n: int) -> tuple[pd.DataFrame, list[pd.DataFrame], int]:
    """The first ``n`` rows of ``frames`` as one frame, and what is left (frames and their row count)."""
    taken, rest, need = [], list(frames), n
    while need:
        df = rest.pop(0)
        if len(df) <= need:
            taken.append(df)
            need -= len(df)
        else:
            taken.append(df.iloc[:need])
            rest.insert(0, df.iloc[need:])
            need = 0
    chunk = pd.concat(taken, ignore_index=True) if len(taken) > 1 else taken[0].reset_index(drop=True)
    return chunk, rest, sum(len(df) for df in rest)


def _hash_rows(frame: pd.DataFrame) -> np.ndarray:
    """64-bit hashes of whole rows, every value as text (the same on every read of the same file)."""
    return pd.util.hash_pandas_object(frame.astype(str), index=False).to_numpy(dtype=np.uint64)


def _hash_keys(keys: pd.Series, slice_rows: int = 1 << 16) -> np.ndarray:
    """64-bit hashes of the keys as strings, computed in slices to keep intermediates small."""
    out = np.empty(len(keys), dtype=np.uint64)
    is_text = pd.api.types.is_string_dtype(keys.dtype)
    for start in range(0, len(keys), slice_rows):
        part = keys.iloc[start : start + slice_rows]
        out[start : start + len(part)] = pd.util.hash_pandas_object(part if is_text else part.astype(str), index=False)
    return out


def _schemes_in(paths: pd.Series) -> set[str]:
    text = paths.dropna().astype(str)
    found = text.str.extract(r"^([A-Za-z][A-Za-z0-9+.-]*)://", expand=False).dropna()
    return set(found.unique()) - {"file", "local"}


def _refuse_duplicates(manifest: Manifest, hashes: np.ndarray) -> None:
    """Raise with the first duplicated key values, found from 64-bit hashes of the key column."""
    ordered = np.sort(hashes)
    dup_hashes = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
    if dup_hashes.size == 0:
        return
    key = manifest.key_column
    examples: list[str] = []
    for df in manifest._source_partitions([key]):
        h = _hash_keys(df[key])
        examples += [str(v) for v in df[key][np.isin(h, dup_hashes)].unique()]
        if len(examples) >= 3:
            break
    what = "ids" if manifest.id_column else "paths (ids derive from them)"
    raise ManifestError(
        f"manifest {manifest.url} has duplicate {what} in column {key!r}: "
        f"{', '.join(repr(e) for e in examples[:3])} ({dup_hashes.size} duplicated value(s))"
    )


def read_manifest(
    url: str,
    *,
    path_column: str = "path",
    id_column: str | None = None,
    limit: int | None = None,
    storage_options: dict[str, Any] | None = None,
    check: bool = True,
) -> Manifest:
    """Open a CSV or Parquet manifest lazily and (by default) run the pre-flight checks.

    ``url`` is a local path or any fsspec URL (``s3://``, ``memory://``, ...). ``limit`` keeps only
    the first rows. Raises :class:`~daskmv.errors.ManifestError` on anything that stops a run.
    """
    url = str(url)
    if limit is not None and limit < 1:
        raise ManifestError("--limit must be at least 1")
    storage_options = dict(storage_options or {})
    fs = filesystem_for(url, storage_options)
    fmt = _format_of(url)
    try:
        exists = fs.exists(url)
        is_dir = exists and fs.isdir(url)
    except Exception as exc:
        raise ManifestError(f"cannot reach manifest {url}: {type(exc).__name__}: {exc}") from None
    if not exists:
        raise ManifestError(f"manifest not found: {url}")
    if is_dir and not fmt:
        fmt = "parquet"
    if not fmt:
        raise ManifestError(f"manifest {url}: unknown format (expected .csv or .parquet)")
    source = _open_source(url, fmt, fs, is_dir, storage_options, text_columns=(ID_COLUMN, id_column, path_column))
    if id_column is None and ID_COLUMN in source.columns:
        id_column = ID_COLUMN
    if id_column is None and path_column not in source.columns:
        raise ManifestError(
            f"manifest {url} has no column {path_column!r} to read files from or derive ids from "
            f"(columns: {', '.join(map(str, source.columns))}); name it with --path-column or --id-column"
        )
    manifest = Manifest(
        url=url,
        format=fmt,
        source=source,
        path_column=path_column,
        id_column=id_column,
        base=_parent(url),
        limit=limit,
        storage_options=storage_options,
    )
    if id_column is not None:
        manifest.require([id_column])
    return manifest.check() if check else manifest


def _parent(url: str) -> str:
    protocol, path = split_protocol(url)
    parent = posixpath.dirname(path.rstrip("/"))
    if protocol in (None, "file", "local"):
        return os.path.dirname(os.path.abspath(path))
    return f"{protocol}://{parent}"


def _open_source(url: str, fmt: str, fs: fsspec.AbstractFileSystem, is_dir: bool, storage_options: dict[str, Any],
                 text_columns: Sequence[str | None] = ()) -> ParquetFile | DaskSource:
    """A single Parquet file's row groups (pyarrow), else a Dask dataframe planned in this process
    (``memory://`` is per process)."""
    try:
        if fmt == "parquet" and not is_dir:
            return ParquetFile(url, fs)
        with dask.config.set(scheduler="sync"):
            return DaskSource(_read_ddf(url, fmt, storage_options, [c for c in text_columns if c]))
    except ManifestError:
        raise
    except Exception as exc:
        raise ManifestError(f"cannot read manifest {url}: {type(exc).__name__}: {exc}") from None


def _read_ddf(url: str, fmt: str, storage_options: dict[str, Any], text_columns: Sequence[str]) -> Any:
    import dask.dataframe as dd

    options = storage_options or None
    if fmt == "parquet":
        # One partition per row group: the driver holds one row group at a time, whatever the file's size.
        return dd.read_parquet(url, storage_options=options, split_row_groups=True)
    lower = url.lower()
    compressed = not lower.endswith((".csv", ".tsv"))  # compressed CSV cannot be split into blocks
    # ids and paths are text: "007" must not become 7 (nor "007" and "7" duplicates)
    return dd.read_csv(url, blocksize=None if compressed else CSV_BLOCKSIZE, sep="\t" if lower.endswith(".tsv") else ",",
                       storage_options=options, dtype={c: str for c in text_columns})
