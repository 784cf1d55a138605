"""Faults, each for real: a killed driver, a killed worker, poison data, a failing model load, GPU placement."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from distributed import Client, LocalCluster

import daskmv
from conftest import wait_for
from daskmv.data import load_output
from daskmv.store import Store

pytestmark = pytest.mark.slow
DASKMV = [sys.executable, "-m", "daskmv.cli"]


def markers(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "parts").glob("p*[0-9].json"))]


def comparable(frame: pd.DataFrame) -> pd.DataFrame:
    from conftest import without_refs

    return without_refs(frame)


def test_driver_killed_then_resumed_equals_an_uninterrupted_run(dataset, client, tmp_path):
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("steps:\n  - resize: {size: 48}\n  - testops:Slow: {seconds: 0.02}\n")
    reference = daskmv.run(str(dataset / "manifest.csv"), str(pipeline), str(tmp_path / "ref"), client=client,
                           partition_rows=16, progress="none")
    out = tmp_path / "out"
    cmd = [*DASKMV, "run", str(dataset / "manifest.csv"), "--pipeline", str(pipeline), "--out", str(out),
           "--workers", "2", "--partition-rows", "16", "--progress", "log"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        total = len(reference.computed_partitions)
        wait_for(lambda: (out / "parts").exists() and len(markers(out)) >= total // 3, what="a third of the partitions")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # driver, nannies and workers at once
        proc.wait()
    finished_at_kill = {m["index"] for m in markers(out)}
    assert 0 < len(finished_at_kill) < total
    status = subprocess.run([*DASKMV, "status", str(out), "--json"], capture_output=True, text=True)
    assert status.returncode == 0
    info = json.loads(status.stdout)
    assert info["state"] == "interrupted" and info["partitions_done"] == len(finished_at_kill)
    assert info["pending"] == info["rows"] - info["done"] > 0

    resumed = subprocess.run(cmd, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "INFO" not in resumed.stderr and "rows/s" in resumed.stderr  # progress lines, not Dask's logs
    run = json.loads((out / "run.json").read_text())
    assert run["counts"]["skipped_partitions"] == len(finished_at_kill)
    assert run["counts"]["computed_partitions"] == total - len(finished_at_kill)
    got = pd.read_parquet(out / "manifest.parquet")
    want = pd.read_parquet(tmp_path / "ref" / "manifest.parquet")
    assert comparable(got).equals(comparable(want))
    assert got["id"].is_unique
    for row_id in got.loc[got["status"] == "ok", "id"]:
        a = load_output(str(out / "manifest.parquet"), row_id, "resized")
        b = load_output(str(tmp_path / "ref" / "manifest.parquet"), row_id, "resized")
        assert a.tobytes() == b.tobytes()


def test_worker_killed_mid_run_loses_nothing_and_finished_partitions_run_once(dataset, tmp_path):
    log = tmp_path / "rows.log"
    out = tmp_path / "out"
    steps = [{"testops:Slow": {"seconds": 0.03}}, {"testops:CountRuns": {"log": str(log)}}]
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as c:
        result: dict = {}

        def go() -> None:
            try:
                result["run"] = daskmv.run(str(dataset / "manifest.parquet"), steps, str(out), client=c,
                                           partition_rows=16, progress="none")
            except BaseException as exc:  # surfaced by the assertion below
                result["error"] = exc

        thread = threading.Thread(target=go)
        thread.start()
        wait_for(lambda: (out / "parts").exists() and len(markers(out)) >= 12, what="most partitions")
        before_kill = {m["index"]: m for m in markers(out)}
        finished_before_kill = set(before_kill)
        assert thread.is_alive(), "the run finished before a worker could be killed"
        victim = next(iter(c.run(os.getpid).values()))
        os.kill(victim, signal.SIGKILL)
        thread.join(timeout=180)
    assert "error" not in result, result.get("error")
    frame = pd.read_parquet(out / "manifest.parquet")
    assert len(frame) == 304 and frame["id"].is_unique
    assert (frame["status"] == "ok").all()  # these ops read no files, so the bad files are fine here
    runs = Counter(line.split("\t")[0] for line in log.read_text().splitlines())
    partition_of = {row_id: i // 16 for i, row_id in enumerate(frame["id"])}
    for row_id, count in runs.items():
        if partition_of[row_id] in finished_before_kill:
            assert count == 1, f"row {row_id} of a finished partition ran {count} times"
    assert set(runs) == set(frame["id"])
    after = {m["index"]: m for m in markers(out)}
    for index, marker in before_kill.items():  # from the output root: finished partitions ran once
        assert after[index]["started"] == marker["started"] and after[index]["pid"] == marker["pid"]


def test_poison_partition_stops_after_its_retries_and_the_rest_finish(dataset, tmp_path):
    frame = pd.read_parquet(dataset / "manifest.parquet")
    from daskmv.manifest import derive_id

    poison = derive_id(frame["path"][40])
    out = tmp_path / "out"
    (tmp_path / "p.yaml").write_text(f"steps:\n  - testops:Crash: {{poison: {poison}}}\n")
    (tmp_path / "settings.yaml").write_text("retry-delay: 0.2\nretries: 1\n")
    cmd = [*DASKMV, "run", str(dataset / "manifest.parquet"), "--pipeline", str(tmp_path / "p.yaml"), "--out",
           str(out), "--workers", "2", "--partition-rows", "32", "--progress", "none", "--config",
           str(tmp_path / "settings.yaml")]
    env = {**os.environ, "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 1, proc.stderr
    assert "1 partition(s) failed" in proc.stderr and "run the same command again" in proc.stderr
    got = pd.read_parquet(out / "manifest.parquet")
    assert len(got) == len(frame) and got["id"].is_unique
    bad = got.iloc[32:64]
    assert (bad["status"] == "error").all()
    assert bad["error"].str.startswith("partition: failed after 2 attempts: KilledWorker").all()
    rest = got.drop(index=range(32, 64))
    assert (rest.loc[~rest["path"].str.startswith("bad/"), "status"] == "ok").all()
    info = Store(str(out)).status()
    assert info["state"] == "incomplete" and info["partitions_failed"] == [1] and info["failed"] == 32
    run = json.loads((out / "run.json").read_text())
    assert run["counts"]["failed_partitions"] == 1


def _seconds(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp).timestamp()


def test_failed_model_load_is_retried_with_backoff(dataset, client, tmp_path):
    """One failed setup: that partition alone runs again, retry_delay after its failure (run.json says when
    it failed, its marker when the retry started); the others run once."""
    out = tmp_path / "out"
    r = daskmv.run(str(dataset / "manifest.parquet"), [{"testops:FailsFirstSetup": {"flag": str(tmp_path / "f")}}],
                   str(out), client=client, partition_rows=64, retry_delay=0.3, progress="none")
    assert r.complete and r.counts["ok"] == r.counts["rows"]
    attempts = sorted(m["attempt"] for m in markers(out))
    assert attempts.count(2) == 1 and attempts.count(1) == len(attempts) - 1
    [failure] = json.loads((out / "run.json").read_text())["failed_attempts"]
    assert failure["attempt"] == 1 and "model failed to load" in failure["error"]
    [retry] = [m for m in markers(out) if m["attempt"] == 2]
    assert retry["index"] == failure["index"]
    waited = _seconds(retry["started"]) - _seconds(failure["time"])
    assert 0.3 - 0.002 <= waited < 0.3 + 1.0, waited  # millisecond time stamps


def test_repeated_failures_back_off_doubling_each_time(dataset, client, tmp_path):
    """Two failed setups of one partition: it waits retry_delay, then twice that, then succeeds."""
    out = tmp_path / "out"
    r = daskmv.run(str(dataset / "manifest.parquet"),
                   [{"testops:FailsFirstSetup": {"flag": str(tmp_path / "f"), "failures": 2}}], str(out),
                   client=client, partition_rows=1000, retry_delay=0.4, progress="none")
    assert r.complete and r.counts["ok"] == r.counts["rows"]
    [marker] = markers(out)
    failures = json.loads((out / "run.json").read_text())["failed_attempts"]
    assert [f["attempt"] for f in failures] == [1, 2] and marker["attempt"] == 3
    times = [_seconds(f["time"]) for f in failures] + [_seconds(marker["started"])]
    waits = np.diff(times)  # each includes the wait before the next attempt, and the first a failed setup
    for waited, delay in zip(waits, [0.4, 0.8]):
        assert delay - 0.002 <= waited < delay + 1.0, (waits, delay)


@pytest.fixture(scope="module")
def external_cluster(tmp_path_factory):
    """`dask scheduler` and two `dask worker` processes, one declaring GPU=1, as separate OS processes."""
    sched_file = tmp_path_factory.mktemp("scheduler") / "scheduler.json"
    env = {**os.environ, "PYTHONPATH": os.environ["PYTHONPATH"]}
    dask = [str(Path(sys.executable).parent / "dask")]
    procs = [subprocess.Popen([*dask, "scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address", ":0",
                               "--scheduler-file", str(sched_file)], env=env, stderr=subprocess.DEVNULL)]
    wait_for(sched_file.exists, 60, "the scheduler file")
    for extra in (["--resources", "GPU=1", "--name", "gpu-worker"], ["--name", "cpu-worker"]):
        procs.append(subprocess.Popen([*dask, "worker", "--scheduler-file", str(sched_file), "--nthreads", "1",
                                       "--host", "127.0.0.1", "--dashboard-address", ":0", *extra],
                                      env=env, stderr=subprocess.DEVNULL))
    address = json.loads(sched_file.read_text())["address"]
    with Client(address) as c:
        c.wait_for_workers(2, timeout=60)
    try:
        yield address
    finally:
        for p in procs[::-1]:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def test_gpu_ops_only_run_on_workers_that_declare_a_gpu(dataset, tmp_path, external_cluster):
    with Client(external_cluster) as c:
        workers = c.scheduler_info(n_workers=-1)["workers"]
        gpu_worker = next(a for a, w in workers.items() if w.get("resources", {}).get("GPU"))
    out = tmp_path / "out"
    proc = subprocess.run([*DASKMV, "run", str(dataset / "manifest.parquet"), "--pipeline", "testops:WhereAmI,stats",
                           "--out", str(out), "--cluster", external_cluster, "--partition-rows", "16",
                           "--progress", "none"], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    frame = pd.read_parquet(out / "manifest.parquet")
    ran = frame.loc[frame["status"] == "ok", "worker"]
    assert len(ran) == 300 and set(ran) == {gpu_worker}
    assert {m["worker"] for m in markers(out)} == {gpu_worker}
    assert np.isfinite(frame.loc[frame["status"] == "ok", "sharpness"]).all()


def test_cpu_pipelines_use_every_worker_of_a_scheduler(dataset, tmp_path, external_cluster):
    out = tmp_path / "out"
    r = daskmv.run(str(dataset / "manifest.parquet"), [{"testops:Slow": {"seconds": 0.01}}], str(out),
                   cluster=external_cluster, partition_rows=16, progress="none")
    assert r.counts["rows"] == 304
    assert len({m["worker"] for m in markers(out)}) == 2
