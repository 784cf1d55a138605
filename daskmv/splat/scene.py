"""A scene to train on: a COLMAP model's cameras, poses and points, and its images, as tensors.

The model is what ``sfm`` exports (``<folder>/sparse/0`` + ``<folder>/images``) or any COLMAP model (binary or
text) with undistorted ``PINHOLE``/``SIMPLE_PINHOLE`` cameras. Views are sorted by image name; every
``test_every``-th one (0, 8, 16, ... by default, as the 3DGS papers hold out) is kept for evaluation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from daskmv.errors import RowError
from daskmv.splat.render import Camera

PINHOLES = ("PINHOLE", "SIMPLE_PINHOLE")


@dataclass
class View:
    name: str
    camera: Camera
    image: torch.Tensor  # [H, W, 3] float32 in [0, 1]


@dataclass
class Scene:
    train: list[View]
    test: list[View]
    points: np.ndarray  # [P, 3] the model's 3D points
    colors: np.ndarray  # [P, 3] their colours in [0, 1]
    extent: float  # the cameras' spread: 1.1 x the largest distance of a camera centre from their mean

    @property
    def views(self) -> list[View]:
        return self.train + self.test


def find_model(folder: str) -> str:
    """The folder holding the model's files: ``folder`` itself, ``sparse/0`` or ``sparse`` in it."""
    for candidate in (Path(folder), Path(folder) / "sparse" / "0", Path(folder) / "sparse"):
        if (candidate / "cameras.bin").exists() or (candidate / "cameras.txt").exists():
            return str(candidate)
    if not Path(folder).exists():
        raise RowError(f"the COLMAP model {folder} does not exist")
    raise RowError(f"no COLMAP model in {folder} (looked for cameras.bin/.txt in it, sparse/0 and sparse)")


def load_scene(model: str, images: str | None = None, downscale: int = 1, test_every: int = 8) -> Scene:
    """The scene of the COLMAP model in (or under) ``model``, its images from ``images`` (default: the
    ``images`` folder beside ``sparse``), every image ``downscale`` times smaller."""
    import pycolmap

    path = find_model(model)
    try:
        rec = pycolmap.Reconstruction(path)
    except Exception as exc:  # a truncated or foreign file
        raise RowError(f"cannot read the COLMAP model in {path}: {type(exc).__name__}: {exc}") from None
    root = Path(path).parent.parent if Path(path).name == "0" else Path(path).parent
    folder = Path(images) if images else (root / "images" if (root / "images").exists() else Path(model) / "images")
    views = [_view(rec, image, folder, downscale) for image in sorted(rec.images.values(), key=lambda i: i.name)
             if image.has_pose]
    if len(views) < 2:
        raise RowError(f"the model in {path} has {len(views)} posed image(s); training needs at least 2")
    test = [v for k, v in enumerate(views) if test_every and k % test_every == 0] if len(views) > 2 else []
    train = [v for v in views if v not in test]
    points = np.array([p.xyz for p in rec.points3D.values()], dtype=np.float32).reshape(-1, 3)
    colors = np.array([p.color for p in rec.points3D.values()], dtype=np.float32).reshape(-1, 3) / 255.0
    if not len(points):
        raise RowError(f"the model in {path} has no 3D points to start the Gaussians from")
    centres = np.stack([v.camera.centre.numpy() for v in views])
    extent = 1.1 * float(np.linalg.norm(centres - centres.mean(0), axis=1).max()) or 1.0
    return Scene(train, test, points, colors, extent)


def _view(rec: object, image: object, folder: Path, downscale: int) -> View:
    camera = rec.cameras[image.camera_id]  # type: ignore[attr-defined]
    model = camera.model.name if hasattr(camera.model, "name") else str(camera.model)
    if model not in PINHOLES:
        raise RowError(f"image {image.name}: camera model {model}; splatting needs undistorted PINHOLE cameras "  # type: ignore[attr-defined]
                       "(the sfm pipeline exports them; COLMAP: image_undistorter)")
    params = list(camera.params)
    fx, fy, cx, cy = (params[0], params[0], params[1], params[2]) if model == "SIMPLE_PINHOLE" else params[:4]
    file = folder / image.name  # type: ignore[attr-defined]
    pixels = cv2.imread(str(file), cv2.IMREAD_COLOR)
    if pixels is None:
        why = "is missing" if not file.exists() else "cannot be decoded"
        raise RowError(f"image {file} {why}")
    pixels = cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)
    width, height = camera.width // downscale, camera.height // downscale
    if (pixels.shape[1], pixels.shape[0]) != (width, height):
        pixels = cv2.resize(pixels, (width, height), interpolation=cv2.INTER_AREA)
    sx, sy = width / camera.width, height / camera.height
    K = torch.tensor([[fx * sx, 0, cx * sx], [0, fy * sy, cy * sy], [0, 0, 1]], dtype=torch.float32)
    pose = np.eye(4, dtype=np.float32)
    pose[:3] = np.asarray(image.cam_from_world().matrix(), dtype=np.float32)  # type: ignore[attr-defined]
    return View(str(image.name), Camera(K, torch.from_numpy(pose), width, height),  # type: ignore[attr-defined]
                torch.from_numpy(pixels).float().div_(255.0))


def write_text_model(folder: str, cameras: list[tuple[int, int, float, float, float, float]],
                     poses: list[np.ndarray], names: list[str], points: np.ndarray, colors: np.ndarray) -> str:
    """A COLMAP text model (``cameras.txt``, ``images.txt``, ``points3D.txt``) in ``folder``: one PINHOLE
    camera per image ``(width, height, fx, fy, cx, cy)``, world-to-camera ``poses`` [4, 4], points in [0, 1]
    colours. What the tests' and benchmark's synthetic scenes are stored as."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "cameras.txt"), "w") as fh:
        for k, (w, h, fx, fy, cx, cy) in enumerate(cameras, 1):
            fh.write(f"{k} PINHOLE {w} {h} {fx} {fy} {cx} {cy}\n")
    with open(os.path.join(folder, "images.txt"), "w") as fh:
        for k, (pose, name) in enumerate(zip(poses, names), 1):
            qw, qx, qy, qz = _quaternion(np.asarray(pose)[:3, :3])
            tx, ty, tz = np.asarray(pose)[:3, 3]
            fh.write(f"{k} {qw} {qx} {qy} {qz} {tx} {ty} {tz} {k} {name}\n\n")
    with open(os.path.join(folder, "points3D.txt"), "w") as fh:
        for k, (p, c) in enumerate(zip(points, np.clip(np.asarray(colors) * 255, 0, 255).astype(int)), 1):
            fh.write(f"{k} {p[0]} {p[1]} {p[2]} {c[0]} {c[1]} {c[2]} 0\n")
    return folder


def _quaternion(R: np.ndarray) -> tuple[float, float, float, float]:
    """(w, x, y, z) of a rotation matrix (Shepperd's method)."""
    m = np.asarray(R, dtype=np.float64)
    trace = m[0, 0] + m[1, 1] + m[2, 2]
    if trace > 0:
        s = 2.0 * np.sqrt(trace + 1.0)
        q = (0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s)
    elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
        s = 2.0 * np.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2])
        q = ((m[2, 1] - m[1, 2]) / s, 0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s)
    elif m[1, 1] > m[2, 2]:
        s = 2.0 * np.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2])
        q = ((m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s)
    else:
        s = 2.0 * np.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1])
        q = ((m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s)
    return tuple(float(v) for v in q)  # type: ignore[return-value]
