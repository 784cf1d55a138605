"""A video kept open between micro-batches: the ``frame`` op's reader for the rows of a frame manifest.

A frame manifest's rows of one video arrive in order, a micro-batch at a time. Opening the file and seeking for
each batch would decode from the keyframe before it every time (a whole GOP, up to hundreds of frames, per
32 rows); a cursor decodes forward through the file once, across batches, and seeks only to jump more than
:data:`JUMP` frames ahead or to go back.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from daskmv.errors import RowError

#: Seek (restart from the keyframe before the wanted frame) rather than decode forward past this many frames.
JUMP = 32


class FrameCursor:
    """Frames of one video by index, read forward; ``read`` takes ascending indices."""

    def __init__(self, url: str, backend: str = "auto", size: tuple[int, int] | None = None) -> None:
        from daskmv.video.decode import probe

        self.url, self.backend, self.size = url, backend, size
        self.info = probe(url, backend=backend)
        self._frames: Iterator[Any] | None = None
        self._next = 0  # the index the open decoder yields next

    def read(self, indices: Sequence[int]) -> dict[int, np.ndarray]:
        """The frames at ``indices`` (RGB uint8), by index. A frame the file cannot give is a RowError."""
        out: dict[int, np.ndarray] = {}
        for index in sorted(set(int(i) for i in indices)):
            if not 0 <= index < self.info.n_frames:
                raise RowError(f"frame {index} is not in the video ({self.info.n_frames} frames)")
            if self._frames is None or index < self._next or index - self._next > JUMP:
                self._restart(index)
            while True:
                chunk = next(self._frames, None)  # type: ignore[arg-type]
                if chunk is None:
                    raise RowError(f"frame {index}: the video ended at frame {self._next} (truncated or corrupt)")
                got = int(chunk.indices[0])
                self._next = got + 1
                if got == index:
                    out[index] = chunk.frames[0]
                    break
        return out

    def _restart(self, index: int) -> None:
        from daskmv.video.decode import read_frames

        self.close()
        self._frames = read_frames(self.url, np.arange(index, self.info.n_frames), chunk=1, backend=self.backend,
                                   size=self.size, info=self.info)
        self._next = index

    def close(self) -> None:
        frames, self._frames = self._frames, None
        close = getattr(frames, "close", None)
        if close is not None:
            close()
