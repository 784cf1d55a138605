"""What ties finished work to a rerun: the manifest however it is spelled, the rows' content (not only their
ids), text ids, partitions that follow the data, and progress that counts only this run's rows."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import daskmv
from daskmv.data import load_output

DASKMV = [sys.executable, "-m", "daskmv.cli"]


def test_csv_ids_and_paths_stay_text(tmp_path, client, run_opts):
    """"007" is not 7: leading zeros survive, and "007" and "7" are two rows, not duplicates."""
    for name in ("007", "7", "0042"):  # files named like numbers, no extension
        (tmp_path / name).write_bytes(cv2.imencode(".png", np.full((8, 8, 3), int(name), np.uint8))[1].tobytes())
    (tmp_path / "m.csv").write_text("id,path\n007,007\n7,7\n0042,0042\n")
    r = daskmv.run(str(tmp_path / "m.csv"), [{"resize": {"size": 4}}], str(tmp_path / "out"), client=client, **run_opts)
    frame = r.manifest()
    assert frame["id"].tolist() == ["007", "7", "0042"] and frame["path"].tolist() == ["007", "7", "0042"]
    assert (frame["status"] == "ok").all()
    assert int(load_output(r.manifest_path, "0042", "resized")[0, 0, 0]) == 42
    csv = pd.read_csv(tmp_path / "out" / "manifest.csv", dtype=str)
    assert csv["id"].tolist() == ["007", "7", "0042"]


def test_a_relative_and_an_absolute_spelling_are_the_same_run(dataset, client, tmp_path, run_opts, monkeypatch):
    first = daskmv.run(str(dataset / "manifest.csv"), "resize", str(tmp_path / "out"), client=client, **run_opts)
    monkeypatch.chdir(dataset)
    again = daskmv.run("./manifest.csv", "resize", str(tmp_path / "out"), client=client, **run_opts)
    assert sorted(again.skipped_partitions) == sorted(first.computed_partitions) and not again.computed_partitions


def test_changed_paths_under_the_same_ids_are_recomputed(tmp_path, client, run_opts):
    """A partition's identity is its rows' content: the same ids pointing at other files is other work."""
    for k in range(6):
        cv2.imwrite(str(tmp_path / f"a{k}.png"), np.full((8, 8, 3), 10 + k, np.uint8))
        cv2.imwrite(str(tmp_path / f"b{k}.png"), np.full((8, 8, 3), 100 + k, np.uint8))
    frame = pd.DataFrame({"id": [f"r{k}" for k in range(6)], "path": [f"a{k}.png" for k in range(6)]})
    frame.to_csv(tmp_path / "m.csv", index=False)
    out = str(tmp_path / "out")
    daskmv.run(str(tmp_path / "m.csv"), [{"resize": {"size": 4}}], out, client=client, partition_rows=3, **run_opts)
    frame.loc[3:, "path"] = [f"b{k}.png" for k in range(3, 6)]  # the second partition's files change
    frame.to_csv(tmp_path / "m.csv", index=False)
    r = daskmv.run(str(tmp_path / "m.csv"), [{"resize": {"size": 4}}], out, client=client, **run_opts)
    assert r.skipped_partitions == [0] and r.computed_partitions == [1]
    assert [int(load_output(r.manifest_path, f"r{k}", "resized")[0, 0, 0]) for k in range(6)] == [
        10, 11, 12, 103, 104, 105]


def test_a_changed_pass_through_column_is_carried_without_recomputing(tmp_path, dataset, client, run_opts):
    frame = pd.read_csv(dataset / "manifest.csv").head(40)
    frame["path"] = str(dataset) + "/" + frame["path"]
    frame.to_csv(tmp_path / "m.csv", index=False)
    out = str(tmp_path / "out")
    first = daskmv.run(str(tmp_path / "m.csv"), "resize", out, client=client, partition_rows=10, **run_opts)
    frame["label"] = frame["label"] + 100  # read by no op: the outputs stay valid, the manifest must follow
    frame.to_csv(tmp_path / "m.csv", index=False)
    r = daskmv.run(str(tmp_path / "m.csv"), "resize", out, client=client, **run_opts)
    assert not r.computed_partitions and sorted(r.skipped_partitions) == sorted(first.computed_partitions)
    got = r.manifest()
    assert got["label"].tolist() == frame["label"].tolist()
    assert got["resized_path"].tolist() == first.manifest()["resized_path"].tolist()
    # and a run of an op that reads the column recomputes when it changes
    daskmv.run(str(tmp_path / "m.csv"), "testops:Flaky", str(tmp_path / "f"), client=client, **run_opts)
    frame["label"] = frame["label"] + 1
    frame.to_csv(tmp_path / "m.csv", index=False)
    again = daskmv.run(str(tmp_path / "m.csv"), "testops:Flaky", str(tmp_path / "f"), client=client, **run_opts)
    assert again.computed_partitions and not again.skipped_partitions
    assert again.manifest()["double"].tolist() == (2 * frame["label"]).tolist()


def test_many_small_row_groups_become_partitions_of_the_asked_size(tmp_path, dataset, client, run_opts):
    frame = pd.read_csv(dataset / "manifest.csv").head(120)
    frame["path"] = str(dataset) + "/" + frame["path"]
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp_path / "m.parquet", row_group_size=7)
    assert pq.ParquetFile(tmp_path / "m.parquet").num_row_groups == 18
    r = daskmv.run(str(tmp_path / "m.parquet"), "resize", str(tmp_path / "out"), client=client, partition_rows=50,
                   **run_opts)
    markers = sorted((tmp_path / "out" / "parts").glob("p??????.json"))
    assert [json.loads(p.read_text())["rows"] for p in markers] == [50, 50, 20]
    assert len(r.manifest()) == 120 and (r.manifest()["id"] == pd.Series(
        [daskmv_id(p) for p in frame["path"]])).all()


def test_partition_size_follows_the_cluster_a_slurm_run_will_have():
    """A SLURM run starts with its first job alone: size against jobs x processes x threads."""
    pytest.importorskip("dask_jobqueue")
    from dask_jobqueue import SLURMCluster
    from distributed import Client

    from daskmv.engine import auto_partition_rows, expected_threads

    with SLURMCluster(cores=4, processes=2, memory="2GB", scheduler_options={"dashboard_address": ":0"}) as cluster, \
            Client(cluster) as client:
        threads = expected_threads(client, present=0, jobs=8)
        assert threads == 8 * 2 * 2
        assert expected_threads(client, present=0, jobs=None) == 0
    assert auto_partition_rows(100_000, threads) == -(-100_000 // (8 * threads))
    assert auto_partition_rows(100_000, 1) == 1024  # what the first job alone would have chosen


def test_progress_after_a_resume_counts_only_this_runs_rows(dataset, client, tmp_path, run_opts):
    out = tmp_path / "out"
    spec = [{"testops:Slow": {"seconds": 0.01}}]
    first = daskmv.run(str(dataset / "manifest.parquet"), spec, str(out), client=client, partition_rows=16, **run_opts)
    for index in first.computed_partitions[2:]:  # as if the run had been killed after two partitions
        (out / "parts" / f"p{index:06d}.json").unlink()
    r = daskmv.run(str(dataset / "manifest.parquet"), spec, str(out), client=client, **run_opts)
    run = json.loads((out / "run.json").read_text())
    computed_rows = sum(json.loads((out / "parts" / f"p{i:06d}.json").read_text())["rows"]
                        for i in r.computed_partitions)
    assert len(r.skipped_partitions) == 2 and computed_rows == 304 - 32
    assert run["rows_per_second"] == pytest.approx(computed_rows / run["seconds"], rel=0.02)


def test_status_ignores_markers_of_an_earlier_manifests_rows(tmp_path, client, run_opts):
    """The manifest's files change and the rerun is killed early: status counts only markers of these rows."""
    folder = tmp_path / "data"
    folder.mkdir()
    for k in range(64):
        cv2.imwrite(str(folder / f"{k}.png"), np.full((8, 8, 3), k, np.uint8))
        cv2.imwrite(str(folder / f"{k}b.png"), np.full((8, 8, 3), 255 - k, np.uint8))
    frame = pd.DataFrame({"id": [str(k) for k in range(64)], "path": [f"{k}.png" for k in range(64)]})
    frame.to_csv(folder / "m.csv", index=False)
    out = tmp_path / "out"
    slow = tmp_path / "slow.yaml"
    slow.write_text("steps:\n  - testops:Slow: {seconds: 0.05}\n")
    daskmv.run(str(folder / "m.csv"), str(slow), str(out), client=client, partition_rows=8, **run_opts)
    frame["path"] = [f"{k}b.png" for k in range(64)]
    frame.to_csv(folder / "m.csv", index=False)
    proc = subprocess.Popen([*DASKMV, "run", str(folder / "m.csv"), "--pipeline", str(slow), "--out", str(out),
                             "--workers", "1", "--progress", "none"],  # its own workers die with it
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not any(_new_marker(out, p) for p in (out / "parts").glob("p??????.json")):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    new = [p for p in (out / "parts").glob("p??????.json") if _new_marker(out, p)]
    status = json.loads(subprocess.run([*DASKMV, "status", str(out), "--json"], capture_output=True,
                                       text=True).stdout)
    assert 0 < len(new) < 8 and status["partitions_done"] == len(new)
    assert status["done"] == 8 * len(new) and status["pending"] == 64 - 8 * len(new)


def daskmv_id(path: str) -> str:
    from daskmv.manifest import derive_id

    return derive_id(path)


def _new_marker(out: Path, marker: Path) -> bool:
    """Whether a marker belongs to the run now recorded in run.json (its rows' hash is the one recorded)."""
    run = json.loads((out / "run.json").read_text())
    doc = json.loads(marker.read_text())
    hashes = run.get("rows_hashes") or []
    return run.get("state") == "running" and doc["index"] < len(hashes) and hashes[doc["index"]] == doc["rows_hash"]
