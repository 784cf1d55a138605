"""The metric scale of a reconstruction, fused from noisy cues with outlier rejection.

An SfM model is known up to a similarity; a splat trained on it needs a scale that means something. Each cue
gives many scale samples (metric / model):

- ``depth``: a metric depth map per image (a depth model's or a sensor's): at every keypoint with a 3D point,
  the map's depth over the point's depth in the model's camera frame;
- ``positions``: known camera positions in metres (GPS in a local frame, a rig's baselines): for pairs of
  registered images, the metric distance between their centres over the model's.

Samples are fused by the rule users' scripts apply: drop samples outside ``[Q1 - k IQR, Q3 + k IQR]``, then
take the weighted median with ``w = 1 / (1 + |s - m| / m)`` around the inliers' median ``m`` (relative, so the
rule is the same in millimetres or kilometres), times each cue's weight. The scale's spread is the inliers'
IQR over the scale. Without any metric cue, the model is normalised instead (:data:`NORMALISED`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

#: The convention without metric cues: the camera centres' median distance from their mean becomes 1.
NORMALISED = "normalised: median camera distance from the cameras' centroid = 1"


@dataclass
class Scale:
    """A fused scale: multiply model coordinates by ``scale`` to get metres (or the normalised unit)."""

    scale: float
    spread: float
    inliers: int
    samples: int
    source: str


def weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values)
    v, w = values[order], weights[order]
    cum = np.cumsum(w)
    return float(v[np.searchsorted(cum, 0.5 * cum[-1])])


def fuse(samples: np.ndarray, weights: np.ndarray | None = None, iqr_k: float = 1.5, source: str = "") -> Scale:
    """One scale from ``samples`` by IQR rejection then the weighted median (see the module's docstring)."""
    s = np.asarray(samples, np.float64)
    w = np.ones_like(s) if weights is None else np.asarray(weights, np.float64)
    ok = np.isfinite(s) & (s > 0) & np.isfinite(w) & (w > 0)
    s, w = s[ok], w[ok]
    if len(s) == 0:
        raise ValueError("no usable scale samples")
    q1, q3 = np.percentile(s, [25, 75])
    iqr = q3 - q1
    keep = (s >= q1 - iqr_k * iqr) & (s <= q3 + iqr_k * iqr)
    s, w = s[keep], w[keep]
    m = float(np.median(s))
    w = w / (1.0 + np.abs(s - m) / m)
    scale = weighted_median(s, w)
    spread = float(np.subtract(*np.percentile(s, [75, 25])) / scale) if len(s) > 1 else 0.0
    return Scale(scale, spread, int(len(s)), int(ok.sum()), source)


def depth_samples(rec: Any, depth_files: dict[str, str], per_image: int = 2000, seed: int = 0) -> np.ndarray:
    """Metric / model depth at observed 3D points of each registered image that has a depth map."""
    rng = np.random.default_rng(seed)
    out = []
    for image in rec.images.values():
        if not image.has_pose or image.name not in depth_files:
            continue
        depth = read_depth(depth_files[image.name])
        cam = rec.cameras[image.camera_id]
        pose = image.cam_from_world()
        R, t = pose.rotation.matrix(), np.asarray(pose.translation)
        obs = [(p.xy, p.point3D_id) for p in image.points2D if p.has_point3D()]
        if not obs:
            continue
        if len(obs) > per_image:
            obs = [obs[i] for i in rng.choice(len(obs), per_image, replace=False)]
        xy = np.array([o[0] for o in obs])
        xyz = np.array([rec.points3D[o[1]].xyz for o in obs])
        z_model = (xyz @ R.T + t)[:, 2]
        sx, sy = depth.shape[1] / cam.width, depth.shape[0] / cam.height
        col = np.clip((xy[:, 0] * sx).astype(int), 0, depth.shape[1] - 1)
        row = np.clip((xy[:, 1] * sy).astype(int), 0, depth.shape[0] - 1)
        z_metric = depth[row, col]
        good = (z_model > 0) & np.isfinite(z_metric) & (z_metric > 0)
        out.append(z_metric[good] / z_model[good])
    return np.concatenate(out) if out else np.zeros(0)


def position_samples(rec: Any, positions: dict[str, np.ndarray], most_pairs: int = 20000, seed: int = 0) -> np.ndarray:
    """Metric / model distance between the centres of pairs of registered images with known positions."""
    names, model, metric = [], [], []
    for image in rec.images.values():
        if image.has_pose and image.name in positions:
            names.append(image.name)
            model.append(image.projection_center())
            metric.append(positions[image.name])
    if len(names) < 2:
        return np.zeros(0)
    model_c, metric_c = np.array(model), np.array(metric, np.float64)
    i, j = np.triu_indices(len(names), 1)
    if len(i) > most_pairs:
        pick = np.random.default_rng(seed).choice(len(i), most_pairs, replace=False)
        i, j = i[pick], j[pick]
    d_model = np.linalg.norm(model_c[i] - model_c[j], axis=1)
    d_metric = np.linalg.norm(metric_c[i] - metric_c[j], axis=1)
    good = d_model > 1e-9 * max(float(d_model.max()), 1e-12)
    return d_metric[good] / d_model[good]


def normalising_scale(rec: Any) -> Scale:
    """The scale that makes the camera centres' median distance from their centroid 1."""
    centres = np.array([im.projection_center() for im in rec.images.values() if im.has_pose])
    radius = float(np.median(np.linalg.norm(centres - centres.mean(axis=0), axis=1))) if len(centres) else 0.0
    return Scale(1.0 / radius if radius > 0 else 1.0, float("nan"), 0, 0, NORMALISED)


def estimate(rec: Any, depth_files: dict[str, str] | None = None, positions: dict[str, np.ndarray] | None = None,
             weights: dict[str, float] | None = None, iqr_k: float = 1.5) -> Scale:
    """The fused metric scale of ``rec`` from whichever cues are given, else the normalising scale."""
    weights = {"depth": 1.0, "positions": 1.0, **(weights or {})}
    parts, sources = [], []
    if depth_files:
        s = depth_samples(rec, depth_files)
        if len(s):
            parts.append((s, np.full(len(s), weights["depth"] / len(s))))
            sources.append(f"depth ({len(s)} samples)")
    if positions:
        s = position_samples(rec, positions)
        if len(s):
            parts.append((s, np.full(len(s), weights["positions"] / len(s))))
            sources.append(f"positions ({len(s)} samples)")
    if not parts:
        return normalising_scale(rec)
    samples = np.concatenate([p[0] for p in parts])
    w = np.concatenate([p[1] for p in parts])
    return fuse(samples, w, iqr_k, "metric: " + ", ".join(sources))


def apply(rec: Any, scale: float) -> None:
    """Scale ``rec`` about the origin (cameras and points) in place."""
    import pycolmap

    rec.transform(pycolmap.Sim3d(float(scale), pycolmap.Rotation3d(), np.zeros(3)))


def read_depth(path: str) -> np.ndarray:
    """A depth map in metres: ``.npy`` (float), or a 16-bit PNG/TIFF in millimetres."""
    if path.endswith(".npy"):
        return np.load(path).astype(np.float32)
    import cv2

    if not os.path.exists(path):
        raise FileNotFoundError(path)
    depth = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if depth is None:
        raise ValueError(f"cannot read the depth map {path}")
    return depth.astype(np.float32) / (1000.0 if depth.dtype == np.uint16 else 1.0)
