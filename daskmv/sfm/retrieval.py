"""``global_descriptor``: one short vector per image, so that pairs can be chosen by nearest neighbours.

Exhaustive matching costs N(N-1)/2 pairs per scene; with each image's ``k`` nearest neighbours by a global
descriptor (the ``pairs`` step's ``retrieval`` mode, or ``sequential`` with loop closures) it costs about
N k. The default descriptor is VLAD over the image's own SIFT descriptors: residuals to 64 visual words,
intra-normalised, signed square root, L2-normalised, then projected to ``dim`` dimensions by a fixed random
Gaussian matrix (distances are kept within a few per cent, the column stays small: 4 KB an image, not 32).
The projection is what costs retrieval most: on two 100-view loops, the share of a view's 5 nearest that
are true neighbours (within 3 steps) is 0.85/0.76 at 256 dimensions, 0.93/0.87 at 1,024 (the default) and
0.96/0.90 with the whole 8,192. The words ship with daskmv
(``vocab_sift64.npy``, k-means over RootSIFT descriptors of the synthetic rooms in
:mod:`daskmv.sfm.synthetic`; rebuild with ``python -m daskmv.sfm.retrieval``) or come from the user's own
images (``vocabulary: words.npy``). A torch model's embedding can be used instead (``model``).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np

from daskmv.errors import PipelineError
from daskmv.ops.base import Op, Output, Param, Row
from daskmv.ops.registry import register_op

VOCABULARY = os.path.join(os.path.dirname(__file__), "vocab_sift64.npy")
#: Numbers kept of the VLAD by default (see the module's docstring for what fewer cost).
DIM = 1024


@functools.lru_cache(maxsize=4)
def _words(path: str) -> np.ndarray:
    words = np.load(path).astype(np.float32)
    if words.ndim != 2:
        raise PipelineError(f"vocabulary {path} must be a [words, descriptor] array, not {words.shape}")
    return words / np.maximum(np.linalg.norm(words, axis=1, keepdims=True), 1e-12)


@functools.lru_cache(maxsize=4)
def _projection(n_in: int, n_out: int, seed: int = 0) -> np.ndarray:
    """A fixed Johnson-Lindenstrauss projection (Gaussian, not orthogonalised: a QR of 8,192 x 1,024 took
    1.7 s in each worker, for the same retrieval)."""
    gauss = np.random.default_rng(seed).standard_normal((n_in, n_out), dtype=np.float32)
    return gauss / np.float32(np.sqrt(n_out))


def vlad(descriptors: np.ndarray, words: np.ndarray, dim: int | None = DIM) -> np.ndarray:
    """The VLAD vector of one image's descriptors (unit length; projected to ``dim`` when given)."""
    d = descriptors.astype(np.float32)
    d /= np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
    k, width = words.shape
    out = np.zeros((k, width), np.float32)
    if len(d):
        nearest = np.argmax(d @ words.T, axis=1)
        assignment = np.zeros((len(d), k), np.float32)  # residual sums as one product: 3x faster than add.at
        assignment[np.arange(len(d)), nearest] = 1.0
        out = assignment.T @ d - np.bincount(nearest, minlength=k)[:, None].astype(np.float32) * words
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)  # intra-normalisation
    v = out.ravel()
    v = np.sign(v) * np.sqrt(np.abs(v))
    v /= max(float(np.linalg.norm(v)), 1e-12)
    if dim:
        v = v @ _projection(len(v), dim)
        v /= max(float(np.linalg.norm(v)), 1e-12)
    return v.astype(np.float32)


