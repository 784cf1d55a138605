"""Errors with the right cause: infrastructure faults fail partitions, row faults stay rows, a run with too
many row errors is not a success, workers whose set-up keeps failing are retired, cancellations say so."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from distributed import Client, Future, LocalCluster

import daskmv
from daskmv.errors import RunError, TooManyRowErrors

pytestmark = pytest.mark.slow
DASKMV = [sys.executable, "-m", "daskmv.cli"]


def flaky_manifest(dataset: Path, tmp_path: Path, n: int = 40) -> str:
    """The first ``n`` good images under ``flakyfile://`` (each file's first read fails with EIO)."""
    folder = tmp_path / "data"
    shutil.copytree(dataset / "img", folder / "img")
    paths = [f"flakyfile://{folder / 'img' / f'{i:04d}.jpg'}" for i in range(1, n + 1) if i % 10]
    pd.DataFrame({"path": paths, "label": range(len(paths))}).to_csv(tmp_path / "flaky.csv", index=False)
    return str(tmp_path / "flaky.csv")


def test_an_io_error_of_the_filesystem_fails_the_partition_and_the_retry_reads_the_file(dataset, client, tmp_path,
                                                                                        run_opts):
    """EIO from a network filesystem is not the file's fault: no row may be recorded as bad (a rerun would
    skip it); the partition fails, is retried, and then every row is read."""
    import testops  # noqa: F401  (registers flakyfile:// in this process; workers import it with the op)

    manifest = flaky_manifest(dataset, tmp_path)
    r = daskmv.run(manifest, "resize,testops:Slow", str(tmp_path / "out"), client=client, partition_rows=12,
                   **run_opts)
    assert r.counts["error"] == 0 and r.counts["ok"] == r.counts["rows"]
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["failed_attempts"] and all("Input/output error" in a["error"] for a in run["failed_attempts"])
    assert run["counts"]["failed_partitions"] == 0


def test_a_missing_file_stays_a_row_error(dataset, client, tmp_path, run_opts):
    frame = pd.DataFrame({"path": ["img/0001.jpg", "img/0002.jpg", "nowhere/x.jpg", "img"]})
    frame.to_csv(dataset / "missing-and-dir.csv", index=False)
    r = daskmv.run(str(dataset / "missing-and-dir.csv"), "resize", str(tmp_path / "out"), client=client,
                   max_error_rate=1.0, **run_opts)
    got = r.manifest().set_index("path")
    assert got.loc["nowhere/x.jpg", "error"].startswith("read: file not found")
    assert got.loc["img", "error"].startswith("read: not a file but a directory")
    assert (got.loc[["img/0001.jpg", "img/0002.jpg"], "status"] == "ok").all()
    assert json.loads((tmp_path / "out" / "run.json").read_text())["failed_attempts"] == []


def test_a_device_error_fails_the_partition_not_its_rows(dataset, client, tmp_path, run_opts):
    r = daskmv.run(str(dataset / "manifest.parquet"), [{"testops:DeviceFault": {"flag": str(tmp_path / "f")}}],
                   str(tmp_path / "out"), client=client, limit=40, partition_rows=20, **run_opts)
    assert r.counts == {"rows": 40, "ok": 40, "error": 0}
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert [a["error"] for a in run["failed_attempts"]] == [
        "RuntimeError: CUDA error: an illegal memory access was encountered"]


def test_an_op_that_returns_too_few_results_never_shifts_them(dataset, client, tmp_path, run_opts):
    with pytest.raises(RunError, match="returned 7 results for 8 rows"):
        daskmv.run(str(dataset / "manifest.parquet"), "testops:ShortResults", str(tmp_path / "out"), client=client,
                   limit=8, batch_size=8, retries=0, **run_opts)
    frame = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert frame["echo"].isna().all() and (frame["status"] == "error").all()


def test_a_worker_whose_setup_keeps_failing_is_retired_and_the_run_completes(dataset, tmp_path):
    """Worker 0 cannot load the model. With no retries to spare, every partition still completes on worker
    1: worker 0 costs at most two attempts in all, then gets no more work; run.json says so."""
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        r = daskmv.run(str(dataset / "manifest.parquet"), [{"testops:BrokenOn": {"worker": "0"}}],
                       str(tmp_path / "out"), client=client, partition_rows=16, retries=0, retry_delay=0.1,
                       progress="none")
    assert r.complete and r.counts["ok"] == r.counts["rows"] == 304
    frame = r.manifest()
    assert (frame["where"] == "1").all()
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    (address, retired), = run["retired_workers"].items()
    assert retired["failures"] == 2 and "model file missing on worker 0" in retired["error"]
    setup_failures = [a["error"] for a in run["failed_attempts"]]
    assert all("set-up failed on worker" in e for e in setup_failures)
    # worker 0 tried to load the model twice; tasks already queued there when it was retired fail at once
    assert sum("(1x)" in e for e in setup_failures) == 1 and not any("(3x)" in e for e in setup_failures)
    assert len(setup_failures) <= 6


def test_setup_failing_everywhere_stops_the_run_with_the_cause(dataset, tmp_path):
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        with pytest.raises(RunError, match="op set-up failed on every worker .*model file missing on worker 0"):
            daskmv.run(str(dataset / "manifest.parquet"), [{"testops:BrokenOn": {"worker": "0"}}],
                       str(tmp_path / "out"), client=client, partition_rows=16, retry_delay=0.1, progress="none")


