"""``degrade``: one synthetic lighting degradation per row, on the foreground only.

Kinds:

- ``soft_shading``: a smooth, low-frequency light field (a directional ramp plus a few broad Gaussian
  blobs) multiplies the image: the darkest part is ``1 - strength`` of the original.
- ``hard_shadow``: one to three occluder polygons, blurred into a penumbra, darken the image by
  ``opacity``.
- ``specular``: one to three glossy highlights (Gaussian lobes sharpened by a shininess exponent) add a
  light colour.

Every random choice comes from a NumPy generator seeded by (row id, ``seed``), so a rerun, on any
machine, gives the same parameters and the same pixels; every drawn value is recorded in the row's
``degradation`` JSON column. Pixels outside the mask (mask < 128) are the source's, unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from daskmv.errors import PipelineError
from daskmv.ops.base import Output, Param, Row
from daskmv.ops.registry import register_op
from daskmv.ops.rows import MaskedImageOp, map_groups, seed_for

KINDS = ("soft_shading", "hard_shadow", "specular")
RANGES = {
    "shading_strength": (0.3, 0.7),
    "shadow_opacity": (0.4, 0.8),
    "shadow_penumbra": (0.004, 0.03),
    "specular_intensity": (0.3, 0.8),
    "specular_size": (0.03, 0.12),
}


@register_op
class Degrade(MaskedImageOp):
    name = "degrade"
    help = "One seeded degradation per row (soft shading, hard shadow or specular) on the foreground only."
    gpu = True
    image_param = "source"
    params = {
        "kinds": Param(list(KINDS), "degradations to choose from, one per row", types=(list, tuple, str)),
        "weights": Param(None, "probability of each kind (default: equal)"),
        "seed": Param(0, "the pipeline's seed; with the row id it seeds every random choice"),
        "source": Param("albedo", "input image to degrade"),
        "mask": Param("mask", "input that holds the uint8 mask (255 = foreground)"),
        **{key: Param(list(value), f"[min, max] of {key.replace('_', ' ')}"
                      + (" (fraction of the image diagonal)" if key in ("shadow_penumbra", "specular_size") else ""))
           for key, value in RANGES.items()},
    }
    outputs = (
        Output("degraded_fg", "array", "uint8", "the source with one degradation inside the mask [H, W, 3]"),
        Output("degradation", "column", "json", "kind, seed and every drawn parameter"),
    )

    def check_params(self) -> None:
        cfg = self.config
        kinds = cfg["kinds"]
        if isinstance(kinds, str):
            kinds = [kinds]
        bad = [k for k in kinds if k not in KINDS]
        if not kinds or bad:
            raise PipelineError(f"op 'degrade': kinds must be some of {', '.join(KINDS)}, not {cfg['kinds']!r}")
        cfg["kinds"] = list(kinds)
        weights = cfg["weights"] or [1.0] * len(kinds)
        if len(weights) != len(kinds) or any(float(w) < 0 for w in weights) or sum(map(float, weights)) <= 0:
            raise PipelineError(f"op 'degrade': weights must be {len(kinds)} non-negative numbers, not {cfg['weights']!r}")
        total = sum(map(float, weights))
        cfg["weights"] = [float(w) / total for w in weights]
        for key in RANGES:
            value = cfg[key]
            if not (isinstance(value, (list, tuple)) and len(value) == 2 and 0 <= float(value[0]) <= float(value[1])):
                raise PipelineError(f"op 'degrade': {key} must be [min, max] with 0 <= min <= max, not {value!r}")
            cfg[key] = [float(value[0]), float(value[1])]
        if not isinstance(cfg["seed"], int):
            raise PipelineError(f"op 'degrade': seed must be an integer, not {cfg['seed']!r}")

    def process(self, rows: list[Row]) -> list[Row | BaseException]:
        def compute(inputs: list[tuple[np.ndarray, np.ndarray]], group: list[Row]) -> list[Row]:
            masks = [m for _, m in inputs]
            params = [draw(row["id"], self.config, m) for row, m in zip(group, masks)]
            import torch

            from daskmv.imaging.lighting import apply
            from daskmv.imaging.tensors import binary, to_tensor, to_uint8

            with torch.inference_mode():
                image = to_tensor([i for i, _ in inputs], self.device)
                inside = binary(to_tensor(masks, self.device))
                degraded = torch.stack([apply(image[k : k + 1], p, self.device)[0] for k, p in enumerate(params)])
                out = torch.where(inside > 0, degraded, image)
                return [{"degraded_fg": d, "degradation": p} for d, p in zip(to_uint8(out), params)]

        return map_groups(rows, self.read, compute)


# -- drawing the parameters -----------------------------------------------------------------------------
def draw(row_id: Any, cfg: dict[str, Any], mask: np.ndarray) -> dict[str, Any]:
    """Every random choice for one row, from a generator seeded by the row id and ``cfg['seed']``.

    Positions are in normalised image coordinates (x, y in [0, 1]); shapes centre on the mask's bounding
    box so the degradation lands on the person.
    """
    rng = np.random.Generator(np.random.PCG64(seed_for(row_id, cfg["seed"])))
    kind = str(rng.choice(cfg["kinds"], p=cfg["weights"]))
    box = _mask_box(mask)
    params: dict[str, Any] = {"kind": kind, "seed": cfg["seed"]}
    if kind == "soft_shading":
        params["strength"] = _uniform(rng, cfg["shading_strength"])
        params["direction"] = float(rng.uniform(0.0, 2.0 * math.pi))
        params["blobs"] = [
            {"x": float(rng.uniform(0, 1)), "y": float(rng.uniform(0, 1)), "sigma": float(rng.uniform(0.15, 0.4)),
             "amplitude": float(rng.uniform(-0.5, 0.5))}
            for _ in range(int(rng.integers(2, 5)))
        ]
    elif kind == "hard_shadow":
        params["opacity"] = _uniform(rng, cfg["shadow_opacity"])
        params["penumbra"] = _uniform(rng, cfg["shadow_penumbra"])
        params["occluders"] = [_polygon(rng, box) for _ in range(int(rng.integers(1, 4)))]
    else:
        params["color"] = [float(v) for v in rng.uniform(0.85, 1.0, size=3)]
        params["lobes"] = [
            {"x": float(rng.uniform(box[0], box[2])), "y": float(rng.uniform(box[1], box[3])),
             "size": _uniform(rng, cfg["specular_size"]), "intensity": _uniform(rng, cfg["specular_intensity"]),
             "shininess": float(rng.uniform(1.0, 4.0)), "aspect": float(rng.uniform(0.4, 1.0)),
             "angle": float(rng.uniform(0.0, math.pi))}
            for _ in range(int(rng.integers(1, 4)))
        ]
    return params


def _uniform(rng: np.random.Generator, bounds: list[float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def _mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """The foreground's bounding box in normalised coordinates (the whole frame when the mask is empty)."""
    ys, xs = np.nonzero(mask >= 128)
    if len(xs) == 0:
        return 0.0, 0.0, 1.0, 1.0
    h, w = mask.shape
    return xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h


def _polygon(rng: np.random.Generator, box: tuple[float, float, float, float]) -> list[list[float]]:
    """A star-shaped occluder: 3-7 vertices around a centre inside the box, radius 15-45% of its size."""
    cx, cy = rng.uniform(box[0], box[2]), rng.uniform(box[1], box[3])
    size = max(box[2] - box[0], box[3] - box[1])
    radius = rng.uniform(0.15, 0.45) * size
    n = int(rng.integers(3, 8))
    angles = np.sort(rng.uniform(0.0, 2.0 * math.pi, size=n))
    radii = radius * rng.uniform(0.5, 1.0, size=n)
    return [[float(cx + r * math.cos(a)), float(cy + r * math.sin(a))] for a, r in zip(angles, radii)]
