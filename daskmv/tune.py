"""``daskmv tune``: settings measured on a sample of the manifest, written as a ``--config`` file.

The tuner runs the pipeline on the manifest's first ``sample`` rows with the real engine, into a temporary
root (never a real output root), and measures items per second (rows, or a video pipeline's frames) and peak
memory (host: the worker processes' RSS, sampled; device: torch's peak per partition, from the markers):

1. **batch size** first: 1, 2, 4, ... doubling until a batch runs out of memory (the engine backs off, and the
   markers say so) or throughput stops rising by :data:`PLATEAU`;
2. then **workers**: on GPUs, worker processes per GPU 1, 2, 3, ...; on CPUs, worker processes 1, 2, 4, ... up
   to the cores, then threads per worker; each stops at a failure or a plateau;
3. every setting is run once to warm up (models load, caches fill) and once measured, on a cluster of its
   own size.

It prints the table, extrapolates the full manifest's time from the best row, and writes a YAML of run settings
whose values are the best row's (by items per second, among rows without out-of-memory) plus the table itself
under ``tuning`` (kept in run.json and charted in the report).
"""

from __future__ import annotations

import math
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from daskmv.errors import UsageError

#: A doubling must raise items per second by this factor to go on (1.05: 5 %).
PLATEAU = 1.05
#: The largest batch the tuner tries.
MAX_BATCH = 256


@dataclass
class Trial:
    batch_size: int
    workers: int
    threads_per_worker: int
    workers_per_gpu: int | None
    items: int = 0
    seconds: float = 0.0
    items_per_second: float = 0.0
    peak_host_mb: float | None = None
    peak_device_mb: float | None = None
    out_of_memory: bool = False
    errors: int = 0
    note: str = ""

    def settings(self) -> dict[str, Any]:
        """The run settings this row stands for (what the written config holds)."""
        settings: dict[str, Any] = {"batch_size": self.batch_size, "threads_per_worker": self.threads_per_worker}
        if self.workers_per_gpu is not None:
            settings["workers_per_gpu"] = self.workers_per_gpu
        else:
            settings["workers"] = self.workers
        return settings


@dataclass
class TuneResult:
    trials: list[Trial]
    best: Trial
    rows: int
    sample: int
    items_per_row: float
    gpus: int
    pipeline: str
    config: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def estimated_seconds(self) -> float:
        """The full manifest's time at the best row's speed."""
        items = self.rows * self.items_per_row
        return items / self.best.items_per_second if self.best.items_per_second else math.inf

    def table(self) -> list[dict[str, Any]]:
        return [asdict(t) for t in self.trials]


def tune(manifest: str, pipeline: str, sample: int = 8, max_batch: int = MAX_BATCH, max_workers: int | None = None,
         config: str | None = None, note: Callable[[str], None] = print, **options: Any) -> TuneResult:
    """Measure settings on ``sample`` rows of ``manifest`` (see the module); write ``config`` when given."""
    from daskmv.cluster import cpu_count, gpu_count
    from daskmv.manifest import read_manifest
    from daskmv.pipeline import Plan

    if sample < 1:
        raise UsageError(f"--sample {sample}: must be at least 1")
    if max_batch < 1:
        raise UsageError(f"--max-batch {max_batch}: must be at least 1")
    plan = Plan.parse(pipeline)  # a bad pipeline fails here, before any cluster starts
    rows = read_manifest(manifest, path_column=options.get("path_column") or "path", id_column=options.get("id_column"),
                         storage_options=options.get("storage_options") or {}, check=True).n_rows
    gpus = gpu_count()
    cores = cpu_count()
    scratch = Path(tempfile.mkdtemp(prefix="daskmv-tune-"))
    frames = any(op.frame_source for stage in plan.stages for op in stage.ops)
    runner = _Trials(manifest, pipeline, sample, scratch, options, note, frames)
    try:
        start = Trial(batch_size=1, workers=gpus or min(cores, sample), threads_per_worker=1,
                      workers_per_gpu=1 if gpus else None)
        trials = _search_batch(runner, start, max_batch)
        best = _best(trials)
        if gpus:  # several processes per GPU, or several threads in one: whichever measures better
            trials += _search(runner, best, "workers_per_gpu", [k for k in range(2, 9)], max_workers)
            trials += _search(runner, _best(trials), "threads_per_worker", [2, 4], None)
        else:
            counts = [w for w in (1, 2, 4, 8, 16, 32, 64) if w <= min(cores, max_workers or cores, sample)
                      and w != best.workers]
            trials += _search(runner, best, "workers", sorted(counts), None)
            best = _best(trials)
            if best.workers < cores:
                trials += _search(runner, best, "threads_per_worker", [2, 4], None)
        best = _best(trials)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    per_row = best.items / max(1, sample - best.errors) if best.items else 1.0
    result = TuneResult(trials, best, rows, sample, per_row, gpus, str(pipeline), config)
    if config:
        write_config(result, config)
    return result


