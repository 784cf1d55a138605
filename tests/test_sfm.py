"""Structure from motion: synthetic scenes with known cameras, the real Sacré-Cœur photos, tiling, pairing
modes, per-scene errors, the pair-matching job alone, learned models plugged in, and the export's layout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import daskmv
from daskmv.data import artifact_path, load_output
from daskmv.errors import PipelineError, RowError
from daskmv.reshape import Pairs
from daskmv.sfm import evaluate, synthetic
from daskmv.sfm.features import Extractor, extract
from daskmv.sfm.match import mutual_nearest
from daskmv.sfm.reconstruct import Reconstruct
from daskmv.sfm.scale import NORMALISED, fuse

from conftest import PEOPLE, shared_data

pycolmap = pytest.importorskip("pycolmap")


def write_manifest(rows: list[dict], path: Path) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def truth_of(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {name: (cam.R, cam.t) for name, cam in synthetic.read_truth(folder).items()}


def model_of(manifest_path: str, scene: str) -> tuple[str, object]:
    folder = artifact_path(manifest_path, scene, "model")
    return folder, pycolmap.Reconstruction(os.path.join(folder, "sparse", "0"))


@pytest.fixture(scope="module")
def room(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 views of a room (a 90 degree arc), with metric depth maps: 2 % noise and 20 % wild outliers."""
    root = tmp_path_factory.mktemp("room")
    rows = synthetic.write_scene(root / "images", n=12, seed=0, depth=True, arc_deg=90)
    rng = np.random.default_rng(0)
    for row in rows:
        depth = np.load(row["depth"])
        noisy = depth * (1 + 0.02 * rng.standard_normal(depth.shape))
        wild = rng.random(depth.shape) < 0.2
        noisy[wild] = rng.uniform(0.1, 30.0, int(wild.sum()))
        np.save(row["depth"], noisy.astype(np.float32))
    write_manifest(rows, root / "photos.csv")
    return root


def test_a_synthetic_scene_registers_every_image_with_its_true_pose_and_metric_scale(room, client, tmp_path, run_opts):
    spec = [{"sfm": {"reconstruct": {"depth_column": "depth"}}}]
    r = daskmv.run(str(room / "photos.csv"), spec, str(tmp_path / "recon"), client=client, **run_opts)
    scenes = r.manifest()
    assert len(scenes) == 1 and scenes["status"].tolist() == ["ok"]
    scene = scenes.iloc[0]
    assert scene["id"] == "room0" and scene["n_images"] == 12 and scene["n_registered"] == 12
    assert json.loads(scene["unregistered"]) == [] and scene["reprojection_error"] < 1.0
    # the scenes manifest describes scenes, not their pairs' lists
    assert not [c for c in scenes.columns if c.endswith(("_a", "_b"))] and "matches_path" not in scenes.columns
    folder, rec = model_of(r.manifest_path, "room0")
    estimated, truth = evaluate.poses(rec), truth_of(room / "images")
    rot, trans = evaluate.relative_errors(estimated, truth)
    assert rot.max() < 0.5, f"relative rotation errors up to {rot.max():.3f} deg"
    assert trans.max() < 2.0
    errors, scale = evaluate.centre_errors(estimated, truth)
    centres = np.array([cam.center for cam in synthetic.read_truth(room / "images").values()])
    extent = np.linalg.norm(centres.max(0) - centres.min(0))
    assert errors.max() < 0.01 * extent, f"camera centres off by up to {errors.max():.4f} m of a {extent:.2f} m path"
    # metric from noisy depth with 20 % outliers: the model is in metres within 1 %
    assert scene["scale_source"].startswith("metric: depth") and scene["scale_inliers"] > 1000
    assert abs(scale - 1) < 0.01, f"model units are {scale:.4f} m"
    assert 0 < scene["scale_spread"] < 0.2
    # the 3DGS layout: undistorted PINHOLE cameras, every model image present under images/
    assert {c.model.name for c in rec.cameras.values()} == {"PINHOLE"}
    files = sorted(os.listdir(os.path.join(folder, "images")))
    assert files == sorted(im.name for im in rec.images.values()) == sorted(truth)
    for im in rec.images.values():
        h, w = cv2.imread(os.path.join(folder, "images", im.name)).shape[:2]
        cam = rec.cameras[im.camera_id]
        assert (w, h) == (cam.width, cam.height)
    # the report's pictures: a top view and the best pair's verified matches
    top = load_output(r.manifest_path, "room0", "top_view")
    pair = load_output(r.manifest_path, "room0", "pair_view")
    assert top.shape == (384, 384, 3) and pair.shape[0] == 240 and pair.shape[2] == 3
    assert (top[..., 0] > 200).sum() > 12 and (top != 255).any()


