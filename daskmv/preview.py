"""``daskmv preview OUT``: one PNG contact sheet of sampled rows, to judge a run's results at a glance.

Each sheet row is one manifest row (sampled with a seed, like the report's gallery): its input image,
then what each op shows for it (:meth:`~daskmv.ops.base.Op.gallery`: for relight the mask, foreground,
albedo, degraded foreground and output). Columns are labelled; each row starts with its id.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from daskmv.errors import StoreError
from daskmv.report import RunFacts, _ops, row_images, sample_ok_rows, to_display

PREVIEW = "preview.png"
LABEL_WIDTH = 180
HEADER = 28
BACKDROP = (32, 32, 32)


def contact_sheet(root: str, n: int = 16, seed: int = 0, out: str | None = None, tile: int = 192,
                  storage_options: dict[str, Any] | None = None) -> str:
    """Write the contact sheet (default ``ROOT/preview.png``) and return its path; ``storage_options``
    open a remote root."""
    facts = RunFacts.read(root, storage_options)
    ok, picks = sample_ok_rows(facts, n, seed)
    if not len(picks):
        raise StoreError(f"{root} has no finished rows to preview")
    ops = _ops(facts)
    rows = [(str(ok.iloc[int(i)]["id"]), row_images(facts, ok.iloc[int(i)], ops)) for i in picks]
    labels: list[str] = []
    for _, images in rows:
        labels += [label for label, _ in images if label not in labels]
    sheet = np.full((HEADER + len(rows) * (tile + 4), LABEL_WIDTH + len(labels) * (tile + 4), 3), BACKDROP, np.uint8)
    for c, label in enumerate(labels):
        _text(sheet, label, (LABEL_WIDTH + c * (tile + 4) + 4, HEADER - 9))
    for r, (row_id, images) in enumerate(rows):
        top = HEADER + r * (tile + 4)
        _text(sheet, row_id[:24], (6, top + tile // 2), scale=0.42)
        for label, image in images:
            left = LABEL_WIDTH + labels.index(label) * (tile + 4)
            _paste(sheet, _fit(to_display(image), tile), top, left, tile)
    path = out or facts.store.url(PREVIEW)
    ok_write, data = cv2.imencode(".png", cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    if out:
        with open(out, "wb") as fh:
            fh.write(data.tobytes())
    else:
        facts.store.write_bytes(PREVIEW, data.tobytes())
    return path


def _fit(image: np.ndarray, tile: int) -> np.ndarray:
    h, w = image.shape[:2]
    scale = tile / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


def _paste(sheet: np.ndarray, image: np.ndarray, top: int, left: int, tile: int) -> None:
    h, w = image.shape[:2]
    y, x = top + (tile - h) // 2, left + (tile - w) // 2
    sheet[y : y + h, x : x + w] = image


def _text(sheet: np.ndarray, text: str, origin: tuple[int, int], scale: float = 0.5) -> None:
    cv2.putText(sheet, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (230, 230, 230), 1, cv2.LINE_AA)
