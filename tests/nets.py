"""Tiny, randomly initialised networks for the torch_model tests (built here, never downloaded)."""

from __future__ import annotations

import torch
from torch import nn


class TinyCNN(nn.Module):
    """[N, 3, H, W] -> [N, dim]: two convolutions, global average pooling, a linear layer."""

    def __init__(self, dim: int = 8, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU())
        self.head = nn.Linear(16, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean(dim=(2, 3)))


def tiny_cnn(dim: int = 8, seed: int = 0) -> TinyCNN:
    return TinyCNN(dim=dim, seed=seed)


class RedSegmenter(nn.Module):
    """[N, 3, H, W] -> person logits [N, 1, H, W]: 'red things are people' (fixed weights, so the masks
    it makes are known): logit = 20 R - 10 G - 10 B - 5."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([20.0, -10.0, -10.0]).view(1, 3, 1, 1))
            self.conv.bias.fill_(-5.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def red_segmenter() -> RedSegmenter:
    return RedSegmenter()


class EqualMatcher(nn.Module):
    """A 'learned matcher' whose matches are known: each keypoint of a matched to the keypoint of b with an
    equal descriptor (distance below 1e-4), if any."""

    def forward(self, ka: torch.Tensor, da: torch.Tensor, kb: torch.Tensor, db: torch.Tensor) -> torch.Tensor:
        d = torch.cdist(da[0], db[0], compute_mode="donot_use_mm_for_euclid_dist")
        j = d.argmin(dim=1)
        i = torch.arange(j.shape[0])
        ok = d[i, j] < 1e-4
        return torch.stack([i[ok], j[ok]], dim=1)
