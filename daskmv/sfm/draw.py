"""Pictures a person can judge a reconstruction by: verified matches, and a top-down view of a model."""

from __future__ import annotations

import cv2
import numpy as np


def match_picture(image_a: np.ndarray, kpts_a: np.ndarray, image_b: np.ndarray, kpts_b: np.ndarray,
                  matches: np.ndarray, height: int = 360, most: int = 300, seed: int = 0) -> np.ndarray:
    """The two images side by side at ``height`` pixels, up to ``most`` matches drawn as lines (RGB uint8)."""
    def fit(image: np.ndarray) -> tuple[np.ndarray, float]:
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        s = height / image.shape[0]
        return cv2.resize(image, (max(1, round(image.shape[1] * s)), height), interpolation=cv2.INTER_AREA), s

    a, sa = fit(image_a)
    b, sb = fit(image_b)
    canvas = np.ascontiguousarray(np.concatenate([a, b], axis=1))
    picked = matches
    if len(matches) > most:
        picked = matches[np.random.default_rng(seed).choice(len(matches), most, replace=False)]
    hues = np.linspace(0, 179, max(len(picked), 1), endpoint=False).astype(np.uint8)
    colors = cv2.cvtColor(np.stack([hues, np.full_like(hues, 255), np.full_like(hues, 255)], 1)[None], cv2.COLOR_HSV2RGB)[0]
    for (i, j), color in zip(picked, colors):
        pa = (int((kpts_a[i, 0] - 0.5) * sa), int((kpts_a[i, 1] - 0.5) * sa))
        pb = (int((kpts_b[j, 0] - 0.5) * sb) + a.shape[1], int((kpts_b[j, 1] - 0.5) * sb))
        cv2.line(canvas, pa, pb, tuple(int(c) for c in color), 1, cv2.LINE_AA)
    cv2.putText(canvas, f"{len(matches)} verified", (8, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 2)
    return canvas


def top_down(points: np.ndarray, centers: np.ndarray, size: int = 384, up_axis: int | None = None) -> np.ndarray:
    """Points (grey) and camera centres (red) seen from above: the plane of the two axes along which the
    cameras spread most (the camera path), robust to outlying points (the 1-99 % range is shown)."""
    canvas = np.full((size, size, 3), 255, np.uint8)
    if len(centers) == 0:
        return canvas
    cloud = np.concatenate([points, centers]) if len(points) else centers
    mean = centers.mean(axis=0)
    spread = np.linalg.svd(centers - mean, full_matrices=False)[2] if len(centers) > 2 else np.eye(3)
    axes = spread[:2] if up_axis is None else np.delete(np.eye(3), up_axis, axis=0)
    flat = (cloud - mean) @ axes.T
    lo, hi = np.percentile(flat, 1, axis=0), np.percentile(flat, 99, axis=0)
    lo, hi = np.minimum(lo, ((centers - mean) @ axes.T).min(0)), np.maximum(hi, ((centers - mean) @ axes.T).max(0))
    scale = (size - 24) / max(float((hi - lo).max()), 1e-9)

    def pixel(xy: np.ndarray) -> np.ndarray:
        return ((xy - lo) * scale + 12).astype(np.int32)

    if len(points):
        p = pixel(((points - mean) @ axes.T))
        inside = (p >= 0).all(1) & (p < size).all(1)
        canvas[p[inside, 1], p[inside, 0]] = (110, 110, 110)
    for x, y in pixel((centers - mean) @ axes.T):
        cv2.circle(canvas, (int(x), int(y)), 3, (220, 30, 30), -1, cv2.LINE_AA)
    return canvas


def label(image: np.ndarray, text: str) -> np.ndarray:
    """``image`` with ``text`` written in its top-left corner."""
    out = np.ascontiguousarray(image.copy())
    cv2.putText(out, text, (8, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(out, text, (8, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def keypoint_map(keypoints: np.ndarray, width: int, height: int, side: int = 320) -> np.ndarray:
    """A white frame of the image's shape (longer side ``side``) with a dot per keypoint."""
    s = side / max(width, height, 1)
    canvas = np.full((max(1, round(height * s)), max(1, round(width * s)), 3), 255, np.uint8)
    if len(keypoints):
        xy = np.clip(((keypoints[:, :2] - 0.5) * s).astype(int), 0, [canvas.shape[1] - 1, canvas.shape[0] - 1])
        canvas[xy[:, 1], xy[:, 0]] = (30, 30, 200)
    return canvas
