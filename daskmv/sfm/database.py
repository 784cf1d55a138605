"""A scene's features and verified matches as a COLMAP database, the input of pycolmap's mappers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from daskmv.sfm.match import camera


@dataclass
class SceneImage:
    """One image of a scene: where it is, its size and its features."""

    id: str
    name: str
    url: str
    width: int
    height: int
    keypoints: np.ndarray
    focal: float | None = None


@dataclass
class ScenePair:
    """A verified pair: image ids, inlier matches and the two-view geometry (as the match op stored it)."""

    a: str
    b: str
    matches: np.ndarray
    geometry: dict[str, Any] = field(default_factory=dict)


def write_database(path: str, images: list[SceneImage], pairs: list[ScenePair]) -> dict[str, int]:
    """Write cameras, images, keypoints and two-view geometries; return the database image id per image id."""
    import pycolmap

    ids: dict[str, int] = {}
    with pycolmap.Database.open(path) as db:
        for image in images:
            cam = camera(image.width, image.height, image.focal)
            cam.has_prior_focal_length = image.focal is not None
            camera_id = db.write_camera(cam)
            image_id = db.write_image(pycolmap.Image(name=image.name, camera_id=camera_id))
            db.write_keypoints(image_id, np.ascontiguousarray(image.keypoints, dtype=np.float32))
            ids[image.id] = image_id
        for pair in pairs:
            if pair.a not in ids or pair.b not in ids or not len(pair.matches):
                continue
            matches = np.ascontiguousarray(pair.matches, dtype=np.uint32)
            db.write_matches(ids[pair.a], ids[pair.b], matches)
            db.write_two_view_geometry(ids[pair.a], ids[pair.b], _geometry(pair.geometry, matches))
    return ids


def _geometry(doc: dict[str, Any], matches: np.ndarray) -> Any:
    import pycolmap

    geometry = pycolmap.TwoViewGeometry()
    geometry.config = getattr(pycolmap.TwoViewGeometryConfiguration, doc.get("config", "UNCALIBRATED"))
    geometry.inlier_matches = matches
    for key in ("F", "E", "H"):
        if key in doc:
            setattr(geometry, key, np.asarray(doc[key], np.float64))
    return geometry
