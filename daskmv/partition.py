"""One partition, on a worker: load rows ahead of the ops, run micro-batches, write results, mark done.

This is the one function every cluster runs (:func:`run_partition`). Inside it:

- a thread pool reads and decodes each row's file ahead of the ops (OpenCV releases the GIL), and
  every op of the pipeline shares that one decode;
- ops run on micro-batches; an out-of-memory error halves the batch for that op (remembered by the
  worker process) and retries; any other exception is pinned to the row that raised it;
- array outputs stream into their Zarr shard as rows finish; then the partition's rows (Parquet) are
  written, everything is fsynced, then its completion marker: a marker always means the data is there;
- every attempt writes under its own token and holds a lease while it runs (see :mod:`daskmv.store`), so
  two attempts of one partition never overwrite each other's files;
- what is wrong with a row (a missing or corrupt file, an op that rejects it) becomes that row's error;
  what is wrong with the machine (an I/O error of a network filesystem, a device error, an op whose set-up
  fails) fails the partition, which the driver retries elsewhere.

Ops are built and set up once per worker process and kept by :class:`OpCache`, a named, idempotent
``WorkerPlugin``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from distributed.diagnostics.plugin import WorkerPlugin

from daskmv import arrow
from daskmv.arrays import PartitionArray, Sink
from daskmv.errors import RowError, SetupFailed
from daskmv.paths import resolve_path
from daskmv.ops.base import Op, Output, Row, is_infrastructure_error, is_out_of_memory, split_input
from daskmv.ops.image import load_inputs
from daskmv.store import (ARTIFACTS, LEASE_REFRESH, PARTS, ZARR, Marker, Store, attempt_name, new_token, now,
                          partition_name, ref_tokens, remove_local)

PLUGIN_NAME = "daskmv-ops"
#: A worker whose op set-up failed this many times for one pipeline stops trying (and the driver stops
#: sending it that pipeline's partitions): a missing model or a broken GPU does not fix itself.
SETUP_ATTEMPTS = 2
#: A micro-batch ends at ``batch_size`` rows or once its loaded inputs (decoded images, file bytes) reach
#: this many bytes, and the loaders read one such batch ahead. On CPU, ops gain nothing from large batches,
#: while every decoded image in flight is worker memory kept for good (the malloc settings of
#: :data:`daskmv.cluster.WORKER_MALLOC_ENV`): with batches of 5 rows of 640x480 photos a worker of the peer
#: benchmark ends a run at 67 MB (PSS); with 32 rows and two batches ahead it held 213 MB, for the same CPU time.
BATCH_BYTES = 4 << 20
#: The same budget on workers whose ops run on a GPU, which wants full batches (32 rows of 2.7-megapixel
#: photos): 32 rows of 12-megapixel photos, and every output the ops make of them, would still not fit.
GPU_BATCH_BYTES = 256 << 20


def compact(table: pa.Table) -> pa.Table:
    """``table`` in buffers of its own. A slice of a larger table (a partition of a row group: pandas'
    Arrow-backed columns are slices) pickles its parent's whole buffers: each task of a 435,000-row stage
    input shipped 48 MB for 10,000 rows. Copying the rows out costs less than one such transfer."""
    if table.get_total_buffer_size() <= 2 * table.nbytes + (1 << 16):
        return table
    return table.take(np.arange(table.num_rows))


@dataclass
class PartitionTask:
    """Everything a worker needs for one partition; small enough to travel with the task.

    ``rows`` travel as an Arrow table (a pandas DataFrame given here is converted once, in the driver):
    a worker then never imports pandas, which cost each worker process 26 MB and 0.2-0.35 s before its
    first partition could start.
    """

    index: int
    rows: pa.Table
    rows_hash: str
    fingerprint: str
    steps: list[dict[str, Any]]
    root: str
    base: str
    path_column: str = "path"
    batch_size: int = 32
    decode_threads: int = 2
    decode_scale: int = 1
    storage_options: dict[str, Any] = field(default_factory=dict)
    generation: int = 0
    retry_ids: list[str] | None = None
    attempt: int = 1
    export: str | None = None
    inputs_hash: str | None = None
    setup_failures: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.rows, pa.Table):
            self.rows = pa.Table.from_pandas(self.rows, preserve_index=False)
        self.rows = compact(self.rows)

    def attempted_rows(self) -> pa.Table:
        """The rows this attempt runs: all of them, or only those of ``retry_ids``."""
        if self.retry_ids is None:
            return self.rows
        ids = self.rows.column("id")
        return self.rows.filter(pc.is_in(ids, value_set=arrow.array(self.retry_ids, ids.type)))


@dataclass
class PreparedPipeline:
    """A pipeline's ops, set up on this process's device, and what the process learned running them."""

    ops: list[Op]
    devices: list[str]
    loader_inputs: frozenset[str]
    specs: list[Output] = field(default_factory=list)  # the pipeline's outputs, as the manifest holds them
    source: int | None = None  # the frame source's position: the ops after it run per frame
    batch_limits: dict[int, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    batch_fails: dict[int, int] = field(default_factory=dict)  # the smallest batch of each op that ran out of memory

    def __post_init__(self) -> None:
        if not self.specs:
            self.specs = [spec for op in self.ops for spec in op.output_specs()]

    # -- batches that fit themselves to memory -----------------------------------------------------------
    # After an out-of-memory error an op's batches are capped at the largest size known to fit; while a
    # size between that and the smallest known not to fit remains, the next batch tries the middle one, so
    # the cap converges on the largest batch that fits (a binary search, one failed batch per halving).
    def next_batch(self, k: int, batch_size: int) -> int:
        """How many rows op ``k`` gets in its next micro-batch."""
        with self.lock:
            good = self.batch_limits.get(k)
            if good is None:
                return max(1, batch_size)
            bad = min(self.batch_fails.get(k, batch_size + 1), batch_size + 1)
            return max(1, (good + bad) // 2 if bad - good > 1 else min(good, batch_size))

    def did_not_fit(self, k: int, size: int) -> None:
        with self.lock:
            self.batch_fails[k] = min(size, self.batch_fails.get(k, size))
            if self.batch_limits.get(k, size) >= size:
                self.batch_limits[k] = max(1, size // 2)

    def fitted(self, k: int, size: int) -> None:
        with self.lock:
            if k in self.batch_limits and size > self.batch_limits[k] and size < self.batch_fails.get(k, size + 1):
                self.batch_limits[k] = size

    @property
    def artifact_ops(self) -> set[int]:
        """Positions of the ops with artifact outputs (their rows' folders move into the root)."""
        return {k for k, op in enumerate(self.ops) if any(s.kind == "artifact" for s in op.output_specs())}


class OpCache(WorkerPlugin):
    """Per-worker-process cache of set-up pipelines, keyed by fingerprint (models load once)."""

    name = PLUGIN_NAME
    idempotent = True

    def setup(self, worker: Any = None) -> None:
        self.entries: dict[str, PreparedPipeline] = {}
        self.setup_failures: dict[str, list[str]] = {}
        self.lock = threading.Lock()
        if worker is not None:
            _quiet_task_failures()

    def teardown(self, worker: Any = None) -> None:
        self.entries.clear()
        _empty_device_cache()

    def get(self, fingerprint: str, steps: list[dict[str, Any]]) -> PreparedPipeline:
        """The pipeline set up in this process; a failed set-up raises :class:`SetupFailed` (after
        :data:`SETUP_ATTEMPTS` failures at once, without trying again)."""
        with self.lock:
            if fingerprint in self.entries:
                return self.entries[fingerprint]
            failures = self.setup_failures.setdefault(fingerprint, [])
            if len(failures) >= SETUP_ATTEMPTS:
                raise SetupFailed(_worker_address() or f"pid {os.getpid()}", len(failures), failures[-1])
            try:
                self.entries[fingerprint] = _prepare(steps)
            except Exception as exc:
                failures.append(f"{type(exc).__name__}: {exc}"[:1000])
                raise SetupFailed(_worker_address() or f"pid {os.getpid()}", len(failures), failures[-1]) from exc
            return self.entries[fingerprint]


def _quiet_task_failures() -> None:
    """Drop the worker's "Compute Failed" log records: the driver reports every failed partition (and keeps
    its traceback in run.json ``failed_attempts``), so these only repeat it as a traceback on stderr."""
    import logging

    log = logging.getLogger("distributed.worker")
    if not any(getattr(f, "daskmv", False) for f in log.filters):
        class _Filter(logging.Filter):
            daskmv = True

            def filter(self, record: logging.LogRecord) -> bool:
                return not str(record.msg).startswith("Compute Failed")

        log.addFilter(_Filter())


_PROCESS_CACHE = OpCache()
_PROCESS_CACHE.setup()
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _op_cache() -> OpCache:
    try:
        from distributed import get_worker

        plugin = get_worker().plugins.get(PLUGIN_NAME)
        if isinstance(plugin, OpCache):
            return plugin
    except ValueError:  # not inside a Dask worker
        pass
    return _PROCESS_CACHE


def _pool(threads: int) -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers != threads:
            _POOL = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="daskmv-load")
        return _POOL


