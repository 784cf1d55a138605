"""Pictures of a training run for the report: the loss curve."""

from __future__ import annotations

import numpy as np


def curve_picture(curve: np.ndarray, size: tuple[int, int] = (320, 160)) -> np.ndarray:
    """The loss against the step (log scale), as an RGB picture."""
    import io

    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] / 80, size[1] / 80), dpi=80)
    ax = fig.subplots()
    ax.plot(curve[:, 0], curve[:, 1], color="#4c78a8", linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("step", fontsize=7)
    ax.set_ylabel("loss", fontsize=7)
    ax.tick_params(labelsize=6)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="raw", dpi=80)
    width, height = (int(v) for v in fig.canvas.get_width_height())
    return np.frombuffer(buf.getvalue(), dtype=np.uint8).reshape(height, width, 4)[:, :, :3].copy()
