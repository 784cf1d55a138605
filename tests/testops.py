"""Ops used only by the tests, named by import path (``testops:Slow``) as a user's own ops would be."""

from __future__ import annotations

import os
import time

import numpy as np

from daskmv.ops import Op, Output, Param


class Slow(Op):
    name = "testops:Slow"
    inputs = ("url",)
    outputs = (Output("slept", "column", "float64"),)
    params = {"seconds": Param(0.01, "sleep per row")}

    def process(self, rows):
        time.sleep(self.config["seconds"] * len(rows))
        return [{"slept": self.config["seconds"]} for _ in rows]


class Flaky(Op):
    """Fails the rows whose label is 0 (a row error), passes the others."""

    name = "testops:Flaky"
    inputs = ("label",)
    outputs = (Output("double", "column", "int64"),)

    def process(self, rows):
        out = []
        for row in rows:
            if row["label"] == 0:
                out.append(ValueError(f"label 0 is not allowed (row {row['id']})"))
            else:
                out.append({"double": 2 * row["label"]})
        return out


class RaisesInBatch(Op):
    """Raises for a whole batch when any row has label 0: the engine must pin it on that row."""

    name = "testops:RaisesInBatch"
    inputs = ("label",)
    outputs = (Output("triple", "column", "int64"),)

    def process(self, rows):
        if any(row["label"] == 0 for row in rows):
            raise ZeroDivisionError("label 0 in this batch")
        return [{"triple": 3 * row["label"]} for row in rows]


class MemoryHungry(Op):
    """Raises an out-of-memory error for batches larger than ``fits``; records the batch it ran in."""

    name = "testops:MemoryHungry"
    inputs = ("label",)
    outputs = (Output("batch", "column", "int64"), Output("plus_one", "array", "int64"))
    params = {"fits": Param(4, "largest batch that fits"), "kind": Param("memory", "memory or cuda",
                                                                          ("memory", "cuda"))}

    def process(self, rows):
        if len(rows) > self.config["fits"]:
            if self.config["kind"] == "cuda":
                import torch

                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            raise MemoryError(f"cannot allocate a batch of {len(rows)}")
        return [{"batch": len(rows), "plus_one": np.full(3, row["label"] + 1)} for row in rows]


class Crash(Op):
    """Kills its worker process on the row whose id is ``poison`` (like a segfaulting decoder)."""

    name = "testops:Crash"
    inputs = ("url",)
    outputs = (Output("survived", "column", "bool"),)
    params = {"poison": Param("", "id of the row that kills the worker")}

    def process(self, rows):
        if any(row["id"] == self.config["poison"] for row in rows):
            os._exit(17)
        return [{"survived": True} for _ in rows]


class FailsFirstSetup(Op):
    """Its setup fails once per flag file (a model that does not load the first time)."""

    name = "testops:FailsFirstSetup"
    inputs = ("label",)
    outputs = (Output("label_again", "column", "int64"),)
    params = {"flag": Param("", "file created by the first (failing) setup")}

    def setup(self, device):
        if not os.path.exists(self.config["flag"]):
            open(self.config["flag"], "w").close()
            raise RuntimeError("model failed to load (first attempt)")

    def process(self, rows):
        return [{"label_again": row["label"]} for row in rows]


class Ragged(Op):
    """Arrays whose length depends on the row (stored ragged)."""

    name = "testops:Ragged"
    inputs = ("label",)
    outputs = (Output("seq", "array", "float32"),)

    def process(self, rows):
        return [{"seq": np.arange(row["label"] + 1, dtype=np.float32).reshape(1, -1)} for row in rows]


class WhereAmI(Op):
    """A GPU op (that runs on CPU too) recording which worker ran it."""

    name = "testops:WhereAmI"
    inputs = ("label",)
    outputs = (Output("worker", "column", "string"),)
    gpu = True

    def process(self, rows):
        from distributed import get_worker

        return [{"worker": get_worker().address} for _ in rows]


class CountRuns(Op):
    """Appends one line per processed row to ``log`` (outside the output root), to count re-runs."""

    name = "testops:CountRuns"
    inputs = ("label",)
    outputs = (Output("counted", "column", "bool"),)
    params = {"log": Param("", "file to append row ids to")}

    def process(self, rows):
        with open(self.config["log"], "a") as fh:
            fh.write("".join(f"{row['id']}\t{os.getpid()}\n" for row in rows))
        return [{"counted": True} for _ in rows]


class Heatmap(Op):
    """Stores a small score grid (not an image) and draws it as one in reports: the gallery hook."""

    name = "testops:Heatmap"
    inputs = ("image",)
    outputs = (Output("scores", "array", "float32"),)

    def process(self, rows):
        return [{"scores": row["image"].mean(axis=2)[::8, ::8].astype(np.float32)[:4, :4]} for row in rows]

    def gallery(self, row):
        return [("heatmap", np.kron(row["scores"], np.ones((16, 16), np.float32)))]


class BatchRows(Op):
    """Records how many rows each call of ``process`` got (the engine's micro-batch)."""

    name = "testops:BatchRows"
    inputs = ("image",)
    outputs = (Output("batch_rows", "column", "int64"),)

    def process(self, rows):
        return [{"batch_rows": len(rows)} for _ in rows]
