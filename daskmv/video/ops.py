"""Video ops: ``video`` (rows are videos: the ops after it run on every sampled frame) and ``frame`` (one
decoded frame per row of a frame manifest), and the ``frames`` pipeline that makes such a manifest.

Two shapes of output, both through the engine:

- **per video**: ``video`` is a *frame source* (:attr:`Op.frame_source`). The engine decodes each video row's
  sampled frames in chunks and feeds them to the ops after it in micro-batches (their input ``image`` is the
  frame), with the out-of-memory back-off rows get; their outputs are stacked along a leading time axis, so a
  tracker's output is one ``[T, ...]`` array per video. Decoding runs one chunk ahead on a loader thread.
- **per frame**: the ``frames`` pipeline is ``video`` alone (frame indices and timestamps, no decoding), an
  ``explode`` into one row per sampled frame (``video_id``, ``frame_index``, ``timestamp``), then ``frame``,
  which decodes each frame row's picture. A video's frames stay in one task, in order, so ``frame`` decodes
  forward through the file once instead of seeking for every frame.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from daskmv.errors import PipelineError, RowError
from daskmv.ops.base import Op, Output, Param, Row
from daskmv.ops.core import parse_size
from daskmv.ops.registry import register_op, register_pipeline

NUMBER = (int, float, type(None))
SAMPLING_PARAMS = {
    "fps": Param(None, "frames per second to keep: the first frame at or after each 1/fps step (none: every frame)",
                 types=NUMBER),
    "stride": Param(1, "keep every stride-th frame (not with fps)"),
    "start": Param(None, "skip frames before this many seconds", types=NUMBER),
    "end": Param(None, "skip frames from this many seconds on", types=NUMBER),
    "max_frames": Param(None, "keep at most this many frames (the first ones sampled)", types=(int, type(None))),
}
BACKENDS = ("auto", "pyav", "opencv")


def _sampling(op: Op) -> Any:
    from daskmv.video.decode import Sampling

    try:
        return Sampling.from_params(op.config)
    except ValueError as exc:
        raise PipelineError(f"op {op.name!r}: {exc}") from None


@register_op
class Video(Op):
    name = "video"
    help = ("Rows are videos: sample frames (fps, stride, start/end, max_frames), decode them in chunks, and run the "
            "ops after this one on every frame (input image); their outputs are stacked per video along time.")
    inputs = ("url",)
    frame_source = True
    min_partition_rows = 1
    params = {
        **SAMPLING_PARAMS,
        "chunk": Param(32, "frames decoded at a time; two chunks are in memory at most"),
        "size": Param(None, "resize frames to this size when decoding: an int or [width, height] (none: as stored)",
                      types=(int, list, tuple, type(None))),
        "backend": Param("auto", "decoder: PyAV (FFmpeg), or OpenCV", BACKENDS),
    }
    outputs = (
        Output("frame_index", "column", "int64[]", "the sampled frames' indices in the video (presentation order)"),
        Output("timestamp", "column", "float64[]", "the sampled frames' times in seconds from the first frame"),
        Output("n_frames", "column", "int64", "frames sampled"),
        Output("video_frames", "column", "int64", "frames the video holds"),
        Output("video_fps", "column", "float64", "the video's average frame rate"),
        Output("video_width", "column", "int64", "stored frame width"),
        Output("video_height", "column", "int64", "stored frame height"),
        Output("duration", "column", "float64", "seconds"),
    )

    def check_params(self) -> None:
        self.sampling = _sampling(self)
        if self.config["chunk"] < 1:
            raise PipelineError(f"op 'video': chunk must be at least 1, not {self.config['chunk']}")
        self.size = _frame_size(self)

    def open_frames(self, row: Row) -> tuple[Row, Iterator[list[Row]]]:
        from daskmv.video.decode import probe, read_frames, select_frames

        url = row["url"]
        info = probe(url, backend=self.config["backend"])
        indices = select_frames(info, self.sampling)
        if len(indices) == 0:
            raise RowError(f"no frames sampled: the video has {info.n_frames} frame(s) over {info.duration:.3f} s "
                           f"and the sampling asks for {_describe(self.config)}")
        outputs = {"frame_index": indices.astype(np.int64), "timestamp": info.timestamps[indices],
                   "n_frames": len(indices), "video_frames": info.n_frames, "video_fps": info.fps,
                   "video_width": info.width, "video_height": info.height, "duration": info.duration}
        chunks = read_frames(url, indices, chunk=self.config["chunk"], backend=self.config["backend"],
                             size=self.size, info=info)
        return outputs, _frame_rows(chunks, info)

    def process(self, rows: list[Row]) -> list[Row | BaseException]:
        """The source alone (what ``open_frames`` says without decoding): for callers outside the engine."""
        out: list[Row | BaseException] = []
        for row in rows:
            try:
                outputs, chunks = self.open_frames(row)
                chunks.close()  # type: ignore[attr-defined]
                out.append(outputs)
            except RowError as exc:
                out.append(exc)
        return out

    def gallery(self, row: Row) -> list[tuple[str, Any]]:
        from daskmv.video.strip import frame_strip

        strip = frame_strip(row)
        return [("frames", strip)] if strip is not None else []


def _frame_rows(chunks: Iterator[Any], info: Any) -> Iterator[list[Row]]:
    """Chunks of decoded frames as chunks of frame rows (the inputs the ops after a frame source read)."""
    try:
        for chunk in chunks:
            yield [{"image": frame, "frame_index": int(index), "timestamp": float(stamp),
                    "image_info": {"width": frame.shape[1], "height": frame.shape[0], "channels": 3,
                                   "dtype": "uint8", "format": info.codec}}
                   for index, stamp, frame in zip(chunk.indices, chunk.timestamps, chunk.frames)]
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


def _describe(config: dict[str, Any]) -> str:
    """The sampling parameters set away from their defaults (an error message says what was asked)."""
    given = {k: config[k] for k, spec in SAMPLING_PARAMS.items() if config.get(k) != spec.default}
    return ", ".join(f"{k}={v}" for k, v in given.items()) or "every frame"


def _frame_size(op: Op) -> tuple[int, int] | None:
    """An op's ``size`` parameter as (width, height), written back normalised (None: frames as stored)."""
    size = op.config["size"]
    if size is None:
        return None
    parsed = parse_size(size, op.name)
    op.config["size"] = list(parsed)
    return parsed