def _prepare(steps: list[dict[str, Any]]) -> PreparedPipeline:
    from daskmv.pipeline import Pipeline

    _threads_from_env()
    pipeline = Pipeline.from_steps(steps)
    devices = []
    for op in pipeline.ops:
        device = _best_device(op.placement) if op.gpu or op.placement is not None else "cpu"
        op.setup(device)
        devices.append(device)
    return PreparedPipeline(pipeline.ops, devices, pipeline.loader_inputs, pipeline.outputs, pipeline.frame_source)


def _threads_from_env() -> None:
    """Torch's intra-op threads and the BLAS pools (numpy's OpenBLAS) as the worker's ``OMP_NUM_THREADS``
    says. A worker forked from the fork server inherits the pools its imports sized there (one thread per
    core); Dask sets the variable in the worker only after the fork, so each of N workers would run a pool
    per core: numpy's products then oversubscribe the machine (measured: a 0.26 s VLAD set-up took 0.9 s
    in each of 2 workers on 2 cores)."""
    import sys

    wanted = os.environ.get("OMP_NUM_THREADS", "")
    if not (wanted.isdigit() and int(wanted) > 0):
        return
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != int(wanted):
        torch.set_num_threads(int(wanted))
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=int(wanted), user_api="blas")


def _best_device(placement: int | None = None) -> str:
    """This worker's own GPU (``cuda:<i>``, see :func:`daskmv.cluster.worker_gpu`), else ``cpu``; with an op's
    ``device: p``, the p-th GPU after it (modulo the GPUs the worker sees: on one GPU, the same one)."""
    from daskmv.cluster import worker_device

    return placed_device(worker_device(), placement)


def placed_device(own: str, placement: int | None) -> str:
    """``own`` moved ``placement`` devices on among the worker's CUDA devices (``cpu`` stays ``cpu``)."""
    if not placement or not own.startswith("cuda"):
        return own
    import torch

    n = max(1, torch.cuda.device_count())
    index = int(own.partition(":")[2] or 0)
    return f"cuda:{(index + placement) % n}"


