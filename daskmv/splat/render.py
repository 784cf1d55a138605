"""A pure-torch reference renderer for 3D Gaussian splatting, differentiable end to end, and image metrics.

Training a splat scene needs a renderer whose gradients reach every Gaussian parameter. gsplat's CUDA kernels
are the fast one; this module is the one that runs anywhere (CPU CI, machines without CUDA), written from the
maths of 3DGS (Kerbl et al. 2023) and of gsplat's "classic" rasterization mode:

- :func:`project`: world to camera, covariance ``R S S^T R^T``, EWA splatting with the Jacobian of the
  perspective map (clipped to 1.3x the field of view), ``eps2d`` added to the 2D covariance;
- :func:`sh_to_rgb`: the real spherical-harmonics basis of 3DGS, degrees 0 to 3, ``+ 0.5`` and clamped at 0;
- :func:`render`: front-to-back alpha compositing in depth order, tile by tile, each tile seeing only the
  Gaussians that can reach it, so memory is about ``tile pixels x Gaussians in the tile``.

Conventions are OpenCV's (x right, y down, z forward; ``world_to_cam`` maps world points to camera points);
pixel ``(i, j)`` covers ``[i, i+1) x [j, j+1)`` so its centre is ``(i + 0.5, j + 0.5)``, the same as
``K @ (x/z, y/z, 1)``.

Compositing follows the CUDA rasterizers: ``alpha = min(0.99, opacity * exp(-0.5 d^T conic d))``, an alpha
under 1/255 is skipped, and a pixel stops taking Gaussians before the one that would bring its transmittance
under 1e-4. A Gaussian only ever adds alpha where ``opacity * exp(-q/2) >= 1/255``; that ellipse's bounding
box (``sqrt(2 ln(255 opacity))`` standard deviations, 3.33 for an opaque one) decides which tiles it joins,
so the tiled image equals the dense all-pixels-by-all-Gaussians one, up to float rounding. Autograd
differentiates everything but the per-tile compositing, which has a hand-written backward (:class:`_Composite`)
so a step's memory stays near the size of the Gaussian-tile pairs rather than a dozen times that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: Largest alpha one Gaussian may have at a pixel (keeps transmittance, and its gradient, away from 0).
MAX_ALPHA = 0.99
#: Alphas under this are skipped (they would change a byte of colour by less than one step).
ALPHA_THRESHOLD = 1.0 / 255.0
#: A pixel takes no further Gaussians once its transmittance would fall under this.
TRANSMITTANCE_THRESHOLD = 1e-4

#: The degree-0 SH basis value: a colour c is stored as (c - 0.5) / SH_C0.
SH_C0 = _C0 = 0.28209479177387814
_C1 = 0.4886025119029199
_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
_C3 = (-0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154,
       -0.4570457994644658, 1.445305721320277, -0.5900435899266435)


@dataclass
class Camera:
    """A pinhole camera: intrinsics in pixels, the world-to-camera pose (OpenCV axes) and the image size."""

    K: torch.Tensor  # [3, 3]
    world_to_cam: torch.Tensor  # [4, 4]
    width: int
    height: int

    @property
    def centre(self) -> torch.Tensor:
        """The camera centre in world coordinates, ``-R^T t`` ([3], in the pose's dtype)."""
        R, t = self.world_to_cam[:3, :3], self.world_to_cam[:3, 3]
        return -R.T @ t


@dataclass
class Projection:
    """Gaussians as one camera sees them (all tensors follow the Gaussians' order)."""

    xy: torch.Tensor  # [N, 2] pixel coordinates of the centres, in the graph (meaningless where z <= near)
    depth: torch.Tensor  # [N] camera-frame z
    conic: torch.Tensor  # [N, 3] inverse 2D covariance (a, b, c): [[a, b], [b, c]]
    cov2d: torch.Tensor  # [N, 3] 2D covariance with eps2d added (A, B, C): [[A, B], [B, C]]
    radius: torch.Tensor  # [N] 3-sigma radius in pixels (ceil of the largest axis), 0 where not valid
    valid: torch.Tensor  # [N] bool: in front of the near plane and its 3-sigma box touches the image


def quat_to_rotmat(quats: torch.Tensor) -> torch.Tensor:
    """Rotation matrices [N, 3, 3] from quaternions [N, 4] (w, x, y, z), normalised first."""
    w, x, y, z = F.normalize(quats, dim=-1).unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ]
    return torch.stack(rows, dim=-1).reshape(quats.shape[:-1] + (3, 3))


