"""Video probing, frame sampling and chunked decoding, on real files whose pixels encode their frame index."""

from __future__ import annotations

import csv
import math
import os
import tracemalloc
from pathlib import Path

import av
import cv2
import fsspec
import numpy as np
import pytest

from daskmv.errors import RowError
from daskmv.video import decode
from daskmv.video.decode import FrameChunk, Sampling, VideoInfo, probe, read_frames, select_frames
from daskmv.video.synthetic import expected_frame, frame_index_of, main, write_video

LONG_FRAMES, LONG_SIZE = 3000, (320, 240)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("videos")


@pytest.fixture(scope="module")
def short(folder: Path) -> str:
    """300 frames, 160x120, mpeg4 in mp4, 25 fps, a keyframe every 12 frames."""
    return write_video(str(folder / "short.mp4"), 300)


@pytest.fixture(scope="module")
def long(folder: Path) -> str:
    """3,000 frames of 320x240, gop 12: seeks far ahead, and the memory bound."""
    return write_video(str(folder / "long.mp4"), LONG_FRAMES, LONG_SIZE)


def decoded(chunks) -> tuple[list[int], list[int], list[np.ndarray]]:
    """(indices the chunks say, indices their pixels carry, frames)."""
    said, carried, frames = [], [], []
    for chunk in chunks:
        assert isinstance(chunk, FrameChunk)
        assert chunk.frames.dtype == np.uint8 and chunk.frames.ndim == 4 and chunk.frames.shape[3] == 3
        assert chunk.indices.dtype == np.int64 and chunk.timestamps.dtype == np.float64
        said += chunk.indices.tolist()
        carried += [frame_index_of(frame) for frame in chunk.frames]
        frames += list(chunk.frames)
    return said, carried, frames


def info_of(timestamps: np.ndarray, fps: float = 25.0) -> VideoInfo:
    return VideoInfo(url="x.mp4", backend="pyav", width=8, height=8, fps=fps, n_frames=len(timestamps),
                     duration=float(timestamps[-1]) + 1 / fps, codec="mpeg4", timestamps=timestamps)


# ------------------------------------------------------------------------------------------------ synthetic


def test_frame_index_round_trips_through_the_pattern() -> None:
    for index in (0, 1, 2, 255, 256, 4095, 12345, 65535):
        assert frame_index_of(expected_frame(index, (160, 120))) == index
        assert frame_index_of(expected_frame(index, (32, 16))) == index
    assert not np.array_equal(expected_frame(7, (64, 48)), expected_frame(8, (64, 48)))
    np.testing.assert_array_equal(expected_frame(7, (64, 48)), expected_frame(7, (64, 48)))
    with pytest.raises(ValueError, match="no readable frame index"):
        frame_index_of(np.full((48, 64, 3), 128, np.uint8))
    with pytest.raises(ValueError, match="n_frames"):
        write_video("never.mp4", 2**16 + 1)
    with pytest.raises(ValueError, match="even"):
        write_video("never.mp4", 3, size=(161, 120))


