"""Probing video files, choosing frames and decoding just those, a chunk at a time.

A frame's *index* is its 0-based position in presentation order among the frames the file holds. It is
counted from the packets, not from the container's claim: :func:`probe` demuxes the video stream without
decoding (fast, even for 10,000-frame files), sorts the packets' presentation timestamps, and the k-th of
them is frame k. :func:`select_frames` turns a :class:`Sampling` (a rate, a stride, a time window, a cap)
into indices, a pure function of those timestamps. :func:`read_frames` decodes sequentially and yields the
wanted frames in :class:`FrameChunk` s of at most ``chunk`` frames, so a long video is never held whole in
memory; to reach a frame far ahead it seeks to the keyframe before it and recognises every decoded frame by
its pts, so indices stay exact after a seek (a seek that lands wrong is retried from an earlier keyframe,
and in the end from the start of the file).

PyAV (FFmpeg) is the default backend; OpenCV's ``VideoCapture`` is the fallback where PyAV is not installed
(local files only; it counts frames by grabbing them, which decodes). Remote URLs are read through fsspec.
Everything wrong with a file is a :class:`~daskmv.errors.RowError` whose message says what: not found,
empty, not a video, no video stream, truncated or corrupt.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import cv2
import fsspec
import numpy as np
from fsspec.core import split_protocol

from daskmv.errors import InputReadError, RowError

BACKENDS = ("auto", "pyav", "opencv")

#: Seek instead of decoding forward when the keyframe before the next wanted frame is at least this many
#: frames ahead of the decoder: a seek flushes the decoder's threads, a few frames' worth of decoding.
SEEK_MIN_GAP = 32
#: A seek that lands after the wanted frame (or whose decoder drops it) is retried from this many earlier
#: keyframes, one at a time, before decoding from the start of the file instead.
SEEK_TRIES = 3
#: Sampling counts a frame within this many seconds of a boundary or target time as at it: Matroska stores
#: milliseconds, so a 29.97 fps frame at 33.367 ms reads 33 ms, and sampling at 29.97 fps must still keep it.
TIME_TOLERANCE = 1e-3
#: Packets the decoder may refuse in one read (each is noted; decoding goes on with the next packet).
DECODE_ERRORS = 64
#: Decoded frames whose pts no packet has, before the first placed frame, that make the reader count frames
#: from the start instead of placing them by pts.
STRAYS = 8


@dataclass(frozen=True)
class Sampling:
    """Which frames of a video to use; applied by :func:`select_frames` in this order: the window
    (``start``/``end``), then ``fps`` or ``stride``, then ``max_frames``.

    ``fps``: a target rate: for each target time ``t_k = t0 + k / fps`` (``t0`` is ``start``, or 0) the first
    frame whose timestamp is at or after ``t_k`` is kept, never the same frame twice (so a rate above the
    video's keeps every frame once). ``None``: every frame. ``stride``: every stride-th frame of the window
    (not with ``fps``). ``start``/``end``: seconds from the video's first frame; frames before ``start`` and at
    or after ``end`` are skipped. ``max_frames``: at most this many, the first ones selected.
    """

    fps: float | None = None
    stride: int = 1
    start: float | None = None
    end: float | None = None
    max_frames: int | None = None

    def check(self) -> None:
        """Raise ValueError, with a one-line message, for values that select nothing sensible."""
        if self.fps is not None and not (math.isfinite(self.fps) and self.fps > 0):
            raise ValueError(f"sampling: fps must be a positive number of frames per second, got {self.fps}")
        if self.stride < 1:
            raise ValueError(f"sampling: stride must be >= 1, got {self.stride}")
        if self.fps is not None and self.stride > 1:
            raise ValueError(f"sampling: give fps or stride, not both (fps={self.fps}, stride={self.stride})")
        for name in ("start", "end"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"sampling: {name} must be seconds >= 0, got {value}")
        if self.end is not None and self.end <= (self.start or 0.0):
            raise ValueError(f"sampling: end ({self.end} s) must be after start ({self.start or 0.0} s)")
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"sampling: max_frames must be >= 1, got {self.max_frames}")

    @classmethod
    def from_params(cls, params: dict) -> Sampling:
        """From an op's config: the keys fps, stride, start, end and max_frames where present (others are
        ignored; a missing or None value takes the default). Numbers given as strings are converted."""
        kinds: dict[str, type] = {"fps": float, "stride": int, "start": float, "end": float, "max_frames": int}
        values: dict[str, Any] = {}
        for key, kind in kinds.items():
            value = params.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
                raise ValueError(f"sampling: {key} must be {'an integer' if kind is int else 'a number'}, "
                                 f"got {value!r}")
            try:
                values[key] = kind(value)
            except (TypeError, ValueError):
                raise ValueError(f"sampling: {key} must be {'an integer' if kind is int else 'a number'}, "
                                 f"got {value!r}") from None
        sampling = cls(**values)
        sampling.check()
        return sampling


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe` found. ``n_frames`` counts the video stream's packets (not the container's claim);
    ``timestamps`` are their presentation times in seconds from the first frame, sorted; ``duration`` is the
    last timestamp plus one frame period; ``fps`` the average rate. ``codec`` is FFmpeg's decoder name with
    PyAV ("mpeg4", "h264") and the FourCC with OpenCV ("fmp4", "avc1")."""

    url: str
    backend: str
    width: int
    height: int
    fps: float
    n_frames: int
    duration: float
    codec: str
    timestamps: np.ndarray