def covariance_3d(quats: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """World-frame covariances [N, 3, 3] = ``R S S^T R^T`` from quaternions [N, 4] and linear scales [N, 3]."""
    M = quat_to_rotmat(quats) * scales[..., None, :]
    return M @ M.transpose(-1, -2)


def sh_to_rgb(sh: torch.Tensor, dirs: torch.Tensor, degree: int) -> torch.Tensor:
    """Colours [N, 3] of Gaussians seen along ``dirs`` [N, 3] (Gaussian centre minus camera centre).

    ``sh`` [N, K, 3] holds real spherical-harmonics coefficients in 3DGS's basis and order, K >= (degree+1)^2;
    only the first (degree+1)^2 are used, so a training loop may keep degree-3 coefficients and raise
    ``degree`` as it goes. Directions are normalised here. As in 3DGS the result is ``SH + 0.5`` clamped at 0
    (coefficient 0 holds ``(rgb - 0.5) / C0``).
    """
    if not 0 <= degree <= 3:
        raise ValueError(f"SH degree must be 0..3, got {degree}")
    need = (degree + 1) ** 2
    if sh.shape[-2] < need:
        raise ValueError(f"degree {degree} needs {need} SH coefficients, sh has {sh.shape[-2]}")
    basis = [torch.full_like(dirs[..., 0], _C0)]
    if degree >= 1:
        x, y, z = F.normalize(dirs, dim=-1).unbind(-1)
        basis += [-_C1 * y, _C1 * z, -_C1 * x]
    if degree >= 2:
        xx, yy, zz = x * x, y * y, z * z
        basis += [_C2[0] * x * y, _C2[1] * y * z, _C2[2] * (2 * zz - xx - yy), _C2[3] * x * z, _C2[4] * (xx - yy)]
    if degree >= 3:
        basis += [
            _C3[0] * y * (3 * xx - yy), _C3[1] * x * y * z, _C3[2] * y * (4 * zz - xx - yy),
            _C3[3] * z * (2 * zz - 3 * xx - 3 * yy), _C3[4] * x * (4 * zz - xx - yy),
            _C3[5] * z * (xx - yy), _C3[6] * x * (xx - 3 * yy),
        ]
    bases = torch.stack(basis, dim=-1)  # [N, need]
    rgb = (bases[..., None] * sh[..., :need, :]).sum(dim=-2)
    return torch.clamp_min(rgb + 0.5, 0.0)


def project(
    means: torch.Tensor,
    quats: torch.Tensor,
    scales: torch.Tensor,
    cam: Camera,
    near: float = 0.01,
    eps2d: float = 0.3,
) -> Projection:
    """Project Gaussians (means [N, 3], quats [N, 4] w-x-y-z, linear scales [N, 3]) into ``cam``.

    EWA splatting: the camera-frame covariance is pushed through the Jacobian of ``(fx x/z + cx, fy y/z + cy)``
    at the mean; the Jacobian's ``x/z``, ``y/z`` are clipped to 1.3x the field of view so Gaussians far off
    screen do not blow up. ``eps2d`` on the diagonal keeps every splat at least about a pixel wide (gsplat's
    "classic" mode, no antialiasing compensation).
    """
    view = cam.world_to_cam.to(means)
    R, t, K = view[:3, :3], view[:3, 3], cam.K.to(means)
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    p = means @ R.T + t
    x, y, z = p.unbind(-1)
    cov_c = R @ covariance_3d(quats, scales) @ R.T
    # Gaussians at or behind the near plane are never drawn; dividing by their z (0 for some) would put
    # inf/nan into the graph, and 0 * inf in the backward pass turns every gradient nan. Divide by 1 instead.
    zd = torch.where(z > near, z, torch.ones_like(z))

    # the projected centre is not clipped: it stays the exact, differentiable pixel position
    xy = torch.stack([fx * x / zd + cx, fy * y / zd + cy], dim=-1)

    margin_x, margin_y = 0.3 * 0.5 * cam.width / fx, 0.3 * 0.5 * cam.height / fy
    u = torch.clamp(x / zd, min=-cx / fx - margin_x, max=(cam.width - cx) / fx + margin_x)
    v = torch.clamp(y / zd, min=-cy / fy - margin_y, max=(cam.height - cy) / fy + margin_y)
    zero = torch.zeros_like(z)
    J = torch.stack([fx / zd, zero, -fx * u / zd, zero, fy / zd, -fy * v / zd], dim=-1).reshape(-1, 2, 3)
    cov2 = J @ cov_c @ J.transpose(-1, -2)
    A, B, C = cov2[:, 0, 0] + eps2d, 0.5 * (cov2[:, 0, 1] + cov2[:, 1, 0]), cov2[:, 1, 1] + eps2d
    det = torch.clamp_min(A * C - B * B, 1e-12)
    conic = torch.stack([C / det, -B / det, A / det], dim=-1)

    with torch.no_grad():
        mid = 0.5 * (A + C)
        lam = mid + torch.sqrt(torch.clamp_min(mid * mid - det, 0.0))
        radius = torch.ceil(3.0 * torch.sqrt(lam))
        valid = (z > near) & torch.isfinite(xy).all(-1) & torch.isfinite(radius)
        valid &= (xy[:, 0] + radius > 0) & (xy[:, 0] - radius < cam.width)
        valid &= (xy[:, 1] + radius > 0) & (xy[:, 1] - radius < cam.height)
        radius = torch.where(valid, radius, torch.zeros_like(radius))
    return Projection(xy=xy, depth=z, conic=conic, cov2d=torch.stack([A, B, C], -1), radius=radius, valid=valid)


def _tile_lists(
    proj: Projection, opacities: torch.Tensor, near: float, width: int, height: int, tile: int
) -> tuple[list[int], list[torch.Tensor]]:
    """Which Gaussians can reach each tile, nearest first: (tile ids, index tensors), non-empty tiles only.

    A Gaussian reaches the pixel centres inside the bounding box of its ``alpha >= 1/255`` ellipse; each
    (Gaussian, tile) pair is listed once, then a stable sort by tile keeps the depth order inside a tile.
    """
    with torch.no_grad():
        op = opacities.detach()
        xy, depth = proj.xy.detach(), proj.depth.detach()
        k2 = 2.0 * torch.log(torch.clamp_min(op * 255.0, 1e-30))  # ellipse q <= k2 where alpha >= 1/255
        k = torch.sqrt(torch.clamp_min(k2, 0.0))
        A, C = proj.cov2d[:, 0].detach(), proj.cov2d[:, 2].detach()
        ext = torch.stack([k * torch.sqrt(A), k * torch.sqrt(C)], -1) * (1 + 1e-4) + 1e-3
        lo = torch.ceil(xy - ext - 0.5)  # first pixel index whose centre is inside the box
        hi = torch.floor(xy + ext - 0.5)  # last one
        size = torch.tensor([width, height], dtype=xy.dtype, device=xy.device)
        keep = (depth > near) & (k2 > 0) & torch.isfinite(lo).all(-1) & torch.isfinite(hi).all(-1)
        keep &= (hi >= 0).all(-1) & (lo <= size - 1).all(-1) & (lo <= hi).all(-1)
        order = torch.argsort(depth, stable=True)
        order = order[keep[order]]
        if order.numel() == 0:
            return [], []
        lo_i = torch.maximum(lo[order], torch.zeros_like(lo[order])).long() // tile
        hi_i = torch.minimum(hi[order], size - 1).long() // tile
        span = hi_i - lo_i + 1  # [M, 2] tiles across, down
        counts = span[:, 0] * span[:, 1]
        owner = torch.repeat_interleave(torch.arange(order.numel(), device=xy.device), counts)
        start = torch.cumsum(counts, 0) - counts
        local = torch.arange(owner.numel(), device=xy.device) - start[owner]
        tx = lo_i[owner, 0] + local % span[owner, 0]
        ty = lo_i[owner, 1] + local // span[owner, 0]
        tiles_x = (width + tile - 1) // tile
        tile_id = ty * tiles_x + tx
        tile_id, perm = torch.sort(tile_id, stable=True)
        gauss = order[owner[perm]]
        ids, per_tile = torch.unique_consecutive(tile_id, return_counts=True)
        return ids.tolist(), list(torch.split(gauss, per_tile.tolist()))


def _splat(
    pix: torch.Tensor, xy: torch.Tensor, conic: torch.Tensor, opacity: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Offsets ``dx``, ``dy`` [P, G] of P pixel centres from G Gaussian centres, the Gaussian falloff
    ``exp(-q/2)`` [P, G] and the unclamped alpha ``opacity * exp(-q/2)`` [P, G]."""
    dx = pix[:, 0, None] - xy[None, :, 0]
    dy = pix[:, 1, None] - xy[None, :, 1]
    q = conic[:, 0] * dx * dx + 2.0 * conic[:, 1] * dx * dy + conic[:, 2] * dy * dy
    falloff = torch.exp(-0.5 * q)
    return dx, dy, falloff, opacity * falloff


def _transmittance(alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Transmittance before and after each Gaussian [P, G], from the alphas [P, G] in depth order."""
    after = torch.cumprod(1.0 - alpha, dim=1)
    before = torch.cat([torch.ones_like(after[:, :1]), after[:, :-1]], dim=1)
    return before, after


class _Composite(torch.autograd.Function):
    """Front-to-back compositing of G depth-sorted Gaussians at P pixel centres, with a hand-written backward.

    Autograd through the compositing would keep about a dozen [P, G] intermediates per tile for the backward
    pass (gigabytes for a 640x480 image); this keeps only the alphas and recomputes the rest, the way the CUDA
    rasterizers do. Forward returns the accumulated colour [P, 3], the accumulated ``weight * depth`` [P] and
    the final transmittance [P].
    """

    @staticmethod
    def forward(ctx, pix, xy, conic, opacity, colour, depth):  # type: ignore[override]
        _, _, _, raw = _splat(pix, xy, conic, opacity)
        alpha = torch.clamp_max(raw, MAX_ALPHA)
        alpha = torch.where(alpha >= ALPHA_THRESHOLD, alpha, torch.zeros_like(alpha))
        # a pixel stops before the Gaussian that would take its transmittance under the threshold
        alpha = torch.where(torch.cumprod(1.0 - alpha, dim=1) >= TRANSMITTANCE_THRESHOLD, alpha,
                            torch.zeros_like(alpha))
        before, after = _transmittance(alpha)
        weight = alpha * before
        ctx.save_for_backward(pix, xy, conic, opacity, colour, depth, alpha)
        return weight @ colour, weight @ depth, after[:, -1]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_rgb, g_depth, g_trans):  # type: ignore[override]
        pix, xy, conic, opacity, colour, depth, alpha = ctx.saved_tensors
        dx, dy, falloff, raw = _splat(pix, xy, conic, opacity)
        before, after = _transmittance(alpha)
        weight = alpha * before
        # loss = sum_i w_i s_i + g_T T_final with w_i = a_i prod_{j<i} (1 - a_j): a_k scales its own term
        # by T_k and every later term (and T_final) by 1 / (1 - a_k) less
        s = g_rgb @ colour.T + g_depth[:, None] * depth[None, :]  # [P, G]
        ws = weight * s
        later = torch.flip(torch.cumsum(torch.flip(ws, [1]), dim=1), [1]) - ws
        g_alpha = before * s - (later + (g_trans * after[:, -1])[:, None]) / (1.0 - alpha)
        # only drawn, unclamped alphas depend on the parameters
        g_raw = torch.where((alpha > 0) & (raw <= MAX_ALPHA), g_alpha, torch.zeros_like(g_alpha))
        g_q = -0.5 * g_raw * raw
        a, b, c = conic.unbind(-1)
        g_conic = torch.stack([(g_q * dx * dx).sum(0), (2.0 * g_q * dx * dy).sum(0), (g_q * dy * dy).sum(0)], -1)
        g_xy = torch.stack([(-2.0 * g_q * (a * dx + b * dy)).sum(0), (-2.0 * g_q * (b * dx + c * dy)).sum(0)], -1)
        return None, g_xy, g_conic, (g_raw * falloff).sum(0), weight.T @ g_rgb, weight.T @ g_depth


def render(
    means: torch.Tensor,
    quats: torch.Tensor,
    scales: torch.Tensor,
    opacities: torch.Tensor,
    sh: torch.Tensor,
    cam: Camera,
    sh_degree: int,
    background: torch.Tensor | None = None,
    near: float = 0.01,
    eps2d: float = 0.3,
    tile_size: int = 16,
) -> dict[str, torch.Tensor]:
    """Render Gaussians into ``cam``; differentiable w.r.t. means, quats, scales, opacities [N] (in (0, 1),
    post-sigmoid) and sh [N, K, 3].

    Returns a dict of ``image`` [H, W, 3] (``sum T_i a_i c_i + T_final * background``, background black when
    None), ``alpha`` [H, W] (``1 - T_final``), ``depth`` [H, W] (expected depth: the weighted mean of the
    Gaussians' camera z, 0 where nothing was drawn), ``radii`` [N] (3-sigma pixel radius, 0 for Gaussians
    not drawn; float, no gradient) and ``means2d`` [N, 2] (projected centres, in the graph: call
    ``.retain_grad()`` on it before ``backward`` to read the screen-space gradients densification uses).
    """
    W, H = cam.width, cam.height
    proj = project(means, quats, scales, cam, near=near, eps2d=eps2d)
    view = cam.world_to_cam.to(means)  # the camera centre in the Gaussians' precision
    colours = sh_to_rgb(sh, means + view[:3, :3].T @ view[:3, 3], sh_degree)
    dtype, device = means.dtype, means.device
    ids, lists = _tile_lists(proj, opacities, near, W, H, tile_size)

    tiles_x = (W + tile_size - 1) // tile_size
    rgb_parts, depth_parts, trans_parts, pixel_parts = [], [], [], []
    for tile_id, g in zip(ids, lists):
        x0, y0 = (tile_id % tiles_x) * tile_size, (tile_id // tiles_x) * tile_size
        xs = torch.arange(x0, min(x0 + tile_size, W), device=device)
        ys = torch.arange(y0, min(y0 + tile_size, H), device=device)
        py, px = torch.meshgrid(ys, xs, indexing="ij")
        px, py = px.reshape(-1), py.reshape(-1)
        pix = torch.stack([px, py], -1).to(dtype) + 0.5
        rgb, dep, trans = _Composite.apply(
            pix, proj.xy[g], proj.conic[g], opacities[g], colours[g], proj.depth[g]
        )
        rgb_parts.append(rgb)
        depth_parts.append(dep)
        trans_parts.append(trans)
        pixel_parts.append(py * W + px)

    rgb = torch.zeros(H * W, 3, dtype=dtype, device=device)
    dep = torch.zeros(H * W, dtype=dtype, device=device)
    trans = torch.ones(H * W, dtype=dtype, device=device)
    if pixel_parts:
        index = torch.cat(pixel_parts)
        rgb = rgb.index_copy(0, index, torch.cat(rgb_parts))
        dep = dep.index_copy(0, index, torch.cat(depth_parts))
        trans = trans.index_copy(0, index, torch.cat(trans_parts))
    if background is not None:
        rgb = rgb + trans[:, None] * background.to(dtype)
    alpha = 1.0 - trans
    depth = dep / torch.clamp_min(alpha, 1e-10)
    return {
        "image": rgb.reshape(H, W, 3),
        "alpha": alpha.reshape(H, W),
        "depth": depth.reshape(H, W),
        "radii": proj.radius,
        "means2d": proj.xy,
    }


def _gaussian_window(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A normalised 2D Gaussian window [size, size]."""
    r = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(r * r) / (2 * sigma * sigma))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean SSIM (Wang et al. 2004) of two images [H, W, 3] (or [H, W]) in [0, 1]; differentiable.

    The standard formula with an 11x11 Gaussian window (sigma 1.5), ``C1 = 0.01^2``, ``C2 = 0.03^2``, each
    channel on its own, averaged over the valid (unpadded) window positions. ``1 - ssim`` is the D-SSIM term
    of the 3DGS loss.
    """
    if a.shape != b.shape:
        raise ValueError(f"ssim needs images of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dim() == 2:
        a, b = a[..., None], b[..., None]
    ch = a.shape[-1]
    x, y = a.permute(2, 0, 1)[None], b.permute(2, 0, 1)[None]  # [1, C, H, W]
    w = _gaussian_window(11, 1.5, x.dtype, x.device).expand(ch, 1, 11, 11)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, w, groups=ch)

    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x * mu_x
    syy = blur(y * y) - mu_y * mu_y
    sxy = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x * mu_x + mu_y * mu_y + c1) * (sxx + syy + c2))
    return s.mean()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two images in [0, 1]: ``10 log10(1 / MSE)`` (inf when equal)."""
    mse = torch.mean((a.detach().double() - b.detach().double()) ** 2).item()
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)
