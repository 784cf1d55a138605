"""Drive a run: pre-flight checks, one Dask task per partition, retries with back-off, the final manifest.

The driver reads the manifest as a Dask dataframe, splits its partitions into tasks of
``partition_rows`` rows and submits them with plain ``client.submit`` (explicit keys, the GPU
resource when the pipeline needs one) through a bounded window refilled as tasks finish. Each task
writes its own outputs and returns only its small completion marker, whose future is released at
once, so the driver's memory does not grow with the manifest and a worker lost late in a run never
makes the scheduler recompute finished partitions. Partitions already marked done for this pipeline
are skipped: that is how an interrupted run resumes.
"""

from __future__ import annotations

import contextlib
import errno
import dataclasses
import hashlib
import heapq
import importlib.metadata
import platform
import queue
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import pyarrow as pa
from distributed import Client

from daskmv.assemble import ManifestWriter, SchemaMismatch
from daskmv.cluster import connect, worker_summary
from daskmv.errors import RunError, StoreError, UsageError
from daskmv.manifest import Manifest, read_manifest
from daskmv.ops.image import DECODE_SCALES
from daskmv.partition import OpCache, PartitionTask, failed_partition_table, run_partition
from daskmv.pipeline import Pipeline
from daskmv.progress import RunProgress
from daskmv.store import MANIFEST, RUN_JSON, Store, now

DEFAULT_BATCH_SIZE = 32
MAX_PARTITION_ROWS = 1024
PARTITION_BYTES = 256 << 20
MAX_COLUMN_PARTITION_ROWS = 10_000
MIN_PARTITION_ROWS = 16


@dataclass
class RunOptions:
    """How a run executes; everything here can come from CLI flags or a ``--config`` YAML file."""

    cluster: str = "local"
    workers: int | None = None
    threads_per_worker: int = 1
    partition_rows: int | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    decode_threads: int = 2
    decode_scale: int = 1
    path_column: str = "path"
    id_column: str | None = None
    limit: int | None = None
    overwrite: bool = False
    retry_errors: bool = False
    retries: int = 3
    retry_delay: float = 1.0
    window: int | None = None
    require_gpu: bool = False
    progress: str = "auto"
    storage_options: dict[str, Any] = field(default_factory=dict)
    cluster_kwargs: dict[str, Any] = field(default_factory=dict)
    export: str | None = None


@dataclass
class RunResult:
    """What a finished run left behind; ``manifest()`` reads the output manifest."""

    out: str
    manifest_path: str
    fingerprint: str
    counts: dict[str, int]
    seconds: float
    computed_partitions: list[int]
    skipped_partitions: list[int]
    failed_partitions: list[int]

    @property
    def complete(self) -> bool:
        return not self.failed_partitions

    def manifest(self) -> pd.DataFrame:
        return pd.read_parquet(self.manifest_path, dtype_backend="numpy_nullable")

    def report(self, n: int = 16, seed: int = 0) -> str:
        """Write ``report.html`` into the output root (see :mod:`daskmv.report`); return its path."""
        from daskmv.report import build_report

        return build_report(self.out, n=n, seed=seed)

    def _repr_html_(self) -> str:
        from daskmv.report import REPORT, RunFacts, summary_html

        facts = RunFacts.read(self.out)
        link = facts.store.url(REPORT) if facts.store.exists(REPORT) else None
        return summary_html(facts, link)

    def summary(self) -> str:
        c = self.counts
        return (f"{c.get('rows', 0):,} rows: {c.get('ok', 0):,} ok, {c.get('error', 0):,} errors "
                f"in {self.seconds:,.1f} s; manifest: {self.manifest_path}")


def rows_hash(df: pd.DataFrame) -> str:
    """A digest of a partition's ids, so a marker is only trusted for exactly the same rows."""
    return hashlib.sha256("\x1f".join(df["id"].tolist()).encode()).hexdigest()[:20]


def run(
    manifest: str | Manifest,
    pipeline: str | Pipeline | list[Any],
    out: str,
    *,
    client: Client | None = None,
    **options: Any,
) -> RunResult:
    """Apply ``pipeline`` to every row of ``manifest``, writing into the output root ``out``.

    ``client`` is an existing ``distributed.Client`` (Jupyter); without one, ``cluster=`` in
    ``options`` says where to run (see :class:`RunOptions`). Raises UsageError subclasses for bad
    input before any work starts, RunError when the run could not complete.
    """
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(RunOptions)})
    if unknown:
        known = ", ".join(f.name for f in dataclasses.fields(RunOptions))
        raise UsageError(f"unknown run option(s) {', '.join(unknown)} (options: {known})")
    opts = RunOptions(**options)
    with _system_arrow_pool():
        return _run(manifest, pipeline, out, client, opts)


