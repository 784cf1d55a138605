"""Threads or processes? The same resize,stats run on 2 cores with each worker layout, cluster already up.

    python benchmarks/workers.py [--images 20000] [--repeat 3] [--scratch /dev/shm/daskmv-bench]

OpenCV releases the GIL while it decodes and resizes, but the rest of each row (the engine's Python,
the op's Python) does not: this measures which layout wins, to choose ``--workers`` and
``threads_per_worker`` by the numbers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from engine import commit, machine, make_images, warm_cache  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--work", default=str(HERE / "work"))
    ap.add_argument("--scratch", default=None)
    ap.add_argument("--save", action="store_true", help="also write the table to benchmarks/results/")
    args = ap.parse_args()
    import daskmv
    import pandas as pd
    from distributed import Client, LocalCluster

    from daskmv.cluster import local_cluster

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    scratch = Path(args.scratch or work)
    manifest = make_images(work, args.images, 128, 128)
    warm_cache(pd.read_parquet(manifest)["path"].tolist())
    layouts = {
        "2 processes x 1 thread (default)": lambda: local_cluster(2, 1, dashboard_address=":0"),
        "1 process x 2 threads": lambda: local_cluster(1, 2, dashboard_address=":0"),
        "in the driver's process, 2 threads": lambda: LocalCluster(n_workers=1, threads_per_worker=2,
                                                                   processes=False, dashboard_address=":0"),
    }
    out = scratch / "workers-out"
    results = {}
    for name, start in layouts.items():
        with start() as cluster, Client(cluster) as client:
            daskmv.run(str(manifest), "resize,stats", str(out), client=client, progress="none", limit=64,
                       overwrite=True)
            times = []
            for _ in range(args.repeat):
                shutil.rmtree(out, ignore_errors=True)
                os.sync()
                t = time.perf_counter()
                daskmv.run(str(manifest), "resize,stats", str(out), client=client, progress="none")
                times.append(time.perf_counter() - t)
            results[name] = statistics.median(times)
    shutil.rmtree(out, ignore_errors=True)
    best = min(results.values())
    lines = [f"## Worker layouts, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", "",
             f"- command: `python benchmarks/workers.py {' '.join(sys.argv[1:])}`".rstrip(),
             f"- machine: {machine()}; commit {commit()}",
             f"- work: {args.images:,} JPEGs of 128x128, resize,stats; median of {args.repeat}; outputs in {scratch}",
             "", "| layout | seconds | images/s | time / best |", "|---|---:|---:|---:|"]
    for name, secs in results.items():
        lines.append(f"| {name} | {secs:.2f} | {args.images / secs:,.0f} | {secs / best:.2f}x |")
    report = "\n".join(lines)
    print(report)
    if args.save:
        (HERE / "results").mkdir(exist_ok=True)
        (HERE / "results" / f"{datetime.now(timezone.utc):%Y-%m-%d}-workers.md").write_text(report + "\n")


if __name__ == "__main__":
    main()
