"""Engine benchmark: daskmv against a hand-written multiprocessing.Pool and a single-process loop.

    python benchmarks/engine.py                      # 20,000 128x128 JPEGs, 2 workers, RSS at 100k and 1M rows
    python benchmarks/engine.py --images 3000 --width 640 --height 480 --rss-rows 0

Every method does the same work on the same files in the same run: decode the JPEG, resize to 224x224
(INTER_AREA), compute per-channel mean/std and the Laplacian-variance sharpness, store the resized array
and the statistics. The Pool writes one .npy per row and a Parquet table (what hand-written multi-GPU
scripts do); daskmv writes its output root (Zarr + manifest). "decode only" is the JPEG-decode rate of the
same processes: the ceiling for any method that decodes every file.

Driver memory: a trivial op (no file reads) over 100,000- and 1,000,000-row manifests, each in a fresh
process, reporting that process's peak RSS (the driver alone; workers are other processes).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench_ops, importable by the workers as well
os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)

from daskmv.ops.core import image_stats  # noqa: E402  (the same OpenCV primitives for every method)

cv2.setNumThreads(1)


# -- data --------------------------------------------------------------------------------------------
def make_images(folder: Path, n: int, width: int, height: int) -> Path:
    manifest = folder / f"manifest-{n}-{width}x{height}.parquet"
    if manifest.exists():
        return manifest
    images = folder / f"images-{width}x{height}"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = images / f"{i:06d}.jpg"
        if not path.exists():
            small = rng.integers(0, 256, (max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
            img = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
            noise = rng.integers(0, 24, img.shape, dtype=np.uint8)
            cv2.imwrite(str(path), cv2.add(img, noise), [cv2.IMWRITE_JPEG_QUALITY, 90])
        paths.append(str(path))
    pd.DataFrame({"path": paths}).to_parquet(manifest, index=False)
    return manifest


def warm_cache(paths: list[str]) -> None:
    for p in paths:
        with open(p, "rb") as fh:
            fh.read()


# -- the baselines -------------------------------------------------------------------------------------
def decode_only(path: str) -> int:
    return cv2.imread(path, cv2.IMREAD_COLOR).shape[0]


def process_one(args: tuple[int, str, str]) -> dict:
    """What a hand-written script does per row: decode, resize, stats, np.save the array."""
    i, path, out = args
    image = cv2.cvtColor(cv2.imread(path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    resized = cv2.resize(image, (224, 224), interpolation=cv2.INTER_AREA)
    np.save(os.path.join(out, f"{i:07d}.npy"), resized)
    return {"path": path, **image_stats(image)}


def pool_run(paths: list[str], out: Path, processes: int) -> float:
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    with mp.get_context("spawn").Pool(processes) as pool:
        rows = pool.map(process_one, [(i, p, str(out)) for i, p in enumerate(paths)], chunksize=64)
    pd.DataFrame(rows).to_parquet(out / "stats.parquet")
    return time.perf_counter() - t


def loop_run(paths: list[str], out: Path) -> float:
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    rows = [process_one((i, p, str(out))) for i, p in enumerate(paths)]
    pd.DataFrame(rows).to_parquet(out / "stats.parquet")
    return time.perf_counter() - t


def decode_limit(paths: list[str], processes: int) -> float:
    t = time.perf_counter()
    with mp.get_context("spawn").Pool(processes) as pool:
        pool.map(decode_only, paths, chunksize=64)
    return time.perf_counter() - t


def daskmv_run(manifest: Path, out: Path, workers: int, extra: dict) -> tuple[float, dict]:
    import daskmv

    t = time.perf_counter()
    result = daskmv.run(str(manifest), "resize,stats", str(out), workers=workers, overwrite=True,
                        progress="none", cluster_kwargs={"dashboard_address": ":0"}, **extra)
    return time.perf_counter() - t, result.counts


# -- driver memory -----------------------------------------------------------------------------------
def rss_child(rows: int, work: str, workers: int, partition_rows: int | None) -> None:
    """Run in a fresh process: a trivial op over ``rows`` rows; print peak RSS and timing as JSON."""
    import daskmv

    manifest = Path(work) / f"trivial-{rows}.parquet"
    if not manifest.exists():
        pd.DataFrame({"id": [f"r{i:08d}" for i in range(rows)], "label": np.arange(rows) % 97}).to_parquet(
            manifest, index=False, row_group_size=100_000)
    t = time.perf_counter()
    result = daskmv.run(str(manifest), "bench_ops:Square", str(Path(work) / f"trivial-{rows}-out"), workers=workers,
                        overwrite=True, progress="none", partition_rows=partition_rows,
                        cluster_kwargs={"dashboard_address": ":0"})
    seconds = time.perf_counter() - t
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"rows": rows, "seconds": seconds, "peak_rss_mb": peak_kb / 1024, "ok": result.counts["ok"]}))


def measure_rss(rows: int, work: Path, workers: int, partition_rows: int | None) -> dict:
    cmd = [sys.executable, __file__, "--rss-child", str(rows), "--work", str(work), "--workers", str(workers)]
    if partition_rows:
        cmd += ["--partition-rows", str(partition_rows)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- report ------------------------------------------------------------------------------------------
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=HERE).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=20_000)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--height", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--partition-rows", type=int, default=None)
    ap.add_argument("--rss-rows", default="100000,1000000", help="comma list; 0 to skip")
    ap.add_argument("--work", default=str(HERE / "work"))
    ap.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--save", action="store_true", help="also write the table to benchmarks/results/")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.rss_child is not None:
        rss_child(args.rss_child, str(work), args.workers, args.partition_rows)
        return

    manifest = make_images(work, args.images, args.width, args.height)
    paths = pd.read_parquet(manifest)["path"].tolist()
    warm_cache(paths)
    n, w = len(paths), args.workers
    extra = {"partition_rows": args.partition_rows} if args.partition_rows else {}
    timings = {
        "decode only (Pool)": decode_limit(paths, w),
        "single-process loop": loop_run(paths, work / "loop-out"),
        f"multiprocessing.Pool({w}) + .npy": pool_run(paths, work / "pool-out", w),
    }
    seconds, counts = daskmv_run(manifest, work / "daskmv-out", w, extra)
    assert counts["ok"] == n, counts
    timings[f"daskmv, {w} workers (cluster start included)"] = seconds

    rate = {k: n / v for k, v in timings.items()}
    ours = rate[f"daskmv, {w} workers (cluster start included)"]
    pool = rate[f"multiprocessing.Pool({w}) + .npy"]
    loop = rate["single-process loop"]
    limit = rate["decode only (Pool)"]
    lines = [
        f"## Engine benchmark, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"- command: `python benchmarks/engine.py {' '.join(sys.argv[1:])}`".rstrip(),
        f"- machine: {machine()}; commit {commit()}",
        f"- work: {n:,} JPEGs of {args.width}x{args.height}; resize to 224x224 + stats; {w} processes each",
        "",
        "| method | seconds | images/s | daskmv / this |",
        "|---|---:|---:|---:|",
    ]
    for name, secs in timings.items():
        lines.append(f"| {name} | {secs:.2f} | {rate[name]:,.0f} | {ours / rate[name]:.2f}x |")
    lines += [
        "",
        f"daskmv vs Pool: {ours / pool:.2f}x (target >= 0.9x); vs single loop: {ours / loop:.2f}x (target >= 1.7x); "
        f"at {ours / limit:.0%} of the decode-only rate of the same cores.",
    ]
    sizes = [int(x) for x in args.rss_rows.split(",") if x.strip() and int(x) > 0]
    if sizes:
        lines += ["", "| trivial op, rows | seconds | rows/s | driver peak RSS (MB) |", "|---:|---:|---:|---:|"]
        peaks = []
        for rows in sizes:
            res = measure_rss(rows, work, w, args.partition_rows)
            peaks.append(res["peak_rss_mb"])
            lines.append(f"| {rows:,} | {res['seconds']:.1f} | {rows / res['seconds']:,.0f} | {res['peak_rss_mb']:.0f} |")
        if len(peaks) > 1:
            lines += ["", f"driver peak RSS grows {peaks[-1] / peaks[0]:.2f}x from {sizes[0]:,} to {sizes[-1]:,} rows "
                          "(target < 1.3x, under 1 GB)"]
    report = "\n".join(lines)
    print(report)
    if args.save:
        results = HERE / "results"
        results.mkdir(exist_ok=True)
        (results / f"{datetime.now(timezone.utc):%Y-%m-%d}-engine.md").write_text(report + "\n")


if __name__ == "__main__":
    main()
