"""SfM benchmark: daskmv's `sfm` pipeline on 2 workers against pycolmap's own single-process pipeline.

    python benchmarks/sfm.py                      # 60-view room, the Sacré-Cœur photos, 40 scenes x 12 views
    python benchmarks/sfm.py --small-scenes 10 --save

Rows, each measured in this run on the same images:
1. A synthetic 60-image scene (a room circled once, 640x480, known cameras) and the 10 Sacré-Cœur photos
   (../shared/data, no ground truth: their AUC is agreement with pycolmap's own model):
   (a) daskmv, 2 workers, the default pairing (auto: exhaustive up to 40 images, retrieval k=20 above),
   exhaustive pairing, and the default pairing with global bundle adjustments after every 30 % growth of
   the model (``mapper_options``; COLMAP's default is 10 %); (b) pycolmap single process: extract_features, match_exhaustive, incremental_mapping
   (its threads use both cores). Wall time from a cold start (daskmv's includes starting its cluster),
   registered images, pairs matched, relative-pose AUC@1/3/5 deg (max of rotation and translation-direction
   error per image pair).
2. Many small scenes (default 40 x 12 views, 320x240): scenes/hour for daskmv (scenes in parallel) against
   pycolmap looping over them.

The hardware bound is printed as daskmv's busy fraction: the CPU seconds its rows took over wall x cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from engine import commit, machine  # noqa: E402

import daskmv  # noqa: E402
from daskmv.data import artifact_path  # noqa: E402
from daskmv.sfm import evaluate, synthetic  # noqa: E402

SACRE_COEUR = ROOT.parent / "shared" / "data" / "sacre_coeur" / "mapping"
#: The mapper option row: global bundle adjustments after 30 % growth of the model, not COLMAP's 10 %.
FEWER_GLOBAL_BA = {"ba_global_frames_ratio": 1.3, "ba_global_points_ratio": 1.3}


def quiet_colmap() -> None:
    os.environ.setdefault("GLOG_minloglevel", "2")


def pycolmap_pipeline(images: list[str], work: Path) -> tuple[float, object | None]:
    """pycolmap's own pipeline on ``images`` (copied into one folder): seconds and the largest model."""
    import pycolmap

    folder = work / "images"
    folder.mkdir(parents=True)
    for p in images:
        os.symlink(p, folder / os.path.basename(p))
    t0 = time.perf_counter()
    db = work / "database.db"
    pycolmap.extract_features(db, folder)
    pycolmap.match_exhaustive(db)
    models = pycolmap.incremental_mapping(db, folder, work / "sparse")
    seconds = time.perf_counter() - t0
    best = max(models.values(), key=lambda r: r.num_reg_images()) if models else None
    return seconds, best


def daskmv_pipeline(manifest: Path, out: Path, steps: dict | None, workers: int) -> tuple[float, pd.DataFrame, list]:
    """daskmv's ``sfm`` pipeline with some steps' parameters set (``{"pairs": {...}}``; None: the defaults)."""
    spec = [{"sfm": steps}] if steps else "sfm"
    t0 = time.perf_counter()
    result = daskmv.run(str(manifest), spec, str(out), workers=workers, progress="none", overwrite=True)
    seconds = time.perf_counter() - t0
    frames = [pd.read_parquet(stage.manifest_path) for stage in result.stages]
    return seconds, result.manifest(), frames


def pycolmap_version() -> str:
    import pycolmap

    return pycolmap.__version__


def busy(frames: list[pd.DataFrame], seconds: float, cores: int) -> float:
    return float(sum(f["seconds"].sum() for f in frames) / (seconds * cores))


def auc_of(rec: object | None, truth: dict) -> list[float]:
    if rec is None:
        return [0.0, 0.0, 0.0]
    rot, trans = evaluate.relative_errors(evaluate.poses(rec), truth)
    return evaluate.pose_auc(np.maximum(rot, trans))


