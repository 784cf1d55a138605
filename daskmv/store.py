"""The output root: its layout, the partition files that make a run resumable, and the final manifest.

```
out/
  run.json           what made this root: pipeline, fingerprint, manifest, counts, timings, versions
  run.lock           present while a run writes here
  manifest.parquet   input columns + output columns + <array>_path references + status, error, seconds
  manifest.csv       its twin, when the input manifest was CSV
  errors.log         a header, then one line per failed row: time <TAB> worker <TAB> id <TAB> op <TAB> message
  outputs.zarr/<output>/p000012-3fa9c1d20b7e   one array per output per partition *attempt* (one shard file)
  parts/p000012-3fa9c1d20b7e.parquet           that attempt's rows
  parts/p000012-3fa9c1d20b7e.lease             present while the attempt runs (refreshed, see LEASE_TIMEOUT)
  parts/p000012.json                           the partition's marker: the one commit point
  parts/p000012.failed.json                    a partition given up on after its retries
```

Every execution of a partition (an *attempt*) writes under its own random token, so two attempts of one
partition (an orphan task left by a crashed driver, a task the scheduler re-ran, a ``--retry-errors`` pass)
never touch each other's files. The marker names the part and the tokens whose arrays that part
references; it is written last, with write-then-rename and fsync, and only when no attempt of the same
work committed first. Files of attempts no marker references are garbage: :meth:`Store.collect_garbage`
removes them once their lease has gone stale (at the end of every run, and with ``daskmv status --gc``).

Names come from partition numbers and tokens, never from ids or paths in the manifest, so nothing is
written outside the root. An array reference is ``outputs.zarr/<output>/p000012-<token>#5`` (row 5 of that
array), relative to the manifest.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from fsspec.core import url_to_fs

from daskmv.arrays import PartitionArray, Sink, write_partition_array
from daskmv.errors import OutputRootError, StoreError

RUN_JSON = "run.json"
LOCK = "run.lock"
MANIFEST = "manifest.parquet"
MANIFEST_CSV = "manifest.csv"
ERRORS_LOG = "errors.log"
ZARR = "outputs.zarr"
PARTS = "parts"
ARTIFACTS = "artifacts"
STAGES = "stages"
#: Files and folders daskmv owns in a root; ``--overwrite`` removes these and nothing else.
OWNED = (RUN_JSON, MANIFEST, MANIFEST_CSV, ERRORS_LOG, ZARR, PARTS, ARTIFACTS, STAGES, "report.html", "png",
         "preview.png", "work")
#: The layout of partition files (attempt tokens, leases); roots of another layout are not resumed.
LAYOUT = 2
#: An attempt's lease is refreshed every LEASE_REFRESH seconds while it runs; one untouched for
#: LEASE_TIMEOUT seconds belongs to an attempt that died, and its files may be collected.
LEASE_REFRESH = 30.0
LEASE_TIMEOUT = 300.0
_ATTEMPT = re.compile(r"^p(\d{6,})-([0-9a-f]{12})$")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def partition_name(index: int) -> str:
    """``p000012``: the partition's marker and export folder."""
    return f"p{index:06d}"


def new_token() -> str:
    """A fresh attempt token: 12 random hex digits."""
    return uuid.uuid4().hex[:12]


def attempt_name(index: int, token: str) -> str:
    """``p000012-3fa9c1d20b7e``: the files of one attempt of partition 12."""
    return f"{partition_name(index)}-{token}"


def parse_attempt(name: str) -> tuple[int, str] | None:
    """(index, token) of an attempt's file or folder name (suffix dropped), None for other names."""
    stem = name.split(".", 1)[0]
    match = _ATTEMPT.match(stem)
    return (int(match.group(1)), match.group(2)) if match else None


def array_ref(output: str, attempt: str, row: int) -> str:
    return f"{ZARR}/{output}/{attempt}#{row}"


