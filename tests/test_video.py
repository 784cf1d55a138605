"""Videos as rows, through the engine on a real cluster: per-video outputs (the `video` frame source), the
`frames` pipeline (one row per sampled frame), row errors for bad files, bounded memory on a long video,
batches that fit themselves to memory, and stage placement."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import daskmv
from daskmv.data import load_output
from daskmv.errors import PipelineError
from daskmv.pipeline import Pipeline
from daskmv.video.decode import Sampling, probe, select_frames
from daskmv.video.synthetic import frame_index_of, write_video

NETS = str(Path(__file__).parent)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """Two good videos, and three bad files: a text file named .mp4, an empty one, a truncated one."""
    folder = tmp_path_factory.mktemp("videos")
    write_video(str(folder / "a.mp4"), 60, size=(96, 64), fps=25)
    write_video(str(folder / "b.avi"), 45, size=(96, 64), fps=15)
    (folder / "text.mp4").write_text("this is not a video\n")
    (folder / "empty.mp4").write_bytes(b"")
    write_video(str(folder / "whole.mp4"), 40, size=(96, 64), fps=25)
    data = (folder / "whole.mp4").read_bytes()
    (folder / "cut.mp4").write_bytes(data[: len(data) // 2])
    pd.DataFrame({"id": ["a", "b", "text", "empty", "cut"],
                  "path": ["a.mp4", "b.avi", "text.mp4", "empty.mp4", "cut.mp4"]}).to_csv(folder / "videos.csv",
                                                                                          index=False)
    return folder


def test_a_model_over_video_rows_stacks_per_frame_outputs(videos, client, tmp_path):
    steps = [{"video": {"fps": 5}}, "testops:FrameMean"]
    result = daskmv.run(str(videos / "videos.csv"), steps, str(tmp_path / "out"), client=client, progress="none",
                        max_error_rate=1.0)
    frame = result.manifest().set_index("id")
    assert frame.loc["a", "status"] == "ok" and frame.loc["b", "status"] == "ok"
    for name, fps in (("a", 25), ("b", 15)):
        expected = select_frames(probe(str(videos / frame.loc[name, "path"])), Sampling(fps=5))
        assert list(frame.loc[name, "frame_index"]) == expected.tolist()
        assert frame.loc[name, "n_frames"] == len(expected)
        assert np.allclose(frame.loc[name, "timestamp"], expected / fps)
        # every frame the op saw is the one asked for: its pixels encode its index
        assert list(frame.loc[name, "decoded_index"]) == expected.tolist()
        means = load_output(str(result.manifest_path), name, "mean_rgb")
        assert means.shape == (len(expected), 3) and means.dtype == np.float32
    # bad files are row errors that say what is wrong; nothing else is lost
    errors = frame["error"].dropna()
    assert set(errors.index) == {"text", "empty", "cut"}
    assert "not a video" in errors["text"] and "empty file" in errors["empty"]
    assert errors["cut"].startswith("video: ") and ("truncated" in errors["cut"] or "corrupt" in errors["cut"]
                                                    or "cannot" in errors["cut"])


def test_torch_model_over_videos_equals_the_frame_manifest(videos, client, tmp_path):
    """The same model over video rows (stacked) and over the frames pipeline's rows (one per frame)."""
    model = {"model": "nets:tiny_cnn", "size": 32}
    manifest = str(videos / "videos.csv")
    per_video = daskmv.run(manifest, [{"video": {"stride": 4, "max_frames": 9}}, {"torch_model": model}],
                           str(tmp_path / "per-video"), client=client, progress="none", max_error_rate=1.0)
    frames = daskmv.run(manifest, [{"frames": {"video": {"stride": 4, "max_frames": 9}}}],
                        str(tmp_path / "frames"), client=client, progress="none", max_error_rate=1.0)
    rows = frames.manifest()
    ok = rows[rows["status"] == "ok"]
    assert set(ok["video_id"]) == {"a", "b"} and len(ok) == 18
    assert list(ok[ok["video_id"] == "a"]["frame_index"]) == [0, 4, 8, 12, 16, 20, 24, 28, 32]
    first = load_output(str(frames.manifest_path), ok["id"].iloc[3], "frame")
    assert first.shape == (64, 96, 3) and frame_index_of(first) == ok["frame_index"].iloc[3]
    # one error row per video that cannot be opened, saying why
    bad = rows[rows["status"] == "error"].set_index("video_id")
    assert sorted(bad.index) == ["cut", "empty", "text"] and bad.loc["text", "error"].startswith("upstream: video:")
    over_frames = daskmv.run(str(frames.manifest_path), [{"torch_model": {**model, "input": "array:frame_path"}}],
                             str(tmp_path / "over-frames"), client=client, progress="none", max_error_rate=1.0)
    per_frame = over_frames.manifest().set_index("id")
    for video in ("a", "b"):
        stacked = load_output(str(per_video.manifest_path), video, "model_output")
        ids = ok[ok["video_id"] == video]["id"]
        single = np.stack([load_output(str(over_frames.manifest_path), i, "model_output") for i in ids])
        assert per_frame.loc[ids, "status"].eq("ok").all()
        np.testing.assert_allclose(stacked, single, rtol=1e-5, atol=1e-5)


