"""``albedo``: Multi-Scale Retinex on the foreground, batched in torch on the worker's device.

For each scale ``s`` (Gaussian sigma in pixels) the single-scale Retinex is
``log(I) - log(G_s * I)``, where ``G_s * I`` is the Gaussian surround averaged over the foreground only
(normalised convolution: the background never leaks into the estimate of the light). The scales are
summed with their weights; optional colour restoration (MSRCR) multiplies by
``beta * (log(alpha * I_c) - log(sum_c I_c))``. ``I`` is on the 0-255 scale plus one.

Output range: the foreground's ``low``-th to ``high``-th percentile (over all three channels) maps
linearly to 0-255 and is clipped; the background is 0. An image whose Retinex response is constant
(a flat colour) comes out as flat mid-gray, 128.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from daskmv.errors import PipelineError
from daskmv.ops.base import Op, Output, Param, Row
from daskmv.ops.registry import register_op
from daskmv.ops.torchimg import (
    SHIFT_SIGMA, binary, blur_shrunk, gaussian_blur, map_groups, mask_image, rgb_image, to_tensor, to_uint8,
)

#: Above this many foreground values, percentiles are taken from an even subsample (within 0.1%).
PERCENTILE_SAMPLE = 1 << 21


@register_op
class Albedo(Op):
    name = "albedo"
    help = "Albedo of the foreground by Multi-Scale Retinex (scales 15/80/250 px), normalised to 0-255."
    gpu = True
    params = {
        "scales": Param([15, 80, 250], "Gaussian surround sigmas, in pixels"),
        "weights": Param(None, "weight of each scale (default: equal, summing to 1)"),
        "color_restoration": Param(False, "multiply by the MSRCR colour-restoration factor"),
        "alpha": Param(125.0, "colour restoration: alpha"),
        "beta": Param(46.0, "colour restoration: beta"),
        "low": Param(1.0, "percentile of the foreground mapped to 0"),
        "high": Param(99.0, "percentile of the foreground mapped to 255"),
        "image": Param("image", "input that holds the RGB image"),
        "mask": Param("mask", "input that holds the uint8 mask (255 = foreground)"),
    }
    outputs = (Output("albedo", "array", "uint8", "Retinex albedo [H, W, 3]; background 0"),)

    def check_params(self) -> None:
        cfg = self.config
        scales = cfg["scales"]
        if not isinstance(scales, (list, tuple)) or not scales or any(float(s) <= 0 for s in scales):
            raise PipelineError(f"op 'albedo': scales must be a list of positive sigmas, not {scales!r}")
        cfg["scales"] = [float(s) for s in scales]
        weights = cfg["weights"] or [1.0 / len(scales)] * len(scales)
        if len(weights) != len(scales):
            raise PipelineError(f"op 'albedo': {len(weights)} weights for {len(scales)} scales")
        cfg["weights"] = [float(w) for w in weights]
        if not 0.0 <= float(cfg["low"]) < float(cfg["high"]) <= 100.0:
            raise PipelineError(f"op 'albedo': need 0 <= low < high <= 100, got {cfg['low']}, {cfg['high']}")
        self.device = "cpu"

    def input_names(self) -> tuple[str, ...]:
        return (self.config["image"], self.config["mask"])

    def row_bytes(self) -> int:
        return 3 << 20

    def setup(self, device: str) -> None:
        self.device = device

    def process(self, rows: list[Row]) -> list[Row | BaseException]:
        def read(row: Row) -> tuple[np.ndarray, np.ndarray]:
            image = rgb_image(row, self.config["image"])
            return image, mask_image(row, self.config["mask"], image.shape)

        def compute(inputs: list[tuple[np.ndarray, np.ndarray]], _rows: list[Row]) -> list[Row]:
            with torch.inference_mode():
                image = to_tensor([i for i, _ in inputs], self.device)
                mask = binary(to_tensor([m for _, m in inputs], self.device))
                return [{"albedo": a} for a in to_uint8(retinex(image, mask, self.config))]

        return map_groups(rows, read, compute)


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