def _empty_device_cache() -> None:
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- the task --------------------------------------------------------------------------------------
def run_partition(task: PartitionTask) -> dict[str, Any]:
    """Process one partition and write its outputs; return its completion marker (a small dict)."""
    started, t0 = now(), time.perf_counter()
    store = Store(task.root, task.storage_options)
    done = store.marker(task.index)
    if done is not None and done.same_work(task.fingerprint, task.rows_hash) and done.generation >= task.generation:
        # Finished already: the scheduler is re-running a task whose result was lost with a worker
        # before the driver read it, or an orphan of an earlier driver finished it. Never redo finished work.
        return {**(done.info or {}), "recovered": True}
    prepared = _op_cache().get(task.fingerprint, task.steps)
    token = new_token()
    attempt = attempt_name(task.index, token)
    lease = store.take_lease(task.index, token, {"host": socket.gethostname(), "pid": os.getpid(),
                                                 "worker": _worker_address(), "started": started})
    outputs = [s.name for s in prepared.specs if s.kind in ("array", "artifact")]
    with _LEASES.keeping(store, lease):
        try:
            marker = _run_attempt(prepared, task, store, attempt, token, started, t0)
            held = store.commit(marker)
        except BaseException:
            with contextlib.suppress(Exception):  # best effort: the garbage collector finishes the job
                store.discard_attempt(task.index, token, outputs)
            raise
    if held.token != token:  # another attempt of the same work committed first: ours is garbage
        with contextlib.suppress(Exception):
            store.discard_attempt(task.index, token, outputs)
        return {**(held.info or {}), "recovered": True}
    with contextlib.suppress(Exception):
        store.remove(lease)
    return marker


def _run_attempt(prepared: PreparedPipeline, task: PartitionTask, store: Store, attempt: str, token: str,
                 started: str, t0: float) -> dict[str, Any]:
    """Compute the partition, write its arrays and rows under ``attempt`` and sync them; return its marker."""
    rows = task.attempted_rows()
    _reset_device_peak()
    result = _process_rows(prepared, rows, task, store, attempt)
    table = result_table(prepared.specs, rows, result, store, task, attempt)
    failed = {row_id for row_id, error in zip(table.column("id").to_pylist(), result.errors) if error is not None}
    for rel, row_id in result.artifacts.items():  # a row that failed after its artifact was stored keeps none
        if row_id in failed:
            store.remove(rel)
    if task.retry_ids is not None:
        table = _merge_retry(store.read_part(task.index), table, task.rows.column("id").to_pylist())
    for spec in prepared.specs:
        if spec.kind in ("array", "artifact"):
            store.sync_tree(f"{ZARR if spec.kind == 'array' else ARTIFACTS}/{spec.name}/{attempt}")
    part = store.write_part(attempt, table)
    tokens = {token}
    for spec in prepared.specs:
        if spec.kind == "array":
            tokens |= ref_tokens(table.column(spec.column).to_pylist())
    status = table.column("status").to_pylist()
    return {
        "index": task.index,
        "name": partition_name(task.index),
        "fingerprint": task.fingerprint,
        "rows_hash": task.rows_hash,
        "inputs_hash": task.inputs_hash,
        "part": part,
        "token": token,
        "tokens": sorted(tokens),
        "rows": table.num_rows,
        "ok": status.count("ok"),
        "errors": status.count("error"),
        "generation": task.generation,
        "attempt": task.attempt,
        "started": started,
        "finished": now(),
        "seconds": round(time.perf_counter() - t0, 4),
        "processed_rows": len(rows),
        "load_seconds": round(result.load_seconds, 4),
        "op_seconds": {op.name: round(s, 4) for op, s in zip(prepared.ops, result.op_seconds)},
        "batch_limits": {prepared.ops[k].name: v for k, v in prepared.batch_limits.items()},
        "oom_backoffs": result.oom_backoffs,
        "peak_device_bytes": device_peak(),
        "worker": _worker_address(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "devices": sorted(set(prepared.devices)),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "export": task.export,
    }


class _LeaseKeeper:
    """Refreshes the leases of this process's running attempts from one background thread."""

    def __init__(self) -> None:
        self.held: dict[tuple[int, str], tuple[Store, str]] = {}
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    @contextlib.contextmanager
    def keeping(self, store: Store, rel: str) -> Iterator[None]:
        key = (id(store), rel)
        with self.lock:
            self.held[key] = (store, rel)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="daskmv-lease", daemon=True)
                self.thread.start()
        try:
            yield
        finally:
            with self.lock:
                self.held.pop(key, None)

    def _run(self) -> None:
        while True:
            time.sleep(LEASE_REFRESH)
            with self.lock:
                held = list(self.held.values())
            for store, rel in held:
                with contextlib.suppress(Exception):  # a lost lease only lets a later GC take the files
                    store.touch(rel)


_LEASES = _LeaseKeeper()


def _worker_address() -> str | None:
    try:
        from distributed import get_worker

        return get_worker().address
    except ValueError:
        return None


@dataclass
class RowResults:
    """What a partition's rows produced: scalar columns, arrays (gathered per output), errors, seconds."""

    columns: dict[str, list[Any]]
    arrays: dict[str, PartitionArray]
    errors: list[str | None]
    seconds: np.ndarray
    op_seconds: list[float]
    load_seconds: float = 0.0
    oom_backoffs: int = 0
    exports: list[tuple[int, Any]] = field(default_factory=list)
    export_paths: dict[str, list[str | None]] = field(default_factory=dict)
    artifacts: dict[str, Any] = field(default_factory=dict)  # stored artifact folder -> its row's id

    @classmethod
    def empty(cls, specs: Sequence[Output], n: int, n_ops: int = 0,
              sinks: dict[str, Sink | None] | None = None) -> RowResults:
        sinks = sinks or {}
        return cls(
            columns={s.name: [None] * n for s in specs if s.kind in ("column", "artifact")},
            arrays={s.name: PartitionArray(n, sinks.get(s.name)) for s in specs if s.kind == "array"},
            errors=[None] * n, seconds=np.zeros(n), op_seconds=[0.0] * n_ops,
        )

    def record(self, i: int, outputs: Row) -> None:
        for name, value in outputs.items():
            if name in self.arrays:
                self.arrays[name].set(i, value)
            else:
                self.columns[name][i] = value

    def flush(self, final_rows: int) -> None:
        """Rows below ``final_rows`` are done: let the arrays stream them out."""
        for array in self.arrays.values():
            array.flush(final_rows)

    def discard(self) -> None:
        """Close any array streams of a partition that failed (its files are rewritten on retry)."""
        for array in self.arrays.values():
            array.discard()

    def fail(self, i: int, message: str) -> None:
        """Row ``i`` is an error: no value of any output is kept for it."""
        self.errors[i] = message
        for array in self.arrays.values():
            array.drop(i)
        for values in self.columns.values():
            values[i] = None