def one_scene(name: str, rows: list[dict], truth: dict | None, work: Path, workers: int, repeat: int = 1) -> list[dict]:
    """Rows for one scene: each contestant ``repeat`` times, interleaved (pycolmap, daskmv auto, daskmv
    exhaustive, then again), so that a slow spell of a shared machine falls on all of them; the median
    wall time is reported, the models of the first round are scored."""
    import pycolmap

    manifest = work / f"{name}.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    contestants = (("daskmv, default pairs (auto)", None),
                   ("daskmv, exhaustive pairs", {"pairs": {"mode": "exhaustive"}}),
                   ("daskmv, auto pairs, global BA at 30 % growth", {"reconstruct": {"mapper_options": FEWER_GLOBAL_BA}}))
    walls: dict[str, list[float]] = {}
    out: dict[str, dict] = {}
    base_rec = None
    for round_ in range(repeat):
        base_s, rec = pycolmap_pipeline([r["path"] for r in rows], work / f"{name}-pycolmap-{round_}")
        walls.setdefault("base", []).append(base_s)
        base_rec = base_rec or rec
        reference = truth or (evaluate.poses(base_rec) if base_rec is not None else {})
        for number, (label, steps) in enumerate(contestants):
            folder = work / f"{name}-daskmv{number}-{round_}"
            seconds, scenes, frames = daskmv_pipeline(manifest, folder, steps, workers)
            walls.setdefault(label, []).append(seconds)
            if label in out:
                continue
            scene = scenes.iloc[0]
            model = None
            if scene["status"] == "ok":
                model = pycolmap.Reconstruction(os.path.join(
                    artifact_path(str(folder / "manifest.parquet"), scene["id"], "model"), "sparse", "0"))
            out[label] = {"scene": name, "contestant": label, "registered": f"{int(scene.get('n_registered') or 0)}/{len(rows)}",
                          "pairs": len(frames[1]), "auc": auc_of(model, reference), "busy": busy(frames, seconds, workers)}
    base = "pycolmap single process (baseline)"
    out[base] = {"scene": name, "contestant": base,
                 "registered": f"{base_rec.num_reg_images() if base_rec else 0}/{len(rows)}",
                 "pairs": len(rows) * (len(rows) - 1) // 2,
                 "auc": auc_of(base_rec, reference) if truth else [100.0, 100.0, 100.0], "busy": float("nan")}
    walls[base] = walls.pop("base")
    for label, row in out.items():
        row["seconds"] = float(np.median(walls[label]))
        row["speedup"] = float(np.median(walls[base])) / row["seconds"]
        row["rounds"] = [b / s for b, s in zip(walls[base], walls[label])]
    return list(out.values())


