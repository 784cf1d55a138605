"""Videos whose pixels say which frame they are, for tests, benchmarks and the demo.

Frame k carries k as 16 bits drawn as a row of 16 blocks across the top half of the frame (white 1, black
0, most significant bit first), big enough to survive lossy compression: :func:`frame_index_of` reads it
back by thresholding each block's mean, so a test can check that a decoder gave exactly the frames asked
for, after seeks too. The bottom half is a smooth gradient that drifts with k (something for a model to
look at), deterministic like the rest: :func:`expected_frame` is the frame as written, before compression.
"""

from __future__ import annotations

import os
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import numpy as np

BITS = 16
#: Encoder settings that keep the index blocks crisp (and the files small enough).
_CODEC_OPTIONS = {
    "mpeg4": {"qmin": "2", "qmax": "3"},
    "mjpeg": {"qmin": "2", "qmax": "3"},
    "libx264": {"crf": "20", "preset": "veryfast"},
}
#: Pixel formats other than yuv420p: FFmpeg's MJPEG encoder wants full-range ("J") YUV.
_PIX_FMT = {"mjpeg": "yuvj420p"}


def expected_frame(index: int, size: tuple[int, int], pattern: str = "index") -> np.ndarray:
    """The RGB uint8 frame ``[height, width, 3]`` written for ``index`` (``pattern="gradient"``: no index
    blocks, the gradient over the whole frame)."""
    width, height = size
    x, y = _axes(width, height)
    phase = index / 60.0

    def wave(at: np.ndarray, mean: float, amplitude: float) -> np.ndarray:
        return np.rint(mean + amplitude * np.sin(2 * np.pi * at)).astype(np.uint8)

    # separable (red along x, green along y, blue their sum): a few 1-D sines per frame, fast to make
    frame = np.empty((height, width, 3), dtype=np.uint8)
    frame[..., 0] = wave(x + phase, 128, 96)[None, :]
    frame[..., 1] = wave(y + 0.7 * phase, 128, 96)[:, None]
    np.add(wave(y + 0.25, 56, 40)[:, None], wave(x - 0.3 * phase, 72, 56)[None, :], out=frame[..., 2])
    if pattern == "index":
        top = height // 2
        for bit, (x0, x1) in enumerate(_blocks(width)):
            frame[:top, x0:x1] = 255 if (index >> (BITS - 1 - bit)) & 1 else 0
    elif pattern != "gradient":
        raise ValueError(f"unknown pattern {pattern!r}: use 'index' or 'gradient'")
    return frame


def frame_index_of(frame: np.ndarray) -> int:
    """The index a decoded RGB frame (of any size) carries; ValueError if a block is neither clearly white
    nor clearly black (not one of these frames, or damaged)."""
    height, width = frame.shape[:2]
    band = frame[height // 8 : max(height // 8 + 1, 3 * height // 8)].astype(np.float32).mean(axis=2)
    value = 0
    for bit, (x0, x1) in enumerate(_blocks(width)):
        inset = (x1 - x0) // 4
        mean = float(band[:, x0 + inset : max(x0 + inset + 1, x1 - inset)].mean())
        if 64 < mean < 192:
            raise ValueError(f"no readable frame index: block {bit} has mean {mean:.0f}, neither black nor white")
        value = (value << 1) | (mean >= 128)
    return value


def write_video(path: str, n_frames: int, size: tuple[int, int] = (160, 120), fps: float = 25.0,
                codec: str = "mpeg4", gop: int = 12, pattern: str = "index") -> str:
    """Encode frames 0 .. n_frames-1 to ``path`` (the container from its extension: .mp4, .avi, .mkv, ...),
    yuv420p, a keyframe every ``gop`` frames; returns ``path``. Frame k has pts k at ``1/fps``."""
    import av

    width, height = size
    if not 1 <= n_frames <= 2**BITS:
        raise ValueError(f"n_frames must be 1 .. {2**BITS} (the index has {BITS} bits), got {n_frames}")
    if width < 2 * BITS or height < 8 or width % 2 or height % 2:
        raise ValueError(f"size must be even, at least {2 * BITS}x8, got {width}x{height}")
    rate = Fraction(fps).limit_denominator(100_000)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate, options=dict(_CODEC_OPTIONS.get(codec, {})))
        stream.width, stream.height = width, height
        stream.pix_fmt = _PIX_FMT.get(codec, "yuv420p")
        stream.codec_context.gop_size = gop
        stream.codec_context.time_base = 1 / rate
        for index in range(n_frames):
            frame = av.VideoFrame.from_ndarray(expected_frame(index, size, pattern), format="rgb24")
            frame.pts, frame.time_base = index, 1 / rate
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return str(path)


@lru_cache(maxsize=16)
def _axes(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(width) / width, np.arange(height) / height


@lru_cache(maxsize=16)
def _blocks(width: int) -> tuple[tuple[int, int], ...]:
    """The column span of each bit's block."""
    edges = [round(b * width / BITS) for b in range(BITS + 1)]
    return tuple(zip(edges[:-1], edges[1:]))


def main(argv: list[str] | None = None) -> None:
    """``python -m daskmv.video.synthetic FOLDER [--videos N] [--frames F] [--size WxH] [--fps R]``: videos
    and their manifest ``videos.csv`` (id, path relative to FOLDER)."""
    import argparse
    import csv

    ap = argparse.ArgumentParser(description="Write synthetic videos whose frames encode their index, and videos.csv.")
    ap.add_argument("folder")
    ap.add_argument("--videos", type=int, default=4)
    ap.add_argument("--frames", type=int, default=250)
    ap.add_argument("--size", default="160x120", help="WIDTHxHEIGHT, both even")
    ap.add_argument("--fps", type=float, default=25.0)
    ap.add_argument("--codec", default="mpeg4", help="mpeg4, libx264, mjpeg, ffv1, ...")
    ap.add_argument("--gop", type=int, default=12, help="frames between keyframes")
    ap.add_argument("--ext", default="mp4", help="container: mp4, mkv, avi, mov")
    ap.add_argument("--broken", action="store_true", help="also list a text file named .mp4 (a row error)")
    args = ap.parse_args(argv)
    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        ap.error(f"--size must be WIDTHxHEIGHT, got {args.size!r}")
    folder = Path(args.folder)
    (folder / "videos").mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(args.videos):
        path = folder / "videos" / f"video_{k:04d}.{args.ext}"
        write_video(str(path), args.frames, (width, height), args.fps, args.codec, args.gop)
        rows.append({"id": f"video_{k:04d}", "path": os.path.relpath(path, folder)})
    if args.broken:
        path = folder / "videos" / "not_a_video.mp4"
        path.write_text("this file is text, not a video\n")
        rows.append({"id": "not_a_video", "path": os.path.relpath(path, folder)})
    manifest = folder / "videos.csv"
    with open(manifest, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["id", "path"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.videos} videos of {args.frames} frames ({width}x{height}, {args.fps:g} fps, {args.codec})"
          f"{' and a broken file' if args.broken else ''} and {manifest}")


if __name__ == "__main__":
    main()
