"""The output root: its layout, the partition files that make a run resumable, and the final manifest.

```
out/
  run.json           what made this root: pipeline, fingerprint, manifest, counts, timings, versions
  run.lock           present while a run writes here
  manifest.parquet   input columns + output columns + <array>_path references + status, error, seconds
  manifest.csv       its twin, when the input manifest was CSV
  errors.log         one line per failed row: id <TAB> op <TAB> message
  outputs.zarr/<output>/p000012      one array per output per partition (sharded: one file)
  parts/p000012.parquet              a partition's finished rows
  parts/p000012.json                 its completion marker, written after the rows and arrays
  parts/p000012.failed.json          a partition given up on after its retries
```

Write, then mark: a marker always means the arrays and the rows are there. Names come from partition
numbers, never from ids or paths in the manifest, so nothing is written outside the root. An array
reference is ``outputs.zarr/<output>/p000012#5`` (row 5 of that array), relative to the manifest.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from fsspec.core import url_to_fs

from daskmv.arrays import PartitionArray, Sink, write_partition_array
from daskmv.errors import StoreError

RUN_JSON = "run.json"
LOCK = "run.lock"
MANIFEST = "manifest.parquet"
MANIFEST_CSV = "manifest.csv"
ERRORS_LOG = "errors.log"
ZARR = "outputs.zarr"
PARTS = "parts"
#: Files and folders daskmv owns in a root; ``--overwrite`` removes these and nothing else.
OWNED = (RUN_JSON, MANIFEST, MANIFEST_CSV, ERRORS_LOG, ZARR, PARTS, "report.html", "png", "preview.png")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def partition_name(index: int, generation: int = 0) -> str:
    """``p000012``, or ``p000012-r1`` for the arrays of a ``--retry-errors`` pass."""
    return f"p{index:06d}" + (f"-r{generation}" if generation else "")


def array_ref(output: str, index: int, generation: int, row: int) -> str:
    return f"{ZARR}/{output}/{partition_name(index, generation)}#{row}"


def parse_ref(ref: str) -> tuple[str, int]:
    """Split ``outputs.zarr/x/p000001#5`` into the array path and the row."""
    path, sep, row = ref.rpartition("#")
    if not sep or not row.isdigit():
        raise ValueError(f"not an array reference: {ref!r}")
    return path, int(row)


@dataclass
class Marker:
    """A finished partition, as recorded in ``parts/pNNNNNN.json``."""

    index: int
    fingerprint: str
    rows_hash: str
    rows: int
    ok: int
    errors: int
    generation: int = 0
    info: dict[str, Any] | None = None

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Marker:
        keys = ("index", "fingerprint", "rows_hash", "rows", "ok", "errors", "generation")
        return cls(**{k: doc[k] for k in keys if k in doc}, info=doc)


