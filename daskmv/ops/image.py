"""Reading and decoding image files once per row, for every op of a pipeline.

The engine's loader calls :func:`load_inputs` on a prefetch thread; OpenCV releases the GIL while it
decodes, so several rows decode in parallel with the ops running on the task's thread. Every failure
here is a :class:`~daskmv.errors.RowError` with a message that says what was wrong with the file.
"""

from __future__ import annotations

from typing import Any

import cv2
import fsspec
import numpy as np
from fsspec.core import split_protocol

from daskmv.errors import InputReadError, RowError
from daskmv.ops.base import ROW_ERRNOS

_CV2_THREADS_SET = False


def single_threaded_cv2_in_workers() -> None:
    """``cv2.setNumThreads(1)`` in a Dask worker process, once: one decode or kernel per thread, the
    parallelism coming from the loader threads and the worker processes (OpenCV's own pool of a thread per
    core in every worker would oversubscribe the cores). OpenCV's thread count is global to the process, so
    it is left alone anywhere else: a notebook that imports daskmv, or runs partitions in-process, keeps
    its own setting."""
    global _CV2_THREADS_SET
    if not _CV2_THREADS_SET:
        _CV2_THREADS_SET = True
        if _in_worker_process():
            cv2.setNumThreads(1)


def _in_worker_process() -> bool:
    """A process that exists to be a Dask worker: a nanny's worker process, or ``dask worker --no-nanny``."""
    import multiprocessing
    import os
    import sys

    if multiprocessing.current_process().name == "Dask Worker process (from Nanny)":
        return True
    main_module = getattr(getattr(sys.modules.get("__main__"), "__spec__", None), "name", None) or ""
    script = os.path.basename(sys.argv[0]) if sys.argv else ""
    return main_module.startswith("distributed.cli") or script in ("dask", "dask-worker")

_MAGIC = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF8", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"RIFF", "webp"),
)


def read_bytes(url: str) -> bytes:
    """The file's content; a missing, unreadable or empty file is a RowError, any other I/O failure an
    :class:`~daskmv.errors.InputReadError` (the partition is retried)."""
    protocol, local = split_protocol(url)
    try:
        if protocol in (None, "file", "local"):
            with open(local, "rb") as fh:
                data = fh.read()
        else:
            with fsspec.open(url, "rb") as fh:
                data = fh.read()
    except FileNotFoundError:
        raise RowError(f"file not found: {url}") from None
    except (IsADirectoryError, NotADirectoryError):
        raise RowError(f"not a file but a directory: {url}") from None
    except PermissionError:
        raise RowError(f"permission denied: {url}") from None
    except OSError as exc:
        if exc.errno in ROW_ERRNOS:
            raise RowError(f"cannot read {url}: {exc}") from None
        # EIO, ESTALE, a timeout or a dropped connection: the machine's fault, not the file's
        raise InputReadError(exc.errno, f"cannot read {url}: {exc}") from exc
    if not data:
        raise RowError(f"empty file (0 bytes): {url}")
    return data


def sniff_format(data: bytes) -> str:
    """The image format from the file's first bytes ('unknown' if none matches)."""
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    return "unknown"


#: Reduced decoding: 1/2, 1/4 or 1/8 of each side (``--decode-scale``), libjpeg's DCT scaling for JPEGs.
DECODE_SCALES = (1, 2, 4, 8)
_REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