@dataclass
class FrameChunk:
    """Consecutive wanted frames: their indices, timestamps (seconds) and RGB pixels ``[n, H, W, 3]``."""

    indices: np.ndarray
    timestamps: np.ndarray
    frames: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)


def probe(url: str, backend: str = "auto") -> VideoInfo:
    """Size, rate, codec and every frame's timestamp, from the packets alone (PyAV: no decoding).

    The OpenCV backend cannot demux: it grabs (decodes) every frame to count them, reading each one's
    timestamp from ``CAP_PROP_POS_MSEC``. Anything wrong with the file is a RowError."""
    if _backend(backend) == "pyav":
        return _probe_av(url)
    return _probe_cv(url)


def select_frames(info: VideoInfo, sampling: Sampling) -> np.ndarray:
    """The indices (int64, ascending) of the frames ``sampling`` keeps, from ``info.timestamps`` alone; a
    timestamp within ``TIME_TOLERANCE`` of a boundary or target time counts as at it."""
    sampling.check()
    ts = np.asarray(info.timestamps, dtype=np.float64)
    keep = np.ones(len(ts), dtype=bool)
    if sampling.start is not None:
        keep &= ts >= sampling.start - TIME_TOLERANCE
    if sampling.end is not None:
        keep &= ts < sampling.end - TIME_TOLERANCE
    candidates = np.flatnonzero(keep).astype(np.int64)
    if sampling.fps is not None and len(candidates):
        t0 = sampling.start or 0.0
        cand_ts = ts[candidates]
        n_targets = int(math.floor((cand_ts[-1] + TIME_TOLERANCE - t0) * sampling.fps)) + 1
        targets = t0 + np.arange(max(n_targets, 0), dtype=np.float64) / sampling.fps
        at = np.searchsorted(cand_ts, targets - TIME_TOLERANCE, side="left")
        candidates = candidates[np.unique(at[at < len(candidates)])]
    elif sampling.stride > 1:
        candidates = candidates[:: sampling.stride]
    if sampling.max_frames is not None:
        candidates = candidates[: sampling.max_frames]
    return candidates


