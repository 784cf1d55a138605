"""``composite`` and ``input_image``, and the named ``relight`` pipeline they finish.

``relight`` = ``input_image, segment, albedo, degrade, composite``: the person's albedo by Multi-Scale
Retinex, one seeded lighting degradation, composited onto #808080, with every intermediate image kept
as an array and the row's parameters in a JSON ``metadata`` column. Each op also works alone.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from daskmv.errors import PipelineError
from daskmv.ops.base import Op, Output, Param, Row
from daskmv.ops.registry import register_op, register_pipeline
from daskmv.ops.rows import PHOTO_BYTES, hex_color, map_groups, mask_image, rgb_image


@register_op
class InputImage(Op):
    name = "input_image"
    help = "Keep the decoded input image (RGB uint8) as an array: exactly what the later ops saw."
    inputs = ("image",)
    outputs = (Output("input", "array", "uint8", "the decoded input image [H, W, 3]"),)

    def row_bytes(self) -> int:
        return PHOTO_BYTES

    def process(self, rows: list[Row]) -> list[Row | BaseException]:
        return [{"input": row["image"]} for row in rows]

    def gallery(self, row: Row) -> list[tuple[str, Any]]:
        return []  # the input image leads every gallery row already


@register_op
class Composite(Op):
    name = "composite"
    help = "Composite the foreground onto a flat colour (default #808080) or the original background."
    gpu = True
    params = {
        "background": Param("#808080", "a #RRGGBB colour, or 'original' to keep the photo's own background"),
        "source": Param("degraded_fg", "input that holds the foreground image to composite"),
        "image": Param("image", "input that holds the original image (for background: original)"),
        "mask": Param("mask", "input that holds the uint8 mask (255 = foreground)"),
        "edge_erode": Param(1, "pixels the mask is eroded before feathering, so no background fringe shows"),
        "edge_sigma": Param(1.0, "Gaussian sigma (pixels) of the anti-aliased edge"),
    }
    outputs = (
        Output("output_image", "array", "uint8", "the composite [H, W, 3]", export_as="output"),
        Output("background", "array", "uint8", "the background it was composited onto [H, W, 3]",
               compression="zstd"),
        Output("metadata", "column", "json", "what made this row's images: sizes, mask coverage, "
                                              "degradation, background"),
    )

    def check_params(self) -> None:
        cfg = self.config
        self.color = None if cfg["background"] == "original" else _color(cfg["background"])
        if int(cfg["edge_erode"]) < 0 or float(cfg["edge_sigma"]) < 0:
            raise PipelineError("op 'composite': edge_erode and edge_sigma must be >= 0")
        self.device = "cpu"

    def input_names(self) -> tuple[str, ...]:
        names = [self.config["source"], self.config["mask"]]
        return tuple(names + ([self.config["image"]] if self.color is None else []))

    def row_bytes(self) -> int:
        return PHOTO_BYTES

    def setup(self, device: str) -> None:
        self.device = device

    def process(self, rows: list[Row]) -> list[Row | BaseException]:
        cfg = self.config

        def read(row: Row) -> tuple[np.ndarray, ...]:
            source = rgb_image(row, cfg["source"])
            mask = mask_image(row, cfg["mask"], source.shape)
            if self.color is not None:
                return source, mask
            original = rgb_image(row, cfg["image"])
            if original.shape != source.shape:
                raise ValueError(f"{cfg['image']!r} is {original.shape}, {cfg['source']!r} {source.shape}")
            return source, mask, original

        def compute(inputs: list[tuple[np.ndarray, ...]], group: list[Row]) -> list[Row]:
            import torch

            from daskmv.imaging.tensors import edge_alpha, to_tensor, to_uint8

            with torch.inference_mode():
                source = to_tensor([i[0] for i in inputs], self.device)
                alpha = edge_alpha(to_tensor([i[1] for i in inputs], self.device), cfg)
                if self.color is None:
                    backgrounds = [i[2] for i in inputs]
                    background = to_tensor(backgrounds, self.device)
                else:
                    background = torch.tensor(self.color, device=self.device).view(1, 3, 1, 1)
                    flat = np.array([round(c * 255) for c in self.color], np.uint8)
                    backgrounds = [np.broadcast_to(flat, i[0].shape) for i in inputs]
                out = to_uint8(torch.lerp(background.expand_as(source), source, alpha.expand_as(source)))
            return [{"output_image": o, "background": b, "metadata": self._metadata(row, i[1])}
                    for o, b, row, i in zip(out, backgrounds, group, inputs)]

        return map_groups(rows, read, compute)

    def gallery(self, row: Row) -> list[tuple[str, Any]]:
        return [("output", row.get("output_image"))]  # the background is one flat colour: not worth a tile

    def _metadata(self, row: Row, mask: np.ndarray) -> dict[str, Any]:
        h, w = mask.shape
        meta: dict[str, Any] = {"id": row.get("id"), "width": w, "height": h,
                                "background": self.config["background"],
                                "mask_coverage": float((mask >= 128).mean())}
        for key in ("url", "image_info", "degradation"):
            value = row.get(key)
            if isinstance(value, str) and key == "degradation":
                value = json.loads(value)
            if value is not None and value == value:
                meta["source" if key == "url" else key] = value
        return meta


def _color(text: str) -> tuple[float, float, float]:
    try:
        return hex_color(text)
    except ValueError:
        raise PipelineError(f"op 'composite': background must be #RRGGBB or 'original', not {text!r}") from None


register_pipeline("relight", [
    {"op": "input_image"},
    {"op": "segment"},
    {"op": "albedo"},
    {"op": "degrade"},
    {"op": "composite"},
])