@register_op
class GlobalDescriptor(Op):
    name = "global_descriptor"
    help = "A short vector per image (VLAD over its SIFT descriptors, or a torch model's embedding) for retrieval pairs."
    params = {
        "vocabulary": Param(None, "visual words [K, 128] (.npy); default: the words shipped with daskmv", path=True,
                            types=(str, type(None))),
        "dim": Param(DIM, "length of the stored vector (a fixed random projection of the VLAD; 0: all of it, "
                     "words x 128)"),
        "model": Param(None, "a torch embedding model instead (TorchScript file or module:factory; RGB [1,3,S,S] "
                       "in [0,1] -> a vector)", path=True, types=(str, type(None))),
        "size": Param(224, "model: input side in pixels"),
    }

    def check_params(self) -> None:
        c = self.config
        if c["dim"] < 0:
            raise PipelineError(f"op 'global_descriptor': dim must be 0 (the whole VLAD) or more, not {c['dim']}")
        if c["model"]:
            from daskmv.ops.torch_model import check_model

            c["model"], _ = check_model(self.name, c["model"], None)
        path = c["vocabulary"] or VOCABULARY
        if not os.path.isfile(path):
            raise PipelineError(f"op 'global_descriptor': vocabulary file not found: {path}")
        self.net: Any = None
        self.device = "cpu"

    def input_names(self) -> tuple[str, ...]:
        return ("image",) if self.config["model"] else ("descriptors",)

    def output_specs(self) -> tuple[Output, ...]:
        return (Output("global", "column", "float32[]", "the image's global descriptor (unit length)"),)

    def setup(self, device: str) -> None:
        self.device = device
        if self.config["model"]:
            from daskmv.ops.torch_model import load_torch_model

            self.net = load_torch_model(self.config["model"], None, {}, device)

    def process(self, rows: list[Row]) -> list[Row | BaseException]:
        if self.net is not None:
            return [{"global": self._embed(row["image"])} for row in rows]
        words = _words(self.config["vocabulary"] or VOCABULARY)
        return [{"global": vlad(row["descriptors"], words, self.config["dim"])} for row in rows]

    def _embed(self, image: np.ndarray) -> np.ndarray:
        import cv2
        import torch

        s = self.config["size"]
        x = cv2.resize(image, (s, s), interpolation=cv2.INTER_AREA)
        t = torch.from_numpy(x).to(self.device).permute(2, 0, 1)[None].float().div(255.0)
        with torch.inference_mode():
            v = self.net(t)
        v = v.detach().float().cpu().numpy().ravel()
        return v / max(float(np.linalg.norm(v)), 1e-12)


def build_vocabulary(descriptors: np.ndarray, k: int = 64, seed: int = 0, iterations: int = 25) -> np.ndarray:
    """k-means words of (RootSIFT) descriptors, k-means++ seeded: the vocabulary file's content."""
    rng = np.random.default_rng(seed)
    x = descriptors.astype(np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d2 = np.min(((x[:, None, :] - np.array(centres)[None]) ** 2).sum(-1), axis=1)
        centres.append(x[rng.choice(len(x), p=d2 / d2.sum())])
    c = np.array(centres)
    for _ in range(iterations):
        assign = np.argmax(x @ c.T, axis=1)
        for j in range(k):
            members = x[assign == j]
            if len(members):
                c[j] = members.mean(axis=0)
        c /= np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    return c.astype(np.float32)


def main() -> None:
    """Rebuild the shipped vocabulary from synthetic rooms (deterministic)."""
    from daskmv.sfm.features import PEAK_THRESHOLD, Extractor, colmap_grey
    from daskmv.sfm.synthetic import orbit, render, room

    extractor = Extractor("pycolmap", 2048, PEAK_THRESHOLD, False)
    parts = []
    for seed in range(100, 106):
        for cam in orbit(3, seed=seed):
            image, _ = render(room(seed), cam)
            parts.append(extractor(colmap_grey(image))[1])
    sample = np.concatenate(parts)
    sample = sample[np.random.default_rng(0).choice(len(sample), min(len(sample), 20000), replace=False)]
    np.save(VOCABULARY, build_vocabulary(sample).astype(np.float16))
    print(f"wrote {VOCABULARY} from {len(sample)} descriptors")


if __name__ == "__main__":
    main()
