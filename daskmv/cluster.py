"""Where a run executes. The only module that knows one GPU from eight or from a remote scheduler.

- ``local``: a ``dask_cuda.LocalCUDACluster`` with one worker per GPU (each declaring the resource
  ``GPU=1``) when CUDA GPUs are present, else a ``distributed.LocalCluster`` of worker processes;
- ``tcp://host:port`` (or any scheduler address): join a running scheduler;
- ``slurm`` or ``slurm:PROFILE``: a dask-jobqueue ``SLURMCluster`` (``--workers`` counts jobs), from the
  Dask config's ``jobqueue`` settings, kept at strength as jobs end; where neither the profile nor the
  call sets ``cores``/``memory``, one job is the partition's smallest node, as ``sinfo`` reports it;
- a ``Client`` passed in by the caller (Jupyter): used as it is, never closed by daskmv.

:func:`connect` hands back a plain ``distributed.Client``.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
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
    if not nvidia_driver():
        return 0
    try:
        import torch

        return int(torch.cuda.device_count())
    except Exception:  # a broken driver or CUDA build: treat as no GPU
        return 0


def nvidia_driver() -> bool:
    """Whether an NVIDIA driver is here (Linux, or WSL's GPU device): without one CUDA cannot run, and torch
    (1-2 s to import) need not be asked."""
    return any(os.path.exists(p) for p in ("/proc/driver/nvidia", "/dev/nvidia0", "/dev/dxg"))


def cpu_count(env: Mapping[str, str] | None = None) -> int:
    """The cores this process may use: ``dask.system.CPU_COUNT`` (the machine, CPU affinity and the cgroup
    quota), and no more than the SLURM allocation on this node when run inside a SLURM job (which binds
    no cores where the site runs SLURM without a task/affinity or cgroup plugin)."""
    env = os.environ if env is None else env
    count = int(dask.system.CPU_COUNT)
    for key in ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE"):
        value = env.get(key, "")
        if value.isdigit() and int(value) > 0:
            return max(1, min(count, int(value)))
    return max(1, count)


#: A worker's GPU, set by hand: an index into the devices the worker sees (``cuda:<DASKMV_GPU>``).
GPU_ENV = "DASKMV_GPU"
_NAME_INDEX = re.compile(r"-(\d+)$")


def worker_gpu(n_devices: int, env: Mapping[str, str], name: Any = None, dask_cuda: bool = False,
               host_workers: Sequence[str] = (), address: str | None = None) -> int | None:
    """Which of the ``n_devices`` CUDA devices a worker process should use (None: no GPU, run on CPU).

    The rule, first match wins (README, "Clusters"; deploy/multinode.md):

    1. ``DASKMV_GPU=<i>`` in the worker's environment: device ``i``;
    2. one visible device (``CUDA_VISIBLE_DEVICES`` pinned to one GPU, SLURM ``--gres=gpu:1``): device 0;
    3. a dask-cuda worker (``LocalCUDACluster``, ``dask cuda worker``): device 0, which dask-cuda's
       ``CUDA_VISIBLE_DEVICES`` makes the worker's own GPU;
    4. a local rank: ``LOCAL_RANK``, or ``SLURM_LOCALID`` in a worker that ``srun`` started as one task
       of a step (``SLURM_STEP_ID`` set; a batch script's workers all have ``SLURM_LOCALID=0``);
    5. a worker name ending in ``-<k>``: ``dask worker --nworkers N --name X`` names its workers X-0 ..
       X-(N-1), and dask-jobqueue jobs with ``processes`` > 1 do the same;
    6. the worker's position among the workers on its host (their addresses, sorted), ``host_workers``;

    taken modulo ``n_devices`` in 4-6. Nothing known (a process that is not a worker): device 0.
    """
    if n_devices <= 0:
        return None
    chosen = env.get(GPU_ENV, "").strip()
    if chosen:
        if not chosen.isdigit() or int(chosen) >= n_devices:
            raise ValueError(f"{GPU_ENV}={chosen!r}: this worker sees {n_devices} CUDA device(s) (0-{n_devices - 1})")
        return int(chosen)
    if n_devices == 1 or dask_cuda:
        return 0
    for key in ("LOCAL_RANK", "SLURM_LOCALID"):
        rank = env.get(key, "").strip()
        if rank.isdigit() and (key != "SLURM_LOCALID" or env.get("SLURM_STEP_ID")):
            return int(rank) % n_devices
    found = _NAME_INDEX.search(str(name)) if name is not None else None
    if found:
        return int(found.group(1)) % n_devices
    if address is not None and address in host_workers:
        return sorted(host_workers).index(address) % n_devices
    return 0


def worker_device() -> str:
    """The torch device for GPU ops in this process: ``cuda:<i>`` by :func:`worker_gpu`, or ``cpu``.

    With no NVIDIA driver the answer is ``cpu`` without importing torch: ops that never touch it (SIFT,
    VLAD, the reconstruction) then start 1-2 s sooner in every worker."""
    if not nvidia_driver() and "torch" not in sys.modules:
        return "cpu"
    try:
        import torch

        if not torch.cuda.is_available():
            return "cpu"
        n_devices = int(torch.cuda.device_count())
    except ImportError:
        return "cpu"
    name, address, dask_cuda, peers = None, None, False, ()
    try:
        from distributed import get_worker

        worker = get_worker()
    except ValueError:  # not inside a Dask worker: the default device
        worker = None
    if worker is not None:
        name, address = worker.name, worker.address
        if address in _WORKER_DEVICES:  # chosen once per worker: its models stay on one device
            return _WORKER_DEVICES[address]
        dask_cuda = any(type(p).__module__.startswith("dask_cuda") for p in worker.plugins.values())
        if n_devices > 1 and not dask_cuda:
            peers = _host_workers(worker)
    index = worker_gpu(n_devices, os.environ, name, dask_cuda, peers, address)
    device = "cpu" if index is None else f"cuda:{index}"
    if address is not None:
        _WORKER_DEVICES[address] = device
    return device


_WORKER_DEVICES: dict[str, str] = {}


def _host_workers(worker: Any) -> list[str]:
    """Addresses of the workers on this worker's host that declare a GPU as this one does (or not)."""
    try:
        from distributed import get_client

        workers = get_client().scheduler_info(n_workers=-1)["workers"]
    except Exception:  # no scheduler to ask: no position
        return []
    gpu = bool(worker.state.total_resources.get("GPU"))
    return [addr for addr, info in workers.items() if info.get("host") == worker.ip
            and bool(info.get("resources", {}).get("GPU")) == gpu]


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
#: worker for its next partition instead of going back to the OS. One malloc arena for all of a worker's
#: threads: images decoded on the loader threads and freed on the task's thread otherwise stay in a second
#: arena, 13 MB more per worker of the peer benchmark (640x480), for the same CPU time.
WORKER_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": 1 << 30, "MALLOC_TRIM_THRESHOLD_": 1 << 30, "MALLOC_ARENA_MAX": 1}


#: Dask settings for the workers daskmv starts. The statistical profiler samples every worker thread's
#: stack 100 times a second; on CPU-bound image work it cost about 10 % of the throughput
#: (benchmarks/engine.py). Turn it back on with DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=True.
WORKER_CONFIG = {"distributed.worker.profile.enabled": os.environ.get(
    "DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED", "False").lower() in ("1", "true", "yes")}


def local_cluster(workers: int | None = None, threads_per_worker: int = 1, workers_per_gpu: int | str | None = None,
                  **kwargs: Any) -> Any:
    """LocalCUDACluster (one worker per GPU) when GPUs are present, else a LocalCluster of processes; with
    ``workers_per_gpu`` N > 1 (or ``auto``, which starts at one and grows, see :mod:`daskmv.fit`), a
    :class:`SharedGPUCluster` of N worker processes per GPU."""
    kwargs.setdefault("dashboard_address", _dashboard_address())
    # Worker processes log only CRITICAL: the driver reports every failed partition (tracebacks are kept in
    # run.json), and what is left at ERROR is teardown noise, such as a heartbeat to a scheduler that just
    # closed after a failed run, printed as a traceback. Pass silence_logs= to see more.
    kwargs.setdefault("silence_logs", logging.CRITICAL)
    settings = {f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in WORKER_MALLOC_ENV.items()}
    settings.update(WORKER_CONFIG)
    if start_fork_server():
        settings["distributed.worker.multiprocessing-method"] = "forkserver"
        # A forked worker inherits the fork server's environment, as it was when the server started: give it
        # this process's environment as it is now (a notebook that sets DASKMV_MODEL_DIR after a first run).
        # Variables removed since then stay removed only from this process.
        kwargs.setdefault("env", {k: v for k, v in os.environ.items() if k not in WORKER_MALLOC_ENV})
    with dask.config.set(settings):
        return _start_local(workers, threads_per_worker, workers_per_gpu, **kwargs)


def start_fork_server(preload: Sequence[str] = ()) -> bool:
    """Start the fork server local workers are forked from (see :mod:`daskmv.worker_preload`); True if it runs.

    A run calls this before it reads the manifest, so that the server's imports overlap the driver's work.
    It is started once per driver process, with :data:`WORKER_MALLOC_ENV` in its environment (the workers it
    forks inherit its malloc settings), and lives until the driver exits, so later clusters of the same
    process start their workers at once. A fork server already started by other code is used as it is.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods() or gpu_count():
        return False
    from multiprocessing import forkserver

    # read only when the server starts: a later run's modules are imported by its workers themselves
    forkserver.set_forkserver_preload(["daskmv.worker_preload", *preload])
    saved = {k: os.environ.get(k) for k in WORKER_MALLOC_ENV}
    os.environ.update({k: str(v) for k, v in WORKER_MALLOC_ENV.items()})
    try:
        forkserver.ensure_running()  # nothing to do when it runs already
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return True


def _start_local(workers: int | None, threads_per_worker: int, workers_per_gpu: int | str | None = None,
                 **kwargs: Any) -> Any:
    n_gpus = gpu_count()
    if n_gpus and workers_per_gpu is not None and (workers_per_gpu == "auto" or int(workers_per_gpu) > 1):
        per_gpu = 1 if workers_per_gpu == "auto" else int(workers_per_gpu)
        return SharedGPUCluster(n_gpus, workers or n_gpus * per_gpu, threads_per_worker=threads_per_worker, **kwargs)
    if n_gpus:
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError as exc:
            log.warning("found %d GPU(s) but cannot import dask_cuda (%s); pip install 'daskmv[gpu]'. "
                        "Using a LocalCluster of CPU workers.", n_gpus, exc)
        else:
            return LocalCUDACluster(n_workers=workers or n_gpus, threads_per_worker=threads_per_worker,
                                    resources={"GPU": 1}, **kwargs)
    return LocalCluster(n_workers=workers or cpu_count(), threads_per_worker=threads_per_worker,
                        processes=True, **kwargs)


class SharedGPUCluster(LocalCluster):
    """Worker processes that share GPUs: each new worker goes to the GPU with the fewest (``DASKMV_GPU`` in its
    environment) and declares the resource ``GPU=1``, so every worker takes GPU tasks. It grows and shrinks
    with :meth:`scale` like any LocalCluster (dask-cuda's LocalCUDACluster puts every worker beyond the first
    per GPU on GPU 0); several processes on one device overlap one's host work with another's kernels."""

    def __init__(self, n_gpus: int, n_workers: int, threads_per_worker: int = 1, **kwargs: Any) -> None:
        self.n_gpus = n_gpus
        super().__init__(n_workers=0, threads_per_worker=threads_per_worker, processes=True,
                         resources={"GPU": 1}, **kwargs)
        self.scale(n_workers)

    def new_worker_spec(self) -> dict[Any, dict[str, Any]]:
        import copy

        (name, spec), = super().new_worker_spec().items()
        spec = copy.deepcopy(spec)
        held = [int(w["options"].get("env", {}).get(GPU_ENV, -1)) for w in self.worker_spec.values()]
        gpu = min(range(self.n_gpus), key=lambda g: (held.count(g), g))
        spec["options"]["env"] = {**(spec["options"].get("env") or {}), GPU_ENV: str(gpu)}
        return {name: spec}

    def workers_per_gpu(self) -> dict[int, int]:
        """How many workers each GPU has in the cluster's plan."""
        held = [int(w["options"]["env"][GPU_ENV]) for w in self.worker_spec.values()]
        return {g: held.count(g) for g in range(self.n_gpus)}


@contextlib.contextmanager
def connect(
    cluster: str | Client | None = "local",
    *,
    workers: int | None = None,
    threads_per_worker: int = 1,
    workers_per_gpu: int | str | None = None,
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
        if workers_per_gpu is not None and not gpu_count():
            note(f"note: --workers-per-gpu {workers_per_gpu} has no effect without GPUs (use --workers and "
                 "--threads-per-worker)")
            workers_per_gpu = None
        with local_cluster(workers, threads_per_worker, workers_per_gpu, **cluster_kwargs) as lc, Client(lc) as client:
            if isinstance(lc, SharedGPUCluster):
                client.wait_for_workers(len(lc.worker_spec), timeout=120)
                note(f"started {len(lc.worker_spec)} worker(s) on {lc.n_gpus} GPU(s) ({lc.workers_per_gpu()} per GPU); "
                     f"dashboard: {client.dashboard_link}")
            else:
                note(f"started {type(lc).__name__} with {len(lc.workers)} worker(s); dashboard: {client.dashboard_link}")
            yield client
        return
    if cluster == "slurm" or cluster.startswith("slurm:"):
        profile = cluster.partition(":")[2] or None
        with slurm(profile, jobs=workers, note=note, **cluster_kwargs) as sc, Client(sc) as client:
            note(f"SLURM cluster{' ' + profile if profile else ''}: jobs submitted; dashboard: "
                 f"{client.dashboard_link}; waiting for the first worker (squeue shows the jobs)")
            try:
                client.wait_for_workers(1, timeout=SLURM_START_TIMEOUT)
            except TimeoutError:
                raise RunError(f"no SLURM job started a worker within {SLURM_START_TIMEOUT:.0f} s (squeue shows why "
                               "the jobs wait: partition, resources, limits); set DASKMV_SLURM_START_TIMEOUT to wait "
                               "longer, or fix the profile") from None
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
                  maximum_jobs: int | None = None, note: Callable[[str], None] = log.info, **job_kwargs: Any) -> Any:
    """A dask-jobqueue ``SLURMCluster`` kept at ``jobs`` jobs (or adaptive between min and max).

    ``profile`` names a ``jobqueue.<profile>`` block of the Dask config (see deploy/slurm/jobqueue.yaml);
    ``job_kwargs`` override its keys (cores, memory, processes, queue, account, walltime,
    job_extra_directives, worker_extra_args, interface, scheduler_options, ...). Where neither sets
    ``cores`` or ``memory``, they come from ``sinfo``: the smallest node of the partition (``queue``, else
    SLURM's default partition), one worker process per core unless ``processes`` is set; ``note`` says what
    was chosen. Jobs that end (walltime, scancel, node failure) are replaced by the adaptive scaler, so a
    run outlives its workers; finished partitions stay finished.
    """
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise UsageError("--cluster slurm needs dask-jobqueue: pip install 'daskmv[slurm]'") from None
    job_kwargs.update(_node_size_from_sinfo(profile, job_kwargs, note))
    try:
        cluster = SLURMCluster(config_name=profile, **job_kwargs) if profile else SLURMCluster(**job_kwargs)
    except KeyError:
        raise UsageError(f"--cluster slurm:{profile}: no jobqueue profile {profile!r} in the Dask config; copy "
                         "deploy/slurm/jobqueue.yaml into ~/.config/dask/ (or $DASK_CONFIG) and edit it") from None
    except ValueError as exc:  # a missing cores/memory: dask-jobqueue's message shows the corrected call
        raise UsageError(f"--cluster slurm{':' + profile if profile else ''}: {exc}") from None
    refused = sbatch_refuses(cluster.job_script())
    if refused:
        cluster.close()
        raise UsageError(f"--cluster slurm{':' + profile if profile else ''}: SLURM refuses the worker job "
                         f"(sbatch --test-only: {refused}); fix the profile or --config cluster_kwargs")
    low = minimum_jobs if minimum_jobs is not None else (jobs or 1)
    high = maximum_jobs if maximum_jobs is not None else max(low, jobs or 1)
    cluster.adapt(minimum_jobs=low, maximum_jobs=high)
    return cluster


def sbatch_refuses(script: str) -> str | None:
    """SLURM's objection to a job script, from ``sbatch --test-only`` (None: it would be queued). A request
    no node can satisfy is refused here, in one line, instead of every job submission failing later."""
    if shutil.which("sbatch") is None:
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".sh", delete=False) as fh:
        fh.write(script)
    try:
        proc = subprocess.run(["sbatch", "--test-only", fh.name], capture_output=True, text=True, timeout=60)
    finally:
        os.unlink(fh.name)
    if proc.returncode == 0:
        return None
    lines = [line.removeprefix("sbatch: error: ").strip() for line in proc.stderr.splitlines() if line.strip()]
    return "; ".join(lines) or f"exit code {proc.returncode}"


def _node_size_from_sinfo(profile: str | None, job_kwargs: dict[str, Any],
                          note: Callable[[str], None]) -> dict[str, Any]:
    """``cores``/``memory`` (and ``processes``) for the keys that neither ``job_kwargs`` nor the profile set."""
    settings = dask.config.get(f"jobqueue.{profile or 'slurm'}", default=None)
    if not isinstance(settings, dict):
        return {}  # no such profile: SLURMCluster says so
    value = {key: job_kwargs[key] if key in job_kwargs else settings.get(key)
             for key in ("cores", "memory", "processes", "queue")}
    if value["cores"] is not None and value["memory"] is not None:
        return {}
    what = f"--cluster slurm{':' + profile if profile else ''}"
    partition = value["queue"] or default_partition()
    cores, memory_mb = node_size(partition)
    chosen: dict[str, Any] = {}
    if value["cores"] is None:
        chosen["cores"] = cores
        if value["processes"] is None:
            chosen["processes"] = cores  # one single-threaded worker per core, like --cluster local
    if value["memory"] is None:
        chosen["memory"] = slurm_memory(memory_mb)
    note(f"{what}: {', '.join(f'{k}={v}' for k, v in chosen.items())} per job, from sinfo (the smallest node "
         f"of partition {partition}); set cores/memory in the profile or --config cluster_kwargs to choose")
    return chosen


def _sinfo(*args: str) -> str:
    if shutil.which("sinfo") is None:
        raise UsageError("--cluster slurm: no cores/memory set and no sinfo to ask; set cores and memory in "
                         "the jobqueue profile or in --config cluster_kwargs (deploy/slurm/slurm-site.example.yaml)")
    proc = subprocess.run(["sinfo", "-h", *args], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise UsageError(f"--cluster slurm: sinfo {' '.join(args)} failed: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


def default_partition() -> str:
    """SLURM's default partition (the one ``sinfo`` marks with ``*``)."""
    names = _sinfo("-o", "%P").split()
    for name in names:
        if name.endswith("*"):
            return name[:-1]
    raise UsageError("--cluster slurm: SLURM has no default partition; name one (queue: in the profile or "
                     "--config cluster_kwargs)")


def node_size(partition: str) -> tuple[int, int]:
    """CPUs and memory (MB) of the smallest node of ``partition``, from ``sinfo``."""
    found = parse_node_sizes(_sinfo("-N", "-p", partition, "-o", "%c %m"))
    if found is None:
        raise UsageError(f"--cluster slurm: sinfo lists no node with CPUs and memory in partition {partition!r}; "
                         "set cores and memory in the jobqueue profile or in --config cluster_kwargs")
    return found


def parse_node_sizes(text: str) -> tuple[int, int] | None:
    """The smallest CPU count and the smallest memory (MB) in ``sinfo -o "%c %m"`` lines (None: no node)."""
    cpus, mems = [], []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 2:
            continue
        c, m = fields[0].rstrip("+"), fields[1].rstrip("+")
        if c.isdigit() and m.isdigit() and int(c) > 0 and int(m) > 0:
            cpus.append(int(c))
            mems.append(int(m))
    return (min(cpus), min(mems)) if cpus else None


def slurm_memory(megabytes: int) -> str:
    """A node's memory (SLURM's MB, i.e. MiB) as a Dask memory string, rounded down to whole GiB: dask-jobqueue
    rounds ``--mem`` up, and a job asking for more than a node's RealMemory never starts."""
    return f"{megabytes // 1024}GiB" if megabytes >= 1024 else f"{megabytes}MiB"


def worker_summary(client: Client) -> dict[str, Any]:
    """Worker count, threads and how many declare a GPU resource, from the scheduler."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    return {
        "workers": len(workers),
        "threads": sum(int(w.get("nthreads", 1)) for w in workers.values()),
        "gpu_workers": sum(1 for w in workers.values() if w.get("resources", {}).get("GPU", 0) >= 1),
    }