def _best(trials: list[Trial]) -> Trial:
    usable = [t for t in trials if not t.out_of_memory and t.items]
    if not usable:
        raise UsageError("no setting ran the sample without out-of-memory or errors: see the table; check the "
                         "pipeline on the sample with daskmv run --limit first")
    return max(usable, key=lambda t: t.items_per_second)


def _search_batch(runner: _Trials, start: Trial, max_batch: int) -> list[Trial]:
    """Batch sizes 1, 2, 4, ... until out of memory or a plateau."""
    trials: list[Trial] = []
    size = 1
    with runner.cluster(start) as client:
        while size <= max_batch:
            candidate = Trial(**{**asdict(start), "batch_size": size})
            if not runner.batch_fits_sample(candidate):
                if trials:
                    trials[-1].note = f"larger batches need a larger --sample (partitions of {runner.partition_rows(candidate)} rows)"
                break
            trial = runner.measure(client, candidate)
            trials.append(trial)
            if trial.out_of_memory:
                trial.note = "out of memory: the engine backed off"
                break
            best = max((t.items_per_second for t in trials[:-1] if not t.out_of_memory), default=0.0)
            if best and trial.items_per_second < best * PLATEAU:
                trial.note = "plateau"
                break
            size *= 2
    return trials


def _search(runner: _Trials, base: Trial, key: str, values: list[int], limit: int | None) -> list[Trial]:
    """``key`` through ``values`` (ascending) from the best row so far, until a failure or a plateau."""
    trials: list[Trial] = []
    best = base.items_per_second
    for value in values:
        if limit is not None and value > limit:
            break
        candidate = Trial(**{**asdict(base), key: value, "note": "", "out_of_memory": False})
        if key == "workers_per_gpu":
            candidate.workers = base.workers // max(1, base.workers_per_gpu or 1) * value
        try:
            with runner.cluster(candidate) as client:
                trial = runner.measure(client, candidate)
        except Exception as exc:  # a worker that cannot start or set up: the count before it stands
            candidate.note = f"failed: {type(exc).__name__}: {exc}"[:200]
            candidate.out_of_memory = "memory" in str(exc).lower()
            trials.append(candidate)
            break
        trials.append(trial)
        if trial.out_of_memory or trial.items_per_second < best * PLATEAU:
            trial.note = trial.note or ("out of memory" if trial.out_of_memory else "plateau")
            break
        best = trial.items_per_second
    return trials


