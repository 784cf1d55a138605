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
    """Its first ``failures`` setups fail, counted over every process (a model that does not load at first).

    Each failure claims a flag file (``flag``, then ``flag.2``, ...) atomically with O_CREAT | O_EXCL, so
    two workers setting up at the same moment never both take the same failure."""

    name = "testops:FailsFirstSetup"
    inputs = ("label",)
    outputs = (Output("label_again", "column", "int64"),)
    params = {"flag": Param("", "file created by the first (failing) setup"),
              "failures": Param(1, "how many setups fail, in all")}

    def setup(self, device):
        for k in range(1, int(self.config["failures"]) + 1):
            path = self.config["flag"] + ("" if k == 1 else f".{k}")
            try:
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                continue  # this failure was claimed already
            raise RuntimeError(f"model failed to load (failure {k} of {self.config['failures']})")

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


class Gate(Op):
    """Resizes like ``resize`` (size 48), but a process can be held before its n-th batch: while the file
    ``<dir>/hold-<pid>-<n>`` exists, the batch waits (and ``<dir>/at-<pid>-<n>`` says it is there). Lets a
    test stop an attempt at a chosen point, as a slow or stuck orphan task would be."""

    name = "testops:Gate"
    inputs = ("image",)
    outputs = (Output("small", "array", "uint8"),)
    params = {"dir": Param("", "folder of hold files")}

    def setup(self, device):
        self.batches = 0

    def process(self, rows):
        import cv2

        hold = os.path.join(self.config["dir"], f"hold-{os.getpid()}-{self.batches}")
        if os.path.exists(hold):
            open(os.path.join(self.config["dir"], f"at-{os.getpid()}-{self.batches}"), "w").close()
            while os.path.exists(hold):
                time.sleep(0.02)
        self.batches += 1
        return [{"small": cv2.resize(row["image"], (48, 48), interpolation=cv2.INTER_AREA)} for row in rows]


class BrokenOn(Op):
    """Its set-up fails on the worker named ``worker`` (a node whose model is missing); fine elsewhere."""

    name = "testops:BrokenOn"
    inputs = ("label",)
    outputs = (Output("where", "column", "string"),)
    params = {"worker": Param("0", "name of the broken worker")}

    def setup(self, device):
        from distributed import get_worker

        if str(get_worker().name) == self.config["worker"]:
            raise FileNotFoundError(f"model file missing on worker {get_worker().name}")

    def process(self, rows):
        from distributed import get_worker

        return [{"where": str(get_worker().name)} for _ in rows]


