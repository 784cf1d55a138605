"""A reconstruction in the layout gsplat's and the original 3DGS code's COLMAP loaders read.

```
<scene>/
  images/<name>             undistorted images (PINHOLE cameras), named as in the model
  sparse/0/cameras.bin      the undistorted model, COLMAP binary
  sparse/0/images.bin
  sparse/0/points3D.bin
```
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any


def export_model(rec: Any, image_dir: str, out: str, undistort: bool = True, threads: int = 1) -> str:
    """Write ``rec`` (images read from ``image_dir`` by their model names) as the 3DGS layout in ``out``,
    undistorting on ``threads`` threads (-1: all cores)."""
    import pycolmap

    out_path = Path(out)
    sparse = out_path / "sparse" / "0"
    if not undistort:
        sparse.mkdir(parents=True, exist_ok=True)
        rec.write_binary(str(sparse))
        (out_path / "images").mkdir(exist_ok=True)
        for image in rec.images.values():
            if image.has_pose:
                shutil.copyfile(os.path.join(image_dir, image.name), out_path / "images" / image.name)
        return str(out_path)
    distorted = out_path / "_distorted"
    distorted.mkdir(parents=True, exist_ok=True)
    rec.write_binary(str(distorted))
    pycolmap.undistort_images(str(out_path), str(distorted), image_dir, num_threads=threads)
    sparse.mkdir(parents=True, exist_ok=True)
    for name in ("cameras.bin", "images.bin", "points3D.bin", "rigs.bin", "frames.bin"):
        if (out_path / "sparse" / name).exists():
            os.replace(out_path / "sparse" / name, sparse / name)
    shutil.rmtree(distorted)
    shutil.rmtree(out_path / "stereo", ignore_errors=True)
    for script in out_path.glob("run-colmap-*.sh"):
        script.unlink()
    return str(out_path)
