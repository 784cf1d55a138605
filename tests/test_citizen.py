"""daskmv in someone else's process: importing it (or running it) leaves their settings alone.

Each side-effect test runs a fresh Python, as a user's notebook or script would be: what daskmv's import
or work changes there (OpenCV's thread count, matplotlib's backend, the warnings filters, file descriptor 2)
is checked against what the process had before. Then the choices that replaced os.cpu_count() and the
one-GPU-for-every-worker default: which cores, which GPU, from what.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import daskmv
from daskmv import cluster

REPO = Path(__file__).resolve().parents[1]
#: Every daskmv module a user's process may import (the ops import their own dependencies).
MODULES = ["daskmv", "daskmv.cli", "daskmv.engine", "daskmv.partition", "daskmv.manifest", "daskmv.cluster",
           "daskmv.data", "daskmv.report", "daskmv.preview", "daskmv.ops.image", "daskmv.ops.segment",
           "daskmv.ops.relight", "daskmv.ops.torch_model", "daskmv.ops.core", "daskmv.export"]


def fresh_python(code: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run ``code`` in a new interpreter; its last stdout line is a JSON result."""
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                **(env or {})}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return proc


def result(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


def imports() -> str:
    return "".join(f"import {m}\n" for m in MODULES)


# -- OpenCV threads ----------------------------------------------------------------------------------
def test_importing_and_decoding_in_a_users_process_keeps_its_opencv_threads(dataset):
    proc = fresh_python(f"""
        import json, cv2
        cv2.setNumThreads(3)
        {imports().replace(chr(10), chr(10) + '        ')}
        from daskmv.ops.image import load_inputs
        load_inputs({str(dataset / 'img' / '0001.jpg')!r}, frozenset({{"image"}}))  # in-process, not a worker
        print(json.dumps({{"threads": cv2.getNumThreads()}}))
    """)
    assert result(proc)["threads"] == 3


def test_worker_processes_decode_with_one_opencv_thread_each(dataset, client, tmp_path):
    import cv2

    daskmv.run(str(dataset / "manifest.csv"), "resize", str(tmp_path / "out"), client=client, progress="none",
               limit=8, partition_rows=4)
    assert set(client.run(cv2.getNumThreads).values()) == {1}


def test_workers_see_the_environment_of_the_driver_as_it_is_at_each_run(tmp_path):
    """Workers are forked from a fork server started by the first run; a variable the notebook sets after
    that (DASKMV_MODEL_DIR, a token) must still reach the next run's workers."""
    proc = fresh_python(f"""
        import json, os, sys
        sys.path.insert(0, {str(REPO / 'tests')!r})
        import pandas as pd
        import daskmv
        pd.DataFrame({{"id": ["a", "b"]}}).to_csv({str(tmp_path / 'm.csv')!r}, index=False)
        def value(out):
            r = daskmv.run({str(tmp_path / 'm.csv')!r}, ["testops:EnvValue"], out, workers=1, progress="none")
            return r.manifest()["env_value"].tolist()
        before = value({str(tmp_path / 'o1')!r})
        os.environ["DASKMV_TEST_VARIABLE"] = "set-in-the-notebook"
        after = value({str(tmp_path / 'o2')!r})
        print(json.dumps({{"before": before, "after": after}}))
    """, env={"DASKMV_TEST_VARIABLE": ""})
    got = result(proc)
    assert got["before"] in ([None, None], ["", ""]) and got["after"] == ["set-in-the-notebook"] * 2


def test_forked_workers_size_their_blas_pools_to_their_threads(tmp_path):
    """The fork server imported numpy with one BLAS thread per core; each of its workers must shrink that
    pool to its own threads, or N workers run N x cores threads in every numpy product."""
    proc = fresh_python(f"""
        import json, sys
        sys.path.insert(0, {str(REPO / 'tests')!r})
        import numpy, pandas as pd
        import daskmv
        pd.DataFrame({{"id": ["a", "b", "c", "d"]}}).to_csv({str(tmp_path / 'm.csv')!r}, index=False)
        r = daskmv.run({str(tmp_path / 'm.csv')!r}, ["testops:BlasThreads"], {str(tmp_path / 'o')!r}, workers=2,
                       progress="none")
        print(json.dumps(sorted(set(r.manifest()["blas_threads"].tolist()))))
    """)
    assert result(proc) == [1]


# -- matplotlib ----------------------------------------------------------------------------------------
def test_a_report_leaves_the_users_matplotlib_backend_and_pyplot_alone(dataset, client, tmp_path):
    out = tmp_path / "out"
    daskmv.run(str(dataset / "manifest.csv"), "resize,stats", str(out), client=client, progress="none", limit=8)
    proc = fresh_python(f"""
        import json, sys
        import matplotlib
        matplotlib.use("svg")
        {imports().replace(chr(10), chr(10) + '        ')}
        from daskmv.report import build_report
        page = open(build_report({str(out)!r})).read()
        print(json.dumps({{"backend": matplotlib.get_backend(), "pyplot": "matplotlib.pyplot" in sys.modules,
                          "timeline": "<svg" in page}}))
    """)
    assert result(proc) == {"backend": "svg", "pyplot": False, "timeline": True}


# -- warnings --------------------------------------------------------------------------------------------
def test_importing_and_reading_a_manifest_adds_no_warning_filter(dataset):
    proc = fresh_python(f"""
        import json, warnings
        import cv2, dask.dataframe, distributed, numcodecs, numpy, pandas, pyarrow, zarr  # their own filters
        try:
            import torch
        except ImportError:
            pass
        before = [repr(f) for f in warnings.filters]
        {imports().replace(chr(10), chr(10) + '        ')}
        from daskmv.manifest import read_manifest
        for name in ("manifest.csv", "manifest.parquet"):
            m = read_manifest({str(dataset)!r} + "/" + name)
            rows = sum(len(p) for p in m.partitions(64))
        print(json.dumps({{"same": [repr(f) for f in warnings.filters] == before, "rows": rows}}))
    """)
    assert result(proc) == {"same": True, "rows": 304}


# -- stderr ----------------------------------------------------------------------------------------------
def test_selfie_setup_loses_nothing_other_threads_print_and_drops_only_litert_banner():
    from daskmv.models import selfie_model

    try:
        selfie_model()
    except Exception as exc:
        pytest.skip(f"the selfie model is not fetched here: {exc}")
    proc = fresh_python("""
        import json, os, sys, threading, time
        from daskmv.ops.segment import SelfieSegmenter

        before = os.fstat(2)
        stop = threading.Event()
        sent = []

        def printer():  # another thread of the process, printing all along (Python and C-level writes)
            i = 0
            while not stop.is_set():
                print(f"python {i}", file=sys.stderr, flush=True)
                os.write(2, f"raw {i}\\n".encode())
                i += 1
            sent.append(i)

        t = threading.Thread(target=printer)
        t.start()
        time.sleep(0.05)
        made = []
        threads = [threading.Thread(target=lambda: made.append(SelfieSegmenter("auto"))) for _ in range(3)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        time.sleep(0.05)
        stop.set()
        t.join()
        after = os.fstat(2)
        print("stderr still works", file=sys.stderr, flush=True)
        print(json.dumps({"sent": sent[0], "made": len(made), "same_fd2": (before.st_dev, before.st_ino) ==
                          (after.st_dev, after.st_ino)}))
    """)
    out = result(proc)
    assert out["made"] == 3 and out["same_fd2"]
    lines = proc.stderr.splitlines()
    assert "stderr still works" in lines
    assert not any("XNNPACK" in line for line in lines), proc.stderr[-2000:]
    # Every write there exactly once. (Python's stderr into a pipe is unbuffered: print writes the text and
    # its newline separately, and a write in the instant fd 2 is switched back may pass a newline.)
    python = [int(n) for n in re.findall(r"python (\d+)", proc.stderr)]
    raw = [int(n) for n in re.findall(r"raw (\d+)", proc.stderr)]
    assert sorted(python) == list(range(out["sent"])), "what another thread printed was lost"
    assert sorted(raw) == list(range(out["sent"])), "what another thread wrote to fd 2 was lost"


@pytest.mark.parametrize("collected, expected", [
    (b"a\nINFO: Created TensorFlow Lite XNNPACK delegate for CPU.\nb\n", b"a\nb\n"),
    # the banner's three writes, with other threads' writes between them
    (b"x 1\nINFO: y 2\nCreated TensorFlow Lite XNNPACK delegate for CPU.z 3\n\nw", b"x 1\ny 2\nz 3\nw"),
    (b"INFO: other\nnothing of LiteRT's\n", b"INFO: other\nnothing of LiteRT's\n"),
])
def test_only_the_banner_is_taken_out_of_what_was_collected(collected, expected):
    from daskmv.ops.segment import without_banner

    assert without_banner(collected) == expected


# -- cores -------------------------------------------------------------------------------------------------
@pytest.mark.skipif(cluster.nvidia_driver(), reason="this machine has an NVIDIA driver: torch must be asked")
def test_a_machine_without_an_nvidia_driver_picks_the_cpu_without_importing_torch():
    """Ops marked gpu=True that never use torch (SIFT, the reconstruction) must not pay its 1-2 s import."""
    code = "import sys; from daskmv.cluster import worker_device; print(worker_device(), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["cpu", "False"]


def test_cpu_count_is_dasks_and_within_a_slurm_allocation(monkeypatch):
    import dask.system

    monkeypatch.setattr(dask.system, "CPU_COUNT", 16)
    assert cluster.cpu_count({}) == 16
    assert cluster.cpu_count({"SLURM_CPUS_ON_NODE": "4"}) == 4
    assert cluster.cpu_count({"SLURM_CPUS_ON_NODE": "8", "SLURM_CPUS_PER_TASK": "2"}) == 2
    assert cluster.cpu_count({"SLURM_CPUS_ON_NODE": "64"}) == 16  # never more than the process may use
    assert cluster.cpu_count({"SLURM_CPUS_ON_NODE": "garbage"}) == 16


def test_local_cluster_starts_one_worker_per_usable_core(monkeypatch):
    import dask.system

    seen = {}

    def fake_cluster(**kwargs):
        seen.update(kwargs)
        return "cluster"

    monkeypatch.setattr(dask.system, "CPU_COUNT", 3)
    monkeypatch.setenv("SLURM_CPUS_ON_NODE", "1")  # inside `salloc -c 1` on a bigger machine
    monkeypatch.setattr(cluster, "gpu_count", lambda: 0)
    monkeypatch.setattr(cluster, "LocalCluster", fake_cluster)
    assert cluster.local_cluster() == "cluster" and seen["n_workers"] == 1
    monkeypatch.delenv("SLURM_CPUS_ON_NODE")
    assert cluster.local_cluster() == "cluster" and seen["n_workers"] == 3


# -- GPUs ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, env, name, dask_cuda, peers, address, expected", [
    (0, {}, None, False, (), None, None),                                     # no GPU: CPU
    (1, {}, "host-3", False, (), None, 0),                                    # pinned to one GPU
    (4, {}, None, False, (), None, 0),                                        # not a worker
    (4, {"DASKMV_GPU": "2"}, "x-1", True, (), None, 2),                      # set by hand: wins
    (4, {}, 3, True, (), None, 0),                                            # dask-cuda: its own GPU is first
    (4, {"LOCAL_RANK": "5"}, None, False, (), None, 1),                      # a launcher's local rank
    (4, {"SLURM_LOCALID": "3", "SLURM_STEP_ID": "0"}, None, False, (), None, 3),  # srun, one task per worker
    (4, {"SLURM_LOCALID": "0"}, "SLURMCluster-0-2", False, (), None, 2),     # a batch job's worker processes
    (2, {}, "gpu-node-7", False, (), None, 1),                                # dask worker --name X --nworkers N
    (8, {}, "tcp://10.0.0.5:40001", False,
     ("tcp://10.0.0.5:40003", "tcp://10.0.0.5:40001", "tcp://10.0.0.5:40002"), "tcp://10.0.0.5:40001", 0),
    (8, {}, "tcp://10.0.0.5:40003", False,
     ("tcp://10.0.0.5:40003", "tcp://10.0.0.5:40001", "tcp://10.0.0.5:40002"), "tcp://10.0.0.5:40003", 2),
    (2, {}, None, False, ("a", "b", "c"), "c", 0),                           # more workers than GPUs: shared
])
def test_each_worker_picks_its_own_gpu(n, env, name, dask_cuda, peers, address, expected):
    assert cluster.worker_gpu(n, env, name, dask_cuda, peers, address) == expected