@contextlib.contextmanager
def _system_arrow_pool() -> Iterator[None]:
    """Arrow's malloc pool while the driver runs: mimalloc keeps freed pages, and the driver's memory
    would then grow with the number of manifest rows it streams (30 % more at 1 M rows than 100 k)."""
    previous = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        yield
    finally:
        pa.set_memory_pool(previous)


def _run(manifest: str | Manifest, pipeline: str | Pipeline | list[Any], out: str, client: Client | None,
         opts: RunOptions) -> RunResult:
    progress = RunProgress(opts.progress)  # type: ignore[arg-type]
    if not isinstance(manifest, Manifest):
        manifest = read_manifest(manifest, path_column=opts.path_column, id_column=opts.id_column,
                                 limit=opts.limit, storage_options=opts.storage_options)
    pipeline = Pipeline.parse(pipeline)
    _check_export(opts.export, pipeline)
    if opts.decode_scale not in DECODE_SCALES:
        raise UsageError(f"--decode-scale {opts.decode_scale}: use one of {', '.join(map(str, DECODE_SCALES))}")
    replaced = pipeline.validate(manifest.columns, manifest.path_column)
    if replaced:
        progress.note(f"note: the pipeline's outputs replace the manifest column(s) {', '.join(replaced)}")
    store = Store(out, opts.storage_options)
    store.acquire_lock()
    try:
        binding = {**_binding(manifest, pipeline), "export": opts.export, "decode_scale": opts.decode_scale}
        previous = store.prepare(binding, opts.overwrite)
        partition_rows = _known_partition_rows(previous, opts.partition_rows)
        with connect(client or opts.cluster, workers=opts.workers, threads_per_worker=opts.threads_per_worker,
                     note=progress.note, **opts.cluster_kwargs) as c:
            runner = _Runner(c, manifest, pipeline, store, opts, progress)
            return runner.run(binding, partition_rows)
    except OSError as exc:  # the output root failed under us: full disk, lost mount, permissions
        hint = "free some space" if exc.errno == errno.ENOSPC else "fix the output root"
        raise RunError(f"cannot write to the output root {store.root}: {exc}; {hint} and run the same command "
                       "again to resume (finished partitions are kept)") from None
    finally:
        try:
            store.release_lock()
        except OSError:
            pass


def _check_export(export: str | None, pipeline: Pipeline) -> None:
    from daskmv.export import FORMATS, exported

    if export is None:
        return
    if export not in FORMATS:
        raise UsageError(f"--export {export!r}: the formats are {', '.join(FORMATS)}")
    if not exported(pipeline.outputs):
        raise UsageError(f"--export {export}: pipeline {pipeline.name!r} has no uint8 image outputs to write as files")


def _binding(manifest: Manifest, pipeline: Pipeline) -> dict[str, Any]:
    """What ties an output root to one run: resuming requires all of it to be the same."""
    return {
        "fingerprint": pipeline.fingerprint,
        "manifest": manifest.url,
        "id_column": manifest.id_column,
        "path_column": manifest.path_column,
    }


def _known_partition_rows(previous: dict[str, Any] | None, asked: int | None) -> int | None:
    if previous is None:
        return asked
    recorded = previous.get("binding", {}).get("partition_rows")
    if asked is not None and recorded is not None and asked != recorded:
        raise StoreError(f"this output root was made with --partition-rows {recorded}; resuming needs the same "
                         "value (or --overwrite)")
    return recorded if recorded is not None else asked


