"""End-to-end runs on a real LocalCluster of 2 worker processes, real files and real Zarr on disk."""

from __future__ import annotations

import json
import re
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

import daskmv
from conftest import BAD_FILES, N_GOOD
from daskmv.data import load_output
from daskmv.errors import PipelineError, StoreError
from daskmv.ops.core import stats_reference
from daskmv.store import Store

pytestmark = pytest.mark.slow


def reference_image(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def finished(dataset, client, tmp_path_factory):
    """One complete resize,stats run over the CSV manifest (300 good images, 4 bad rows)."""
    out = tmp_path_factory.mktemp("run") / "out"
    result = daskmv.run(str(dataset / "manifest.csv"), "decode,resize,stats", str(out), client=client,
                        partition_rows=32, progress="none")
    return result, out


def test_every_row_once_with_right_outputs_and_clear_errors(finished, dataset):
    result, out = finished
    frame = pd.read_parquet(out / "manifest.parquet")
    source = pd.read_csv(dataset / "manifest.csv")
    assert len(frame) == len(source) == N_GOOD + len(BAD_FILES)
    assert frame["id"].is_unique
    assert frame["path"].tolist() == source["path"].tolist()  # input order kept
    assert frame["label"].tolist() == source["label"].tolist()
    assert result.counts == {"rows": len(source), "ok": N_GOOD, "error": len(BAD_FILES)}

    bad = frame[frame["status"] == "error"].set_index("path")
    assert sorted(bad.index) == sorted(BAD_FILES)
    assert "probably truncated or corrupt" in bad.loc["bad/truncated.jpg", "error"]
    assert bad.loc["bad/not_an_image.jpg", "error"].startswith("read: cannot decode image")
    assert bad.loc["bad/empty.jpg", "error"].startswith("read: empty file (0 bytes)")
    assert bad.loc["bad/missing.jpg", "error"].startswith("read: file not found")
    assert bad["resized_path"].isna().all() and bad["mean_r"].isna().all()

    good = frame[frame["status"] == "ok"]
    assert good["error"].isna().all() and (good["seconds"] > 0).all()
    manifest = str(out / "manifest.parquet")
    for _, row in good.sample(40, random_state=0).iterrows():
        image = reference_image(dataset / row["path"])
        assert (row["width"], row["height"], row["channels"]) == (image.shape[1], image.shape[0], 3)
        assert row["format"] == ("png" if row["path"].endswith(".png") else "jpeg")
        resized = load_output(manifest, row["id"], "resized")
        assert resized.dtype == np.uint8
        assert (resized == cv2.resize(image, (224, 224), interpolation=cv2.INTER_AREA)).all()
        ref = stats_reference(image)
        for key, value in ref.items():
            assert row[key] == pytest.approx(value, rel=1e-5, abs=1e-3)


def test_output_root_layout(finished, dataset):
    _, out = finished
    top = sorted(p.name for p in out.iterdir())
    assert top == ["errors.log", "manifest.csv", "manifest.parquet", "outputs.zarr", "parts", "run.json"]
    n_parts = -(-(N_GOOD + len(BAD_FILES)) // 32)
    parts = sorted(p.name for p in (out / "parts").iterdir())
    markers = [json.loads((out / "parts" / f"p{i:06d}.json").read_text()) for i in range(n_parts)]
    # one marker per partition, naming its attempt's rows; each attempt's files carry its own token
    attempts = [f"p{i:06d}-{m['token']}" for i, m in enumerate(markers)]
    assert all(re.fullmatch(r"p\d{6}-[0-9a-f]{12}", a) for a in attempts) and len(set(attempts)) == n_parts
    assert [m["part"] for m in markers] == [f"{a}.parquet" for a in attempts]
    assert parts == sorted([f"{a}.parquet" for a in attempts] + [f"p{i:06d}.json" for i in range(n_parts)])
    arrays = sorted(p.name for p in (out / "outputs.zarr" / "resized").iterdir() if p.is_dir())
    assert arrays == attempts  # no lease, no temporary file, no array of another attempt is left
    # Files grow with partitions, not rows: one data file per partition array.
    chunk_files = [f for f in (out / "outputs.zarr" / "resized").rglob("*") if f.is_file() and f.name != "zarr.json"]
    assert len(chunk_files) == n_parts
    run = json.loads((out / "run.json").read_text())
    assert run["state"] == "complete" and run["counts"]["rows"] == N_GOOD + len(BAD_FILES)
    assert run["binding"]["partition_rows"] == 32 and run["partitions"] == n_parts
    assert run["pipeline"]["steps"][1] == {"op": "resize", "params": {"size": [224, 224], "interpolation": "area"}}
    assert "dask" in run["versions"] and "zarr" in run["versions"]
    header, *log_lines = (out / "errors.log").read_text().splitlines()
    assert header == "# time\tworker\tid\top\tmessage"
    assert len(log_lines) == len(BAD_FILES)
    # each failed row: its partition's finish time and worker (from the marker), id, op, message
    frame = pd.read_parquet(out / "manifest.parquet")
    bad = frame[frame["status"] == "error"]
    expected = [[markers[i // 32]["finished"], markers[i // 32]["worker"], row["id"], "read",
                 row["error"].removeprefix("read: ")] for i, row in bad.iterrows()]
    assert [line.split("\t") for line in log_lines] == expected
    assert all(m["worker"].startswith("tcp://") for m in markers)


def test_csv_twin_matches_parquet(finished):
    _, out = finished
    frame = pd.read_parquet(out / "manifest.parquet")
    twin = pd.read_csv(out / "manifest.csv")
    assert twin["id"].tolist() == frame["id"].tolist()
    assert twin["resized_path"].fillna("").tolist() == frame["resized_path"].fillna("").tolist()
    np.testing.assert_allclose(twin["sharpness"].to_numpy(), frame["sharpness"].to_numpy(), rtol=1e-9)


def test_moved_root_still_reads(finished, tmp_path):
    _, out = finished
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    frame = pd.read_parquet(moved / "manifest.parquet")
    row = frame[frame["status"] == "ok"].iloc[3]
    a = load_output(str(moved / "manifest.parquet"), row["id"], "resized")
    b = load_output(str(out / "manifest.parquet"), row["id"], "resized_path")
    assert (a == b).all()
    with pytest.raises(KeyError):
        load_output(str(moved / "manifest.parquet"), "no-such-id", "resized")
    bad = frame[frame["status"] == "error"].iloc[0]
    with pytest.raises(ValueError, match="no 'resized' output"):
        load_output(str(moved / "manifest.parquet"), bad["id"], "resized")


def test_rerun_resumes_everything_and_refuses_another_pipeline(finished, dataset, client):
    result, out = finished
    before = (out / "manifest.parquet").read_bytes()
    again = daskmv.run(str(dataset / "manifest.csv"), "decode,resize,stats", str(out), client=client, progress="none")
    assert again.computed_partitions == [] and len(again.skipped_partitions) == len(result.computed_partitions)
    assert pd.read_parquet(out / "manifest.parquet").equals(pd.read_parquet(pd.io.common.BytesIO(before)))
    with pytest.raises(StoreError, match="made by a different run .*fingerprint"):
        daskmv.run(str(dataset / "manifest.csv"), "decode,resize", str(out), client=client, progress="none")
    with pytest.raises(StoreError, match="partition-rows 32"):
        daskmv.run(str(dataset / "manifest.csv"), "decode,resize,stats", str(out), client=client,
                   partition_rows=64, progress="none")


def test_limit_overwrite_and_parquet_input(dataset, client, tmp_path):
    out = tmp_path / "limited"
    r = daskmv.run(str(dataset / "manifest.parquet"), "resize", str(out), client=client, limit=16, progress="none")
    assert r.counts["rows"] == 16 and not (out / "manifest.csv").exists()
    first = pd.read_parquet(out / "manifest.parquet")
    assert first["path"].tolist() == pd.read_parquet(dataset / "manifest.parquet")["path"].tolist()[:16]
    r = daskmv.run(str(dataset / "manifest.parquet"), [{"resize": {"size": 32}}], str(out), client=client,
                   limit=8, overwrite=True, progress="none")
    frame = pd.read_parquet(out / "manifest.parquet")
    assert len(frame) == 8
    assert load_output(str(out / "manifest.parquet"), frame["id"][0], "resized").shape == (32, 32, 3)


def test_lock_refuses_a_second_run_and_stale_locks_are_taken_over(dataset, client, tmp_path):
    out = tmp_path / "locked"
    out.mkdir()
    (out / "run.lock").write_text(json.dumps({"host": os.uname().nodename, "pid": os.getppid(), "started": "x"}))
    with pytest.raises(StoreError, match="in use by a run"):
        daskmv.run(str(dataset / "manifest.csv"), "resize", str(out), client=client, limit=4, progress="none")
    (out / "run.lock").write_text(json.dumps({"host": os.uname().nodename, "pid": 2**22 + 12345, "started": "x"}))
    r = daskmv.run(str(dataset / "manifest.csv"), "resize", str(out), client=client, limit=4, progress="none")
    assert r.counts["ok"] == 4 and not (out / "run.lock").exists()


def test_hostile_ids_and_paths_never_write_outside_the_root(client, tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    cv2.imwrite(str(images / "a.png"), np.zeros((8, 8, 3), np.uint8))
    ids = ["../../escape", "/abs/olute", "..", "a/../../b", "x\\..\\y", "ok"]
    paths = [str(images / "a.png"), "../imgs/a.png", str(images / "a.png"), "/etc/passwd", "imgs/a.png",
             "../../../../../../etc/hostname"]
    frame = pd.DataFrame({"id": ids, "path": paths})
    (tmp_path / "m").mkdir()
    frame.to_csv(tmp_path / "m" / "manifest.csv", index=False)
    out = tmp_path / "m" / "out"
    before = {p for p in tmp_path.rglob("*")}
    r = daskmv.run(str(tmp_path / "m" / "manifest.csv"), "resize", str(out), client=client, progress="none",
                   max_error_rate=1.0)
    assert r.counts["rows"] == len(ids)
    created = {p for p in tmp_path.rglob("*")} - before
    assert created and all(out in p.parents or p == out for p in created)
    frame = pd.read_parquet(out / "manifest.parquet")
    assert frame["id"].tolist() == ids


def test_row_errors_from_ops_and_batch_isolation(dataset, client, tmp_path):
    out = tmp_path / "flaky"
    r = daskmv.run(str(dataset / "manifest.parquet"), "testops:Flaky,testops:RaisesInBatch", str(out),
                   client=client, batch_size=8, progress="none", max_error_rate=1.0)
    frame = pd.read_parquet(out / "manifest.parquet")
    zero = frame["label"] == 0
    assert (frame.loc[zero, "status"] == "error").all()
    assert frame.loc[zero, "error"].str.startswith("testops:Flaky: ValueError: label 0 is not allowed").all()
    assert (frame.loc[~zero, "status"] == "ok").all()
    assert (frame.loc[~zero, "triple"] == 3 * frame.loc[~zero, "label"]).all()
    assert r.counts["error"] == int(zero.sum())
    # The batch-level exception is pinned on the row that caused it, not on its batch mates.
    out2 = tmp_path / "batch"
    daskmv.run(str(dataset / "manifest.parquet"), "testops:RaisesInBatch", str(out2), client=client,
               batch_size=8, progress="none", max_error_rate=1.0)
    frame = pd.read_parquet(out2 / "manifest.parquet")
    zero = frame["label"] == 0
    assert frame.loc[zero, "error"].str.contains("ZeroDivisionError: label 0 in this batch").all()
    assert (frame.loc[~zero, "status"] == "ok").all()


@pytest.mark.parametrize("kind", ["memory", "cuda"])
def test_out_of_memory_halves_the_batch(dataset, client, tmp_path, kind):
    out = tmp_path / f"oom-{kind}"
    daskmv.run(str(dataset / "manifest.parquet"), [{"testops:MemoryHungry": {"fits": 5, "kind": kind}}], str(out),
               client=client, batch_size=32, partition_rows=64, progress="none")
    frame = pd.read_parquet(out / "manifest.parquet")
    assert (frame["status"] == "ok").all()
    assert frame["batch"].max() <= 5 and frame["batch"].max() >= 4
    markers = [json.loads(p.read_text()) for p in (out / "parts").glob("p*.json")]
    assert sum(m["oom_backoffs"] for m in markers) > 0
    assert all(m["batch_limits"].get("testops:MemoryHungry", 32) <= 5 for m in markers if m["oom_backoffs"])
    row = frame.iloc[17]
    assert (load_output(str(out / "manifest.parquet"), row["id"], "plus_one") == row["label"] + 1).all()


def test_out_of_memory_at_batch_of_one_is_a_row_error(dataset, client, tmp_path):
    out = tmp_path / "oom1"
    daskmv.run(str(dataset / "manifest.parquet"), [{"testops:MemoryHungry": {"fits": 0}}], str(out),
               client=client, limit=6, progress="none", max_error_rate=1.0)
    frame = pd.read_parquet(out / "manifest.parquet")
    assert (frame["status"] == "error").all()
    assert frame["error"].str.contains("out of memory even with a batch of one row").all()


def test_ragged_arrays(dataset, client, tmp_path):
    out = tmp_path / "ragged"
    daskmv.run(str(dataset / "manifest.parquet"), "testops:Ragged", str(out), client=client, limit=20,
               progress="none")
    frame = pd.read_parquet(out / "manifest.parquet")
    for _, row in frame.iterrows():
        seq = load_output(str(out / "manifest.parquet"), row["id"], "seq")
        assert seq.shape == (1, row["label"] + 1) and seq.dtype == np.float32
        assert (seq[0] == np.arange(row["label"] + 1)).all()


def test_retry_errors_recomputes_only_error_rows(dataset, client, tmp_path):
    folder = tmp_path / "data"
    shutil.copytree(dataset, folder)
    out = tmp_path / "retry"
    daskmv.run(str(folder / "manifest.csv"), "resize", str(out), client=client, partition_rows=32, progress="none")
    first = pd.read_parquet(out / "manifest.parquet")
    cv2.imwrite(str(folder / "bad/missing.jpg"), np.full((10, 10, 3), 7, np.uint8))
    r = daskmv.run(str(folder / "manifest.csv"), "resize", str(out), client=client, retry_errors=True,
                   progress="none")
    second = pd.read_parquet(out / "manifest.parquet")
    bad_partitions = sorted({int(i) // 32 for i in first.index[first["status"] == "error"]})
    assert r.computed_partitions == bad_partitions
    fixed = second["path"] == "bad/missing.jpg"
    assert (second.loc[fixed, "status"] == "ok").all()
    # the retried rows' arrays are a new attempt's: the first attempt's files were never touched
    assert (second.loc[fixed, "resized_path"].str.rsplit("#").str[0] != first.loc[fixed, "resized_path"].fillna("")
            .str.rsplit("#").str[0]).all()
    marker = json.loads((out / "parts" / f"p{bad_partitions[0]:06d}.json").read_text())
    assert marker["generation"] == 1 and len(marker["tokens"]) == 2
    assert (load_output(str(out / "manifest.parquet"), second.loc[fixed, "id"].iloc[0], "resized") == 7).all()
    unchanged = ~fixed
    cols = ["id", "status", "error", "resized_path"]
    assert second.loc[unchanged, cols].equals(first.loc[unchanged, cols])
    status = Store(str(out)).status()
    assert status["ok"] == N_GOOD + 1 and status["error"] == len(BAD_FILES) - 1 and status["pending"] == 0


def test_gpu_ops_run_on_cpu_workers_when_no_gpu_is_declared(dataset, client, tmp_path):
    out = tmp_path / "gpu-on-cpu"
    r = daskmv.run(str(dataset / "manifest.parquet"), "testops:WhereAmI", str(out), client=client, limit=40,
                   progress="none")
    assert r.counts["ok"] == 40
    with pytest.raises(daskmv.RunError, match="no worker declares a GPU"):
        daskmv.run(str(dataset / "manifest.parquet"), "testops:WhereAmI", str(tmp_path / "x"), client=client,
                   limit=4, require_gpu=True, progress="none")


def test_bad_pipeline_is_refused_before_any_work(dataset, client, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(daskmv.UsageError, match="unknown run option.*partition_row\\b"):
        daskmv.run(str(dataset / "manifest.csv"), "resize", str(out), client=client, partition_row=5)
    with pytest.raises(PipelineError, match="reads files but the manifest has no column 'nope'"):
        daskmv.run(str(dataset / "manifest.csv"), "resize", str(out), client=client, path_column="nope",
                   progress="none", id_column="path")
    assert not out.exists()


def test_memory_url_manifest_end_to_end(dataset, client, tmp_path):
    import fsspec

    frame = pd.read_csv(dataset / "manifest.csv").iloc[:40]
    frame["path"] = [str(dataset / p) for p in frame["path"]]  # workers are other processes: absolute paths
    with fsspec.open("memory://e2e/manifest.parquet", "wb") as fh:
        frame.to_parquet(fh, index=False)
    out = tmp_path / "mem"
    r = daskmv.run("memory://e2e/manifest.parquet", "resize,stats", str(out), client=client, progress="none")
    assert r.counts == {"rows": 40, "ok": 40, "error": 0}
    got = pd.read_parquet(out / "manifest.parquet")
    assert got["path"].tolist() == frame["path"].tolist()


def test_a_rerun_task_of_a_finished_partition_returns_its_marker(dataset, tmp_path):
    """What the scheduler does when a worker dies holding a finished result: the task runs again."""
    from daskmv.manifest import read_manifest
    from daskmv.partition import PartitionTask, run_partition
    from daskmv.pipeline import Pipeline

    log = tmp_path / "rows.log"
    pipeline = Pipeline.parse([{"testops:CountRuns": {"log": str(log)}}])
    manifest = read_manifest(str(dataset / "manifest.parquet"))
    rows = next(manifest.partitions(10))
    store = Store(str(tmp_path / "out"))
    task = PartitionTask(index=0, rows=rows, rows_hash=manifest.partition_hash(0, 10), fingerprint=pipeline.fingerprint,
                         steps=pipeline.steps(), root=store.root, base=manifest.base)
    first = run_partition(task)
    again = run_partition(task)
    assert len(log.read_text().splitlines()) == 10  # the rows ran once
    assert again["recovered"] and again["started"] == first["started"] and again["processed_rows"] == 10
    task.rows_hash = "different rows"
    run_partition(task)
    assert len(log.read_text().splitlines()) == 20


def test_reduced_decoding_is_an_explicit_run_option(dataset, client, tmp_path, run_opts):
    """--decode-scale 2: outputs near a full decode (stated in the README), file facts unchanged, and a root
    made at one scale is never resumed at another."""
    spec = ["decode", {"resize": {"size": 32}}, "stats"]  # a target smaller than the half-size decode
    full = daskmv.run(str(dataset / "manifest.csv"), spec, str(tmp_path / "full"), client=client, limit=40, **run_opts)
    half = daskmv.run(str(dataset / "manifest.csv"), spec, str(tmp_path / "half"), client=client, limit=40,
                      decode_scale=2, **run_opts)
    a, b = full.manifest().set_index("id"), half.manifest().set_index("id")
    ok = a.index[a["status"] == "ok"]
    assert len(ok) == 40 and (b.loc[ok, "status"] == "ok").all()
    pd.testing.assert_frame_equal(a.loc[ok, ["width", "height", "channels", "format"]],
                                  b.loc[ok, ["width", "height", "channels", "format"]])
    diffs = [np.abs(load_output(full.manifest_path, i, "resized").astype(int)
                    - load_output(half.manifest_path, i, "resized").astype(int)).mean() for i in ok]
    assert 0 < np.mean(diffs) < 3.0  # 1.9 levels measured on these noisy synthetic JPEGs
    # README: per-channel means 0.008 % apart (median), standard deviations 0.35 %. Measured here: means
    # 0.007-0.008 % (median), 0.11 % at most (PNG rows: OpenCV's area shrink rounds halves up, +0.125 levels);
    # standard deviations 0.6-2.4 % (these small noisy images lose more detail at half size than photos do).
    for channel in "rgb":
        mean = (b.loc[ok, f"mean_{channel}"] - a.loc[ok, f"mean_{channel}"]).abs() / a.loc[ok, f"mean_{channel}"]
        assert mean.median() < 2e-4 and mean.max() < 2e-3, (channel, mean.median(), mean.max())
        std = (b.loc[ok, f"std_{channel}"] - a.loc[ok, f"std_{channel}"]).abs() / a.loc[ok, f"std_{channel}"]
        assert std.median() < 0.04, (channel, std.median())
    with pytest.raises(StoreError, match="decode_scale"):
        daskmv.run(str(dataset / "manifest.csv"), spec, str(tmp_path / "half"), client=client, limit=40, **run_opts)
    from daskmv.errors import UsageError

    with pytest.raises(UsageError, match="decode-scale"):
        daskmv.run(str(dataset / "manifest.csv"), "resize", str(tmp_path / "x"), client=client, decode_scale=3,
                   **run_opts)


@pytest.mark.parametrize("threads", [0, 2])
def test_micro_batches_of_large_images_stop_at_a_byte_budget(tmp_path, monkeypatch, threads):
    """32 rows of 12-megapixel photos would not fit in memory: a micro-batch also ends at BATCH_BYTES."""
    import daskmv.partition as partition
    from daskmv.manifest import read_manifest
    from daskmv.pipeline import Pipeline

    monkeypatch.setattr(partition, "BATCH_BYTES", 20 << 20)
    image = np.random.default_rng(0).integers(0, 255, (1500, 2000, 3), dtype=np.uint8)  # 9 MB decoded
    small = np.zeros((16, 16, 3), np.uint8)
    paths = []
    for k in range(10):
        cv2.imwrite(str(tmp_path / f"{k}.png"), image if k < 7 else small)
        paths.append(f"{k}.png")
    pd.DataFrame({"path": paths}).to_csv(tmp_path / "m.csv", index=False)
    pipeline = Pipeline.parse("testops:BatchRows")
    manifest = read_manifest(str(tmp_path / "m.csv"))
    rows = next(manifest.partitions(10))
    task = partition.PartitionTask(index=0, rows=rows, rows_hash=manifest.partition_hash(0, 10),
                                   fingerprint=pipeline.fingerprint, steps=pipeline.steps(),
                                   root=str(tmp_path / "out"), base=manifest.base, decode_threads=threads)
    marker = partition.run_partition(task)
    batches = pd.read_parquet(tmp_path / "out" / "parts" / marker["part"])["batch_rows"].tolist()
    assert batches == [3] * 6 + [4] * 4  # 3 x 9 MB >= 20 MB ends a batch; the last large row and the small ones


def test_read_ahead_holds_at_most_about_two_byte_budgets_from_the_first_row(tmp_path, monkeypatch):
    """Ops slower than decoding, large images: the loader must not decode dozens of rows ahead before it
    knows their size. Memory held by loaded rows stays within two budgets (a batch and the read-ahead)."""
    import tracemalloc

    import daskmv.partition as partition
    from daskmv.manifest import read_manifest
    from daskmv.pipeline import Pipeline

    budget = 8 << 20
    monkeypatch.setattr(partition, "BATCH_BYTES", budget)
    image = np.random.default_rng(1).integers(0, 255, (1000, 1000, 3), dtype=np.uint8)  # 3 MB decoded
    data = cv2.imencode(".png", image)[1].tobytes()
    for k in range(40):
        (tmp_path / f"{k}.png").write_bytes(data)
    pd.DataFrame({"path": [f"{k}.png" for k in range(40)]}).to_csv(tmp_path / "m.csv", index=False)
    pipeline = Pipeline.parse([{"testops:Slow": {"seconds": 0.02}}, "testops:BatchRows"])
    manifest = read_manifest(str(tmp_path / "m.csv"))
    task = partition.PartitionTask(index=0, rows=next(manifest.partitions(40)), rows_hash=manifest.partition_hash(0, 40),
                                   fingerprint=pipeline.fingerprint, steps=pipeline.steps(),
                                   root=str(tmp_path / "out"), base=manifest.base, decode_threads=2)
    partition._op_cache().get(task.fingerprint, task.steps)  # set up outside the measurement
    tracemalloc.start()
    try:
        marker = partition.run_partition(task)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert marker["ok"] == 40
    # two budgets, plus what each of the 2 loader threads holds while it decodes (the file's bytes, the BGR
    # and the RGB copy) and one row over the budget; the old read-ahead decoded all 40 rows (120 MB) at once
    bound = 2 * budget + 2 * 3 * image.nbytes + image.nbytes
    assert peak < bound, f"peak {peak / 2**20:.0f} MB, bound {bound / 2**20:.0f} MB"
