"""gsplat's CUDA rasterizer behind the reference renderer's call, for training on a GPU.

gsplat (pinned: 1.5.3) compiles its CUDA kernels the first time they run, into ``TORCH_EXTENSIONS_DIR``
(default ``~/.cache/torch_extensions``): minutes, once per machine, and it needs ``nvcc``, a CUDA build of torch
and ``CUDA_HOME``. :func:`gsplat_rasterizer` triggers that compilation at set-up, with a message, so that no
scene's training time includes it.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

import torch

log = logging.getLogger("daskmv")

GSPLAT_VERSION = "1.5.3"


def gsplat_rasterizer(device: str, required: bool = False) -> Callable[..., dict[str, torch.Tensor]] | None:
    """A function with :func:`daskmv.splat.render.render`'s signature and outputs, on gsplat; None (or, with
    ``required``, an error) where gsplat cannot run: no CUDA device, gsplat not installed, kernels that do
    not compile."""
    if not device.startswith("cuda"):
        if required:
            raise RuntimeError("renderer=gsplat needs a CUDA device; this worker has none")
        return None
    try:
        import gsplat  # noqa: F401
        from gsplat import rasterization
    except ImportError as exc:
        if required:
            raise RuntimeError(f"renderer=gsplat: cannot import gsplat ({exc}); pip install gsplat=={GSPLAT_VERSION}")
        log.warning("gsplat is not installed (pip install gsplat==%s): training on the reference renderer",
                    GSPLAT_VERSION)
        return None
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))
    log.warning("gsplat: compiling its CUDA kernels into %s if they are not there yet (minutes, once per machine)",
                os.environ["TORCH_EXTENSIONS_DIR"])

    def rasterize(means: torch.Tensor, quats: torch.Tensor, scales: torch.Tensor, opacities: torch.Tensor,
                  sh: torch.Tensor, cam: Any, sh_degree: int, background: torch.Tensor | None = None,
                  **_: Any) -> dict[str, torch.Tensor]:
        colors, alphas, info = rasterization(
            means, quats, scales, opacities, sh, cam.world_to_cam[None], cam.K[None], cam.width, cam.height,
            sh_degree=sh_degree, backgrounds=None if background is None else background[None],
            render_mode="RGB+ED", packed=False)
        means2d = info["means2d"]
        radii = info["radii"]
        radii = radii.amax(dim=-1) if radii.dim() == 3 else radii
        return {"image": colors[0, ..., :3], "depth": colors[0, ..., 3], "alpha": alphas[0, ..., 0],
                "radii": radii[0].float(), "means2d": means2d[0] if means2d.dim() == 3 else means2d}

    try:  # compile now: a scene's training time should not include it
        one = torch.zeros(1, 3, device=device)
        from daskmv.splat.render import Camera

        cam = Camera(torch.eye(3, device=device), torch.eye(4, device=device), 8, 8)
        rasterize(one + torch.tensor([0, 0, 2.0], device=device), torch.tensor([[1.0, 0, 0, 0]], device=device),
                  one + 0.1, torch.ones(1, device=device), torch.zeros(1, 1, 3, device=device), cam, 0)
    except Exception as exc:
        if required:
            raise RuntimeError(f"gsplat could not run on {device}: {type(exc).__name__}: {exc}") from exc
        log.warning("gsplat could not run on %s (%s: %s): training on the reference renderer", device,
                    type(exc).__name__, exc)
        return None
    return rasterize
