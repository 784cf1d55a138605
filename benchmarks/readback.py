"""Reading back for training: ManifestDataset in a torch DataLoader against one .npy file per sample.

    python benchmarks/readback.py                     # 10,000 rows of 224x224x3 uint8, DataLoader(num_workers=2)
    python benchmarks/readback.py --images 2000 --save

daskmv runs ``resize`` (224x224) over generated JPEGs once; the same arrays are then written as one
``.npy`` file per sample (what hand-written pipelines produce, and what training code reads with
``np.load``). Every method iterates one epoch of the same shuffled order (seeded) through a
``torch.utils.data.DataLoader`` with the same batch size and the same number of worker processes;
items are dicts of id and array, collated into a uint8 tensor. All files are read once before timing
(warm page cache), so the table measures the read path's CPU cost, not the disk. Methods are
interleaved and repeated; the table gives medians (of a ratio: the median of each round's ratio).
Beside each rate: the peak memory of the whole process tree (the sum of PSS, so pages shared by the
forked workers count once, of this process and its children, sampled from /proc every 10 ms).

"Zarr opened per row" is the read path before it kept arrays open: ``zarr.open`` and the shard
index read for every item.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)

from engine import commit, machine, make_images, warm_cache  # noqa: E402
from memory import TreeMemory  # noqa: E402

SIZE = 224


# -- data --------------------------------------------------------------------------------------------
def make_outputs(work: Path, n: int, workers: int) -> Path:
    """daskmv's ``resize`` outputs for ``n`` generated JPEGs (made once, then reused)."""
    out = work / f"readback-{n}"
    manifest = out / "manifest.parquet"
    if manifest.exists():
        return manifest
    import daskmv

    images = make_images(work, n, 160, 120)
    daskmv.run(str(images), [{"resize": {"size": SIZE}}], str(out), workers=workers, overwrite=True,
               progress="none", cluster_kwargs={"dashboard_address": ":0"})
    return manifest


def make_npy(manifest: Path) -> Path:
    """The same arrays, one ``.npy`` file per ok row, named by position (made once, then reused)."""
    from daskmv.data import ManifestDataset

    folder = manifest.parent.with_name(manifest.parent.name + "-npy")
    ds = ManifestDataset(str(manifest), columns=["resized"])
    done = folder / "done"
    if done.exists() and int(done.read_text()) == len(ds):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(len(ds)):
        np.save(folder / f"{i:06d}.npy", ds[i]["resized"])
    done.write_text(str(len(ds)))
    return folder


# -- the datasets ------------------------------------------------------------------------------------
class NpyDataset:
    """One ``.npy`` per sample, read with ``np.load``: the baseline."""

    def __init__(self, folder: Path, ids: list[str]) -> None:
        self.paths = [str(folder / f"{i:06d}.npy") for i in range(len(ids))]
        self.ids = ids

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        return {"id": self.ids[i], "resized": np.load(self.paths[i])}


class ZarrPerRowDataset:
    """The previous read path: every item opens its Zarr array (metadata and shard index) again."""

    def __init__(self, manifest: Path) -> None:
        from daskmv.data import resolve_ref

        frame = pd.read_parquet(manifest)
        frame = frame[frame["status"] == "ok"].reset_index(drop=True)
        self.ids = frame["id"].tolist()
        self.refs = [resolve_ref(str(manifest), r) for r in frame["resized_path"]]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        import zarr

        url, row = self.refs[i]
        return {"id": self.ids[i], "resized": np.asarray(zarr.open(url, mode="r")[row])}


