"""``splat``: train one scene's Gaussians per row, on the worker's GPU (gsplat) or its CPU (the reference
renderer), from a COLMAP model: the ``sfm`` pipeline's scenes manifest, or any manifest with a model column.

A scene row's training checkpoints into its ``workdir`` (a folder of the output root that survives retries
and resumed runs), so a killed worker or run resumes the scene from its last checkpoint, not from step 0.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

import numpy as np

from daskmv.errors import PipelineError, RowError
from daskmv.ops.base import Op, Output, Param, Row
from daskmv.ops.registry import register_op
from daskmv.paths import resolve_path

CHECKPOINT = "splat-checkpoint.pt"
RENDERERS = ("auto", "gsplat", "reference")


@register_op
class Splat(Op):
    name = "splat"
    help = ("Train 3D Gaussians per scene row from its COLMAP model (gsplat on a GPU, the reference renderer on "
            "CPU): a 3DGS .ply, held-out renders beside their photos, PSNR/SSIM; checkpoints for resume.")
    gpu = True
    min_partition_rows = 1
    preload = ("torch",)
    params = {
        "model_column": Param("model_path", "the column with each scene's COLMAP model folder"),
        "images_column": Param(None, "the column with each scene's images folder (none: <model>/images)",
                               types=(str, type(None))),
        "steps": Param(7000, "training steps (one view each)"),
        "sh_degree": Param(3, "spherical-harmonics degree (0-3), reached one band every sh_every steps"),
        "sh_every": Param(1000, "steps between SH bands"),
        "strategy": Param("default", "densification: default (3DGS clone/split/prune) or mcmc", ("default", "mcmc")),
        "downscale": Param(1, "train on images this many times smaller"),
        "test_every": Param(8, "hold out every n-th view (by name) for evaluation; 0: none"),
        "refine_start": Param(500, "first densification step"),
        "refine_stop": Param(15000, "densification stops here"),
        "refine_every": Param(100, "steps between densifications"),
        "reset_every": Param(3000, "steps between opacity resets (default strategy)"),
        "grad_threshold": Param(2e-4, "screen-space gradient above which a Gaussian grows (default strategy)"),
        "max_gaussians": Param(1_000_000, "the most Gaussians (mcmc: the budget)"),
        "lr_means": Param(1.6e-4, "means' learning rate, times the scene extent (decays to 1 %)"),
        "lr_scales": Param(5e-3, "log-scales' learning rate"),
        "lr_quats": Param(1e-3, "rotations' learning rate"),
        "lr_opacities": Param(5e-2, "opacity logits' learning rate"),
        "lr_sh0": Param(2.5e-3, "degree-0 colour's learning rate"),
        "lr_shN": Param(2.5e-3 / 20, "higher SH bands' learning rate"),
        "ssim_weight": Param(0.2, "weight of 1 - SSIM in the loss"),
        "checkpoint_every": Param(1000, "steps between checkpoints"),
        "seed": Param(0, "seeds the view order and densification noise"),
        "renderer": Param("auto", "auto (gsplat on CUDA, else reference), gsplat, or reference", RENDERERS),
    }
    outputs = (
        Output("splat", "artifact", "path", "point_cloud.ply (standard 3DGS) and the training settings"),
        Output("heldout", "array", "uint8", "held-out renders beside their photos [views, H, 2W, 3]"),
        Output("curve", "array", "float32", "training loss [points, 2]: step, loss"),
        Output("psnr", "column", "float64", "held-out PSNR (dB)"),
        Output("ssim", "column", "float64", "held-out SSIM"),
        Output("psnr_start", "column", "float64", "held-out PSNR of the initial Gaussians"),
        Output("num_gaussians", "column", "int64", "Gaussians at the end"),
        Output("train_seconds", "column", "float64", "seconds of training (this attempt's)"),
        Output("peak_gpu_mem", "column", "int64", "peak GPU memory in bytes (none on CPU)"),
        Output("resumed_from", "column", "int64", "the checkpoint's step this attempt started from (none: 0)"),
        Output("renderer", "column", "string", "gsplat or reference"),
    )

    def check_params(self) -> None:
        from daskmv.splat.config import TrainConfig

        c = self.config
        for key in ("steps", "downscale", "checkpoint_every", "refine_every", "sh_every"):
            if c[key] < 1:
                raise PipelineError(f"op 'splat': {key} must be at least 1, not {c[key]}")
        if not 0 <= c["sh_degree"] <= 3:
            raise PipelineError(f"op 'splat': sh_degree must be 0-3, not {c['sh_degree']}")
        self.train_config = TrainConfig(**{k: c[k] for k in TrainConfig.__dataclass_fields__ if k in c})

    def input_names(self) -> tuple[str, ...]:
        names = [self.config["model_column"], "workdir", "manifest_base"]
        if self.config["images_column"]:
            names.append(self.config["images_column"])
        return tuple(names)

    def setup(self, device: str) -> None:
        self.device = device
        self.rasterize = None
        wanted = self.config["renderer"]
        if wanted == "gsplat" or (wanted == "auto" and device.startswith("cuda")):
            from daskmv.splat.gsplat_backend import gsplat_rasterizer

            self.rasterize = gsplat_rasterizer(device, required=wanted == "gsplat")
        self.renderer = "gsplat" if self.rasterize is not None else "reference"

    def process(self, rows: list[Row]) -> list[Row | BaseException]:
        out: list[Row | BaseException] = []
        for row in rows:
            try:
                out.append(self._scene(row))
            except RowError as exc:
                out.append(exc)
        return out

    def _path(self, row: Row, column: str) -> str:
        value = row.get(column)
        if not isinstance(value, str) or not value:
            raise RowError(f"no {column} in this row (a scene whose reconstruction failed?)")
        return resolve_path(value, row.get("manifest_base") or "")

    def _scene(self, row: Row) -> Row:
        """Train one scene. The engine gives each row a ``workdir`` that outlives a failed attempt (a retry
        resumes from its checkpoint); without one (the op called directly), a temporary folder is used and
        removed however the training ends."""
        workdir = row.get("workdir")
        if workdir:
            outputs = self._train(row, workdir)
            shutil.rmtree(workdir, ignore_errors=True)  # done: the checkpoint is not needed any more
            return outputs
        workdir = tempfile.mkdtemp(prefix="daskmv-splat-")
        try:
            return self._train(row, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _train(self, row: Row, workdir: str) -> Row:
        import torch

        from daskmv.splat.scene import load_scene
        from daskmv.splat.train import Trainer

        model = self._path(row, self.config["model_column"])
        images = self._path(row, self.config["images_column"]) if self.config["images_column"] else None
        scene = load_scene(model, images, self.config["downscale"], self.config["test_every"])
        trainer = self.trainer = Trainer(scene, self.train_config, self.device, self.rasterize)
        os.makedirs(workdir, exist_ok=True)
        checkpoint = os.path.join(workdir, CHECKPOINT)
        start = trainer.evaluate()["psnr"]
        if os.path.exists(checkpoint):
            trainer.resume(checkpoint)
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(self.device)
        seconds = trainer.train(checkpoint, self.after_step)
        result = trainer.evaluate()
        folder = self._write_splat(trainer, scene)
        pictures = result["pictures"]
        heldout = np.stack(pictures) if pictures else np.zeros((0, 1, 2, 3), np.uint8)
        outputs = {
            "splat": folder, "heldout": heldout, "curve": np.asarray(trainer.curve, dtype=np.float32).reshape(-1, 2),
            "psnr": result["psnr"], "ssim": result["ssim"], "psnr_start": start, "num_gaussians": trainer.n,
            "train_seconds": round(seconds, 3),
            "peak_gpu_mem": int(torch.cuda.max_memory_allocated(self.device)) if self.device.startswith("cuda") else None,
            "resumed_from": trainer.resumed_from, "renderer": self.renderer,
        }
        return outputs

    def _write_splat(self, trainer: Any, scene: Any) -> str:
        """The ``splat`` artifact: a new folder with the PLY and the settings it was trained with (removed
        again when writing fails: the engine takes only a returned folder)."""
        import yaml

        from daskmv.splat.ply import write_ply

        folder = tempfile.mkdtemp(prefix="daskmv-splat-out-")
        try:
            write_ply(os.path.join(folder, "point_cloud.ply"), trainer.gaussians())
            with open(os.path.join(folder, "settings.yaml"), "w") as fh:
                yaml.safe_dump({"renderer": self.renderer, **self.config, "train_views": [v.name for v in scene.train],
                                "test_views": [v.name for v in scene.test]}, fh, sort_keys=False)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return folder

    def after_step(self, step: int) -> None:
        """Called after every training step (a hook for tests that stop a worker mid-training)."""

    def gallery(self, row: Row) -> list[tuple[str, Any]]:
        from daskmv.splat.draw import curve_picture

        out: list[tuple[str, Any]] = []
        heldout = row.get("heldout")
        if isinstance(heldout, np.ndarray) and heldout.ndim == 4 and len(heldout):
            psnr = row.get("psnr")
            label = f"held-out render | photo, PSNR {psnr:.2f} dB" if isinstance(psnr, float) else "held-out | photo"
            out += [(label, picture) for picture in heldout[:3]]
        curve = row.get("curve")
        if isinstance(curve, np.ndarray) and curve.ndim == 2 and len(curve) > 1:
            out.append(("training loss", curve_picture(curve)))
        return out

