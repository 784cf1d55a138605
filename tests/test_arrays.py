"""Partition arrays: the direct shard writer against Zarr's own encoder, stacked and ragged layouts."""

from __future__ import annotations

from pathlib import Path

import fsspec
import numpy as np
import pytest
import zarr

from daskmv.arrays import INNER_CHUNK_BYTES, read_array_row, write_ragged, write_stacked


def shard_file(url: Path) -> Path:
    files = [p for p in url.rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert len(files) == 1, files
    return files[0]


@pytest.mark.parametrize(
    ("shape", "dtype", "n"),
    [((24, 32, 3), np.uint8, 37), ((512,), np.float32, 300), ((7,), np.int64, 1), ((600, 600, 3), np.uint8, 5),
     ((3, 4), np.float16, 1000), ((2,), np.bool_, 9)],
)
def test_direct_shard_equals_zarr_encoding(tmp_path, shape, dtype, n):
    rng = np.random.default_rng(0)
    values = [(rng.random(shape) * 200).astype(dtype) for _ in range(n)]
    if n > 2:
        values[1] = None  # an error row: no value, zeros in the array
    fast, slow = tmp_path / "fast", tmp_path / "slow"
    write_stacked(str(fast), values, None, None, fs=fsspec.filesystem("file"))
    write_stacked(str(slow), values, None, None, fs=None)  # Zarr's own encoder
    assert shard_file(fast).read_bytes() == shard_file(slow).read_bytes()
    arr = zarr.open_array(str(fast), mode="r")
    assert arr.shape == (n, *shape) and arr.dtype == dtype
    for i, v in enumerate(values):
        expected = np.zeros(shape, dtype) if v is None else v
        assert np.array_equal(read_array_row(str(fast), i), expected)
    assert arr.attrs["daskmv"]["layout"] == "stacked"


def test_inner_chunks_hold_several_small_rows_and_one_large_row(tmp_path):
    small = [np.zeros((16, 16, 3), np.uint8) for _ in range(100)]
    write_stacked(str(tmp_path / "small"), small, None, None, fs=fsspec.filesystem("file"))
    assert zarr.open_array(str(tmp_path / "small")).chunks[0] == min(100, INNER_CHUNK_BYTES // small[0].nbytes)
    big = [np.zeros((600, 600, 3), np.uint8) for _ in range(3)]
    write_stacked(str(tmp_path / "big"), big, None, None, fs=fsspec.filesystem("file"))
    assert zarr.open_array(str(tmp_path / "big")).chunks[0] == 1


@pytest.mark.parametrize("compression", ["zstd", "lz4"])
def test_compressed_arrays_use_zarr(tmp_path, compression):
    values = [np.full((32, 32), i % 2, np.uint8) for i in range(50)]
    url = tmp_path / "mask"
    write_stacked(str(url), values, None, compression, fs=fsspec.filesystem("file"))
    assert shard_file(url).stat().st_size < 50 * 32 * 32 / 10
    assert all(np.array_equal(read_array_row(str(url), i), values[i]) for i in range(50))


def test_overwriting_replaces_the_old_array(tmp_path):
    url = str(tmp_path / "a")
    write_stacked(url, [np.ones((4, 4), np.uint8)] * 10, None, None, fs=fsspec.filesystem("file"))
    write_stacked(url, [np.full((2,), 9, np.int64)] * 3, None, None, fs=fsspec.filesystem("file"))
    arr = zarr.open_array(url, mode="r")
    assert arr.shape == (3, 2) and (arr[:] == 9).all()


def test_ragged_round_trip(tmp_path):
    values = [np.arange(k * 3, dtype=np.float32).reshape(k, 3) for k in (0, 5, 2, 9)] + [None]
    url = str(tmp_path / "r")
    write_ragged(url, values, np.dtype(np.float32), None, None)
    for i, v in enumerate(values[:-1]):
        got = read_array_row(url, i)
        assert got.shape == v.shape and np.array_equal(got, v)


def _stream(tmp_path, values, batch=4, compression=None):
    """Feed values the way the engine does: row by row, flushing after each batch."""
    from daskmv.arrays import PartitionArray, Sink, write_partition_array

    url = str(tmp_path / "streamed")
    array = PartitionArray(len(values), Sink(fsspec.filesystem("file"), url, compression=compression))
    for start in range(0, len(values), batch):
        for i in range(start, min(start + batch, len(values))):
            if values[i] is not None:
                array.set(i, values[i])
        array.flush(min(start + batch, len(values)))
    write_partition_array(url, array, None, compression, fs=fsspec.filesystem("file"))
    return url


@pytest.mark.parametrize("shape", [(24, 32, 3), (600, 600, 3), (5,)])
def test_streamed_shard_equals_zarr_encoding(tmp_path, shape):
    rng = np.random.default_rng(1)
    values = [(rng.random(shape) * 200).astype(np.uint8) for _ in range(23)]
    values[3] = values[17] = None
    url = _stream(tmp_path, values)
    write_stacked(str(tmp_path / "slow"), values, None, None, fs=None)
    assert shard_file(Path(url)).read_bytes() == shard_file(tmp_path / "slow").read_bytes()
    for i, v in enumerate(values):
        assert np.array_equal(read_array_row(url, i), np.zeros(shape, np.uint8) if v is None else v)


def test_a_streamed_shard_hands_its_bytes_to_the_disk_as_it_goes(tmp_path, monkeypatch):
    """Writeback starts every WRITEBACK_BYTES, in order and without gaps, so the commit's fsync finds little
    left to write; the file is still Zarr's own encoding."""
    from daskmv import arrays

    ranges = []

    def spy(fh, offset, nbytes):
        ranges.append((offset, nbytes))
        real(fh, offset, nbytes)

    real = arrays.start_writeback
    monkeypatch.setattr(arrays, "start_writeback", spy)
    rng = np.random.default_rng(2)
    values = [(rng.random((600, 600, 3)) * 200).astype(np.uint8) for _ in range(23)]
    url = _stream(tmp_path, values)
    assert len(ranges) >= 23 * 600 * 600 * 3 // arrays.WRITEBACK_BYTES - 1
    assert [offset for offset, _ in ranges] == [sum(n for _, n in ranges[:k]) for k in range(len(ranges))]
    assert all(n >= arrays.WRITEBACK_BYTES for _, n in ranges)
    write_stacked(str(tmp_path / "slow"), values, None, None, fs=None)
    assert shard_file(Path(url)).read_bytes() == shard_file(tmp_path / "slow").read_bytes()


def test_stream_drops_rows_and_switches_to_ragged(tmp_path):
    from daskmv.arrays import PartitionArray, Sink, write_partition_array

    fs = fsspec.filesystem("file")
    url = str(tmp_path / "mixed")
    array = PartitionArray(12, Sink(fs, url))
    for i in range(8):
        array.set(i, np.full((100, 100), i, np.uint8))
    array.flush(4)  # rows 0-3 are written out
    array.drop(5)
    array.set(8, np.full((3, 3), 8, np.uint8))  # another shape: ragged from here on
    write_partition_array(url, array, None, None, fs=fs)
    assert array.present.tolist() == [True] * 5 + [False] + [True] * 3 + [False] * 3
    for i in (0, 3, 4, 6, 7):
        assert (read_array_row(url, i) == i).all() and read_array_row(url, i).shape == (100, 100)
    assert read_array_row(url, 8).shape == (3, 3)


def test_streamed_ragged_equals_zarr_encoding(tmp_path):
    """Mixed shapes on a local root stream as they finish (memory holds one batch, not the partition);
    every file equals what write_ragged makes through Zarr."""
    rng = np.random.default_rng(2)
    shapes = [(40, 30, 3), (40, 30, 3), (30, 40, 3), (300, 200, 3), None, (7, 9, 3), (40, 30, 3)] * 5
    values = [None if s is None else (rng.random(s) * 255).astype(np.uint8) for s in shapes]
    url = Path(_stream(tmp_path, values, batch=3))
    write_ragged(str(tmp_path / "slow"), values, np.dtype(np.uint8), None, None)
    mine = {p.relative_to(url): p.read_bytes() for p in url.rglob("*") if p.is_file()}
    theirs = {p.relative_to(tmp_path / "slow"): p.read_bytes() for p in (tmp_path / "slow").rglob("*") if p.is_file()}
    assert mine.keys() == theirs.keys()
    for name in mine:
        assert mine[name] == theirs[name], name
    for i, v in enumerate(values):
        if v is not None:
            assert np.array_equal(read_array_row(str(url), i), v)


def test_ragged_stream_holds_only_unfinished_rows(tmp_path):
    from daskmv.arrays import PartitionArray, Sink

    array = PartitionArray(40, Sink(fsspec.filesystem("file"), str(tmp_path / "r")))
    for i in range(40):
        array.set(i, np.zeros((10 + i, 5), np.uint8))
        if i % 4 == 3:
            array.flush(i + 1)
            assert array.ragged is None or len(array.ragged.pending) == 0
    assert array.ragged is not None and array.values is None


@pytest.mark.parametrize("shape", [(24, 32, 3), (600, 600), (5,)])
def test_streamed_zstd_shard_equals_zarr_encoding(tmp_path, shape):
    """Compressed outputs (masks, flat backgrounds) stream too: each inner chunk zstd-encoded as it is
    final, the index of their lengths last; the file equals Zarr's own encoding byte for byte."""
    rng = np.random.default_rng(3)
    values = [(rng.random(shape) * 3).astype(np.uint8) * 80 for _ in range(19)]
    values[2] = values[11] = None
    url = _stream(tmp_path, values, compression="zstd")
    write_stacked(str(tmp_path / "slow"), values, None, "zstd", fs=None)
    assert shard_file(Path(url)).read_bytes() == shard_file(tmp_path / "slow").read_bytes()
    assert (Path(url) / "zarr.json").read_bytes() == (tmp_path / "slow" / "zarr.json").read_bytes()
    for i, v in enumerate(values):
        assert np.array_equal(read_array_row(url, i), np.zeros(shape, np.uint8) if v is None else v)


def test_compressed_stream_switches_to_ragged_with_every_value(tmp_path):
    shapes = [(30, 40)] * 9 + [(40, 30)] + [(30, 40)] * 3
    values = [np.full(s, i, np.uint8) for i, s in enumerate(shapes)]
    url = _stream(tmp_path, values, batch=4, compression="zstd")
    for i, v in enumerate(values):
        got = read_array_row(url, i)
        assert got.shape == v.shape and (got == i).all()


@pytest.mark.parametrize("compression", [None, "zstd"])
@pytest.mark.parametrize("first_empty", [True, False])
def test_zero_size_values_are_stored_and_read_back(tmp_path, compression, first_empty):
    """A pair with no verified matches gives a [0, 2] array; as a partition's first value it used to make
    Zarr fail the whole partition ("integer modulo by zero": a chunk with a side of 0)."""
    from daskmv.arrays import PartitionArray, Sink, write_partition_array

    fs = fsspec.filesystem("file")
    values = [np.zeros((0, 2), np.uint32), np.arange(10, dtype=np.uint32).reshape(5, 2), np.zeros((0, 2), np.uint32)]
    if not first_empty:
        values = values[1:] + values[:1]
    for name, vals in (("mixed", values), ("all-empty", [np.zeros((0, 2), np.uint32)] * 3)):
        url = str(tmp_path / f"{name}-{compression}")
        array = PartitionArray(len(vals), Sink(fs, url, None, compression))
        for i, v in enumerate(vals):
            array.set(i, v)
        array.flush(len(vals))
        write_partition_array(url, array, None, compression, fs=fs)
        for i, v in enumerate(vals):
            back = read_array_row(url, i)
            assert back.shape == v.shape and back.dtype == v.dtype and np.array_equal(back, v)


def test_referenced_rows_are_read_once_shared_read_only_and_bounded(tmp_path, monkeypatch):
    """A pair manifest names each image's features once per pair: a worker reads each row once, hands the
    same read-only array to every row that names it, and keeps no more than its byte budget."""
    from daskmv import arrays

    values = [np.full((k + 1, 128), k, np.uint8) for k in range(6)]
    url = str(tmp_path / "r")
    write_ragged(url, values, np.dtype(np.uint8), None, None)
    first = arrays.read_reference_row(url, 2)
    assert np.array_equal(first, values[2]) and arrays.read_reference_row(url, 2) is first
    with pytest.raises(ValueError, match="read-only"):
        first[0, 0] = 1
    kept = arrays._REFERENCE_ROWS
    monkeypatch.setattr(kept, "budget", 3 * 128 + 4 * 128)  # rows 2 and 3 fit, not row 4 too
    arrays.read_reference_row(url, 3)
    arrays.read_reference_row(url, 4)
    assert kept.total <= kept.budget
    assert arrays.read_reference_row(url, 2) is not first  # the least recently used row was dropped: read again
    assert all(np.array_equal(arrays.read_reference_row(url, i), values[i]) for i in range(6))