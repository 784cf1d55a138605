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
from memory import TreeMemory  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--work", default=str(HERE / "work"))
    ap.add_argument("--scratch", default=None)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--height", type=int, default=128)
    ap.add_argument("--decode-threads", default="0,1,2,4", help="loader threads per worker to compare")
    ap.add_argument("--save", action="store_true", help="also write the table to benchmarks/results/")
    args = ap.parse_args()
    import daskmv
    import pandas as pd
    from distributed import Client, LocalCluster

    from daskmv.cluster import local_cluster

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    scratch = Path(args.scratch or work)
    manifest = make_images(work, args.images, args.width, args.height)
    warm_cache(pd.read_parquet(manifest)["path"].tolist())
    layouts = {
        "2 processes x 1 thread (default)": lambda: local_cluster(2, 1, dashboard_address=":0"),
        "1 process x 2 threads": lambda: local_cluster(1, 2, dashboard_address=":0"),
        "in the driver's process, 2 threads": lambda: LocalCluster(n_workers=1, threads_per_worker=2,
                                                                   processes=False, dashboard_address=":0"),
    }
    out = scratch / "workers-out"
    results = {}
    memory: dict[str, float] = {}  # the process tree's peak memory (MB) over a layout's timed runs

    def timed(client, **options) -> tuple[float, float]:
        daskmv.run(str(manifest), "resize,stats", str(out), client=client, progress="none", limit=64,
                   overwrite=True, **options)
        times, peaks = [], []
        for _ in range(args.repeat):
            shutil.rmtree(out, ignore_errors=True)
            os.sync()
            t = time.perf_counter()
            with TreeMemory() as mem:
                daskmv.run(str(manifest), "resize,stats", str(out), client=client, progress="none", **options)
            times.append(time.perf_counter() - t)
            peaks.append(mem.peak_mb)
        return statistics.median(times), statistics.median(peaks)

    for name, start in layouts.items():
        with start() as cluster, Client(cluster) as client:
            results[name], memory[name] = timed(client)
    threads = {}
    with layouts["2 processes x 1 thread (default)"]() as cluster, Client(cluster) as client:
        for n in [int(x) for x in args.decode_threads.split(",") if x.strip()]:
            label = f"{n} loader thread(s) per worker" + (" (default)" if n == 2 else "") + \
                (": read and decode on the task's thread" if n == 0 else "")
            threads[label], memory[label] = timed(client, decode_threads=n)
    shutil.rmtree(out, ignore_errors=True)
    best = min(results.values())
    lines = [f"## Worker layouts, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", "",
             f"- command: `python benchmarks/workers.py {' '.join(sys.argv[1:])}`".rstrip(),
             f"- machine: {machine()}; commit {commit()}",
             f"- work: {args.images:,} JPEGs of {args.width}x{args.height}, resize,stats; median of {args.repeat}; "
             f"outputs in {scratch}; peak memory: the largest sum of PSS over the benchmark process and all its "
             "child processes (the workers), sampled every 0.2 s during each run",
             "", "| layout | seconds | images/s | peak memory (MB) | time / best |", "|---|---:|---:|---:|---:|"]
    for name, secs in results.items():
        lines.append(f"| {name} | {secs:.2f} | {args.images / secs:,.0f} | {memory[name]:,.0f} | {secs / best:.2f}x |")
    if threads:
        fastest = min(threads.values())
        lines += ["", "Decode overlapped with compute: loader threads per worker (2 processes x 1 thread):", "",
                  "| loader threads | seconds | images/s | peak memory (MB) | time / best |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {name} | {secs:.2f} | {args.images / secs:,.0f} | {memory[name]:,.0f} | {secs / fastest:.2f}x |"
                  for name, secs in threads.items()]
    report = "\n".join(lines)
    print(report)
    if args.save:
        (HERE / "results").mkdir(exist_ok=True)
        tag = "" if (args.width, args.height) == (128, 128) else f"-{args.width}x{args.height}"
        (HERE / "results" / f"{datetime.now(timezone.utc):%Y-%m-%d}-workers{tag}.md").write_text(report + "\n")


if __name__ == "__main__":
    main()
