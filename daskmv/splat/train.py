"""Training one scene's Gaussians: the 3DGS recipe, on gsplat's rasterizer (CUDA) or the reference renderer.

- **Start**: one Gaussian per SfM point, its colour as the degree-0 SH band, an isotropic scale from the mean
  distance to its 3 nearest points, opacity 0.1.
- **Each step**: one training view (a seeded shuffle per epoch, so a resumed run sees the views a straight
  one would), loss ``(1 - w) * L1 + w * (1 - SSIM)``, Adam per parameter group; the means' learning rate
  decays exponentially to 1 % at the last step; the SH degree rises one band every ``sh_every`` steps.
- **Densification**, ``default`` (3DGS): every ``refine_every`` steps in ``[refine_start, refine_stop)``,
  Gaussians whose screen-space position gradient averaged over the steps that drew them exceeds
  ``grad_threshold`` are cloned (small ones) or split in two (large ones), nearly transparent ones pruned, and
  opacities reset every ``reset_every`` steps. ``mcmc`` (3DGS as MCMC, simplified): a fixed budget of
  Gaussians, the nearly transparent ones moved onto live ones drawn by opacity (their opacity shared, as the
  paper's relocation), noise on the means that fades with opacity, and opacity and scale regularisers.
- **Checkpoints**: parameters, optimiser state, step, loss curve and the densification state, every
  ``checkpoint_every`` steps, written then renamed; :meth:`Trainer.resume` continues from one.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict
from typing import Any, Callable

import numpy as np
import torch

from daskmv.splat.config import STRATEGIES, TrainConfig  # noqa: F401 (re-exported)
from daskmv.splat.ply import Gaussians
from daskmv.splat.render import SH_C0, psnr, render, ssim
from daskmv.splat.scene import Scene, View

PARAMS = ("means", "log_scales", "quats", "opacity_logits", "sh0", "shN")


class Trainer:
    """One scene's Gaussians and their optimisers; ``train`` runs to ``config.steps``."""

    def __init__(self, scene: Scene, config: TrainConfig, device: str = "cpu",
                 rasterize: Callable[..., dict[str, torch.Tensor]] | None = None) -> None:
        config.check()
        self.scene, self.config, self.device = scene, config, torch.device(device)
        self.rasterize = rasterize or render
        self.step = 0
        self.curve: list[tuple[int, float]] = []
        self.resumed_from: int | None = None
        self.params = _initial(scene, config, self.device)
        self.optimizers = self._optimizers()
        self.grad_sum = torch.zeros(self.n, device=self.device)
        self.grad_count = torch.zeros(self.n, device=self.device)
        self.background = torch.tensor(config.background, dtype=torch.float32, device=self.device)
        self._images = [v.image.to(self.device) for v in scene.train]

    @property
    def n(self) -> int:
        return int(self.params["means"].shape[0])

    # -- parameters and optimisers -------------------------------------------------------------------
    def _lr(self, name: str) -> float:
        c = self.config
        return {"means": c.lr_means * self.scene.extent, "log_scales": c.lr_scales, "quats": c.lr_quats,
                "opacity_logits": c.lr_opacities, "sh0": c.lr_sh0, "shN": c.lr_shN}[name]

    def _optimizers(self) -> dict[str, torch.optim.Adam]:
        return {name: torch.optim.Adam([self.params[name]], lr=self._lr(name), eps=1e-15) for name in PARAMS}

    def _replace(self, select: Callable[[str, torch.Tensor, bool], torch.Tensor]) -> None:
        """New parameter tensors made by ``select(name, tensor, is_moment)`` (indexing, concatenating) from
        the old ones, and their Adam moments carried through the same function."""
        for name in PARAMS:
            old = self.params[name]
            new = torch.nn.Parameter(select(name, old.detach(), False).contiguous())
            opt = self.optimizers[name]
            state = opt.state.pop(old, None)
            opt.param_groups[0]["params"] = [new]
            if state:
                opt.state[new] = {k: (select(name, v, True) if torch.is_tensor(v) and v.dim() > 0 else v)
                                  for k, v in state.items()}
            self.params[name] = new

    # -- one step --------------------------------------------------------------------------------------
    def view_index(self, step: int) -> int:
        """The training view of ``step``: a shuffle per epoch seeded by (seed, epoch)."""
        n = len(self.scene.train)
        epoch, k = divmod(step, n)
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        return int(torch.randperm(n, generator=g)[k])

    def sh_degree_at(self, step: int) -> int:
        return min(self.config.sh_degree, step // max(1, self.config.sh_every))

    def render_view(self, view: View, degree: int | None = None) -> dict[str, torch.Tensor]:
        p = self.params
        sh = torch.cat([p["sh0"], p["shN"]], dim=1)
        cam = view.camera
        return self.rasterize(p["means"], p["quats"], torch.exp(p["log_scales"]), torch.sigmoid(p["opacity_logits"]),
                              sh, type(cam)(cam.K.to(self.device), cam.world_to_cam.to(self.device), cam.width,
                                            cam.height),
                              self.config.sh_degree if degree is None else degree, background=self.background)

    def train_step(self) -> float:
        c = self.config
        index = self.view_index(self.step)
        out = self.render_view(self.scene.train[index], self.sh_degree_at(self.step))
        means2d = out["means2d"]
        if means2d.requires_grad:
            means2d.retain_grad()
        target = self._images[index]
        loss = (1 - c.ssim_weight) * (out["image"] - target).abs().mean()
        if c.ssim_weight:
            loss = loss + c.ssim_weight * (1 - ssim(out["image"], target))
        if c.strategy == "mcmc":
            loss = loss + 0.01 * torch.sigmoid(self.params["opacity_logits"]).mean() \
                + 0.01 * torch.exp(self.params["log_scales"]).mean()
        loss.backward()
        if c.strategy == "default" and means2d.grad is not None:
            self._accumulate(means2d.grad, out["radii"], self.scene.train[index])
        fraction = self.step / max(1, c.steps)
        self.optimizers["means"].param_groups[0]["lr"] = self._lr("means") * 0.01 ** fraction
        for opt in self.optimizers.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
        self.step += 1
        if c.strategy == "default":
            self._refine_default()
        else:
            self._refine_mcmc()
        value = float(loss.detach())
        if self.step % c.log_every == 0 or self.step == 1:
            self.curve.append((self.step, value))
        return value

    # -- densification ---------------------------------------------------------------------------------
    def _accumulate(self, grad: torch.Tensor, radii: torch.Tensor, view: View) -> None:
        seen = radii > 0
        # the screen-space gradient in normalised device units, as 3DGS's threshold is stated
        scaled = grad.detach() * torch.tensor([view.camera.width / 2, view.camera.height / 2], device=grad.device)
        self.grad_sum[seen] += scaled[seen].norm(dim=-1)
        self.grad_count[seen] += 1

    def _refine_default(self) -> None:
        c, step = self.config, self.step
        if step < c.refine_start or step >= c.refine_stop or step % c.refine_every:
            return
        average = self.grad_sum / self.grad_count.clamp_min(1)
        grow = average > c.grad_threshold
        scales = torch.exp(self.params["log_scales"].detach()).max(dim=1).values
        small = scales <= 0.01 * self.scene.extent
        clone, split = grow & small, grow & ~small
        room = max(0, c.max_gaussians - self.n)
        clone &= torch.cumsum(clone.int(), 0) <= room
        split &= torch.cumsum(split.int(), 0) <= max(0, room - int(clone.sum()))
        if clone.any() or split.any():
            self._grow(clone, split)
        opacity = torch.sigmoid(self.params["opacity_logits"].detach())
        drop = opacity < c.prune_opacity
        if step > c.reset_every:
            drop |= torch.exp(self.params["log_scales"].detach()).max(dim=1).values > 0.1 * self.scene.extent
        if drop.any() and int((~drop).sum()) > 0:
            keep = ~drop
            self._replace(lambda name, t, moment: t[keep])
        if step % c.reset_every == 0:
            with torch.no_grad():
                self.params["opacity_logits"].clamp_(max=_logit(0.01))
            for state in self.optimizers["opacity_logits"].state.values():
                state["exp_avg"].zero_()
                state["exp_avg_sq"].zero_()
        self.grad_sum = torch.zeros(self.n, device=self.device)
        self.grad_count = torch.zeros(self.n, device=self.device)

    def _grow(self, clone: torch.Tensor, split: torch.Tensor) -> None:
        """Clone the small growing Gaussians; split each large one into two smaller samples of itself."""
        p = {k: v.detach() for k, v in self.params.items()}
        n_split = int(split.sum())
        scales = torch.exp(p["log_scales"][split])
        rotations = _rotmat(p["quats"][split])
        g = torch.Generator(device="cpu").manual_seed(self.config.seed + self.step)
        noise = torch.randn((2, n_split, 3), generator=g).to(self.device)
        offsets = torch.einsum("nij,knj->kni", rotations, noise * scales[None])
        new_split = {
            "means": (p["means"][split][None] + offsets).reshape(-1, 3),
            "log_scales": torch.log(scales / 1.6).repeat(2, 1),
        }

        def select(name: str, t: torch.Tensor, moment: bool) -> torch.Tensor:
            if moment:  # an Adam moment: new Gaussians start at zero
                born = torch.zeros((2 * n_split, *t.shape[1:]), dtype=t.dtype, device=t.device)
                return torch.cat([t[~split], torch.zeros_like(t[clone]), born])
            born = new_split[name] if name in new_split else t[split].repeat(2, *([1] * (t.dim() - 1)))
            return torch.cat([t[~split], t[clone], born])

        self._replace(select)

    def _refine_mcmc(self) -> None:
        c, step = self.config, self.step
        with torch.no_grad():  # noise on the means, fading with opacity (SGLD as in the paper)
            opacity = torch.sigmoid(self.params["opacity_logits"])
            lr = self.optimizers["means"].param_groups[0]["lr"]
            scale = torch.exp(self.params["log_scales"]).mean(dim=1, keepdim=True)
            g = torch.Generator(device="cpu").manual_seed(c.seed * 7919 + step)
            noise = torch.randn(self.params["means"].shape, generator=g).to(self.device)
            gate = torch.sigmoid(100 * (0.005 - opacity))[:, None]
            self.params["means"].add_(noise * scale * gate * lr * 5e5)
        if step < c.refine_start or step >= c.refine_stop or step % c.refine_every:
            return
        self._relocate_dead()
        self._add_mcmc()

    def _add_mcmc(self) -> None:
        """Grow by 5 % (up to ``max_gaussians``): copies of live Gaussians drawn by opacity, sharing it."""
        n_new = min(self.config.max_gaussians - self.n, int(0.05 * self.n))
        if n_new <= 0:
            return
        weights = torch.sigmoid(self.params["opacity_logits"].detach())
        g = torch.Generator(device="cpu").manual_seed(self.config.seed * 15_485_863 + self.step)
        picks = torch.multinomial(weights.cpu(), n_new, replacement=True, generator=g).to(self.device)
        shared = _shared_logits(weights, picks, self.n)

        def select(name: str, t: torch.Tensor, moment: bool) -> torch.Tensor:
            born = torch.zeros_like(t[picks]) if moment else t[picks]
            out = torch.cat([t, born])
            if name == "opacity_logits" and not moment:
                out[picks] = shared
                out[t.shape[0]:] = shared
            return out

        self._replace(select)

    def _relocate_dead(self) -> None:
        """Move the nearly transparent Gaussians onto live ones drawn by opacity (the paper's relocation)."""
        c, step = self.config, self.step
        dead = torch.sigmoid(self.params["opacity_logits"].detach()) < c.prune_opacity
        n_dead = int(dead.sum())
        if not n_dead or n_dead == self.n:
            return
        alive = torch.nonzero(~dead).squeeze(1)
        weights = torch.sigmoid(self.params["opacity_logits"].detach())[alive]
        g = torch.Generator(device="cpu").manual_seed(c.seed * 104_729 + step)
        picks = alive[torch.multinomial(weights.cpu(), n_dead, replacement=True, generator=g).to(self.device)]
        with torch.no_grad():
            target = torch.arange(self.n, device=self.device)
            target[dead] = picks
            value = _shared_logits(torch.sigmoid(self.params["opacity_logits"]), picks, self.n)
            for name in PARAMS:
                self.params[name].data = self.params[name].data[target]
            logits = self.params["opacity_logits"]
            logits[dead] = value  # the copies, and their sources, share the source's opacity
            logits[picks] = value
        for opt in self.optimizers.values():  # the moved Gaussians' moments start again
            for state in opt.state.values():
                for key in ("exp_avg", "exp_avg_sq"):
                    state[key][dead] = 0

    # -- results ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, views: list[View] | None = None) -> dict[str, Any]:
        """Held-out PSNR and SSIM (means over the views) and each view's render beside its photo (uint8)."""
        views = self.scene.test if views is None else views
        scores, similar, pictures = [], [], []
        for view in views:
            image = self.render_view(view)["image"].clamp(0, 1).cpu()
            scores.append(psnr(image, view.image))
            similar.append(float(ssim(image, view.image)))
            pictures.append((torch.cat([image, view.image], dim=1) * 255).round().to(torch.uint8).numpy())
        return {"psnr": float(np.mean(scores)) if scores else math.nan,
                "ssim": float(np.mean(similar)) if similar else math.nan, "pictures": pictures}

    def gaussians(self) -> Gaussians:
        p = {k: v.detach().cpu().numpy() for k, v in self.params.items()}
        return Gaussians(p["means"], np.concatenate([p["sh0"], p["shN"]], axis=1), p["opacity_logits"],
                         p["log_scales"], p["quats"])

    # -- checkpoints -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "curve": self.curve, "config": asdict(self.config),
                "params": {k: v.detach().cpu() for k, v in self.params.items()},
                "optimizers": {k: _moments(opt, self.params[k]) for k, opt in self.optimizers.items()},
                "grad_sum": self.grad_sum.cpu(), "grad_count": self.grad_count.cpu()}

    def save_checkpoint(self, path: str) -> str:
        tmp = f"{path}.tmp-{os.getpid()}"
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)
        return path

    def resume(self, path: str) -> int:
        """Continue from the checkpoint at ``path``; returns its step."""
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.params = {k: torch.nn.Parameter(v.to(self.device)) for k, v in state["params"].items()}
        self.optimizers = self._optimizers()
        for name, moments in state["optimizers"].items():
            if moments:
                self.optimizers[name].state[self.params[name]] = {k: (v.to(self.device) if torch.is_tensor(v) else v)
                                                                  for k, v in moments.items()}
        self.step, self.curve = int(state["step"]), [tuple(p) for p in state["curve"]]
        self.grad_sum, self.grad_count = state["grad_sum"].to(self.device), state["grad_count"].to(self.device)
        self.resumed_from = self.step
        return self.step

    def train(self, checkpoint: str | None = None, on_step: Callable[[int], None] | None = None) -> float:
        """Train to ``config.steps``, saving ``checkpoint`` every ``checkpoint_every`` steps; returns the
        seconds it took (this call's)."""
        t = time.perf_counter()
        while self.step < self.config.steps:
            self.train_step()
            if checkpoint and self.step % self.config.checkpoint_every == 0 and self.step < self.config.steps:
                self.save_checkpoint(checkpoint)
            if on_step is not None:
                on_step(self.step)
        return time.perf_counter() - t


