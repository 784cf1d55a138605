"""The final manifest, written part by part, in manifest order, as partitions finish.

``manifest.parquet`` (and ``manifest.csv`` for CSV inputs) and ``errors.log`` (its format: see
:mod:`daskmv.failures`) are written to temporary names and renamed when the last part is in, so a reader
sees the previous manifest or the new one, never half of one. On local disks every file is fsynced before
any rename, ``manifest.parquet`` is renamed last (when it is new, so are its twins) and the folder is
fsynced after. Memory stays at one partition whatever the manifest's size.
"""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from daskmv.failures import HEADER, log_lines

if TYPE_CHECKING:
    from daskmv.store import Store


class SchemaMismatch(Exception):
    """A part's columns cannot be cast to the schema the manifest was started with."""


class ManifestWriter:
    """Append finished partitions' tables; ``commit`` renames the files into place.

    The schema is the first part's unless given; a later part that cannot be cast to it raises
    :class:`SchemaMismatch` (the engine then falls back to :meth:`Store.assemble`, which unifies first).
    """

    def __init__(self, store: Store, csv: bool, schema: pa.Schema | None = None) -> None:
        from daskmv.store import ERRORS_LOG, MANIFEST, MANIFEST_CSV

        self.store, self.csv, self.schema = store, csv, schema
        tmp = f".tmp-{uuid.uuid4().hex[:8]}"
        self.names = {MANIFEST: MANIFEST + tmp, ERRORS_LOG: ERRORS_LOG + tmp}
        if csv:
            self.names[MANIFEST_CSV] = MANIFEST_CSV + tmp
        self.counts = {"rows": 0, "ok": 0, "error": 0}
        self._files: dict[str, Any] = {}
        self._parquet: pq.ParquetWriter | None = None
        self._csv: pacsv.CSVWriter | None = None
        self.committed = False

    def _open(self, schema: pa.Schema) -> None:
        from daskmv.store import ERRORS_LOG, MANIFEST, MANIFEST_CSV

        fs, path = self.store.fs, self.store.path
        fs.makedirs(path, exist_ok=True)
        self._files = {name: fs.open(f"{path}/{tmp}", "wb") for name, tmp in self.names.items()}
        self.schema = schema
        self._parquet = pq.ParquetWriter(self._files[MANIFEST], schema, compression="zstd")
        if self.csv:
            self._csv = pacsv.CSVWriter(self._files[MANIFEST_CSV], _csv_schema(schema))
        self._errors = self._files[ERRORS_LOG]
        self._errors.write(HEADER.encode())

    def add(self, table: pa.Table, info: dict[str, Any] | None = None) -> None:
        """Append one partition's rows (status, error and id columns are required).

        ``info`` says when and where the rows were made, for errors.log: ``time`` and ``worker`` (see
        :func:`daskmv.failures.origin`; ``-`` without), or ``by_id`` per row (:func:`daskmv.failures.log_lines`).
        """
        if self._parquet is None:
            self._open(self.schema or table.schema)
        assert self.schema is not None and self._parquet is not None
        extra = set(table.column_names) - set(self.schema.names)
        if extra:
            raise SchemaMismatch(f"columns {', '.join(sorted(extra))} are not in the manifest's schema")
        try:
            table = conform(table, self.schema)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
            raise SchemaMismatch(str(exc)) from None
        self._parquet.write_table(table)
        if self._csv is not None:
            self._csv.write_table(_csv_table(table))
        status = table.column("status").to_pylist()
        errors = status.count("error")
        self.counts["rows"] += table.num_rows
        self.counts["ok"] += status.count("ok")
        self.counts["error"] += errors
        if errors:
            self._errors.write(log_lines(table, info).encode())

    def _close(self) -> None:
        writers, self._parquet, self._csv = (self._parquet, self._csv), None, None
        files, self._files = list(self._files.values()), {}
        try:
            for writer in writers:
                if writer is not None:
                    writer.close()
        finally:
            for fh in files:
                fh.close()

    def commit(self) -> dict[str, int]:
        """Close and rename into place; an empty run still gets (empty) files."""
        from daskmv.store import MANIFEST, MANIFEST_CSV, fsync_dir, fsync_path

        if self._parquet is None:
            self._open(self.schema or pa.schema([("id", pa.string()), ("status", pa.string()),
                                                 ("error", pa.string())]))
        self._close()
        path = self.store.path
        if self.store.local:
            for tmp in self.names.values():
                fsync_path(f"{path}/{tmp}")
        for final in sorted(self.names, key=lambda name: name == MANIFEST):  # manifest.parquet last
            self.store.fs.mv(f"{path}/{self.names[final]}", f"{path}/{final}")
        if self.store.local:
            fsync_dir(path)
        self.committed = True
        if not self.csv:
            self.store.remove(MANIFEST_CSV)
        return dict(self.counts)

    def abort(self) -> None:
        """Close and delete the temporary files (nothing to do after a commit)."""
        if self.committed:
            return
        try:
            self._close()
        except OSError:  # closing flushes buffers, which fails again on a full disk
            pass
        for tmp in self.names.values():
            self.store.remove(tmp)
        self.committed = True


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with ``schema``'s columns, in its order, cast to its types (missing columns null)."""
    columns = []
    for field in schema:
        if field.name in table.column_names:
            col = table.column(field.name)
            columns.append(col if col.type == field.type else col.cast(field.type))
        else:
            columns.append(pa.nulls(table.num_rows, field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def _csv_schema(schema: pa.Schema) -> pa.Schema:
    """The CSV's columns: exported files' paths stand in the ``<name>_path`` columns (see daskmv.export)."""
    from daskmv.export import SUFFIX

    names = set(schema.names)
    return pa.schema([pa.field(f.name, _csv_type(f.type)) for f in schema
                      if not (f.name.endswith(SUFFIX) and f.name[: -len(SUFFIX)] + "_path" in names)])


def _csv_type(t: pa.DataType) -> pa.DataType:
    return pa.string() if (pa.types.is_nested(t) or pa.types.is_dictionary(t)) else t


def _csv_table(table: pa.Table) -> pa.Table:
    from daskmv.export import SUFFIX

    schema = _csv_schema(table.schema)
    cols = []
    for field in schema:
        exported = field.name[: -len("_path")] + SUFFIX if field.name.endswith("_path") else None
        col = table.column(exported if exported in table.column_names else field.name)
        if field.type != col.type:
            col = pa.array([None if v is None else json.dumps(v) for v in col.to_pylist()], pa.string())
        cols.append(col)
    return pa.Table.from_arrays(cols, schema=schema)

