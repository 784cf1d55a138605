"""The hand-written relight script that benchmarks/relight.py measures daskmv against.

One image at a time in NumPy/OpenCV, as the team's 8-GPU script did: decode, segment (the same
MediaPipe selfie model through ai-edge-litert), Multi-Scale Retinex on the foreground with OpenCV
Gaussian blurs, one degradation (parameters drawn by daskmv's own sampler, so both make the same
choices), composite onto #808080, then write seven PNGs and a metadata JSON (``store="png"``) or seven
``.npy`` files (``store="npy"``). ``blur="exact"`` is what such scripts write (``cv2.GaussianBlur`` at
full size, whatever the sigma); ``blur="shrunk"`` is the same trick daskmv uses, by hand.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import cv2
import numpy as np

from daskmv.ops.degrade import Degrade, draw

SCALES = (15.0, 80.0, 250.0)
GRAY = np.array([128, 128, 128], np.uint8)
_SEG = None
_DEGRADE_CFG = Degrade().config


def init() -> None:
    """Pool initializer: one segmenter per process, one OpenCV thread (processes are the parallelism)."""
    global _SEG
    from ai_edge_litert.interpreter import Interpreter

    from daskmv.models import selfie_model

    cv2.setNumThreads(1)
    _SEG = Interpreter(model_path=str(selfie_model()), num_threads=1)
    _SEG.allocate_tensors()


def segment(image: np.ndarray) -> np.ndarray:
    inp, out = _SEG.get_input_details()[0], _SEG.get_output_details()[0]
    small = cv2.resize(image, (256, 256), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    _SEG.set_tensor(inp["index"], small[None])
    _SEG.invoke()
    prob = cv2.resize(_SEG.get_tensor(out["index"])[0, :, :, 0], image.shape[1::-1], interpolation=cv2.INTER_LINEAR)
    return np.rint(np.clip(prob, 0, 1) * 255).astype(np.uint8)


def blur(x: np.ndarray, sigma: float, how: str) -> np.ndarray:
    if how == "exact" or sigma <= 3:
        return cv2.GaussianBlur(x, (0, 0), sigma, borderType=cv2.BORDER_REFLECT_101)
    h, w = x.shape[:2]
    f = max(2, int(sigma // 3))
    small = cv2.resize(x, (math.ceil(w / f), math.ceil(h / f)), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), sigma / f, borderType=cv2.BORDER_REFLECT_101)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def albedo(image: np.ndarray, mask: np.ndarray, how: str) -> np.ndarray:
    m = (mask >= 128).astype(np.float32)
    intensity = image.astype(np.float32) + 1.0
    response = np.log(intensity)
    surround = np.zeros_like(response)
    for sigma in SCALES:
        num = blur(intensity * m[..., None], sigma, how)
        den = blur(m, sigma, how)
        surround += np.log(np.maximum(num / np.maximum(den, 1e-12)[..., None], 1.0)) / len(SCALES)
    response -= surround
    values = response[m > 0]
    lo, hi = np.percentile(values, [1, 99]) if values.size else (0.0, 1.0)
    out = np.clip((response - lo) / max(hi - lo, 1e-12), 0, 1) * m[..., None]
    return np.rint(out * 255).astype(np.uint8)


def degrade(source: np.ndarray, mask: np.ndarray, row_id: str) -> tuple[np.ndarray, dict]:
    params = draw(row_id, _DEGRADE_CFG, mask)
    h, w = mask.shape
    x = source.astype(np.float32) / 255.0
    ys, xs = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
    if params["kind"] == "soft_shading":
        a = params["direction"]
        field = 0.5 + (xs - 0.5) * math.cos(a) + (ys - 0.5) * math.sin(a)
        for b in params["blobs"]:
            field += b["amplitude"] * np.exp(-((xs - b["x"]) ** 2 + (ys - b["y"]) ** 2) / (2 * b["sigma"] ** 2))
        field = np.clip(field, 0, 1)
        field = field * field * (3 - 2 * field)
        out = x * (1 - params["strength"] * (1 - field))[..., None]
    elif params["kind"] == "hard_shadow":
        canvas = np.zeros((h, w), np.uint8)
        for poly in params["occluders"]:
            cv2.fillPoly(canvas, [np.round(np.asarray(poly) * [w, h] * 16).astype(np.int32)], 255, cv2.LINE_AA, 4)
        shade = cv2.GaussianBlur(canvas.astype(np.float32) / 255, (0, 0), params["penumbra"] * math.hypot(h, w))
        out = x * (1 - params["opacity"] * shade)[..., None]
    else:
        diag, total = math.hypot(h, w), np.zeros((h, w), np.float32)
        for lobe in params["lobes"]:
            dx, dy = (xs - lobe["x"]) * w / diag, (ys - lobe["y"]) * h / diag
            c, s = math.cos(lobe["angle"]), math.sin(lobe["angle"])
            u, v = dx * c + dy * s, (-dx * s + dy * c) / lobe["aspect"]
            total += lobe["intensity"] * np.exp(-(u * u + v * v) / (2 * lobe["size"] ** 2)) ** lobe["shininess"]
        out = np.clip(x + total[..., None] * np.asarray(params["color"], np.float32), 0, 1)
    out = np.where((mask >= 128)[..., None], np.rint(out * 255).astype(np.uint8), source)
    return out, params


def composite(fg: np.ndarray, mask: np.ndarray) -> np.ndarray:
    inside = (mask >= 128).astype(np.float32)
    alpha = cv2.GaussianBlur(cv2.erode(inside, np.ones((3, 3), np.uint8)), (0, 0), 1.0) * inside
    out = GRAY + alpha[..., None] * (fg.astype(np.float32) - GRAY)
    return np.rint(out).astype(np.uint8)


def relight_one(args: tuple[str, str, str, str, str]) -> str:
    """All four steps for one image, then its files: the unit of work of the hand-written script."""
    row_id, path, out_dir, how, store = args
    image = cv2.cvtColor(cv2.imread(path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    mask = segment(image)
    foreground = np.where((mask >= 128)[..., None], image, 0).astype(np.uint8)
    alb = albedo(image, mask, how)
    degraded, params = degrade(alb, mask, row_id)
    output = composite(degraded, mask)
    images = {"output": output, "input": image, "albedo": alb, "degraded_fg": degraded,
              "foreground": foreground, "background": np.broadcast_to(GRAY, image.shape), "mask": mask}
    stem = os.path.join(out_dir, row_id)
    for name, array in images.items():
        if store == "png":
            bgr = array if array.ndim == 2 else cv2.cvtColor(np.ascontiguousarray(array), cv2.COLOR_RGB2BGR)
            cv2.imwrite(f"{stem}_{name}.png", bgr)
        else:
            np.save(f"{stem}_{name}.npy", array)
    if store == "png":
        Path(f"{stem}_metadata.json").write_text(json.dumps({"id": row_id, "source": path, "degradation": params}))
    return f"{stem}_output.{store}"


def decode_one(path: str) -> int:
    return int(cv2.imread(path, cv2.IMREAD_COLOR).shape[0])
