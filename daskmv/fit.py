"""``--workers-per-gpu auto``: how many worker processes share each GPU, found on the run's own first rows.

What users did by hand, done before the run starts: start workers on each device one at a time while each new
one fits and adds throughput, and keep the count that survived.

1. The cluster starts with one worker per GPU (:class:`daskmv.cluster.SharedGPUCluster`). Each worker runs the
   pipeline over a few of the manifest's rows (:func:`daskmv.partition.probe_rows`: models loaded, nothing
   written), once to warm up and once to measure rows (or frames) per second over all workers together.
2. One more worker per GPU is started and warmed up. If it cannot set its ops up, or its rows run out of memory
   even one at a time (the model does not fit beside the others), it is shut down, never restarted, and the
   count before it is kept; otherwise throughput is measured again and the new workers stay only when they add
   at least :data:`MIN_GAIN`.
3. Repeat up to :data:`MAX_PER_GPU`. What was tried and why it stopped goes to the terminal and to run.json
   (``workers_fit``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import pyarrow as pa

from daskmv.partition import probe_rows

if TYPE_CHECKING:
    from distributed import Client

    from daskmv.cluster import SharedGPUCluster
    from daskmv.engine import RunOptions
    from daskmv.manifest import Manifest
    from daskmv.pipeline import Pipeline

#: The most workers auto puts on one GPU.
MAX_PER_GPU = 8
#: The throughput a new worker per GPU must add to stay (1.1: 10 % more).
MIN_GAIN = 1.10
#: Rows of the manifest each worker runs per probe.
PROBE_ROWS = 4
#: Seconds a probe may take on the sample rows.
PROBE_TIMEOUT = 900
#: Seconds a new worker may take to start.
START_TIMEOUT = 120


@dataclass
class FitResult:
    per_gpu: int
    gpus: int
    reason: str
    trials: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class DidNotFit(Exception):
    """A worker could not run the pipeline's rows: its set-up failed or they ran out of memory."""