def parse_ref(ref: str) -> tuple[str, int]:
    """Split ``outputs.zarr/x/p000001-<token>#5`` into the array path and the row."""
    path, sep, row = ref.rpartition("#")
    if not sep or not row.isdigit():
        raise ValueError(f"not an array reference: {ref!r}")
    return path, int(row)


def ref_tokens(refs: Sequence[str | None]) -> set[str]:
    """The attempt tokens whose arrays these references point into."""
    found = set()
    for ref in refs:
        if ref:
            parsed = parse_attempt(ref.rpartition("#")[0].rsplit("/", 1)[-1])
            if parsed:
                found.add(parsed[1])
    return found


@dataclass
class Marker:
    """A finished partition, as recorded in ``parts/pNNNNNN.json``.

    ``part`` is the file of its rows; ``tokens`` every attempt whose arrays those rows reference (more
    than one after ``--retry-errors``). ``inputs_hash`` covers the rows' pass-through columns.
    """

    index: int
    fingerprint: str
    rows_hash: str
    rows: int
    ok: int
    errors: int
    part: str = ""
    token: str = ""
    tokens: list[str] = field(default_factory=list)
    generation: int = 0
    inputs_hash: str | None = None
    info: dict[str, Any] | None = None

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Marker:
        keys = ("index", "fingerprint", "rows_hash", "rows", "ok", "errors", "part", "token", "tokens",
                "generation", "inputs_hash")
        return cls(**{k: doc[k] for k in keys if k in doc}, info=doc)

    def same_work(self, fingerprint: str, rows_hash: str) -> bool:
        return (self.fingerprint, self.rows_hash) == (fingerprint, rows_hash)