class DeviceFault(Op):
    """Raises a CUDA-style device error on the first batch of the run (claimed atomically across processes
    through ``flag``), then works: a GPU that faulted once."""

    name = "testops:DeviceFault"
    inputs = ("label",)
    outputs = (Output("fine", "column", "int64"),)
    params = {"flag": Param("", "file claimed by the faulting batch")}

    def process(self, rows):
        try:
            os.close(os.open(self.config["flag"], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return [{"fine": row["label"]} for row in rows]
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


class ShortResults(Op):
    """A buggy op: returns one result fewer than it was given rows."""

    name = "testops:ShortResults"
    inputs = ("label",)
    outputs = (Output("echo", "column", "int64"),)

    def process(self, rows):
        return [{"echo": row["label"]} for row in rows][:-1]


class SlowGPU(Op):
    """A slow op that wants a GPU (runs only on workers declaring one when any does)."""

    name = "testops:SlowGPU"
    inputs = ("label",)
    outputs = (Output("gpu_label", "column", "int64"),)
    params = {"seconds": Param(0.05, "sleep per row")}
    gpu = True

    def process(self, rows):
        time.sleep(self.config["seconds"] * len(rows))
        return [{"gpu_label": row["label"]} for row in rows]


# -- a filesystem whose reads fail once per file with EIO (a network filesystem having a bad moment) --
import errno as _errno

import fsspec
from fsspec.implementations.local import LocalFileSystem


class FlakyFileSystem(LocalFileSystem):
    """``flakyfile:///abs/path``: the first open of each file, over all processes, fails with EIO; later
    opens read the file. The failures are claimed with O_CREAT | O_EXCL flag files beside the files."""

    protocol = ("flakyfile",)

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        if path.startswith("flakyfile://"):
            path = path[len("flakyfile://"):]
        return super()._strip_protocol(path)

    def _open(self, path, mode="rb", **kwargs):
        if "r" in mode:
            flag = self._strip_protocol(path) + ".failed-once"
            try:
                os.close(os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass
            else:
                raise OSError(_errno.EIO, "Input/output error (flaky network filesystem)", path)
        return super()._open(path, mode=mode, **kwargs)


fsspec.register_implementation("flakyfile", FlakyFileSystem, clobber=True)


# -- ops for the stages tests ------------------------------------------------------------------------
class Thumb(Op):
    """An 8x8 thumbnail of each image (an array output a later stage reads back)."""

    name = "testops:Thumb"
    inputs = ("image",)
    outputs = (Output("thumb", "array", "uint8"),)

    def process(self, rows):
        import cv2

        return [{"thumb": cv2.resize(row["image"], (8, 8), interpolation=cv2.INTER_AREA)} for row in rows]


class PairDiff(Op):
    """On pair rows: both images, read from their paths, and both thumbnails, read from the earlier stage."""

    name = "testops:PairDiff"
    inputs = ("image:path_a", "image:path_b", "array:thumb_path_a", "array:thumb_path_b")
    outputs = (Output("diff", "column", "float64"), Output("thumb_diff", "column", "float64"),
               Output("side_by_side", "array", "uint8"))

    def process(self, rows):
        out = []
        for row in rows:
            a, b = row["image:path_a"].astype(float), row["image:path_b"].astype(float)
            ta, tb = row["array:thumb_path_a"], row["array:thumb_path_b"]
            out.append({"diff": float(np.abs(a.mean() - b.mean())),
                        "thumb_diff": float(np.abs(ta.astype(float) - tb.astype(float)).mean()),
                        "side_by_side": np.concatenate([ta, tb], axis=1)})
        return out


class ListItems(Op):
    """Lists label + 1 items per row (as a video's frames would be listed), as JSON."""

    name = "testops:ListItems"
    inputs = ("label",)
    outputs = (Output("items", "column", "json"),)

    def process(self, rows):
        return [{"items": [{"k": k, "twice": 2 * k} for k in range(int(row["label"]) + 1)]} for row in rows]


class FolderPerRow(Op):
    """Writes a folder per row (as a reconstruction writes a model) and returns it: an artifact output."""

    name = "testops:FolderPerRow"
    inputs = ("label",)
    outputs = (Output("model", "artifact", "path"),)

    def process(self, rows):
        import tempfile

        out = []
        for row in rows:
            folder = tempfile.mkdtemp(prefix="daskmv-test-artifact-")
            with open(os.path.join(folder, "cameras.txt"), "w") as fh:
                fh.write(f"{row['id']} {row['label']}\n")
            os.makedirs(os.path.join(folder, "sparse", "0"))
            with open(os.path.join(folder, "sparse", "0", "points.bin"), "wb") as fh:
                fh.write(bytes([int(row["label"])] * 16))
            out.append({"model": folder})
        return out


class Usable(Op):
    """On group rows: how many members were fine, from the group's lists."""

    name = "testops:Usable"
    inputs = ("ids", "errors")
    outputs = (Output("usable", "column", "string"),)

    def process(self, rows):
        return [{"usable": f"{sum(e is None for e in row['errors'])} of {len(row['ids'])}"} for row in rows]


class Nap(Op):
    """Sleeps per row; reads nothing but the id (so it runs on any rows, pairs and groups included)."""

    name = "testops:Nap"
    inputs = ("id",)
    outputs = (Output("napped", "column", "float64"),)
    params = {"seconds": Param(0.01, "sleep per row")}

    def process(self, rows):
        time.sleep(self.config["seconds"] * len(rows))
        return [{"napped": self.config["seconds"]} for _ in rows]


class EnvValue(Op):
    """The value of an environment variable in the worker (None: unset)."""

    name = "testops:EnvValue"
    inputs = ("id",)
    outputs = (Output("env_value", "column", "str"),)
    params = {"variable": Param("DASKMV_TEST_VARIABLE", "the variable's name")}

    def process(self, rows):
        return [{"env_value": os.environ.get(self.config["variable"])} for _ in rows]


class FrameMean(Op):
    """Per frame (after a `video` step): the frame's mean colour as an array [3] and its index back from the
    pixels (the synthetic videos encode it)."""

    name = "testops:FrameMean"
    inputs = ("image", "frame_index")
    outputs = (Output("mean_rgb", "array", "float32"), Output("decoded_index", "column", "int64"))

    def process(self, rows):
        from daskmv.video.synthetic import frame_index_of

        return [{"mean_rgb": row["image"].reshape(-1, 3).mean(axis=0), "decoded_index": frame_index_of(row["image"])}
                for row in rows]


class FailsOnFrame(Op):
    """Fails on one frame index of every video."""

    name = "testops:FailsOnFrame"
    inputs = ("image", "frame_index")
    outputs = (Output("ok", "column", "bool"),)
    params = {"index": Param(7, "the frame that fails")}

    def process(self, rows):
        return [ValueError(f"cannot use frame {row['frame_index']}") if row["frame_index"] == self.config["index"]
                else {"ok": True} for row in rows]


class FakeDeviceMemory(Op):
    """Holds one slot of a fake device for as long as its worker lives (an flock'ed file among ``capacity``
    in ``folder``): a model that takes 1/capacity of a GPU. Set-up on a full device raises the out-of-memory
    error a real one would; a dead worker frees its slot, like a process's CUDA context. Rows sleep."""

    name = "testops:FakeDeviceMemory"
    inputs = ("url",)
    gpu = True
    outputs = (Output("slot", "column", "int64"),)
    params = {"folder": Param("", "where the slots are"), "capacity": Param(3, "slots on the device"),
              "seconds": Param(0.1, "sleep per row"),
              "die": Param(False, "on a full device, kill the process (a CUDA abort) instead of raising")}

    def setup(self, device):
        import fcntl

        for slot in range(self.config["capacity"]):
            fh = open(os.path.join(self.config["folder"], f"slot-{slot}"), "a")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.close()
                continue
            self.slot, self.handle = slot, fh
            return
        if self.config["die"]:
            os._exit(1)
        raise MemoryError(f"CUDA out of memory: the fake device's {self.config['capacity']} slots are taken")

    def process(self, rows):
        time.sleep(self.config["seconds"] * len(rows))
        return [{"slot": self.slot} for _ in rows]


class BatchCost(Op):
    """Costs ``overhead`` seconds a batch plus ``per_row`` a row (bigger batches go faster), and runs out of
    memory above ``fits`` rows: what the tuner's batch search meets with a real model on a GPU."""

    name = "testops:BatchCost"
    inputs = ("label",)
    outputs = (Output("batch", "column", "int64"),)
    params = {"overhead": Param(0.1, "seconds per batch"), "per_row": Param(0.001, "seconds per row"),
              "fits": Param(8, "the largest batch that fits")}

    def process(self, rows):
        if len(rows) > self.config["fits"]:
            raise MemoryError(f"cannot allocate a batch of {len(rows)}")
        time.sleep(self.config["overhead"] + self.config["per_row"] * len(rows))
        return [{"batch": len(rows)} for _ in rows]


from daskmv.splat.op import Splat  # noqa: E402


class SplatDies(Splat):
    """The splat op, whose worker process dies at step ``die_at`` unless it resumed from a checkpoint (a
    worker killed mid-training: the engine retries the scene elsewhere, which must resume, not restart)."""

    name = "testops:SplatDies"
    params = {**Splat.params, "die_at": Param(25, "the step at which the first attempt's worker dies")}

    def check_params(self):
        die_at = self.config.pop("die_at")
        super().check_params()
        self.config["die_at"] = die_at

    def after_step(self, step):
        if step == self.config["die_at"] and self.trainer.resumed_from is None:
            os._exit(3)


class BlasThreads(Op):
    """The threads of the worker's BLAS pools (numpy's OpenBLAS) as its products will use them."""

    name = "testops:BlasThreads"
    inputs = ("id",)
    outputs = (Output("blas_threads", "column", "int64"),)

    def process(self, rows):
        from threadpoolctl import threadpool_info

        threads = max((pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"), default=0)
        return [{"blas_threads": threads} for _ in rows]


class FolderThenBadCount(Op):
    """Writes a folder per row and returns it with a ``count`` that does not check for odd labels: those rows
    fail after their artifact folder was made."""

    name = "testops:FolderThenBadCount"
    inputs = ("label",)
    outputs = (Output("model", "artifact", "path"), Output("count", "column", "int64"))

    def process(self, rows):
        import tempfile

        out = []
        for row in rows:
            folder = tempfile.mkdtemp(prefix="daskmv-test-badcount-")
            with open(os.path.join(folder, "cameras.txt"), "w") as fh:
                fh.write(str(row["id"]))
            odd = int(row["label"]) % 2
            out.append({"model": folder, "count": "many" if odd else int(row["label"])})
        return out