def fit_workers(client: Client, cluster: SharedGPUCluster, manifest: Manifest, pipeline: Pipeline, opts: RunOptions,
                note: Callable[[str], None]) -> FitResult:
    """Grow ``cluster`` one worker per GPU at a time while each fits and adds throughput (see the module)."""
    from daskmv.partition import OpCache

    client.register_plugin(OpCache())  # the run's own cache (idempotent): the models the probes load stay loaded
    rows = _sample(manifest, PROBE_ROWS)
    probe = _Probe(client, pipeline, rows, manifest.base, opts)
    gpus = cluster.n_gpus
    per_gpu = max(1, len(cluster.worker_spec) // gpus)
    client.wait_for_workers(per_gpu * gpus, timeout=START_TIMEOUT)
    trials: list[dict[str, Any]] = []
    try:
        probe.run(probe.workers())  # warm-up: models load
        best = probe.rate(probe.workers())
    except DidNotFit as exc:
        return FitResult(per_gpu, gpus, f"the first worker per GPU does not fit: {exc}", trials)
    trials.append({"per_gpu": per_gpu, "items_per_second": round(best, 3), "kept": True})
    note(f"workers per GPU: {per_gpu} -> {best:,.1f} items/s")
    reason = f"reached the most auto tries ({MAX_PER_GPU} per GPU)"
    while per_gpu < MAX_PER_GPU:
        before = set(probe.workers())
        cluster.scale((per_gpu + 1) * gpus)
        try:
            client.wait_for_workers((per_gpu + 1) * gpus, timeout=START_TIMEOUT)
            new = sorted(set(probe.workers()) - before)
            probe.run(new)  # warm-up of the new ones: does the model fit beside the others?
            rate = probe.rate(probe.workers())
        except (DidNotFit, TimeoutError) as exc:
            cluster.scale(per_gpu * gpus)  # the newest workers go, and are not started again
            reason = f"worker {per_gpu + 1} per GPU did not fit ({exc}); it was shut down"
            trials.append({"per_gpu": per_gpu + 1, "items_per_second": None, "kept": False, "error": str(exc)[:300]})
            break
        gain = rate / best if best else float("inf")
        trials.append({"per_gpu": per_gpu + 1, "items_per_second": round(rate, 3), "kept": gain >= MIN_GAIN})
        note(f"workers per GPU: {per_gpu + 1} -> {rate:,.1f} items/s ({gain:.2f}x)")
        if gain < MIN_GAIN:
            cluster.scale(per_gpu * gpus)
            reason = f"worker {per_gpu + 1} per GPU added {100 * (gain - 1):+.0f} % throughput (< {100 * (MIN_GAIN - 1):.0f} %)"
            break
        per_gpu, best = per_gpu + 1, rate
    client.wait_for_workers(per_gpu * gpus, timeout=START_TIMEOUT)
    _wait_for_exactly(client, per_gpu * gpus)
    note(f"workers per GPU: keeping {per_gpu} ({reason})")
    return FitResult(per_gpu, gpus, reason, trials)


def _sample(manifest: Manifest, n: int) -> pa.Table:
    """The manifest's first ``n`` rows, with ids, as the engine's tasks carry them."""
    frame = next(iter(manifest.partitions(n)))
    return pa.Table.from_pandas(frame.reset_index(drop=True), preserve_index=False)


def _wait_for_exactly(client: Client, n: int, timeout: float = 60.0) -> None:
    """Wait until the workers shut down by a scale-down have left the scheduler."""
    deadline = time.monotonic() + timeout
    while len(client.scheduler_info(n_workers=-1)["workers"]) > n and time.monotonic() < deadline:
        time.sleep(0.1)


class _Probe:
    """The pipeline over the sample rows on chosen workers, all at once."""

    def __init__(self, client: Client, pipeline: Pipeline, rows: pa.Table, base: str, opts: RunOptions) -> None:
        self.client, self.rows, self.base, self.opts = client, rows, base, opts
        self.steps, self.fingerprint = pipeline.steps(), pipeline.fingerprint

    def workers(self) -> list[str]:
        return sorted(self.client.scheduler_info(n_workers=-1)["workers"])

    def run(self, workers: list[str]) -> list[dict[str, Any]]:
        futures = [self.client.submit(probe_rows, self.steps, self.fingerprint, self.rows, self.base,
                                      self.opts.batch_size, self.opts.decode_threads, self.opts.path_column,
                                      workers=[w], allow_other_workers=False, pure=False) for w in workers]
        try:
            self._wait(futures, workers)
        except DidNotFit:
            self.client.cancel(futures)
            raise
        results = []
        for future in futures:
            try:
                result = future.result()
            except Exception as exc:
                raise DidNotFit(f"{type(exc).__name__}: {exc}"[:300]) from None
            finally:
                future.release()
            memory = [e for e in result["errors"] if "out of memory" in e.lower()]
            if memory:
                raise DidNotFit(memory[0][:300])
            results.append(result)
        return results

    def _wait(self, futures: list[Any], workers: list[str]) -> None:
        """Wait for the probes; a worker that dies meanwhile (a process killed for memory, a CUDA abort) did
        not fit: its nanny starts a new process at another address, which the pinned probe would wait for
        forever."""
        from distributed import wait

        deadline = time.monotonic() + PROBE_TIMEOUT
        while True:
            try:
                wait(futures, timeout=1.0)
                return
            except TimeoutError:
                pass
            alive = set(self.workers())
            gone = [w for w, f in zip(workers, futures) if w not in alive and not f.done()]
            if gone:
                raise DidNotFit(f"worker {gone[0]} died while setting up and running the pipeline (out of memory?)")
            if time.monotonic() > deadline:
                raise DidNotFit(f"the probe of {len(futures)} worker(s) took more than {PROBE_TIMEOUT:.0f} s")

    def rate(self, workers: list[str]) -> float:
        """Items (rows, or a video pipeline's frames) per second over ``workers`` running together."""
        t = time.perf_counter()
        results = self.run(workers)
        seconds = time.perf_counter() - t
        return sum(r["items"] for r in results) / seconds if seconds > 0 else 0.0