def read_frames(url: str, indices: Sequence[int] | np.ndarray, chunk: int = 16, backend: str = "auto",
                size: tuple[int, int] | None = None, *, info: VideoInfo | None = None) -> Iterator[FrameChunk]:
    """The frames at ``indices`` (sorted, duplicates dropped), decoded in order and yielded in chunks of at
    most ``chunk``, RGB uint8, resized to ``size=(width, height)`` (area averaging) if given.

    The file is opened and demuxed now (PyAV: the packets' pts map decoded frames to indices; OpenCV: a
    probe, unless ``info`` is given), so a bad file raises its RowError here and an index outside
    ``[0, n_frames)`` a ValueError, ``n_frames`` being ``info``'s when given (a :func:`probe` of ``url``).
    Decoding happens as the chunks are consumed, and a wanted frame the file cannot produce (truncated or
    corrupt, or cut short since ``info`` was probed) is a RowError then, never a short result. Only the
    current chunk is held; the container is closed when the iterator ends or is dropped. A remote file is
    read twice with PyAV (demux, then decode).
    """
    name = _backend(backend)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if size is not None and (len(size) != 2 or min(int(size[0]), int(size[1])) < 1):
        raise ValueError(f"size must be (width, height) in pixels, got {size!r}")
    wanted = np.asarray(indices)
    if wanted.size and not np.issubdtype(wanted.dtype, np.integer):
        raise ValueError(f"frame indices must be integers, got dtype {wanted.dtype}")
    wanted = np.unique(wanted.astype(np.int64).ravel())
    if not wanted.size:
        return (chunk for chunk in ())  # a generator all the same: it has close()
    info = info if info is not None and info.url == url else None
    if name == "pyav":
        index, _ = _packet_index(url)
        n_frames = info.n_frames if info is not None else index.n
    else:
        info = info if info is not None else _probe_cv(url)
        n_frames = info.n_frames
    if wanted[0] < 0 or wanted[-1] >= n_frames:
        bad = wanted[0] if wanted[0] < 0 else wanted[-1]
        raise ValueError(f"frame index {bad} out of range: {url} has {n_frames} frames")
    size = None if size is None else (int(size[0]), int(size[1]))
    if name == "pyav":
        return _read_av(url, index, wanted, chunk, size)
    return _read_cv(url, info, wanted, chunk, size)


# ---------------------------------------------------------------------------------------------------------
# Opening files: the error messages


def _backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if backend == "opencv":
        return "opencv"
    if _av() is not None:
        return "pyav"
    if backend == "pyav":
        raise ImportError("the 'pyav' video backend needs PyAV: pip install av")
    return "opencv"


def _av() -> Any:
    try:
        import av
    except ImportError:
        return None
    return av


def _local_path(url: str) -> str | None:
    protocol, path = split_protocol(url)
    return path if protocol in (None, "file", "local") else None


def _os_error(url: str, exc: OSError) -> Exception:
    """A RowError for what is wrong with the file, an InputReadError for a failure that is the machine's."""
    from daskmv.ops.base import ROW_ERRNOS  # here, not at the top: daskmv.ops may import this module

    if isinstance(exc, FileNotFoundError):
        return RowError(f"file not found: {url}")
    if isinstance(exc, (IsADirectoryError, NotADirectoryError)):
        return RowError(f"not a file but a directory: {url}")
    if isinstance(exc, PermissionError):
        return RowError(f"permission denied: {url}")
    if exc.errno in ROW_ERRNOS:
        return RowError(f"cannot read {url}: {exc}")
    return InputReadError(exc.errno, f"cannot read {url}: {exc}")


def _head(fh: Any, url: str) -> bytes:
    """The file's first bytes (it is left at its start); an empty file is a RowError."""
    try:
        head = fh.read(16)
        fh.seek(0)
    except OSError as exc:
        raise _os_error(url, exc) from exc
    if not head:
        raise RowError(f"empty file (0 bytes): {url}")
    return head


