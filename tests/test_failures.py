"""The failure log: errors.log says when, on which worker, in which op and why each row failed, and
``daskmv status OUT --errors`` shows them grouped by kind (the report's groups), in the terminal or as JSON."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timedelta

import cv2
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import daskmv
from conftest import BAD_FILES
from daskmv.cli import app
from daskmv.failures import HEADER, Failure, error_kind, group_failures, parse_log, read_failures

runner = CliRunner()
N_ROWS = 300 + len(BAD_FILES)
FLAKY = 60  # rows 0, 5, ..., 295 have label 0 (row 300, label 0 too, is a truncated file: it fails first)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def status_json(out, *args) -> dict:
    result = invoke("status", out, "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def instant(stamp: str) -> datetime:
    parsed = datetime.fromisoformat(stamp)
    assert parsed.utcoffset() == timedelta(0), stamp  # UTC
    return parsed


@pytest.fixture(scope="module")
def failed_run(dataset, client, tmp_path_factory):
    """decode then testops:Flaky over the 304 rows: 4 unreadable files and 60 rows the op refuses."""
    out = tmp_path_factory.mktemp("failures") / "out"
    result = daskmv.run(str(dataset / "manifest.csv"), "decode,testops:Flaky", str(out), client=client,
                        partition_rows=32, progress="none", max_error_rate=1.0)
    assert result.counts == {"rows": N_ROWS, "ok": N_ROWS - FLAKY - len(BAD_FILES), "error": FLAKY + len(BAD_FILES)}
    return out


@pytest.mark.slow
def test_every_failed_row_is_logged_with_time_worker_op_and_message(failed_run, client):
    out = failed_run
    failures = read_failures(str(out))
    frame = pd.read_parquet(out / "manifest.parquet")
    bad = frame[frame["status"] == "error"]
    assert [f.id for f in failures] == bad["id"].tolist()  # one line per failed row, in manifest order
    assert [f.error for f in failures] == bad["error"].tolist()  # op + message: the manifest's error
    run = json.loads((out / "run.json").read_text())
    markers = {m["index"]: m for m in (json.loads(p.read_text()) for p in (out / "parts").glob("p??????.json"))}
    workers = set(client.scheduler_info()["workers"])
    for failure, index in zip(failures, bad.index):
        marker = markers[index // 32]
        assert (failure.time, failure.worker) == (marker["finished"], marker["worker"])  # its partition's
        assert instant(run["started"]) <= instant(failure.time) <= instant(run["finished"])
        assert failure.worker.startswith("tcp://") and failure.worker in workers
    flaky = [f for f in failures if f.op == "testops:Flaky"]
    assert len(flaky) == FLAKY
    assert all(f.kind == "testops:Flaky: ValueError" and f.message.startswith("ValueError: label 0 is not allowed")
               for f in flaky)
    unread = [f for f in failures if f.op != "testops:Flaky"]
    assert len(unread) == len(BAD_FILES) and {f.op for f in unread} == {"read"}
    (missing,) = [f for f in unread if f.message.startswith("file not found: ")]
    assert missing.message.endswith("bad/missing.jpg") and missing.kind == "read"


@pytest.mark.slow
def test_status_errors_groups_failures_by_kind(failed_run):
    info = status_json(failed_run, "--errors")
    assert info["done"] == N_ROWS and info["error"] == FLAKY + len(BAD_FILES)  # the usual status is all there
    groups = info["errors"]
    assert all(g["level"] == "row" for g in groups)  # no partition attempt failed
    assert sum(g["count"] for g in groups) == FLAKY + len(BAD_FILES)
    first = groups[0]  # most frequent first
    assert first["kind"] == "testops:Flaky: ValueError" and first["count"] == FLAKY
    assert first["message"].startswith("testops:Flaky: ValueError: label 0 is not allowed (row ")
    frame = pd.read_parquet(failed_run / "manifest.parquet")
    assert first["ids"] == frame.loc[frame["label"] == 0, "id"].tolist()[:3]
    assert instant(first["first"]) <= instant(first["last"])
    assert len(first["workers"]) >= 1 and all(w.startswith("tcp://") for w in first["workers"])
    reads = [g for g in groups if g["kind"] == "read"]
    assert sum(g["count"] for g in reads) == len(BAD_FILES) and len(groups) == 1 + len(reads)
    (missing,) = [g for g in reads if g["message"].startswith("read: file not found: ")]
    assert missing["count"] == 1 and missing["ids"] == frame.loc[frame["path"] == "bad/missing.jpg", "id"].tolist()
    assert missing["first"] == missing["last"] and len(missing["workers"]) == 1
    assert [g["count"] for g in groups] == sorted((g["count"] for g in groups), reverse=True)
    # the terminal: the usual status lines, then the same groups as a table
    text = invoke("status", failed_run, "--errors")
    assert text.exit_code == 0, text.output
    assert "done 304 (ok 240, error 64)" in text.stdout
    assert f"{FLAKY + len(BAD_FILES)} failed row(s) in {len(groups)} kind(s)" in text.stdout
    lines = text.stdout.splitlines()
    (flaky,) = [k for k, line in enumerate(lines) if line.split("│")[1:2] == ["   60 "]]  # the group's row
    assert "testops:Flaky:" in lines[flaky] and "label 0 is not allowed" in text.stdout
    assert "file not found: " in text.stdout and first["workers"][0] in text.stdout
    assert "failed partition attempt" not in text.stdout
    # without --errors, nothing changes
    assert "errors" not in status_json(failed_run) and "failed row" not in invoke("status", failed_run).stdout


@pytest.mark.slow
def test_the_old_three_column_log_still_reads(failed_run, tmp_path):
    """A root written before errors.log had times and workers: same ids, ops, messages and groups."""
    old = tmp_path / "old"
    shutil.copytree(failed_run, old)
    new = read_failures(str(old))
    (old / "errors.log").write_text("".join(f"{f.id}\t{f.op}\t{f.message}\n" for f in new))
    got = read_failures(str(old))
    assert [(f.id, f.op, f.message, f.kind, f.pattern) for f in got] == \
        [(f.id, f.op, f.message, f.kind, f.pattern) for f in new]
    assert all(f.time is None and f.worker is None for f in got)
    groups = status_json(old, "--errors")["errors"]
    assert [(g["kind"], g["count"]) for g in groups] == \
        [(g["kind"], g["count"]) for g in status_json(failed_run, "--errors")["errors"]]
    assert all(g["first"] is None and g["last"] is None and g["workers"] == [] for g in groups)
    assert invoke("status", old, "--errors").exit_code == 0


@pytest.mark.slow
def test_a_run_that_did_not_finish_reads_its_finished_partitions(failed_run, tmp_path):
    """No errors.log yet (killed mid-run): the failures of the partitions that finished, with their markers'
    time and worker."""
    killed = tmp_path / "killed"
    shutil.copytree(failed_run, killed)
    run = json.loads((killed / "run.json").read_text())
    (killed / "run.json").write_text(json.dumps({**run, "state": "running"}))
    (killed / "errors.log").unlink()
    (killed / "parts" / "p000000.json").unlink()  # partition 0 had not finished
    got = read_failures(str(killed))
    expected = read_failures(str(failed_run))[len(range(0, 32, 5)):]
    assert [(f.time, f.worker, f.id, f.op, f.message) for f in got] == \
        [(f.time, f.worker, f.id, f.op, f.message) for f in expected]
    info = status_json(killed, "--errors")
    assert info["state"] == "interrupted" and sum(g["count"] for g in info["errors"]) == len(expected)


def test_parse_log_reads_both_formats_and_unknowns():
    new = parse_log([HEADER, "2025-01-07T10:42:13.418+00:00\ttcp://10.0.0.7:40911\ta\tread\tfile not found: /x/1.jpg\n",
                     "-\t-\tb\tresize\tValueError: size 12\twith a tab\n"])
    assert list(new) == [
        Failure("2025-01-07T10:42:13.418+00:00", "tcp://10.0.0.7:40911", "a", "read", "file not found: /x/1.jpg"),
        Failure(None, None, "b", "resize", "ValueError: size 12\twith a tab")]
    (old,) = parse_log(["b\tresize\tValueError: size 12\n"])
    assert (old.time, old.worker, old.id, old.op, old.message) == (None, None, "b", "resize", "ValueError: size 12")
    assert (old.kind, old.pattern) == error_kind("resize: ValueError: size 12") == ("resize: ValueError", "size <n>")
    assert list(parse_log([HEADER])) == [] and list(parse_log([])) == []


def test_partition_attempts_group_by_exception_type():
    attempts = [{"index": 3, "attempt": 1, "time": "2025-01-07T10:00:01.000+00:00",
                 "error": "KilledWorker: Attempted to run task 'x' on 2 different workers, but all those workers "
                          "died while running it. The last worker that attempt to run the task was "
                          "tcp://127.0.0.1:39999."},
                {"index": 3, "attempt": 2, "time": "2025-01-07T10:00:05.000+00:00",
                 "error": "KilledWorker: Attempted to run task 'x' on 2 different workers, but all those workers "
                          "died while running it. The last worker that attempt to run the task was "
                          "tcp://127.0.0.1:40001."},
                {"index": 7, "attempt": 1, "time": "2025-01-07T10:00:02.000+00:00",
                 "error": "cancelled: the task was cancelled outside this run"}]
    killed, cancelled = group_failures([], attempts)
    assert (killed["kind"], killed["count"], killed["level"]) == ("partition: KilledWorker", 2, "partition")
    assert killed["workers"] == ["tcp://127.0.0.1:39999", "tcp://127.0.0.1:40001"]
    assert killed["ids"] == ["p000003 #1", "p000003 #2"]
    assert (killed["first"], killed["last"]) == ("2025-01-07T10:00:01.000+00:00", "2025-01-07T10:00:05.000+00:00")
    assert (cancelled["kind"], cancelled["count"], cancelled["ids"]) == ("partition: cancelled", 1, ["p000007 #1"])


@pytest.mark.slow
def test_a_failed_model_load_shows_as_a_partition_group(dataset, client, tmp_path):
    out = tmp_path / "out"
    r = daskmv.run(str(dataset / "manifest.parquet"), [{"testops:FailsFirstSetup": {"flag": str(tmp_path / "f")}}],
                   str(out), client=client, partition_rows=64, retry_delay=0.2, progress="none", limit=128)
    assert r.complete and r.counts["error"] == 0
    (attempt,) = json.loads((out / "run.json").read_text())["failed_attempts"]
    (group,) = status_json(out, "--errors")["errors"]
    assert (group["kind"], group["count"], group["level"]) == ("partition: SetupFailed", 1, "partition")
    assert "model failed to load" in group["message"] and group["first"] == group["last"] == attempt["time"]
    assert group["ids"] == [f"p{attempt['index']:06d} #1"]
    assert len(group["workers"]) == 1 and group["workers"][0] in client.scheduler_info()["workers"]
    text = invoke("status", out, "--errors").stdout
    assert "no failed rows" in text and "1 failed partition attempt(s) in 1 kind(s)" in text
    assert "partition:" in text and "SetupFailed" in text and group["ids"][0] in text


@pytest.mark.slow
def test_a_root_without_errors(dataset, client, tmp_path):
    out = tmp_path / "out"
    daskmv.run(str(dataset / "manifest.csv"), "decode", str(out), client=client, limit=20, progress="none")
    assert (out / "errors.log").read_text() == HEADER
    assert read_failures(str(out)) == []
    assert status_json(out, "--errors")["errors"] == []
    text = invoke("status", out, "--errors")
    assert text.exit_code == 0 and "no failed rows" in text.stdout and "kind" not in text.stdout


@pytest.mark.slow
def test_a_staged_root_logs_each_row_as_its_last_stage_did(client, tmp_path):
    """pairs between two ops: the top-level errors.log holds the last stage's lines, times and workers."""
    rng = np.random.default_rng(5)
    (tmp_path / "img").mkdir()
    rows = []
    for k, scene in enumerate("aaab"):
        cv2.imwrite(str(tmp_path / f"img/{k}.png"), rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
        rows.append({"path": f"img/{k}.png", "scene": scene})
    (tmp_path / "img" / "1.png").write_bytes(b"not an image")
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    out = tmp_path / "out"
    r = daskmv.run(str(tmp_path / "m.csv"), ["testops:Thumb", {"pairs": {"by": "scene"}}, "testops:PairDiff"],
                   str(out), client=client, progress="none", max_error_rate=1.0)
    top = read_failures(str(out))
    last = read_failures(r.stages[-1].out)
    assert [(f.time, f.worker, f.id, f.op, f.message) for f in top] == \
        [(f.time, f.worker, f.id, f.op, f.message) for f in last]
    frame = r.manifest()
    assert [f.id for f in top] == frame.loc[frame["status"] == "error", "id"].tolist() and len(top) == 3
    assert all(f.op == "upstream" and f.worker.startswith("tcp://") and instant(f.time) for f in top)
    groups = status_json(out, "--errors")["errors"]
    assert sum(g["count"] for g in groups) == 3 and {g["kind"] for g in groups} == {"upstream"}
