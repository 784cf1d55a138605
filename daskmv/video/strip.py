"""A video row's picture for reports and contact sheets: a strip of sampled frames with the per-frame outputs
drawn on them where they are points (``[T, K, 2]``: keypoints, a track) or shown under them where they are
images (``[T, H, W]`` masks, depth, heat maps)."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

#: Frames on a strip, and each frame's height on it.
STRIP_FRAMES = 6
STRIP_HEIGHT = 160
_SKIP = {"frame_index", "timestamp"}


def frame_strip(row: dict[str, Any], frames: int = STRIP_FRAMES, height: int = STRIP_HEIGHT) -> np.ndarray | None:
    """The strip for one video row (``url``, ``frame_index`` and the outputs, loaded), or None when the video
    cannot be read here."""
    from daskmv.video.decode import read_frames

    indices = np.asarray(row.get("frame_index") if row.get("frame_index") is not None else [], dtype=np.int64)
    url = row.get("url")
    if not len(indices) or not isinstance(url, str):
        return None
    picks = np.unique(np.linspace(0, len(indices) - 1, min(frames, len(indices))).round().astype(int))
    try:
        decoded = [frame for chunk in read_frames(url, indices[picks], chunk=len(picks)) for frame in chunk.frames]
    except Exception:  # the video moved or is unreadable here: no strip, the rest of the report stands
        return None
    per_frame = {name: np.asarray(value) for name, value in row.items()
                 if name not in _SKIP and isinstance(value, np.ndarray) and value.ndim >= 2
                 and value.shape[0] == len(indices)}
    tiles = [_tile(frame, {name: value[t] for name, value in per_frame.items()}, height)
             for t, frame in zip(picks, decoded)]
    return np.concatenate(tiles, axis=1) if tiles else None


def _tile(frame: np.ndarray, outputs: dict[str, np.ndarray], height: int) -> np.ndarray:
    """One frame, scaled to ``height``, with point outputs drawn on it and image outputs stacked below."""
    scale = height / frame.shape[0]
    width = max(1, round(frame.shape[1] * scale))
    tile = cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA)
    below = []
    for k, (name, value) in enumerate(sorted(outputs.items())):
        if value.ndim == 2 and value.shape[1] in (2, 3) and value.shape[0] <= 4096:
            _draw_points(tile, value[:, :2], frame.shape, k)
        elif value.ndim in (2, 3) and min(value.shape[:2]) >= 8 and (value.ndim == 2 or value.shape[2] in (1, 3)):
            below.append(cv2.resize(_display(value), (width, height), interpolation=cv2.INTER_NEAREST))
    return np.concatenate([tile, *below], axis=0) if below else tile


_COLOURS = [(255, 64, 64), (64, 200, 255), (255, 200, 0), (120, 255, 120)]


def _draw_points(tile: np.ndarray, points: np.ndarray, shape: tuple[int, ...], k: int) -> None:
    """Points in pixels of the stored frame, or in [0, 1] (normalised), drawn as small discs."""
    points = np.asarray(points, dtype=np.float64)
    finite = points[np.isfinite(points).all(axis=1)]
    if not len(finite):
        return
    if finite.max() <= 1.0 and finite.min() >= 0.0:
        finite = finite * [shape[1], shape[0]]
    sx, sy = tile.shape[1] / shape[1], tile.shape[0] / shape[0]
    for x, y in finite:
        cv2.circle(tile, (int(x * sx), int(y * sy)), 3, _COLOURS[k % len(_COLOURS)], -1, lineType=cv2.LINE_AA)


def _display(value: np.ndarray) -> np.ndarray:
    a = np.asarray(value, dtype=np.float32)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
    a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    a = (np.nan_to_num(a) * 255).astype(np.uint8)
    return np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a