def _container_kind(head: bytes) -> str | None:
    """The container format the first bytes announce (None: not a video container we know)."""
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip", b"pnot"):
        return "mp4/mov"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska/webm"
    if head[:3] == b"FLV":
        return "flv"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:4] in (b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3"):
        return "mpeg"
    if head[:4] == b"\x30\x26\xb2\x75":
        return "asf/wmv"
    return None


def _cannot_open(url: str, head: bytes, why: str) -> RowError:
    """FFmpeg's open failed: a file that starts like a video container is truncated or corrupt (an mp4 cut
    short loses its index, the moov atom, which is written last), anything else is not a video."""
    kind = _container_kind(head)
    if kind is None:
        return RowError(f"not a video ({why}): {url}")
    hint = "; an mp4 cut short loses its index (moov atom), written at its end" if kind == "mp4/mov" else ""
    return RowError(f"truncated or corrupt: cannot open the {kind} container ({why}{hint}): {url}")


def _open_av(stack: ExitStack, url: str) -> tuple[Any, Any]:
    """Open ``url`` with PyAV inside ``stack``: (container, its first video stream)."""
    av = _av()
    local = _local_path(url)
    try:
        if local is not None:
            with open(local, "rb") as fh:
                head = _head(fh, url)
            source: Any = local
        else:
            source = stack.enter_context(fsspec.open(url, "rb"))
            head = _head(source, url)
    except OSError as exc:
        raise _os_error(url, exc) from exc
    try:
        container = av.open(source, "r")
    except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        raise _os_error(url, exc) from exc
    except av.FFmpegError as exc:
        raise _cannot_open(url, head, f"FFmpeg: {exc.strerror or exc}") from None
    stack.enter_context(container)
    if not container.streams.video:
        others = ", ".join(sorted({s.type for s in container.streams})) or "no streams"
        raise RowError(f"no video stream (audio only?): {url} (streams: {others})")
    return container, container.streams.video[0]


# ---------------------------------------------------------------------------------------------------------
# PyAV


@dataclass
class _PacketIndex:
    """The video stream's packets, sorted by pts: frame k has pts ``pts[k]``. ``pts`` is None when the
    packets carry no usable pts (then frames are counted as decoded, and never sought)."""

    n: int
    pts: np.ndarray | None
    keyframes: np.ndarray  # frame indices of keyframe packets, ascending
    time_base: Any
    timestamps: np.ndarray | None = None  # seconds from the first frame, when pts is known

    def __post_init__(self) -> None:
        self.lookup = {} if self.pts is None else {p: k for k, p in enumerate(self.pts.tolist())}
        if self.pts is not None and self.timestamps is None:
            num, den = self.time_base.numerator, self.time_base.denominator
            self.timestamps = ((self.pts - self.pts[0]) * num) / den if self.n else np.zeros(0)

    @property
    def can_seek(self) -> bool:
        return self.pts is not None and len(self.keyframes) > 1

    def keyframe_before(self, index: int, back: int = 0) -> int | None:
        """The ``back``-th keyframe before the last one at or before ``index`` (None: there is none)."""
        at = int(np.searchsorted(self.keyframes, index, side="right")) - 1 - back
        return int(self.keyframes[at]) if at >= 0 else None


def _demux(container: Any, stream: Any) -> _PacketIndex | None:
    """The packet index from demuxing (no decoding); None when the packets' pts cannot place the frames
    (some have none, or two share one)."""
    av = _av()
    pts: list[int] = []
    keys: list[int] = []
    try:
        for packet in container.demux(stream):
            if packet.size == 0 or packet.is_discard or packet.is_corrupt:
                continue  # flush packets; frames the decoder drops; the partial last packet of a cut file
            if packet.pts is None:
                return None
            pts.append(packet.pts)
            if packet.is_keyframe:
                keys.append(packet.pts)
    except av.FFmpegError:
        pass  # a truncated file: the packets read so far are the frames it holds
    if len(set(pts)) != len(pts):
        return None
    order = np.sort(np.asarray(pts, dtype=np.int64))
    keyframes = np.unique(np.searchsorted(order, np.asarray(keys, dtype=np.int64)).astype(np.int64))
    return _PacketIndex(n=len(order), pts=order, keyframes=keyframes, time_base=stream.time_base)


def _decoded_index(url: str) -> _PacketIndex:
    """The slow way, for packets without pts: decode every frame, timing it by ``frame.time`` (or the
    nominal rate where frames carry no time either)."""
    with ExitStack() as stack:
        container, stream = _open_decoder(stack, url)
        rate = stream.average_rate or stream.guessed_rate or 25
        times = [frame.time for frame in _decoded(container, stream, [])]
        time_base = stream.time_base
    if times and all(t is not None for t in times) and len(set(times)) == len(times):
        ts = np.sort(np.asarray(times, dtype=np.float64))
        ts -= ts[0]
    else:
        ts = np.arange(len(times), dtype=np.float64) / float(rate)
    return _PacketIndex(n=len(times), pts=None, keyframes=np.zeros(0, np.int64), time_base=time_base,
                        timestamps=ts)


def _packet_index(url: str) -> tuple[_PacketIndex, dict[str, Any]]:
    """The packet index and the stream's size, codec and rate, from one opening of the file."""
    with ExitStack() as stack:
        container, stream = _open_av(stack, url)
        ctx = stream.codec_context
        meta = {"width": int(ctx.width or 0), "height": int(ctx.height or 0), "codec": ctx.name or "",
                "rate": stream.average_rate or stream.guessed_rate}
        index = _demux(container, stream)
    if index is None:
        index = _decoded_index(url)
    if index.n == 0:
        raise RowError(f"truncated or corrupt: the video stream holds no frames: {url}")
    return index, meta


def _probe_av(url: str) -> VideoInfo:
    index, meta = _packet_index(url)
    ts, rate = index.timestamps, meta["rate"]
    fps = float(rate) if rate else (index.n - 1) / ts[-1] if index.n > 1 and ts[-1] > 0 else 0.0
    duration = float(ts[-1]) + (1.0 / fps if fps > 0 else 0.0)
    return VideoInfo(url=url, backend="pyav", width=meta["width"], height=meta["height"], fps=fps,
                     n_frames=index.n, duration=duration, codec=meta["codec"], timestamps=ts)


def _seek(container: Any, stream: Any, pts: int) -> None:
    """Position the demuxer on the keyframe at or before ``pts`` (the decoder's buffers are flushed)."""
    container.seek(int(pts), stream=stream, backward=True, any_frame=False)


class _Chunks:
    """Fills one chunk array at a time, sized for what is left to read."""

    def __init__(self, total: int, chunk: int, size: tuple[int, int] | None, timestamps: np.ndarray,
                 url: str) -> None:
        self.left, self.chunk, self.size, self.timestamps, self.url = total, chunk, size, timestamps, url
        self.indices: list[int] = []
        self.frames: np.ndarray | None = None

    def add(self, index: int, rgb: np.ndarray) -> FrameChunk | None:
        if self.size is not None and (rgb.shape[1], rgb.shape[0]) != self.size:
            rgb = cv2.resize(rgb, self.size, interpolation=cv2.INTER_AREA)
        if self.frames is None:
            self.frames = np.empty((min(self.chunk, self.left),) + rgb.shape, dtype=np.uint8)
        elif rgb.shape != self.frames.shape[1:]:
            raise RowError(f"frame size changes mid-stream ({self.frames.shape[2]}x{self.frames.shape[1]} to "
                           f"{rgb.shape[1]}x{rgb.shape[0]} at frame {index}); read with size= to resize "
                           f"every frame: {self.url}")
        self.frames[len(self.indices)] = rgb
        self.indices.append(index)
        if len(self.indices) < len(self.frames):
            return None
        out = FrameChunk(indices=np.asarray(self.indices, dtype=np.int64),
                         timestamps=np.asarray(self.timestamps[self.indices], dtype=np.float64), frames=self.frames)
        self.left -= len(self.indices)
        self.indices, self.frames = [], None
        return out


def _missing(url: str, done: int, total: int, last: int, target: int, why: str = "") -> RowError:
    last_text = f"last index {last}" if last >= 0 else "no frame decoded"
    return RowError(f"truncated or corrupt: decoded {done} of the {total} frames asked for, {last_text}; "
                    f"frame {target} cannot be decoded{f' ({why})' if why else ''}: {url}")


def _decoded(container: Any, stream: Any, errors: list[str]) -> Iterator[Any]:
    """The stream's frames; a packet the decoder refuses (damaged, or cut short) is noted in ``errors`` and
    decoding goes on with the next one, up to ``DECODE_ERRORS`` of them."""
    av = _av()
    while True:
        try:
            yield from container.decode(stream)
            return
        except av.FFmpegError as exc:
            errors.append(f"FFmpeg: {exc.strerror or exc}")
            if len(errors) > DECODE_ERRORS:
                return


def _read_av(url: str, index: _PacketIndex, wanted: np.ndarray, chunk: int,
             size: tuple[int, int] | None) -> Iterator[FrameChunk]:
    """Decode forward, converting only the wanted frames; seek to the keyframe before a wanted frame that
    is far ahead. Every decoded frame is placed by its pts, so a seek that lands elsewhere than asked is
    noticed: landing after the wanted frame (or a decoder that drops frames after a seek) retries from an
    earlier keyframe, and after ``SEEK_TRIES`` of those from the start of the file. Frames whose pts the
    packets do not have (a damaged packet's) are passed over; if no decoded frame matches the packets' pts
    at all, frames are counted from the start instead."""
    chunks = _Chunks(len(wanted), chunk, size, index.timestamps, url)
    by_pts, can_seek = index.pts is not None, index.can_seek
    pos, last, tries, strays = 0, -1, 0, 0
    errors: list[str] = []
    stack = ExitStack()
    try:
        container, stream = _open_decoder(stack, url)
        next_index: int | None = 0  # the index of the next frame the decoder gives (None: unknown, after a seek)
        sought = restart = False  # after a seek, a missing frame is retried; from the start, it is an error
        while pos < len(wanted):
            target = int(wanted[pos])
            key = index.keyframe_before(target, back=tries) if can_seek else None
            if restart or (can_seek and (tries > SEEK_TRIES or (tries and key is None))):
                stack.close()  # seeking does not work on this file: decode from its start
                stack = ExitStack()
                container, stream = _open_decoder(stack, url)
                next_index, sought, restart, can_seek = 0, False, False, False
            elif key is not None and (tries or next_index is None or key - next_index >= SEEK_MIN_GAP):
                _seek(container, stream, index.pts[key])
                next_index, sought = None, True
            for frame in _decoded(container, stream, errors):
                if by_pts and frame.pts is not None:
                    at = index.lookup.get(frame.pts)
                    if at is None:  # a frame the packets do not hold
                        strays += 1
                        if strays > STRAYS and last < 0:  # none does: the pts are not the packets' pts
                            by_pts, restart = False, True
                            break
                        continue
                elif next_index is None:  # after a seek, a frame without pts cannot be placed
                    restart = True
                    break
                else:
                    at = next_index
                if at > target:  # the target was not decoded
                    if not sought:
                        raise _missing(url, pos, len(wanted), last, target, errors[-1] if errors else
                                       "the decoder skipped it")
                    tries += 1
                    break
                next_index, last = at + 1, at
                if at < target:
                    continue
                done = chunks.add(at, frame.to_ndarray(format="rgb24"))
                pos, tries = pos + 1, 0
                if done is not None:
                    yield done
                if pos == len(wanted):
                    break
                target = int(wanted[pos])
                key = index.keyframe_before(target) if can_seek else None
                if key is not None and key - next_index >= SEEK_MIN_GAP:
                    break
            else:
                raise _missing(url, pos, len(wanted), last, target, errors[-1] if errors else
                               "the file ends before it")
    finally:
        stack.close()


def _open_decoder(stack: ExitStack, url: str) -> tuple[Any, Any]:
    container, stream = _open_av(stack, url)
    stream.thread_type = "AUTO"  # frame threads: several times faster for long-GOP codecs
    return container, stream


# ---------------------------------------------------------------------------------------------------------
# OpenCV


def _open_cv(url: str) -> Any:
    local = _local_path(url)
    if local is None:
        raise RowError(f"the OpenCV video backend reads local files only (use backend='pyav'): {url}")
    try:
        with open(local, "rb") as fh:
            head = _head(fh, url)
    except OSError as exc:
        raise _os_error(url, exc) from exc
    cap = cv2.VideoCapture(local, cv2.CAP_FFMPEG)
    if not cap.isOpened():
        cap.release()
        kind = _container_kind(head)
        if kind is None:
            raise RowError(f"not a video (OpenCV cannot open it): {url}")
        raise RowError(f"no video stream, or truncated or corrupt (OpenCV cannot open this {kind} file): {url}")
    return cap


def _probe_cv(url: str) -> VideoInfo:
    cap = _open_cv(url)
    try:
        width, height = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        fourcc = int(cap.get(cv2.CAP_PROP_FOURCC))
        codec = "".join(chr((fourcc >> 8 * k) & 0xFF) for k in range(4)).strip("\x00 ").lower()
        msec: list[float] = []
        while cap.grab():
            msec.append(cap.get(cv2.CAP_PROP_POS_MSEC))
    finally:
        cap.release()
    if not msec:
        raise RowError(f"truncated or corrupt: OpenCV decodes no frame: {url}")
    ts = np.asarray(msec, dtype=np.float64) / 1000.0
    ts -= ts[0]
    if len(ts) > 1 and not np.all(np.diff(ts) > 0):  # no usable timestamps: the nominal rate
        ts = np.arange(len(ts), dtype=np.float64) / (fps or 25.0)
    if fps <= 0 and len(ts) > 1:
        fps = (len(ts) - 1) / ts[-1]
    duration = float(ts[-1]) + (1.0 / fps if fps > 0 else 0.0)
    return VideoInfo(url=url, backend="opencv", width=width, height=height, fps=fps, n_frames=len(ts),
                     duration=duration, codec=codec, timestamps=ts)


def _read_cv(url: str, info: VideoInfo, wanted: np.ndarray, chunk: int,
             size: tuple[int, int] | None) -> Iterator[FrameChunk]:
    """Grab forward to each wanted frame; seek with ``CAP_PROP_POS_FRAMES`` when it is far ahead, checking
    where the seek landed by the frame's timestamp (a wrong landing: decode from the start instead)."""
    chunks = _Chunks(len(wanted), chunk, size, info.timestamps, url)
    period = 1.0 / info.fps if info.fps > 0 else 0.0
    can_seek = period > 0
    cap = None
    try:
        cap, t0 = _first_frame_cv(url)
        next_index, pos = 1, 0  # frame 0 is grabbed: retrieve() gives the last frame grabbed
        while pos < len(wanted):
            target = int(wanted[pos])
            if can_seek and target - next_index >= SEEK_MIN_GAP:
                cap.set(cv2.CAP_PROP_POS_FRAMES, target)
                landed = cap.grab()
                seconds = cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0 - t0
                if not landed or abs(seconds - info.timestamps[target]) > period / 2:
                    cap.release()  # landed elsewhere: grab every frame from the start instead
                    cap, t0 = _first_frame_cv(url)
                    next_index, can_seek = 1, False
                    continue
                next_index = target + 1
            while next_index <= target:
                if not cap.grab():
                    raise _missing(url, pos, len(wanted), next_index - 1, target, "the file ends before it")
                next_index += 1
            ok, bgr = cap.retrieve()
            if not ok or bgr is None:
                raise _missing(url, pos, len(wanted), target - 1, target, "OpenCV cannot decode it")
            done = chunks.add(target, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
            pos += 1
            if done is not None:
                yield done
    finally:
        if cap is not None:
            cap.release()


def _first_frame_cv(url: str) -> tuple[Any, float]:
    """A capture with frame 0 grabbed, and frame 0's ``CAP_PROP_POS_MSEC`` in seconds."""
    cap = _open_cv(url)
    if not cap.grab():
        cap.release()
        raise RowError(f"truncated or corrupt: OpenCV decodes no frame: {url}")
    return cap, cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
