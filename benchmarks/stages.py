"""Stages benchmark: the `pairs` reshape and a per-pair stage, against a plain Pool over the same pairs.

    python benchmarks/stages.py                        # 1,000 scenes x 30 images = 435,000 pairs, 2 workers
    python benchmarks/stages.py --scenes 100 --save

1. The reshape on the driver: `pairs` (exhaustive within each scene) over an image manifest of
   scenes x images rows, in a fresh process, as a stage does it (read the previous rows, pair them, write
   the stage's input.parquet): seconds and that process's peak RSS. Target: under 10 s and under 1 GB.
2. The whole pipeline `[pairs: {by: scene}, bench_ops:PairKey]` through `daskmv.run` (cold: the cluster is
   started inside), and the per-pair stage alone (its own seconds, from the stage's result), in pairs/s,
   with the process tree's peak memory.
3. The baseline a user writes without daskmv: a `multiprocessing.Pool` of the same processes looping over
   the same pairs (made the same way, with itertools per scene) with the same per-pair function, results
   written to one Parquet file. The hardware limit for this trivial work is the per-pair function alone in
   one process, times the cores: printed too.

The per-pair work is deliberately trivial (a hash of the two ids): what is measured is what the engine
adds per row. No image is read (the paths are never opened).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)

from bench_ops import pair_key  # noqa: E402
from engine import commit, machine  # noqa: E402
from memory import TreeMemory  # noqa: E402


def make_manifest(work: Path, scenes: int, per_scene: int) -> Path:
    path = work / f"scenes-{scenes}x{per_scene}.parquet"
    if not path.exists():
        rows = [{"id": f"s{s:05d}-i{i:03d}", "scene": f"s{s:05d}", "path": f"/data/s{s:05d}/{i:03d}.jpg"}
                for s in range(scenes) for i in range(per_scene)]
        pd.DataFrame(rows).to_parquet(path, index=False)
    return path


RESHAPE_CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
import pyarrow as pa, pyarrow.parquet as pq
from daskmv.reshape import Pairs
t = time.perf_counter()
table = pq.read_table(sys.argv[1])
pairs = Pairs(by="scene").run(table)
pq.write_table(pairs, sys.argv[2], compression="zstd")
seconds = time.perf_counter() - t
print(json.dumps({"pairs": pairs.num_rows, "seconds": seconds, "import_s": t - t0,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def reshape_alone(manifest: Path, work: Path) -> dict:
    out = work / "pairs.parquet"
    proc = subprocess.run([sys.executable, "-c", RESHAPE_CHILD, str(manifest), str(out)], capture_output=True,
                          text=True, check=True)
    return json.loads(proc.stdout)


def daskmv_run(manifest: Path, out: Path, workers: int) -> tuple[float, float, dict]:
    import daskmv

    shutil.rmtree(out, ignore_errors=True)
    with TreeMemory() as memory:
        t = time.perf_counter()
        r = daskmv.run(str(manifest), [{"pairs": {"by": "scene"}}, "bench_ops:PairKey"], str(out), workers=workers,
                       progress="none")
        seconds = time.perf_counter() - t
    assert r.complete and r.counts["error"] == 0, r.counts
    stage = json.loads((Path(r.stages[-1].out) / "run.json").read_text())
    return seconds, memory.peak_mb, {"pairs": r.counts["rows"], "stage_seconds": stage["seconds"]}


def _scene_pairs(group: list[str]) -> list[tuple[str, str]]:
    return list(itertools.combinations(group, 2))


def _pool_chunk(pairs: list[tuple[str, str]]) -> list[tuple[str, int]]:
    return [(f"{a}|{b}", pair_key(a, b)) for a, b in pairs]


def pool_run(manifest: Path, out: Path, workers: int) -> tuple[float, float, int]:
    with TreeMemory() as memory:
        t = time.perf_counter()
        frame = pd.read_parquet(manifest)
        pairs = [p for _, g in frame.groupby("scene", sort=False) for p in _scene_pairs(g["id"].tolist())]
        chunks = [pairs[i : i + 4096] for i in range(0, len(pairs), 4096)]
        with Pool(workers) as pool:
            results = [r for chunk in pool.imap(_pool_chunk, chunks) for r in chunk]
        pd.DataFrame(results, columns=["id", "key"]).to_parquet(out, index=False)
        seconds = time.perf_counter() - t
    return seconds, memory.peak_mb, len(results)


def single_core_limit(manifest: Path) -> float:
    """Pairs per second of the per-pair function alone, in this process (no I/O, no engine)."""
    frame = pd.read_parquet(manifest)
    pairs = [p for _, g in frame.groupby("scene", sort=False) for p in _scene_pairs(g["id"].tolist())]
    t = time.perf_counter()
    for a, b in pairs:
        pair_key(a, b)
    return len(pairs) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", type=int, default=1000)
    ap.add_argument("--per-scene", type=int, default=30)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--work", default=str(HERE / "work" / "stages"))
    ap.add_argument("--save", action="store_true", help="also write the table to benchmarks/results/")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    manifest = make_manifest(work, args.scenes, args.per_scene)
    n_pairs = args.scenes * args.per_scene * (args.per_scene - 1) // 2

    reshapes, runs, pools = [], [], []
    for _ in range(args.repeat):  # interleaved, so drift on a shared machine hits every method alike
        reshapes.append(reshape_alone(manifest, work))
        runs.append(daskmv_run(manifest, work / "out", args.workers))
        pools.append(pool_run(manifest, work / "pool.parquet", args.workers))
    assert all(r["pairs"] == n_pairs for r in reshapes) and all(r[2]["pairs"] == n_pairs for r in runs)
    assert all(p[2] == n_pairs for p in pools)
    got = pd.read_parquet(work / "out" / "manifest.parquet", columns=["id", "key"]).set_index("id")["key"]
    want = pd.read_parquet(work / "pool.parquet").set_index("id")["key"]
    assert got.sort_index().equals(want.sort_index()), "daskmv and the Pool computed different keys"
    limit = single_core_limit(manifest) * args.workers

    med = lambda xs: float(np.median(xs))  # noqa: E731
    reshape_s, reshape_mb = med([r["seconds"] for r in reshapes]), med([r["peak_rss_mb"] for r in reshapes])
    run_s, run_mb = med([r[0] for r in runs]), med([r[1] for r in runs])
    stage_s = med([r[2]["stage_seconds"] for r in runs])
    pool_s, pool_mb = med([p[0] for p in pools]), med([p[1] for p in pools])
    lines = [
        f"## Stages benchmark, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"- command: `python benchmarks/stages.py {' '.join(sys.argv[1:])}`".rstrip(),
        f"- machine: {machine()}; commit {commit()}",
        f"- data: {args.scenes:,} scenes x {args.per_scene} images = {n_pairs:,} pairs (exhaustive); a trivial "
        f"per-pair op (a hash of the two ids); {args.workers} worker processes; median of {args.repeat} "
        "interleaved rounds",
        "",
        "| what | seconds | pairs/s | peak memory (MB) | target |",
        "|---|---:|---:|---:|---|",
        f"| the `pairs` reshape on the driver (read, pair, write the stage's input), alone in a process | "
        f"{reshape_s:.2f} | {n_pairs / reshape_s:,.0f} | {reshape_mb:,.0f} (its peak RSS) | < 10 s, < 1,000 MB |",
        f"| daskmv.run: reshape + per-pair stage, cluster start included | {run_s:.2f} | {n_pairs / run_s:,.0f} | "
        f"{run_mb:,.0f} (process tree PSS) | |",
        f"| the per-pair stage alone (its run.json seconds) | {stage_s:.2f} | {n_pairs / stage_s:,.0f} | | |",
        f"| multiprocessing.Pool({args.workers}) over the same pairs, results to Parquet: the baseline | {pool_s:.2f} | "
        f"{n_pairs / pool_s:,.0f} | {pool_mb:,.0f} (process tree PSS) | |",
        f"| the per-pair function alone, {args.workers} cores' worth (no engine, no I/O): the limit | | {limit:,.0f} | | |",
        "",
        f"daskmv end to end / Pool: {pool_s / run_s:.2f}x the Pool's pairs/s; the per-pair stage runs at "
        f"{(n_pairs / stage_s) / limit:.0%} of the per-pair function's own rate on {args.workers} cores.",
    ]
    table = "\n".join(lines)
    print(table)
    if args.save:
        path = HERE / "results" / f"{datetime.now(timezone.utc):%Y-%m-%d}-stages.md"
        path.write_text(table.replace("## ", "#### ", 1) + "\n")
        print(f"saved {path}")


if __name__ == "__main__":
    main()