def test_the_sacre_coeur_photos_all_register(client, tmp_path, run_opts):
    folder = shared_data("sacre_coeur/mapping")
    rows = [{"path": str(p)} for p in sorted(folder.glob("*.jpg"))]
    assert len(rows) == 10
    manifest = write_manifest(rows, tmp_path / "photos.csv")
    r = daskmv.run(str(manifest), "sfm", str(tmp_path / "recon"), client=client, **run_opts)
    scene = r.manifest().iloc[0]
    assert scene["status"] == "ok", scene["error"]
    assert scene["id"] == "all"  # no scene column: one scene
    assert scene["n_registered"] == 10, scene["unregistered"]
    assert scene["reprojection_error"] < 1.5
    assert scene["scale_source"] == NORMALISED
    # reconstructed again from the same features and matches (the stage's folder gone, the run resumed):
    # the same model to the bit. Multithreaded mapping gave 1,115 or 1,477 points here from run to run.
    _, first = model_of(r.manifest_path, "all")
    for _ in range(3):
        stage, = (tmp_path / "recon" / "stages").glob("2-*")
        shutil.rmtree(stage)
        again = daskmv.run(str(manifest), "sfm", str(tmp_path / "recon"), client=client, **run_opts)
        _, rec = model_of(again.manifest_path, "all")
        assert rec.num_points3D() == first.num_points3D()
        assert {im.name: im.cam_from_world().matrix().tolist() for im in rec.images.values()} == \
            {im.name: im.cam_from_world().matrix().tolist() for im in first.images.values()}
    # pycolmap's own options reach the mapper: an initial pair would need more inliers than any pair has
    spec = [{"sfm": {"reconstruct": {"mapper_options": {"mapper": {"init_min_num_inliers": 100_000}}}}}]
    strict = daskmv.run(str(manifest), spec, str(tmp_path / "recon"), client=client, max_error_rate=1.0, **run_opts)
    assert [bool(s.computed_partitions) for s in strict.stages] == [False, False, True]  # features, matches kept
    scene = strict.manifest().iloc[0]
    assert scene["status"] == "error" and "mapper found no model" in scene["error"]


