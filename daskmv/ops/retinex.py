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


import numpy as np

from daskmv.errors import PipelineError
from daskmv.ops.base import Output, Param, Row
from daskmv.ops.registry import register_op
from daskmv.ops.rows import MaskedImageOp, map_groups

@register_op
class Albedo(MaskedImageOp):
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

    def process(self, rows: list[Row]) -> list[Row | BaseException]:
        def compute(inputs: list[tuple[np.ndarray, np.ndarray]], _rows: list[Row]) -> list[Row]:
            import torch

            from daskmv.imaging.retinex import retinex
            from daskmv.imaging.tensors import binary, to_tensor, to_uint8

            with torch.inference_mode():
                intensity = to_tensor([i for i, _ in inputs], self.device, scale=1.0).add_(1.0)
                mask = binary(to_tensor([m for _, m in inputs], self.device))
                return [{"albedo": a} for a in to_uint8(retinex(intensity, mask, self.config))]

        return map_groups(rows, self.read, compute)
