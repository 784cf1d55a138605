"""Reading outputs back: ManifestDataset in a torch DataLoader with worker processes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

import daskmv
from daskmv.data import ManifestDataset, load_output

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_run(dataset, client, tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "out"
    daskmv.run(str(dataset / "manifest.csv"), [{"resize": {"size": 32}}, "stats"], str(out), client=client,
               progress="none")
    return out / "manifest.parquet"


def test_dataset_items_and_error_rows_skipped(small_run):
    ds = ManifestDataset(str(small_run), columns=["resized", "mean_r", "label"])
    frame = pd.read_parquet(small_run)
    ok = frame[frame["status"] == "ok"].reset_index(drop=True)
    assert len(ds) == len(ok) == 300
    item = ds[7]
    assert item["id"] == ok["id"][7]
    assert item["resized"].shape == (32, 32, 3) and item["resized"].dtype == np.uint8
    assert (item["resized"] == load_output(str(small_run), item["id"], "resized")).all()
    assert item["mean_r"] == pytest.approx(ok["mean_r"][7]) and item["label"] == ok["label"][7]
    everything = ManifestDataset(str(small_run), columns=["resized"], include_errors=True)
    assert len(everything) == 304
    errors = [everything[i] for i in range(304) if everything.frame["id"][i] not in set(ok["id"])]
    assert len(errors) == 4 and all(e["resized"] is None for e in errors)
    with pytest.raises(KeyError, match="no column or array output 'nope'"):
        ManifestDataset(str(small_run), columns=["nope"])


def test_dataloader_with_two_worker_processes(small_run):
    ds = ManifestDataset(str(small_run), columns=["resized", "sharpness"])
    loader = DataLoader(ds, batch_size=16, num_workers=2, shuffle=False)
    seen = []
    for batch in loader:
        assert batch["resized"].dtype == torch.uint8 and batch["resized"].shape[1:] == (32, 32, 3)
        assert batch["sharpness"].dtype == torch.float64
        seen += list(batch["id"])
        first = load_output(str(small_run), batch["id"][0], "resized")
        assert (batch["resized"][0].numpy() == first).all()
    assert seen == ds.frame["id"].tolist()


# -- reruns in the same process ----------------------------------------------------------------------
def _good_rows_manifest(dataset, path, order):
    """A CSV of 48 good images (absolute paths, given ids) in ``order``: a different manifest per order."""
    names = [f"img/{i:04d}.{'png' if i % 10 == 0 else 'jpg'}" for i in range(48)]
    frame = pd.DataFrame({"id": [f"row{i:02d}" for i in range(48)], "path": [str(dataset / n) for n in names]})
    frame.iloc[list(order)].to_csv(path, index=False)
    return str(path)


def _read_independently(manifest, row_id, column="resized"):
    """A row's array straight from the manifest's reference with Zarr: no daskmv read code involved."""
    import zarr

    frame = pd.read_parquet(manifest).set_index("id")
    path, _, row = frame.loc[row_id, f"{column}_path"].rpartition("#")
    return np.asarray(zarr.open_array(str(manifest.parent / path), mode="r")[int(row)])


def test_load_output_reads_a_rerun_in_the_same_process(dataset, client, tmp_path):
    """A notebook: run, read, run again (--overwrite, rows in another order, another size), read again.

    Before, load_output kept each manifest's references forever: after the rerun it read the array and
    row where the id used to be, that is another row's new output."""
    out = tmp_path / "out"
    manifest = out / "manifest.parquet"
    ids = [f"row{i:02d}" for i in range(48)]
    daskmv.run(_good_rows_manifest(dataset, tmp_path / "a.csv", range(48)), [{"resize": {"size": 32}}], str(out),
               client=client, partition_rows=8, progress="none")
    before = {i: load_output(str(manifest), i, "resized") for i in ids}
    assert all(v.shape == (32, 32, 3) for v in before.values())
    assert all(np.array_equal(before[i], _read_independently(manifest, i)) for i in ids)

    daskmv.run(_good_rows_manifest(dataset, tmp_path / "b.csv", reversed(range(48))), [{"resize": {"size": 24}}],
               str(out), client=client, partition_rows=8, overwrite=True, progress="none")
    for i in ids:
        got = load_output(str(manifest), i, "resized")
        assert got.shape == (24, 24, 3), i
        assert np.array_equal(got, _read_independently(manifest, i)), i


