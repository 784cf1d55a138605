"""Make the demo's sample: ~200 images, a few broken files, a tiny TorchScript model, and a manifest.

    python manifests/make_sample.py manifests/sample

Images are synthetic (smooth random colour fields with shapes), plus the two photos of people that the
repository carries (data/people: public-domain NASA portraits, for the relight demo) and any other real
photographs in ../shared/data when that folder is beside the clone. Two rows are broken on purpose (a
missing file and a text file named .jpg) to show how row errors look. Nothing is downloaded.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

N_SYNTHETIC = 200
PEOPLE = Path(__file__).resolve().parents[1] / "data" / "people"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def synthetic(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    base = cv2.resize(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), (width, height), interpolation=cv2.INTER_CUBIC)
    for _ in range(rng.integers(2, 6)):
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        cv2.circle(base, centre, int(rng.integers(8, min(width, height) // 3)), colour, -1, cv2.LINE_AA)
    return base


def tiny_model(path: Path) -> None:
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16))
    torch.jit.script(net.eval()).save(str(path))


def main(folder: str) -> None:
    root = Path(folder)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    paths: list[str] = []
    for i in range(N_SYNTHETIC):
        w, h = [(640, 480), (480, 640), (512, 512)][i % 3]
        rel = f"images/synthetic_{i:04d}.jpg"
        cv2.imwrite(str(root / rel), synthetic(rng, w, h), [cv2.IMWRITE_JPEG_QUALITY, 90])
        paths.append(rel)
    photos = sorted(PEOPLE.glob("*.jpg")) + sorted(p for p in SHARED.glob("*/**/*.[jp][pn]g")
                                                   if p.parent.name != "people")
    for src in photos:
        rel = f"images/real_{src.parent.name}_{src.name}"
        shutil.copyfile(src, root / rel)
        paths.append(rel)
    (images / "not_an_image.jpg").write_text("a text file with a .jpg name\n")
    paths += ["images/not_an_image.jpg", "images/missing.jpg"]
    pd.DataFrame({"path": paths, "source": [p.split("/")[1].split("_")[0] for p in paths]}).to_csv(
        root / "manifest.csv", index=False)
    tiny_model(root / "tiny_cnn.pt")
    people = [p for p in paths if p.startswith("images/real_people_")]
    if not people:
        sys.exit(f"no photos of people in {PEOPLE}: the relight demo needs them")
    pd.DataFrame({"path": people}).to_csv(root / "people.csv", index=False)
    print(f"sample: {len(paths)} rows in {root / 'manifest.csv'}, {len(people)} photos of people in "
          f"{root / 'people.csv'}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "manifests/sample")
