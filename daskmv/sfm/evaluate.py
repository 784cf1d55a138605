"""How far a reconstruction is from the truth: relative pose errors, pose AUC, aligned camera centres.

Used by the tests and ``benchmarks/sfm.py`` against the known cameras of :mod:`daskmv.sfm.synthetic` scenes
(or any ground truth given as ``{image name: (R, t)}``, cam_from_world).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def poses(rec: Any) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(R, t) cam_from_world of every registered image of a pycolmap Reconstruction, by image name."""
    out = {}
    for image in rec.images.values():
        if image.has_pose:
            pose = image.cam_from_world()
            out[image.name] = (pose.rotation.matrix(), np.asarray(pose.translation, np.float64))
    return out


def _angle(R: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip((np.trace(R) - 1) / 2, -1.0, 1.0))))


def _direction_angle(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na < 1e-12 or nb < 1e-12:
        return 0.0
    return float(np.degrees(np.arccos(np.clip(abs(a @ b) / (na * nb), -1.0, 1.0))))


def relative_errors(estimated: dict[str, tuple[np.ndarray, np.ndarray]],
                    truth: dict[str, tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Rotation and translation-direction errors (degrees) of the relative pose of every pair of images in
    the truth; a pair with an unregistered image counts as 180 degrees (so AUC penalises it)."""
    names = sorted(truth)
    rot, trans = [], []
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            na, nb = names[a], names[b]
            if na not in estimated or nb not in estimated:
                rot.append(180.0)
                trans.append(180.0)
                continue
            (Ra, ta), (Rb, tb) = estimated[na], estimated[nb]
            (Ga, ga), (Gb, gb) = truth[na], truth[nb]
            R_est, R_gt = Rb @ Ra.T, Gb @ Ga.T
            t_est, t_gt = tb - R_est @ ta, gb - R_gt @ ga
            rot.append(_angle(R_est @ R_gt.T))
            trans.append(_direction_angle(t_est, t_gt))
    return np.array(rot), np.array(trans)


def pose_auc(errors: np.ndarray, thresholds: tuple[float, ...] = (1.0, 3.0, 5.0)) -> list[float]:
    """Area under the recall curve of pose errors up to each threshold, in percent (the usual SfM metric)."""
    errors = np.sort(np.asarray(errors, np.float64))
    recall = (np.arange(len(errors)) + 1) / max(len(errors), 1)
    errors, recall = np.concatenate([[0.0], errors]), np.concatenate([[0.0], recall])
    out = []
    for t in thresholds:
        last = np.searchsorted(errors, t)
        e = np.concatenate([errors[:last], [t]])
        r = np.concatenate([recall[:last], [recall[last - 1]]])
        out.append(float(np.trapezoid(r, x=e) / t * 100))
    return out


def align(source: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """The similarity (s, R, t) minimising |s R source + t - target|^2 (Umeyama), for N x 3 point sets."""
    mu_s, mu_t = source.mean(0), target.mean(0)
    xs, xt = source - mu_s, target - mu_t
    U, S, Vt = np.linalg.svd(xt.T @ xs / len(source))
    D = np.eye(3)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        D[2, 2] = -1
    R = U @ D @ Vt
    s = float(np.trace(np.diag(S) @ D) / (xs ** 2).sum(1).mean())
    return s, R, mu_t - s * R @ mu_s


def centre_errors(estimated: dict[str, tuple[np.ndarray, np.ndarray]],
                  truth: dict[str, tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, float]:
    """Distances between aligned estimated camera centres and the true ones (in the truth's units), and the
    alignment's scale (truth units per model unit: 1.0 for a correctly metric model)."""
    names = sorted(set(estimated) & set(truth))
    est = np.array([-estimated[n][0].T @ estimated[n][1] for n in names])
    gt = np.array([-truth[n][0].T @ truth[n][1] for n in names])
    s, R, t = align(est, gt)
    return np.linalg.norm((s * est @ R.T + t) - gt, axis=1), s