@pytest.fixture(scope="module")
def sequence(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """100 views around a room at 320x240: a closed loop, like frames of a walk-around video."""
    root = tmp_path_factory.mktemp("sequence")
    rows = synthetic.write_scene(root / "images", n=100, seed=4, width=320, height=240, fov_deg=70)
    write_manifest(rows, root / "frames.csv")
    return root


@pytest.mark.parametrize("pairs", [{"mode": "sequential", "window": 3, "k": 5}, {"mode": "retrieval", "k": 8}],
                         ids=["sequential", "retrieval"])
def test_sequential_and_retrieval_pairs_are_few_and_register_every_image(sequence, client, tmp_path, run_opts, pairs):
    spec = [{"sfm": {"features": {"max_features": 1500}, "pairs": pairs}}]
    r = daskmv.run(str(sequence / "frames.csv"), spec, str(tmp_path / "recon"), client=client, **run_opts)
    matched = pd.read_parquet(Path(r.stages[1].manifest_path))
    exhaustive = 100 * 99 // 2
    assert len(matched) < exhaustive / 8, f"{len(matched)} pairs"
    scene = r.manifest().iloc[0]
    assert scene["status"] == "ok" and scene["n_registered"] == 100, scene["unregistered"]
    rot, _ = evaluate.relative_errors(evaluate.poses(model_of(r.manifest_path, scene["id"])[1]),
                                      truth_of(sequence / "images"))
    assert np.median(rot) < 0.5


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five scenes: 'a' (8 views and one unrelated photo), 'b' (6 views), 'pair' (2 views), 'blank'
    (3 grey images) and 'apart' (3 photos of different things)."""
    root = tmp_path_factory.mktemp("mixed")
    rows = synthetic.write_scene(root / "a", n=8, seed=1, arc_deg=70, scene_name="a")
    rows.append({"id": "a_stranger", "path": str(PEOPLE / "apollo11_crew_nasa.jpg"), "scene": "a"})
    rows += synthetic.write_scene(root / "b", n=6, seed=2, arc_deg=50, scene_name="b")
    rows += synthetic.write_scene(root / "pair", n=2, seed=3, arc_deg=10, scene_name="pair")
    (root / "blank").mkdir()
    for k in range(3):
        cv2.imwrite(str(root / "blank" / f"{k}.jpg"), np.full((240, 320, 3), 128, np.uint8))
        rows.append({"id": f"blank{k}", "path": str(root / "blank" / f"{k}.jpg"), "scene": "blank"})
    apart = [PEOPLE / "apollo11_crew_nasa.jpg", PEOPLE / "astronaut_eileen_collins_nasa.jpg"]
    rows += [{"id": f"apart{k}", "path": str(p), "scene": "apart"} for k, p in enumerate(apart)]
    other = synthetic.write_scene(root / "apart", n=1, seed=7, scene_name="apart")
    rows += [{**row, "id": "apart2"} for row in other]
    write_manifest(rows, root / "photos.csv")
    return root


def scratch_folders(client) -> set[str]:
    """The reconstruct op's folders in every worker's temporary directory."""
    def listing() -> list[str]:
        import glob
        import tempfile

        return glob.glob(os.path.join(tempfile.gettempdir(), "daskmv-sfm-*")) + \
            glob.glob(os.path.join(tempfile.gettempdir(), "daskmv-model-*"))

    return {path for paths in client.run(listing).values() for path in paths}


def test_each_scene_gets_its_model_or_its_own_clear_error(mixed, client, tmp_path, run_opts):
    before = scratch_folders(client)
    r = daskmv.run(str(mixed / "photos.csv"), "sfm", str(tmp_path / "recon"), client=client,
                   **{**run_opts, "max_error_rate": 1.0})
    scenes = r.manifest().set_index("id")
    assert sorted(scenes.index) == ["a", "apart", "b", "blank", "pair"]
    a, b = scenes.loc["a"], scenes.loc["b"]
    assert a["status"] == "ok" and a["n_images"] == 9 and a["n_registered"] == 8
    assert json.loads(a["unregistered"]) == ["apollo11_crew_nasa.jpg"]
    assert b["status"] == "ok" and b["n_registered"] == 6
    assert "only 2 of 2 images" in scenes.loc["pair", "error"] and "at least 3" in scenes.loc["pair", "error"]
    assert scenes.loc["blank", "status"] == "error" and "the image is blank" in scenes.loc["blank", "error"]
    assert scenes.loc["apart", "status"] == "error" and "no verified image pair" in scenes.loc["apart", "error"]
    # without metric cues the model is normalised: the cameras' median distance from their centroid is 1
    assert a["scale_source"] == NORMALISED
    _, rec = model_of(r.manifest_path, "b")
    centres = np.array([im.projection_center() for im in rec.images.values()])
    assert np.median(np.linalg.norm(centres - centres.mean(0), axis=1)) == pytest.approx(1.0, rel=1e-6)
    # nothing of a scene stays in the workers' temporary folders (26 MB each on a 60-view room)
    assert scratch_folders(client) - before == set()


def test_sift_sees_colmaps_grey_image_and_finds_pycolmaps_own_features(tmp_path):
    """The features op on a colour photo gives exactly what pycolmap's own extract_features stores for the
    same file: the same grey image (Rec. 709, rounded half up), so the same keypoints and descriptors."""
    from daskmv.sfm.features import Features, colmap_grey

    image, _ = synthetic.render(synthetic.room(5), synthetic.orbit(1, seed=5)[0])
    folder = tmp_path / "images"
    folder.mkdir()
    cv2.imwrite(str(folder / "view.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    assert np.array_equal(colmap_grey(image), np.asarray(pycolmap.Bitmap.read(str(folder / "view.png"), False)
                                                         .to_array()).squeeze())
    pycolmap.extract_features(tmp_path / "db.db", folder)
    with pycolmap.Database.open(str(tmp_path / "db.db")) as db:
        (stored,) = db.read_all_images()
        keypoints, descriptors = db.read_keypoints(stored.image_id), db.read_descriptors(stored.image_id)
    op = Features()
    op.setup("cpu")
    got = op.process([{"image": image}])[0]
    assert len(got["keypoints"]) == len(keypoints) > 1000
    assert np.allclose(got["keypoints"], keypoints, atol=1e-3)
    assert np.array_equal(got["descriptors"], np.asarray(getattr(descriptors, "data", descriptors)))


def test_sift_on_an_image_above_max_image_size_equals_pycolmaps(tmp_path):
    """An image with a side above ``max_image_size`` is resized as pycolmap's extractor resizes it, and the
    keypoints are mapped back to the full image as pycolmap maps them: the same features as pycolmap's."""
    from daskmv.sfm.features import Features

    # 640 x 470 to 500 x 367: x and y scale by 1.28 and 1.2807, so a swapped or shared scale shows
    image, _ = synthetic.render(synthetic.room(5), synthetic.orbit(1, width=640, height=470, seed=5)[0])
    folder = tmp_path / "images"
    folder.mkdir()
    cv2.imwrite(str(folder / "view.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    options = pycolmap.FeatureExtractionOptions()
    options.max_image_size = 500
    pycolmap.extract_features(tmp_path / "db.db", folder, extraction_options=options)
    with pycolmap.Database.open(str(tmp_path / "db.db")) as db:
        (stored,) = db.read_all_images()
        keypoints, descriptors = db.read_keypoints(stored.image_id), db.read_descriptors(stored.image_id)
    op = Features(max_image_size=500)
    op.setup("cpu")
    got = op.process([{"image": image}])[0]
    assert (got["width"], got["height"]) == (640, 470)
    assert len(got["keypoints"]) == len(keypoints) > 500
    assert np.allclose(got["keypoints"][:, :2], keypoints[:, :2], atol=1e-4)  # full-image positions
    assert keypoints[:, 0].max() > 600 and keypoints[:, 1].max() > 450  # ... beyond the resized image
    # the affine shape: COLMAP scales its columns, we its rows; the same for a uniform resize
    assert np.allclose(got["keypoints"][:, 2:], keypoints[:, 2:], atol=1e-2)
    assert np.array_equal(got["descriptors"], np.asarray(getattr(descriptors, "data", descriptors)))
    # images with a side that is or would become too short are row errors (a 1 px side crashed the worker)
    with pytest.raises(RowError, match="its short side would be 1 px, too thin for features"):
        op._one({"image": np.full((7000, 20, 3), 128, np.uint8)})
    with pytest.raises(RowError, match="the image is 300x10: too small for features"):
        op._one({"image": np.zeros((10, 300), np.uint8)})


def test_tiled_features_equal_untiled_ones():
    cam = synthetic.orbit(1, width=1600, height=1200, seed=3)[0]
    image, _ = synthetic.render(synthetic.room(3), cam)
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    extractor = Extractor("pycolmap", 100_000, 0.0067, False)
    whole, _ = extractor(gray)
    tiled, _ = extract(gray, extractor, tile_above=1000, tile_size=640, tile_overlap=128)

    def found(a: np.ndarray, b: np.ndarray) -> float:
        import torch

        d = torch.cdist(torch.from_numpy(a[:, :2]), torch.from_numpy(b[:, :2])).min(dim=1).values
        return float((d < 1.0).float().mean())

    assert len(whole) > 5000
    assert found(whole, tiled) > 0.98 and found(tiled, whole) > 0.98
    assert abs(len(tiled) - len(whole)) < 0.02 * len(whole)  # overlaps de-duplicated


def test_tiled_features_register_the_same_images(room, client, tmp_path, run_opts):
    tiles = {"tile_above": 500, "tile_size": 320, "tile_overlap": 64}
    r = daskmv.run(str(room / "photos.csv"), [{"sfm": {"features": tiles}}], str(tmp_path / "recon"),
                   client=client, **run_opts)
    scene = r.manifest().iloc[0]
    assert scene["status"] == "ok" and scene["n_registered"] == 12
    rot, _ = evaluate.relative_errors(evaluate.poses(model_of(r.manifest_path, "room0")[1]), truth_of(room / "images"))
    assert rot.max() < 0.5


MEMORY_PROBE = """
import sys, cv2, numpy as np
from daskmv.sfm.features import Extractor, extract
from daskmv.sfm.synthetic import _texture

def rss(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1]) * 1024

gray = np.ascontiguousarray(cv2.GaussianBlur(_texture((1800, 2400), 5)[..., 1], (0, 0), 3))
before = rss("VmRSS")
with open("/proc/self/clear_refs", "w") as fh:  # reset the peak: a forked child starts with its parent's
    fh.write("5")
extract(gray, Extractor("pycolmap", 4096, 0.0067, False), tile_above=int(sys.argv[1]), tile_size=1024, tile_overlap=128)
print(rss("VmHWM") - before)
"""


def test_tiling_bounds_the_extractors_memory_by_the_tile(tmp_path):
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux's /proc/self/clear_refs to measure a peak")
    def peak(tile_above: int) -> int:
        out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tile_above)], capture_output=True, text=True,
                             check=True)
        return int(out.stdout.strip().splitlines()[-1])

    whole, tiled = peak(0), peak(1000)
    assert tiled < whole / 3, (whole, tiled)
    # bounded by a 1024 x 1024 tile's scale space (~260 bytes a pixel) and the extractor's own buffers, not by
    # the 2400 x 1800 image's (measured 156-317 MB tiled, 830-950 MB whole)
    assert tiled < 400 * 1024 * 1024, tiled


