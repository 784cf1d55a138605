"""Learned extractors and matchers (SuperPoint-, DISK-, LightGlue-style networks) plugged in like any model.

A model is a TorchScript file, a ``torch.export`` ``.pt2`` file, or ``module:factory`` with the user's own
weights (see :func:`daskmv.ops.torch_model.load_torch_model`); nothing is downloaded. The contracts:

- **extractor** ``model(image)``: ``image`` gray float ``[1, 1, H, W]`` in [0, 1]; returns ``(keypoints [N, 2]``
  in pixels, pixel centres at integers, ``descriptors [N, D]``, optionally ``scores [N])`` (a leading batch
  axis of 1 is accepted) or a dict with those keys. The ``max_features`` best by score are kept.
- **matcher** ``model(kpts_a, desc_a, kpts_b, desc_b)``: tensors with a batch axis of 1 (``[1, N, 2]``,
  ``[1, N, D]``), keypoints in pixels; returns matches ``[M, 2]`` (indices into a and b; a leading batch axis
  is accepted), or a tuple / dict whose first item / ``matches`` key is that.

Geometric verification, storage and resume work the same as with SIFT.

**Giant images** (the match op's ``tile_above``): a learned matcher's memory grows with the keypoints it sees
(attention over all of them), and a tiled image has ``max_features`` per tile. Such pairs are matched tile
against tile (:func:`tiled_matches`): each call sees the keypoints one tile owns on each side, in that tile's
pixel coordinates, and the matches are mapped back to the full images' keypoints.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from daskmv.errors import RowError


def _first(out: Any, key: str, index: int = 0) -> Any:
    if isinstance(out, dict):
        return out.get(key)
    if isinstance(out, (tuple, list)):
        return out[index] if len(out) > index else None
    return out if index == 0 else None


def _squeeze(t: Any) -> np.ndarray:
    arr = t.detach().float().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)
    return arr[0] if arr.ndim >= 2 and arr.shape[0] == 1 and arr.ndim > 2 else arr


class LearnedExtractor:
    """Calls a learned extractor on a gray uint8 image; returns COLMAP-layout keypoints and descriptors."""

    def __init__(self, model: str, device: str, max_features: int) -> None:
        from daskmv.ops.torch_model import load_torch_model

        self.net = load_torch_model(model, None, {}, device)
        self.device, self.max_features = device, max_features

    def __call__(self, gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(gray)).to(self.device).float().div(255.0)[None, None]
        with torch.inference_mode():
            out = self.net(x)
        kpts, desc = _squeeze(_first(out, "keypoints", 0)), _squeeze(_first(out, "descriptors", 1))
        scores = _first(out, "scores", 2)
        if kpts is None or desc is None or kpts.ndim != 2 or kpts.shape[1] != 2 or len(desc) != len(kpts):
            raise RowError("the extractor model must return keypoints [N, 2] and descriptors [N, D] "
                           f"(got {getattr(kpts, 'shape', None)} and {getattr(desc, 'shape', None)})")
        if scores is not None and len(kpts) > self.max_features:
            keep = np.argsort(-_squeeze(scores).reshape(-1))[: self.max_features]
            kpts, desc = kpts[keep], desc[keep]
        n = len(kpts)
        layout = np.zeros((n, 6), np.float32)
        layout[:, :2] = kpts + 0.5  # COLMAP puts pixel centres at +0.5
        layout[:, 2] = layout[:, 5] = 1.0
        return layout, np.ascontiguousarray(desc, dtype=np.float32)


class LearnedMatcher:
    """Calls a learned matcher on two images' features; returns matches [M, 2] uint32."""

    def __init__(self, model: str, device: str) -> None:
        from daskmv.ops.torch_model import load_torch_model

        self.net = load_torch_model(model, None, {}, device)
        self.device = device

    def __call__(self, kpts_a: np.ndarray, desc_a: np.ndarray, kpts_b: np.ndarray, desc_b: np.ndarray) -> np.ndarray:
        import torch

        def t(a: np.ndarray) -> Any:
            return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(self.device)[None]

        with torch.inference_mode():
            out = self.net(t(kpts_a[:, :2] - 0.5), t(desc_a), t(kpts_b[:, :2] - 0.5), t(desc_b))
        matches = _first(out, "matches", 0)
        arr = matches.detach().cpu().numpy() if hasattr(matches, "detach") else np.asarray(matches)
        if arr.ndim == 3 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != 2 or arr.shape[1] != 2:
            raise RowError(f"the matcher model must return matches [M, 2], got shape {arr.shape}")
        arr = arr.astype(np.int64)
        ok = (arr[:, 0] >= 0) & (arr[:, 0] < len(kpts_a)) & (arr[:, 1] >= 0) & (arr[:, 1] < len(kpts_b))
        if not ok.all():
            raise RowError(f"the matcher model returned {int((~ok).sum())} match indices out of range")
        return arr.astype(np.uint32)


def tiled_matches(matcher: Any, kpts_a: np.ndarray, desc_a: np.ndarray, size_a: tuple[int, int], kpts_b: np.ndarray,
                  desc_b: np.ndarray, size_b: tuple[int, int], tile_size: int, overlap: int) -> np.ndarray:
    """Matches [M, 2] of two images' full-image features, made by ``matcher`` (a :class:`LearnedMatcher`)
    on every pair of tiles (the features op's tiling of each image; a keypoint belongs to the tile that owns
    its position). A keypoint matched in several tile pairs keeps the match of the tile pair with the most
    matches: the pair that overlaps most gave the network the most context."""
    from daskmv.sfm.features import owned, tiles

    def members(kpts: np.ndarray, size: tuple[int, int]) -> list[tuple[np.ndarray, np.ndarray]]:
        out = []
        for x0, y0, _, _, part in tiles(size[0], size[1], tile_size, overlap):
            index = np.flatnonzero(owned(kpts, part))
            if len(index):
                local = kpts[index].copy()
                local[:, 0] -= x0
                local[:, 1] -= y0
                out.append((index, local))
        return out

    found, weight = [], []
    tiles_b = members(kpts_b, size_b)
    for index_a, local_a in members(kpts_a, size_a):
        for index_b, local_b in tiles_b:
            m = matcher(local_a, desc_a[index_a], local_b, desc_b[index_b]).astype(np.int64)
            if len(m):
                found.append(np.stack([index_a[m[:, 0]], index_b[m[:, 1]]], axis=1))
                weight.append(np.full(len(m), len(m)))
    if not found:
        return np.zeros((0, 2), np.uint32)
    pairs = np.concatenate(found)[np.argsort(-np.concatenate(weight), kind="stable")]  # best tile pairs first
    for side in (0, 1):  # each keypoint of a once, then each of b: its first (best) match; the order is kept
        pairs = pairs[np.sort(np.unique(pairs[:, side], return_index=True)[1])]
    return pairs[np.argsort(pairs[:, 0], kind="stable")].astype(np.uint32)
