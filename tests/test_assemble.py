"""The final manifest: streamed part by part, with a unifying fallback when parts disagree."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pytest

from daskmv.assemble import ManifestWriter, SchemaMismatch
from daskmv.store import Store


T1, T2 = "2025-01-07T10:42:13.418+00:00", "2025-01-07T10:42:14.002+00:00"


def part(ids, status, **extra):
    cols = {"id": pa.array(ids, pa.string()), **extra,
            "status": pa.array(status, pa.string()),
            "error": pa.array([None if s == "ok" else "read: file not found: x" for s in status], pa.string())}
    return pa.table(cols)


def test_parts_stream_into_manifest_csv_and_errors_log(tmp_path):
    store = Store(str(tmp_path / "out"))
    writer = ManifestWriter(store, csv=True)
    writer.add(part(["a", "b"], ["ok", "error"], x=pa.array([1, 2])), {"time": T1, "worker": "tcp://10.0.0.7:40911"})
    writer.add(part(["c"], ["ok"], x=pa.array([3])), {"time": T2, "worker": "tcp://10.0.0.8:40911"})
    assert not (tmp_path / "out" / "manifest.parquet").exists()  # nothing visible before commit
    counts = writer.commit()
    assert counts == {"rows": 3, "ok": 2, "error": 1}
    frame = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert frame["id"].tolist() == ["a", "b", "c"] and frame["x"].tolist() == [1, 2, 3]
    assert pd.read_csv(tmp_path / "out" / "manifest.csv")["id"].tolist() == ["a", "b", "c"]
    assert (tmp_path / "out" / "errors.log").read_text() == (
        "# time\tworker\tid\top\tmessage\n" f"{T1}\ttcp://10.0.0.7:40911\tb\tread\tfile not found: x\n")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["errors.log", "manifest.csv", "manifest.parquet"]


def test_a_part_with_new_columns_is_refused_and_assemble_unifies(tmp_path):
    store = Store(str(tmp_path / "out"))
    first = part(["a"], ["ok"], x=pa.array([1]))
    second = part(["b"], ["ok"], x=pa.array([2]), y=pa.array(["new"]))
    writer = ManifestWriter(store, csv=False)
    writer.add(first)
    with pytest.raises(SchemaMismatch, match="y"):
        writer.add(second)
    writer.abort()
    assert list((tmp_path / "out").iterdir()) == []
    files = [store.write_part("p000000-000000000000", first), store.write_part("p000001-000000000001", second)]
    store.assemble(files, csv=False)
    frame = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert frame["y"].isna().tolist() == [True, False] and frame["y"][1] == "new" and frame["x"].tolist() == [1, 2]


def test_assemble_logs_each_parts_time_and_worker(tmp_path):
    """The fallback names the same time and worker per part as the streaming writer; unknown ones are -."""
    store = Store(str(tmp_path / "out"))
    files = [store.write_part("p000000-000000000000", part(["a", "b"], ["error", "ok"])),
             store.write_part("p000001-000000000001", part(["c", "d"], ["error", "error"], y=pa.array([1, 2]))),
             store.write_part("p000002-000000000002", part(["e"], ["error"]))]
    counts = store.assemble(files, csv=False, infos=[{"time": T1, "worker": "tcp://10.0.0.7:40911"},
                                                      {"time": T2}, None])
    assert counts == {"rows": 5, "ok": 1, "error": 4}
    assert (tmp_path / "out" / "errors.log").read_text() == (
        "# time\tworker\tid\top\tmessage\n"
        f"{T1}\ttcp://10.0.0.7:40911\ta\tread\tfile not found: x\n"
        f"{T2}\t-\tc\tread\tfile not found: x\n"
        f"{T2}\t-\td\tread\tfile not found: x\n"
        "-\t-\te\tread\tfile not found: x\n")


def test_type_changes_that_cast_are_conformed(tmp_path):
    writer = ManifestWriter(Store(str(tmp_path / "out")), csv=False)
    writer.add(part(["a"], ["ok"], x=pa.array([1.5])))
    writer.add(part(["b"], ["ok"], x=pa.array([2], pa.int64())))
    writer.commit()
    assert pd.read_parquet(tmp_path / "out" / "manifest.parquet")["x"].tolist() == [1.5, 2.0]
