"""Where a run executes. The only module that knows one GPU from eight or from a remote scheduler.

- ``local``: a ``dask_cuda.LocalCUDACluster`` with one worker per GPU (each declaring the resource
  ``GPU=1``) when CUDA GPUs are present, else a ``distributed.LocalCluster`` of worker processes;
- ``tcp://host:port`` (or any scheduler address): join a running scheduler;
- ``slurm`` or ``slurm:PROFILE``: a dask-jobqueue ``SLURMCluster`` (``--workers`` counts jobs), from the
  Dask config's ``jobqueue`` settings, kept at strength as jobs end;
- a ``Client`` passed in by the caller (Jupyter): used as it is, never closed by daskmv.

:func:`connect` hands back a plain ``distributed.Client``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

import dask
from distributed import Client, LocalCluster

from daskmv.errors import RunError, UsageError

log = logging.getLogger("daskmv")

SCHEDULER_SCHEMES = ("tcp://", "tls://", "ucx://", "inproc://", "ws://", "wss://")


def gpu_count() -> int:
    """CUDA GPUs visible to this process (0 without an NVIDIA driver; never raises)."""
    if os.environ.get("DASKMV_GPUS") is not None:
        return int(os.environ["DASKMV_GPUS"])
    if not (os.path.exists("/proc/driver/nvidia") or os.path.exists("/dev/nvidia0")):
        return 0
    try:
        import torch

        return int(torch.cuda.device_count())
    except Exception:  # a broken driver or CUDA build: treat as no GPU
        return 0


def _dashboard_address(preferred: int = 8787) -> str:
    with socket.socket() as sock:
        try:
            sock.bind(("", preferred))
        except OSError:
            return ":0"
    return f":{preferred}"


#: glibc settings for worker processes. Distributed's default (trim the heap above 64 KB) makes every
#: partition's large output buffers fault in fresh pages: 1.75 M page faults and 20 CPU-s for 20,000
#: images, against 0.15 M and 15 CPU-s with these (benchmarks/engine.py). Memory stays with the
#: worker for its next partition instead of going back to the OS.
WORKER_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": 1 << 30, "MALLOC_TRIM_THRESHOLD_": 1 << 30}


#: Dask settings for the workers daskmv starts. The statistical profiler samples every worker thread's
#: stack 100 times a second; on CPU-bound image work it cost about 10 % of the throughput
#: (benchmarks/engine.py). Turn it back on with DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=True.
WORKER_CONFIG = {"distributed.worker.profile.enabled": os.environ.get(
    "DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED", "False").lower() in ("1", "true", "yes")}


def local_cluster(workers: int | None = None, threads_per_worker: int = 1, **kwargs: Any) -> Any:
    """LocalCUDACluster (one worker per GPU) when GPUs are present, else a LocalCluster of processes."""
    kwargs.setdefault("dashboard_address", _dashboard_address())
    # Worker processes log only CRITICAL: the driver reports every failed partition (tracebacks are kept in
    # run.json), and what is left at ERROR is teardown noise, such as a heartbeat to a scheduler that just
    # closed after a failed run, printed as a traceback. Pass silence_logs= to see more.
    kwargs.setdefault("silence_logs", logging.CRITICAL)
    settings = {f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in WORKER_MALLOC_ENV.items()}
    settings.update(WORKER_CONFIG)
    with dask.config.set(settings):
        return _start_local(workers, threads_per_worker, **kwargs)


def _start_local(workers: int | None, threads_per_worker: int, **kwargs: Any) -> Any:
    n_gpus = gpu_count()
    if n_gpus:
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError as exc:
            log.warning("found %d GPU(s) but cannot import dask_cuda (%s); pip install 'daskmv[gpu]'. "
                        "Using a LocalCluster of CPU workers.", n_gpus, exc)
        else:
            return LocalCUDACluster(n_workers=workers or n_gpus, threads_per_worker=threads_per_worker,
                                    resources={"GPU": 1}, **kwargs)
    return LocalCluster(n_workers=workers or os.cpu_count() or 1, threads_per_worker=threads_per_worker,
                        processes=True, **kwargs)


@contextlib.contextmanager
def connect(
    cluster: str | Client | None = "local",
    *,
    workers: int | None = None,
    threads_per_worker: int = 1,
    note: Callable[[str], None] = log.info,
    **cluster_kwargs: Any,
) -> Iterator[Client]:
    """A Client for ``cluster``; closes what it started on exit, never a caller's client."""
    if isinstance(cluster, Client):
        note(f"using the given client; dashboard: {cluster.dashboard_link}")
        yield cluster
        return
    cluster = cluster or "local"
    if cluster == "local":
        with local_cluster(workers, threads_per_worker, **cluster_kwargs) as lc, Client(lc) as client:
            note(f"started {type(lc).__name__} with {len(lc.workers)} worker(s); dashboard: {client.dashboard_link}")
            yield client
        return
    if cluster == "slurm" or cluster.startswith("slurm:"):
        profile = cluster.partition(":")[2] or None
        with slurm(profile, jobs=workers, **cluster_kwargs) as sc, Client(sc) as client:
            note(f"SLURM cluster{' ' + profile if profile else ''}: jobs submitted; dashboard: "
                 f"{client.dashboard_link}; waiting for the first worker (squeue shows the jobs)")
            client.wait_for_workers(1, timeout=SLURM_START_TIMEOUT)
            yield client
        return
    if cluster.startswith(SCHEDULER_SCHEMES):
        try:
            client = Client(cluster, timeout="20s")
        except (OSError, TimeoutError) as exc:
            raise RunError(f"cannot reach the Dask scheduler at {cluster}: {exc}") from None
        with client:
            note(f"connected to {cluster}; dashboard: {client.dashboard_link}")
            yield client
        return
    raise UsageError(f"unknown --cluster {cluster!r}: use 'local', 'slurm', 'slurm:PROFILE' or a scheduler "
                     "address such as tcp://host:8786")