# -- measuring ---------------------------------------------------------------------------------------
def epoch(dataset, workers: int, batch_size: int, seed: int) -> tuple[float, float, int]:
    """(seconds, peak PSS MB, checksum) of one shuffled epoch through a DataLoader."""
    import torch
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    checksum = 0
    with TreeMemory(interval=0.01) as memory:
        t = time.perf_counter()
        for batch in loader:
            checksum += int(batch["resized"][:, 0, 0, 0].sum())  # touch every batch; cheap, same for all
        seconds = time.perf_counter() - t
    return seconds, memory.peak_mb, checksum


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (and daskmv workers)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--old-rows", type=int, default=2_000, help="rows for the slow previous read path (0: skip)")
    ap.add_argument("--work", default=str(HERE / "work"), help="generated images, outputs and .npy files")
    ap.add_argument("--save", action="store_true", help="also write the table to benchmarks/results/")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    from torch.utils.data import Subset

    from daskmv.data import ManifestDataset

    manifest = make_outputs(work, args.images, args.workers)
    npy = make_npy(manifest)
    ours = ManifestDataset(str(manifest), columns=["resized"])
    n = len(ours)
    baseline = NpyDataset(npy, ours.frame["id"].tolist())
    old = ZarrPerRowDataset(manifest)
    for i in np.random.default_rng(0).choice(n, size=min(n, 300), replace=False):  # same ids, same pixels
        a, b, c = ours[int(i)], baseline[int(i)], old[int(i)]
        assert a["id"] == b["id"] == c["id"] and np.array_equal(a["resized"], b["resized"])
        assert np.array_equal(a["resized"], c["resized"])
    warm_cache([str(p) for p in npy.glob("*.npy")] + [str(p) for p in manifest.parent.rglob("*") if p.is_file()])
    old_rows = min(args.old_rows, n)
    w = args.workers
    methods = {
        "npy": (f"one .npy per sample (np.load), DataLoader({w} workers): the baseline", baseline, w),
        "ours": (f"ManifestDataset, DataLoader({w} workers)", ours, w),
        "npy0": ("one .npy per sample (np.load), in the main process", baseline, 0),
        "ours0": ("ManifestDataset, in the main process", ours, 0),
    }
    if old_rows:
        methods["old"] = (f"Zarr opened per row (the previous read path), DataLoader({w} workers), "
                          f"first {old_rows:,} rows", Subset(old, range(old_rows)), w)
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in methods}
    sums: dict[str, int] = {}
    for r in range(args.repeat):  # interleaved, so drift on a shared machine hits every method alike
        for key, (_, dataset, workers) in methods.items():
            seconds, peak, checksum = epoch(dataset, workers, args.batch_size, seed=r)
            runs[key].append((len(dataset) / seconds, peak))
            if key in ("npy", "ours"):
                sums.setdefault(f"{key}-{r}", checksum)
    for r in range(args.repeat):
        assert sums[f"npy-{r}"] == sums[f"ours-{r}"], "the two read paths returned different batches"

    arrays = len({ref.rpartition("#")[0] for ref in ours.frame["resized_path"]})
    rate = {k: float(np.median([x[0] for x in v])) for k, v in runs.items()}
    # Each round's ratio to the baseline of the same round, then their median: drift between rounds cancels.
    ratio = {k: float(np.median([a[0] / b[0] for a, b in zip(v, runs["npy" if methods[k][2] else "npy0"])]))
             for k, v in runs.items()}
    peak = {k: float(np.median([x[1] for x in v])) for k, v in runs.items()}
    lines = [
        f"## Reading back, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"- command: `python benchmarks/readback.py {' '.join(sys.argv[1:])}`".rstrip(),
        f"- machine: {machine()}; commit {commit()}",
        f"- data: {n:,} rows of `resized` ({SIZE}x{SIZE}x3 uint8) from `daskmv run ... resize`, {arrays} partition "
        f"arrays; the same arrays as {n:,} .npy files",
        f"- one shuffled epoch (seeded), batch size {args.batch_size}, warm page cache; median of {args.repeat} "
        "interleaved runs; batches checked equal",
        "",
        "| method | samples/s | / .npy (same round) | peak memory, process tree PSS (MB) |",
        "|---|---:|---:|---:|",
    ]
    for key, (name, _, workers) in methods.items():
        lines.append(f"| {name} | {rate[key]:,.0f} | {ratio[key]:.2f}x | {peak[key]:,.0f} |")
    lines += ["", f"ManifestDataset / .npy files with {w} DataLoader workers: {ratio['ours']:.2f}x "
                  f"(target >= 1.0x); in the main process: {ratio['ours0']:.2f}x."]
    if old_rows:
        lines[-1] += f" Against the previous read path: {ratio['ours'] / ratio['old']:.1f}x."
    report = "\n".join(lines)
    print(report)
    if args.save:
        results = HERE / "results"
        results.mkdir(exist_ok=True)
        (results / f"{datetime.now(timezone.utc):%Y-%m-%d}-readback.md").write_text(report + "\n")


if __name__ == "__main__":
    main()
