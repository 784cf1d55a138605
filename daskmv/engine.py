"""Drive a run: pre-flight checks, one Dask task per partition, retries with back-off, the final manifest.

The driver reads the manifest as a Dask dataframe, splits its partitions into tasks of
``partition_rows`` rows and submits them with plain ``client.submit`` (explicit keys, the GPU
resource when the pipeline needs one) through a bounded window refilled as tasks finish. Each task
writes its own outputs and returns only its small completion marker, whose future is released at
once, so the driver's memory does not grow with the manifest and a worker lost late in a run never
makes the scheduler recompute finished partitions. Partitions already marked done for this pipeline
and these rows are skipped: that is how an interrupted run resumes.

What goes wrong is told apart: a row's own problem is a row error; a partition whose task failed (an I/O
or device fault, a lost worker) is retried with back-off and, when it keeps failing, reported with exit 1;
a worker whose op set-up keeps failing gets no more work; a run that completed with more row errors than
``max_error_rate`` ends with exit 3.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import importlib.metadata
import os
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
from daskmv.cluster import connect, start_fork_server, worker_summary
from daskmv.errors import OutputRootError, RunError, SetupFailed, StoreError, TooManyRowErrors, UsageError
from daskmv.failures import origin, parse_log
from daskmv.manifest import Manifest, read_manifest
from daskmv.ops.image import DECODE_SCALES
from daskmv.partition import SETUP_ATTEMPTS, OpCache, PartitionTask, failed_partition_table, run_partition
from daskmv.passthrough import inputs_hash, refresh_inputs
from daskmv.pipeline import Pipeline, Plan
from daskmv.progress import MODES, RunProgress
from daskmv.store import ERRORS_LOG, LAYOUT, MANIFEST, RUN_JSON, Store, attempt_name, new_token, now

DEFAULT_BATCH_SIZE = 32
MAX_PARTITION_ROWS = 1024
PARTITION_BYTES = 256 << 20
MAX_COLUMN_PARTITION_ROWS = 10_000
MIN_PARTITION_ROWS = 16
#: A run whose share of row errors is above this ends with exit 3 (``--max-error-rate``): a few broken
#: files pass, a manifest pointing at the wrong folder does not.
DEFAULT_MAX_ERROR_RATE = 0.1


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
    max_error_rate: float = DEFAULT_MAX_ERROR_RATE
    worker_wait: float = 600.0
    partition_by: str | None = None
    #: GPU worker processes per GPU of a local cluster: N, or "auto" (grow while each new one fits and adds
    #: throughput, see :mod:`daskmv.fit`); None: one per GPU. No effect without GPUs.
    workers_per_gpu: int | str | None = None
    #: The settings table of ``daskmv tune`` whose best row these options are (kept in run.json, charted in the
    #: report); never read by the run itself.
    tuning: dict[str, Any] | None = None

    def check(self) -> None:
        """Refuse any option a run cannot honour, with one line saying which and why (before anything is written)."""
        whole = {"threads_per_worker": 1, "batch_size": 1, "decode_threads": 0, "retries": 0}
        optional = {"workers": 1, "partition_rows": 1, "limit": 1, "window": 1}
        for name, low in [*whole.items(), *optional.items()]:
            value = getattr(self, name)
            if value is None and name in optional:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise UsageError(f"{_flag(name)} {value!r}: must be a whole number of at least {low}")
        for name, low, high in (("retry_delay", 0.0, None), ("max_error_rate", 0.0, 1.0), ("worker_wait", 0.0, None)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < low or (high and value > high):
                bound = f"between {low:g} and {high:g}" if high else f"a number of at least {low:g}"
                raise UsageError(f"{_flag(name)} {value!r}: must be {bound}")
        if self.decode_scale not in DECODE_SCALES:
            raise UsageError(f"--decode-scale {self.decode_scale}: use one of {', '.join(map(str, DECODE_SCALES))}")
        if self.progress not in MODES:
            raise UsageError(f"--progress {self.progress!r}: use one of {', '.join(MODES)}")
        for name in ("overwrite", "retry_errors", "require_gpu"):
            if not isinstance(getattr(self, name), bool):
                raise UsageError(f"{_flag(name)}: must be true or false, not {getattr(self, name)!r}")
        for name in ("storage_options", "cluster_kwargs"):
            if not isinstance(getattr(self, name), dict):
                raise UsageError(f"{name}: must be a mapping, not {getattr(self, name)!r}")
        if not isinstance(self.path_column, str) or not self.path_column:
            raise UsageError(f"--path-column {self.path_column!r}: must be a column name")
        per_gpu = self.workers_per_gpu
        if isinstance(per_gpu, str) and per_gpu.isdigit():
            self.workers_per_gpu = per_gpu = int(per_gpu)
        if per_gpu is not None and per_gpu != "auto" and (
                not isinstance(per_gpu, int) or isinstance(per_gpu, bool) or per_gpu < 1):
            raise UsageError(f"--workers-per-gpu {per_gpu!r}: must be a whole number of at least 1, or auto")
        if self.tuning is not None and not isinstance(self.tuning, dict):
            raise UsageError(f"tuning: must be a mapping (what daskmv tune writes), not {self.tuning!r}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


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
    storage_options: dict[str, Any] = field(default_factory=dict)
    stages: list[RunResult] = field(default_factory=list)  # a pipeline with reshape steps: each stage's result

    @property
    def complete(self) -> bool:
        return not self.failed_partitions

    def manifest(self) -> pd.DataFrame:
        return pd.read_parquet(self.manifest_path, dtype_backend="numpy_nullable",
                               storage_options=self.storage_options or None)

    def report(self, n: int = 16, seed: int = 0) -> str:
        """Write ``report.html`` into the output root (see :mod:`daskmv.report`); return its path."""
        from daskmv.report import build_report

        return build_report(self.out, n=n, seed=seed, storage_options=self.storage_options)

    def _repr_html_(self) -> str:
        from daskmv.report import REPORT, RunFacts, summary_html

        facts = RunFacts.read(self.out, self.storage_options)
        link = facts.store.url(REPORT) if facts.store.exists(REPORT) else None
        return summary_html(facts, link)

    def summary(self) -> str:
        c = self.counts
        return (f"{c.get('rows', 0):,} rows: {c.get('ok', 0):,} ok, {c.get('error', 0):,} errors "
                f"in {self.seconds:,.1f} s; manifest: {self.manifest_path}")


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
    opts.check()
    plan = Plan.parse(pipeline)
    if client is None and (opts.cluster or "local") == "local":
        # its imports run while this process reads the manifest
        start_fork_server(sorted({m for stage in plan.stages for op in stage.ops for m in op.preload}))
    with _system_arrow_pool():
        if plan.staged:
            from daskmv.stages import run_stages

            return run_stages(manifest, plan, out, client, opts)
        return _run(manifest, plan.pipeline(), out, client, opts)


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
         opts: RunOptions, manifest_key: str | None = None) -> RunResult:
    """One ordinary run (one stage). ``manifest_key`` names the manifest in the root's binding instead of its
    URL (a stage's input lives inside the root, which may move)."""
    progress = RunProgress(opts.progress)  # type: ignore[arg-type]
    pipeline = Pipeline.parse(pipeline)
    _check_export(opts.export, pipeline)
    if not isinstance(manifest, Manifest):
        manifest = read_manifest(manifest, path_column=opts.path_column, id_column=opts.id_column,
                                 limit=opts.limit, storage_options=opts.storage_options, check=False)
    replaced = pipeline.validate(manifest.columns, manifest.path_column)
    identity = pipeline.column_inputs(manifest.columns)
    if (manifest.row_hashes is None or not set(identity) <= set(manifest.identity_columns)
            or manifest.partition_by != opts.partition_by):
        manifest.partition_by = opts.partition_by
        manifest.check(identity_columns=identity)
    if replaced:
        progress.note(f"note: the pipeline's outputs replace the manifest column(s) {', '.join(replaced)}")
    store = Store(out, opts.storage_options)
    store.acquire_lock()
    try:
        with diagnosed():
            binding = {**_binding(manifest, pipeline), "export": opts.export, "decode_scale": opts.decode_scale}
            if manifest_key:
                binding["manifest"] = manifest_key
            previous = store.prepare(binding, opts.overwrite)
            partition_rows = _known_partition_rows(previous, opts.partition_rows)
            with connect(client or opts.cluster, workers=opts.workers, threads_per_worker=opts.threads_per_worker,
                         workers_per_gpu=opts.workers_per_gpu, note=progress.note, **opts.cluster_kwargs) as c:
                fitted = _fit_workers(c, manifest, pipeline, opts, progress.note)
                runner = _Runner(c, manifest, pipeline, store, opts, progress)
                runner.workers_fit = fitted
                return runner.run(binding, partition_rows)
    finally:
        try:
            store.release_lock()
        except OSError:
            pass


def _fit_workers(client: Client, manifest: Manifest, pipeline: Pipeline, opts: RunOptions,
                 note: Any) -> dict[str, Any] | None:
    """``--workers-per-gpu auto`` on a cluster this run started: grow it before the run (see :mod:`daskmv.fit`)."""
    from daskmv.cluster import SharedGPUCluster, gpu_count

    if opts.workers_per_gpu != "auto":
        return None
    cluster = getattr(client, "cluster", None)
    if not isinstance(cluster, SharedGPUCluster):
        if gpu_count():  # without GPUs, connect() has said so already
            note("note: --workers-per-gpu auto needs a local cluster; running with the workers there are")
        return None
    from daskmv.fit import fit_workers

    return fit_workers(client, cluster, manifest, pipeline, opts, note).as_dict()


@contextlib.contextmanager
def diagnosed() -> Iterator[None]:
    """OSErrors that are not the output root's, named for what they are: on Python 3.11 a lost scheduler
    (``CommClosedError``) and a timeout are OSErrors too."""
    from distributed.comm.core import CommClosedError

    try:
        yield
    except (OutputRootError, TooManyRowErrors):
        raise
    except (TimeoutError, ConnectionError, CommClosedError) as exc:
        raise RunError(f"lost contact with the Dask cluster ({type(exc).__name__}: {exc}); finished partitions "
                       "are kept: run the same command again to resume") from None
    except OSError as exc:
        raise RunError(f"I/O error in the driver ({type(exc).__name__}: {exc}); finished partitions are kept: "
                       "run the same command again to resume") from None


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
        "layout": LAYOUT,
        "fingerprint": pipeline.fingerprint,
        "manifest": canonical_url(manifest.url),
        "id_column": manifest.id_column,
        "path_column": manifest.path_column,
    }


