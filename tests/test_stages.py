"""Stages: reshape steps (group, explode, pairs) between ops, each stage an ordinary resumable run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest

import daskmv
from daskmv.data import artifact_path, load_output
from daskmv.errors import ManifestError, PipelineError
from daskmv.pipeline import Plan
from daskmv.reshape import Explode, Group, Pairs

DASKMV = [sys.executable, "-m", "daskmv.cli"]
SCENES = {"a": 4, "b": 6, "c": 1}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 scenes of 4, 6 and 1 images (scene b interleaved with a in the manifest); one file unreadable."""
    root = tmp_path_factory.mktemp("scenes")
    (root / "img").mkdir()
    rng = np.random.default_rng(3)
    rows = []
    order = ["a", "b", "a", "b", "b", "a", "c", "b", "a", "b", "b"]
    count = {s: 0 for s in SCENES}
    for scene in order:
        k = count[scene]
        count[scene] += 1
        path = f"img/{scene}{k}.png"
        cv2.imwrite(str(root / path), rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
        rows.append({"path": path, "scene": scene, "label": k})
    (root / "img" / "b3.png").write_bytes(b"not an image")
    pd.DataFrame(rows).to_csv(root / "scenes.csv", index=False)
    return root


def ids_of(root: Path) -> pd.DataFrame:
    frame = pd.read_csv(root / "scenes.csv")
    from daskmv.manifest import derive_id

    frame["id"] = [derive_id(p) for p in frame["path"]]
    return frame


def test_pairs_exhaustive_and_sequential_counts_and_stable_ids(scenes):
    frame = ids_of(scenes)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    exhaustive = Pairs(by="scene").run(table)
    per_scene = exhaustive.to_pandas().groupby("scene").size().to_dict()
    assert per_scene == {"a": 6, "b": 15, "c": 1} and exhaustive.num_rows == 22
    order = {i: k for k, i in enumerate(frame["id"])}
    pairs = exhaustive.filter(pc.is_valid(exhaustive.column("id_b")))
    assert pairs.num_rows == 21 and pc.all(pc.is_null(pairs.column("upstream_error"))).as_py()
    for pair_id, a, b in zip(*(pairs.column(c).to_pylist() for c in ("id", "id_a", "id_b"))):
        assert pair_id == f"{a}|{b}" and order[a] < order[b]  # a before b in manifest order
    # the 1-image scene has no pair, but its image does not disappear: one error row says why
    (lone,) = exhaustive.filter(pc.is_null(exhaustive.column("id_b"))).to_pylist()
    c0 = frame.loc[frame["scene"] == "c", "id"].item()
    assert lone["id"] == f"{c0}|" and lone["id_a"] == c0 and lone["path_a"] == "img/c0.png" and lone["path_b"] is None
    assert lone["upstream_error"] == f"{c0}: in no pair (no other row of its group to pair with)"
    assert Pairs(by="scene").run(table).column("id").to_pylist() == exhaustive.column("id").to_pylist()
    sequential = Pairs(by="scene", mode="sequential", window=2).run(table)
    assert sequential.num_rows == (3 + 2) + (5 + 4) + 1
    b = frame[frame["scene"] == "b"]["id"].tolist()
    got = [tuple(p.split("|")) for p in sequential.column("id").to_pylist() if p.startswith("b")]
    assert got == [(b[i], b[j]) for i in range(6) for j in (i + 1, i + 2) if j < 6]
    candidates = table.append_column("near", pa.array([[i] for i in frame["id"].iloc[::-1]]))
    chosen = Pairs(by="scene", mode="column", column="near").run(candidates)
    real = chosen.filter(pc.is_valid(chosen.column("id_b")))
    assert real.num_rows and set(real.column("id").to_pylist()) <= set(exhaustive.column("id").to_pylist())
    lone = chosen.filter(pc.is_null(chosen.column("id_b")))
    assert all(e.endswith("in no pair (none of its candidates is in its group)")
               for e in lone.column("upstream_error").to_pylist())
    seen = set(chosen.column("id_a").to_pylist()) | set(real.column("id_b").to_pylist())
    assert seen == set(frame["id"])  # every image is in a pair or in its own error row


def test_a_pair_op_reads_both_images_and_an_earlier_stages_arrays(scenes, client, tmp_path, run_opts):
    spec = ["testops:Thumb", {"pairs": {"by": "scene"}}, "testops:PairDiff"]
    r = daskmv.run(str(scenes / "scenes.csv"), spec, str(tmp_path / "out"), client=client, **run_opts)
    frame = r.manifest()
    assert len(frame) == 22 and len(r.stages) == 2
    lone = frame["path_b"].isna()
    assert lone.sum() == 1 and frame.loc[lone, "status"].item() == "error"
    assert frame.loc[lone, "error"].item().startswith("upstream: c0-") and "in no pair" in frame.loc[lone, "error"].item()
    frame = frame[~lone]
    bad = frame["id"].str.contains("b3-")
    assert (frame.loc[bad, "status"] == "error").all() and bad.sum() == 5
    assert frame.loc[bad, "error"].str.startswith("upstream: b3-").all()
    assert frame.loc[bad, "error"].str.contains("cannot decode image").all()
    good = frame[~bad]
    assert (good["status"] == "ok").all()
    for _, row in good.iterrows():
        a = cv2.imread(str(scenes / row["path_a"]))[..., ::-1]
        b = cv2.imread(str(scenes / row["path_b"]))[..., ::-1]
        assert row["diff"] == pytest.approx(abs(a.astype(float).mean() - b.astype(float).mean()))
        ta = cv2.resize(np.ascontiguousarray(a), (8, 8), interpolation=cv2.INTER_AREA)
        tb = cv2.resize(np.ascontiguousarray(b), (8, 8), interpolation=cv2.INTER_AREA)
        assert row["thumb_diff"] == pytest.approx(np.abs(ta.astype(float) - tb.astype(float)).mean())
        side = load_output(r.manifest_path, row["id"], "side_by_side")
        assert (side == np.concatenate([ta, tb], axis=1)).all()
        assert (load_output(r.manifest_path, row["id"], "thumb_path_a") == ta).all()  # an earlier stage's array
    # pair rows spread over tasks like any rows (a scene's pairs are many and independent): every row is in
    # exactly one committed part
    stage = Path(r.stages[1].out)
    parts = [pd.read_parquet(stage / "parts" / json.loads(m.read_text())["part"])
             for m in sorted((stage / "parts").glob("p??????.json"))]
    assert sorted(i for part in parts for i in part["id"]) == sorted(r.manifest()["id"])


def test_a_scene_with_a_single_image_survives_pairs_then_group(scenes, client, tmp_path, run_opts):
    """features -> pairs -> match -> group is the SfM shape: a scene with one image has no pair, yet its
    scene row must still be there, saying why nothing in it is usable."""
    spec = ["testops:Thumb", {"pairs": {"by": "scene"}}, "testops:PairDiff", {"group": {"by": "scene"}}]
    r = daskmv.run(str(scenes / "scenes.csv"), spec, str(tmp_path / "out"), client=client, **run_opts)
    frame = r.manifest().set_index("id")
    assert list(frame.index) == ["a", "b", "c"]
    assert frame.loc["a", "n"] == 6 and frame.loc["a", "n_ok"] == 6 and frame.loc["b", "n"] == 15
    assert frame.loc["b", "n_ok"] == 10  # the 5 pairs of the unreadable image are listed as failed
    assert frame.loc["c", "n"] == 1 and frame.loc["c", "n_ok"] == 0
    (why,) = frame.loc["c", "errors"]
    assert "in no pair (no other row of its group to pair with)" in why


def test_group_lists_every_row_in_manifest_order_with_failures(scenes, client, tmp_path, run_opts):
    spec = ["testops:Thumb", {"group": {"by": "scene"}}, "testops:Usable"]
    r = daskmv.run(str(scenes / "scenes.csv"), spec, str(tmp_path / "out"), client=client, **run_opts)
    frame = r.manifest().set_index("id")
    assert list(frame.index) == ["a", "b", "c"]
    source = ids_of(scenes)
    for scene, n in SCENES.items():
        rows = source[source["scene"] == scene]
        assert list(frame.loc[scene, "ids"]) == rows["id"].tolist()  # complete and in manifest order
        assert list(frame.loc[scene, "path"]) == rows["path"].tolist()
        assert frame.loc[scene, "n"] == n
    errors = list(frame.loc["b", "errors"])
    failed = [i for i, e in enumerate(errors) if e is not None]
    assert [frame.loc["b", "path"][i] for i in failed] == ["img/b3.png"]
    assert "cannot decode image" in errors[failed[0]]
    assert frame.loc["b", "usable"] == "5 of 6" and frame.loc["b", "n_ok"] == 5
    assert frame.loc["a", "usable"] == "4 of 4" and frame.loc["c", "usable"] == "1 of 1"
    refs = [ref for ref in frame.loc["a", "thumb_path"]]
    assert all(ref.startswith("stages/0-") for ref in refs)  # relative to the root
    # the report of a staged root: a table of stages, then each stage's timeline, errors and gallery
    from daskmv.report import build_report

    page = Path(build_report(str(tmp_path / "out"), n=4)).read_text()
    assert page.count("<tr class='stage-row'>") == 2 and "id='stage-0'" in page and "id='stage-1'" in page
    stage0 = page[page.index("id='stage-0'"):page.index("id='stage-1'")]
    assert "1 row error(s) in 1 kind(s)" in stage0 and "cannot decode image" in stage0
    assert stage0.count("<div class='card'>") == 4 and "<img" in stage0  # thumbnails of the first stage
    assert "id='stage1-no-errors'" in page[page.index("id='stage-1'"):]
    assert "3 rows, 3 ok, 0 errors" in r._repr_html_()
    assert (frame["status"] == "ok").all()


def test_explode_makes_one_row_per_listed_item(scenes, client, tmp_path, run_opts):
    spec = ["testops:ListItems", {"explode": {"column": "items", "prefix": "f"}}]
    r = daskmv.run(str(scenes / "scenes.csv"), spec, str(tmp_path / "out"), client=client, **run_opts)
    frame = r.manifest()
    source = ids_of(scenes)
    want = [(f"{i}-f{k:06d}", i, k) for i, label in zip(source["id"], source["label"]) for k in range(label + 1)]
    assert list(zip(frame["id"], frame["parent_id"], frame["index"])) == want
    assert (frame["twice"] == 2 * frame["k"]).all() and (frame["k"] == frame["index"]).all()
    assert {"path", "scene", "label", "status", "error"} <= set(frame.columns) and "items" not in frame.columns


def test_explode_keeps_one_error_row_for_a_parent_that_failed():
    table = pa.table({"id": ["v1", "v2", "v3"], "frames": [[{"t": 0.0}, {"t": 0.5}], [], None],
                      "upstream_error": [None, None, "read: cannot open video"]})
    out = Explode(column="frames", prefix="f").run(table).to_pandas()
    assert out["id"].tolist() == ["v1-f000000", "v1-f000001", "v2-f000000", "v3-f000000"]
    assert out["upstream_error"].tolist()[2:] == ["no elements in 'frames'", "read: cannot open video"]
    assert out["t"].tolist()[:2] == [0.0, 0.5]


def test_resume_across_stages_skips_finished_stages(scenes, client, tmp_path):
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("steps:\n  - testops:Thumb\n  - pairs: {by: scene}\n  - testops:Nap: {seconds: 0.2}\n"
                        "  - testops:PairDiff\n")
    reference = daskmv.run(str(scenes / "scenes.csv"), str(pipeline), str(tmp_path / "ref"), client=client,
                           progress="none")
    out = tmp_path / "out"
    cmd = [*DASKMV, "run", str(scenes / "scenes.csv"), "--pipeline", str(pipeline), "--out", str(out),
           "--workers", "1", "--partition-rows", "4", "--progress", "none"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("stages/1-*/parts/p??????.json")):
            assert time.monotonic() < deadline and proc.poll() is None, "the second stage never started"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    first_stage = {p.name: json.loads(p.read_text())["started"] for p in out.glob("stages/0-*/parts/p??????.json")}
    done_second = {p.name: json.loads(p.read_text())["started"] for p in out.glob("stages/1-*/parts/p??????.json")}
    assert first_stage and done_second
    status = json.loads(subprocess.run([*DASKMV, "status", str(out), "--json"], capture_output=True, text=True).stdout)
    assert status["state"] == "interrupted" and status["stages"][0]["state"] == "complete"
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert {p.name: json.loads(p.read_text())["started"] for p in out.glob("stages/0-*/parts/p??????.json")} == first_stage
    after = {p.name: json.loads(p.read_text())["started"] for p in out.glob("stages/1-*/parts/p??????.json")}
    assert all(after[name] == started for name, started in done_second.items())
    from conftest import without_refs

    got, want = pd.read_parquet(out / "manifest.parquet"), pd.read_parquet(tmp_path / "ref" / "manifest.parquet")
    pd.testing.assert_frame_equal(without_refs(got), without_refs(want))
    for row_id in got.loc[got["status"] == "ok", "id"]:
        a = load_output(str(out / "manifest.parquet"), row_id, "side_by_side")
        assert (a == load_output(str(tmp_path / "ref" / "manifest.parquet"), row_id, "side_by_side")).all()


def test_a_changed_first_step_redoes_every_stage_and_a_changed_last_step_only_the_last(scenes, client, tmp_path,
                                                                                       run_opts):
    out = str(tmp_path / "out")

    def run(first: int, last: float) -> daskmv.engine.RunResult:
        spec = [{"resize": {"size": first}}, {"pairs": {"by": "scene"}}, {"testops:Nap": {"seconds": last}}]
        return daskmv.run(str(scenes / "scenes.csv"), spec, out, client=client, **run_opts)

    def folders() -> list[str]:
        return sorted(p.name for p in (tmp_path / "out" / "stages").iterdir())

    first = run(16, 0.001)
    before = folders()
    again = run(16, 0.001)
    assert folders() == before and not any(s.computed_partitions for s in again.stages)
    last = run(16, 0.002)
    assert folders()[0] == before[0] and folders()[1] != before[1]
    assert not last.stages[0].computed_partitions and last.stages[1].computed_partitions
    changed = run(12, 0.002)
    assert folders()[0] != before[0] and folders()[1] not in (before[1],)
    assert all(s.computed_partitions for s in changed.stages)
    assert len(folders()) == 2  # the folders of replaced stages are removed
    assert first.counts == changed.counts


def test_artifacts_are_committed_with_the_partition_and_move_with_the_root(dataset, client, tmp_path, run_opts):
    out = tmp_path / "out"
    r = daskmv.run(str(dataset / "manifest.parquet"), "testops:FolderPerRow", str(out), client=client, limit=20,
                   partition_rows=8, **run_opts)
    frame = r.manifest()
    assert r.counts["ok"] == 20
    marker = json.loads((out / "parts" / "p000000.json").read_text())
    for _, row in frame.iterrows():
        assert row["model_path"].startswith(f"artifacts/model/p0000{int(row.name) // 8:02d}-")
    moved = tmp_path / "moved"
    shutil.move(str(out), str(moved))
    for _, row in frame.iterrows():
        folder = Path(artifact_path(str(moved / "manifest.parquet"), row["id"], "model"))
        assert folder.is_relative_to(moved)
        assert (folder / "cameras.txt").read_text() == f"{row['id']} {row['label']}\n"
        assert (folder / "sparse" / "0" / "points.bin").read_bytes() == bytes([int(row["label"])] * 16)
    assert marker["token"] in frame["model_path"].iloc[0]
    assert not list(Path("/tmp").glob("daskmv-test-artifact-*"))  # moved, not copied


def test_a_row_that_fails_after_making_its_artifact_leaves_no_folder_behind(dataset, client, tmp_path, run_opts):
    """An op returned its artifact folder but another output did not check: the row fails and the folder,
    which the engine owns and would have moved into the root, is removed from the worker's disk."""
    import tempfile

    temp_dirs = set(client.run(tempfile.gettempdir).values())
    r = daskmv.run(str(dataset / "manifest.parquet"), "testops:FolderThenBadCount", str(tmp_path / "out"),
                   client=client, limit=12, partition_rows=4, max_error_rate=1.0, **run_opts)
    frame = r.manifest()
    odd = frame["label"].astype(int) % 2 == 1
    assert odd.any() and (~odd).any()
    assert (frame.loc[odd, "status"] == "error").all()
    assert frame.loc[odd, "error"].str.contains("count").all()
    assert frame.loc[odd, "model_path"].isna().all()
    assert (frame.loc[~odd, "status"] == "ok").all()
    for _, row in frame[~odd].iterrows():
        folder = Path(artifact_path(str(tmp_path / "out" / "manifest.parquet"), row["id"], "model"))
        assert (folder / "cameras.txt").read_text() == str(row["id"])
    assert not [p for d in temp_dirs for p in Path(d).glob("daskmv-test-badcount-*")]


def test_reshape_steps_are_checked_before_anything_runs(scenes, tmp_path):
    with pytest.raises(PipelineError, match="step 'group' needs the column.*'room'"):
        daskmv.run(str(scenes / "scenes.csv"), ["resize", {"group": {"by": "room"}}], str(tmp_path / "o"),
                   progress="none")
    with pytest.raises(PipelineError, match="op 'testops:Usable' needs input 'ids'"):
        daskmv.run(str(scenes / "scenes.csv"), [{"pairs": {"by": "scene"}}, "testops:Usable"], str(tmp_path / "o"),
                   progress="none")
    with pytest.raises(PipelineError, match="reads 'image:path_a', but the manifest has no column 'path_a'"):
        daskmv.run(str(scenes / "scenes.csv"), [{"group": {"by": "scene"}}, "testops:PairDiff"], str(tmp_path / "o"),
                   progress="none")
    with pytest.raises(PipelineError, match="mode 'column' needs column="):
        Plan.parse([{"pairs": {"mode": "column"}}])
    assert not (tmp_path / "o").exists()


def test_partition_by_keeps_groups_whole_and_refuses_scattered_ones(tmp_path):
    from daskmv.manifest import read_manifest

    frame = pd.DataFrame({"id": [f"r{i}" for i in range(10)], "video": list("aaabbbbbcc")})
    frame.to_csv(tmp_path / "m.csv", index=False)
    m = read_manifest(str(tmp_path / "m.csv"), check=False)
    m.partition_by = "video"
    m.check()
    assert [len(p) for p in m.partitions(2)] == [3, 5, 2]
    assert [len(p) for p in m.partitions(4)] == [8, 2]
    frame.iloc[[0, 9]] = frame.iloc[[9, 0]].to_numpy()
    frame.to_csv(tmp_path / "m.csv", index=False)
    m = read_manifest(str(tmp_path / "m.csv"), check=False)
    m.partition_by = "video"
    with pytest.raises(ManifestError, match="not together; sort the manifest by 'video'"):
        m.check()


def test_group_of_one_scene_per_row_and_all_failed():
    table = pa.table({"id": ["x", "y"], "scene": ["s", "s"], "upstream_error": ["bad", "worse"]})
    out = Group(by="scene").run(table).to_pylist()
    assert out[0]["n_ok"] == 0 and out[0]["upstream_error"] == "all 2 rows of this group failed upstream (first: bad)"


def test_group_lists_columns_of_any_type_including_lists():
    """Pairs made without consuming an embedding carry list<float> columns; grouping them used to fail
    ("hash_list has no kernel" for list inputs)."""
    table = pa.table({"id": ["x", "y", "z"], "scene": ["s", "t", "s"],
                      "vec": pa.array([[1.0, 2.0], None, [3.0]], pa.list_(pa.float32())),
                      "meta": pa.array([{"k": 1}, {"k": 2}, {"k": 3}])})
    out = Group(by="scene").run(table).to_pylist()
    assert [row["id"] for row in out] == ["s", "t"]
    assert out[0]["vec"] == [[1.0, 2.0], [3.0]] and out[1]["vec"] == [None]
    assert out[0]["meta"] == [{"k": 1}, {"k": 3}] and out[0]["ids"] == ["x", "z"]