def remove_local(path: str) -> None:
    """Remove a local file, link (not what it points to) or folder, if it is there."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        with contextlib.suppress(OSError):
            os.remove(path)


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

    @contextlib.contextmanager
    def writing(self, what: str = "") -> Iterator[None]:
        """Turn an OSError from the root's filesystem into an :class:`OutputRootError` that names it.

        Network errors (``TimeoutError``, ``ConnectionError``) pass through: they are not the root's.
        """
        try:
            yield
        except OutputRootError:
            raise
        except (TimeoutError, ConnectionError):
            raise
        except OSError as exc:
            raise OutputRootError.of(self.root, exc, what) from None

    def write_bytes(self, rel: str, data: bytes, sync: bool = True) -> None:
        """Write-then-rename, so a reader never sees half a file (atomic on local disks).

        On local disks the data is fsynced before the rename and the folder after it (``sync``), so a
        file that exists after a crash holds all its bytes.
        """
        final = self._p(rel)
        tmp = self._p(f"{rel}.tmp-{uuid.uuid4().hex[:8]}")
        with self.writing(f"writing {rel}"):
            self.fs.makedirs(self._p(*rel.split("/")[:-1]) if "/" in rel else self.path, exist_ok=True)
            try:
                if self.local:
                    _write_synced(tmp, data, sync)
                    os.replace(tmp, final)
                    if sync:
                        fsync_dir(os.path.dirname(final))
                else:
                    self.fs.pipe_file(tmp, data)
                    self.fs.mv(tmp, final)
            except BaseException:  # a full disk, say: leave no half-written file behind
                try:
                    self.fs.rm(tmp)
                except (OSError, FileNotFoundError):
                    pass
                raise

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Publish ``rel`` only if it does not exist yet; False when another writer got there first.

        Atomic on local disks (a hard link never replaces); elsewhere a check, then write-then-rename.
        """
        if not self.local:
            if self.exists(rel):
                return False
            self.write_bytes(rel, data)
            return True
        final = self._p(rel)
        tmp = self._p(f"{rel}.tmp-{uuid.uuid4().hex[:8]}")
        with self.writing(f"writing {rel}"):
            os.makedirs(os.path.dirname(final), exist_ok=True)
            try:
                _write_synced(tmp, data, True)
                os.link(tmp, final)
                fsync_dir(os.path.dirname(final))
                return True
            except FileExistsError:
                return False
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)

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
        with self.writing(f"removing {rel}"):
            if self.exists(rel):
                self.fs.rm(self._p(rel), recursive=True)

    def sync_tree(self, rel: str) -> None:
        """fsync every file and folder under ``rel`` (local roots): what a marker vouches for is on disk."""
        if not self.local:
            return
        top = self._p(rel)
        with self.writing(f"syncing {rel}"):
            for folder, _, files in os.walk(top):
                for name in files:
                    fsync_path(os.path.join(folder, name))
                fsync_dir(folder)
            fsync_dir(os.path.dirname(top))

    # -- the run's lock and identity ---------------------------------------------------------------
    def acquire_lock(self) -> None:
        """Refuse a second concurrent run; take over a lock left by a dead process on this host."""
        with self.writing("creating the root"):
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
            except OSError as exc:
                raise OutputRootError.of(self.root, exc, "locking") from None
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
        if old.get("layout") != binding.get("layout"):
            raise StoreError(f"output root {self.root} was made by another version of daskmv (partition layout "
                             f"{old.get('layout', 1)}, now {binding.get('layout')}); use another --out, or "
                             "--overwrite to replace it")
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
        names = self._listing(PARTS)
        if suffix == ".json":
            return sorted(n for n in names if n.endswith(".json") and not n.endswith(".failed.json"))
        return sorted(n for n in names if n.endswith(suffix))

    def _listing(self, rel: str) -> list[str]:
        try:
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self._p(rel), detail=False)]
        except FileNotFoundError:
            return []

    def write_part(self, name: str, table: pa.Table) -> str:
        """Write a partition attempt's rows as ``parts/<name>.parquet``; return the file's name."""
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        file = f"{name}.parquet"
        self.write_bytes(f"{PARTS}/{file}", sink.getvalue().to_pybytes())
        return file

    def read_part_file(self, file: str) -> pa.Table:
        with self.fs.open(self._p(PARTS, file), "rb") as fh:
            return pq.read_table(fh)

    def part_file(self, index: int) -> str | None:
        """The file holding partition ``index``'s rows: its marker's part, else its failure record's."""
        marker = self.marker(index)
        if marker is not None:
            return marker.part or None
        failed = self.read_json(f"{PARTS}/{partition_name(index)}.failed.json")
        return None if failed is None else failed.get("part")

    def read_part(self, index: int) -> pa.Table:
        """Partition ``index``'s rows, as its marker (or failure record) names them."""
        file = self.part_file(index)
        if file is None:
            raise StoreError(f"partition {index} of {self.root} has no rows yet")
        return self.read_part_file(file)

    def _part_schema(self, file: str) -> pa.Schema:
        with self.fs.open(self._p(PARTS, file), "rb") as fh:
            return pq.read_schema(fh)

    def commit(self, marker: dict[str, Any]) -> Marker:
        """Publish a partition attempt's marker, the last write of a partition; return the marker that holds.

        The first attempt of a piece of work (fingerprint, rows, generation) to commit wins: a later one
        finds its marker and returns it without replacing it (its own files are then garbage). A marker of
        other work (other rows, an older ``--retry-errors`` generation) is replaced. An attempt whose lease
        was collected meanwhile (it was taken for dead) never commits.
        """
        rel = f"{PARTS}/{partition_name(marker['index'])}.json"
        data = json.dumps(marker, indent=1, default=str).encode()
        for _ in range(3):
            held = self.marker(marker["index"])
            if held is not None and self._holds(held, marker):
                return held
            if not self.exists(PARTS, f"{attempt_name(marker['index'], marker['token'])}.lease"):
                raise AttemptCollected(f"partition {marker['index']}: this attempt's files were collected as "
                                       "garbage while it ran (its lease went stale); it is retried")
            if held is None:
                if not self.create_exclusive(rel, data):
                    continue  # another attempt committed just now: look again
            else:
                self.write_bytes(rel, data)
            self.remove(f"{PARTS}/{partition_name(marker['index'])}.failed.json")
            return Marker.from_json(marker)
        raise StoreError(f"partition {marker['index']}: its marker keeps changing under this attempt")

    @staticmethod
    def _holds(held: Marker, marker: dict[str, Any]) -> bool:
        """Whether a committed marker already stands for the work ``marker`` describes (or newer)."""
        return held.same_work(marker["fingerprint"], marker["rows_hash"]) and held.generation >= marker["generation"]

    def mark_failed(self, index: int, doc: dict[str, Any]) -> None:
        self.write_json(f"{PARTS}/{partition_name(index)}.failed.json", {"index": index, **doc})

    # -- leases and garbage ------------------------------------------------------------------------
    def take_lease(self, index: int, token: str, info: dict[str, Any]) -> str:
        """Announce a running attempt (``parts/<attempt>.lease``); return its path inside the root."""
        rel = f"{PARTS}/{attempt_name(index, token)}.lease"
        self.write_bytes(rel, json.dumps({"index": index, "token": token, **info}).encode(), sync=False)
        return rel

    def touch(self, rel: str) -> None:
        """Refresh a lease's modification time."""
        if self.local:
            os.utime(self._p(rel))
        else:
            self.fs.pipe_file(self._p(rel), self.fs.cat_file(self._p(rel)))

    def discard_attempt(self, index: int, token: str, outputs: Sequence[str]) -> None:
        """Remove an attempt's files: its lease first (so nothing takes it for running), then the rest."""
        name = attempt_name(index, token)
        self.remove(f"{PARTS}/{name}.lease")
        for output in outputs:
            self.remove(f"{ZARR}/{output}/{name}")
            self.remove(f"{ARTIFACTS}/{output}/{name}")
        self.remove(f"{PARTS}/{name}.parquet")

    def put_artifact(self, local: str, rel: str) -> str:
        """Move a folder or file an op made into the root at ``rel`` (a file keeps its name inside ``rel``);
        return its path inside the root."""
        is_file = os.path.isfile(local)
        target_rel = f"{rel}/{os.path.basename(local)}" if is_file else rel
        with self.writing(f"storing {target_rel}"):
            self.remove(rel)
            if self.local:
                os.makedirs(os.path.dirname(self._p(target_rel)), exist_ok=True)
                shutil.move(local, self._p(target_rel))
            else:
                self.fs.put(local, self._p(target_rel), recursive=not is_file)
                remove_local(local)
        return target_rel

    def collect_garbage(self, lease_timeout: float = LEASE_TIMEOUT) -> dict[str, Any]:
        """Remove the files of attempts that no marker references and whose lease is gone or stale.

        An attempt still running keeps its lease fresh, so its files are left alone; a finished attempt
        that lost the race to commit, a failed one, and one killed mid-write are removed. Returns what was
        removed: attempts, files and bytes.
        """
        keep: set[tuple[int, str]] = set()
        keep_parts: set[str] = set()
        for marker in self.markers().values():
            keep |= {(marker.index, t) for t in marker.tokens or [marker.token]}
            keep_parts.add(marker.part)
        for doc in self.failures().values():
            keep_parts.add(doc.get("part") or "")
        found: dict[tuple[int, str], list[str]] = {}
        for name in self._listing(PARTS):
            parsed = parse_attempt(name)
            if parsed and not name.endswith(".lease") and name not in keep_parts:
                found.setdefault(parsed, []).append(f"{PARTS}/{name}")
        for top in (ZARR, ARTIFACTS):
            for output in self._listing(top):
                if output.startswith(".") or output == "zarr.json":
                    continue
                for name in self._listing(f"{top}/{output}"):
                    parsed = parse_attempt(name)
                    if parsed and parsed not in keep:
                        found.setdefault(parsed, []).append(f"{top}/{output}/{name}")
        leases = {parse_attempt(n): n for n in self._listing(PARTS) if n.endswith(".lease")}
        removed, size = [], 0
        for attempt, paths in sorted(found.items()):
            lease = leases.pop(attempt, None)
            if lease is not None and self._lease_age(f"{PARTS}/{lease}") < lease_timeout:
                continue  # a running attempt: its files are not garbage (yet)
            if lease is not None:
                self.remove(f"{PARTS}/{lease}")
            for rel in paths:
                size += self._size(rel)
                self.remove(rel)
            removed.append(attempt_name(*attempt))
        for attempt, lease in leases.items():  # leases of attempts that left no files
            if attempt not in keep and self._lease_age(f"{PARTS}/{lease}") >= lease_timeout:
                self.remove(f"{PARTS}/{lease}")
        return {"attempts": removed, "bytes": size}

    def _lease_age(self, rel: str) -> float:
        try:
            info = self.fs.info(self._p(rel))
        except FileNotFoundError:
            return float("inf")
        mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
        if isinstance(mtime, _dt.datetime):
            mtime = mtime.timestamp()
        return time.time() - float(mtime) if mtime is not None else float("inf")

    def _size(self, rel: str) -> int:
        try:
            return int(self.fs.du(self._p(rel), total=True))
        except (OSError, FileNotFoundError):
            return 0

    def status(self) -> dict[str, Any]:
        """Done / failed / pending rows and partitions, from the files alone (works mid-run or after a kill).

        A marker counts when it is this run's: same fingerprint and, where the run recorded them, the same
        rows (a marker left from an earlier manifest's rows is pending work, not done).
        """
        run = self.read_json(RUN_JSON)
        if run is None:
            raise StoreError(f"{self.root} is not a daskmv output root (no {RUN_JSON})")
        if run.get("staged"):
            return self._staged_status(run)
        if run.get("kind") == "reshape only":  # a stage with no ops: its rows are the reshape's
            counts = run.get("counts", {})
            return {"root": self.root, "state": run.get("state", "unknown"), "pipeline": "(reshape)",
                    "fingerprint": run.get("fingerprint"), "rows": counts.get("rows", 0),
                    "done": counts.get("rows", 0), "ok": counts.get("ok", 0), "error": counts.get("error", 0),
                    "failed": 0, "pending": 0, "partitions": 0, "partitions_done": 0, "partitions_failed": [],
                    "lock": None}
        fingerprint = run["binding"]["fingerprint"]
        n_parts = int(run.get("partitions") or 0)
        done = {i: m for i, m in self.markers().items() if counts_for(run, m)}
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

    def _staged_status(self, run: dict[str, Any]) -> dict[str, Any]:
        """A pipeline with reshape steps: each stage's status, and the root's state and last stage's rows."""
        stages = []
        for record in run.get("stages", []):
            stage = Store(self.url(record["folder"]), self.storage_options)
            info = stage.status() if stage.exists(RUN_JSON) else {"state": "pending", "rows": 0, "done": 0,
                                                                 "ok": 0, "error": 0, "pending": 0}
            stages.append({"index": record["index"], "name": record["name"], "folder": record["folder"], **info})
        lock = self.read_json(LOCK)
        if lock is not None and not _lock_is_stale(lock):
            state = "running"
        else:
            state = "interrupted" if run.get("state") == "running" else run.get("state", "unknown")
        last = stages[-1] if stages else {}
        return {"root": self.root, "state": state, "pipeline": run["pipeline"]["name"],
                "fingerprint": run["pipeline"]["fingerprint"], "stages": stages,
                **{k: last.get(k, 0) for k in ("rows", "done", "ok", "error", "failed", "pending", "partitions",
                                               "partitions_done")},
                "partitions_failed": last.get("partitions_failed", []), "lock": lock}

    # -- arrays ------------------------------------------------------------------------------------
    def prepare_arrays(self, outputs: Sequence[str]) -> None:
        """Create the Zarr groups once, in the driver, so tasks never race on shared metadata."""
        with self.writing("creating outputs.zarr"):
            root = zarr.open_group(self.url(ZARR), mode="a", storage_options=self._zarr_options())
            for name in outputs:
                if name not in root:
                    root.create_group(name)

    def write_array(self, output: str, attempt: str, array: PartitionArray,
                    compression: str | None = None) -> list[str | None]:
        """Write one attempt's values of one output; return each row's reference (None: no value).

        Same-shaped values become one ``[rows, ...]`` array whose rows are inner chunks of a single
        shard (one file, one row readable alone). Values of different shapes are stored ragged: a
        flat ``data`` array with ``offsets`` and ``shapes``.
        """
        if not array:
            array.discard()
            if array.stream is not None or array.ragged is not None:
                self.remove(f"{ZARR}/{output}/{attempt}")
            return [None] * array.n
        url = self.url(ZARR, output, attempt)
        write_partition_array(url, array, self._zarr_options(), compression, fs=self.fs if self.local else None)
        return [array_ref(output, attempt, i) if p else None for i, p in enumerate(array.present)]

    def array_sink(self, output: str, attempt: str, compression: str | None) -> Sink | None:
        """Where a partition array can stream as rows finish: local roots, raw or zstd-compressed outputs."""
        if not self.local or compression not in (None, "zstd"):
            return None
        return Sink(self.fs, self.url(ZARR, output, attempt), compression=compression)

    def _zarr_options(self) -> dict[str, Any] | None:
        return None if self.local else (self.storage_options or None)

    # -- the final manifest ------------------------------------------------------------------------
    def assemble(self, files: Sequence[str], csv: bool,
                 infos: Sequence[dict[str, Any] | None] | None = None) -> dict[str, int]:
        """Concatenate the part ``files`` (in order) into the final manifest and errors.log.

        ``infos`` (one per file, as :meth:`ManifestWriter.add` takes them) give the time and worker that
        errors.log names for each part's failed rows. Streams one part at a time, so memory stays at one
        partition whatever the manifest's size. The engine normally appends parts while the run goes
        (:class:`ManifestWriter`); this two-pass version, which first unifies every part's schema, is its
        fallback.
        """
        from daskmv.assemble import ManifestWriter

        schemas = [self._part_schema(f) for f in files]
        schema = pa.unify_schemas(schemas, promote_options="permissive") if schemas else None
        writer = ManifestWriter(self, csv, schema)
        for k, file in enumerate(files):
            writer.add(self.read_part_file(file), infos[k] if infos else None)
        return writer.commit()


