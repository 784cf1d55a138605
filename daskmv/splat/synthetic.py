"""A scene with known cameras for the splat tests and benchmark: Gaussians rendered by the reference renderer.

``write_scene(folder, n_views=16)`` draws ``n_gaussians`` coloured Gaussians in a unit box, renders them from
cameras on a ring looking at the centre, and writes the layout ``sfm`` exports: ``images/view_000.png`` ... and
a COLMAP text model in ``sparse/0`` whose 3D points are a noisy subset of the Gaussians' centres (what an SfM
run would give: sparse, a little off). Training on it must reproduce the held-out views.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import torch

from daskmv.splat.render import SH_C0, Camera, render
from daskmv.splat.scene import write_text_model



def ring_pose(angle: float, radius: float, height: float) -> np.ndarray:
    """World-to-camera [4, 4] of a camera at ``angle`` on a ring, looking at the origin (OpenCV axes)."""
    centre = np.array([radius * math.cos(angle), height, radius * math.sin(angle)])
    forward = -centre / np.linalg.norm(centre)
    right = np.cross(forward, [0.0, -1.0, 0.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    R = np.stack([right, down, forward])  # rows: camera axes in world coordinates
    pose = np.eye(4)
    pose[:3, :3], pose[:3, 3] = R, -R @ centre
    return pose


def write_scene(folder: str, n_views: int = 16, n_gaussians: int = 300, size: tuple[int, int] = (64, 48),
                n_points: int = 200, seed: int = 0) -> str:
    """Write the scene into ``folder`` (see the module); returns ``folder``."""
    rng = np.random.default_rng(seed)
    means = rng.uniform(-0.8, 0.8, (n_gaussians, 3)).astype(np.float32)
    colors = rng.uniform(0.1, 0.9, (n_gaussians, 3)).astype(np.float32)
    scales = np.exp(rng.uniform(np.log(0.05), np.log(0.15), (n_gaussians, 3))).astype(np.float32)
    quats = rng.normal(size=(n_gaussians, 4)).astype(np.float32)
    quats /= np.linalg.norm(quats, axis=1, keepdims=True)
    opacity = rng.uniform(0.5, 0.95, n_gaussians).astype(np.float32)
    sh = torch.from_numpy((colors - 0.5) / SH_C0)[:, None, :]
    width, height = size
    f = 0.9 * width
    K = torch.tensor([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1]], dtype=torch.float32)
    out = Path(folder)
    (out / "images").mkdir(parents=True, exist_ok=True)
    poses, names = [], []
    for k in range(n_views):
        pose = ring_pose(2 * math.pi * k / n_views, 3.2, 0.6 * math.sin(3 * math.pi * k / n_views))
        cam = Camera(K, torch.from_numpy(pose).float(), width, height)
        with torch.no_grad():
            image = render(torch.from_numpy(means), torch.from_numpy(quats), torch.from_numpy(scales),
                           torch.from_numpy(opacity), sh, cam, 0)["image"]
        name = f"view_{k:03d}.png"
        pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        cv2.imwrite(str(out / "images" / name), cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR))
        poses.append(pose)
        names.append(name)
    picks = rng.choice(n_gaussians, size=min(n_points, n_gaussians), replace=False)
    points = means[picks] + rng.normal(0, 0.02, (len(picks), 3)).astype(np.float32)
    cameras = [(width, height, f, f, width / 2, height / 2)] * n_views
    write_text_model(str(out / "sparse" / "0"), cameras, poses, names, points, colors[picks])
    return str(out)
