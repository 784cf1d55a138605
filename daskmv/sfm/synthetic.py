"""Synthetic scenes with known cameras: a textured room with boxes in it, ray-cast under chosen poses.

Tests, benchmarks and the demo need photos whose true poses, intrinsics and depth are known. A scene is a set
of axis-aligned textured rectangles (the room's walls, floor and ceiling, and boxes standing on the floor);
every pixel's ray is intersected with all of them and the nearest hit is textured, so occlusion, parallax
and perspective are real. Textures are random multi-scale noise with shapes on it, seeded per face, which
gives SIFT plenty of distinctive corners. Conventions are COLMAP's: x right, y down, z forward; a pose is
``cam_from_world`` (``x_cam = R @ x_world + t``); depth is the z coordinate in the camera frame, in metres.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

PIXELS_PER_METRE = 160


@dataclass(frozen=True)
class Face:
    """An axis-aligned rectangle: ``axis`` is its normal's axis, ``at`` its coordinate on that axis, and
    ``lo``/``hi`` its bounds on the two other axes (in increasing axis order)."""

    axis: int
    at: float
    lo: tuple[float, float]
    hi: tuple[float, float]
    seed: int


@dataclass
class Camera:
    """A pinhole camera: intrinsics and pose (cam_from_world)."""

    width: int
    height: int
    f: float
    R: np.ndarray
    t: np.ndarray

    @property
    def K(self) -> np.ndarray:
        return np.array([[self.f, 0, self.width / 2], [0, self.f, self.height / 2], [0, 0, 1.0]])

    @property
    def center(self) -> np.ndarray:
        return -self.R.T @ self.t


@dataclass
class Scene:
    """Faces and the textures that paint them (made on first use)."""

    faces: list[Face]
    textures: dict[int, np.ndarray] = field(default_factory=dict)

    def texture(self, face: Face) -> np.ndarray:
        if face.seed not in self.textures:
            (u0, v0), (u1, v1) = face.lo, face.hi
            size = (max(8, int((v1 - v0) * PIXELS_PER_METRE)), max(8, int((u1 - u0) * PIXELS_PER_METRE)))
            self.textures[face.seed] = _texture(size, face.seed)
        return self.textures[face.seed]


def room(seed: int = 0, size: tuple[float, float, float] = (10.0, 3.0, 8.0), boxes: int = 4) -> Scene:
    """A room centred on the origin (floor at y = +height/2, y pointing down) with ``boxes`` boxes on its floor."""
    rng = np.random.default_rng(seed)
    sx, sy, sz = (s / 2 for s in size)
    faces = [Face(0, -sx, (-sy, -sz), (sy, sz), 0), Face(0, sx, (-sy, -sz), (sy, sz), 0),
             Face(1, -sy, (-sx, -sz), (sx, sz), 0), Face(1, sy, (-sx, -sz), (sx, sz), 0),
             Face(2, -sz, (-sx, -sy), (sx, sy), 0), Face(2, sz, (-sx, -sy), (sx, sy), 0)]
    for k, face in enumerate(faces):
        faces[k] = Face(face.axis, face.at, face.lo, face.hi, seed * 1000 + k)
    for b in range(boxes):
        w, h, d = rng.uniform(0.6, 1.4), rng.uniform(0.8, 2.0), rng.uniform(0.6, 1.4)
        angle = 2 * np.pi * (b + rng.uniform(-0.2, 0.2)) / max(boxes, 1)
        reach = rng.uniform(0.3, 1.3)
        cx, cz = reach * np.cos(angle), reach * np.sin(angle)
        x0, x1, y0, y1, z0, z1 = cx - w / 2, cx + w / 2, sy - h, sy, cz - d / 2, cz + d / 2
        base = seed * 1000 + 10 * (b + 1)
        faces += [Face(0, x0, (y0, z0), (y1, z1), base), Face(0, x1, (y0, z0), (y1, z1), base + 1),
                  Face(1, y0, (x0, z0), (x1, z1), base + 2),
                  Face(2, z0, (x0, y0), (x1, y1), base + 3), Face(2, z1, (x0, y0), (x1, y1), base + 4)]
    return Scene(faces)


def look_at(center: np.ndarray, target: np.ndarray, up: np.ndarray = np.array([0.0, -1.0, 0.0])) -> tuple[np.ndarray, np.ndarray]:
    """(R, t) of a camera at ``center`` looking at ``target`` (cam_from_world)."""
    z = target - center
    z = z / np.linalg.norm(z)
    x = np.cross(-up, z)  # y points down, so "up" is -y
    x = x / np.linalg.norm(x)
    y = np.cross(z, x)
    R = np.stack([x, y, z])
    return R, -R @ center


def orbit(n: int, width: int = 640, height: int = 480, fov_deg: float = 60.0, radius: float = 3.2,
          arc_deg: float = 360.0, seed: int = 0) -> list[Camera]:
    """``n`` cameras on an ellipse around the boxes in the room's centre, looking at them (with a little
    jitter) and at the walls behind: strong parallax, consecutive views overlap, and the set closes a loop
    when ``arc_deg`` is 360."""
    rng = np.random.default_rng(seed + 7)
    f = width / 2 / np.tan(np.radians(fov_deg) / 2)
    cams = []
    for k in range(n):
        a = np.radians(arc_deg) * k / n
        center = np.array([radius * np.cos(a), rng.uniform(-0.6, -0.3), 0.8 * radius * np.sin(a)])
        target = np.array([rng.uniform(-0.3, 0.3), 0.6 + rng.uniform(-0.2, 0.2), rng.uniform(-0.3, 0.3)])
        R, t = look_at(center, target)
        cams.append(Camera(width, height, f, R, t))
    return cams


def render(scene: Scene, cam: Camera) -> tuple[np.ndarray, np.ndarray]:
    """The RGB image (uint8) and z-depth (float32, metres) that ``cam`` sees."""
    h, w = cam.height, cam.width
    u, v = np.meshgrid(np.arange(w, dtype=np.float64) + 0.5, np.arange(h, dtype=np.float64) + 0.5)
    rays_cam = np.stack([(u - w / 2) / cam.f, (v - h / 2) / cam.f, np.ones_like(u)], axis=-1)
    rays = rays_cam @ cam.R  # world directions (R^T d), z-depth = t * 1 since rays_cam z = 1
    origin = cam.center
    best = np.full((h, w), np.inf)
    which = np.full((h, w), -1, dtype=np.int32)
    coords: list[tuple[np.ndarray, np.ndarray]] = []
    for k, face in enumerate(scene.faces):
        other = [a for a in range(3) if a != face.axis]
        d = rays[..., face.axis]
        with np.errstate(divide="ignore", invalid="ignore"):
            t = (face.at - origin[face.axis]) / d
        p0 = origin[other[0]] + t * rays[..., other[0]]
        p1 = origin[other[1]] + t * rays[..., other[1]]
        hit = (t > 1e-6) & (p0 >= face.lo[0]) & (p0 <= face.hi[0]) & (p1 >= face.lo[1]) & (p1 <= face.hi[1])
        closer = hit & (t < best)
        best[closer] = t[closer]
        which[closer] = k
        coords.append((p0, p1))
    image = np.zeros((h, w, 3), dtype=np.uint8)
    for k, face in enumerate(scene.faces):
        mask = which == k
        if not mask.any():
            continue
        tex = scene.texture(face)
        p0, p1 = coords[k]
        map_x = ((p0 - face.lo[0]) * PIXELS_PER_METRE).astype(np.float32)
        map_y = ((p1 - face.lo[1]) * PIXELS_PER_METRE).astype(np.float32)
        painted = cv2.remap(tex, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        image[mask] = painted[mask]
    depth = np.where(np.isfinite(best), best, 0).astype(np.float32)
    return image, depth


def _texture(size: tuple[int, int], seed: int) -> np.ndarray:
    """Random multi-scale coloured noise with random discs and rectangles: distinctive at every scale."""
    rng = np.random.default_rng(seed)
    h, w = size
    tex = np.zeros((h, w, 3), np.float32)
    for cell, weight in ((64, 0.5), (16, 0.3), (4, 0.2)):
        small = rng.random((max(2, h // cell + 2), max(2, w // cell + 2), 3)).astype(np.float32)
        tex += weight * cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    tex = (np.clip(tex, 0, 1) * 255).astype(np.uint8)
    for _ in range(int(h * w / 1500)):
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        r = int(rng.integers(3, 14))
        if rng.random() < 0.5:
            cv2.circle(tex, (x, y), r, color, -1, cv2.LINE_AA)
        else:
            cv2.rectangle(tex, (x, y), (x + r, y + int(rng.integers(3, 14))), color, -1)
    return cv2.GaussianBlur(tex, (3, 3), 0.8)


def write_scene(folder: str | os.PathLike, n: int = 12, seed: int = 0, scene_name: str | None = None,
                depth: bool = False, **orbit_kwargs: Any) -> list[dict[str, Any]]:
    """Render ``n`` views of a room into ``folder`` (JPEG, and depth ``.npy`` when asked) and write the true
    cameras to ``cameras.json``; return one manifest row per image (``id``, ``path``, ``scene``, ``depth``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    scene = room(seed)
    cams = orbit(n, seed=seed, **orbit_kwargs)
    name = scene_name or f"room{seed}"
    rows, truth = [], {}
    for k, cam in enumerate(cams):
        image, z = render(scene, cam)
        stem = f"{name}_{k:04d}"
        path = folder / f"{stem}.jpg"
        cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
        row = {"id": stem, "path": str(path), "scene": name}
        if depth:
            np.save(folder / f"{stem}_depth.npy", z)
            row["depth"] = str(folder / f"{stem}_depth.npy")
        rows.append(row)
        truth[path.name] = {"R": cam.R.tolist(), "t": cam.t.tolist(), "f": cam.f, "width": cam.width,
                            "height": cam.height}
    (folder / "cameras.json").write_text(json.dumps(truth))
    return rows


def read_truth(folder: str | os.PathLike) -> dict[str, Camera]:
    """The true cameras :func:`write_scene` wrote, by image file name."""
    doc = json.loads((Path(folder) / "cameras.json").read_text())
    return {name: Camera(c["width"], c["height"], c["f"], np.array(c["R"]), np.array(c["t"])) for name, c in doc.items()}


def main(argv: list[str] | None = None) -> None:
    """``python -m daskmv.sfm.synthetic FOLDER [--views N] [--seed S] [--depth]``: a scene and its manifest."""
    import argparse
    import csv

    ap = argparse.ArgumentParser(description="Render a synthetic room with known cameras and write photos.csv.")
    ap.add_argument("folder")
    ap.add_argument("--views", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arc", type=float, default=90.0, help="degrees of the orbit the views cover")
    ap.add_argument("--depth", action="store_true", help="also write metric depth maps (a `depth` column)")
    args = ap.parse_args(argv)
    rows = write_scene(Path(args.folder) / "images", n=args.views, seed=args.seed, depth=args.depth, arc_deg=args.arc)
    manifest = Path(args.folder) / "photos.csv"
    for row in rows:  # paths in a manifest resolve against its own folder
        for key in ("path", "depth"):
            if key in row:
                row[key] = os.path.relpath(row[key], args.folder)
    with open(manifest, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} views and {manifest}")


if __name__ == "__main__":
    main()
