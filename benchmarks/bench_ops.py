"""Ops used by the benchmarks, named by import path as a user's ops would be (``bench_ops:Square``)."""

from __future__ import annotations

from daskmv.ops import Op, Output


class Square(Op):
    """A trivial op: no file read, one scalar output. Measures the engine's own overhead."""

    name = "bench_ops:Square"
    inputs = ("label",)
    outputs = (Output("label_sq", "column", "int64"),)

    def process(self, rows):
        return [{"label_sq": row["label"] * row["label"]} for row in rows]


def pair_key(a: str, b: str) -> int:
    """The trivial per-pair work of benchmarks/stages.py: a 64-bit hash of the two ids (stable across processes)."""
    import zlib

    return zlib.crc32(b.encode(), zlib.crc32(a.encode()))


class PairKey(Op):
    """A trivial per-pair op: a hash of the two ids. Measures what the engine adds per pair row."""

    name = "bench_ops:PairKey"
    inputs = ("id_a", "id_b")
    outputs = (Output("key", "column", "int64"),)

    def process(self, rows):
        return [{"key": pair_key(row["id_a"], row["id_b"])} for row in rows]