def decode_image(data: bytes, url: str = "", scale: int = 1) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode to RGB uint8 ``[H, W, 3]`` plus what the file held (width, height, channels, dtype, format).

    Gray images are repeated to three channels, alpha is dropped, 16-bit values are scaled to 8 bits
    (rounded). Bytes that are not an image are a RowError. ``scale`` > 1 decodes at 1/scale of each side
    (rounded up): JPEGs through libjpeg's reduced DCT, several times faster; other formats are decoded
    whole and shrunk by area averaging. ``image_info`` still describes the file.
    """
    fmt = sniff_format(data)
    if scale > 1 and fmt == "jpeg":
        return _decode_reduced_jpeg(data, url, scale)
    raw = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if raw is None or raw.size == 0:
        hint = "" if fmt == "unknown" else f" (looks like {fmt}, probably truncated or corrupt)"
        raise RowError(f"cannot decode image{hint}: {url}")
    channels = 1 if raw.ndim == 2 else raw.shape[2]
    info = {
        "width": int(raw.shape[1]),
        "height": int(raw.shape[0]),
        "channels": int(channels),
        "dtype": str(raw.dtype),
        "format": fmt,
    }
    image = to_rgb8(raw)
    if scale > 1:
        image = shrink(image, scale)
        info["scale"] = scale
    return image, info


def shrink(image: np.ndarray, scale: int) -> np.ndarray:
    """Each ``scale`` x ``scale`` block averaged, the last partial blocks edge-padded (as JPEG pads them)."""
    h, w = image.shape[:2]
    hs, ws = -(-h // scale), -(-w // scale)
    padded = cv2.copyMakeBorder(image, 0, hs * scale - h, 0, ws * scale - w, cv2.BORDER_REPLICATE)
    return cv2.resize(padded, (ws, hs), interpolation=cv2.INTER_AREA)


def _decode_reduced_jpeg(data: bytes, url: str, scale: int) -> tuple[np.ndarray, dict[str, Any]]:
    header = jpeg_header(data)
    flags = _REDUCED[scale] | cv2.IMREAD_IGNORE_ORIENTATION  # like the full decode: pixels as stored
    raw = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if raw is None or raw.size == 0 or header is None:
        raise RowError(f"cannot decode image (looks like jpeg, probably truncated or corrupt): {url}")
    width, height, channels, bits = header
    info = {"width": width, "height": height, "channels": channels, "dtype": "uint8" if bits <= 8 else "uint16",
            "format": "jpeg", "scale": scale}
    return cv2.cvtColor(raw, cv2.COLOR_BGR2RGB), info


def jpeg_header(data: bytes) -> tuple[int, int, int, int] | None:
    """(width, height, components, bits per sample) from a JPEG's start-of-frame marker, without decoding."""
    i, n = 2, len(data)
    while i + 9 < n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            bits, height, width, comps = data[i + 4], int.from_bytes(data[i + 5 : i + 7], "big"), \
                int.from_bytes(data[i + 7 : i + 9], "big"), data[i + 9]
            return width, height, comps, bits
        i += 2 + length
    return None


def to_rgb8(raw: np.ndarray) -> np.ndarray:
    """OpenCV's decoded array (gray, BGR or BGRA; 8, 16-bit or float) as RGB uint8."""
    if raw.dtype == np.uint16:
        raw = ((raw.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif raw.dtype != np.uint8:
        scaled = np.clip(raw.astype(np.float32), 0.0, 1.0 if raw.dtype.kind == "f" else 255.0)
        raw = (scaled * (255.0 if raw.dtype.kind == "f" else 1.0) + 0.5).astype(np.uint8)
    if raw.ndim == 2:
        return cv2.cvtColor(raw, cv2.COLOR_GRAY2RGB)
    if raw.shape[2] == 1:
        return cv2.cvtColor(raw[:, :, 0], cv2.COLOR_GRAY2RGB)
    if raw.shape[2] == 4:
        return cv2.cvtColor(raw, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(raw, cv2.COLOR_BGR2RGB)


def load_inputs(url: str, wanted: frozenset[str], scale: int = 1) -> dict[str, Any]:
    """Make the loader inputs an op asked for (``url``, ``bytes``, ``image``, ``image_info``);
    ``scale`` > 1 decodes images reduced (see :func:`decode_image`)."""
    single_threaded_cv2_in_workers()
    out: dict[str, Any] = {"url": url}
    if not wanted & {"bytes", "image", "image_info"}:
        return out
    data = read_bytes(url)
    if "bytes" in wanted:
        out["bytes"] = data
    if wanted & {"image", "image_info"}:
        out["image"], out["image_info"] = decode_image(data, url, scale)
    return out