def test_a_frame_an_op_rejects_fails_its_video_naming_op_and_frame(videos, client, tmp_path):
    result = daskmv.run(str(videos / "videos.csv"), [{"video": {"max_frames": 10}}, "testops:FailsOnFrame"],
                        str(tmp_path / "out"), client=client, progress="none", max_error_rate=1.0)
    frame = result.manifest().set_index("id")
    assert frame.loc["a", "error"] == "testops:FailsOnFrame: frame 7: ValueError: cannot use frame 7"


def test_sampling_window_through_the_engine(videos, client, tmp_path):
    steps = [{"video": {"start": 0.5, "end": 1.5, "fps": 4, "max_frames": 3}}, "testops:FrameMean"]
    result = daskmv.run(str(videos / "videos.csv"), steps, str(tmp_path / "out"), client=client, progress="none",
                        max_error_rate=1.0)
    a = result.manifest().set_index("id").loc["a"]
    # 25 fps: targets 0.5, 0.75, 1.0 s -> frames 12.5 -> 13 (first at/after), 18.75 -> 19, 25
    assert list(a["frame_index"]) == [13, 19, 25] and list(a["decoded_index"]) == [13, 19, 25]


def test_bad_sampling_and_artifacts_after_a_source_are_refused_before_running():
    with pytest.raises(PipelineError, match="fps"):
        Pipeline.parse([{"video": {"fps": -1}}])
    with pytest.raises(PipelineError, match="one frame source"):
        Pipeline.parse(["video", "video"])


def test_a_long_video_runs_in_bounded_memory(tmp_path):
    """10,000 frames at 160x120 (576 MB decoded whole) through a worker whose peak grows by far less."""
    from distributed import Client, LocalCluster

    n, size = 10_000, (160, 120)
    write_video(str(tmp_path / "long.mp4"), n, size=size, fps=50, gop=50)
    write_video(str(tmp_path / "short.mp4"), 20, size=size, fps=50)
    pd.DataFrame({"id": ["long"], "path": ["long.mp4"]}).to_csv(tmp_path / "long.csv", index=False)
    pd.DataFrame({"id": ["short"], "path": ["short.mp4"]}).to_csv(tmp_path / "short.csv", index=False)
    steps = [{"video": {"chunk": 64}}, "testops:FrameMean"]
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        daskmv.run(str(tmp_path / "short.csv"), steps, str(tmp_path / "warm"), client=client, progress="none")
        before = _peak_rss(client)
        result = daskmv.run(str(tmp_path / "long.csv"), steps, str(tmp_path / "out"), client=client, progress="none")
        grown = _peak_rss(client) - before
    row = result.manifest().iloc[0]
    assert row["status"] == "ok" and row["n_frames"] == n
    assert list(row["decoded_index"][[0, 1, 4999, -1]]) == [0, 1, 4999, n - 1]
    whole = n * size[0] * size[1] * 3
    assert grown < whole / 5, f"the worker's peak grew by {grown / 1e6:.0f} MB; decoding it whole takes {whole / 1e6:.0f} MB"


def _peak_rss(client) -> int:
    def peak() -> int:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    return max(client.run(peak).values())


