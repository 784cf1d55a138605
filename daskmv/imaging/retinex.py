"""Multi-Scale Retinex on masked images (see :mod:`daskmv.ops.retinex` for the op and its output range)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from daskmv.imaging.tensors import SHIFT_SIGMA, blur_shrunk, gaussian_blur

#: Above this many foreground values, percentiles are taken from an even subsample (within 0.1%).
PERCENTILE_SAMPLE = 1 << 21


def retinex(image: torch.Tensor, mask: torch.Tensor, cfg: dict[str, Any]) -> torch.Tensor:
    """Albedo in [0, 1] of a batch ``[N, 3, H, W]`` (floats in [0, 1]) under binary masks ``[N, 1, H, W]``."""
    intensity = image * 255.0 + 1.0
    response = torch.log(intensity).mul_(sum(cfg["weights"]))
    response -= log_surround(torch.cat([intensity * mask, mask], dim=1), cfg["scales"], cfg["weights"])
    if cfg["color_restoration"]:
        total = intensity.sum(dim=1, keepdim=True)
        response *= cfg["beta"] * (torch.log(cfg["alpha"] * intensity) - torch.log(total))
    return normalise(response, mask, float(cfg["low"]), float(cfg["high"]))


def log_surround(weighted: torch.Tensor, scales: list[float], weights: list[float]) -> torch.Tensor:
    """``sum_s weight_s * log(masked Gaussian surround_s)`` at full size, from ``[I * mask, mask]``.

    The surrounds are smooth, so each is taken on its own coarse grid (see :func:`blur_shrunk`); their
    weighted logs are summed on the finest of those grids and enlarged to full size once.
    """
    h, w = weighted.shape[-2:]
    total: torch.Tensor | None = None
    for sigma, weight in sorted(zip(scales, weights)):
        blurred = gaussian_blur(weighted, sigma) if sigma <= SHIFT_SIGMA else blur_shrunk(weighted, sigma)
        term = torch.log((blurred[:, :-1] / blurred[:, -1:].clamp_min(1e-12)).clamp_min_(1.0)).mul_(weight)
        if total is None:
            total = term
        else:
            total += F.interpolate(term, size=total.shape[-2:], mode="bilinear", align_corners=False)
    assert total is not None
    if total.shape[-2:] != (h, w):
        total = F.interpolate(total, size=(h, w), mode="bilinear", align_corners=False)
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