def test_a_gpu_set_by_hand_must_exist():
    with pytest.raises(ValueError, match="DASKMV_GPU='4'.*4 CUDA device"):
        cluster.worker_gpu(4, {"DASKMV_GPU": "4"})


def _device_with_fake_gpus(n: int) -> str:
    """In a worker: what worker_device() picks if the process saw ``n`` CUDA devices."""
    import torch

    from daskmv import cluster as c

    saved = torch.cuda.is_available, torch.cuda.device_count
    torch.cuda.is_available, torch.cuda.device_count = (lambda: True), (lambda: n)
    try:
        c._WORKER_DEVICES.clear()
        return c.worker_device()
    finally:
        torch.cuda.is_available, torch.cuda.device_count = saved
        c._WORKER_DEVICES.clear()


def test_plain_workers_on_one_multi_gpu_host_use_different_gpus(client):
    """Two plain workers (no names, no ranks, no dask-cuda) on one host that sees 4 GPUs: not both cuda:0."""
    pytest.importorskip("torch")
    workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
    devices = [client.submit(_device_with_fake_gpus, 4, workers=[w], pure=False).result() for w in workers]
    assert sorted(devices) == [f"cuda:{i}" for i in range(len(workers))]


def test_the_partition_task_asks_the_worker_rule(monkeypatch):
    from daskmv import partition

    monkeypatch.setattr(cluster, "worker_device", lambda: "cuda:3")
    assert partition._best_device() == "cuda:3"


