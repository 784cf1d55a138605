"""Manifests: formats, URLs, ids, pre-flight errors, partitioning."""

from __future__ import annotations

import fsspec
import numpy as np
import pandas as pd
import pytest

from daskmv.errors import ManifestError
from daskmv.manifest import derive_id, read_manifest, resolve_path


def write(tmp_path, frame, name="m.csv"):
    path = tmp_path / name
    if name.endswith(".csv"):
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False)
    return str(path)


@pytest.mark.parametrize("name", ["m.csv", "m.parquet"])
def test_reads_csv_and_parquet_with_derived_ids(tmp_path, name):
    frame = pd.DataFrame({"path": [f"a/{i}.jpg" for i in range(10)], "label": range(10)})
    m = read_manifest(write(tmp_path, frame, name))
    assert m.n_rows == 10 and m.format == name.split(".")[1]
    assert m.id_column is None
    rows = pd.concat(m.partitions(4))
    assert rows["id"].tolist() == [derive_id(f"a/{i}.jpg") for i in range(10)]
    assert rows["label"].tolist() == list(range(10))
    assert list(rows.columns)[:2] == ["id", "path"]


def test_derived_ids_are_stable_readable_and_distinct():
    assert derive_id("x/img 01.jpg") == derive_id("x/img 01.jpg")
    assert derive_id("x/img 01.jpg").startswith("img_01-")
    assert derive_id("a/0001.jpg") != derive_id("b/0001.jpg")
    assert "/" not in derive_id("../../etc/passwd")


def test_id_column_and_existing_id_column(tmp_path):
    frame = pd.DataFrame({"path": ["a.jpg", "b.jpg"], "key": [7, 8]})
    m = read_manifest(write(tmp_path, frame), id_column="key")
    assert pd.concat(m.partitions(10))["id"].tolist() == ["7", "8"]
    frame = pd.DataFrame({"id": ["x", "y"], "path": ["a.jpg", "b.jpg"]})
    m = read_manifest(write(tmp_path, frame, "n.csv"))
    assert m.id_column == "id"
    assert pd.concat(m.partitions(10))["id"].tolist() == ["x", "y"]


def test_memory_and_file_urls(tmp_path):
    frame = pd.DataFrame({"path": ["p/1.jpg", "p/2.jpg", "p/3.jpg"]})
    with fsspec.open("memory://manifests/m.parquet", "wb") as fh:
        frame.to_parquet(fh, index=False)
    m = read_manifest("memory://manifests/m.parquet")
    assert m.n_rows == 3
    assert m.resolve("p/1.jpg") == "memory://manifests/p/1.jpg"
    with fsspec.open("memory://manifests/m.csv", "w") as fh:
        frame.to_csv(fh, index=False)
    assert read_manifest("memory://manifests/m.csv").n_rows == 3
    local = write(tmp_path, frame)
    m = read_manifest(f"file://{local}")
    assert m.n_rows == 3
    assert m.resolve("p/1.jpg") == str(tmp_path / "p/1.jpg")


def test_relative_paths_resolve_against_the_manifest_folder(tmp_path):
    frame = pd.DataFrame({"path": ["rel/a.jpg", "/abs/b.jpg", "s3://bucket/c.jpg"]})
    (tmp_path / "sub").mkdir()
    m = read_manifest(write(tmp_path / "sub", frame), check=False)
    assert m.resolve("rel/a.jpg") == str(tmp_path / "sub" / "rel/a.jpg")
    assert m.resolve("/abs/b.jpg") == "/abs/b.jpg"
    assert m.resolve("s3://bucket/c.jpg") == "s3://bucket/c.jpg"
    assert resolve_path("x.jpg", "memory://root") == "memory://root/x.jpg"


@pytest.mark.parametrize(
    ("frame", "kwargs", "message"),
    [
        (pd.DataFrame({"file": ["a.jpg"]}), {}, "has no column 'path'"),
        (pd.DataFrame({"path": ["a.jpg"]}), {"id_column": "key"}, "has no column 'key'"),
        (pd.DataFrame({"path": ["a.jpg", "b.jpg", "a.jpg"]}), {}, "duplicate paths"),
        (pd.DataFrame({"path": ["a.jpg", "b.jpg"], "key": [1, 1]}), {"id_column": "key"}, "duplicate ids in column 'key': '1'"),
        (pd.DataFrame({"path": pd.Series([], dtype=str)}), {}, "has no rows"),
        (pd.DataFrame({"path": ["a.jpg", "foo://b.jpg"]}), {}, "unknown URL scheme 'foo://'"),
        (pd.DataFrame({"path": ["a.jpg", None]}), {}, "column 'path' is empty in row 1"),
    ],
)
def test_preflight_errors_are_one_clear_line(tmp_path, frame, kwargs, message):
    with pytest.raises(ManifestError, match=message.replace("(", r"\(")) as info:
        read_manifest(write(tmp_path, frame, "m.parquet"), **kwargs)
    assert "\n" not in str(info.value)