def test_a_dataset_made_before_a_rerun_refuses_to_read_and_a_new_one_reads_the_new_outputs(dataset, client,
                                                                                         tmp_path):
    from daskmv.data import ManifestChanged

    out = tmp_path / "out"
    manifest = out / "manifest.parquet"
    daskmv.run(_good_rows_manifest(dataset, tmp_path / "a.csv", range(48)), [{"resize": {"size": 32}}], str(out),
               client=client, partition_rows=16, progress="none")
    old = ManifestDataset(str(manifest), columns=["resized"])
    assert all(np.array_equal(old[k]["resized"], _read_independently(manifest, old[k]["id"])) for k in range(48))
    # Same partitions, so the same array paths, rewritten with other shapes: nothing opened before may be reused.
    daskmv.run(_good_rows_manifest(dataset, tmp_path / "b.csv", range(48)), [{"resize": {"size": 20}}], str(out),
               client=client, partition_rows=16, overwrite=True, progress="none")
    with pytest.raises(ManifestChanged, match="make a new ManifestDataset"):
        old[0]
    new = ManifestDataset(str(manifest), columns=["resized"])
    for k in range(48):
        item = new[k]
        assert item["resized"].shape == (20, 20, 3)
        assert np.array_equal(item["resized"], _read_independently(manifest, item["id"]))
    loader = DataLoader(new, batch_size=16, num_workers=2)
    assert [tuple(b["resized"].shape) for b in loader] == [(16, 20, 20, 3)] * 3


# -- moved roots and clear errors ---------------------------------------------------------------------
def test_moved_root_reads_through_relative_references(small_run, tmp_path, monkeypatch):
    import shutil

    shutil.copytree(small_run.parent, tmp_path / "copy")
    (tmp_path / "copy").rename(tmp_path / "moved")  # nothing in it may point at where it was written
    monkeypatch.chdir(tmp_path)
    ds = ManifestDataset("moved/manifest.parquet", columns=["resized"])
    here = ManifestDataset(str(small_run), columns=["resized"])
    monkeypatch.chdir("/")  # a relative manifest path is taken where the dataset was made
    for k in (0, 57, len(ds) - 1):
        assert ds[k]["id"] == here[k]["id"]
        assert np.array_equal(ds[k]["resized"], here[k]["resized"])
        assert np.array_equal(load_output(str(tmp_path / "moved/manifest.parquet"), ds[k]["id"], "resized"),
                              here[k]["resized"])


def test_errors_name_the_id_and_the_column(small_run, tmp_path):
    import shutil

    root = tmp_path / "root"
    shutil.copytree(small_run.parent, root)
    manifest = str(root / "manifest.parquet")
    frame = pd.read_parquet(manifest)
    ok = frame[frame["status"] == "ok"]
    bad = frame[frame["status"] == "error"].iloc[0]
    with pytest.raises(KeyError, match="no row with id 'no-such-id'"):
        load_output(manifest, "no-such-id", "resized")
    with pytest.raises(KeyError, match="no array output 'nope'.*array outputs: resized"):
        load_output(manifest, ok["id"].iloc[0], "nope")
    with pytest.raises(ValueError, match="'mean_r' .* is a column, not an array output"):
        load_output(manifest, ok["id"].iloc[0], "mean_r")
    with pytest.raises(ValueError, match=f"row '{bad['id']}' has no 'resized' output .*status is 'error' \\(.+\\)"):
        load_output(manifest, bad["id"], "resized")
    with pytest.raises(ValueError, match="read the Parquet output manifest"):
        load_output(str(root / "manifest.csv"), ok["id"].iloc[0], "resized")
    with pytest.raises(FileNotFoundError, match="no manifest at"):
        load_output(str(root / "nowhere.parquet"), ok["id"].iloc[0], "resized")
    ds = ManifestDataset(manifest, columns=["resized"])
    with pytest.raises(IndexError, match="out of range"):
        ds[len(ds)]
    assert ds[-1]["id"] == ds[len(ds) - 1]["id"]
    # An array deleted under the manifest: the error says which row and output, and where it looked.
    victim = ok.iloc[0]
    array = root / victim["resized_path"].rpartition("#")[0]
    shutil.rmtree(array)
    with pytest.raises(FileNotFoundError, match=f"row '{victim['id']}', output 'resized'.*{array.name}"):
        load_output(manifest, victim["id"], "resized")
    with pytest.raises(FileNotFoundError, match=f"row '{victim['id']}', output 'resized'"):
        ManifestDataset(manifest, columns=["resized"])[0]