# -- SLURM node size -----------------------------------------------------------------------------------------
def test_sinfo_output_gives_the_smallest_node():
    assert cluster.parse_node_sizes("64 257000\n32 128000\n64 257000\n") == (32, 128000)
    assert cluster.parse_node_sizes("  48 191000 \n") == (48, 191000)
    assert cluster.parse_node_sizes("128+ 515000+\n96 380000\n") == (96, 380000)
    assert cluster.parse_node_sizes("") is None and cluster.parse_node_sizes("N/A N/A\n") is None
    assert cluster.slurm_memory(24105) == "23GiB" and cluster.slurm_memory(515000) == "502GiB" and cluster.slurm_memory(900) == "900MiB"


def test_explicit_cores_and_memory_win_over_sinfo(monkeypatch):
    pytest.importorskip("dask_jobqueue")

    def no_sinfo(*args):
        raise AssertionError("sinfo was asked although cores and memory were given")

    monkeypatch.setattr(cluster, "_sinfo", no_sinfo)
    assert cluster._node_size_from_sinfo(None, {"cores": 4, "memory": "8GB"}, print) == {}
    assert cluster._node_size_from_sinfo("daskmv-cpu", {}, print) == {}  # the profile sets both


def test_missing_cores_and_memory_come_from_sinfo_and_are_said(monkeypatch):
    pytest.importorskip("dask_jobqueue")
    calls = []

    def fake_sinfo(*args):
        calls.append(args)
        return "cpu*\ngpu\n" if args == ("-o", "%P") else "16 64000\n8 32000\n"

    monkeypatch.setattr(cluster, "_sinfo", fake_sinfo)
    said: list[str] = []
    assert cluster._node_size_from_sinfo(None, {}, said.append) == {"cores": 8, "processes": 8, "memory": "31GiB"}
    assert calls[-1] == ("-N", "-p", "cpu", "-o", "%c %m") and "partition cpu" in said[0] and "cores=8" in said[0]
    assert cluster._node_size_from_sinfo(None, {"queue": "gpu", "processes": 1, "memory": "100GB"}, said.append) == \
        {"cores": 8}
    assert calls[-1] == ("-N", "-p", "gpu", "-o", "%c %m")