def test_main_writes_videos_and_a_manifest(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    main([str(tmp_path), "--videos", "2", "--frames", "5", "--size", "64x48", "--fps", "10"])
    assert "wrote 2 videos of 5 frames" in capsys.readouterr().out
    with open(tmp_path / "videos.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [row["id"] for row in rows] == ["video_0000", "video_0001"]
    for row in rows:
        assert not os.path.isabs(row["path"])
        info = probe(str(tmp_path / row["path"]))
        assert (info.n_frames, info.width, info.height, info.fps) == (5, 64, 48, 10.0)


# ------------------------------------------------------------------------------------------------ probe


def test_probe_counts_packets_and_times_frames(short: str) -> None:
    info = probe(short)
    assert (info.backend, info.codec, info.width, info.height, info.n_frames) == ("pyav", "mpeg4", 160, 120, 300)
    assert info.fps == 25.0 and info.url == short
    assert info.timestamps.dtype == np.float64 and info.timestamps.shape == (300,)
    np.testing.assert_allclose(info.timestamps, np.arange(300) / 25, rtol=0, atol=1e-9)
    assert info.duration == pytest.approx(12.0)


@pytest.mark.parametrize("ext", ["mkv", "avi"])
def test_probe_ntsc_rate_within_the_time_base(folder: Path, ext: str) -> None:
    path = write_video(str(folder / f"ntsc.{ext}"), 50, (64, 48), fps=30000 / 1001)
    info = probe(path)
    assert info.n_frames == 50 and info.fps == pytest.approx(30000 / 1001, rel=1e-6)
    # Matroska keeps milliseconds: timestamps are exact to half a tick of the time base
    atol = 0.5e-3 + 1e-9 if ext == "mkv" else 1e-9
    np.testing.assert_allclose(info.timestamps, np.arange(50) * 1001 / 30000, rtol=0, atol=atol)
    # sampling at the video's own rate keeps every frame, at half of it every other one, rounding or not
    assert select_frames(info, Sampling(fps=30000 / 1001)).tolist() == list(range(50))
    assert select_frames(info, Sampling(fps=15000 / 1001)).tolist() == list(range(0, 50, 2))
    assert select_frames(info, Sampling(fps=29.97)).tolist() == list(range(50))


def test_probe_opencv_agrees_with_pyav(short: str) -> None:
    ref, cv = probe(short), probe(short, backend="opencv")
    assert cv.backend == "opencv"
    assert (cv.width, cv.height, cv.n_frames, cv.fps) == (ref.width, ref.height, ref.n_frames, ref.fps)
    np.testing.assert_allclose(cv.timestamps, ref.timestamps, atol=1e-6)


# ------------------------------------------------------------------------------------------------ sampling


def first_at_or_after(timestamps: np.ndarray, targets: list[float]) -> list[int]:
    """The reference: for each target, the first frame at or after it; a frame two targets share, once."""
    out: list[int] = []
    for target in targets:
        later = [k for k in range(len(timestamps)) if timestamps[k] >= target - decode.TIME_TOLERANCE]
        if later and later[0] not in out:
            out.append(later[0])
    return out


def test_select_frames_fps_stride_window_and_cap() -> None:
    n = 100
    info = info_of(np.arange(n) / 25.0)

    def sel(**kw: object) -> list[int]:
        return select_frames(info, Sampling(**kw)).tolist()

    assert sel() == list(range(n))
    assert sel(fps=5) == list(range(0, n, 5))
    # at 7 fps: frame k (at k/25 s) is the first at or after j/7 when k = ceil(25 j / 7)
    assert sel(fps=7) == [-(-25 * j // 7) for j in range(n) if -(-25 * j // 7) < n]
    assert sel(fps=50) == list(range(n))  # above the video's rate: every frame, once
    assert sel(fps=25) == list(range(n))
    assert sel(stride=3) == list(range(0, n, 3))
    assert sel(start=1.0, end=2.0) == list(range(25, 50))
    assert sel(end=0.5) == list(range(0, 13))
    assert sel(start=3.9) == list(range(98, 100))  # 3.9 s is frame 97.5: the first at or after it is 98
    assert sel(start=1.0, end=2.0, stride=10) == [25, 35, 45]
    # the fps grid starts at `start`: targets 1.02 + j/5 s, i.e. frame 25.5 + 5 j, rounded up
    assert sel(start=1.02, fps=5) == list(range(26, n, 5))
    assert sel(fps=5, max_frames=3) == [0, 5, 10]
    assert sel(start=2.0, fps=2) == [50, 63, 75, 88]  # ceil(25 * (2 + j/2)) = 50, 62.5 -> 63, 75, 87.5 -> 88
    assert sel(start=1.0, end=1.5, max_frames=5) == [25, 26, 27, 28, 29]
    assert sel(start=10.0) == []
    assert select_frames(info, Sampling(fps=5)).dtype == np.int64


def test_select_frames_on_irregular_timestamps_matches_the_definition() -> None:
    rng = np.random.default_rng(3)
    timestamps = np.cumsum(np.r_[0.0, rng.uniform(0.01, 0.09, 199)])
    info = info_of(timestamps)
    for fps in (3.0, 7.5, 12.5, 40.0):
        targets = [j / fps for j in range(int(timestamps[-1] * fps) + 2)]
        assert select_frames(info, Sampling(fps=fps)).tolist() == first_at_or_after(timestamps, targets)
        start = 1.3
        targets = [start + j / fps for j in range(int(timestamps[-1] * fps) + 2)]
        got = select_frames(info, Sampling(fps=fps, start=start, end=5.0)).tolist()
        assert got == [k for k in first_at_or_after(timestamps, targets) if timestamps[k] < 5.0 - 1e-3]


def test_select_frames_on_a_probed_video(short: str) -> None:
    info = probe(short)
    assert select_frames(info, Sampling(fps=5)).tolist() == list(range(0, 300, 5))
    assert select_frames(info, Sampling(fps=7, max_frames=4)).tolist() == [0, 4, 8, 11]


def test_sampling_checks_and_params() -> None:
    for bad, message in [
        (dict(fps=0), "fps must be a positive"),
        (dict(fps=-2.0), "fps must be a positive"),
        (dict(fps=float("nan")), "fps must be a positive"),
        (dict(stride=0), "stride must be >= 1"),
        (dict(fps=5, stride=2), "fps or stride, not both"),
        (dict(start=2.0, end=1.0), "end .* must be after start"),
        (dict(start=1.0, end=1.0), "end .* must be after start"),
        (dict(start=-1.0), "start must be seconds >= 0"),
        (dict(max_frames=0), "max_frames must be >= 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            Sampling(**bad).check()
        with pytest.raises(ValueError, match=message):
            Sampling.from_params(bad)
        with pytest.raises(ValueError, match=message):
            select_frames(info_of(np.arange(10) / 25.0), Sampling(**bad))
    Sampling(fps=5, stride=1, start=0.5, end=2.0, max_frames=3).check()
    params = {"fps": "5", "start": 1, "max_frames": 10.0, "model": "x", "end": None}
    assert Sampling.from_params(params) == Sampling(fps=5.0, start=1.0, max_frames=10)
    assert Sampling.from_params({}) == Sampling()
    with pytest.raises(ValueError, match="stride must be an integer"):
        Sampling.from_params({"stride": 2.5})
    with pytest.raises(ValueError, match="fps must be a number"):
        Sampling.from_params({"fps": "fast"})


# ------------------------------------------------------------------------------------------------ reading


def test_read_frames_seeks_far_ahead_exactly(long: str, monkeypatch: pytest.MonkeyPatch) -> None:
    seeks: list[int] = []
    real_seek = decode._seek
    monkeypatch.setattr(decode, "_seek", lambda c, s, pts: (seeks.append(pts), real_seek(c, s, pts)))
    wanted = [3, 4, 900, 901, 1500]
    chunks = list(read_frames(long, wanted, chunk=2))
    said, carried, _ = decoded(chunks)
    assert said == carried == wanted
    assert [len(c) for c in chunks] == [2, 2, 1]
    np.testing.assert_allclose(np.concatenate([c.timestamps for c in chunks]), np.array(wanted) / 25, atol=1e-9)
    assert len(seeks) == 2  # to the keyframes before 900 and 1500
    seeks.clear()
    assert decoded(read_frames(long, [LONG_FRAMES - 1]))[1] == [LONG_FRAMES - 1] and len(seeks) == 1


@pytest.mark.parametrize("gap", [1, 10**9], ids=["seek-always", "seek-never"])
def test_read_frames_exact_however_it_seeks(long: str, monkeypatch: pytest.MonkeyPatch, gap: int) -> None:
    monkeypatch.setattr(decode, "SEEK_MIN_GAP", gap)
    wanted = sorted({0, 11, 12, 13, 35, 36, 600, 2999, *np.random.default_rng(5).integers(0, 3000, 20).tolist()})
    said, carried, _ = decoded(read_frames(long, wanted, chunk=5))
    assert said == carried == wanted


@pytest.mark.parametrize("off", [2, -100], ids=["lands-late", "lands-early"])
def test_read_frames_exact_when_a_seek_lands_elsewhere(short: str, monkeypatch: pytest.MonkeyPatch, off: int) -> None:
    """A demuxer that lands a few keyframes late (or early) than asked: frames are placed by pts, a late
    landing is retried from earlier keyframes, and the indices stay exact."""
    step = int(np.diff(decode._packet_index(short)[0].pts[:2])[0])  # pts per frame
    real_seek = decode._seek
    monkeypatch.setattr(decode, "_seek", lambda c, s, pts: real_seek(c, s, max(0, pts + off * 12 * step)))
    monkeypatch.setattr(decode, "SEEK_MIN_GAP", 4)
    wanted = [2, 3, 100, 101, 180, 250, 299]
    said, carried, _ = decoded(read_frames(short, wanted, chunk=3))
    assert said == carried == wanted


@pytest.mark.parametrize("codec,ext", [("libx264", "mp4"), ("libx264", "mkv"), ("mpeg4", "avi"), ("mjpeg", "avi")])
def test_read_frames_exact_across_codecs_and_containers(folder: Path, codec: str, ext: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """x264 has B-frames (pts out of decode order); mjpeg is all keyframes."""
    path = write_video(str(folder / f"seek_{codec}.{ext}"), 400, (96, 64), codec=codec, gop=25)
    monkeypatch.setattr(decode, "SEEK_MIN_GAP", 8)
    wanted = [1, 2, 3, 49, 50, 51, 130, 131, 260, 261, 262, 399]
    said, carried, _ = decoded(read_frames(path, wanted, chunk=4))
    assert said == carried == wanted


def test_read_frames_chunks_in_order_and_pixels(short: str) -> None:
    chunks = list(read_frames(short, range(30), chunk=4))
    assert [len(c) for c in chunks] == [4] * 7 + [2]
    said, carried, frames = decoded(chunks)
    assert said == carried == list(range(30))
    for index, frame in zip(said, frames):
        assert frame.shape == (120, 160, 3)
        assert np.abs(frame.astype(np.int16) - expected_frame(index, (160, 120))).mean() < 10
    # unsorted, repeated: ascending, once each
    said, carried, _ = decoded(read_frames(short, np.array([250, 5, 17, 5, 3]), chunk=16))
    assert said == carried == [3, 5, 17, 250]
    assert list(read_frames(short, [])) == []


def test_read_frames_resizes(short: str) -> None:
    chunks = list(read_frames(short, [0, 100, 299], size=(64, 48)))
    said, carried, frames = decoded(chunks)
    assert said == carried == [0, 100, 299]
    for index, frame in zip(said, frames):
        assert frame.shape == (48, 64, 3)
        small = cv2.resize(expected_frame(index, (160, 120)), (64, 48), interpolation=cv2.INTER_AREA)
        assert np.abs(frame.astype(np.int16) - small).mean() < 10


def test_opencv_backend_gives_the_same_frames(short: str, long: str) -> None:
    wanted = [0, 1, 2, 50, 51, 120, 299]
    _, ref_carried, ref_frames = decoded(read_frames(short, wanted, chunk=3, backend="pyav"))
    said, carried, frames = decoded(read_frames(short, wanted, chunk=3, backend="opencv"))
    assert said == carried == ref_carried == wanted
    for a, b in zip(frames, ref_frames):
        assert np.abs(a.astype(np.int16) - b).mean() < 2
    # a seek far ahead with CAP_PROP_POS_FRAMES, checked and exact; the probe reused
    info = probe(long)
    said, carried, _ = decoded(read_frames(long, [3, 4, 900, 901, 1500], backend="opencv", info=info))
    assert said == carried == [3, 4, 900, 901, 1500]


def test_read_frames_keeps_only_a_chunk_in_memory(long: str) -> None:
    full = LONG_FRAMES * LONG_SIZE[0] * LONG_SIZE[1] * 3
    seen = 0
    tracemalloc.start()
    try:
        for chunk in read_frames(long, np.arange(LONG_FRAMES), chunk=16):
            seen += len(chunk)
            assert chunk.frames.shape[1:] == (240, 320, 3)
            del chunk
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == LONG_FRAMES
    assert peak < 0.2 * full, f"peak {peak / 1e6:.1f} MB while reading {full / 1e6:.0f} MB of frames"
    assert peak < 8 * 16 * LONG_SIZE[0] * LONG_SIZE[1] * 3  # a few chunks at most


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_abandoned_reader_closes_the_file(long: str) -> None:
    before = open_fds()
    frames = read_frames(long, range(0, 2000, 7), chunk=2)
    next(frames)
    assert open_fds() > before  # the container is open while the reader is suspended
    frames.close()
    assert open_fds() == before


def test_remote_url_through_fsspec(short: str) -> None:
    fs = fsspec.filesystem("memory")
    fs.pipe("/videos/short.mp4", Path(short).read_bytes())
    try:
        url = "memory://videos/short.mp4"
        info = probe(url)
        assert info.n_frames == 300
        said, carried, _ = decoded(read_frames(url, [7, 250], info=info))
        assert said == carried == [7, 250]
        with pytest.raises(RowError, match="file not found"):
            probe("memory://videos/missing.mp4")
        with pytest.raises(RowError, match="local files only"):
            probe(url, backend="opencv")
    finally:
        fs.rm("/videos", recursive=True)


# ------------------------------------------------------------------------------------------------ errors


def cut(path: str, to: str, fraction: float = 0.6) -> str:
    data = Path(path).read_bytes()
    Path(to).write_bytes(data[: int(len(data) * fraction)])
    return to


@pytest.mark.parametrize("backend", ["pyav", "opencv"])
def test_bad_files_are_row_errors(tmp_path: Path, backend: str) -> None:
    missing = str(tmp_path / "missing.mp4")
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    text = tmp_path / "x.mp4"
    text.write_text("this is not a video\n" * 50)
    cases = [(missing, "file not found"), (str(empty), r"empty file \(0 bytes\)"),
             (str(text), r"not a video \((FFmpeg|OpenCV)")]
    for url, message in cases:
        with pytest.raises(RowError, match=message):
            probe(url, backend=backend)
        with pytest.raises(RowError, match=message):
            read_frames(url, [0], backend=backend)


def test_audio_only_file_has_no_video_stream(tmp_path: Path) -> None:
    path = str(tmp_path / "voice.m4a")
    with av.open(path, "w") as container:
        stream = container.add_stream("aac", rate=44100)
        for k in range(10):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 44100, k * 1024
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with pytest.raises(RowError, match=r"no video stream \(audio only\?\)"):
        probe(path)


def test_truncated_mp4_cannot_be_opened(short: str, tmp_path: Path) -> None:
    """mpeg4 in mp4: the index (moov) is written last, so 60 % of the file is no video at all."""
    path = cut(short, str(tmp_path / "cut.mp4"))
    for backend in ("pyav", "opencv"):
        with pytest.raises(RowError, match="truncated or corrupt"):
            probe(path, backend=backend)
        with pytest.raises(RowError, match="truncated or corrupt"):
            read_frames(path, [0], backend=backend)


@pytest.mark.parametrize("ext", ["avi", "mkv"])
def test_truncated_stream_keeps_its_head(tmp_path: Path, ext: str) -> None:
    """AVI and Matroska cut short still open: the frames left are readable, one past them is not."""
    path = write_video(str(tmp_path / f"cut.{ext}"), 200, (96, 64))
    whole = probe(path)
    cut(path, path)  # in place: probed whole, then cut short (a copy that stopped, a disk that filled)
    info = probe(path)
    assert 0 < info.n_frames < 200
    said, carried, _ = decoded(read_frames(path, range(info.n_frames), chunk=32))
    assert said == carried == list(range(info.n_frames))
    with pytest.raises(ValueError, match=f"frame index {info.n_frames} out of range"):
        read_frames(path, [info.n_frames])
    # probed before it was cut: asking for frames the file no longer holds fails loudly, never a short result
    for backend in ("pyav", "opencv"):
        wanted = [5, info.n_frames - 1, info.n_frames, 199]
        frames = read_frames(path, wanted, backend=backend, info=whole, chunk=1)
        got = []
        with pytest.raises(RowError, match=r"truncated or corrupt: decoded 2 of the 4 frames asked for, last index"):
            for chunk in frames:
                got += chunk.indices.tolist()
        assert got == wanted[:2]


def test_corrupt_frames_are_a_row_error(tmp_path: Path) -> None:
    """FFV1 refuses a damaged frame where lossy decoders conceal: the reader says how far it got."""
    path = write_video(str(tmp_path / "lossless.mkv"), 200, (128, 96), codec="ffv1")
    data = bytearray(Path(path).read_bytes())
    lo, hi = int(len(data) * 0.4), int(len(data) * 0.6)
    data[lo:hi] = np.random.default_rng(1).integers(0, 256, hi - lo, dtype=np.uint8).tobytes()
    Path(path).write_bytes(bytes(data))
    info = probe(path)
    with pytest.raises(RowError, match=r"truncated or corrupt: decoded \d+ of the \d+ frames asked for"):
        for _ in read_frames(path, range(info.n_frames)):
            pass


def test_bad_arguments_are_value_errors(short: str) -> None:
    with pytest.raises(ValueError, match="frame index 300 out of range"):
        read_frames(short, [0, 300])
    with pytest.raises(ValueError, match="frame index -1 out of range"):
        read_frames(short, [-1, 3])
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        read_frames(short, [0], chunk=0)
    with pytest.raises(ValueError, match="unknown video backend"):
        probe(short, backend="gstreamer")
    with pytest.raises(ValueError, match="integers"):
        read_frames(short, [0.5])
    assert math.isclose(probe(short).duration, 12.0)
