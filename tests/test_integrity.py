"""Data integrity: attempts that never overwrite each other, one durable commit point, garbage collected."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from distributed import Client, LocalCluster

import daskmv
from conftest import wait_for
from daskmv.data import load_output
from daskmv.store import Store, parse_attempt

pytestmark = pytest.mark.slow
DASKMV = [sys.executable, "-m", "daskmv.cli"]


def attempts_on_disk(out: Path) -> set[str]:
    """Every attempt name that has a file or folder in the root."""
    names = {p.name.split(".")[0] for p in (out / "parts").iterdir()}
    names |= {p.name for p in (out / "outputs.zarr" / "small").iterdir()}
    return {n for n in names if parse_attempt(n)}


def leases_of(out: Path, pid: int) -> list[Path]:
    found = []
    for p in (out / "parts").glob("*.lease"):
        try:
            if json.loads(p.read_text()).get("pid") == pid:
                found.append(p)
        except (OSError, ValueError):
            pass
    return found


def test_orphan_attempts_of_a_crashed_driver_never_touch_the_committed_data(dataset, client, tmp_path):
    """A driver dies on a tcp:// cluster while two tasks run; they go on as orphans. A resumed run commits
    every partition; then one orphan writes and is killed mid-write, the other finishes. The manifest reads
    back every array bit-exactly, the late orphan does not replace the marker, and --gc removes the rest."""
    holds = tmp_path / "holds"
    holds.mkdir()
    spec = json.dumps([{"testops:Gate": {"dir": str(holds)}}])
    pipeline = tmp_path / "gate.yaml"
    pipeline.write_text(f"steps: {spec}\n")
    manifest = str(dataset / "manifest.csv")
    reference = daskmv.run(manifest, str(pipeline), str(tmp_path / "ref"), client=client, partition_rows=16,
                           batch_size=4, progress="none")
    out = tmp_path / "out"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as orphans:
        pids = orphans.run(os.getpid)
        for pid in pids.values():  # every task of these workers stops before its first and second batch
            for n in (0, 1):
                (holds / f"hold-{pid}-{n}").touch()
        driver = subprocess.Popen([*DASKMV, "run", manifest, "--pipeline", str(pipeline), "--out", str(out),
                                   "--cluster", cluster.scheduler_address, "--partition-rows", "16",
                                   "--batch-size", "4", "--progress", "none"],
                                  start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: all((holds / f"at-{pid}-0").exists() for pid in pids.values()), what="two tasks held")
        finally:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
        # The resumed run (on other workers) computes and commits every partition.
        resumed = daskmv.run(manifest, str(pipeline), str(out), client=client, batch_size=4, progress="none")
        assert resumed.complete and resumed.counts == reference.counts
        markers_before = {p.name: p.read_text() for p in (out / "parts").glob("p??????.json")}
        stuck, late = sorted(pids.values())
        # One orphan writes its first batch and is killed before its second: a crash mid-write.
        (holds / f"hold-{stuck}-0").unlink()
        wait_for(lambda: (holds / f"at-{stuck}-1").exists(), what="the first orphan mid-write")
        os.kill(stuck, signal.SIGKILL)
        # The other finishes its partition after the resumed run committed it.
        (holds / f"hold-{late}-0").unlink()
        (holds / f"hold-{late}-1").unlink()
        wait_for(lambda: (holds / f"at-{late}-0").exists() and not leases_of(out, late), what="the late orphan")
    assert {p.name: p.read_text() for p in (out / "parts").glob("p??????.json")} == markers_before

    def same_arrays() -> None:
        got = pd.read_parquet(out / "manifest.parquet")
        want = pd.read_parquet(tmp_path / "ref" / "manifest.parquet")
        assert got["id"].tolist() == want["id"].tolist() and got["status"].tolist() == want["status"].tolist()
        for row_id in got.loc[got["status"] == "ok", "id"]:
            a = load_output(str(out / "manifest.parquet"), row_id, "small")
            b = load_output(str(tmp_path / "ref" / "manifest.parquet"), row_id, "small")
            assert a.tobytes() == b.tobytes(), row_id

    same_arrays()
    referenced = {f"p{m['index']:06d}-{t}" for m in map(json.loads, markers_before.values()) for t in m["tokens"]}
    left = attempts_on_disk(out) - referenced
    assert left, "the killed orphan's files should still be there (its lease looks alive)"
    status = subprocess.run([*DASKMV, "status", str(out), "--gc", "--grace", "0", "--json"],
                            capture_output=True, text=True)
    assert status.returncode == 0, status.stderr
    assert sorted(json.loads(status.stdout)["garbage"]["attempts"]) == sorted(left)
    assert attempts_on_disk(out) == referenced and not list((out / "parts").glob("*.lease"))
    same_arrays()


ATTEMPT = """
import json, os, sys
from daskmv.manifest import read_manifest
from daskmv.partition import PartitionTask, run_partition
from daskmv.pipeline import Pipeline

manifest, root, holds, held = sys.argv[1:5]
for n in range(int(held)):
    open(os.path.join(holds, f"hold-{os.getpid()}-{n}"), "w").close()
