"""What users write by hand, kept lean (OpenCV and NumPy only, as such scripts import).

Two versions of the per-image work of daskmv's ``resize,stats``: ``process_one`` uses the same OpenCV
primitives as daskmv (the comparison then measures the engine alone); with ``naive`` it computes the
statistics the way hand-written scripts usually do, in NumPy (float32 mean/std, a float64 Laplacian):
the issue's "hand-written Pool".
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import cv2
import numpy as np

cv2.setNumThreads(1)


def stats(image: np.ndarray) -> dict:
    mean, std = cv2.meanStdDev(image)
    _, lap_std = cv2.meanStdDev(cv2.Laplacian(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), cv2.CV_32F, ksize=1))
    out = {f"mean_{c}": float(mean[i, 0]) for i, c in enumerate("rgb")}
    out.update({f"std_{c}": float(std[i, 0]) for i, c in enumerate("rgb")})
    out["sharpness"] = float(lap_std[0, 0]) ** 2
    return out


def naive_stats(image: np.ndarray) -> dict:
    pixels = image.reshape(-1, 3).astype(np.float32)
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float64)
    lap = gray[:-2, 1:-1] + gray[2:, 1:-1] + gray[1:-1, :-2] + gray[1:-1, 2:] - 4.0 * gray[1:-1, 1:-1]
    out = {f"mean_{c}": float(pixels[:, i].mean()) for i, c in enumerate("rgb")}
    out.update({f"std_{c}": float(pixels[:, i].std()) for i, c in enumerate("rgb")})
    out["sharpness"] = float(lap.var())
    return out


def decode_only(path: str) -> int:
    return cv2.imread(path, cv2.IMREAD_COLOR).shape[0]


def decode_only_reduced(path: str) -> int:
    return cv2.imread(path, cv2.IMREAD_REDUCED_COLOR_2).shape[0]


def process_one(args: tuple[int, str, str, bool]) -> dict:
    """Per row: decode, resize to 224x224 (INTER_AREA), stats (NumPy when ``naive``), np.save the resized array."""
    i, path, out, naive = args
    image = cv2.cvtColor(cv2.imread(path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    resized = cv2.resize(image, (224, 224), interpolation=cv2.INTER_AREA)
    np.save(os.path.join(out, f"{i:07d}.npy"), resized)
    return {"path": path, **(naive_stats(image) if naive else stats(image))}


def compute_only(path: str) -> float:
    """The same per-row work without storing anything: what the cores do when writes are free."""
    image = cv2.cvtColor(cv2.imread(path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    resized = cv2.resize(image, (224, 224), interpolation=cv2.INTER_AREA)
    return stats(image)["sharpness"] + float(resized[0, 0, 0])


def pool_compute_only(paths: list[str], processes: int) -> float:
    t = time.perf_counter()
    with mp.get_context("spawn").Pool(processes) as pool:
        pool.map(compute_only, paths, chunksize=64)
    return time.perf_counter() - t


def pool_run(paths: list[str], out: str, processes: int, naive: bool = False) -> tuple[float, list[dict]]:
    os.makedirs(out, exist_ok=True)
    t = time.perf_counter()
    with mp.get_context("spawn").Pool(processes) as pool:
        rows = pool.map(process_one, [(i, p, out, naive) for i, p in enumerate(paths)], chunksize=64)
    return time.perf_counter() - t, rows


def loop_run(paths: list[str], out: str) -> tuple[float, list[dict]]:
    os.makedirs(out, exist_ok=True)
    t = time.perf_counter()
    rows = [process_one((i, p, out, False)) for i, p in enumerate(paths)]
    return time.perf_counter() - t, rows


def decode_limit(paths: list[str], processes: int, reduced: bool = False) -> float:
    t = time.perf_counter()
    with mp.get_context("spawn").Pool(processes) as pool:
        pool.map(decode_only_reduced if reduced else decode_only, paths, chunksize=64)
    return time.perf_counter() - t
