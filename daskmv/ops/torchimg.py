"""Image math in torch, batched on the worker's device, the same code on CPU and GPU.

Images travel between ops as NumPy arrays (RGB uint8 ``[H, W, 3]``, masks ``[H, W]``); ops that compute
convert a group of same-sized rows to one tensor ``[N, C, H, W]`` of floats in [0, 1], work on it, and
convert back.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from daskmv.errors import RowError


#: Most pixels in one tensor batch: 16 Mpx is 192 MB as float32 RGB, so a few intermediates fit anywhere.
MAX_BATCH_PIXELS = 1 << 24


def groups_by_size(images: Sequence[np.ndarray], max_pixels: int = MAX_BATCH_PIXELS) -> list[list[int]]:
    """Indices of same-sized images (``H, W``), each group one tensor batch of at most ``max_pixels``."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, image in enumerate(images):
        groups[image.shape[:2]].append(i)
    out = []
    for (h, w), indices in groups.items():
        step = max(1, max_pixels // max(1, h * w))
        out += [indices[k : k + step] for k in range(0, len(indices), step)]
    return out


def rgb_image(row: dict[str, Any], name: str) -> np.ndarray:
    """The row's RGB uint8 ``[H, W, 3]`` input ``name``, or a RowError saying what it is instead."""
    value = row.get(name)
    shape = getattr(value, "shape", None)
    if shape is None or len(shape) != 3 or shape[2] != 3 or value.dtype != np.uint8:
        raise RowError(f"input {name!r} is not an RGB uint8 image [H, W, 3] "
                       f"(got {type(value).__name__} {getattr(value, 'dtype', '')} {shape})")
    return value


def mask_image(row: dict[str, Any], name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The row's uint8 mask ``[H, W]`` (0-255) input ``name``, the size of the image it belongs to."""
    value = row.get(name)
    if getattr(value, "shape", None) != tuple(shape[:2]) or value.dtype != np.uint8:
        raise RowError(f"input {name!r} is not a uint8 mask of the image's size {tuple(shape[:2])} "
                       f"(got {type(value).__name__} {getattr(value, 'dtype', '')} {getattr(value, 'shape', None)})")
    return value


def per_row(rows: Sequence[dict[str, Any]], read: Any) -> tuple[list[Any], dict[int, BaseException]]:
    """``read(row)`` for every row; the rows it fails for are returned as errors, not raised."""
    values: list[Any] = []
    errors: dict[int, BaseException] = {}
    for i, row in enumerate(rows):
        try:
            values.append(read(row))
        except Exception as exc:
            values.append(None)
            errors[i] = exc
    return values, errors


def binary(mask: torch.Tensor) -> torch.Tensor:
    """A soft mask in [0, 1] as 0/1 floats: the foreground is where the mask is at least one half."""
    return (mask >= 0.5).to(mask.dtype)


def to_tensor(images: Sequence[np.ndarray], device: str) -> torch.Tensor:
    """``[N, C, H, W]`` float32 in [0, 1] from uint8 ``[H, W, C]`` or ``[H, W]`` arrays of one size."""
    batch = torch.from_numpy(np.stack(images)).to(device)
    if batch.ndim == 3:
        batch = batch.unsqueeze(-1)
    return batch.permute(0, 3, 1, 2).float().div_(255.0)


def to_uint8(batch: torch.Tensor) -> list[np.ndarray]:
    """Back to uint8 arrays ``[H, W, C]`` (``[H, W]`` for one channel), rounded and clipped."""
    out = batch.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [o[..., 0] if o.shape[-1] == 1 else o for o in out]


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[N, C, H, W]`` with reflected borders.

    Large sigmas (the Retinex surrounds of 80 or 250 px) are computed on an image shrunk about
    ``sigma / 6`` times (area average) and enlarged back (bilinear): the kernel stays about 37 taps
    wide whatever the sigma; the tests bound the difference from the full-size blur.
    """
    if sigma <= 0:
        return x
    factor = max(1, int(sigma // 6))
    if factor == 1:
        return _separable(x, sigma, sigma)
    h, w = x.shape[-2:]
    hs, ws = max(1, math.ceil(h / factor)), max(1, math.ceil(w / factor))
    small = F.interpolate(x, size=(hs, ws), mode="area")
    # sigma in shrunk pixels, less what the area average and the bilinear enlargement already blur (1/4 px^2)
    sy, sx = (math.sqrt(max((sigma * n / full) ** 2 - 0.25, 0.01)) for n, full in ((hs, h), (ws, w)))
    return F.interpolate(_separable(small, sy, sx), size=(h, w), mode="bilinear", align_corners=False)


def _separable(x: torch.Tensor, sigma_y: float, sigma_x: float) -> torch.Tensor:
    c = x.shape[1]
    for axis, sigma in ((3, sigma_x), (2, sigma_y)):
        radius = max(1, int(3.0 * sigma + 0.5))
        taps = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
        kernel = torch.exp(-(taps**2) / (2.0 * sigma * sigma))
        kernel = (kernel / kernel.sum()).view(1, 1, 1, -1) if axis == 3 else (kernel / kernel.sum()).view(1, 1, -1, 1)
        pad = (radius, radius, 0, 0) if axis == 3 else (0, 0, radius, radius)
        mode = "reflect" if radius < x.shape[axis] else "replicate"
        x = F.conv2d(F.pad(x, pad, mode=mode), kernel.expand(c, *kernel.shape[1:]), groups=c)
    return x


def masked_blur(x: torch.Tensor, mask: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian average of ``x`` over the mask only (normalised convolution): the background never leaks in.

    Where no mask pixel is within reach the average is 0.
    """
    return gaussian_blur(x * mask, sigma) / gaussian_blur(mask, sigma).clamp_min(1e-12)


def erode(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """Binary erosion of ``[N, 1, H, W]`` by a square of ``2 * pixels + 1``."""
    if pixels <= 0:
        return mask
    return -F.max_pool2d(-mask, 2 * pixels + 1, stride=1, padding=pixels)


def hex_color(text: str) -> tuple[float, float, float]:
    """``#808080`` as RGB floats in [0, 1]."""
    value = text.lstrip("#")
    if len(value) != 6 or any(ch not in "0123456789abcdefABCDEF" for ch in value):
        raise ValueError(f"not a #RRGGBB colour: {text!r}")
    return tuple(int(value[i : i + 2], 16) / 255.0 for i in (0, 2, 4))  # type: ignore[return-value]


def seed_for(row_id: Any, seed: int) -> int:
    """A 64-bit seed from a row id and a pipeline seed: the same row draws the same numbers on any run."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{seed}:{row_id}".encode()).digest()[:8], "little")


def map_groups(rows: Sequence[dict[str, Any]], read: Any, compute: Any) -> list[Any]:
    """The batched shape of every image op: ``read(row)`` each row's inputs (a tuple whose first item is
    the image), group rows by image size, and ``compute(inputs, rows)`` one group at a time; returns one
    result per row, in order, with the rows whose inputs were bad as their exceptions."""
    values, errors = per_row(rows, read)
    results: list[Any] = [errors.get(i) for i in range(len(rows))]
    ok = [i for i in range(len(rows)) if i not in errors]
    for group in groups_by_size([values[i][0] for i in ok]):
        indices = [ok[g] for g in group]
        outs = compute([values[i] for i in indices], [rows[i] for i in indices])
        for i, out in zip(indices, outs):
            results[i] = out
    return results
