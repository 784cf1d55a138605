"""Tensor basics: uint8 arrays to float batches and back, Gaussian blurs, erosion, feathered alpha.

Images travel between ops as NumPy arrays (RGB uint8 ``[H, W, 3]``, masks ``[H, W]``); ops that compute
convert a group of same-sized rows to one tensor ``[N, C, H, W]`` of floats in [0, 1], work on it, and
convert back.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def binary(mask: torch.Tensor) -> torch.Tensor:
    """A soft mask in [0, 1] as 0/1 floats: the foreground is where the mask is at least one half."""
    return (mask >= 0.5).to(mask.dtype)


def to_tensor(images: Sequence[np.ndarray], device: str, scale: float = 1.0 / 255.0) -> torch.Tensor:
    """``[N, C, H, W]`` float32 (uint8 values times ``scale``: [0, 1] by default) from uint8 ``[H, W, C]`` or
    ``[H, W]`` arrays of one size."""
    batch = torch.from_numpy(np.stack(images)).to(device)
    if batch.ndim == 3:
        batch = batch.unsqueeze(-1)
    out = batch.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
    return out if scale == 1.0 else out.mul_(scale)


def to_uint8(batch: torch.Tensor) -> list[np.ndarray]:
    """Back to uint8 arrays ``[H, W, C]`` (``[H, W]`` for one channel), rounded and clipped."""
    out = batch.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [o[..., 0] if o.shape[-1] == 1 else o for o in out]


#: Blurs up to this sigma run at full size as shifted sums; wider ones on a shrunk image.
SHIFT_SIGMA = 3.0


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[N, C, H, W]`` with mirrored borders; cost independent of sigma.

    Narrow kernels (sigma <= 3) are shifted sums at full size. Wide ones (the Retinex surrounds of 15,
    80 or 250 px) run on an image shrunk ``sigma // 3`` times (area average), blurred exactly by a
    matrix product, and enlarged back (bilinear); the tests bound the difference from the full-size blur.
    """
    if sigma <= 0:
        return x
    h, w = x.shape[-2:]
    if sigma <= SHIFT_SIGMA:
        return _shifted_blur(x, sigma)
    return F.interpolate(blur_shrunk(x, sigma), size=(h, w), mode="bilinear", align_corners=False)


def blur_shrunk(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The Gaussian blur of ``x`` (sigma > 3) on a grid ``sigma // 3`` times coarser: smooth enough that
    bilinear enlargement restores it."""
    full = (x.shape[-2], x.shape[-1])
    return blur_on_grid(shrink_for(x, sigma, full), sigma, full)


def shrink_for(x: torch.Tensor, sigma: float, full: tuple[int, int]) -> torch.Tensor:
    """``x`` (full size, or already coarser) area-averaged down to the grid a blur of ``sigma`` runs on."""
    factor = max(2, int(sigma // SHIFT_SIGMA))
    size = (max(1, math.ceil(full[0] / factor)), max(1, math.ceil(full[1] / factor)))
    return x if tuple(x.shape[-2:]) == size else F.interpolate(x, size=size, mode="area")


def blur_on_grid(small: torch.Tensor, sigma: float, full: tuple[int, int]) -> torch.Tensor:
    """Blur a shrunk image by ``sigma`` full-size pixels, less what the area average and the bilinear
    enlargement already blur (1/4 px^2 on the coarse grid)."""
    hs, ws = small.shape[-2:]
    sy, sx = (math.sqrt(max((sigma * n / f) ** 2 - 0.25, 0.01)) for n, f in ((hs, full[0]), (ws, full[1])))
    return exact_blur(small, sy, sx)


def exact_blur(x: torch.Tensor, sigma_y: float, sigma_x: float) -> torch.Tensor:
    """The full Gaussian (kernel radius 3 sigma, mirrored borders) as two matrix products: ``B_h x B_w^T``."""
    h, w = x.shape[-2:]
    rows = blur_matrix(h, sigma_y, str(x.device), x.dtype)
    cols = blur_matrix(w, sigma_x, str(x.device), x.dtype)
    return torch.matmul(torch.matmul(rows, x), cols.T)


@functools.lru_cache(maxsize=64)
def blur_matrix(n: int, sigma: float, device: str, dtype: torch.dtype) -> torch.Tensor:
    """``[n, n]`` matrix of a 1-D Gaussian blur with mirrored borders (the edge sample not repeated)."""
    radius = max(1, int(3.0 * sigma + 0.5))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-(taps**2) / (2.0 * sigma * sigma))
    kernel /= kernel.sum()
    if n == 1:
        return torch.ones(1, 1, dtype=dtype, device=device)
    period = 2 * (n - 1)
    index = (torch.arange(n)[:, None] + torch.arange(-radius, radius + 1)[None, :]) % period
    index = torch.where(index >= n, period - index, index)
    matrix = torch.zeros(n, n, dtype=torch.float64).scatter_add_(1, index, kernel.expand(n, -1).contiguous())
    return matrix.to(device=device, dtype=dtype)


def _shifted_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(3.0 * sigma + 0.5))
    if radius >= min(x.shape[-2:]):
        return exact_blur(x, sigma, sigma)
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-(taps**2) / (2.0 * sigma * sigma))
    kernel = (kernel / kernel.sum()).tolist()
    h, w = x.shape[-2:]
    padded = F.pad(x, (radius, radius, 0, 0), mode="reflect")
    out = padded[..., :, 0:w] * kernel[0]
    for i in range(1, 2 * radius + 1):
        out.add_(padded[..., :, i : i + w], alpha=kernel[i])
    padded = F.pad(out, (0, 0, radius, radius), mode="reflect")
    out = padded[..., 0:h, :] * kernel[0]
    for i in range(1, 2 * radius + 1):
        out.add_(padded[..., i : i + h, :], alpha=kernel[i])
    return out


def masked_blur(x: torch.Tensor, mask: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian average of ``x`` over the mask only (normalised convolution): the background never leaks in.

    Where no mask pixel is within reach the average is 0.
    """
    both = gaussian_blur(torch.cat([x * mask, mask], dim=1), sigma)
    return both[:, :-1] / both[:, -1:].clamp_min(1e-12)


def erode(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """Erosion of ``[N, 1, H, W]`` by a square of ``2 * pixels + 1`` (the frame's edge does not erode)."""
    if pixels <= 0:
        return mask
    h, w = mask.shape[-2:]
    padded = F.pad(mask, (pixels, pixels, 0, 0), mode="replicate")
    out = padded[..., :, 0:w].clone()
    for i in range(1, 2 * pixels + 1):
        torch.minimum(out, padded[..., :, i : i + w], out=out)
    padded = F.pad(out, (0, 0, pixels, pixels), mode="replicate")
    out = padded[..., 0:h, :].clone()
    for i in range(1, 2 * pixels + 1):
        torch.minimum(out, padded[..., i : i + h, :], out=out)
    return out


def edge_alpha(mask: torch.Tensor, cfg: dict[str, Any]) -> torch.Tensor:
    """Anti-aliased alpha: the binary mask eroded, feathered by a Gaussian, and zero outside the mask,
    so every pixel outside it is exactly the background."""
    inside = binary(mask)
    feathered = gaussian_blur(erode(inside, int(cfg["edge_erode"])), float(cfg["edge_sigma"]))
    return feathered * inside
