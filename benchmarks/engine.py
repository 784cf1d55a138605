"""Engine benchmark: daskmv against a hand-written multiprocessing.Pool and a single-process loop.

    python benchmarks/engine.py                      # 20,000 128x128 JPEGs, 2 workers, RSS at 100k and 1M rows
    python benchmarks/engine.py --images 3000 --width 640 --height 480 --rss-rows 0

Every method does the same work on the same files in the same run (benchmarks/baselines.py): decode the
JPEG, resize to 224x224 (INTER_AREA), compute per-channel mean/std and the Laplacian-variance sharpness,
store the resized array and the statistics. The Pool and the loop write one .npy per row (what
hand-written multi-GPU scripts do); daskmv writes its output root (Zarr + manifest). daskmv runs twice
each round: cold (starting its LocalCluster, as `daskmv run` does) and warm (a cluster already up, as
in a notebook). "decode only" is the JPEG-decode rate of the same processes: the ceiling for any method
that decodes every file. Methods are interleaved and repeated; the table gives medians.

Driver memory: a trivial op (no file reads) over 100,000- and 1,000,000-row manifests, each in a fresh
process, reporting that process's peak RSS (the driver alone; workers are other processes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench_ops and baselines, importable by workers and Pool processes too
os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)

import baselines  # noqa: E402


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


def fresh(folder: Path) -> str:
    """An empty output folder, with earlier writes flushed, so no method pays for another's I/O."""
    shutil.rmtree(folder, ignore_errors=True)
    os.sync()
    return str(folder)


def warm_cache(paths: list[str]) -> None:
    for p in paths:
        with open(p, "rb") as fh:
            fh.read()


def daskmv_run(manifest: Path, out: Path, workers: int, extra: dict, client=None) -> tuple[float, dict]:
    import daskmv

    t = time.perf_counter()
    kwargs = {"client": client} if client is not None else {"workers": workers,
                                                             "cluster_kwargs": {"dashboard_address": ":0"}}
    result = daskmv.run(str(manifest), "resize,stats", str(out), overwrite=True, progress="none", **kwargs, **extra)
    return time.perf_counter() - t, result.counts


def check_same_results(baseline_rows: list[dict], out: Path) -> None:
    """The Pool and daskmv must agree on every statistic (same primitives, same files)."""
    ours = pd.read_parquet(out / "manifest.parquet").set_index("path")
    theirs = pd.DataFrame(baseline_rows).set_index("path").loc[ours.index]
    for column in theirs.columns:
        np.testing.assert_allclose(ours[column].to_numpy(float), theirs[column].to_numpy(float), rtol=1e-9)


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
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rss-rows", default="100000,1000000", help="comma list; 0 to skip")
    ap.add_argument("--work", default=str(HERE / "work"), help="generated images and manifests")
    ap.add_argument("--scratch", default=None, help="where every method writes its outputs (default: --work); "
                    "/dev/shm takes the disk out of the comparison")
    ap.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--save", action="store_true", help="also write the table to benchmarks/results/")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    scratch = Path(args.scratch or args.work)
    scratch.mkdir(parents=True, exist_ok=True)
    if args.rss_child is not None:
        rss_child(args.rss_child, str(work), args.workers, args.partition_rows)
        return

    manifest = make_images(work, args.images, args.width, args.height)
    paths = pd.read_parquet(manifest)["path"].tolist()
    warm_cache(paths)
    n, w = len(paths), args.workers
    extra = {"partition_rows": args.partition_rows} if args.partition_rows else {}
    from distributed import Client, LocalCluster

    from daskmv.cluster import local_cluster

    names = {
        "decode": "decode only (Pool): the ceiling",
        "compute": f"Pool({w}), same work but nothing stored",
        "loop": "single-process loop + .npy",
        "pool": f"multiprocessing.Pool({w}) + .npy",
        "cold": f"daskmv, {w} workers, cluster start included",
        "warm": f"daskmv, {w} workers, cluster already up",
    }
    runs: dict[str, list[float]] = {k: [] for k in names}
    for _ in range(args.repeat):  # interleaved, so drift on a shared machine hits every method alike
        runs["decode"].append(baselines.decode_limit(paths, w))
        runs["compute"].append(baselines.pool_compute_only(paths, w))
        seconds, loop_rows = baselines.loop_run(paths, fresh(scratch / "loop-out"))
        runs["loop"].append(seconds)
        seconds, pool_rows = baselines.pool_run(paths, fresh(scratch / "pool-out"), w)
        runs["pool"].append(seconds)
        seconds, counts = daskmv_run(manifest, Path(fresh(scratch / "daskmv-out")), w, extra)
        assert counts["ok"] == n, counts
        runs["cold"].append(seconds)
        with local_cluster(w, dashboard_address=":0") as cluster, Client(cluster) as client:
            # A notebook session after its first run: workers have imported daskmv and set up the ops.
            daskmv_run(manifest, Path(fresh(scratch / "daskmv-warmup")), w, {**extra, "limit": 64}, client=client)
            out = Path(fresh(scratch / "daskmv-out"))
            runs["warm"].append(daskmv_run(manifest, out, w, extra, client=client)[0])
    check_same_results(pool_rows, scratch / "daskmv-out")
    for name in ("loop-out", "pool-out", "daskmv-out", "daskmv-warmup"):
        shutil.rmtree(scratch / name, ignore_errors=True)

    timings = {names[k]: float(np.median(v)) for k, v in runs.items()}
    rate = {k: n / v for k, v in timings.items()}
    cold, warm = rate[names["cold"]], rate[names["warm"]]
    pool, loop, limit = rate[names["pool"]], rate[names["loop"]], rate[names["decode"]]
    lines = [
        f"## Engine benchmark, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"- command: `python benchmarks/engine.py {' '.join(sys.argv[1:])}`".rstrip(),
        f"- machine: {machine()}; commit {commit()}",
        f"- work: {n:,} JPEGs of {args.width}x{args.height}; decode, resize to 224x224 (INTER_AREA), stats; "
        f"{w} processes each; median of {args.repeat} interleaved runs; results checked equal",
        f"- outputs written to: {scratch}",
        "",
        "| method | seconds | images/s | daskmv (cold) / this |",
        "|---|---:|---:|---:|",
    ]
    for name, secs in timings.items():
        lines.append(f"| {name} | {secs:.2f} | {rate[name]:,.0f} | {cold / rate[name]:.2f}x |")
    lines += [
        "",
        f"daskmv / Pool: {cold / pool:.2f}x cold, {warm / pool:.2f}x warm (target >= 0.9x); "
        f"daskmv / single loop: {cold / loop:.2f}x cold, {warm / loop:.2f}x warm (target >= 1.7x); "
        f"daskmv reaches {warm / limit:.0%} of the decode-only rate of the same cores (warm), and "
        f"{warm / rate[names['compute']]:.0%} of the rate of the same work with nothing stored.",
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
        tag = "-tmpfs" if str(scratch).startswith("/dev/shm") else ""
        (results / f"{datetime.now(timezone.utc):%Y-%m-%d}-engine{tag}.md").write_text(report + "\n")


if __name__ == "__main__":
    main()