def canonical_url(url: str) -> str:
    """One spelling per manifest: local paths absolute and normalised (``m.csv``, ``./m.csv`` and
    ``/data/m.csv`` are the same run), URLs as given."""
    from fsspec.core import split_protocol

    protocol, path = split_protocol(url)
    if protocol in (None, "file", "local"):
        return os.path.normpath(os.path.abspath(path))
    return url


def _known_partition_rows(previous: dict[str, Any] | None, asked: int | None) -> int | None:
    if previous is None:
        return asked
    recorded = previous.get("binding", {}).get("partition_rows")
    if asked is not None and recorded is not None and asked != recorded:
        raise StoreError(f"this output root was made with --partition-rows {recorded}; resuming needs the same "
                         "value (or --overwrite)")
    return recorded if recorded is not None else asked


def expected_threads(client: Client, present: int, jobs: int | None) -> int:
    """Worker threads the run will have: those present, or what ``jobs`` jobs of a dask-jobqueue cluster
    bring (jobs x processes x threads) when more, since a SLURM run starts with its first job alone."""
    job = getattr(getattr(client, "cluster", None), "_dummy_job", None)
    if job is None or not jobs:
        return present
    per_job = int(getattr(job, "worker_processes", 1) or 1) * int(getattr(job, "worker_process_threads", 1) or 1)
    return max(present, jobs * per_job)


