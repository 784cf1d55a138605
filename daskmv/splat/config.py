"""The training settings of one scene (:class:`TrainConfig`), apart from the trainer so that checking a
pipeline's ``splat`` parameters on the client needs no torch (importing it costs 1.7 s of every run's start)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

STRATEGIES = ("default", "mcmc")


@dataclass
class TrainConfig:
    steps: int = 7000
    sh_degree: int = 3
    sh_every: int = 1000
    strategy: str = "default"
    lr_means: float = 1.6e-4  # times the scene's extent
    lr_scales: float = 5e-3
    lr_quats: float = 1e-3
    lr_opacities: float = 5e-2
    lr_sh0: float = 2.5e-3
    lr_shN: float = 2.5e-3 / 20
    ssim_weight: float = 0.2
    refine_start: int = 500
    refine_stop: int = 15000
    refine_every: int = 100
    reset_every: int = 3000
    grad_threshold: float = 2e-4
    prune_opacity: float = 0.005
    max_gaussians: int = 1_000_000
    init_opacity: float = 0.1
    checkpoint_every: int = 1000
    log_every: int = 10
    seed: int = 0
    background: tuple[float, float, float] = (0.0, 0.0, 0.0)
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy {self.strategy!r}: use one of {', '.join(STRATEGIES)}")
        if self.steps < 1 or not 0 <= self.sh_degree <= 3:
            raise ValueError(f"steps must be >= 1 and sh_degree 0-3 (got {self.steps}, {self.sh_degree})")