def _moments(opt: torch.optim.Adam, param: torch.Tensor) -> dict[str, Any]:
    state = opt.state.get(param, {})
    return {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in state.items()}


def _shared_logits(opacity: torch.Tensor, picks: torch.Tensor, n: int) -> torch.Tensor:
    """The opacity logit each of ``picks`` and its copies share when a Gaussian drawn k times becomes k + 1
    (MCMC relocation: ``1 - (1 - o) ** (1 / (k + 1))``, so together they cover what it covered)."""
    copies = torch.bincount(picks, minlength=n).float() + 1.0
    return _logit((1 - (1 - opacity[picks]) ** (1 / copies[picks])).clamp(1e-4, 1 - 1e-4))


def _logit(p: Any) -> Any:
    if torch.is_tensor(p):
        return torch.log(p / (1 - p))
    return math.log(p / (1 - p))


def _rotmat(quats: torch.Tensor) -> torch.Tensor:
    from daskmv.splat.render import quat_to_rotmat

    return quat_to_rotmat(quats)


def _initial(scene: Scene, config: TrainConfig, device: torch.device) -> dict[str, torch.nn.Parameter]:
    """One Gaussian per SfM point (see the module)."""
    points = torch.from_numpy(scene.points).float().clone()  # trained in place: never the scene's own array
    colors = torch.from_numpy(scene.colors).float()
    n = len(points)
    k = min(4, n)
    distances = _knn_blocks(points, k)
    mean = distances[:, 1:].mean(dim=1) if k > 1 else torch.full((n,), scene.extent * 0.01)
    mean = mean.clamp_min(1e-7)
    bands = (config.sh_degree + 1) ** 2
    params = {
        "means": points,
        "log_scales": torch.log(mean)[:, None].repeat(1, 3),
        "quats": torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(n, 1),
        "opacity_logits": torch.full((n,), _logit(config.init_opacity)),
        "sh0": ((colors - 0.5) / SH_C0)[:, None, :],
        "shN": torch.zeros((n, bands - 1, 3)),
    }
    return {k: torch.nn.Parameter(v.to(device)) for k, v in params.items()}


def _knn_blocks(points: torch.Tensor, k: int, block: int = 4096) -> torch.Tensor:
    """The ``k`` smallest distances of each point to the points (itself first), a block of rows at a time."""
    parts = [torch.cdist(points[i:i + block], points).topk(k, largest=False).values
             for i in range(0, len(points), block)]
    return torch.cat(parts)