def test_batches_fit_themselves_to_the_largest_that_fits(dataset, client, tmp_path):
    """An op that runs out of memory above 10 rows, given batches of 64: the engine ends at 10, not 8."""
    out = tmp_path / "oom"
    daskmv.run(str(dataset / "manifest.parquet"), [{"testops:MemoryHungry": {"fits": 10}}], str(out), client=client,
               batch_size=64, partition_rows=64, progress="none")
    frame = pd.read_parquet(out / "manifest.parquet")
    assert (frame["status"] == "ok").all() and frame["batch"].max() == 10
    markers = [json.loads(p.read_text()) for p in (out / "parts").glob("p*.json")]
    assert {m["batch_limits"]["testops:MemoryHungry"] for m in markers if m["batch_limits"]} == {10}


def test_stage_placement_runs_unchanged_on_cpu(videos, client, tmp_path):
    """`device: 1` pins an op to the worker's next GPU; on CPU (or one GPU) the same YAML gives the same result."""
    from daskmv.partition import placed_device

    plain = Pipeline.parse([{"video": {"max_frames": 4}}, {"torch_model": {"model": "nets:tiny_cnn", "size": 32}}])
    pinned = Pipeline.parse([{"video": {"max_frames": 4}},
                             {"torch_model": {"model": "nets:tiny_cnn", "size": 32, "device": 1}}])
    assert pinned.ops[1].placement == 1 and pinned.fingerprint == plain.fingerprint
    assert pinned.steps()[1]["params"]["device"] == 1
    assert placed_device("cpu", 1) == "cpu"
    with pytest.raises(PipelineError, match="device must be a GPU number"):
        Pipeline.parse([{"torch_model": {"model": "nets:tiny_cnn", "device": "fast"}}])
    result = daskmv.run(str(videos / "videos.csv"), pinned, str(tmp_path / "pinned"), client=client, progress="none",
                        max_error_rate=1.0)
    again = daskmv.run(str(videos / "videos.csv"), plain, str(tmp_path / "plain"), client=client, progress="none",
                       max_error_rate=1.0)
    np.testing.assert_array_equal(load_output(str(result.manifest_path), "a", "model_output"),
                                  load_output(str(again.manifest_path), "a", "model_output"))


def test_the_report_shows_a_strip_of_frames_per_video(videos, client, tmp_path):
    from daskmv.report import RunFacts, row_images

    steps = [{"video": {"fps": 5}}, "testops:FrameMean"]
    result = daskmv.run(str(videos / "videos.csv"), steps, str(tmp_path / "out"), client=client, progress="none",
                        max_error_rate=1.0)
    facts = RunFacts.read(str(tmp_path / "out"))
    from daskmv.report import _ops

    row = facts.rows.set_index("id", drop=False).loc["a"]
    images = dict(row_images(facts, row, _ops(facts)))
    strip = images["frames"]
    assert strip.ndim == 3 and strip.shape[0] == 160 and strip.shape[1] >= 6 * 200  # six frames side by side
    assert "alt='frames'" in Path(result.report()).read_text()


def test_workers_per_gpu_spreads_workers_over_gpus(monkeypatch):
    """Two per GPU on two (pretend) GPUs: four worker processes, two on each, each with the GPU resource."""
    from daskmv.cluster import GPU_ENV, SharedGPUCluster, connect

    monkeypatch.setenv("DASKMV_GPUS", "2")
    with connect("local", workers_per_gpu=2, dashboard_address=":0") as c:
        assert isinstance(c.cluster, SharedGPUCluster)
        gpus = sorted(c.run(lambda: os.environ[GPU_ENV]).values())
        resources = {w["resources"].get("GPU") for w in c.scheduler_info(n_workers=-1)["workers"].values()}
    assert gpus == ["0", "0", "1", "1"] and resources == {1}