def _process_rows(prepared: PreparedPipeline, rows: pa.Table, task: PartitionTask, store: Store,
                  attempt: str) -> RowResults:
    n = rows.num_rows
    records = rows.to_pylist()
    sinks = {s.name: store.array_sink(s.name, attempt, s.compression) for s in prepared.specs if s.kind == "array"}
    res = RowResults.empty(prepared.specs, n, len(prepared.ops), sinks)
    exporter = _exporter(prepared, task, store) if task.export else None
    try:
        _process_batches(prepared, records, task, res, exporter, store, attempt)
        _finish_exports(prepared, res, n)
    except BaseException:
        res.discard()
        raise
    return res


def _exporter(prepared: PreparedPipeline, task: PartitionTask, store: Store) -> Any:
    """A function that writes one finished row's files on a loader thread and returns the future."""
    from daskmv.export import export_row

    pool = _pool(max(1, task.decode_threads))

    def submit(row: Row) -> Any:
        return pool.submit(export_row, store, task.index, row, prepared.specs)

    return submit


def _finish_exports(prepared: PreparedPipeline, res: RowResults, n: int) -> None:
    """Wait for every row's files (a failure to write one fails the partition, like any write)."""
    from daskmv.export import exported

    if not res.exports:
        return
    res.export_paths = {spec.name: [None] * n for spec in exported(prepared.specs)}
    for i, future in res.exports:
        for name, path in future.result().items():
            res.export_paths[name][i] = path


def _process_batches(prepared: PreparedPipeline, records: list[Row], task: PartitionTask, res: RowResults,
                     exporter: Any = None, store: Store | None = None, attempt: str = "") -> None:
    extra = {"manifest_base": task.base} if "manifest_base" in prepared.loader_inputs else {}
    work_folder = _work_folder(task) if "workdir" in prepared.loader_inputs else None
    budget = GPU_BATCH_BYTES if any(device != "cpu" for device in prepared.devices) else BATCH_BYTES
    for batch in _loaded_batches(records, prepared.loader_inputs, task, budget):
        live: list[tuple[int, Row]] = []
        for i, loaded, seconds in batch:
            res.seconds[i] += seconds
            res.load_seconds += seconds
            if isinstance(loaded, BaseException):
                res.fail(i, _format_error("read", loaded))
            else:
                live.append((i, {**records[i], **loaded, **extra}))
                if "workdir" in prepared.loader_inputs:
                    live[-1][1]["workdir"] = _workdir(work_folder, records[i]["id"])
        for k, op in enumerate(prepared.ops):
            if not live:
                break
            if prepared.source is not None and k > prepared.source:
                break  # these ran on the frames, inside the frame source's step
            t = time.perf_counter()
            if k == prepared.source:
                outs = [_run_frames(prepared, k, row, task, res) for _, row in live]
                names = {o.name for later in prepared.ops[k:] for o in later.output_specs()}
                specs = [spec for spec in prepared.specs if spec.name in names]
            else:
                outs = _apply(prepared, k, [row for _, row in live], task.batch_size, res)
                specs = list(op.output_specs())
            elapsed = time.perf_counter() - t
            res.op_seconds[k] += elapsed
            artifacts = store is not None and k in prepared.artifact_ops
            still: list[tuple[int, Row]] = []
            for (i, row), out in zip(live, outs, strict=True):
                res.seconds[i] += elapsed / len(live)
                checked = out if isinstance(out, BaseException) else _check_outputs(op, out, specs)
                if artifacts and not isinstance(checked, BaseException):
                    checked = _store_artifacts(op, checked, row, store, attempt, res.artifacts)
                if artifacts and isinstance(checked, BaseException) and isinstance(out, dict):
                    _discard_artifacts(op, out)
                if isinstance(checked, BaseException):
                    res.fail(i, _format_error(op.name, checked))
                    continue
                row.update(_handoff(out, checked))
                if artifacts:  # later ops of the stage find the folder by its column's name, as an absolute path
                    row.update({spec.column: _in_root(store, checked[spec.name]) for spec in op.output_specs()
                                if spec.kind == "artifact" and checked.get(spec.name)})
                res.record(i, checked)
                still.append((i, row))
            live = still
        if exporter is not None:
            res.exports += [(i, exporter(row)) for i, row in live]
        res.flush(batch[-1][0] + 1)


def _loaded_batches(
    records: list[Row], wanted: frozenset[str], task: PartitionTask, budget: int | None = None
) -> Iterator[list[tuple[int, Row | BaseException, float]]]:
    """Micro-batches of (row index, loader inputs or the error, seconds), loaded ahead on threads; a batch
    ends at ``task.batch_size`` rows or ``budget`` bytes of loaded inputs (default :data:`BATCH_BYTES`)."""
    budget = BATCH_BYTES if budget is None else budget
    size = max(1, task.batch_size)
    if not wanted - _TASK_INPUTS:
        for start in range(0, len(records), size):
            yield [(i, _upstream_error(records[i]) or {}, 0.0) for i in range(start, min(start + size, len(records)))]
        return
    if task.decode_threads <= 0:  # load on this thread: no overlap, no thread switching
        loaded = ((i, *_load_row(records[i], wanted, task)) for i in range(len(records)))
    else:
        loaded = _load_ahead(records, wanted, task, budget)
    batch, held = [], 0
    for item in loaded:
        batch.append(item)
        held += _loaded_bytes(item[1])
        if len(batch) >= size or held >= budget:
            yield batch
            batch, held = [], 0
    if batch:
        yield batch


