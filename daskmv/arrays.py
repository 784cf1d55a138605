"""Partition arrays in Zarr v3: one array per output per partition, one shard file, rows readable alone.

Same-shaped values become a *stacked* array ``[rows, ...]`` whose rows are grouped into inner chunks of
about :data:`INNER_CHUNK_BYTES` inside a single shard. Values of different shapes become a *ragged*
group: a flat ``data`` array with ``offsets`` and ``shapes`` (streamed too, so photos of mixed sizes
never make a worker hold a whole partition's outputs).

Uncompressed stacked arrays are the hot path of every image pipeline, so their shard is written
directly, and on a local root streamed while the partition runs (:class:`ShardStream`): Zarr writes the
array's metadata, and the shard file is the inner chunks in order followed by the standard shard index
(``(offset, length)`` per chunk, little-endian uint64, then its CRC32C), the layout of the Zarr v3
sharding codec with its default index codecs. Zarr's own encoder copies every inner chunk two or three
times, holds the whole partition, and writes it in one burst at the end; streaming overlaps the writes
with compute and holds one batch. zstd-compressed arrays stream the same way (each inner chunk encoded
on the writer thread, the index of their lengths last), and so do ragged ones. The tests check the files
are byte-identical to Zarr's own encoding and read them back with Zarr. Other codecs, remote roots and
compressed ragged arrays go through Zarr's encoder at the end of the partition.
"""

from __future__ import annotations

import ctypes
import io
import json
import math
import os
import posixpath
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import fsspec
import google_crc32c
import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from daskmv.caches import ProcessCache

#: Rows per inner chunk aim at this many bytes: reading one row reads at most this much more.
INNER_CHUNK_BYTES = 1 << 19
#: Every chunk is written, even all-zero ones: checking for "empty" chunks costs more than the write
#: (measured 131 ms against 12 ms for a 38 MB partition array).
WRITE_CONFIG = {"write_empty_chunks": True}


def compressors(compression: str | None) -> Any:
    if compression is None:
        return None
    if compression == "zstd":
        return ZstdCodec(level=1)
    if compression == "lz4":
        return BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
    raise ValueError(f"unknown compression {compression!r} (zstd, lz4 or None)")


