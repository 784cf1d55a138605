"""Multi-Scale Retinex on masked images (see :mod:`daskmv.ops.retinex` for the op and its output range)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from daskmv.imaging.tensors import SHIFT_SIGMA, blur_on_grid, gaussian_blur, shrink_for

#: Above this many foreground values, percentiles are taken from an even subsample (within 0.1%).
PERCENTILE_SAMPLE = 1 << 21


def retinex(intensity: torch.Tensor, mask: torch.Tensor, cfg: dict[str, Any]) -> torch.Tensor:
    """Albedo in [0, 1] of a batch ``[N, 3, H, W]`` of intensities (pixel values 0-255 plus one, the log's
    domain) under binary masks ``[N, 1, H, W]``."""
    response = torch.log(intensity)
    total_weight = sum(cfg["weights"])
    if abs(total_weight - 1.0) > 1e-12:
        response.mul_(total_weight)
    response -= log_surround(torch.cat([intensity * mask, mask], dim=1), cfg["scales"], cfg["weights"])
    if cfg["color_restoration"]:
        total = intensity.sum(dim=1, keepdim=True)
        response *= cfg["beta"] * (torch.log(cfg["alpha"] * intensity) - torch.log(total))
    return normalise(response, mask, float(cfg["low"]), float(cfg["high"]))


def log_surround(weighted: torch.Tensor, scales: list[float], weights: list[float]) -> torch.Tensor:
    """``sum_s weight_s * log(masked Gaussian surround_s)`` at full size, from ``[I * mask, mask]``.

    The surrounds are smooth, so each is taken on its own coarse grid, each grid area-averaged from the
    previous, finer one (see :func:`blur_on_grid`); their weighted logs are summed on the finest of those
    grids and enlarged to full size once.
    """
    full = (weighted.shape[-2], weighted.shape[-1])
    level = weighted
    total: torch.Tensor | None = None
    for sigma, weight in sorted(zip(scales, weights)):
        if sigma <= SHIFT_SIGMA:
            blurred = gaussian_blur(weighted, sigma)
        else:
            level = shrink_for(level, sigma, full)
            blurred = blur_on_grid(level, sigma, full)
        term = torch.log((blurred[:, :-1] / blurred[:, -1:].clamp_min(1e-12)).clamp_min_(1.0)).mul_(weight)
        if total is None:
            total = term
        else:
            total += F.interpolate(term, size=total.shape[-2:], mode="bilinear", align_corners=False)
    assert total is not None
    if total.shape[-2:] != full:
        total = F.interpolate(total, size=full, mode="bilinear", align_corners=False)
    return total


def normalise(response: torch.Tensor, mask: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Map each image's foreground percentiles ``low``..``high`` to [0, 1]; background 0; flat -> 0.5."""
    n = response.shape[0]
    lo = torch.zeros(n, 1, 1, 1, device=response.device, dtype=response.dtype)
    span = torch.ones_like(lo)
    flat = torch.zeros(n, 1, 1, 1, device=response.device, dtype=torch.bool)
    for k in range(n):
        values = _foreground_values(response[k], mask[k])
        if values.numel() == 0:
            continue
        p_lo, p_hi = percentiles(values, low, high)
        lo[k], span[k], flat[k] = p_lo, max(p_hi - p_lo, 1e-12), p_hi - p_lo < 1e-4
    scaled = ((response - lo) / span).clamp_(0.0, 1.0)
    return torch.where(flat, torch.full_like(scaled, 0.5), scaled).mul_(mask)


def _foreground_values(response: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The response's values inside the mask, every other row and column when there are plenty."""
    if mask.shape[-1] * mask.shape[-2] > 4 * 4096:
        sub = response[:, ::2, ::2][mask[:, ::2, ::2].expand(response.shape[0], -1, -1) > 0]
        if sub.numel() >= 4096:
            return sub
    return response[mask.expand_as(response) > 0]


def percentiles(values: torch.Tensor, low: float, high: float) -> tuple[float, float]:
    """The ``low`` and ``high`` percentiles (nearest rank) of a 1-D tensor, subsampled when very large."""
    if values.numel() > PERCENTILE_SAMPLE:
        values = values[:: values.numel() // PERCENTILE_SAMPLE + 1]
    n = values.numel()

    def rank(p: float) -> float:
        k = min(n, max(1, int(round(p / 100.0 * (n - 1))) + 1))
        return float(values.kthvalue(k).values)

    return rank(low), rank(high)