def test_a_cancelled_task_is_reported_as_cancelled_and_retried(dataset, client, tmp_path, run_opts):
    cancelled: list[str] = []

    def cancel_one() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not cancelled:
            keys = client.run_on_scheduler(lambda dask_scheduler: [
                k for k, ts in dask_scheduler.tasks.items() if str(k).startswith("daskmv-") and ts.state == "processing"])
            if keys:
                client.cancel([Future(keys[0], client)])
                cancelled.append(keys[0])
            time.sleep(0.05)

    thread = threading.Thread(target=cancel_one)
    thread.start()
    r = daskmv.run(str(dataset / "manifest.parquet"), [{"testops:Slow": {"seconds": 0.02}}], str(tmp_path / "out"),
                   client=client, partition_rows=16, **run_opts)
    thread.join()
    assert cancelled and r.complete and r.counts["ok"] == 304
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    (attempt,) = run["failed_attempts"]
    assert attempt["error"].startswith("cancelled: the task was cancelled") and "NoneType" not in attempt["error"]


def test_too_many_row_errors_is_exit_3_with_the_manifest_written(dataset, tmp_path):
    """A manifest whose paths point at the wrong folder: every row fails. Exit 3, not 0, with the cause."""
    wrong = tmp_path / "wrong.csv"
    pd.read_csv(dataset / "manifest.csv").assign(path=lambda f: "elsewhere/" + f["path"]).to_csv(wrong, index=False)
    out = tmp_path / "out"
    proc = subprocess.run([*DASKMV, "run", str(wrong), "--pipeline", "resize", "--out", str(out), "--workers", "1",
                           "--progress", "none"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr
    assert "304 of 304 rows failed (100.0%), more than --max-error-rate 0.1" in proc.stderr
    assert "read: file not found (304 rows)" in proc.stderr and "Traceback" not in proc.stderr
    assert (pd.read_parquet(out / "manifest.parquet")["status"] == "error").all()
    assert json.loads((out / "run.json").read_text())["error_rate"] == 1.0
    again = subprocess.run([*DASKMV, "run", str(wrong), "--pipeline", "resize", "--out", str(out), "--workers", "1",
                            "--progress", "none", "--max-error-rate", "1"], capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr


def test_a_few_bad_files_pass_the_default_error_rate(dataset, client, tmp_path, run_opts):
    r = daskmv.run(str(dataset / "manifest.csv"), "resize", str(tmp_path / "out"), client=client, **run_opts)
    assert r.counts["error"] == 4 and r.complete  # 4 of 304 (1.3 %): below the default 10 %
    with pytest.raises(TooManyRowErrors) as info:
        daskmv.run(str(dataset / "manifest.csv"), "resize", str(tmp_path / "strict"), client=client,
                   max_error_rate=0.01, **run_opts)
    assert info.value.exit_code == 3 and info.value.result.counts["error"] == 4


def test_a_lost_scheduler_is_not_blamed_on_the_output_root(dataset, tmp_path):
    """The scheduler dies mid-run (a CommClosedError / TimeoutError, both OSErrors on Python 3.11): the message
    names the cluster, never "cannot write to the output root"."""
    scheduler = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--port", "0",
                                  "--no-dashboard", "--scheduler-file", str(tmp_path / "s.json")],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = None
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "s.json").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        address = json.loads((tmp_path / "s.json").read_text())["address"]
        worker = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
                                   "--no-dashboard"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out = tmp_path / "out"
        run = subprocess.Popen([*DASKMV, "run", str(dataset / "manifest.parquet"), "--pipeline", str(slow_yaml(tmp_path)),
                                "--out", str(out), "--cluster", address, "--partition-rows", "8", "--progress", "none"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not list((out / "parts").glob("p*.json")) if (out / "parts").exists() else True:
            assert time.monotonic() < deadline and run.poll() is None, "the run never got going"
            time.sleep(0.05)
        scheduler.kill()
        _, stderr = run.communicate(timeout=240)
    finally:
        for proc in (worker, scheduler):
            if proc is not None:
                proc.kill()
                proc.wait()
    assert run.returncode == 1, stderr
    assert "output root" not in stderr and "Traceback" not in stderr, stderr
    assert "Dask cluster" in stderr or "scheduler" in stderr, stderr


def slow_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "slow.yaml"
    path.write_text("steps:\n  - testops:Slow: {seconds: 0.05}\n")
    return path


def test_gpu_tasks_with_no_gpu_worker_left_stop_with_a_clear_message(dataset, tmp_path):
    """The only GPU worker leaves mid-run; a CPU worker remains. GPU tasks must not wait forever."""
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, resources={"GPU": 1},
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        cpu_worker = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", cluster.scheduler_address,
                                       "--nthreads", "1", "--no-dashboard"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            client.wait_for_workers(2, timeout=60)
            gpu_worker = next(a for a, w in client.scheduler_info()["workers"].items() if w["resources"].get("GPU"))
            out = tmp_path / "out"

            def retire_when_started() -> None:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and not list((out / "parts").glob("p??????.json")):
                    time.sleep(0.05)
                client.retire_workers(workers=[gpu_worker], close_workers=True)

            thread = threading.Thread(target=retire_when_started)
            thread.start()
            started = time.monotonic()
            with pytest.raises(RunError, match=r"waited \d+ s for a worker with a GPU and none is left"):
                daskmv.run(str(dataset / "manifest.parquet"), [{"testops:SlowGPU": {"seconds": 0.02}}], str(out),
                           client=client, partition_rows=16, worker_wait=2.0, progress="none")
            thread.join()
            assert time.monotonic() - started < 60
        finally:
            cpu_worker.kill()
            cpu_worker.wait()