def test_match_alone_over_a_pair_manifest_draws_its_verified_matches(client, tmp_path, run_opts):
    rows = synthetic.write_scene(tmp_path / "views", n=4, seed=5, arc_deg=30)
    pairs = [{"id": f"pair{k}", "path_a": rows[k]["path"], "path_b": rows[k + 1]["path"]} for k in range(3)]
    pairs.append({"id": "stranger", "path_a": rows[0]["path"], "path_b": str(PEOPLE / "apollo11_crew_nasa.jpg")})
    manifest = write_manifest(pairs, tmp_path / "pairs.csv")
    spec = [{"match": {"extract": True, "draw": True, "features": {"max_features": 2000}}}]
    r = daskmv.run(str(manifest), spec, str(tmp_path / "out"), client=client, path_column="path_a", **run_opts)
    frame = r.manifest()
    assert frame["status"].tolist() == ["ok"] * 4
    assert (frame["n_inliers"][:3] > 200).all() and frame["n_inliers"][3] == 0
    for k, row in frame.iterrows():
        matches = load_output(r.manifest_path, row["id"], "matches")
        ka = load_output(r.manifest_path, row["id"], "keypoints_a")
        kb = load_output(r.manifest_path, row["id"], "keypoints_b")
        assert matches.shape == (row["n_inliers"], 2) and matches.dtype == np.uint32
        if len(matches):
            assert matches[:, 0].max() < len(ka) and matches[:, 1].max() < len(kb)
        picture = load_output(r.manifest_path, row["id"], "picture")
        assert picture.shape[0] == 360 and picture.shape[2] == 3
        geometry = json.loads(row["geometry"])
        assert geometry["config"] in ("CALIBRATED", "UNCALIBRATED", "PLANAR", "PLANAR_OR_PANORAMIC") if k < 3 else True