pipeline = Pipeline.parse([{"testops:Gate": {"dir": holds}}])
m = read_manifest(manifest)
task = PartitionTask(index=0, rows=next(m.partitions(12)), rows_hash=m.partition_hash(0, 12),
                     fingerprint=pipeline.fingerprint, steps=pipeline.steps(), root=root, base=m.base,
                     batch_size=4, decode_threads=0)
print(json.dumps(run_partition(task)))
"""


def test_a_late_attempt_returns_the_committed_marker_and_leaves_no_files(dataset, tmp_path):
    """Two attempts of the same work in two processes: the first to commit wins; the other, which started
    before any marker existed and finishes after, returns that marker and keeps nothing of its own."""
    out = tmp_path / "out"
    args = [str(dataset / "manifest.parquet"), str(out), str(tmp_path)]
    slow = subprocess.Popen([sys.executable, "-c", ATTEMPT, *args, "1"], stdout=subprocess.PIPE, text=True)
    wait_for(lambda: (tmp_path / f"at-{slow.pid}-0").exists(), what="the slow attempt to start")
    fast = subprocess.run([sys.executable, "-c", ATTEMPT, *args, "0"], capture_output=True, text=True)
    assert fast.returncode == 0, fast.stderr
    first = json.loads(fast.stdout)
    (tmp_path / f"hold-{slow.pid}-0").unlink()
    second = json.loads(slow.communicate(timeout=120)[0])
    assert second["recovered"] and second["token"] == first["token"] and "recovered" not in first
    assert Store(str(out)).marker(0).token == first["token"]
    assert {p.name for p in (out / "parts").iterdir()} == {"p000000.json", first["part"]}
    assert [p.name for p in (out / "outputs.zarr" / "small").iterdir()] == [f"p000000-{first['token']}"]


def test_commit_points_are_fsynced_before_they_are_published(dataset, tmp_path, monkeypatch):
    """Every file a marker vouches for is on disk (fsynced) before the marker's name appears, and the
    marker itself is fsynced before it is linked into place; the final manifest's files likewise."""
    from daskmv.manifest import read_manifest
    from daskmv.partition import PartitionTask, run_partition
    from daskmv.pipeline import Pipeline

    events: list[tuple[str, str]] = []
    real_fsync, real_link, real_replace, real_rename = os.fsync, os.link, os.replace, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def link(src, dst, *a, **k):
        events.append(("publish", str(dst)))
        return real_link(src, dst, *a, **k)

    def replace(src, dst, *a, **k):
        events.append(("publish", str(dst)))
        return real_replace(src, dst, *a, **k)

    def rename(src, dst, *a, **k):
        events.append(("publish", str(dst)))
        return real_rename(src, dst, *a, **k)

    for name, fn in (("fsync", fsync), ("link", link), ("replace", replace), ("rename", rename)):
        monkeypatch.setattr(os, name, fn)
    pipeline = Pipeline.parse(["resize", "stats"])
    manifest = read_manifest(str(dataset / "manifest.parquet"))
    rows = next(manifest.partitions(10))
    out = tmp_path / "out"
    task = PartitionTask(index=0, rows=rows, rows_hash=manifest.partition_hash(0, 10),
                         fingerprint=pipeline.fingerprint, steps=pipeline.steps(), root=str(out),
                         base=manifest.base, decode_threads=0)
    marker = run_partition(task)
    attempt = f"p000000-{marker['token']}"
    published = events.index(("publish", str(out / "parts" / "p000000.json")))
    synced = {path for kind, path in events[:published] if kind == "fsync"}
    shard = out / "outputs.zarr" / "resized" / attempt / "c" / "0" / "0" / "0"
    meta = out / "outputs.zarr" / "resized" / attempt / "zarr.json"
    assert {str(shard), str(meta)} <= synced
    part = str(out / "parts" / marker["part"])
    assert any(p.startswith(part + ".tmp-") for p in synced) and ("publish", part) in events[:published]
    assert any(p.startswith(str(out / "parts" / "p000000.json.tmp-")) for p in synced)  # the marker's own bytes
    assert ("fsync", str(out / "parts")) in events[published:]  # and its name

    events.clear()
    from daskmv.assemble import ManifestWriter

    writer = ManifestWriter(Store(str(out)), csv=True)
    writer.add(Store(str(out)).read_part(0))
    writer.commit()
    publishes = [Path(p).name for kind, p in events if kind == "publish"]
    assert publishes[-1] == "manifest.parquet" and set(publishes) == {"manifest.parquet", "manifest.csv",
                                                                      "errors.log"}
    first_publish = next(i for i, (kind, _) in enumerate(events) if kind == "publish")
    synced = [Path(p).name for kind, p in events[:first_publish] if kind == "fsync"]
    assert len([n for n in synced if n.startswith(("manifest.parquet.tmp", "manifest.csv.tmp", "errors.log.tmp"))]) == 3
    assert ("fsync", str(out)) in events[first_publish:]