# -- the read path itself ----------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["ours", "zstd", "lz4", "big-endian, several shards, empty chunks",
                                    "index first", "ragged"])
@pytest.mark.parametrize("where", ["local", "memory"])
def test_rows_read_equal_zarr_for_every_layout(tmp_path, layout, where):
    """The direct reads (raw and zstd inner chunks at the offsets of the shard index) against Zarr itself,
    on a local root and on fsspec's memory filesystem; other codecs fall back to Zarr."""
    import fsspec
    import zarr
    from zarr.codecs import ShardingCodec

    from daskmv.arrays import read_array_row, write_ragged, write_stacked

    rng = np.random.default_rng(4)
    url = str(tmp_path / "a") if where == "local" else f"memory://readback-{layout.split(',')[0]}/{tmp_path.name}/a"
    local = fsspec.filesystem("file") if where == "local" else None
    if layout in ("ours", "zstd", "lz4"):
        values = [(rng.random((30, 20, 3)) * 4).astype(np.uint8) * 60 for _ in range(70)]
        values[5] = None
        write_stacked(url, values, None, None if layout == "ours" else layout, fs=local)
    elif layout.startswith("big-endian"):
        arr = zarr.create_array(url, shape=(50, 5), dtype=">u2", chunks=(3, 5), shards=(12, 5), compressors=None,
                                fill_value=7)
        arr[0:20] = np.arange(100).reshape(20, 5)  # shards 2-4 and most chunks are never written
    elif layout == "index first":
        arr = zarr.create_array(url, shape=(30, 4), dtype="<i4", chunks=(32, 4), compressors=None,
                                serializer=ShardingCodec(chunk_shape=(4, 4), index_location="start"))
        arr[...] = np.arange(120).reshape(30, 4)
    else:
        values = [rng.random((k, 3)).astype(np.float32) for k in (0, 5, 2, 9, 200_000)] + [None]
        write_ragged(url, values, np.dtype(np.float32), None, None)
    node = zarr.open(url, mode="r")
    for version in (None, ("test", layout, where)):
        for row in range(node.shape[0] if isinstance(node, zarr.Array) else 5):
            got = read_array_row(url, row, version=version)
            if isinstance(node, zarr.Array):
                want = np.asarray(node[row])
            else:
                a, b = node["offsets"][row : row + 2]
                want = np.asarray(node["data"][a:b]).reshape(tuple(s for s in node["shapes"][row] if s >= 0))
            assert got.dtype == want.dtype.newbyteorder("=") and np.array_equal(got, want), row
            assert got.flags.writeable
    with pytest.raises(IndexError, match="outside"):
        read_array_row(url, 10_000)


def test_open_arrays_are_shared_by_threads(small_run):
    from concurrent.futures import ThreadPoolExecutor

    frame = pd.read_parquet(small_run)
    ids = frame.loc[frame["status"] == "ok", "id"].tolist()
    want = {i: _read_independently(small_run, i) for i in ids[:120]}
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: load_output(str(small_run), i, "resized"), [*want] * 4))
    assert all(np.array_equal(g, want[i]) for g, i in zip(got, [*want] * 4))


def test_dataloader_with_spawned_workers(small_run):
    ds = ManifestDataset(str(small_run), columns=["resized", "label"])
    loader = DataLoader(ds, batch_size=50, num_workers=2, multiprocessing_context="spawn", shuffle=False)
    batches = list(loader)
    assert sum(len(b["id"]) for b in batches) == len(ds)
    for b in batches[:2]:
        for k, row_id in enumerate(b["id"]):
            assert np.array_equal(b["resized"][k].numpy(), _read_independently(small_run, row_id))