def _tiny_models(folder: Path) -> tuple[str, str]:
    """A randomly initialised keypoint + descriptor network and a learned-projection matcher, as TorchScript."""
    import torch

    class TinyExtractor(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.score = torch.nn.Conv2d(1, 1, 5, padding=2)
            self.describe = torch.nn.Conv2d(1, 16, 5, padding=2)

        def forward(self, image: torch.Tensor):
            scores = self.score(image)[0, 0]
            w = scores.shape[1]
            top = torch.topk(scores.flatten(), 300).indices
            y, x = top // w, top % w
            desc = self.describe(image)[0][:, y, x].T
            kpts = torch.stack([x, y], dim=1).float()
            return kpts, torch.nn.functional.normalize(desc, dim=1), scores.flatten()[top]

    class TinyMatcher(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.project = torch.nn.Linear(16, 16)

        def forward(self, ka: torch.Tensor, da: torch.Tensor, kb: torch.Tensor, db: torch.Tensor):
            sim = self.project(da[0]) @ self.project(db[0]).T
            ab, ba = sim.argmax(1), sim.argmax(0)
            idx = torch.arange(sim.shape[0])
            keep = ba[ab] == idx
            return torch.stack([idx[keep], ab[keep]], dim=1)

    torch.manual_seed(0)
    ext, mat = str(folder / "extractor.pt"), str(folder / "matcher.pt")
    torch.jit.script(TinyExtractor()).save(ext)
    torch.jit.script(TinyMatcher()).save(mat)
    return ext, mat


def test_a_learned_extractor_and_matcher_plug_in(client, tmp_path, run_opts):
    import torch

    ext, mat = _tiny_models(tmp_path)
    rows = synthetic.write_scene(tmp_path / "views", n=2, seed=6, arc_deg=10)
    manifest = write_manifest([{"id": "p", "path_a": rows[0]["path"], "path_b": rows[1]["path"]}], tmp_path / "pairs.csv")
    spec = [{"match": {"extract": True, "features": {"model": ext}, "model": mat, "min_inliers": 8}}]
    r = daskmv.run(str(manifest), spec, str(tmp_path / "out"), client=client, path_column="path_a", **run_opts)
    row = r.manifest().iloc[0]
    assert row["status"] == "ok", row["error"]
    # the same putative matches as calling the two networks directly
    extractor, matcher = torch.jit.load(ext), torch.jit.load(mat)
    feats = []
    for p in (rows[0]["path"], rows[1]["path"]):
        gray = torch.from_numpy(cv2.imread(p, cv2.IMREAD_GRAYSCALE)).float().div(255)[None, None]
        k, d, _ = extractor(gray)
        feats.append((k[None], d[None]))
    expected = matcher(feats[0][0], feats[0][1], feats[1][0], feats[1][1])
    assert row["n_putative"] == len(expected) > 0
    ka = load_output(r.manifest_path, row["id"], "keypoints_a")
    direct = feats[0][0][0].numpy()
    assert ka.shape == (300, 6)  # the same keypoints (in any order: the random net's scores tie)
    assert np.array_equal(np.unique(ka[:, :2] - 0.5, axis=0), np.unique(direct, axis=0))


def test_mutual_nearest_neighbours_match_a_brute_force_reference():
    rng = np.random.default_rng(0)
    base = rng.random((700, 128)) ** 3
    a = base[:500] + 0.02 * rng.random((500, 128))
    b = np.concatenate([base[100:700] + 0.02 * rng.random((600, 128)), rng.random((200, 128)) ** 3])

    def root_sift(x: np.ndarray) -> np.ndarray:
        x = np.sqrt(x / x.sum(1, keepdims=True))
        return np.clip(np.round(x * 512), 0, 255).astype(np.uint8)

    da, db = root_sift(a), root_sift(b)

    def reference(x: np.ndarray, y: np.ndarray, ratio: float = 0.8, max_distance: float = 0.7) -> set:
        """COLMAP's SIFT matching, spelled out on the whole distance matrix: L2 between descriptors at unit
        length (uint8 at COLMAP's 512), each direction's nearest within max_distance and passing the ratio
        test (both directions), kept when the two directions agree."""
        if x.dtype == np.uint8:
            xf, yf = x.astype(np.float64) / 512, y.astype(np.float64) / 512
        else:
            xf = x / np.linalg.norm(x, axis=1, keepdims=True)
            yf = y / np.linalg.norm(y, axis=1, keepdims=True)
        dist = np.sqrt(np.clip((xf**2).sum(1)[:, None] + (yf**2).sum(1)[None, :] - 2 * xf @ yf.T, 0, None))

        def one_way(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            order = np.argsort(d, axis=1, kind="stable")[:, :2]
            best, second = np.take_along_axis(d, order, 1).T
            return order[:, 0], (best <= max_distance) & (best < ratio * second)

        (fwd, fwd_ok), (back, back_ok) = one_way(dist), one_way(dist.T)
        return {(i, int(j)) for i, j in enumerate(fwd) if fwd_ok[i] and back_ok[j] and back[j] == i}

    for x, y in ((da, db), (da.astype(np.float32), db.astype(np.float32))):
        expected = reference(x, y)
        assert len(expected) > 300
        for block in (1 << 24, None, 1000):  # the whole matrix, the device's default, 1 row of b's 800
            got = {tuple(m) for m in mutual_nearest(x, y, block=block).tolist()}
            assert len(got ^ expected) <= 0.01 * len(expected)  # ranked by dot product: equal up to near-ties

    # b's nearest two in a are twins (as far from it): a's side of each pair is unambiguous, b's is not
    twin = np.concatenate([da[:1], da[:1]]).astype(int)
    twin[0, :4] -= 1
    twin[1, 4:8] -= 1
    twin = np.clip(twin, 0, 255).astype(np.uint8)
    assert mutual_nearest(twin, da[:1]).shape == (0, 2)
    assert mutual_nearest(twin[:1], da[:1]).tolist() == [[0, 0]]  # one each: no second, the ratio test passes
    assert mutual_nearest(da[:0], db).shape == (0, 2)


def test_read_only_descriptors_are_prepared_once_per_process_and_match_the_same():
    """Rows read through array references are read-only and shared: an image's integer operands are made
    once for all its pairs. A writable array could change between pairs, so it is prepared every time."""
    from daskmv.sfm.match import _operands

    rng = np.random.default_rng(1)
    a = np.clip(rng.normal(40, 30, (900, 128)), 0, 255).astype(np.uint8)
    b = np.clip(a[rng.permutation(900)[:700]] + rng.normal(0, 4, (700, 128)), 0, 255).astype(np.uint8)
    fresh = mutual_nearest(a, b)
    assert _operands(a) is not _operands(a)  # writable: never kept
    ra, rb = a.copy(), b.copy()
    ra.flags.writeable = rb.flags.writeable = False
    assert _operands(ra) is _operands(ra) and _operands(rb) is not _operands(ra)
    assert np.array_equal(mutual_nearest(ra, rb), fresh) and np.array_equal(mutual_nearest(ra, rb), fresh)
    assert len(fresh) > 500


def test_scale_fusion_keeps_one_percent_with_a_fifth_of_wild_samples():
    rng = np.random.default_rng(1)
    good = 2.5 * (1 + 0.03 * rng.standard_normal(8000))
    wild = rng.uniform(0.01, 50, 2000)
    fused = fuse(np.concatenate([good, wild]))
    assert fused.scale == pytest.approx(2.5, rel=0.01)
    assert 7000 < fused.inliers < 10000 and 0 < fused.spread < 0.1


def test_retrieval_and_auto_pairs_grow_with_n_times_k():
    rng = np.random.default_rng(2)
    n, k = 300, 6
    t = np.arange(n)[:, None] / n
    freq = np.arange(1, 9)[None, :]
    walk = np.concatenate([np.cos(2 * np.pi * freq * t), np.sin(2 * np.pi * freq * t)], 1).astype(np.float32)
    walk += 0.01 * rng.standard_normal(walk.shape).astype(np.float32)  # a loop: neighbours are adjacent rows
    table = pa.table({"id": [f"f{i}" for i in range(n)], "scene": ["s"] * (n - 10) + ["t"] * 10,
                      "global": pa.array(list(walk), pa.list_(pa.float32()))})
    retrieval = Pairs(by="scene", mode="retrieval", column="global", k=k).run(table)
    assert len(retrieval) <= (n - 10) * k + 10 * 9 and len(retrieval) >= (n - 10) * k / 2
    assert "global_a" not in retrieval.column_names  # the embedding is consumed, not copied onto every pair
    exhaustive = Pairs(by="scene", mode="exhaustive", column="global").run(table)  # the sfm pipeline's spelling
    assert "global_a" not in exhaustive.column_names and len(exhaustive) == 290 * 289 // 2 + 45
    ids = set(retrieval.column("id").to_pylist())
    assert "f0|f1" in ids and "f100|f101" in ids  # each point's nearest are its neighbours on the path
    auto = Pairs(by="scene", mode="auto", column="global", k=k, exhaustive_up_to=40).run(table)
    scenes = auto.column("scene").to_pylist()
    assert scenes.count("t") == 45 and scenes.count("s") == len(retrieval.filter(pa.compute.equal(
        retrieval.column("scene"), "s")))
    sequential = Pairs(mode="sequential", window=2, column="global", k=2).run(table)
    assert len(sequential) >= 2 * n - 3
    no_scene = Pairs(by="scene", default_group="all", mode="exhaustive").run(table.drop_columns(["scene"]).slice(0, 5))
    assert no_scene.column("scene").to_pylist() == ["all"] * 10


def test_the_global_mapper_with_known_camera_positions_gives_a_metric_model(room, client, tmp_path, run_opts):
    """GLOMAP instead of COLMAP's incremental mapper, and RTK-GPS-like positions (2 cm noise) as the metric cue."""
    truth = synthetic.read_truth(room / "images")
    frame = pd.read_csv(room / "photos.csv")
    rng = np.random.default_rng(3)
    centres = np.array([truth[os.path.basename(p)].center for p in frame["path"]])
    frame[["x", "y", "z"]] = centres + 0.02 * rng.standard_normal(centres.shape)
    frame.drop(columns=["depth"]).to_csv(tmp_path / "photos.csv", index=False)
    spec = [{"sfm": {"reconstruct": {"mapper": "global", "position_columns": ["x", "y", "z"]}}}]
    r = daskmv.run(str(tmp_path / "photos.csv"), spec, str(tmp_path / "recon"), client=client, **run_opts)
    scene = r.manifest().iloc[0]
    assert scene["status"] == "ok", scene["error"]
    assert scene["n_registered"] == 12 and scene["scale_source"].startswith("metric: positions")
    estimated = evaluate.poses(model_of(r.manifest_path, "room0")[1])
    rot, _ = evaluate.relative_errors(estimated, truth_of(room / "images"))
    _, scale = evaluate.centre_errors(estimated, truth_of(room / "images"))
    assert rot.max() < 1.0 and abs(scale - 1) < 0.01, (rot.max(), scale)


def test_opencv_sift_features_match_and_verify():
    from daskmv.sfm.features import Features
    from daskmv.sfm.match import verify

    cams = synthetic.orbit(2, seed=8, arc_deg=10)
    scene = synthetic.room(8)
    op = Features(backend="opencv", max_features=3000)
    op.setup("cpu")
    a, b = (op.process([{"image": synthetic.render(scene, cam)[0]}])[0] for cam in cams)
    assert a["descriptors"].dtype == np.uint8 and a["keypoints"].shape[1] == 6 and 1000 < len(a["keypoints"]) <= 3000
    inliers, geometry = verify(a["keypoints"], (640, 480), b["keypoints"], (640, 480),
                               mutual_nearest(a["descriptors"], b["descriptors"]))
    assert len(inliers) > 300 and geometry["config"] in ("CALIBRATED", "UNCALIBRATED")


def test_vlad_sums_each_words_residuals():
    """VLAD spelled out: per visual word, the sum of (descriptor - word) over the descriptors nearest it."""
    from daskmv.sfm.retrieval import VOCABULARY, _words, vlad

    words = _words(VOCABULARY)
    rng = np.random.default_rng(3)
    desc = (rng.random((3000, 128)) ** 3 * 255).astype(np.uint8)
    d = desc.astype(np.float64)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    nearest = np.argmax(d @ words.T.astype(np.float64), axis=1)
    residuals = np.zeros(words.shape)
    for i, w in enumerate(nearest):
        residuals[w] += d[i] - words[w]
    residuals /= np.maximum(np.linalg.norm(residuals, axis=1, keepdims=True), 1e-12)
    v = np.sign(residuals.ravel()) * np.sqrt(np.abs(residuals.ravel()))
    assert np.allclose(vlad(desc, words, dim=None), v / np.linalg.norm(v), atol=1e-5)
    assert np.allclose(vlad(desc[:0], words, dim=None), 0)


def test_global_descriptors_rank_overlapping_views_first(tmp_path):
    """VLAD (and a torch embedding model through the same op) puts each view's neighbours on the orbit
    nearest: what retrieval pairing relies on."""
    import torch

    from daskmv.sfm.features import Features
    from daskmv.sfm.retrieval import GlobalDescriptor

    scene = synthetic.room(9)
    n = 24  # 15 degrees apart around the room
    images = [synthetic.render(scene, cam)[0] for cam in synthetic.orbit(n, seed=9, width=320, height=240)]
    features = Features(max_features=2000)
    features.setup("cpu")
    vlad = GlobalDescriptor()
    vectors = np.array([vlad.process([{"descriptors": features.process([{"image": im}])[0]["descriptors"]}])[0]["global"]
                        for im in images])
    assert vectors.shape == (n, 1024) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    sim = vectors @ vectors.T
    np.fill_diagonal(sim, -1)
    top3 = np.argsort(-sim, axis=1)[:, :3]
    ring = np.abs((top3 - np.arange(n)[:, None] + n // 2) % n - n // 2)  # steps along the loop
    # the nearest is a near view: 0.92 measured (chance: 4 of 23 views, 0.17; 0.71 when projected to 256)
    assert (ring[:, 0] <= 2).mean() >= 0.85, ring[:, 0]
    assert (ring == 1).any(axis=1).mean() >= 0.9, ring  # an adjacent view among the 3 nearest (0.96 measured)

    class Pool(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)

    torch.jit.script(Pool()).save(str(tmp_path / "pool.pt"))
    embed = GlobalDescriptor(model=str(tmp_path / "pool.pt"), size=64)
    embed.setup("cpu")
    out = embed.process([{"image": images[0]}])[0]["global"]
    assert out.shape == (48,) and np.linalg.norm(out) == pytest.approx(1.0)


def test_ransac_trials_are_bounded_by_the_smallest_acceptable_geometry():
    from daskmv.sfm.match import ransac_trials

    assert ransac_trials(15, 15) == 100  # all must be inliers: pycolmap's minimum (fewer is refused by its check)
    assert 2000 < ransac_trials(35, 15) < 3000  # (15/35)^7 -> about 2,550 trials for 99.9 %
    assert ransac_trials(60, 15) == 10000 and ransac_trials(50_000, 15) == 10000  # no bound: COLMAP's cap
    assert ransac_trials(16, 15) >= 100


def test_the_scene_maker_writes_a_manifest_whose_paths_resolve_beside_it(tmp_path, monkeypatch):
    """`python -m daskmv.sfm.synthetic FOLDER` (what `make demo` runs) from another working directory."""
    monkeypatch.chdir(tmp_path)
    synthetic.main(["scenes/room", "--views", "3", "--depth"])
    frame = pd.read_csv(tmp_path / "scenes/room/photos.csv")
    assert len(frame) == 3 and not frame["path"].str.startswith(("/", "scenes")).any()
    for column in ("path", "depth"):
        assert all((tmp_path / "scenes/room" / p).is_file() for p in frame[column])


def test_mapper_options_are_checked_before_any_work(room, tmp_path):
    """pycolmap's options by name: a misspelt one, a wrong type, or one a parameter owns is refused with a
    clear message before anything runs."""
    def run(options: dict) -> None:
        spec = [{"sfm": {"reconstruct": {"mapper_options": options}}}]
        daskmv.run(str(room / "photos.csv"), spec, str(tmp_path / "out"), progress="none")

    with pytest.raises(PipelineError, match="no option 'ba_global_frame_ratio' .did you mean ba_global_frames_ratio"):
        run({"ba_global_frame_ratio": 1.3})
    with pytest.raises(PipelineError, match="IncrementalPipelineOptions.mapper has no option 'nope'"):
        run({"mapper": {"nope": 1}})
    with pytest.raises(PipelineError, match="ba_global_frames_ratio takes a float .default 1.1., not 'often'"):
        run({"ba_global_frames_ratio": "often"})
    with pytest.raises(PipelineError, match="mapper.init_min_tri_angle takes a float"):
        run({"mapper": {"init_min_tri_angle": "wide"}})
    with pytest.raises(PipelineError, match="IncrementalPipelineOptions.mapper is a group of options"):
        run({"mapper": 5})
    with pytest.raises(PipelineError, match="set 'num_threads' with the parameter 'threads'"):
        run({"num_threads": 8})
    assert not (tmp_path / "out").exists()
    with pytest.raises(PipelineError, match=r"'random_seed' with the parameter 'seed'.*GlobalPipelineOptions.mapper"):
        Reconstruct(mapper="global", mapper_options={"mapper": {"random_seed": 1}})
    options = Reconstruct(mapper_options={"ba_global_frames_ratio": 1.3, "mapper": {"init_min_num_inliers": 80}},
                          threads=2)._options()
    assert (options.ba_global_frames_ratio, options.mapper.init_min_num_inliers, options.num_threads) == (1.3, 80, 2)
    assert Reconstruct(mapper="global", min_images=5, mapper_options={"min_num_matches": 20})._options() \
        .min_model_size == 5  # min_images reaches both mappers


def _shifted_pair(shift: tuple[int, int] = (700, 300), n: int = 3000, seed: int = 0):
    """Features of a 3000x2000 image a and of b, the same scene moved by ``shift`` plus 500 unrelated
    keypoints; the true matches are a's keypoints that land inside b."""
    rng = np.random.default_rng(seed)
    size = (3000, 2000)
    xy_a = rng.uniform(0, 1, (n, 2)) * size + 0.5
    desc_a = rng.standard_normal((n, 128)).astype(np.float32)
    xy_b = xy_a + shift
    inside = np.flatnonzero((xy_b[:, 0] < size[0]) & (xy_b[:, 1] < size[1]))
    extra = rng.uniform(0, 1, (500, 2)) * size + 0.5
    xy_b = np.concatenate([xy_b[inside], extra])
    desc_b = np.concatenate([desc_a[inside], rng.standard_normal((500, 128)).astype(np.float32)])
    layout = [np.zeros((len(xy), 6), np.float32) for xy in (xy_a, xy_b)]
    for kp, xy in zip(layout, (xy_a, xy_b)):
        kp[:, :2], kp[:, 2], kp[:, 5] = xy, 1.0, 1.0
    truth = np.stack([inside, np.arange(len(inside))], axis=1)
    return (layout[0], desc_a, size), (layout[1], desc_b, size), truth


def test_a_learned_matcher_on_giant_images_sees_one_tile_a_side_and_finds_every_match(tmp_path, monkeypatch):
    """Tile against tile: every call sees only the keypoints one tile owns on each side, in the tile's own
    pixel coordinates, and the matches mapped back to the full images are all the true ones, once each."""
    import torch

    from daskmv.sfm.features import owned, tiles
    from daskmv.sfm.learned import LearnedMatcher, tiled_matches
    from daskmv.sfm.match import Match
    from nets import EqualMatcher

    (ka, da, size_a), (kb, db, size_b), truth = _shifted_pair()
    torch.jit.script(EqualMatcher()).save(str(tmp_path / "equal.pt"))
    net = LearnedMatcher(str(tmp_path / "equal.pt"), "cpu")
    largest_tile = max(int(owned(k, part).sum()) for k in (ka, kb) for *_, part in tiles(3000, 2000, 1024, 128))
    grid = tiles(3000, 2000, 1024, 128)
    origins = {(float(x0), float(y0)) for x0, y0, *_ in grid}

    def tile_of(k: np.ndarray) -> np.ndarray:
        return np.argmax([owned(k, part) for *_, part in grid], axis=0)

    # decoys: copies of 5 of a's descriptors, in b's top-left tile, far from where those 5 truly go; each
    # decoy's tile pair has 1 match, each true one at least 20: the true matches must win
    tile_a, tile_b = tile_of(ka[truth[:, 0]]), tile_of(kb[truth[:, 1]])
    tile_pairs, counts = np.unique(np.stack([tile_a, tile_b]), axis=1, return_counts=True)
    strength = {(int(ta), int(tb)): int(n) for (ta, tb), n in zip(tile_pairs.T, counts)}
    strong = [i for i in range(len(truth)) if strength[tile_a[i], tile_b[i]] >= 20 and tile_a[i] > 0]  # not a's top-left
    sources = [strong[np.flatnonzero(tile_a[strong] == t)[0]] for t in sorted(set(tile_a[strong]))[:5]]
    assert len(sources) == 5
    decoys = np.tile(kb[:1], (5, 1))
    decoys[:, :2] = [[100.0 + 40 * k, 200.0] for k in range(5)]
    kb, db = np.concatenate([kb, decoys]), np.concatenate([db, da[truth[sources, 0]]])
    doubled = {d.tobytes() for d in db[-5:]}  # in b twice (true copy and decoy): not a position's name
    where_a = {d.tobytes(): k[:2] for k, d in zip(ka, da)}
    where_b = {d.tobytes(): k[:2] for k, d in zip(kb, db) if d.tobytes() not in doubled}
    calls = []

    def matcher(k1, d1, k2, d2):
        calls.append((len(k1), len(k2)))
        for k, d, where in ((k1, d1, where_a), (k2, d2, where_b)):
            offsets = np.unique([where[row.tobytes()] - xy[:2] for xy, row in zip(k, d) if row.tobytes() in where],
                                axis=0)
            assert len(offsets) == 1 and tuple(offsets[0]) in origins  # the tile's pixels: full - its origin
        return net(k1, d1, k2, d2)

    got = tiled_matches(matcher, ka, da, size_a, kb, db, size_b, tile_size=1024, overlap=128)
    assert len(calls) == 12 * 12  # 4 x 3 tiles a side
    assert max(max(c) for c in calls) <= largest_tile < len(kb) / 4  # a twelfth of the image, give or take
    assert np.array_equal(got.astype(np.int64), truth)  # every true match once, no decoy
    with pytest.raises(PipelineError, match="tile_overlap must be between 16 px"):
        Match(model=str(tmp_path / "equal.pt"), tile_above=2500, tile_size=1024, tile_overlap=8)
    # the op takes the tiled path above tile_above, and the whole images below it
    row = {"array:keypoints_path_a": ka, "array:descriptors_path_a": da, "width_a": 3000, "height_a": 2000,
           "array:keypoints_path_b": kb, "array:descriptors_path_b": db, "width_b": 3000, "height_b": 2000}
    import daskmv.sfm.learned as learned

    tiled_calls = []
    monkeypatch.setattr(learned, "tiled_matches", lambda *a, **k: tiled_calls.append(1) or tiled_matches(*a, **k))
    for tile_above in (2500, 0):  # tiled (3000 px is above), then whole: the same matches
        op = Match(model=str(tmp_path / "equal.pt"), tile_above=tile_above, tile_size=1024, min_inliers=8)
        op.setup("cpu")
        (out,) = op.process([dict(row)])
        assert out["n_putative"] == len(truth) and len(tiled_calls) == 1
    with pytest.raises(PipelineError, match="tile_above is for learned matchers"):
        Match(tile_above=2500)
