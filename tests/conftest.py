"""Shared fixtures: generated images and manifests, and a real LocalCluster of 2 worker processes."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

TESTS = Path(__file__).resolve().parent
SHARED_DATA = TESTS.parent.parent / "shared" / "data"
#: The two NASA portraits (public domain) and their known person masks, carried in the repository.
PEOPLE = TESTS.parent / "data" / "people"
# The helper ops in tests/testops.py must import in worker processes and subprocesses too.
sys.path.insert(0, str(TESTS))
os.environ["PYTHONPATH"] = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)

# A private Dask config folder for the suite and its subprocesses: dask-jobqueue writes a jobqueue.yaml into
# the config folder when imported (not the user's home, then), and the SLURM tests read daskmv's profiles
# from it exactly as a user who copied deploy/slurm/jobqueue.yaml would.
DASK_CONFIG = tempfile.mkdtemp(prefix="daskmv-tests-dask-config-")
shutil.copy(TESTS.parent / "deploy" / "slurm" / "jobqueue.yaml", DASK_CONFIG)
os.environ["DASK_CONFIG"] = DASK_CONFIG

N_GOOD = 300
BAD_FILES = {
    "bad/truncated.jpg": "truncated",
    "bad/not_an_image.jpg": "text",
    "bad/empty.jpg": "empty",
    "bad/missing.jpg": "missing",
}


def make_images(folder: Path, n: int = N_GOOD, seed: int = 0) -> list[str]:
    """``n`` real image files of a few sizes and formats, with random but smooth content."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    sizes = [(96, 64), (80, 120), (128, 128)]
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        small = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
        img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
        ext = "png" if i % 10 == 0 else "jpg"
        rel = f"img/{i:04d}.{ext}"
        (folder / "img").mkdir(exist_ok=True)
        cv2.imwrite(str(folder / rel), img)
        paths.append(rel)
    return paths


def make_bad_files(folder: Path) -> list[str]:
    (folder / "bad").mkdir(parents=True, exist_ok=True)
    good = cv2.imencode(".jpg", np.full((64, 64, 3), 100, np.uint8))[1].tobytes()
    (folder / "bad/truncated.jpg").write_bytes(good[:200])
    (folder / "bad/not_an_image.jpg").write_text("this is a text file, not a JPEG\n")
    (folder / "bad/empty.jpg").write_bytes(b"")
    return list(BAD_FILES)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with 300 good images, 4 bad rows and ``manifest.csv`` / ``manifest.parquet`` (relative paths)."""
    root = tmp_path_factory.mktemp("dataset")
    paths = make_images(root) + make_bad_files(root)
    frame = pd.DataFrame({"path": paths, "label": np.arange(len(paths)) % 5})
    frame.to_csv(root / "manifest.csv", index=False)
    frame.to_parquet(root / "manifest.parquet", index=False)
    return root


@pytest.fixture(scope="session")
def client():
    """One real LocalCluster (2 worker processes, 1 thread each) shared by the end-to-end tests."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        with Client(cluster) as c:
            yield c


@pytest.fixture
def run_opts() -> dict:
    """Options that keep test runs quiet and quick."""
    return {"progress": "none", "retry_delay": 0.2}


def shared_data(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"the real test images are not here: {path} (CI has shared/ beside the clone)")
    return path


def without_refs(frame: pd.DataFrame) -> pd.DataFrame:
    """A manifest without its timings and array references: references name each attempt's own files
    (random tokens), so two runs' manifests are compared by everything else, and arrays by content."""
    def is_refs(values: pd.Series) -> bool:
        present = values.dropna().astype(str)
        return len(present) > 0 and bool(present.str.contains(r"(?:^|/)outputs\.zarr/.+#\d+$").all())

    refs = [c for c in frame.columns if frame[c].dtype == object or str(frame[c].dtype).startswith(("str", "string"))
            if is_refs(frame[c])]
    return frame.drop(columns=["seconds", *refs]).reset_index(drop=True)


def wait_for(predicate, timeout: float = 120.0, what: str = "condition") -> None:
    """Poll ``predicate`` until it holds; fail the test after ``timeout`` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