# -- storage options ---------------------------------------------------------------------------------
def test_storage_options_memory_root_for_the_library_functions(small_run, tmp_path):
    """A root copied to fsspec's memory filesystem (one process): load_output, the dataset, the report and
    the contact sheet read it; a manifest rewritten there is read anew."""
    import fsspec

    from daskmv.preview import contact_sheet
    from daskmv.report import build_report

    fs = fsspec.filesystem("memory")
    fs.put(str(small_run.parent), "/readback-lib/out", recursive=True)
    manifest = "memory://readback-lib/out/manifest.parquet"
    local = ManifestDataset(str(small_run), columns=["resized", "mean_r"])
    remote = ManifestDataset(manifest, columns=["resized", "mean_r"], storage_options={})
    for k in (0, 99, len(local) - 1):
        assert remote[k]["id"] == local[k]["id"] and remote[k]["mean_r"] == local[k]["mean_r"]
        assert np.array_equal(remote[k]["resized"], local[k]["resized"])
        assert np.array_equal(load_output(manifest, local[k]["id"], "resized"), local[k]["resized"])
    page = build_report("memory://readback-lib/out", n=4, out=str(tmp_path / "r.html"))
    assert Path(page).read_text().count("<img") >= 4
    sheet = contact_sheet("memory://readback-lib/out", n=4, out=str(tmp_path / "p.png"))
    assert Path(sheet).read_bytes()[:4] == b"\x89PNG"
    # A rerun there: the manifest now says row a's output is row b's array. load_output follows.
    frame = pd.read_parquet(manifest)
    ok = frame.index[frame["status"] == "ok"]
    a, b = ok[0], ok[1]
    refs = frame["resized_path"].copy()
    refs[a], refs[b] = frame.loc[b, "resized_path"], frame.loc[a, "resized_path"]
    frame["resized_path"] = refs
    with fsspec.open(manifest, "wb") as fh:
        frame.to_parquet(fh, index=False)
    assert np.array_equal(load_output(manifest, frame.loc[a, "id"], "resized"),
                          load_output(str(small_run), frame.loc[b, "id"], "resized"))
    fs.rm("/readback-lib", recursive=True)


@pytest.fixture(scope="module")
def zipped_root(small_run, tmp_path_factory):
    """The output root inside a zip archive: a filesystem that only opens with its storage options
    (``fo``, the archive), in every process."""
    import zipfile

    archive = tmp_path_factory.mktemp("zipped") / "root.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as z:
        for path in sorted(small_run.parent.rglob("*")):
            if path.is_file():
                z.write(path, f"out/{path.relative_to(small_run.parent)}")
    return {"fo": str(archive)}


def test_storage_options_reach_dataloader_workers(small_run, zipped_root):
    with pytest.raises(Exception):
        ManifestDataset("zip://out/manifest.parquet", columns=["resized"])  # not without its options
    ds = ManifestDataset("zip://out/manifest.parquet", columns=["resized", "sharpness"], storage_options=zipped_root)
    here = ManifestDataset(str(small_run), columns=["resized", "sharpness"])
    for got, want in zip(DataLoader(ds, batch_size=64, num_workers=2), DataLoader(here, batch_size=64)):
        assert list(got["id"]) == list(want["id"])
        assert torch.equal(got["resized"], want["resized"]) and torch.equal(got["sharpness"], want["sharpness"])
    row_id = here[5]["id"]
    assert np.array_equal(load_output("zip://out/manifest.parquet", row_id, "resized", storage_options=zipped_root),
                          here[5]["resized"])


def test_status_report_and_preview_take_storage_options(small_run, zipped_root, tmp_path):
    import json

    from typer.testing import CliRunner

    from daskmv.cli import app

    def invoke(*args):
        return CliRunner().invoke(app, [str(a) for a in args])

    options = json.dumps(zipped_root)
    status = invoke("status", "zip://out", "--storage-options", options, "--json")
    assert status.exit_code == 0, status.output
    assert json.loads(status.stdout)["state"] == "complete" and json.loads(status.stdout)["ok"] == 300
    without = invoke("status", "zip://out")
    assert without.exit_code == 2 and "cannot read zip://out" in without.output
    config = tmp_path / "run.yaml"
    config.write_text(f"pipeline: resize\nstorage_options:\n  fo: {zipped_root['fo']}\n")
    assert "done 304 (ok 300, error 4)" in invoke("status", "zip://out", "--config", config).stdout
    sheet = invoke("preview", "zip://out", "--storage-options", options, "--n", "3", "--to", tmp_path / "p.png")
    assert sheet.exit_code == 0, sheet.output
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    report = invoke("report", "zip://out", "--config", config, "--n", "3", "--to", tmp_path / "r.html")
    assert report.exit_code == 0, report.output
    assert (tmp_path / "r.html").read_text().count("<img") >= 3
    bad = invoke("status", "zip://out", "--storage-options", "[1, 2]")
    assert bad.exit_code == 2 and "must be a JSON object" in bad.output
