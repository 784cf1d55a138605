"""Gaussian splatting per scene on CPU, through the engine: a synthetic scene with known cameras trains until
its held-out views' PSNR rises; the PLY round-trips; a run killed mid-training resumes from its checkpoint;
scenes with a missing model or unreadable images are scene errors while the others go on."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import daskmv
from daskmv.data import load_output
from daskmv.pipeline import Pipeline
from daskmv.splat.ply import read_ply, write_ply
from daskmv.splat.scene import load_scene
from daskmv.splat.synthetic import write_scene
from daskmv.splat.train import TrainConfig, Trainer

#: Held-out PSNR gained by 200 steps on the 16-view synthetic scene (measured: about +5 dB; documented: 3 dB).
MARGIN_DB = 3.0
QUICK = {"steps": 200, "sh_degree": 1, "sh_every": 100, "refine_start": 100, "refine_every": 50, "refine_stop": 160,
         "checkpoint_every": 10}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("splat")
    write_scene(str(folder / "room"), n_views=16)
    shutil.copytree(folder / "room", folder / "no_images")
    for image in (folder / "no_images" / "images").iterdir():
        image.write_bytes(b"not a png")
    pd.DataFrame({"id": ["room", "missing", "no_images"],
                  "model_path": ["room", "nowhere", "no_images"]}).to_csv(folder / "scenes.csv", index=False)
    return folder


def test_a_scene_trains_and_scene_errors_stay_their_own(scenes, client, tmp_path):
    result = daskmv.run(str(scenes / "scenes.csv"), [{"splat": QUICK}], str(tmp_path / "out"), client=client,
                        progress="none", max_error_rate=1.0)
    frame = result.manifest().set_index("id")
    room = frame.loc["room"]
    assert room["status"] == "ok", room["error"]
    assert room["psnr"] > room["psnr_start"] + MARGIN_DB, (room["psnr_start"], room["psnr"])
    assert 0 < room["ssim"] <= 1 and room["num_gaussians"] > 200 and room["renderer"] == "reference"
    assert pd.isna(room["resumed_from"]) and pd.isna(room["peak_gpu_mem"])
    heldout = load_output(str(result.manifest_path), "room", "heldout")
    assert heldout.shape == (2, 48, 128, 3) and heldout.dtype == np.uint8  # views 0 and 8: render | photo
    curve = load_output(str(result.manifest_path), "room", "curve")
    assert curve[0, 0] == 1 and curve[-1, 0] == 200 and curve[-1, 1] < curve[0, 1]
    ply = read_ply(str(Path(result.out) / room["splat_path"] / "point_cloud.ply"))
    assert len(ply) == room["num_gaussians"] and ply.sh.shape[1:] == (4, 3)
    assert not (tmp_path / "out" / "work").exists() or not any((tmp_path / "out" / "work").rglob("*.pt"))
    errors = frame["error"].dropna()
    assert set(errors.index) == {"missing", "no_images"}
    assert "does not exist" in errors["missing"] and "cannot be decoded" in errors["no_images"]
    # the report shows held-out renders beside their photos, with PSNR, and the training curve
    from daskmv.report import RunFacts, _ops, row_images

    facts = RunFacts.read(str(tmp_path / "out"))
    labels = [label for label, _ in row_images(facts, facts.rows.set_index("id", drop=False).loc["room"], _ops(facts))]
    assert any(label.startswith("held-out render | photo, PSNR") for label in labels) and "training loss" in labels


def test_the_ply_round_trips(tmp_path):
    scene = load_scene(str(Path(write_scene(str(tmp_path / "s"), n_views=4, n_gaussians=50, n_points=40))))
    trainer = Trainer(scene, TrainConfig(steps=5, sh_degree=3, sh_every=1))
    trainer.train()
    g = trainer.gaussians()
    back = read_ply(write_ply(str(tmp_path / "g.ply"), g))
    for name in ("means", "sh", "opacity_logits", "log_scales", "quats"):
        np.testing.assert_array_equal(getattr(back, name), getattr(g, name).astype(np.float32))
    header = (tmp_path / "g.ply").read_bytes()[:2000].split(b"end_header")[0].decode()
    assert "property float f_rest_44" in header and "property float rot_3" in header


def test_training_resumes_from_a_checkpoint_where_it_stopped(scenes, tmp_path):
    torch.set_num_threads(1)  # one thread: the two runs' sums are added in the same order
    scene = load_scene(str(scenes / "room"))
    config = TrainConfig(**{**QUICK, "steps": 60, "refine_start": 20, "refine_every": 20, "refine_stop": 50})
    straight = Trainer(scene, config)
    straight.train()
    first = Trainer(scene, config)
    while first.step < 30:
        first.train_step()
    first.save_checkpoint(str(tmp_path / "ck.pt"))
    resumed = Trainer(scene, config)
    assert resumed.resume(str(tmp_path / "ck.pt")) == 30 and resumed.step == 30
    for name, value in first.params.items():
        assert torch.equal(resumed.params[name], value)
    resumed.train()
    assert resumed.step == 60 and resumed.n == straight.n
    for name, value in straight.params.items():
        torch.testing.assert_close(resumed.params[name], value, rtol=1e-5, atol=1e-6)
    assert resumed.curve == straight.curve


def test_a_worker_killed_mid_training_resumes_the_scene(scenes, tmp_path):
    manifest = tmp_path / "one.csv"
    pd.DataFrame({"id": ["room"], "model_path": [str(scenes / "room")]}).to_csv(manifest, index=False)
    steps = [{"testops:SplatDies": {**QUICK, "steps": 40, "refine_start": 1000, "die_at": 25}}]
    result = daskmv.run(str(manifest), steps, str(tmp_path / "out"), workers=1, progress="none", retry_delay=0.1)
    row = result.manifest().iloc[0]
    assert row["status"] == "ok" and row["resumed_from"] == 20  # the checkpoint before the worker died
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["failed_attempts"] or run["counts"]["computed_partitions"] == 1


def test_the_op_called_directly_leaves_no_temporary_folder_when_training_fails(scenes, tmp_path, monkeypatch):
    """Without the engine's workdir the op trains in a temporary folder: removed when training fails (a
    failed scene must not leave its checkpoints on the worker's disk) and when it succeeds."""
    import tempfile

    from daskmv.errors import RowError
    from daskmv.splat.op import Splat

    class FailsAt(Splat):
        def after_step(self, step):
            if step == 12:
                raise RowError("stopped by the test")

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    row = {"model_path": str(scenes / "room"), "manifest_base": ""}
    op = FailsAt(**{**QUICK, "steps": 20, "refine_start": 1000})
    op.setup("cpu")
    (failed,) = op.process([dict(row)])
    assert isinstance(failed, RowError) and "stopped by the test" in str(failed)
    assert not list(tmp_path.glob("daskmv-splat-*"))
    op = Splat(**{**QUICK, "steps": 20, "refine_start": 1000, "checkpoint_every": 5})
    op.setup("cpu")
    (done,) = op.process([dict(row)])
    assert [p.name for p in tmp_path.glob("daskmv-*")] == [os.path.basename(done["splat"])]  # only the artifact
    assert (Path(done["splat"]) / "point_cloud.ply").exists()
    shutil.rmtree(done["splat"])

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    import daskmv.splat.ply

    monkeypatch.setattr(daskmv.splat.ply, "write_ply", disk_full)  # writing the PLY fails: no half-written folder
    with pytest.raises(OSError, match="No space left"):
        op.process([dict(row)])
    assert not list(tmp_path.glob("daskmv-*"))