def _load_ahead(records: list[Row], wanted: frozenset[str], task: PartitionTask,
                budget: int) -> Iterator[tuple[int, Any, float]]:
    """Rows loaded in order on the loader threads, ahead of the ops, within a byte budget from the first row.

    Rows in flight (submitted or loaded, not yet taken by a batch) are bounded by ``budget`` (one micro-batch)
    at the mean size of the rows loaded so far, and to one per loader thread until the first row is in, when
    no size is known. With the batch the ops work on (at most ``budget`` plus a row), loaded rows hold at
    most about two budgets, whatever the images' size and however slow the ops.
    """
    pool = _pool(task.decode_threads)
    ahead = max(1, task.batch_size, 2 * task.decode_threads)
    pending: deque[tuple[int, Any]] = deque()
    todo = iter(range(len(records)))
    seen = [0, 0]  # rows loaded, their bytes

    def fill() -> None:
        if seen[0]:
            limit = min(ahead, max(1, budget * seen[0] // max(1, seen[1])))
        else:
            limit = max(1, task.decode_threads)
        while len(pending) < limit:
            i = next(todo, None)
            if i is None:
                return
            pending.append((i, pool.submit(_load_row, records[i], wanted, task)))

    fill()
    while pending:
        i, future = pending.popleft()
        loaded, seconds = future.result()
        seen[0] += 1
        seen[1] += _loaded_bytes(loaded)
        fill()
        yield i, loaded, seconds


def _loaded_bytes(loaded: Row | BaseException) -> int:
    if isinstance(loaded, BaseException):
        return 0
    return sum(_nbytes(v) for v in loaded.values())


def _nbytes(value: Any) -> int:
    if isinstance(value, list):  # a group row's list input (the same array named twice counts twice: an upper bound)
        return sum(_nbytes(v) for v in value)
    return getattr(value, "nbytes", None) or (len(value) if isinstance(value, bytes) else 0)


def _row_url(record: Row, task: PartitionTask, column: str | None = None) -> str:
    path = record.get(column or task.path_column)
    return "" if path is None or path != path else resolve_path(str(path), task.base)  # None or NaN: no path


#: The column a reshape adds for rows whose parent failed in an earlier stage: they fail here too, visibly.
UPSTREAM_ERROR = "upstream_error"


class UpstreamError(RowError):
    """The row's parent failed in an earlier stage (its error column says how)."""


def _upstream_error(record: Row) -> UpstreamError | None:
    message = record.get(UPSTREAM_ERROR)
    if message is None or not isinstance(message, str):
        return None
    return UpstreamError(message)


def _load_row(record: Row, wanted: frozenset[str], task: PartitionTask) -> tuple[Row | BaseException, float]:
    """A row's loader inputs, or the row's error; an I/O fault of the machine (not of the file) raises.

    Plain inputs come from the row's ``path``; ``<kind>:<column>`` ones from the file (or, for ``array``, the
    stored array) that another column names.
    """
    t = time.perf_counter()
    try:
        upstream = _upstream_error(record)
        if upstream is not None:
            raise upstream
        loaded: Row | BaseException = {}
        arrays: dict[str, Any] = {}  # references read for this row: shared by its list columns
        for column, kinds in _by_column(wanted).items():
            loaded.update(_load_column(record, column, kinds, task, arrays))
    except Exception as exc:
        if is_infrastructure_error(exc):
            raise  # a network filesystem timing out, an unmounted volume: retry the partition, not the row
        loaded = exc  # a missing, unreadable or corrupt file belongs to this row
    return loaded, time.perf_counter() - t


def _in_root(store: Store, rel: str) -> str:
    """Where ``rel`` of the root is, for an op to open: an absolute local path, or the root's URL."""
    return os.path.abspath(os.path.join(store.path, rel)) if store.local else store.url(rel)


def _work_folder(task: PartitionTask) -> str | None:
    """The folder of the pipeline's per-row work folders in the output root (None where the root is remote)."""
    store = Store(task.root, task.storage_options)
    return os.path.join(store.path, "work", task.fingerprint[:12]) if store.local else None


def _workdir(folder: str | None, row_id: Any) -> str | None:
    """The row's folder in the output root that outlives attempts and runs (None where the root is remote)."""
    from daskmv.export import file_stem

    return None if folder is None else os.path.join(folder, file_stem(str(row_id)))


#: Loader inputs that no file or column gives: the engine makes them from the task.
_TASK_INPUTS = frozenset({"manifest_base", "workdir"})


def _by_column(wanted: frozenset[str]) -> dict[str | None, frozenset[str]]:
    """Loader inputs grouped by the column they read (None: the row's ``path``)."""
    groups: dict[str | None, set[str]] = {}
    for name in wanted:
        kind, column = split_input(name)
        if name not in _TASK_INPUTS:
            groups.setdefault(column, set()).add(kind)
    return {column: frozenset(kinds) for column, kinds in groups.items()}


def _load_column(record: Row, column: str | None, kinds: frozenset[str], task: PartitionTask,
                 arrays: dict[str, Any] | None = None) -> Row:
    if column is None:
        url = _row_url(record, task)
        if not url:
            raise RowError("no file path in this row")
        return load_inputs(url, kinds, task.decode_scale)
    value = record.get(column)
    if isinstance(value, (list, tuple, np.ndarray)):  # a group row: one value per member, None where missing
        return _load_list(list(value), column, kinds, task, {} if arrays is None else arrays)
    if value is None or not isinstance(value, str) or not value:
        raise RowError(f"no value in column {column!r}")
    return _load_value(value, column, kinds, task)


def _load_value(value: str, column: str, kinds: frozenset[str], task: PartitionTask,
                arrays: dict[str, Any] | None = None) -> Row:
    out: Row = {}
    if "array" in kinds:
        if arrays is not None and value in arrays:
            out[f"array:{column}"] = arrays[value]
        else:
            out[f"array:{column}"] = _read_reference(value, task)
            if arrays is not None:
                arrays[value] = out[f"array:{column}"]
    files = kinds - {"array"}
    if files:
        got = load_inputs(resolve_path(value, task.base), files, task.decode_scale)
        out.update({f"{kind}:{column}": got[kind] for kind in files})
    return out


def _load_list(values: list[Any], column: str, kinds: frozenset[str], task: PartitionTask,
               arrays: dict[str, Any]) -> Row:
    """A list column's inputs as lists, in order: None for an empty member, the same object for a reference
    that occurs twice (a group of pairs names each image's features once per pair)."""
    seen: dict[str, Row] = {}
    out: dict[str, list[Any]] = {f"{kind}:{column}": [] for kind in kinds}
    for value in values:
        if value is None or not isinstance(value, str) or not value:
            for key in out:
                out[key].append(None)
            continue
        if value not in seen:
            seen[value] = _load_value(value, column, kinds, task, arrays)
        got = seen[value]
        for key in out:
            out[key].append(got[key])
    return out


def _read_reference(ref: str, task: PartitionTask) -> Any:
    """The array behind a reference of an earlier run (relative to this run's manifest), read-only: rows
    that name the same reference share one array (see :func:`daskmv.arrays.read_reference_row`)."""
    from daskmv.arrays import read_reference_row
    from daskmv.store import parse_ref

    try:
        path, row = parse_ref(ref)
    except ValueError as exc:
        raise RowError(str(exc)) from None
    url = resolve_path(path, task.base)
    try:
        return read_reference_row(url, row, task.storage_options or None)
    except FileNotFoundError:
        raise RowError(f"the array {ref!r} is not there") from None


def _apply(prepared: PreparedPipeline, k: int, rows: list[Row], batch_size: int, res: RowResults) -> list[Row | BaseException]:
    """Run op ``k`` over ``rows`` in micro-batches no larger than its (possibly reduced) limit."""
    out: list[Row | BaseException] = []
    start = 0
    while start < len(rows):
        size = prepared.next_batch(k, batch_size)
        outs = _apply_batch(prepared, k, rows[start : start + size], res)
        if outs is None:  # out of memory: the op's limit went down (see next_batch); the same rows again
            continue
        out += outs
        start += size
    return out


def _apply_batch(prepared: PreparedPipeline, k: int, rows: list[Row], res: RowResults) -> list[Row | BaseException] | None:
    """Op ``k`` on one micro-batch: its outputs, or None when the batch ran out of memory (run it again smaller)."""
    op = prepared.ops[k]
    try:
        outs = list(op.process(rows))
    except Exception as exc:
        if is_infrastructure_error(exc):
            raise  # a device or I/O fault: the partition fails and is retried (elsewhere)
        if is_out_of_memory(exc):
            _empty_device_cache()
            if len(rows) == 1:
                return [RowError(f"out of memory even with a batch of one row ({type(exc).__name__}: {exc})")]
            prepared.did_not_fit(k, len(rows))
            res.oom_backoffs += 1
            return None
        if len(rows) == 1:
            return [exc]
        return [out for row in rows for out in _apply_batch(prepared, k, [row], res) or ()]
    if len(outs) != len(rows):  # never shift results onto other rows' ids
        raise RuntimeError(f"op {op.name!r} returned {len(outs)} results for {len(rows)} rows: an op must "
                           "return exactly one output dict (or exception) per row, in order")
    prepared.fitted(k, len(rows))
    return outs


class FrameError(RowError):
    """An op failed on one frame of a video row: the row fails, naming the op and the frame."""

    def __init__(self, op: str, index: Any, cause: BaseException) -> None:
        super().__init__(f"frame {index}: {_format_error(op, cause).partition(': ')[2]}")
        self.op = op


def _run_frames(prepared: PreparedPipeline, k: int, row: Row, task: PartitionTask,
                res: RowResults) -> Row | BaseException:
    """Frame source ``k`` on one row: its frames, chunk by chunk, through every op after it (in micro-batches,
    with the rows' out-of-memory back-off), the per-frame outputs stacked along a leading time axis.

    Only one chunk of decoded frames is in flight beside the one the ops work on, so a long video never sits
    in memory whole; a frame an op rejects fails the whole row (a per-video output with a hole is not one)."""
    try:
        outputs, chunks = prepared.ops[k].open_frames(row)
    except Exception as exc:
        if is_infrastructure_error(exc):
            raise
        return exc
    later = range(k + 1, len(prepared.ops))
    if not later:  # the source alone (a probe before an explode into frames): nothing to decode
        getattr(chunks, "close", lambda: None)()
        return outputs
    stacks: dict[str, list[Any]] = {o.name: [] for j in later for o in prepared.ops[j].output_specs()}
    arrays = {o.name for j in later for o in prepared.ops[j].output_specs() if o.kind == "array"}
    texts = {o.name for j in later for o in prepared.ops[j].output_specs() if o.dtype == "json"}
    feed = _Prefetch(chunks, _pool(task.decode_threads) if task.decode_threads > 0 else None)
    try:
        for frames in feed:
            for name, piece in _frame_chunk(prepared, later, row, frames, task, res, arrays, texts).items():
                stacks[name].append(piece)
            del frames  # before the next chunk is asked for: two chunks in memory, not three
    except Exception as exc:
        if is_infrastructure_error(exc):
            raise
        return exc
    finally:
        feed.close()
    for name, values in stacks.items():
        if name in arrays:
            outputs[name] = np.concatenate(values) if len(values) > 1 else values[0] if values else np.zeros((0,))
        else:
            outputs[name] = [v for chunk in values for v in chunk]
    return outputs


def _frame_chunk(prepared: PreparedPipeline, later: range, row: Row, frames: list[Row], task: PartitionTask,
                 res: RowResults, arrays: set[str], texts: set[str]) -> dict[str, Any]:
    """One chunk of a video's frames through the ops after the source: each output's values for the chunk
    (arrays stacked, columns as lists). A frame an op rejects raises :class:`FrameError`."""
    live = [{**row, **frame} for frame in frames]
    stored: list[Row] = [{} for _ in live]
    for j in later:
        t = time.perf_counter()
        outs = _apply(prepared, j, live, task.batch_size, res)
        res.op_seconds[j] += time.perf_counter() - t
        for frame, out, kept in zip(live, outs, stored, strict=True):
            checked = out if isinstance(out, BaseException) else _check_outputs(prepared.ops[j], out)
            if isinstance(checked, BaseException):
                raise FrameError(prepared.ops[j].name, frame.get("frame_index"), checked)
            frame.update(_handoff(out, checked))
            kept.update(checked)
    pieces: dict[str, Any] = {}
    for name in (o.name for j in later for o in prepared.ops[j].output_specs()):
        values = [kept[name] for kept in stored]
        if name in arrays:
            pieces[name] = _stack(name, values)
        else:  # a JSON output per frame is decoded: the row's list of them is one JSON
            pieces[name] = [json.loads(v) if name in texts and v is not None else v for v in values]
    return pieces


def _handoff(out: Any, checked: Row) -> Row:
    """What the next ops of the row see: the stored values, except torch tensors, which stay as the op made
    them (on its device: an op pinned to another GPU gets them there without a trip through the host)."""
    return {name: out[name] if _is_tensor(out.get(name)) else value for name, value in checked.items()}


def _is_tensor(value: Any) -> bool:
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def _stack(name: str, values: list[Any]) -> np.ndarray:
    shapes = {np.shape(v) for v in values}
    if len(shapes) > 1:
        raise RowError(f"output {name!r} differs in shape from frame to frame ({', '.join(map(str, sorted(shapes)))}); "
                       "a per-video output needs one shape per frame")
    return np.stack(values)


class _Prefetch:
    """Iterate ``chunks`` with the next item made on a pool thread while the caller works on this one."""

    _END = object()

    def __init__(self, chunks: Iterator[Any], pool: ThreadPoolExecutor | None) -> None:
        self.chunks, self.pool, self.pending = chunks, pool, None

    def __iter__(self) -> Iterator[Any]:
        if self.pool is None:
            yield from self.chunks
            return
        self.pending = self.pool.submit(next, self.chunks, self._END)
        while True:
            item = self.pending.result()
            if item is self._END:
                self.pending = None
                return
            self.pending = self.pool.submit(next, self.chunks, self._END)
            yield item

    def close(self) -> None:
        """Wait for a chunk in the making (a generator cannot be closed while it runs), then close the source."""
        if self.pending is not None:
            with contextlib.suppress(Exception):
                self.pending.result()
            self.pending = None
        close = getattr(self.chunks, "close", None)
        if close is not None:
            close()


def _check_outputs(op: Op, out: Any, specs: Sequence[Output] | None = None) -> Row | BaseException:
    """The op's declared outputs (or ``specs``) from its result, as clean values; anything missing is a row
    error."""
    if not isinstance(out, dict):
        return RowError(f"returned {type(out).__name__}, not a dict of outputs")
    clean: Row = {}
    for spec in op.output_specs() if specs is None else specs:
        if spec.name not in out:
            return RowError(f"returned no value for its output {spec.name!r}")
        try:
            clean[spec.name] = _coerce(spec, out[spec.name])
        except (TypeError, ValueError) as exc:
            return RowError(f"output {spec.name!r}: {exc}")
    return clean


def _store_artifacts(op: Op, outputs: Row, row: Row, store: Store, attempt: str,
                     stored: dict[str, int]) -> Row | BaseException:
    """Move the row's artifact folders into the root (``artifacts/<output>/<attempt>/<id>``); their paths
    become the outputs' values; ``stored`` maps each folder to its row's id."""
    from daskmv.export import file_stem

    for spec in op.output_specs():
        if spec.kind == "artifact" and outputs.get(spec.name) is not None:
            rel = f"{ARTIFACTS}/{spec.name}/{attempt}/{file_stem(str(row['id']))}"
            outputs[spec.name] = store.put_artifact(outputs[spec.name], rel)
            stored[rel] = row["id"]
    return outputs


def _discard_artifacts(op: Op, outputs: Row) -> None:
    """Remove the folders or files a row's op returned as artifacts when the row then failed because an
    output did not check: the engine owns what an op returns as an artifact (it moves it into the root), a
    failed row keeps none, and nothing else would ever remove them from the worker's disk."""
    for spec in op.output_specs():
        value = outputs.get(spec.name) if spec.kind == "artifact" else None
        if isinstance(value, (str, os.PathLike)):
            remove_local(os.fspath(value))


def _coerce(spec: Output, value: Any) -> Any:
    if spec.kind == "artifact":
        if value is None:
            return None
        path = os.fspath(value)
        if not os.path.exists(path):
            raise ValueError(f"the artifact {path!r} does not exist (return the path of a folder or file you wrote)")
        return path
    if spec.kind == "array":
        if _is_tensor(value):
            value = value.detach().cpu().numpy()
        arr = np.asarray(value)
        target = np.dtype(spec.dtype)
        if arr.dtype == object:
            raise TypeError("arrays of Python objects cannot be stored")
        if arr.dtype != target:
            if not np.can_cast(arr.dtype, target, casting="same_kind"):
                raise TypeError(f"dtype {arr.dtype} does not convert safely to the declared {target}")
            arr = arr.astype(target)
        return arr
    if value is None:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if spec.dtype == "json":
        return json.dumps(value, sort_keys=True, default=str)
    if spec.dtype.endswith("[]"):  # a short vector (an embedding) as an Arrow list column
        return np.asarray(value, dtype=np.dtype(spec.dtype[:-2])).ravel()
    if spec.dtype.startswith("int"):
        return int(value)
    if spec.dtype.startswith("float"):
        return float(value)
    if spec.dtype == "bool":
        return bool(value)
    return str(value)


def _format_error(op: str, exc: BaseException) -> str:
    text = str(exc).strip().replace("\n", " ") or "(no message)"
    if isinstance(exc, UpstreamError):
        return f"upstream: {text}"
    if isinstance(exc, FrameError):
        return f"{exc.op}: {text}"
    if isinstance(exc, RowError):
        return f"{op}: {text}"
    return f"{op}: {type(exc).__name__}: {text}"


# -- the partition's rows as a table -----------------------------------------------------------------
def _arrow_type(spec: Output) -> pa.DataType:
    if spec.dtype in ("json", "string", "str", "path") or spec.kind == "artifact":
        return pa.string()
    if spec.dtype.endswith("[]"):
        return pa.list_(pa.from_numpy_dtype(np.dtype(spec.dtype[:-2])))
    return pa.from_numpy_dtype(np.dtype(spec.dtype))


def written_columns(specs: Sequence[Output], export: str | None) -> set[str]:
    """The columns a partition's table gets from the run (everything else passes through from the manifest)."""
    from daskmv.export import SUFFIX, exported

    files = {spec.name + SUFFIX for spec in exported(specs)} if export else set()
    return {spec.column for spec in specs} | files | {"status", "error", "seconds"}


def result_table(specs: Sequence[Output], rows: pa.Table, res: RowResults, store: Store,
                 task: PartitionTask, attempt: str = "") -> pa.Table:
    """Input columns, then output columns and references, then status, error and seconds."""
    from daskmv.export import SUFFIX, exported

    files = {spec.name for spec in exported(specs)} if task.export else set()
    written = written_columns(specs, task.export)
    table = select_columns(rows, [c for c in rows.column_names if c not in written])
    for spec in specs:
        if spec.kind == "array":
            refs = store.write_array(spec.name, attempt, res.arrays[spec.name], spec.compression)
            table = table.append_column(spec.column, arrow.array(refs, pa.string()))
            if spec.name in files:
                paths = res.export_paths.get(spec.name) or [None] * len(rows)
                table = table.append_column(spec.name + SUFFIX, arrow.array(paths, pa.string()))
        else:
            table = table.append_column(spec.column, arrow.array(res.columns[spec.name], _arrow_type(spec)))
    status = ["ok" if err is None else "error" for err in res.errors]
    table = table.append_column("status", arrow.array(status, pa.string()))
    table = table.append_column("error", arrow.array(res.errors, pa.string()))
    return table.append_column("seconds", arrow.array(np.round(res.seconds, 6), pa.float64()))


def select_columns(table: pa.Table, names: list[str]) -> pa.Table:
    """``table``'s columns ``names``, its pandas metadata (dtypes for pandas readers) kept for those alone."""
    selected = table.select(names)
    meta = selected.schema.metadata or {}
    if b"pandas" not in meta or len(names) == table.num_columns:
        return selected
    doc = json.loads(meta[b"pandas"])
    doc["columns"] = [c for c in doc.get("columns", []) if c.get("name") in names]
    return selected.replace_schema_metadata({**meta, b"pandas": json.dumps(doc).encode()})


def failed_partition_table(specs: Sequence[Output], task: PartitionTask, message: str) -> pa.Table:
    """The rows of a partition given up on: every row an error that says why, no outputs."""
    res = RowResults.empty(specs, len(task.rows))
    for i in range(len(task.rows)):
        res.fail(i, message)
    return result_table(specs, task.rows, res, Store(task.root, task.storage_options), task)


def _merge_retry(old: pa.Table, new: pa.Table, order: Sequence[str]) -> pa.Table:
    """The old partition with its retried rows replaced by their new results, in manifest order."""
    kept = old.filter(pc.invert(pc.is_in(old.column("id"), value_set=new.column("id"))))
    merged = pa.concat_tables([kept, new], promote_options="permissive")
    position = pc.index_in(merged.column("id"), value_set=arrow.array(list(order), merged.column("id").type))
    return merged.take(pc.sort_indices(position))


# -- probes: the pipeline over sample rows, writing nothing (workers-per-gpu auto) ---------------------------
def probe_rows(steps: list[dict[str, Any]], fingerprint: str, rows: pa.Table, base: str, batch_size: int = 32,
               decode_threads: int = 2, path_column: str = "path") -> dict[str, Any]:
    """Run the pipeline over ``rows`` in this worker, outputs kept in memory and dropped: how fast it goes here
    and whether it fits. Raises :class:`SetupFailed` when the ops cannot be set up (a model that does not fit)."""
    prepared = _op_cache().get(fingerprint, steps)
    task = PartitionTask(index=0, rows=rows, rows_hash="", fingerprint=fingerprint, steps=steps, root="", base=base,
                         path_column=path_column, batch_size=batch_size, decode_threads=decode_threads)
    records = task.rows.to_pylist()
    res = RowResults.empty(prepared.specs, len(records), len(prepared.ops))
    _reset_device_peak()
    t = time.perf_counter()
    _process_batches(prepared, records, task, res)
    seconds = time.perf_counter() - t
    errors = [e for e in res.errors if e is not None]
    items = len(records) - len(errors)
    if prepared.source is not None:  # a video pipeline's items are its frames
        counts = res.columns.get("n_frames") or []
        items = sum(int(n) for n, e in zip(counts, res.errors) if n is not None and e is None)
    return {"rows": len(records), "items": items, "seconds": seconds, "errors": errors[:5], "n_errors": len(errors),
            "oom_backoffs": res.oom_backoffs, "peak_device_bytes": device_peak(), "worker": _worker_address(),
            "batch_limits": {prepared.ops[k].name: v for k, v in prepared.batch_limits.items()}}


def _reset_device_peak() -> None:
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def device_peak() -> int | None:
    """The most GPU memory torch held in this process since the last reset (None: no GPU in use)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return int(torch.cuda.max_memory_allocated())
