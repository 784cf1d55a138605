"""Partition tables are built without pandas: the arrays equal pa.array's, and a worker never imports pandas."""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from daskmv import arrow


@pytest.mark.parametrize("values, type", [
    (["a", None, "ümlaut ☃", ""], pa.string()),
    (["x", None], pa.large_string()),
    ([None, None], pa.string()),
    ([], pa.string()),
    ([True, None, False], pa.bool_()),
    ([1, None, -3], pa.int64()),
    ([1, 2, 250], pa.uint8()),
    ([1.5, None, float("nan"), -0.0], pa.float64()),
    ([0.25, None], pa.float32()),
    (np.array([0.1, 2.0, np.nan]), pa.float64()),
    ([], pa.int32()),
])
def test_arrays_equal_pa_array(values, type):
    got = arrow.array(values, type)
    want = pa.array(values, type)
    got.validate(full=True)
    assert got.type == want.type and got.null_count == want.null_count and len(got) == len(want)
    assert all(a == b or (a != a and b != b) for a, b in zip(got.to_pylist(), want.to_pylist()))  # NaN is NaN


def test_a_worker_runs_a_partition_without_importing_pandas(dataset, tmp_path):
    """pandas cost each worker process 26 MB and 0.2-0.35 s; the task's rows travel as an Arrow table."""
    from daskmv.manifest import read_manifest
    from daskmv.partition import PartitionTask
    from daskmv.pipeline import Pipeline

    manifest = read_manifest(str(dataset / "manifest.parquet"))
    rows = next(manifest.partitions(20))
    pipeline = Pipeline.parse("decode,resize,stats")
    task = PartitionTask(index=0, rows=rows, rows_hash="rows-of-partition-0", fingerprint=pipeline.fingerprint,
                         steps=pipeline.steps(), root=str(tmp_path / "out"), base=manifest.base)
    assert isinstance(task.rows, pa.Table)
    (tmp_path / "task.pkl").write_bytes(pickle.dumps(task))
    code = ("import pickle, sys; from daskmv.partition import run_partition; "
            f"marker = run_partition(pickle.load(open({str(tmp_path / 'task.pkl')!r}, 'rb'))); "
            "print(marker['rows'], marker['ok'], 'pandas' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["20", "20", "False"]


def test_a_task_carries_only_its_own_rows():
    """A partition cut from a large row group (pandas' Arrow-backed columns are slices of it) pickled the
    whole row group into every task: 48 MB per task of a 435,000-row stage."""
    import pandas as pd

    from daskmv.partition import PartitionTask

    big = pa.table({"id": [f"row-{i:07d}" for i in range(200_000)], "path": [f"/d/{i}.jpg" for i in range(200_000)]})
    frame = big.to_pandas(types_mapper={pa.string(): pd.StringDtype("pyarrow")}.get).iloc[1000:1100]
    task = PartitionTask(index=0, rows=frame, rows_hash="h", fingerprint="f", steps=[], root="/tmp/x", base="/tmp")
    assert task.rows.num_rows == 100 and task.rows.column("id").to_pylist() == frame["id"].tolist()
    assert len(pickle.dumps(task)) < 20_000  # the slice alone; the parent row group is 5 MB
