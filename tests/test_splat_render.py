"""The pure-torch Gaussian splatting renderer: geometry, colour, compositing order, gradients, tiling, metrics.

Every test renders real scenes; the tiling test compares against a dense all-pixels-by-all-Gaussians
compositor written here, independently of the renderer's tile code.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from daskmv.splat.render import Camera, project, psnr, render, sh_to_rgb, ssim

C0 = 0.28209479177387814
C1 = 0.4886025119029199


def pinhole(width: int = 128, height: int = 96, f: float = 100.0, pose: torch.Tensor | None = None) -> Camera:
    K = torch.tensor([[f, 0.0, width / 2], [0.0, f, height / 2], [0.0, 0.0, 1.0]])
    return Camera(K=K, world_to_cam=torch.eye(4) if pose is None else pose, width=width, height=height)


def flat_sh(rgb: torch.Tensor, k: int = 1) -> torch.Tensor:
    """SH coefficients [N, k, 3] whose colour is ``rgb`` [N, 3] from every direction."""
    sh = torch.zeros(rgb.shape[0], k, 3)
    sh[:, 0] = (rgb - 0.5) / C0
    return sh


def random_scene(n: int, seed: int, degree: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "means": torch.randn(n, 3, generator=g) * torch.tensor([0.7, 0.5, 0.4]) + torch.tensor([0.0, 0.0, 3.0]),
        "quats": torch.randn(n, 4, generator=g),
        "scales": torch.rand(n, 3, generator=g) * 0.08 + 0.02,
        "opacities": torch.rand(n, generator=g) * 0.85 + 0.1,
        "sh": torch.randn(n, (degree + 1) ** 2, 3, generator=g) * 0.4,
    }


def test_isotropic_gaussian_projects_to_a_blob_of_the_right_place_size_and_peak():
    cam = pinhole()
    f, z, s, opacity = 100.0, 4.0, 0.4, 0.8
    centre = (80.5, 40.5)  # a pixel centre: pixel (80, 40)
    mean = torch.tensor([[(centre[0] - 64) * z / f, (centre[1] - 48) * z / f, z]])
    assert torch.allclose((cam.K @ (mean[0] / z))[:2], torch.tensor(centre))
    background = torch.tensor([0.2, 0.4, 0.6])
    out = render(mean, torch.tensor([[1.0, 0, 0, 0]]), torch.full((1, 3), s), torch.tensor([opacity]),
                 flat_sh(torch.tensor([[1.0, 0.0, 0.0]])), cam, 0, background=background)
    alpha, image = out["alpha"], out["image"]

    assert torch.allclose(out["means2d"], torch.tensor([centre]))
    assert divmod(int(torch.argmax(alpha)), 128) == (40, 80)
    assert alpha[40, 80].item() == pytest.approx(opacity, rel=1e-6)
    assert torch.allclose(image[40, 80], opacity * torch.tensor([1.0, 0, 0]) + (1 - opacity) * background)
    assert out["depth"][40, 80].item() == pytest.approx(z, rel=1e-6)

    ys, xs = torch.meshgrid(torch.arange(96) + 0.5, torch.arange(128) + 0.5, indexing="ij")
    mass = alpha.sum()
    assert (alpha * xs).sum() / mass == pytest.approx(centre[0], abs=1e-3)
    assert (alpha * ys).sum() / mass == pytest.approx(centre[1], abs=1e-3)

    sigma = f * s / z  # 10 pixels
    k = 10  # pixels from the centre: alpha = opacity * exp(-k^2 / (2 sigma^2))
    for value in (alpha[40, 80 + k], alpha[40, 80 - k], alpha[40 + k, 80], alpha[40 - k, 80]):
        measured = k / math.sqrt(-2 * math.log(value.item() / opacity))
        assert measured == pytest.approx(sigma, rel=0.05)
    assert out["radii"][0].item() == pytest.approx(3 * sigma, rel=0.05)

    far = [(0, 0), (95, 0), (95, 127), (0, 127), (40, 127), (90, 80)]
    for y, x in far:
        assert alpha[y, x].item() == 0.0
        assert torch.equal(image[y, x], background)


def test_nearer_gaussian_colour_dominates_and_swapping_depths_swaps_it():
    cam = pinhole()
    red, green = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    sh = flat_sh(torch.stack([red, green]))
    quats = torch.tensor([[1.0, 0, 0, 0]] * 2)
    opacity = torch.tensor([0.95, 0.95])

    def centre_colour(z_red: float, z_green: float) -> torch.Tensor:
        means = torch.tensor([[0.0, 0.0, z_red], [0.0, 0.0, z_green]])
        scales = torch.tensor([[0.1 * z_red] * 3, [0.1 * z_green] * 3])  # the same 10-pixel blob on screen
        return render(means, quats, scales, opacity, sh, cam, 0)["image"][47:49, 63:65].mean(dim=(0, 1))

    red_front, green_front = centre_colour(3.0, 5.0), centre_colour(5.0, 3.0)
    assert red_front[0] > 0.9 and red_front[1] < 0.1
    assert green_front[1] > 0.9 and green_front[0] < 0.1
    assert torch.allclose(red_front, green_front[[1, 0, 2]], atol=1e-6)
    # the exact over operator at pixel (64, 48), half a pixel from both centres
    a = 0.95 * math.exp(-0.5 * 0.5 / (100.0 + 0.3))
    image = render(torch.tensor([[0.0, 0, 3], [0.0, 0, 5]]), quats, torch.tensor([[0.3] * 3, [0.5] * 3]),
                   opacity, sh, cam, 0)["image"]
    assert torch.allclose(image[48, 64], a * red + (1 - a) * a * green, atol=1e-6)


def test_sh_degree_zero_is_direction_free_and_degree_one_follows_the_basis():
    g = torch.Generator().manual_seed(1)
    sh = torch.randn(1, 16, 3, generator=g) * 0.3
    dirs = torch.nn.functional.normalize(torch.randn(50, 3, generator=g), dim=-1)
    colours = sh_to_rgb(sh.expand(50, -1, -1), dirs, 0)
    assert torch.allclose(colours, (C0 * sh[0, 0] + 0.5).expand(50, 3))

    coeff = torch.zeros(1, 4, 3)
    coeff[0, 0] = torch.tensor([0.5, 0.0, -0.5])  # DC
    coeff[0, 2] = torch.tensor([0.2, 0.2, 0.2])  # Y_1^0 = C1 * z
    coeff[0, 3] = torch.tensor([0.0, 0.3, 0.0])  # Y_1^1 = -C1 * x
    d = torch.tensor([[0.6, 0.0, 0.8]])
    expected = torch.tensor([
        0.5 + C0 * 0.5 + C1 * 0.8 * 0.2,
        0.5 + C1 * 0.8 * 0.2 - C1 * 0.6 * 0.3,
        0.5 - C0 * 0.5 + C1 * 0.8 * 0.2,
    ])
    assert torch.allclose(sh_to_rgb(coeff, d, 1)[0], expected, atol=1e-6)
    assert torch.allclose(sh_to_rgb(coeff, d * 7.0, 1), sh_to_rgb(coeff, d, 1))  # directions normalised
    back = sh_to_rgb(coeff, -d, 1)[0]
    assert not torch.allclose(back, expected, atol=1e-2)

    # seen through the renderer: the same Gaussian from two sides of it
    def seen_from(cam_z: float, degree: int) -> torch.Tensor:
        flip = torch.diag(torch.tensor([-1.0, 1.0, -1.0, 1.0]))  # turn around the y axis to look back at it
        pose = torch.eye(4) if cam_z < 0 else flip
        pose = pose.clone()
        pose[:3, 3] = -pose[:3, :3] @ torch.tensor([0.0, 0.0, cam_z])
        out = render(torch.zeros(1, 3), torch.tensor([[1.0, 0, 0, 0]]), torch.full((1, 3), 0.3),
                     torch.tensor([0.9]), coeff, pinhole(pose=pose), degree)
        return out["image"][48, 64] / out["alpha"][48, 64]

    assert torch.allclose(seen_from(-3.0, 0), seen_from(3.0, 0), atol=1e-6)
    assert torch.allclose(seen_from(-3.0, 1), sh_to_rgb(coeff, torch.tensor([[0.0, 0, 1]]), 1)[0], atol=1e-5)
    assert torch.allclose(seen_from(3.0, 1), sh_to_rgb(coeff, torch.tensor([[0.0, 0, -1]]), 1)[0], atol=1e-5)
    assert not torch.allclose(seen_from(-3.0, 1), seen_from(3.0, 1), atol=1e-2)


def test_sh_basis_is_orthonormal_on_the_sphere_up_to_degree_three():
    n = 40000  # a Fibonacci sphere: near-uniform directions, so the mean approximates the integral / 4 pi
    i = torch.arange(n, dtype=torch.float64) + 0.5
    z = 1 - 2 * i / n
    phi = math.pi * (1 + math.sqrt(5)) * i
    r = torch.sqrt(1 - z * z)
    dirs = torch.stack([r * torch.cos(phi), r * torch.sin(phi), z], -1)
    basis = []
    for j in range(16):  # read basis function j off a one-hot coefficient, small enough to stay clear of the clamp
        one = torch.zeros(n, 16, 3, dtype=torch.float64)
        one[:, j, 0] = 0.5
        basis.append((sh_to_rgb(one, dirs, 3)[:, 0] - 0.5) / 0.5)
    Y = torch.stack(basis, -1)
    assert Y.abs().max() < 0.99
    gram = 4 * math.pi * (Y.T @ Y) / n
    assert torch.allclose(gram, torch.eye(16, dtype=torch.float64), atol=2e-3)


def test_gradients_reach_every_parameter_and_optimisation_fits_a_target():
    cam = pinhole(64, 48, f=55.0)
    target_scene = random_scene(300, seed=2, degree=0)
    with torch.no_grad():
        target = render(**target_scene, cam=cam, sh_degree=0)["image"]

    g = torch.Generator().manual_seed(3)
    params = {
        "means": (target_scene["means"] + 0.05 * torch.randn(300, 3, generator=g)).requires_grad_(True),
        "quats": target_scene["quats"].clone().requires_grad_(True),
        "scales": target_scene["scales"].clone().requires_grad_(True),
        "opacities": target_scene["opacities"].clone().requires_grad_(True),
        "sh": (0.5 * torch.randn(300, 1, 3, generator=g)).requires_grad_(True),
    }
    out = render(**params, cam=cam, sh_degree=0)
    out["means2d"].retain_grad()
    torch.nn.functional.l1_loss(out["image"], target).backward()
    for name, p in [*params.items(), ("means2d", out["means2d"])]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name

    optimiser = torch.optim.Adam([{"params": [params["sh"]], "lr": 0.05},
                                  {"params": [params["means"]], "lr": 0.002}])
    losses = []
    for _ in range(150):
        optimiser.zero_grad()
        loss = torch.nn.functional.l1_loss(render(**params, cam=cam, sh_degree=0)["image"], target)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def test_gaussians_on_or_behind_the_camera_plane_are_skipped_without_nan_gradients():
    cam = pinhole(32, 24, f=25.0)
    visible = {"means": torch.tensor([[0.0, 0.0, 2.0]]), "quats": torch.tensor([[1.0, 0, 0, 0]]),
               "scales": torch.full((1, 3), 0.2), "opacities": torch.tensor([0.7]),
               "sh": flat_sh(torch.tensor([[0.2, 0.9, 0.4]]))}
    hidden_means = torch.tensor([[0.1, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 0.1, 0.005], [0.0, 0.0, 1e-30]])
    params = {
        "means": torch.cat([visible["means"], hidden_means]).requires_grad_(True),
        "quats": torch.tensor([[1.0, 0, 0, 0]] * 5).requires_grad_(True),
        "scales": torch.full((5, 3), 0.2).requires_grad_(True),
        "opacities": torch.full((5,), 0.7).requires_grad_(True),
        "sh": torch.cat([visible["sh"], flat_sh(torch.rand(4, 3))]).requires_grad_(True),
    }
    out = render(**params, cam=cam, sh_degree=0)
    assert out["radii"][0] > 0 and torch.all(out["radii"][1:] == 0)
    assert torch.allclose(out["image"], render(**visible, cam=cam, sh_degree=0)["image"])
    (out["image"].sum() + out["depth"].sum()).backward()
    for name, p in params.items():
        assert torch.isfinite(p.grad).all(), name
        assert torch.all(p.grad[1:] == 0), name


def dense_render(scene: dict[str, torch.Tensor], cam: Camera, degree: int, background: torch.Tensor) -> dict:
    """Every pixel against every Gaussian in front of the near plane, nearest first, no tiles; plain autograd."""
    dtype = scene["means"].dtype
    proj = project(scene["means"], scene["quats"], scene["scales"], cam)
    R, t = cam.world_to_cam[:3, :3].to(dtype), cam.world_to_cam[:3, 3].to(dtype)
    colours = sh_to_rgb(scene["sh"], scene["means"] + R.T @ t, degree)
    order = torch.argsort(proj.depth.detach())
    order = order[proj.depth[order] > 0.01]
    ys, xs = torch.meshgrid(torch.arange(cam.height, dtype=dtype) + 0.5, torch.arange(cam.width, dtype=dtype) + 0.5,
                            indexing="ij")
    dx = xs.reshape(-1, 1) - proj.xy[order, 0]
    dy = ys.reshape(-1, 1) - proj.xy[order, 1]
    a, b, c = proj.conic[order].unbind(-1)
    alpha = torch.clamp(scene["opacities"][order] * torch.exp(-0.5 * (a * dx**2 + 2 * b * dx * dy + c * dy**2)),
                        max=0.99)
    alpha = alpha * (alpha >= 1 / 255)
    pixels, gaussians = alpha.shape
    image = torch.zeros(pixels, 3, dtype=dtype)
    depth = torch.zeros(pixels, dtype=dtype)
    T = torch.ones(pixels, dtype=dtype)
    done = torch.zeros(pixels, dtype=torch.bool)
    for i in range(gaussians):  # the CUDA kernels' per-pixel loop, all pixels at once
        ai = alpha[:, i]
        done = done | ((T * (1 - ai)).detach() < 1e-4)
        ai = torch.where(done, torch.zeros_like(ai), ai)
        image = image + (T * ai)[:, None] * colours[order[i]]
        depth = depth + T * ai * proj.depth[order[i]]
        T = T * (1 - ai)
    image = image + T[:, None] * background.to(dtype)
    H, W = cam.height, cam.width
    return {"image": image.reshape(H, W, 3), "alpha": (1 - T).reshape(H, W),
            "depth": (depth / (1 - T).clamp_min(1e-10)).reshape(H, W), "stopped": int(done.sum())}


def tricky_scene(dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], Camera]:
    """400 Gaussians seen by a turned camera: some behind it or across the near plane, some big, some opaque."""
    angle = 0.3
    pose = torch.eye(4)
    pose[:3, :3] = torch.tensor([[math.cos(angle), 0, -math.sin(angle)], [0, 1, 0],
                                 [math.sin(angle), 0, math.cos(angle)]])
    pose[:3, 3] = torch.tensor([0.2, -0.1, 0.3])
    cam = pinhole(45, 37, f=40.0, pose=pose)  # not a multiple of any tile size
    scene = random_scene(400, seed=4, degree=2)
    scene["means"] = (pose[:3, :3].T @ (scene["means"] - pose[:3, 3]).T).T.contiguous()
    scene["means"][:20, 2] -= 3.5  # some Gaussians behind the camera or across the near plane
    scene["scales"][:60] *= 4  # some big ones covering many tiles
    scene["opacities"][20:80] = 0.999  # and opaque ones, so pixels hit the transmittance stop
    return {k: v.to(dtype) for k, v in scene.items()}, cam


def test_tiled_renderer_equals_dense_compositing():
    scene, cam = tricky_scene()
    background = torch.tensor([0.1, 0.7, 0.3])
    dense = dense_render(scene, cam, 2, background)
    assert dense["stopped"] > 20  # the transmittance stop is exercised
    for tile in (8, 16, 32):
        out = render(**scene, cam=cam, sh_degree=2, background=background, tile_size=tile)
        for key in ("image", "alpha"):
            assert torch.allclose(out[key], dense[key], atol=1e-5, rtol=0), (tile, key)
        # expected depth divides by alpha, which magnifies float rounding where alpha is tiny: compare the
        # accumulated (alpha-weighted) depth absolutely and the ratio relatively
        assert torch.allclose(out["depth"] * out["alpha"], dense["depth"] * dense["alpha"], atol=1e-5, rtol=0)
        assert torch.allclose(out["depth"], dense["depth"], atol=1e-5, rtol=1e-5), tile


def test_tiled_renderer_gradients_equal_autograd_through_dense_compositing():
    scene, cam = tricky_scene(torch.float64)
    background = torch.tensor([0.1, 0.7, 0.3], dtype=torch.float64)
    g = torch.Generator().manual_seed(6)
    weights = {"image": torch.rand(37, 45, 3, generator=g, dtype=torch.float64),
               "alpha": torch.rand(37, 45, generator=g, dtype=torch.float64),
               "depth": torch.rand(37, 45, generator=g, dtype=torch.float64)}

    def grads(renderer) -> dict[str, torch.Tensor]:
        params = {k: v.clone().requires_grad_(True) for k, v in scene.items()}
        out = renderer(params)
        loss = sum((out[k] * w).sum() for k, w in weights.items())
        loss.backward()
        return {k: p.grad for k, p in params.items()}

    dense = grads(lambda p: dense_render(p, cam, 2, background))
    tiled = grads(lambda p: render(**p, cam=cam, sh_degree=2, background=background))
    for key in scene:
        assert dense[key].abs().sum() > 0, key
        assert torch.allclose(tiled[key], dense[key], rtol=1e-9, atol=1e-12), key


def test_ssim_and_psnr():
    g = torch.Generator().manual_seed(5)
    a = torch.rand(40, 50, 3, generator=g)
    b = (a + 0.1 * torch.randn(40, 50, 3, generator=g)).clamp(0, 1)
    assert ssim(a, a).item() == pytest.approx(1.0, abs=1e-6)
    assert ssim(a, b).item() < 0.95
    assert psnr(a, b) == pytest.approx(10 * math.log10(1 / torch.mean((a - b) ** 2).item()), rel=1e-6)
    assert psnr(a, a) == math.inf

    # constant images: only the luminance term is left
    c1, c2 = 0.3, 0.6
    expected = (2 * c1 * c2 + 0.01**2) / (c1**2 + c2**2 + 0.01**2)
    flat_a, flat_b = torch.full((20, 20, 3), c1, dtype=torch.float64), torch.full((20, 20, 3), c2, dtype=torch.float64)
    assert ssim(flat_a, flat_b).item() == pytest.approx(expected, rel=1e-9)

    # the reference recipe: OpenCV Gaussian blur (11x11, sigma 1.5), away from the padded borders
    x, y = a.double().numpy(), b.double().numpy()
    blur = lambda im: cv2.GaussianBlur(im, (11, 11), 1.5)[5:-5, 5:-5]  # noqa: E731
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    k1, k2 = 0.01**2, 0.03**2
    ref = ((2 * mx * my + k1) * (2 * sxy + k2)) / ((mx**2 + my**2 + k1) * (sxx + syy + k2))
    assert ssim(a, b).item() == pytest.approx(float(np.mean(ref)), abs=1e-5)