class Store:
    """One output root (a local path or an fsspec URL) and the files daskmv keeps in it."""

    def __init__(self, root: str, storage_options: dict[str, Any] | None = None) -> None:
        self.root = str(root).rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs, self.path = url_to_fs(self.root, **self.storage_options)
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        if self.local:
            self.path = os.path.abspath(self.path)
            self.root = self.path

    # -- paths and small files ---------------------------------------------------------------------
    def _p(self, *parts: str) -> str:
        return "/".join([self.path, *parts])

    def url(self, *parts: str) -> str:
        """A URL (or local path) inside the root, for other libraries to open."""
        return "/".join([self.root, *parts])

    def open(self, rel: str, mode: str = "rb") -> Any:
        """A file inside the root, opened with the root's filesystem."""
        return self.fs.open(self._p(rel), mode)

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self._p(*parts))

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write-then-rename, so a reader never sees half a file (atomic on local disks)."""
        final = self._p(rel)
        tmp = self._p(f"{rel}.tmp-{uuid.uuid4().hex[:8]}")
        self.fs.makedirs(self._p(*rel.split("/")[:-1]) if "/" in rel else self.path, exist_ok=True)
        try:
            if self.local:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, final)
            else:
                self.fs.pipe_file(tmp, data)
                self.fs.mv(tmp, final)
        except BaseException:  # a full disk, say: leave no half-written file behind
            try:
                self.fs.rm(tmp)
            except (OSError, FileNotFoundError):
                pass
            raise

    def write_json(self, rel: str, doc: Any) -> None:
        self.write_bytes(rel, json.dumps(doc, indent=1, default=str).encode())

    def read_json(self, rel: str) -> Any | None:
        try:
            return json.loads(self.fs.cat_file(self._p(rel)))
        except FileNotFoundError:
            return None
        except json.JSONDecodeError as exc:
            raise StoreError(f"{self.url(rel)} is not valid JSON ({exc}); remove it or use --overwrite") from None

    def remove(self, rel: str) -> None:
        if self.exists(rel):
            self.fs.rm(self._p(rel), recursive=True)

    # -- the run's lock and identity ---------------------------------------------------------------
    def acquire_lock(self) -> None:
        """Refuse a second concurrent run; take over a lock left by a dead process on this host."""
        self.fs.makedirs(self.path, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": now()}
        held = self.read_json(LOCK)
        if held is not None and not _lock_is_stale(held):
            raise StoreError(
                f"output root {self.root} is in use by a run (pid {held.get('pid')} on {held.get('host')}, "
                f"since {held.get('started')}); if no run is going, delete {self.url(LOCK)}"
            )
        if self.local and held is None:
            try:
                fd = os.open(self._p(LOCK), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                raise StoreError(f"output root {self.root} was just locked by another run") from None
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
        else:
            self.write_json(LOCK, me)

    def release_lock(self) -> None:
        held = self.read_json(LOCK)
        if held and held.get("pid") == os.getpid() and held.get("host") == socket.gethostname():
            self.remove(LOCK)

    def prepare(self, binding: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
        """Check the root belongs to this run (same ``binding``), or clear it when ``overwrite``.

        Returns the previous ``run.json`` when resuming, else None.
        """
        previous = self.read_json(RUN_JSON)
        if overwrite:
            for name in OWNED:
                self.remove(name)
            return None
        if previous is None:
            if self.exists(PARTS) or self.exists(ZARR):
                raise StoreError(f"{self.root} holds outputs but no {RUN_JSON}; use --overwrite or another --out")
            return None
        old = previous.get("binding", {})
        diffs = [k for k in binding if k in old and old[k] != binding[k]]
        if diffs:
            lines = "; ".join(f"{k}: {old[k]!r} there, {binding[k]!r} now" for k in diffs)
            raise StoreError(
                f"output root {self.root} was made by a different run ({lines}); "
                "use another --out, or --overwrite to replace it"
            )
        return previous

    # -- partitions --------------------------------------------------------------------------------
    def marker(self, index: int) -> Marker | None:
        doc = self.read_json(f"{PARTS}/{partition_name(index)}.json")
        return None if doc is None else Marker.from_json(doc)

    def markers(self) -> dict[int, Marker]:
        """Every completion marker in the root, by partition index (one listing, then small reads)."""
        found: dict[int, Marker] = {}
        for name in self._part_files(".json"):
            stem = name[: -len(".json")]
            if stem.startswith("p") and stem[1:].isdigit():
                marker = self.marker(int(stem[1:]))
                if marker is not None:
                    found[marker.index] = marker
        return found

    def failures(self) -> dict[int, dict[str, Any]]:
        """Partitions given up on (``parts/pNNNNNN.failed.json``), by index."""
        out: dict[int, dict[str, Any]] = {}
        for name in self._part_files(".failed.json"):
            doc = self.read_json(f"{PARTS}/{name}")
            if doc is not None:
                out[int(doc["index"])] = doc
        return out

    def _part_files(self, suffix: str) -> list[str]:
        try:
            names = [p.rsplit("/", 1)[-1] for p in self.fs.ls(self._p(PARTS), detail=False)]
        except FileNotFoundError:
            return []
        if suffix == ".json":
            return sorted(n for n in names if n.endswith(".json") and not n.endswith(".failed.json"))
        return sorted(n for n in names if n.endswith(suffix))

    def write_part(self, index: int, table: pa.Table) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        self.write_bytes(f"{PARTS}/{partition_name(index)}.parquet", sink.getvalue().to_pybytes())

    def read_part(self, index: int) -> pa.Table:
        with self.fs.open(self._p(PARTS, f"{partition_name(index)}.parquet"), "rb") as fh:
            return pq.read_table(fh)

    def _part_schema(self, index: int) -> pa.Schema:
        with self.fs.open(self._p(PARTS, f"{partition_name(index)}.parquet"), "rb") as fh:
            return pq.read_schema(fh)

    def mark_done(self, marker: dict[str, Any]) -> None:
        """The last write of a partition: after this, the partition counts as finished."""
        self.write_json(f"{PARTS}/{partition_name(marker['index'])}.json", marker)
        self.remove(f"{PARTS}/{partition_name(marker['index'])}.failed.json")

    def mark_failed(self, index: int, doc: dict[str, Any]) -> None:
        self.write_json(f"{PARTS}/{partition_name(index)}.failed.json", {"index": index, **doc})

    def status(self) -> dict[str, Any]:
        """Done / failed / pending rows and partitions, from the files alone (works mid-run or after a kill)."""
        run = self.read_json(RUN_JSON)
        if run is None:
            raise StoreError(f"{self.root} is not a daskmv output root (no {RUN_JSON})")
        fingerprint = run["binding"]["fingerprint"]
        n_parts = int(run.get("partitions") or 0)
        done = {i: m for i, m in self.markers().items() if m.fingerprint == fingerprint and i < n_parts}
        failed = {i: f for i, f in self.failures().items() if i not in done and i < n_parts}
        total = int(run["manifest"]["rows"] or 0)
        done_rows = sum(m.rows for m in done.values())
        failed_rows = sum(int(f.get("rows", 0)) for f in failed.values())
        lock = self.read_json(LOCK)
        if lock is not None and not _lock_is_stale(lock):
            state = "running"
        else:
            state = "interrupted" if run.get("state") == "running" else run.get("state", "unknown")
        return {
            "root": self.root,
            "state": state,
            "pipeline": run["pipeline"]["name"],
            "fingerprint": fingerprint,
            "rows": total,
            "done": done_rows,
            "ok": sum(m.ok for m in done.values()),
            "error": sum(m.errors for m in done.values()),
            "failed": failed_rows,
            "pending": max(0, total - done_rows - failed_rows),
            "partitions": n_parts,
            "partitions_done": len(done),
            "partitions_failed": sorted(failed),
            "lock": lock,
        }

    # -- arrays ------------------------------------------------------------------------------------
    def prepare_arrays(self, outputs: Sequence[str]) -> None:
        """Create the Zarr groups once, in the driver, so tasks never race on shared metadata."""
        root = zarr.open_group(self.url(ZARR), mode="a", storage_options=self._zarr_options())
        for name in outputs:
            if name not in root:
                root.create_group(name)

    def write_array(self, output: str, index: int, generation: int, array: PartitionArray,
                    compression: str | None = None) -> list[str | None]:
        """Write one partition's values of one output; return each row's reference (None: no value).

        Same-shaped values become one ``[rows, ...]`` array whose rows are inner chunks of a single
        shard (one file, one row readable alone). Values of different shapes are stored ragged: a
        flat ``data`` array with ``offsets`` and ``shapes``.
        """
        if not array:
            array.discard()
            if array.stream is not None or array.ragged is not None:
                self.remove(f"{ZARR}/{output}/{partition_name(index, generation)}")
            return [None] * array.n
        url = self.url(ZARR, output, partition_name(index, generation))
        write_partition_array(url, array, self._zarr_options(), compression, fs=self.fs if self.local else None)
        return [array_ref(output, index, generation, i) if p else None for i, p in enumerate(array.present)]

    def array_sink(self, output: str, index: int, generation: int, compression: str | None) -> Sink | None:
        """Where a partition array can stream as rows finish: local roots, raw or zstd-compressed outputs."""
        if not self.local or compression not in (None, "zstd"):
            return None
        return Sink(self.fs, self.url(ZARR, output, partition_name(index, generation)), compression=compression)

    def _zarr_options(self) -> dict[str, Any] | None:
        return None if self.local else (self.storage_options or None)

    # -- the final manifest ------------------------------------------------------------------------
    def assemble(self, indices: Sequence[int], csv: bool) -> dict[str, int]:
        """Concatenate the parts of ``indices`` (in order) into the final manifest and errors.log.

        Streams one part at a time, so memory stays at one partition whatever the manifest's size.
        The engine normally appends parts while the run goes (:class:`ManifestWriter`); this two-pass
        version, which first unifies every part's schema, is its fallback.
        """
        from daskmv.assemble import ManifestWriter

        schemas = [self._part_schema(i) for i in indices]
        schema = pa.unify_schemas(schemas, promote_options="permissive") if schemas else None
        writer = ManifestWriter(self, csv, schema)
        for index in indices:
            writer.add(self.read_part(index))
        return writer.commit()

def _lock_is_stale(held: dict[str, Any]) -> bool:
    """A lock is stale when its process is gone; only checkable for locks taken on this host."""
    if held.get("host") != socket.gethostname():
        return False
    try:
        import psutil

        return not psutil.pid_exists(int(held.get("pid", -1)))
    except (ValueError, TypeError):
        return True

