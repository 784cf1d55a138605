"""Gaussians as the standard 3DGS ``.ply`` (what the original code writes and splat viewers read).

One binary little-endian vertex per Gaussian with float properties, in this order: ``x y z``, ``nx ny nz``
(zeros), ``f_dc_0..2`` (degree-0 SH per colour), ``f_rest_*`` (the higher SH bands, colour-major: all of red's
coefficients, then green's, then blue's), ``opacity`` (a logit), ``scale_0..2`` (logs) and ``rot_0..3`` (a
quaternion w, x, y, z, not necessarily normalised).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Gaussians:
    means: np.ndarray  # [N, 3]
    sh: np.ndarray  # [N, K, 3] SH coefficients (K = (degree + 1)^2)
    opacity_logits: np.ndarray  # [N]
    log_scales: np.ndarray  # [N, 3]
    quats: np.ndarray  # [N, 4] w, x, y, z

    def __len__(self) -> int:
        return len(self.means)


def _names(k: int) -> list[str]:
    rest = [f"f_rest_{i}" for i in range(3 * (k - 1))]
    return (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", *rest, "opacity",
             "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])


def write_ply(path: str, g: Gaussians) -> str:
    """Write ``g`` to ``path`` as a 3DGS PLY; returns ``path``."""
    n, k = g.sh.shape[0], g.sh.shape[1]
    rest = np.transpose(g.sh[:, 1:, :], (0, 2, 1)).reshape(n, -1)  # colour-major, as 3DGS stores it
    columns = [g.means, np.zeros((n, 3)), g.sh[:, 0, :], rest, g.opacity_logits.reshape(n, 1), g.log_scales, g.quats]
    data = np.concatenate([np.asarray(c, dtype=np.float32).reshape(n, -1) for c in columns], axis=1)
    names = _names(k)
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {n}",
              *[f"property float {name}" for name in names], "end_header"]
    with open(path, "wb") as fh:
        fh.write(("\n".join(header) + "\n").encode("ascii"))
        fh.write(np.ascontiguousarray(data, dtype="<f4").tobytes())
    return path


def read_ply(path: str) -> Gaussians:
    """Read a 3DGS PLY (binary little-endian, float properties) back."""
    with open(path, "rb") as fh:
        names, n = [], 0
        line = fh.readline().decode("ascii").strip()
        if line != "ply":
            raise ValueError(f"{path} is not a PLY file")
        while True:
            line = fh.readline().decode("ascii").strip()
            if line.startswith("format") and "binary_little_endian" not in line:
                raise ValueError(f"{path}: only binary little-endian PLY files are read ({line})")
            if line.startswith("element vertex"):
                n = int(line.split()[-1])
            elif line.startswith("property"):
                kind, name = line.split()[1:3]
                if kind != "float":
                    raise ValueError(f"{path}: property {name} is {kind}, not float")
                names.append(name)
            elif line == "end_header":
                break
        data = np.frombuffer(fh.read(4 * n * len(names)), dtype="<f4").reshape(n, len(names))
    col = {name: data[:, i] for i, name in enumerate(names)}
    rest = sorted((name for name in names if name.startswith("f_rest_")), key=lambda s: int(s.rsplit("_", 1)[1]))
    k = 1 + len(rest) // 3
    sh = np.zeros((n, k, 3), dtype=np.float32)
    sh[:, 0, :] = np.stack([col[f"f_dc_{c}"] for c in range(3)], axis=1)
    if rest:
        sh[:, 1:, :] = np.stack([col[name] for name in rest], axis=1).reshape(n, 3, k - 1).transpose(0, 2, 1)
    return Gaussians(np.stack([col["x"], col["y"], col["z"]], 1), sh, col["opacity"].copy(),
                     np.stack([col[f"scale_{i}"] for i in range(3)], 1), np.stack([col[f"rot_{i}"] for i in range(4)], 1))
