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