@pytest.mark.parametrize("how", ["raises", "dies"])
def test_workers_per_gpu_auto_stops_at_the_count_that_fits(tmp_path, monkeypatch, how):
    """A model that takes a third of a (pretend) GPU: auto keeps 3 workers on it; the 4th fails its set-up
    with out-of-memory, is shut down and not restarted; the run goes on with three and says so."""
    slots = tmp_path / "device"
    slots.mkdir()
    for i in range(8):
        (tmp_path / f"v{i}.txt").write_text("x")
    pd.DataFrame({"id": [f"r{i}" for i in range(8)], "path": [f"v{i}.txt" for i in range(8)]}).to_csv(
        tmp_path / "rows.csv", index=False)
    monkeypatch.setenv("DASKMV_GPUS", "1")
    monkeypatch.setenv("PYTHONPATH", NETS + os.pathsep + os.environ.get("PYTHONPATH", ""))
    steps = [{"testops:FakeDeviceMemory": {"folder": str(slots), "capacity": 3, "seconds": 0.1, "die": how == "dies"}}]
    result = daskmv.run(str(tmp_path / "rows.csv"), steps, str(tmp_path / "out"), workers_per_gpu="auto",
                        progress="none", cluster_kwargs={"dashboard_address": ":0"})
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    fit = run["workers_fit"]
    assert fit["per_gpu"] == 3, fit
    assert [t["per_gpu"] for t in fit["trials"]] == [1, 2, 3, 4] and fit["trials"][-1]["kept"] is False
    assert ("out of memory" if how == "raises" else "died") in fit["trials"][-1]["error"]
    assert "did not fit" in fit["reason"]
    frame = result.manifest()
    assert (frame["status"] == "ok").all() and set(frame["slot"]) <= {0, 1, 2}
    assert run["cluster"]["workers"] == 3


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA device")
def test_gpu_a_real_model_runs_out_of_memory_and_recovers(videos, tmp_path):
    """torch_model at 6144x6144 over a 60-frame video in one batch asks for more than an H100 or H200 has (the
    first convolution's output alone is 60 x 8 x 6144^2 x 4 bytes = 72 GB, and its ReLU as much again): real
    CUDA out-of-memory errors, and the engine backs off until the batches fit, every frame done."""
    steps = [{"video": {"chunk": 64}}, {"torch_model": {"model": "nets:tiny_cnn", "size": 6144}}]
    result = daskmv.run(str(videos / "videos.csv"), steps, str(tmp_path / "out"), batch_size=2048, progress="none",
                        max_error_rate=1.0)
    frame = result.manifest().set_index("id")
    assert frame.loc[["a", "b"], "status"].eq("ok").all()
    markers = [json.loads(p.read_text()) for p in (tmp_path / "out" / "parts").glob("p*.json")]
    assert sum(m["oom_backoffs"] for m in markers) > 0 and all(m["devices"] == ["cuda:0"] for m in markers)
    assert load_output(str(result.manifest_path), "a", "model_output").shape == (60, 8)


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA device")
def test_gpu_two_workers_share_one_gpu(videos, tmp_path):
    steps = [{"video": {}}, {"torch_model": {"model": "nets:tiny_cnn", "size": 64}}]
    result = daskmv.run(str(videos / "videos.csv"), steps, str(tmp_path / "out"), workers_per_gpu=2,
                        partition_rows=1, progress="none", max_error_rate=1.0)
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    import torch

    assert run["cluster"]["workers"] == 2 * torch.cuda.device_count()
    markers = [json.loads(p.read_text()) for p in (tmp_path / "out" / "parts").glob("p*.json")]
    assert all(m["devices"][0].startswith("cuda") for m in markers)
    assert result.manifest().set_index("id").loc[["a", "b"], "status"].eq("ok").all()


def test_the_frame_op_over_a_users_frame_list(videos, client, tmp_path):
    """`frame` alone over a manifest of (video, frame index) rows: each row its frame, read forward through the
    file; an index the video does not have is that row's error only."""
    indices = [0, 1, 2, 30, 31, 59, 75, 5]
    rows = pd.DataFrame({"id": [f"r{i}" for i in range(len(indices))], "path": [str(videos / "a.mp4")] * len(indices),
                         "frame_index": indices})
    rows.to_parquet(tmp_path / "frames.parquet")
    result = daskmv.run(str(tmp_path / "frames.parquet"), "frame", str(tmp_path / "out"), client=client,
                        batch_size=3, progress="none", max_error_rate=1.0)
    frame = result.manifest().set_index("id")
    assert frame.loc["r6", "error"] == "frame: frame 75 is not in the video (60 frames)"
    for row_id, index in zip(frame.index, indices):
        if row_id != "r6":
            assert frame_index_of(load_output(str(result.manifest_path), row_id, "frame")) == index