def auto_partition_rows(n_rows: int, threads: int, reads_files: bool = True, row_bytes: int = 0,
                        floor: int | None = None) -> int:
    """Partition size: about 8 partitions per worker thread, within a memory budget and a row cap.

    A partition's array outputs are held in memory until written, so partitions stay under
    :data:`PARTITION_BYTES` of estimated output; pipelines that read files are capped at
    :data:`MAX_PARTITION_ROWS` rows (resume granularity, load balance), column-only ones at
    :data:`MAX_COLUMN_PARTITION_ROWS`. Fewer, larger partitions cost the driver less (about 8 ms each).
    Pipelines of slow ops lower the floor (``Op.min_partition_rows``) so that a few rows still spread.
    """
    target = -(-n_rows // max(1, 8 * threads))
    cap = MAX_PARTITION_ROWS if reads_files else MAX_COLUMN_PARTITION_ROWS
    by_memory = PARTITION_BYTES // max(1, row_bytes)
    return max(floor or MIN_PARTITION_ROWS, min(cap, target, by_memory))


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
        self.retired: dict[str, dict[str, Any]] = {}  # workers whose op set-up kept failing
        self._window_size, self._window_at = 2, float("-inf")
        self._workers: list[str] = []
        self._no_slots_since: float | None = None
        self.n_partitions = 0
        # The final manifest is written while the run goes, in order, as partitions become ready.
        self.writer = ManifestWriter(store, csv=manifest.format == "csv")
        self.part_files: dict[int, str] = {}
        self.part_info: dict[int, dict[str, Any]] = {}  # index -> time and worker, for errors.log
        self.ready: set[int] = set()
        self.slurm_jobs: dict[str, list[int]] = {}
        self.next_out = 0
        self.streaming = True

    def run(self, binding: dict[str, Any], partition_rows: int | None) -> RunResult:
        t0 = time.perf_counter()
        workers = worker_summary(self.client)
        if workers["workers"] == 0:  # a worker being replaced (its nanny restarts it) is back in seconds
            try:
                self.client.wait_for_workers(1, timeout=min(30.0, self.opts.worker_wait))
            except (TimeoutError, OSError):
                pass
            workers = worker_summary(self.client)
        if workers["workers"] == 0:
            raise RunError("the cluster has no workers")
        resources = self._resources(workers)
        if partition_rows is None:
            threads = expected_threads(self.client, workers["threads"], self.opts.workers)
            partition_rows = auto_partition_rows(self.manifest.n_rows or 0, threads,
                                                 reads_files=bool(self.pipeline.loader_inputs),
                                                 row_bytes=self.pipeline.row_bytes,
                                                 floor=self.pipeline.min_partition_rows)
        binding = {**binding, "partition_rows": partition_rows}
        self.n_partitions = self.manifest.partition_count(partition_rows)
        self.hashes = self.manifest.partition_hashes(partition_rows)
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
            storage_options=self.opts.storage_options,
        )
        self._check_error_rate(result)
        return result

    # -- what to submit ----------------------------------------------------------------------------
    def _tasks(self, partition_rows: int, markers: dict[int, Any], fingerprint: str) -> Iterator[PartitionTask]:
        steps = self.pipeline.steps()
        for index, rows in enumerate(self.manifest.partitions(partition_rows)):
            digest = self.hashes[index]
            marker = markers.get(index)
            done = marker is not None and marker.same_work(fingerprint, digest)
            task = PartitionTask(
                index=index, rows=rows, rows_hash=digest, fingerprint=fingerprint, steps=steps,
                root=self.store.root, base=self.manifest.base, path_column=self.manifest.path_column,
                batch_size=self.opts.batch_size, decode_threads=self.opts.decode_threads,
                decode_scale=self.opts.decode_scale,
                storage_options=self.opts.storage_options, export=self.opts.export,
            )
            task.inputs_hash = inputs_hash(task.rows)
            if done and marker.inputs_hash != task.inputs_hash:
                # Same work, but a column the pipeline does not read changed: carry the new values.
                marker = refresh_inputs(self.store, marker, task.rows, self.pipeline.outputs, self.opts.export,
                                        task.inputs_hash)
            if done and self.opts.retry_errors and marker.errors:
                task.retry_ids = self._error_ids(marker)
                task.generation = marker.generation + 1
                self.progress.skip(marker.ok)
            elif done:
                self._record_job(marker.info)
                self.skipped.append(index)
                self.part_files[index] = marker.part
                self.part_info[index] = origin(marker.info)
                self.progress.skip(marker.rows, marker.errors)
                self._ready(index)
                continue
            yield task

    def _error_ids(self, marker: Any) -> list[str]:
        table = self.store.read_part_file(marker.part).select(["id", "status"]).to_pandas()
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
        if now_t - self._window_at > 3.0:
            info = self._workers_info()
            self._workers = [w for w in info if w not in self.retired]
            usable = [info[w] for w in self._workers]
            if resources:
                usable = [w for w in usable if w.get("resources", {}).get("GPU", 0) >= 1]
            slots = sum(int(w.get("nthreads", 1)) for w in usable) if not resources else len(usable)
            self._window_size, self._window_at = max(2, 2 * slots), now_t
            self._watch_slots(slots, resources)
        return self.opts.window or self._window_size

    def _workers_info(self) -> dict[str, Any]:
        """The scheduler's workers; a RunError that names the scheduler when the client lost it."""
        info = self.client.scheduler_info(n_workers=-1) if self.client.status == "running" else {}
        if "workers" not in info:
            address = self.client.scheduler.address if self.client.scheduler else "unknown address"
            raise RunError(f"lost contact with the Dask scheduler ({address}; client {self.client.status}); "
                           "finished partitions are kept: run the same command again to resume")
        return info["workers"]

    def _watch_slots(self, slots: int, resources: dict[str, int] | None) -> None:
        """Give up when no worker that can run the tasks has been there for ``worker_wait`` seconds
        (tasks that need a GPU would otherwise wait for one forever)."""
        if slots or not self.in_flight:
            self._no_slots_since = None
            return
        self._no_slots_since = self._no_slots_since or time.monotonic()
        waited = time.monotonic() - self._no_slots_since
        if waited >= self.opts.worker_wait:
            what = "with a GPU" if resources else "able to run them"
            raise RunError(f"{len(self.in_flight)} partition(s) waited {waited:.0f} s for a worker {what} and none "
                           f"is left in the cluster{self._retired_note()}; finished partitions are kept: add "
                           "workers and run the same command again to resume")

    def _retired_note(self) -> str:
        if not self.retired:
            return ""
        first = next(iter(self.retired.values()))
        return f" ({len(self.retired)} retired after failing op set-up: {first['error']})"

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
        # Workers whose op set-up kept failing get no more of this run's tasks.
        allowed = [w for w in self._workers if w not in self.retired] if self.retired else None
        future = self.client.submit(run_partition, task, key=key, resources=resources, pure=False,
                                    workers=allowed, allow_other_workers=False)
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
            self.part_files[task.index] = marker["part"]
            self.part_info[task.index] = origin(marker)
            self.progress.advance(marker["processed_rows"], marker["errors"])
            self._ready(task.index)
            return
        if future.status == "cancelled":
            exc: BaseException | None = None
            message = ("cancelled: the task was cancelled outside this run (another client, a scheduler "
                       "restart, or a lost connection)")
            tb = ""
        else:
            exc = future.exception()
            tb = "".join(traceback.format_tb(future.traceback()))
            message = f"{type(exc).__name__}: {exc}"
        future.release()
        self.failed_attempts.append({"index": task.index, "attempt": task.attempt, "time": now(),
                                     "error": message[:500], "traceback": tb[-4000:]})
        if isinstance(exc, SetupFailed):
            task.setup_failures += 1
            self._setup_failed(exc)
        if task.attempt - task.setup_failures <= self.opts.retries:
            delay = self.opts.retry_delay * 2 ** (task.attempt - 1)
            self.progress.note(f"partition {task.index} failed (attempt {task.attempt}): {message}; "
                               f"retrying in {delay:.0f} s")
            heapq.heappush(self.waiting, (time.monotonic() + delay, task.index, task))
            return
        self._give_up(task, message)

    def _setup_failed(self, exc: SetupFailed) -> None:
        """Retire a worker from this run once its op set-up failed :data:`SETUP_ATTEMPTS` times."""
        if exc.failures < SETUP_ATTEMPTS or exc.worker in self.retired:
            return
        self.retired[exc.worker] = {"error": exc.message, "failures": exc.failures, "time": now()}
        self._window_at = float("-inf")  # re-read the workers now
        self.progress.note(f"worker {exc.worker} retired from this run: its op set-up failed {exc.failures} "
                           f"times ({exc.message})")
        workers = [w for w in self._workers_info() if w not in self.retired]
        if not workers:
            raise RunError(f"op set-up failed on every worker ({len(self.retired)}): {exc.message}; fix it (a "
                           "missing model file? a broken GPU?) and run the same command again to resume")

    def _give_up(self, task: PartitionTask, message: str) -> None:
        self.progress.note(f"partition {task.index} failed after {task.attempt} attempts: {message}")
        self.failed[task.index] = message
        rows = task.attempted_rows()
        error = f"partition: failed after {task.attempt} attempts: {message}"
        doc = {"error": message, "attempts": task.attempt, "rows": len(task.rows), "time": now()}
        if task.retry_ids is None:
            name = attempt_name(task.index, new_token())
            doc["part"] = self.store.write_part(name, failed_partition_table(self.pipeline.outputs, task, error))
        else:  # a --retry-errors pass that failed: the partition's earlier rows still stand
            doc["part"] = self.store.part_file(task.index)
        self.part_files[task.index] = doc["part"]
        self.part_info[task.index] = origin(doc)
        self.store.mark_failed(task.index, doc)
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
                with self.store.writing("writing the manifest"):
                    self.writer.add(self.store.read_part_file(self.part_files[self.next_out]),
                                    self.part_info.get(self.next_out))
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
            "rows_hashes": self.hashes,
            "manifest": {"url": self.manifest.url, "format": self.manifest.format, "rows": self.manifest.n_rows,
                         "limit": self.manifest.limit, "columns": self.manifest.columns},
            "options": {"batch_size": self.opts.batch_size, "decode_threads": self.opts.decode_threads,
                        "retries": self.opts.retries, "retry_delay": self.opts.retry_delay,
                        "max_error_rate": self.opts.max_error_rate, "workers": self.opts.workers,
                        "threads_per_worker": self.opts.threads_per_worker,
                        "workers_per_gpu": self.opts.workers_per_gpu},
            "workers_fit": getattr(self, "workers_fit", None),
            "tuning": self.opts.tuning,
            "cluster": {"spec": self.opts.cluster if isinstance(self.opts.cluster, str) else "client",
                        "scheduler": self.client.scheduler.address if self.client.scheduler else None, **workers},
            "versions": versions(),
            "argv": sys.argv,
        }

    def _finish(self, run_doc: dict[str, Any], t0: float) -> dict[str, int]:
        """Assemble the final manifest (failed partitions' rows included, as errors), collect the files
        no marker references, and write run.json."""
        with self.store.writing("writing the manifest"):
            if self.streaming and self.next_out == self.n_partitions:
                counts = self.writer.commit()
            else:
                self.writer.abort()
                files = [self.part_files[i] for i in range(self.n_partitions)]
                counts = self.store.assemble(files, csv=self.manifest.format == "csv",
                                             infos=[self.part_info.get(i) for i in range(self.n_partitions)])
        garbage = self.store.collect_garbage()
        seconds = time.perf_counter() - t0
        rows = counts.get("rows", 0)
        run_doc.update(
            state="incomplete" if self.failed else "complete", finished=now(), seconds=round(seconds, 3),
            counts={**counts, "partitions": self.n_partitions, "computed_partitions": len(self.computed),
                    "skipped_partitions": len(self.skipped), "failed_partitions": len(self.failed)},
            error_rate=round(counts.get("error", 0) / rows, 6) if rows else 0.0,
            failed_partitions={str(k): v for k, v in self.failed.items()},
            failed_attempts=self.failed_attempts,
            retired_workers=self.retired,
            garbage={"attempts": len(garbage["attempts"]), "bytes": garbage["bytes"]},
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

    def _check_error_rate(self, result: RunResult) -> None:
        """Exit 3 (:class:`TooManyRowErrors`) when more rows failed than ``max_error_rate`` allows."""
        rows, errors = result.counts.get("rows", 0), result.counts.get("error", 0)
        if not rows or errors / rows <= self.opts.max_error_rate:
            return
        raise TooManyRowErrors(
            f"{errors:,} of {rows:,} rows failed ({errors / rows:.1%}), more than --max-error-rate "
            f"{self.opts.max_error_rate:g}; the manifest is written ({result.manifest_path}); the most common "
            f"errors: {self._common_errors()}. Fix the input (a wrong folder? a missing model?), or raise "
            "--max-error-rate if this many failures are expected", result)

    def _common_errors(self, n: int = 3) -> str:
        from collections import Counter

        counter: Counter[str] = Counter()
        try:
            with self.store.open(ERRORS_LOG) as fh:
                for failure in parse_log(fh.read(1 << 20).decode(errors="replace").splitlines()):
                    counter[f"{failure.op}: {failure.message.split(': /')[0].split(': ', 1)[0][:80]}"] += 1
        except OSError:
            return "(errors.log unreadable)"
        return "; ".join(f"{what} ({k:,} rows)" for what, k in counter.most_common(n)) or "(none logged)"