@register_op
class Frame(Op):
    name = "frame"
    help = ("One frame per row: decode frame `frame_index` of the row's video (a frame manifest's row); a task's "
            "rows of one video are decoded in one forward pass.")
    inputs = ("url", "frame_index")
    params = {
        "size": Param(None, "resize to this size: an int or [width, height] (none: as stored)",
                      types=(int, list, tuple, type(None))),
        "backend": Param("auto", "decoder: PyAV (FFmpeg), or OpenCV", BACKENDS),
    }
    outputs = (Output("frame", "array", "uint8", "the decoded frame, RGB [H, W, 3]"),)

    def check_params(self) -> None:
        self.size = _frame_size(self)
        self._local = threading.local()

    def row_bytes(self) -> int:
        width, height = self.size or (1280, 720)
        return width * height * 3

    def process(self, rows: list[Row]) -> list[Row | BaseException]:
        out: list[Row | BaseException] = []
        start = 0
        while start < len(rows):  # runs of rows of one video, each read in one forward pass
            end = start + 1
            while end < len(rows) and rows[end]["url"] == rows[start]["url"]:
                end += 1
            out += self._run(rows[start:end])
            start = end
        return out

    def _run(self, rows: list[Row]) -> list[Row | BaseException]:
        try:
            wanted = [int(row["frame_index"]) for row in rows]
        except (TypeError, ValueError):
            return [RowError(f"frame_index {row['frame_index']!r} is not a frame number") for row in rows]
        cursor = self._cursor(rows[0]["url"])
        total = cursor.info.n_frames
        inside = [index for index in wanted if 0 <= index < total]
        try:
            frames = cursor.read(inside)
        except RowError as exc:
            self._drop()
            return [exc] * len(rows)
        return [{"frame": frames[index]} if index in frames else
                RowError(f"frame {index} is not in the video ({total} frames)") for index in wanted]

    def _cursor(self, url: str) -> Any:
        """This thread's open video: kept between micro-batches of one video, replaced by the next video."""
        from daskmv.video.cursor import FrameCursor

        held = getattr(self._local, "cursor", None)
        if held is not None and held.url == url:
            return held
        self._drop()
        self._local.cursor = FrameCursor(url, backend=self.config["backend"], size=self.size)
        return self._local.cursor

    def _drop(self) -> None:
        held = getattr(self._local, "cursor", None)
        self._local.cursor = None
        if held is not None:
            held.close()


register_pipeline("frames", [
    {"op": "video", "params": {}},
    {"op": "explode", "params": {"column": ["frame_index", "timestamp"], "prefix": "f", "parent_column": "video_id"}},
    {"op": "frame", "params": {}},
])