def auto_partition_rows(n_rows: int, threads: int, reads_files: bool = True, row_bytes: int = 0) -> int:
    """Partition size: about 8 partitions per worker thread, within a memory budget and a row cap.

    A partition's array outputs are held in memory until written, so partitions stay under
    :data:`PARTITION_BYTES` of estimated output; pipelines that read files are capped at
    :data:`MAX_PARTITION_ROWS` rows (resume granularity, load balance), column-only ones at
    :data:`MAX_COLUMN_PARTITION_ROWS`. Fewer, larger partitions cost the driver less (about 8 ms each).
    """
    target = -(-n_rows // max(1, 8 * threads))
    cap = MAX_PARTITION_ROWS if reads_files else MAX_COLUMN_PARTITION_ROWS
    by_memory = PARTITION_BYTES // max(1, row_bytes)
    return max(MIN_PARTITION_ROWS, min(cap, target, by_memory))


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for pkg in ("daskmv", "dask", "distributed", "zarr", "numpy", "pandas", "pyarrow", "opencv-python-headless", "torch"):
        try:
            found[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


class _Runner:
    """The scheduling loop of one run: submit, collect, retry with back-off, record, assemble."""

    def __init__(self, client: Client, manifest: Manifest, pipeline: Pipeline, store: Store,
                 opts: RunOptions, progress: RunProgress) -> None:
        self.client, self.manifest, self.pipeline, self.store = client, manifest, pipeline, store
        self.opts, self.progress = opts, progress
        self.in_flight: dict[Any, PartitionTask] = {}
        self.finished: queue.Queue[Any] = queue.Queue()  # futures, put by their done-callbacks
        self.waiting: list[tuple[float, int, PartitionTask]] = []  # (due time, index, task) heap
        self.attempts: dict[int, int] = {}
        self.computed: list[int] = []
        self.skipped: list[int] = []
        self.failed: dict[int, str] = {}
        self.failed_attempts: list[dict[str, Any]] = []  # every failed attempt, for the report
        self._window_size, self._window_at = 2, float("-inf")
        self.indices: list[int] = []
        # The final manifest is written while the run goes, in order, as partitions become ready.
        self.writer = ManifestWriter(store, csv=manifest.format == "csv")
        self.ready: set[int] = set()
        self.slurm_jobs: dict[str, list[int]] = {}
        self.next_out = 0
        self.streaming = True

    def run(self, binding: dict[str, Any], partition_rows: int | None) -> RunResult:
        t0 = time.perf_counter()
        workers = worker_summary(self.client)
        if workers["workers"] == 0:
            raise RunError("the cluster has no workers")
        resources = self._resources(workers)
        if partition_rows is None:
            partition_rows = auto_partition_rows(self.manifest.n_rows or 0, workers["threads"],
                                                 reads_files=bool(self.pipeline.loader_inputs),
                                                 row_bytes=self.pipeline.row_bytes)
        binding = {**binding, "partition_rows": partition_rows}
        self.n_partitions = self.manifest.partition_count(partition_rows)
        self.client.register_plugin(OpCache())
        self.store.prepare_arrays([o.name for o in self.pipeline.array_outputs])
        run_doc = self._run_doc(binding, workers, state="running")
        self.store.write_json(RUN_JSON, run_doc)
        self.progress.note(f"{self.manifest.n_rows:,} rows in partitions of {partition_rows}; pipeline "
                           f"{self.pipeline.name} ({binding['fingerprint']}); output root {self.store.root}")
        markers = self.store.markers()
        self.progress.start(self.manifest.n_rows or 0)
        try:
            self._loop(self._tasks(partition_rows, markers, binding["fingerprint"]), resources)
        except BaseException:
            self.progress.close()
            self._cancel()
            self.writer.abort()
            raise
        self.progress.close()
        try:
            counts = self._finish(run_doc, t0)
        finally:
            self.writer.abort()  # removes the temporary manifest files unless they were committed
        result = RunResult(
            out=self.store.root, manifest_path=self.store.url(MANIFEST), fingerprint=binding["fingerprint"],
            counts=counts, seconds=time.perf_counter() - t0, computed_partitions=self.computed,
            skipped_partitions=self.skipped, failed_partitions=sorted(self.failed),
        )
        return result

    # -- what to submit ----------------------------------------------------------------------------
    def _tasks(self, partition_rows: int, markers: dict[int, Any], fingerprint: str) -> Iterator[PartitionTask]:
        steps = self.pipeline.steps()
        for index, rows in enumerate(self.manifest.partitions(partition_rows)):
            self.indices.append(index)
            digest = rows_hash(rows)
            marker = markers.get(index)
            done = marker is not None and marker.fingerprint == fingerprint and marker.rows_hash == digest
            task = PartitionTask(
                index=index, rows=rows, rows_hash=digest, fingerprint=fingerprint, steps=steps,
                root=self.store.root, base=self.manifest.base, path_column=self.manifest.path_column,
                batch_size=self.opts.batch_size, decode_threads=self.opts.decode_threads,
                decode_scale=self.opts.decode_scale,
                storage_options=self.opts.storage_options, export=self.opts.export,
            )
            if done and self.opts.retry_errors and marker.errors:
                task.retry_ids = self._error_ids(index)
                task.generation = marker.generation + 1
                self.progress.advance(marker.ok)
            elif done:
                self._record_job(marker.info)
                self.skipped.append(index)
                self.progress.advance(marker.rows, marker.errors)
                self._ready(index)
                continue
            yield task

    def _error_ids(self, index: int) -> list[str]:
        table = self.store.read_part(index).select(["id", "status"]).to_pandas()
        return table.loc[table["status"] == "error", "id"].tolist()

    def _resources(self, workers: dict[str, int]) -> dict[str, int] | None:
        """``{"GPU": 1}`` when the pipeline has GPU ops and some worker has a GPU; else run on CPU."""
        if not self.pipeline.needs_gpu:
            return None
        if workers["gpu_workers"]:
            return {"GPU": 1}
        if self.opts.require_gpu:
            raise RunError("the pipeline has GPU ops but no worker declares a GPU resource "
                           "(start workers with --resources GPU=1, or drop --require-gpu to run on CPU)")
        gpu_ops = ", ".join(op.name for op in self.pipeline.ops if op.gpu)
        self.progress.note(f"note: no worker declares a GPU; {gpu_ops} run(s) on CPU")
        return None

    # -- the loop ----------------------------------------------------------------------------------
    def _window(self, resources: dict[str, int] | None) -> int:
        """About two tasks per worker thread that may run them; re-read every few seconds, since
        clusters grow (SLURM jobs starting, adaptive scaling) and shrink while a run goes."""
        now_t = time.monotonic()
        if self.opts.window:
            return self.opts.window
        if now_t - self._window_at > 3.0:
            workers = worker_summary(self.client)
            slots = workers["gpu_workers"] if resources else workers["threads"]
            self._window_size, self._window_at = max(2, 2 * slots), now_t
        return self._window_size

    def _loop(self, tasks: Iterator[PartitionTask], resources: dict[str, int] | None) -> None:
        """Keep a window of tasks in flight; collect each as it finishes (done-callbacks, no polling)."""
        exhausted = False
        while True:
            now_t = time.monotonic()
            window = self._window(resources)
            while self.waiting and self.waiting[0][0] <= now_t and len(self.in_flight) < window:
                _, _, task = heapq.heappop(self.waiting)
                self._submit(task, resources)
            while not exhausted and len(self.in_flight) + len(self.waiting) < window:
                task = next(tasks, None)
                if task is None:
                    exhausted = True
                    break
                self._submit(task, resources)
            if not self.in_flight and exhausted and not self.waiting:
                return
            due = self.waiting[0][0] - time.monotonic() if self.waiting else 1.0
            try:
                future = self.finished.get(timeout=min(1.0, max(0.01, due)))
            except queue.Empty:  # nothing finished: go round to submit retries that are due
                continue
            self._collect(future)

    def _submit(self, task: PartitionTask, resources: dict[str, int] | None) -> None:
        task.attempt = self.attempts[task.index] = self.attempts.get(task.index, 0) + 1
        key = f"daskmv-{task.fingerprint[:10]}-p{task.index:06d}-g{task.generation}-a{task.attempt}"
        future = self.client.submit(run_partition, task, key=key, resources=resources, pure=False)
        self.in_flight[future] = task
        future.add_done_callback(self.finished.put)

    def _collect(self, future: Any) -> None:
        task = self.in_flight.pop(future, None)
        if task is None:  # already collected (a callback can fire twice for a recomputed key)
            return
        if future.status not in ("finished", "error", "cancelled"):
            # Its result was lost with a worker before we read it; the scheduler is recomputing it.
            self.in_flight[future] = task
            future.add_done_callback(self.finished.put)
            return
        if future.status == "finished":
            marker = future.result()
            future.release()
            self.computed.append(task.index)
            self.failed.pop(task.index, None)
            self._record_job(marker)
            self.progress.advance(marker["processed_rows"], marker["errors"])
            self._ready(task.index)
            return
        exc = future.exception()
        tb = "".join(traceback.format_tb(future.traceback()))
        future.release()
        message = f"{type(exc).__name__}: {exc}"
        self.failed_attempts.append({"index": task.index, "attempt": task.attempt, "time": now(),
                                     "error": message[:500], "traceback": tb[-4000:]})
        if task.attempt <= self.opts.retries:
            delay = self.opts.retry_delay * 2 ** (task.attempt - 1)
            self.progress.note(f"partition {task.index} failed (attempt {task.attempt}): {message}; "
                               f"retrying in {delay:.0f} s")
            heapq.heappush(self.waiting, (time.monotonic() + delay, task.index, task))
            return
        self.progress.note(f"partition {task.index} failed after {task.attempt} attempts: {message}")
        self.failed[task.index] = message
        rows = task.rows if task.retry_ids is None else task.rows[task.rows["id"].isin(task.retry_ids)]
        error = f"partition: failed after {task.attempt} attempts: {message}"
        if task.retry_ids is None:
            self.store.write_part(task.index, failed_partition_table(self.pipeline.outputs, task, error))
        self.store.mark_failed(task.index, {"error": message, "attempts": task.attempt, "rows": len(task.rows),
                                            "time": now()})
        self.progress.advance(len(rows), len(rows))
        self._ready(task.index)

    def _record_job(self, marker: dict[str, Any] | None) -> None:
        """Remember which SLURM job ran a partition (for run.json; nothing off SLURM)."""
        job = (marker or {}).get("slurm_job_id")
        if job:
            self.slurm_jobs.setdefault(str(job), []).append(int(marker["index"]))  # type: ignore[index]

    def _ready(self, index: int) -> None:
        """A partition's part is final: append every part that is now next in manifest order."""
        self.ready.add(index)
        while self.streaming and self.next_out in self.ready:
            try:
                self.writer.add(self.store.read_part(self.next_out))
            except SchemaMismatch as exc:
                self.progress.note(f"note: partition {self.next_out} changes the manifest's columns ({exc}); "
                                   "the manifest will be assembled at the end")
                self.streaming = False
                self.writer.abort()
            self.ready.discard(self.next_out)
            self.next_out += 1

    def _cancel(self) -> None:
        futures = list(self.in_flight)
        self.in_flight.clear()
        if futures:
            try:
                self.client.cancel(futures)
            except Exception:
                pass

    # -- records -----------------------------------------------------------------------------------
    def _run_doc(self, binding: dict[str, Any], workers: dict[str, int], state: str) -> dict[str, Any]:
        return {
            "state": state,
            "started": now(),
            "binding": binding,
            "pipeline": {"name": self.pipeline.name, "fingerprint": self.pipeline.fingerprint,
                         "steps": self.pipeline.steps()},
            "partitions": self.n_partitions,
            "manifest": {"url": self.manifest.url, "format": self.manifest.format, "rows": self.manifest.n_rows,
                         "limit": self.manifest.limit, "columns": self.manifest.columns},
            "options": {"batch_size": self.opts.batch_size, "decode_threads": self.opts.decode_threads,
                        "retries": self.opts.retries},
            "cluster": {"spec": self.opts.cluster if isinstance(self.opts.cluster, str) else "client",
                        "scheduler": self.client.scheduler.address if self.client.scheduler else None, **workers},
            "versions": versions(),
            "argv": sys.argv,
        }

    def _finish(self, run_doc: dict[str, Any], t0: float) -> dict[str, int]:
        """Assemble the final manifest (failed partitions' rows included, as errors) and run.json."""
        if self.streaming and self.next_out == len(self.indices):
            counts = self.writer.commit()
        else:
            self.writer.abort()
            counts = self.store.assemble(self.indices, csv=self.manifest.format == "csv")
        seconds = time.perf_counter() - t0
        run_doc.update(
            state="incomplete" if self.failed else "complete", finished=now(), seconds=round(seconds, 3),
            counts={**counts, "partitions": len(self.indices), "computed_partitions": len(self.computed),
                    "skipped_partitions": len(self.skipped), "failed_partitions": len(self.failed)},
            failed_partitions={str(k): v for k, v in self.failed.items()},
            failed_attempts=self.failed_attempts,
            slurm_jobs={job: sorted(parts) for job, parts in self.slurm_jobs.items()},
            rows_per_second=round((self.progress.done - self.progress.skipped) / seconds, 2) if seconds else None,
        )
        self.store.write_json(RUN_JSON, run_doc)
        if self.failed:
            first = min(self.failed)
            raise RunError(f"{len(self.failed)} partition(s) failed after {self.opts.retries} retries "
                           f"(first: partition {first}: {self.failed[first]}); their rows are errors in "
                           f"{self.store.url(MANIFEST)}; run the same command again to retry them")
        return counts