def counts_for(run: dict[str, Any], marker: Marker) -> bool:
    """Whether ``marker`` is part of the run ``run.json`` describes: same pipeline and, where the run
    recorded them, the same rows (a marker left by an earlier manifest's rows is pending work)."""
    hashes = run.get("rows_hashes") or []
    index = marker.index
    if marker.fingerprint != run["binding"]["fingerprint"] or index >= int(run.get("partitions") or 0):
        return False
    return index >= len(hashes) or hashes[index] == marker.rows_hash


class AttemptCollected(RuntimeError):
    """An attempt found its lease gone at commit time: its files were collected; it must not commit."""


def _write_synced(path: str, data: bytes, sync: bool) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        if sync:
            fh.flush()
            os.fsync(fh.fileno())


def fsync_path(path: str) -> None:
    """fsync one file's data to disk (local files)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """fsync a folder, so the names created or renamed in it survive a crash."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems refuse fsync on folders; the data itself was synced
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _lock_is_stale(held: dict[str, Any]) -> bool:
    """A lock is stale when its process is gone; only checkable for locks taken on this host."""
    if held.get("host") != socket.gethostname():
        return False
    try:
        import psutil

        return not psutil.pid_exists(int(held.get("pid", -1)))
    except (ValueError, TypeError):
        return True