def _cuda() -> bool:
    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA device")
def test_gpu_gsplat_and_the_reference_renderer_agree(scenes):
    """The same Gaussians through gsplat and the reference renderer: within 0.02 per pixel, 0.002 on average."""
    from daskmv.splat.gsplat_backend import gsplat_rasterizer
    from daskmv.splat.render import render

    rasterize = gsplat_rasterizer("cuda:0", required=True)
    scene = load_scene(str(scenes / "room"))
    trainer = Trainer(scene, TrainConfig(steps=1, sh_degree=1), "cuda:0")
    with torch.no_grad():
        for view in scene.views[:4]:
            trainer.rasterize = rasterize
            fast = trainer.render_view(view)["image"]
            trainer.rasterize = render
            slow = trainer.render_view(view)["image"]
            difference = (fast - slow).abs()
            assert float(difference.max()) < 0.02 and float(difference.mean()) < 0.002


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA device")
def test_gpu_a_60_view_scene_trains_with_gsplat(tmp_path):
    """60 views at 640x480, 7,000 steps on gsplat: held-out PSNR of at least 28 dB (not yet measured on a GPU:
    the threshold is a first guess to confirm when a device is lent)."""
    write_scene(str(tmp_path / "big"), n_views=60, n_gaussians=3000, size=(640, 480), n_points=1500)
    pd.DataFrame({"id": ["big"], "model_path": [str(tmp_path / "big")]}).to_csv(tmp_path / "one.csv", index=False)
    result = daskmv.run(str(tmp_path / "one.csv"), [{"splat": {"steps": 7000, "renderer": "gsplat"}}],
                        str(tmp_path / "out"), progress="none")
    row = result.manifest().iloc[0]
    assert row["status"] == "ok" and row["renderer"] == "gsplat" and row["psnr"] >= 28.0, row.to_dict()


def test_sfm_then_splat_in_one_pipeline(client, tmp_path):
    """`sfm,splat` on photos: the scene's reconstruction is trained in the same run (the splat step reads the
    reconstruct step's model folder by its column's name), and the scenes manifest stays one small row."""
    from daskmv.sfm.synthetic import write_scene as write_room

    rows = write_room(str(tmp_path / "room"), n=8, width=320, height=240, arc_deg=90.0)
    pd.DataFrame(rows).to_csv(tmp_path / "photos.csv", index=False)
    steps = [{"sfm": {"pairs": {"mode": "exhaustive"}}}, {"splat": {**QUICK, "steps": 30, "downscale": 4}}]
    result = daskmv.run(str(tmp_path / "photos.csv"), steps, str(tmp_path / "out"), client=client,
                        progress="none", max_error_rate=1.0)
    row = result.manifest().iloc[0]
    assert row["status"] == "ok", row["error"]
    assert row["n_registered"] >= 6 and row["num_gaussians"] > 0 and np.isfinite(row["psnr"])
    assert (Path(result.out) / row["splat_path"] / "point_cloud.ply").exists()
    assert "path_a" not in result.manifest().columns


def test_parsing_a_splat_pipeline_leaves_torch_out_of_the_client():
    """The driver checks a splat step's parameters without torch (1.7 s of import per run; workers train)."""
    code = ("import json, sys; from daskmv.pipeline import Pipeline; "
            "Pipeline.parse([{'splat': {'steps': 100, 'strategy': 'mcmc'}}]); "
            "print(json.dumps('torch' in sys.modules))")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) is False


def test_a_bad_strategy_is_a_pipeline_error_before_any_work():
    with pytest.raises(daskmv.PipelineError, match="strategy"):
        Pipeline.parse([{"splat": {"strategy": "fast"}}])