def small_scenes(n: int, per: int, work: Path, workers: int, repeat: int = 1) -> tuple[list[dict], list[float]]:
    """Rows for many small scenes: pycolmap looping over them, then daskmv on all at once, ``repeat`` rounds
    (median wall time); also each round's ratio."""
    rows = []
    for s in range(n):
        rows += synthetic.write_scene(work / "small" / f"s{s:03d}", n=per, seed=200 + s, width=320, height=240,
                                      arc_deg=80, scene_name=f"s{s:03d}")
    manifest = work / "small.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    base, ours = [], []
    for round_ in range(repeat):
        t0 = time.perf_counter()
        for s in range(n):
            pycolmap_pipeline([r["path"] for r in rows if r["scene"] == f"s{s:03d}"],
                              work / f"small-pycolmap-{round_}-{s}")
        base.append(time.perf_counter() - t0)
        seconds, scenes, frames = daskmv_pipeline(manifest, work / f"small-daskmv-{round_}", None, workers)
        ours.append(seconds)
        if round_ == 0:
            ok, registered, busy_ = int((scenes["status"] == "ok").sum()), int(scenes["n_registered"].fillna(0).sum()), \
                busy(frames, seconds, workers)
    base_s, seconds = float(np.median(base)), float(np.median(ours))
    return [{"contestant": f"daskmv, {workers} workers", "seconds": seconds, "ok": ok, "registered": registered,
             "busy": busy_, "speedup": base_s / seconds},
            {"contestant": "pycolmap looping over the scenes (baseline)", "seconds": base_s, "ok": n,
             "registered": None, "busy": float("nan"), "speedup": 1.0}], [b / o for b, o in zip(base, ours)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=60)
    ap.add_argument("--small-scenes", type=int, default=40)
    ap.add_argument("--per-scene", type=int, default=12)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1, help="rounds of every row (median wall time)")
    ap.add_argument("--work", default=str(HERE / "work" / "sfm"))
    ap.add_argument("--save", action="store_true", help="also write the table to benchmarks/results/")
    args = ap.parse_args()
    quiet_colmap()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    rows = synthetic.write_scene(work / "room", n=args.images, seed=11)
    truth = {name: (cam.R, cam.t) for name, cam in synthetic.read_truth(work / "room").items()}
    table = one_scene(f"synthetic room, {args.images} views", rows, truth, work, args.workers, args.repeat)
    if SACRE_COEUR.exists():
        photos = [{"path": str(p)} for p in sorted(SACRE_COEUR.glob("*.jpg"))]
        table += one_scene("Sacré-Cœur, 10 photos", photos, None, work, args.workers, args.repeat)
    small, small_rounds = small_scenes(args.small_scenes, args.per_scene, work, args.workers, args.repeat)

    lines = [f"## SfM benchmark, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", "",
             f"- command: `python benchmarks/sfm.py{f' --repeat {args.repeat}' if args.repeat > 1 else ''}"
             f"{' --save' if args.save else ''}`",
             f"- machine: {machine()}; commit {commit()}",
             f"- daskmv with {args.workers} worker processes; pycolmap {pycolmap_version()} single process (its "
             "threads on every core); every row measured in this run, cold", "",
             "| scene | contestant | wall s | × pycolmap speed | registered | pairs | AUC@1/3/5° | busy |",
             "|---|---|---:|---:|---:|---:|---|---:|"]
    for r in table:
        auc = "/".join(f"{a:.1f}" for a in r["auc"])
        lines.append(f"| {r['scene']} | {r['contestant']} | {r['seconds']:.1f} | {r['speedup']:.2f} | {r['registered']} | "
                     f"{r['pairs']} | {auc} | {r['busy']:.0%} |".replace("nan%", "—"))
    if args.repeat > 1:
        lines += ["", f"Single-scene rows: median wall time of {args.repeat} interleaved rounds; x pycolmap in each round:"]
        lines += [f"- {r['scene']}, {r['contestant']}: " + ", ".join(f"{x:.2f}" for x in r["rounds"])
                  for r in table if not r["contestant"].startswith("pycolmap")]
    lines += ["", "Sacré-Cœur has no ground truth: its AUC is agreement with pycolmap's own model (100 by definition "
              "for pycolmap).", "",
              f"Many small scenes: {args.small_scenes} scenes x {args.per_scene} views (320x240)", "",
              "| contestant | wall s | scenes/hour | scenes ok | × pycolmap | busy |", "|---|---:|---:|---:|---:|---:|"]
    for r in small:
        lines.append(f"| {r['contestant']} | {r['seconds']:.1f} | {args.small_scenes * 3600 / r['seconds']:,.0f} | "
                     f"{r['ok']} | {r['speedup']:.2f} | {r['busy']:.0%} |".replace("nan%", "—"))
    if args.repeat > 1:
        lines += ["", f"Median of {args.repeat} rounds (pycolmap's loop, then daskmv); x pycolmap in each round: "
                  + ", ".join(f"{x:.2f}" for x in small_rounds)]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.save:
        path = HERE / "results" / f"{datetime.now(timezone.utc):%Y-%m-%d}-sfm.md"
        path.write_text(text)
        print(f"saved {path}")


if __name__ == "__main__":
    main()