def test_unknown_schemes_missing_files_and_formats(tmp_path):
    with pytest.raises(ManifestError, match="unknown URL scheme 'nope://'"):
        read_manifest("nope://bucket/m.csv")
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(str(tmp_path / "absent.csv"))
    (tmp_path / "m.txt").write_text("path\na.jpg\n")
    with pytest.raises(ManifestError, match="unknown format"):
        read_manifest(str(tmp_path / "m.txt"))
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ManifestError, match="cannot read manifest"):
        read_manifest(str(tmp_path / "broken.parquet"))


def test_limit_and_stable_partitions(tmp_path):
    frame = pd.DataFrame({"path": [f"{i}.jpg" for i in range(23)]})
    url = write(tmp_path, frame)
    m = read_manifest(url, limit=10)
    assert m.n_rows == 10
    parts = list(m.partitions(4))
    assert [len(p) for p in parts] == [4, 4, 2]
    assert m.partition_count(4) == 3
    again = [p["id"].tolist() for p in read_manifest(url, limit=10).partitions(4)]
    assert again == [p["id"].tolist() for p in parts]
    with pytest.raises(ManifestError):
        read_manifest(url, limit=0)


def test_parquet_directory_of_several_files_keeps_order(tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    for k in range(3):
        pd.DataFrame({"path": [f"{k}-{i}.jpg" for i in range(5)]}).to_parquet(folder / f"part-{k}.parquet")
    m = read_manifest(str(folder))
    assert m.n_rows == 15
    assert pd.concat(m.partitions(100))["path"].tolist() == [f"{k}-{i}.jpg" for k in range(3) for i in range(5)]


def test_tsv_and_compressed_csv(tmp_path):
    frame = pd.DataFrame({"path": ["a.jpg", "b c.jpg"], "label": [1, 2]})
    frame.to_csv(tmp_path / "m.tsv", sep="\t", index=False)
    frame.to_csv(tmp_path / "m.csv.gz", index=False, compression="gzip")
    for name in ("m.tsv", "m.csv.gz"):
        m = read_manifest(str(tmp_path / name))
        assert m.format == "csv" and m.n_rows == 2
        assert pd.concat(m.partitions(5))["path"].tolist() == ["a.jpg", "b c.jpg"]


def test_reading_a_manifest_raises_no_warning_where_warnings_are_errors(tmp_path):
    """dask calls a pandas API pandas deprecates; a user whose warnings are errors must still read manifests."""
    import warnings

    pd.DataFrame({"path": ["a.jpg", "b.jpg"]}).to_parquet(tmp_path / "m.parquet", index=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = read_manifest(str(tmp_path / "m.parquet"))
        assert [len(p) for p in m.partitions(10)] == [2]


@pytest.mark.filterwarnings("ignore:The inplace keyword")  # inside dask, reading the indexed file
@pytest.mark.parametrize("index", [False, None, "label"])
def test_a_parquet_files_row_groups_are_the_partitions_dask_reads(tmp_path, index):
    """A single Parquet file is read with pyarrow, row group by row group: the same partitions, values and
    dtypes as dd.read_parquet(split_row_groups=True), which the driver then need not import."""
    import datetime

    import dask.dataframe as dd

    from daskmv.manifest import ParquetFile

    n = 50
    frame = pd.DataFrame({
        "path": [f"img/{i}.jpg" if i % 7 else None for i in range(n)],
        "label": np.arange(n) % 3,
        "score": np.where(np.arange(n) % 5 == 0, np.nan, np.arange(n) / 7),
        "flag": np.arange(n) % 2 == 0,
        "when": pd.date_range("2024-01-01", periods=n, freq="h"),
        "day": [datetime.date(2024, 1, 1 + i % 28) for i in range(n)],
        "kind": pd.Categorical(["cat", "dog"] * (n // 2)),
        "count": pd.array([1, None] * (n // 2), dtype="Int64"),
    })
    if index == "label":
        frame = frame.set_index("label")
    url = str(tmp_path / "m.parquet")
    frame.to_parquet(url, index=index if index != "label" else None, row_group_size=16)
    manifest = read_manifest(url, check=False)
    assert isinstance(manifest.source, ParquetFile)
    ddf = dd.read_parquet(url, split_row_groups=True)
    assert manifest.columns == [str(c) for c in ddf.columns]
    for columns in (None, ["path", "score"]):
        ours = list(manifest._source_partitions(columns))
        theirs = [p.compute(scheduler="sync").reset_index(drop=True)
                  for p in (ddf if columns is None else ddf[columns]).to_delayed()]
        assert len(ours) == len(theirs) == 4
        for a, b in zip(ours, theirs):
            pd.testing.assert_frame_equal(a, b)