class _Trials:
    """Runs one setting: a warm-up run, then a measured one, on the sample, into scratch roots."""

    def __init__(self, manifest: str, pipeline: str, sample: int, scratch: Path, options: dict[str, Any],
                 note: Callable[[str], None], frames: bool) -> None:
        self.manifest, self.pipeline, self.sample, self.scratch = manifest, pipeline, sample, scratch
        self.options, self.note, self.count = options, note, 0
        self.frames = frames  # a video pipeline: its batches are frames, not rows of the sample

    def partition_rows(self, trial: Trial) -> int:
        """The sample split evenly over the workers (a batch never spans partitions)."""
        return max(1, math.ceil(self.sample / max(1, trial.workers)))

    def batch_fits_sample(self, trial: Trial) -> bool:
        """Whether a partition of the sample holds a whole batch (a video's frames always can)."""
        return self.frames or trial.batch_size <= self.partition_rows(trial)

    def cluster(self, trial: Trial) -> Any:
        from daskmv.cluster import connect

        return connect(self.options.get("cluster") or "local", workers=trial.workers,
                       threads_per_worker=trial.threads_per_worker, workers_per_gpu=trial.workers_per_gpu,
                       note=lambda _: None, **(self.options.get("cluster_kwargs") or {}))

    def measure(self, client: Any, trial: Trial) -> Trial:
        from daskmv.engine import run

        settings = dict(batch_size=trial.batch_size, limit=self.sample, progress="none", overwrite=True,
                        max_error_rate=1.0, partition_rows=self.partition_rows(trial),
                        **{k: v for k, v in self.options.items() if k not in ("cluster", "cluster_kwargs")})
        self.count += 1
        root = self.scratch / f"trial-{self.count}"
        run(self.manifest, self.pipeline, str(root / "warm"), client=client, **settings)
        with _HostPeak(client) as peak:
            t = time.perf_counter()
            result = run(self.manifest, self.pipeline, str(root / "run"), client=client, **settings)
            trial.seconds = round(time.perf_counter() - t, 3)
        trial.peak_host_mb = round(peak.bytes / 1e6, 1) if peak.bytes else None
        markers = _markers(result)
        # a worker remembers a batch that did not fit (its limit): the warm-up may have met it first
        trial.out_of_memory = any(m.get("oom_backoffs") or any(v < trial.batch_size for v in
                                                               (m.get("batch_limits") or {}).values())
                                  for m in markers)
        device = [m.get("peak_device_bytes") for m in markers if m.get("peak_device_bytes")]
        trial.peak_device_mb = round(max(device) / 1e6, 1) if device else None
        trial.items, trial.errors = _items(result)
        trial.items_per_second = round(trial.items / trial.seconds, 3) if trial.seconds else 0.0
        self.note(f"batch {trial.batch_size}, {trial.workers} worker(s)"
                  f"{f' ({trial.workers_per_gpu} per GPU)' if trial.workers_per_gpu else ''} x "
                  f"{trial.threads_per_worker} thread(s): {trial.items_per_second:,.1f} items/s"
                  f"{', out of memory' if trial.out_of_memory else ''}")
        shutil.rmtree(root, ignore_errors=True)
        return trial


def _markers(result: Any) -> list[dict[str, Any]]:
    import json

    folders = [Path(s.out) for s in result.stages] or [Path(result.out)]
    return [json.loads(p.read_text()) for folder in folders for p in (folder / "parts").glob("p*.json")]


def _items(result: Any) -> tuple[int, int]:
    """Items done (a video pipeline's frames, else ok rows) and row errors."""
    frame = result.manifest()
    ok = frame["status"] == "ok"
    errors = int((~ok).sum())
    if "n_frames" in frame.columns and "video_id" not in frame.columns:
        return int(frame.loc[ok, "n_frames"].sum()), errors
    return int(ok.sum()), errors


class _HostPeak:
    """The most memory the cluster's worker processes held together while a trial ran (RSS, every 0.1 s)."""

    def __init__(self, client: Any) -> None:
        self.client, self.bytes = client, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _pids(self) -> list[int]:
        import os

        return [int(pid) for pid in self.client.run(os.getpid).values()]

    def _sample(self) -> None:
        import psutil

        try:
            processes = [psutil.Process(pid) for pid in self._pids()]
        except Exception:  # workers on other hosts: no host peak
            return
        while not self._stop.is_set():
            total = 0
            for process in processes:
                try:
                    total += process.memory_info().rss
                except psutil.Error:
                    pass
            self.bytes = max(self.bytes, total)
            self._stop.wait(0.1)

    def __enter__(self) -> _HostPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def write_config(result: TuneResult, path: str) -> str:
    """The best row's settings as a ``daskmv run --config`` file, with the table under ``tuning``."""
    doc: dict[str, Any] = {"pipeline": result.pipeline, **result.best.settings(),
                           "tuning": {"sample": result.sample, "best": result.best.settings(),
                                      "items_per_second": result.best.items_per_second,
                                      "estimated_seconds": round(result.estimated_seconds, 1),
                                      "table": result.table()}}
    Path(path).write_text("# written by daskmv tune: the best row of its table (run with daskmv run --config)\n"
                          + yaml.safe_dump(doc, sort_keys=False))
    return path