def chunk_layout(n: int, row_nbytes: int) -> tuple[int, int]:
    """(rows per inner chunk, rows in the shard) for ``n`` rows of ``row_nbytes`` each."""
    rows_per_chunk = max(1, min(n, INNER_CHUNK_BYTES // max(1, row_nbytes)))
    return rows_per_chunk, math.ceil(n / rows_per_chunk) * rows_per_chunk


@dataclass(frozen=True)
class Sink:
    """Where a partition array may be streamed as it is made: an array on ``fs``, raw or zstd-compressed."""

    fs: fsspec.AbstractFileSystem
    url: str
    options: dict[str, Any] | None = None
    compression: str | None = None


class PartitionArray:
    """One output's values for one partition, gathered straight into what will be written.

    With a :class:`Sink` (local roots, uncompressed outputs) the values stream into the array's shard
    file one inner chunk at a time as rows become final (:meth:`flush`), written on a background
    thread: writes overlap compute and memory holds only the chunks of the current batch. Without one,
    same-shaped values are copied into one ``[rows, ...]`` buffer written at the end. A value of
    another shape switches to the ragged layout: streamed (:class:`RaggedStream`) with a sink, else a
    list written at the end.
    """

    def __init__(self, n: int, sink: Sink | None = None) -> None:
        self.n = n
        self.sink = sink
        self.stream: ShardStream | None = None
        self.ragged: RaggedStream | None = None
        self.buffer: np.ndarray | None = None
        self.rows_per_chunk = 1
        self.present = np.zeros(n, dtype=bool)
        self.values: list[np.ndarray | None] | None = None

    def set(self, i: int, value: np.ndarray) -> None:
        if self.ragged is not None:
            self.ragged.put(i, value)
        elif self.values is not None:
            self.values[i] = value
        elif self.stream is None and self.buffer is None and value.size == 0:
            self._go_ragged(i, value)  # no stacked rows of zero size (Zarr chunks need every side > 0)
        elif self.stream is None and self.buffer is None:
            self.rows_per_chunk, shard_rows = chunk_layout(self.n, value.nbytes)
            if self.sink is not None:
                self.stream = ShardStream(self.sink, self.n, value.shape, value.dtype, self.rows_per_chunk,
                                          self.sink.compression)
                self.stream.put(i, value)
            else:
                self.buffer = np.empty((shard_rows, *value.shape), dtype=value.dtype)
                self.buffer[i] = value
        elif (value.shape, value.dtype) == self._layout():
            if self.stream is not None:
                self.stream.put(i, value)
            else:
                self.buffer[i] = value  # type: ignore[index]
        else:
            self._go_ragged(i, value)
        self.present[i] = True

    def _go_ragged(self, i: int, value: np.ndarray) -> None:
        """A value of another shape: stream ragged from here on (or gather a list without a sink)."""
        values = self._all_values()
        values[i] = value
        if self.sink is None or self.sink.compression is not None:  # compressed ragged: gathered, written at the end
            self.values = values
            return
        self.ragged = RaggedStream(self.sink, self.n, value.dtype)
        for j, v in enumerate(values):
            if v is not None:
                self.ragged.put(j, v)

    def _layout(self) -> tuple[tuple[int, ...], np.dtype]:
        if self.stream is not None:
            return self.stream.row_shape, self.stream.dtype
        assert self.buffer is not None
        return self.buffer.shape[1:], self.buffer.dtype

    def _all_values(self) -> list[np.ndarray | None]:
        """Every value so far as a list (leaving the stacked buffer or stream behind)."""
        if self.stream is not None:
            rows = self.stream.abandon()
            self.stream = None
        else:
            rows, self.buffer = self.buffer, None
        if rows is None:  # nothing stacked yet
            return [None] * self.n
        return [rows[j].copy() if self.present[j] else None for j in range(self.n)]

    def drop(self, i: int) -> None:
        """Forget row ``i``'s value (its row ended in an error after this output was made)."""
        if not self.present[i]:
            return
        self.present[i] = False
        if self.ragged is not None:
            self.ragged.put(i, None)
        elif self.values is not None:
            self.values[i] = None
        elif self.stream is not None:
            self.stream.put(i, None)

    def flush(self, final_rows: int) -> None:
        """Rows below ``final_rows`` will not change again: stream out the chunks they complete."""
        if self.stream is not None:
            self.stream.flush(final_rows)
        elif self.ragged is not None:
            self.ragged.flush(final_rows)

    def discard(self) -> None:
        """Close any stream without finishing it (the partition failed; it is rewritten on retry)."""
        for stream in (self.stream, self.ragged):
            if stream is not None:
                stream.discard()

    def __bool__(self) -> bool:
        return bool(self.present.any())


class ShardStream:
    """The single shard of a stacked array (raw or zstd chunks), written chunk by chunk, index last.

    The layout is the Zarr v3 sharding codec's with its default index codecs: inner chunks in order,
    then ``(offset, length)`` per chunk as little-endian uint64, then the index's CRC32C. Zarr writes
    the array's metadata first; the tests check the file is byte-identical to Zarr's own encoding.
    """

    def __init__(self, sink: Sink, n: int, row_shape: tuple[int, ...], dtype: np.dtype, rows_per_chunk: int,
                 compression: str | None = None) -> None:
        self.sink, self.n, self.row_shape, self.dtype = sink, n, tuple(row_shape), np.dtype(dtype)
        self.k = rows_per_chunk
        _, shard_rows = chunk_layout(n, int(np.prod(row_shape, dtype=np.int64)) * self.dtype.itemsize)
        self.n_chunks = shard_rows // self.k
        self.codec = _chunk_codec(compression)
        self.lengths: list[int] = []  # bytes of each chunk as written (appended by the writer thread)
        zarr.create_array(
            sink.url, shape=(n, *row_shape), dtype=self.dtype, chunks=(self.k, *row_shape),
            shards=(shard_rows, *row_shape), compressors=compressors(compression), overwrite=True,
            storage_options=sink.options, config=WRITE_CONFIG, attributes={"daskmv": {"layout": "stacked"}},
        )
        self.key = posixpath.join(sink.url, "c", *(["0"] * (1 + len(row_shape))))
        sink.fs.makedirs(posixpath.dirname(self.key), exist_ok=True)
        self.fh = sink.fs.open(self.key, "wb")
        self.chunks: dict[int, np.ndarray] = {}  # chunks not yet written, by chunk number
        self.next_chunk = 0
        self.writes: list[Future[Any]] = []
        self.written = self.flushed = 0  # bytes of chunks written; of those, handed to the disk's writeback

    def put(self, i: int, value: np.ndarray | None) -> None:
        c = i // self.k
        if c < self.next_chunk:
            raise RuntimeError(f"row {i} changed after its chunk was written")
        chunk = self.chunks.get(c)
        if chunk is None:  # a one-row chunk is filled whole below: no need to zero it first
            alloc = np.empty if self.k == 1 else np.zeros
            chunk = self.chunks[c] = alloc((self.k, *self.row_shape), dtype=self.dtype)
        chunk[i - c * self.k] = 0 if value is None else value

    def flush(self, final_rows: int) -> None:
        last = min(self.n_chunks, final_rows // self.k if final_rows < self.n else self.n_chunks)
        while self.next_chunk < last:
            chunk = self.chunks.pop(self.next_chunk, None)
            if chunk is None:  # no row of this chunk had a value
                chunk = np.zeros((self.k, *self.row_shape), dtype=self.dtype)
            self.writes.append(_WRITER.submit(self._write_chunk, chunk))
            self.next_chunk += 1

    def _write_chunk(self, chunk: np.ndarray) -> None:
        data = _le_bytes(chunk) if self.codec is None else self.codec.encode(np.ascontiguousarray(chunk))
        self.fh.write(data)
        self.lengths.append(len(data))
        self.written += len(data)
        if self.written - self.flushed >= WRITEBACK_BYTES:
            self.fh.flush()
            start_writeback(self.fh, self.flushed, self.written - self.flushed)
            self.flushed = self.written

    def finish(self) -> None:
        """Write what is left, the index and its checksum; wait for every write; close the file."""
        self.flush(self.n)
        try:
            for future in self.writes:
                future.result()
            self.fh.write(_shard_index_of(self.lengths, len(self.row_shape) + 1))
        finally:
            self.fh.close()

    def discard(self) -> None:
        """Close the file without finishing it (the partition failed; no marker will point here)."""
        for future in self.writes:
            future.exception()
        self.fh.close()

    def abandon(self) -> np.ndarray:
        """Stop streaming; return every row so far as ``[n, ...]`` (read back what was written)."""
        for future in self.writes:
            future.result()
        self.fh.close()
        rows = np.zeros((self.n_chunks * self.k, *self.row_shape), dtype=self.dtype)
        if self.next_chunk:
            with self.sink.fs.open(self.key, "rb") as fh:
                data = fh.read()
            if self.codec is not None:  # decode the chunks written so far, one by one
                ends = np.cumsum([0, *self.lengths])
                data = b"".join(bytes(self.codec.decode(data[a:b])) for a, b in zip(ends[:-1], ends[1:]))
            done = np.frombuffer(data, dtype=self.dtype.newbyteorder("<"))
            rows[: self.next_chunk * self.k] = done.reshape(-1, *self.row_shape)[: self.next_chunk * self.k]
        for c, chunk in self.chunks.items():
            rows[c * self.k : (c + 1) * self.k] = chunk
        self.sink.fs.rm(self.sink.url, recursive=True)
        return rows[: self.n]


class RaggedStream:
    """Values of mixed shapes streamed into the ragged layout: a flat ``data`` array (uncompressed, one
    shard), then ``offsets`` and ``shapes``.

    The flat data is every present row's values in row order, so a row's bytes are written as soon as it
    is final; the last inner chunk is padded with zeros and the shard index follows, as Zarr writes them.
    The group, the small arrays and the data array's metadata are written by Zarr at :meth:`finish`; the
    tests check the files equal :func:`write_ragged`'s.
    """

    def __init__(self, sink: Sink, n: int, dtype: np.dtype) -> None:
        self.sink, self.n, self.dtype = sink, n, np.dtype(dtype)
        self.chunk = max(1, INNER_CHUNK_BYTES // self.dtype.itemsize)
        self.key = posixpath.join(sink.url, "data", "c", "0")
        sink.fs.makedirs(posixpath.dirname(self.key), exist_ok=True)
        self.fh = sink.fs.open(self.key, "wb")
        self.pending: dict[int, np.ndarray | None] = {}
        self.shapes: list[tuple[int, ...] | None] = [None] * n
        self.sizes = np.zeros(n, dtype=np.int64)
        self.next_row = 0
        self.written = 0  # elements
        self.writes: list[Future[Any]] = []

    def put(self, i: int, value: np.ndarray | None) -> None:
        if i < self.next_row:
            raise RuntimeError(f"row {i} changed after it was written")
        self.pending[i] = value

    def flush(self, final_rows: int) -> None:
        while self.next_row < min(final_rows, self.n):
            value = self.pending.pop(self.next_row, None)
            if value is not None:
                flat = np.ascontiguousarray(value, dtype=self.dtype).ravel()
                self.shapes[self.next_row], self.sizes[self.next_row] = value.shape, flat.size
                self.writes.append(_WRITER.submit(self.fh.write, _le_bytes(flat)))
                self.written += flat.size
            self.next_row += 1

    def finish(self) -> None:
        """Pad and index the data shard, close it, then write the group's metadata and small arrays."""
        self.flush(self.n)
        n_chunks = max(1, -(-self.written // self.chunk))
        padding = n_chunks * self.chunk - self.written
        chunk_bytes = self.chunk * self.dtype.itemsize
        self.writes.append(_WRITER.submit(self.fh.write, bytes(padding * self.dtype.itemsize)))
        self.writes.append(_WRITER.submit(self.fh.write, _shard_index(n_chunks, 1, chunk_bytes)))
        try:
            for future in self.writes:
                future.result()
        finally:
            self.fh.close()
        ndim = max(len(s) for s in self.shapes if s is not None)
        shapes = np.full((self.n, ndim), -1, dtype=np.int64)
        for i, shape in enumerate(self.shapes):
            if shape is not None:
                shapes[i, : len(shape)] = shape
        offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        _ragged_group(self.sink.url, self.sink.options, self.written, self.dtype, None, offsets, shapes)

    def discard(self) -> None:
        for future in self.writes:
            future.exception()
        self.fh.close()


#: A streamed shard asks the kernel to start writing its data to disk every this many bytes, so that the
#: fsync before the partition's commit finds little left to write (:func:`start_writeback`). On the engine
#: benchmark (3 GB of arrays, 2 workers) the fsyncs cost 23 % of a warm run without it, 8 % at 8 MB, 2 % here.
WRITEBACK_BYTES = 2 << 20


def start_writeback(fh: Any, offset: int, nbytes: int) -> None:
    """Start writing a byte range of a local file to disk without waiting (Linux ``sync_file_range``).

    The commit point fsyncs every file a marker vouches for; with writeback started as the data streams
    out, that fsync overlaps the partition's compute instead of following it. Elsewhere (another OS, a
    file with no descriptor) this does nothing and the fsync does all the work.
    """
    if _SYNC_FILE_RANGE is None:
        return
    try:
        _SYNC_FILE_RANGE(fh.fileno(), offset, nbytes, 2)  # SYNC_FILE_RANGE_WRITE
    except (OSError, AttributeError, ValueError, io.UnsupportedOperation):
        pass


def _sync_file_range() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


_SYNC_FILE_RANGE = _sync_file_range()
#: One background writer per process: chunk writes of every stream, in submission order.
_WRITER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="daskmv-write")


def _le_bytes(chunk: np.ndarray) -> memoryview:
    data = np.ascontiguousarray(chunk)
    if data.dtype.byteorder == ">":
        data = data.astype(data.dtype.newbyteorder("<"))
    return memoryview(data).cast("B")


def _chunk_codec(compression: str | None) -> Any:
    """What encodes one inner chunk exactly as Zarr's codec of the same name (tests compare the files)."""
    if compression is None:
        return None
    if compression == "zstd":
        import numcodecs

        return numcodecs.Zstd(level=1)
    raise ValueError(f"streaming supports raw and zstd chunks, not {compression!r}")


def _shard_index_of(lengths: list[int], ndim: int) -> bytes:
    """The shard index for chunks of these byte lengths, written one after the other from offset 0."""
    index = np.zeros((len(lengths), *([1] * (ndim - 1)), 2), dtype="<u8")
    index[..., 0] = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.uint64).reshape(index.shape[:-1])
    index[..., 1] = np.asarray(lengths, dtype=np.uint64).reshape(index.shape[:-1])
    index_bytes = index.tobytes()
    return index_bytes + np.array([google_crc32c.value(index_bytes)], dtype="<u4").tobytes()


def _shard_index(n_chunks: int, ndim: int, chunk_bytes: int) -> bytes:
    """The shard index for ``n_chunks`` chunks of ``chunk_bytes`` each."""
    return _shard_index_of([chunk_bytes] * n_chunks, ndim)


def write_partition_array(url: str, array: PartitionArray, options: dict[str, Any] | None,
                          compression: str | None, fs: fsspec.AbstractFileSystem | None = None) -> None:
    """Write a partition's values: finish its stream, or write its buffer, or ragged when shapes differed."""
    if array.stream is not None:
        array.stream.finish()
        return
    if array.ragged is not None:
        array.ragged.finish()
        return
    if array.values is not None:
        present = [v for v in array.values if v is not None]
        if len({(v.shape, v.dtype) for v in present}) == 1 and present[0].size:
            array = _rebuffer(array)
        else:
            write_ragged(url, array.values, present[0].dtype, options, compression)
            return
    assert array.buffer is not None
    data = array.buffer
    data[array.n:] = 0
    data[: array.n][~array.present] = 0
    arr = zarr.create_array(
        url, shape=(array.n, *data.shape[1:]), dtype=data.dtype, chunks=(array.rows_per_chunk, *data.shape[1:]),
        shards=data.shape, compressors=compressors(compression), overwrite=True,
        storage_options=options, config=WRITE_CONFIG,
        attributes={"daskmv": {"layout": "stacked"}},
    )
    if compression is None and fs is not None:
        _write_raw_shard(fs, url, data, array.rows_per_chunk)
    else:
        arr[...] = data[: array.n]


def _rebuffer(array: PartitionArray) -> PartitionArray:
    out = PartitionArray(array.n)
    for i, v in enumerate(array.values or []):
        if v is not None:
            out.set(i, v)
    return out


def write_stacked(url: str, values: list[np.ndarray | None], options: dict[str, Any] | None,
                  compression: str | None, fs: fsspec.AbstractFileSystem | None = None) -> None:
    """Write same-shaped values as one sharded array; ``fs`` (local roots) enables the direct shard write."""
    array = PartitionArray(len(values))
    for i, v in enumerate(values):
        if v is not None:
            array.set(i, v)
    write_partition_array(url, array, options, compression, fs)


def _write_raw_shard(fs: fsspec.AbstractFileSystem, url: str, data: np.ndarray, rows_per_chunk: int) -> None:
    """The single shard of an uncompressed array chunked along rows: chunk bytes, index, CRC32C."""
    chunk_bytes = rows_per_chunk * int(np.prod(data.shape[1:], dtype=np.int64)) * data.dtype.itemsize
    key = posixpath.join(url, "c", *(["0"] * data.ndim))
    fs.makedirs(posixpath.dirname(key), exist_ok=True)
    with fs.open(key, "wb") as fh:
        fh.write(_le_bytes(data))
        fh.write(_shard_index(data.shape[0] // rows_per_chunk, data.ndim, chunk_bytes))


def write_ragged(url: str, values: list[np.ndarray | None], dtype: np.dtype, options: dict[str, Any] | None,
                 compression: str | None) -> None:
    ndim = max(v.ndim for v in values if v is not None)
    shapes = np.full((len(values), ndim), -1, dtype=np.int64)
    offsets = np.zeros(len(values) + 1, dtype=np.int64)
    flat: list[np.ndarray] = []
    for i, v in enumerate(values):
        size = 0
        if v is not None:
            shapes[i, : v.ndim] = v.shape
            flat.append(np.ascontiguousarray(v, dtype=dtype).ravel())
            size = v.size
        offsets[i + 1] = offsets[i] + size
    data = np.concatenate(flat) if flat else np.zeros(0, dtype=dtype)
    _ragged_group(url, options, data.size, data.dtype, data, offsets, shapes, compression)


def _ragged_group(url: str, options: dict[str, Any] | None, size: int, dtype: np.dtype, data: np.ndarray | None,
                  offsets: np.ndarray, shapes: np.ndarray, compression: str | None = None) -> None:
    """The ragged group's metadata and small arrays, and ``data`` (when given; a stream wrote it already)."""
    group = zarr.open_group(url, mode="a" if data is None else "w", storage_options=options)
    group.attrs["daskmv"] = {"layout": "ragged"}
    chunk = max(1, INNER_CHUNK_BYTES // max(1, dtype.itemsize))
    shard = max(chunk, -(-max(1, size) // chunk) * chunk)
    array = group.create_array("data", shape=(size,), dtype=dtype, chunks=(chunk,), shards=(shard,),
                               compressors=compressors(compression), config=WRITE_CONFIG)
    if data is not None:
        array[...] = data
    group.create_array("offsets", data=offsets, config=WRITE_CONFIG)
    group.create_array("shapes", data=shapes, config=WRITE_CONFIG)


# -- reading back ------------------------------------------------------------------------------------
#
# Reading one row is the hot path of training on a run's outputs. ``zarr.open`` per row reads the
# array's metadata and its shard index every time (Zarr caches neither), so a row costs three reads and
# a millisecond. An opened array here (:func:`open_array`) keeps its metadata and, per shard, the index
# it read once; a row of an uncompressed array is then one read of exactly its bytes at the offset the
# index gives (``os.preadv`` straight into the result on local disks, one ranged ``cat_file`` through
# fsspec), and a row of a zstd array one read of its inner chunk. Other codecs and layouts go through
# Zarr. Opened arrays are kept per process (:func:`read_array_row` with a ``version``), in a bounded LRU.

#: Opened arrays a process keeps (metadata and shard indexes: a few KB each; no file stays open).
READERS_KEPT = 1024
_NO_CHUNK = 2**64 - 1  # the shard index's (offset, length) of an inner chunk that was never written


class _Bytes:
    """Reads bytes under an array's URL: local files with ``os`` calls, anything else through fsspec."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None) -> None:
        protocol, path = fsspec.core.split_protocol(url)
        self.local = protocol in (None, "file", "local")
        self.options = None if self.local else (dict(storage_options or {}) or None)
        if self.local:
            self.fs, self.root = None, os.path.abspath(path)
        else:
            self.fs, self.root = fsspec.core.url_to_fs(url, **(self.options or {}))
            self.root = self.root.rstrip("/")
        self.url = url

    def key(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def cat(self, key: str) -> bytes:
        if self.fs is None:
            with open(key, "rb") as fh:
                return fh.read()
        return bytes(self.fs.cat_file(key))

    def tail(self, key: str, nbytes: int) -> bytes:
        """The last ``nbytes`` of a file (a shard's index)."""
        if self.fs is None:
            fd = os.open(key, os.O_RDONLY)
            try:
                size = os.fstat(fd).st_size
                return os.pread(fd, nbytes, max(0, size - nbytes))
            finally:
                os.close(fd)
        return bytes(self.fs.cat_file(key, start=-nbytes))

    def read_into(self, key: str, offset: int, out: np.ndarray) -> None:
        """Fill ``out`` (contiguous) with the file's bytes from ``offset``."""
        view = memoryview(out).cast("B")
        if self.fs is None:
            fd = os.open(key, os.O_RDONLY)
            try:
                got = os.preadv(fd, [view], offset)
            finally:
                os.close(fd)
        else:
            data = self.fs.cat_file(key, start=offset, end=offset + view.nbytes)
            got = len(data)
            view[:got] = data
        if got != view.nbytes:
            raise OSError(f"{key} ends before byte {offset + view.nbytes} (a truncated shard?)")

    def read(self, key: str, offset: int, nbytes: int) -> bytes:
        if self.fs is None:
            fd = os.open(key, os.O_RDONLY)
            try:
                return os.pread(fd, nbytes, offset)
            finally:
                os.close(fd)
        return bytes(self.fs.cat_file(key, start=offset, end=offset + nbytes))

    def zarr_url(self, *parts: str) -> tuple[str, dict[str, Any] | None]:
        """What to hand ``zarr.open`` for a node under this URL (Zarr refuses options for local paths)."""
        if self.local:
            return self.key(*parts), None
        return "/".join([self.url.rstrip("/"), *parts]), self.options


class _ShardRows:
    """Rows (along the first axis) of a sharded array whose inner chunks are raw or zstd bytes, read
    straight from its shard files with each shard's index read once."""

    def __init__(self, src: _Bytes, meta: Any, parts: tuple[str, ...]) -> None:
        sharding = meta.codecs[0]
        self.src, self.meta, self.parts = src, meta, parts
        self.shape = tuple(meta.shape)
        self.k = int(sharding.chunk_shape[0])
        self.shard_rows = int(meta.chunk_grid.chunk_shape[0])
        self.per_shard = self.shard_rows // self.k
        inner = sharding.codecs
        endian = getattr(getattr(inner[0], "endian", None), "value", None)
        native = np.dtype(meta.dtype.to_native_dtype())
        self.dtype = native.newbyteorder(">" if endian == "big" else "<") if native.itemsize > 1 else native
        self.native = native.newbyteorder("=") if native.byteorder not in ("|", "=") else native
        self.row_items = int(np.prod(self.shape[1:], dtype=np.int64))
        self.row_nbytes = self.row_items * self.dtype.itemsize
        self.zstd = len(inner) == 2
        self.codec = _chunk_codec("zstd") if self.zstd else None
        self.index_at_end = getattr(sharding.index_location, "value", "end") == "end"
        self.fill = meta.fill_value
        self.indexes: dict[int, np.ndarray | None] = {}

    @staticmethod
    def handles(meta: Any) -> bool:
        """Sharded along the first axis only, inner chunks of whole rows, raw or zstd, the default index."""
        from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec

        codecs = meta.codecs
        if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec) or len(meta.shape) == 0:
            return False
        sharding, shape = codecs[0], tuple(meta.shape)
        shard = tuple(meta.chunk_grid.chunk_shape)
        inner = tuple(sharding.codecs)
        whole_rows = tuple(sharding.chunk_shape[1:]) == shape[1:] == shard[1:]
        raw_or_zstd = (len(inner) == 1 and isinstance(inner[0], BytesCodec)) or (
            len(inner) == 2 and isinstance(inner[0], BytesCodec) and isinstance(inner[1], ZstdCodec))
        index = tuple(sharding.index_codecs)
        default_index = (len(index) == 2 and isinstance(index[0], BytesCodec) and isinstance(index[1], Crc32cCodec)
                         and getattr(index[0].endian, "value", "little") == "little")
        return (whole_rows and raw_or_zstd and default_index and shard[0] % sharding.chunk_shape[0] == 0
                and not np.dtype(meta.dtype.to_native_dtype()).hasobject)

    def _index(self, shard: int) -> np.ndarray | None:
        """The shard's ``(offset, length)`` per inner chunk, read once; None for a shard never written."""
        if shard in self.indexes:
            return self.indexes[shard]
        key = self.src.key(*self.parts, self.meta.encode_chunk_key((shard, *([0] * (len(self.shape) - 1)))))
        nbytes = self.per_shard * 16 + 4
        try:
            raw = self.src.tail(key, nbytes) if self.index_at_end else self.src.read(key, 0, nbytes)
        except FileNotFoundError:
            raw = None
        index = None
        if raw is not None:
            if len(raw) != nbytes or google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
                raise OSError(f"{key}: the shard index is damaged (a truncated or partly written file?)")
            index = np.frombuffer(raw[:-4], dtype="<u8").reshape(self.per_shard, 2)  # offsets from the file's start
        self.indexes[shard] = index
        return index

    def rows(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, *self.shape[1:]), dtype=self.dtype)
        for c in range(start // self.k, (stop - 1) // self.k + 1) if stop > start else ():
            lo, hi = max(start, c * self.k), min(stop, (c + 1) * self.k)
            shard, j = divmod(c, self.per_shard)
            index = self._index(shard)
            target = out[lo - start : hi - start]
            if index is None or int(index[j, 0]) == _NO_CHUNK:
                target[...] = self.fill
                continue
            offset, length = int(index[j, 0]), int(index[j, 1])
            key = self.src.key(*self.parts, self.meta.encode_chunk_key((shard, *([0] * (len(self.shape) - 1)))))
            if not self.zstd:
                self.src.read_into(key, offset + (lo - c * self.k) * self.row_nbytes, target)
                continue
            chunk = np.frombuffer(self.codec.decode(self.src.read(key, offset, length)), dtype=self.dtype)
            first = (lo - c * self.k) * self.row_items
            target[...] = chunk[first : first + (hi - lo) * self.row_items].reshape(target.shape)
        return out if self.dtype == self.native else out.astype(self.native)


class _ZarrRows:
    """Any other array: rows read through an open ``zarr.Array`` (kept open, so its metadata is read once)."""

    def __init__(self, src: _Bytes, parts: tuple[str, ...]) -> None:
        url, options = src.zarr_url(*parts)
        self.array = zarr.open_array(url, mode="r", storage_options=options)
        self.shape = tuple(self.array.shape)

    def rows(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.array[start:stop])


def _rows_reader(src: _Bytes, parts: tuple[str, ...], doc: dict[str, Any] | None = None) -> _ShardRows | _ZarrRows:
    if doc is not None and doc.get("zarr_format") == 3 and doc.get("node_type") == "array":
        from zarr.core.metadata.v3 import ArrayV3Metadata

        meta = ArrayV3Metadata.from_dict(dict(doc))
        if _ShardRows.handles(meta):
            return _ShardRows(src, meta, parts)
    return _ZarrRows(src, parts)


class OpenArray:
    """One partition array opened for reading rows: stacked (``[rows, ...]``) or ragged (a group)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url
        src = _Bytes(url, storage_options)
        try:
            doc = json.loads(src.cat(src.key("zarr.json")))
        except FileNotFoundError:
            doc = None  # not Zarr v3 (or not there): Zarr says which
        if doc is not None and doc.get("node_type") == "group":
            url_, options = src.zarr_url()
            group = zarr.open_group(url_, mode="r", storage_options=options)
            self.offsets = np.asarray(group["offsets"][...], dtype=np.int64)
            self.shapes = np.asarray(group["shapes"][...], dtype=np.int64)
            data_doc = json.loads(src.cat(src.key("data", "zarr.json")))
            self.data: _ShardRows | _ZarrRows | None = _rows_reader(src, ("data",), data_doc)
            self.n = len(self.offsets) - 1
        else:
            self.data = None
            try:
                self.stacked = _rows_reader(src, (), doc)
            except FileNotFoundError as exc:
                raise FileNotFoundError(f"no Zarr array at {url} ({exc})") from None
            self.n = self.stacked.shape[0]

    def row(self, row: int) -> np.ndarray:
        """Row ``row``: a writable NumPy array in native byte order."""
        row = int(row)
        if not 0 <= row < self.n:
            raise IndexError(f"row {row} is outside {self.url}, which has {self.n} rows")
        if self.data is None:
            return self.stacked.rows(row, row + 1)[0]
        start, stop = int(self.offsets[row]), int(self.offsets[row + 1])
        shape = tuple(int(s) for s in self.shapes[row] if s >= 0)
        return self.data.rows(start, stop).reshape(shape)


def open_array(url: str, storage_options: dict[str, Any] | None = None) -> OpenArray:
    """Open a stacked or ragged partition array for reading rows (not cached: see :func:`read_array_row`)."""
    return OpenArray(url, storage_options)


def options_key(storage_options: dict[str, Any] | None) -> str:
    """Storage options as a hashable key (JSON, sorted)."""
    return json.dumps(storage_options or {}, sort_keys=True, default=repr)


_READERS: ProcessCache[OpenArray] = ProcessCache(READERS_KEPT)


def read_array_row(url: str, row: int, storage_options: dict[str, Any] | None = None, *,
                   version: Any = None) -> np.ndarray:
    """One row of a stacked or ragged partition array (reads only that row's bytes or inner chunk).

    With ``version`` (any hashable value that changes whenever the data may have: :mod:`daskmv.data`
    passes the manifest's own signature), the opened array is kept in this process for the next call,
    so a row costs one read; without it the array is opened for this call alone, which is always
    current but reads its metadata and shard index each time.
    """
    if version is None:
        return OpenArray(url, storage_options).row(row)
    key = (url, options_key(storage_options), version)
    return _READERS.get_or_make(key, lambda: OpenArray(url, storage_options)).row(row)


def forget_arrays(version: Any = None) -> None:
    """Drop this process's open arrays of ``version`` (all when None): their data was replaced."""
    _READERS.drop(None if version is None else lambda key: key[2] == version)


#: Bytes of rows read through array references a process keeps (least recently used dropped first).
REFERENCE_ROWS_BYTES = 256 << 20
_REFERENCE_ROWS: ProcessCache[np.ndarray] = ProcessCache(REFERENCE_ROWS_BYTES, size=lambda array: array.nbytes)


def read_reference_row(url: str, row: int, storage_options: dict[str, Any] | None = None) -> np.ndarray:
    """One row behind an array reference of a finished run, kept in this process and read-only.

    A pair manifest names each image's features once per pair: the 793 pairs of a 60-image scene read 120
    rows, not 3,172, and each read of an opened array skips its metadata. Safe because the bytes under a
    reference never change (every attempt writes files named by its own random token). The array is
    read-only, so an op that would modify a shared input fails loudly instead of corrupting the others."""
    key = (url, int(row), options_key(storage_options))
    return _REFERENCE_ROWS.get_or_make(key, lambda: _read_only_row(url, row, storage_options))


def _read_only_row(url: str, row: int, storage_options: dict[str, Any] | None) -> np.ndarray:
    array = read_array_row(url, row, storage_options, version="immutable")
    if array.base is not None:  # a view would keep its whole decoded chunk alive: keep the row alone
        array = array.copy()
    array.setflags(write=False)
    return array
