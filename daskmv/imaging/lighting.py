"""Lighting degradations as tensors: the fields :mod:`daskmv.ops.degrade` multiplies or adds, from the
parameters it drew for a row."""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from daskmv.imaging.tensors import gaussian_blur


#: Smooth light fields are computed on a grid of at most this many pixels a side, then enlarged (bilinear):
#: the same values for images up to that size, and no full-size passes of exp and pow for large photos.
FIELD_GRID = 512


def apply(image: torch.Tensor, params: dict[str, Any], device: str) -> torch.Tensor:
    """The degraded ``[1, 3, H, W]`` image (floats in [0, 1]) for one row's parameters."""
    h, w = image.shape[-2:]
    if params["kind"] == "hard_shadow":
        return image * shadow_field(params, h, w, device)
    step = max(1, math.ceil(max(h, w) / FIELD_GRID))
    hs, ws = -(-h // step), -(-w // step)
    ys = (torch.arange(hs, device=device, dtype=image.dtype) + 0.5) / hs
    xs = (torch.arange(ws, device=device, dtype=image.dtype) + 0.5) / ws
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    kind = params["kind"]
    field = (shading_field(params, x, y) if kind == "soft_shading" else specular_field(params, x, y, h, w))[None, None]
    if (hs, ws) != (h, w):
        field = F.interpolate(field, size=(h, w), mode="bilinear", align_corners=False)
    if kind == "soft_shading":
        return image * field
    color = torch.tensor(params["color"], device=device, dtype=image.dtype).view(1, 3, 1, 1)
    return (image + field * color).clamp_(0.0, 1.0)


def shading_field(params: dict[str, Any], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Light in [1 - strength, 1]: a ramp along ``direction`` plus broad blobs, smoothed and clipped."""
    a = params["direction"]
    field = 0.5 + (x - 0.5) * math.cos(a) + (y - 0.5) * math.sin(a)
    for blob in params["blobs"]:
        d2 = (x - blob["x"]) ** 2 + (y - blob["y"]) ** 2
        field = field + blob["amplitude"] * torch.exp(-d2 / (2.0 * blob["sigma"] ** 2))
    field = field.clamp(0.0, 1.0)
    field = field * field * (3.0 - 2.0 * field)  # smoothstep: no visible kinks where it clips
    return 1.0 - params["strength"] * (1.0 - field)


def shadow_field(params: dict[str, Any], h: int, w: int, device: str) -> torch.Tensor:
    """``1 - opacity`` under the occluders, 1 elsewhere, with a Gaussian penumbra."""
    canvas = np.zeros((h, w), np.uint8)
    for polygon in params["occluders"]:
        points = np.round(np.asarray(polygon) * [w, h] * 16).astype(np.int32)  # 4 bits of sub-pixel
        cv2.fillPoly(canvas, [points], 255, lineType=cv2.LINE_AA, shift=4)
    shade = torch.from_numpy(canvas).to(device).float().div_(255.0)[None, None]
    shade = gaussian_blur(shade, params["penumbra"] * math.hypot(h, w))
    return 1.0 - params["opacity"] * shade


def specular_field(params: dict[str, Any], x: torch.Tensor, y: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Highlight intensity: rotated elliptical lobes raised to a shininess (``apply`` tints it by the light)."""
    total = torch.zeros_like(x)
    diag = math.hypot(h, w)
    for lobe in params["lobes"]:
        dx, dy = (x - lobe["x"]) * w / diag, (y - lobe["y"]) * h / diag  # isotropic units: fractions of the diagonal
        c, s = math.cos(lobe["angle"]), math.sin(lobe["angle"])
        u, v = dx * c + dy * s, (-dx * s + dy * c) / lobe["aspect"]
        lobe_field = torch.exp(-(u * u + v * v) / (2.0 * lobe["size"] ** 2))
        total = total + lobe["intensity"] * lobe_field ** lobe["shininess"]
    return total