#: How long to wait for the first SLURM job to start before giving up (seconds).
SLURM_START_TIMEOUT = float(os.environ.get("DASKMV_SLURM_START_TIMEOUT", 1800))


def slurm(profile: str | None = None, jobs: int | None = None, minimum_jobs: int | None = None,
                  maximum_jobs: int | None = None, **job_kwargs: Any) -> Any:
    """A dask-jobqueue ``SLURMCluster`` kept at ``jobs`` jobs (or adaptive between min and max).

    ``profile`` names a ``jobqueue.<profile>`` block of the Dask config (see deploy/slurm/jobqueue.yaml);
    ``job_kwargs`` override its keys (cores, memory, processes, queue, account, walltime,
    job_extra_directives, worker_extra_args, interface, scheduler_options, ...). daskmv invents no SLURM
    setting of its own. Jobs that end (walltime, scancel, node failure) are replaced by the adaptive
    scaler, so a run outlives its workers; finished partitions stay finished.
    """
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise UsageError("--cluster slurm needs dask-jobqueue: pip install 'daskmv[slurm]'") from None
    try:
        cluster = SLURMCluster(config_name=profile, **job_kwargs) if profile else SLURMCluster(**job_kwargs)
    except KeyError:
        raise UsageError(f"--cluster slurm:{profile}: no jobqueue profile {profile!r} in the Dask config; copy "
                         "deploy/slurm/jobqueue.yaml into ~/.config/dask/ (or $DASK_CONFIG) and edit it") from None
    except ValueError as exc:  # a missing cores/memory: dask-jobqueue's message shows the corrected call
        raise UsageError(f"--cluster slurm{':' + profile if profile else ''}: {exc}") from None
    low = minimum_jobs if minimum_jobs is not None else (jobs or 1)
    high = maximum_jobs if maximum_jobs is not None else max(low, jobs or 1)
    cluster.adapt(minimum_jobs=low, maximum_jobs=high)
    return cluster


def worker_summary(client: Client) -> dict[str, Any]:
    """Worker count, threads and how many declare a GPU resource, from the scheduler."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    return {
        "workers": len(workers),
        "threads": sum(int(w.get("nthreads", 1)) for w in workers.values()),
        "gpu_workers": sum(1 for w in workers.values() if w.get("resources", {}).get("GPU", 0) >= 1),
    }
