"""How the two person masks beside this file were made: not by the segmenter they test.

    python data/people/masks/make_masks.py     # rewrites data/people/masks/*.png

OpenCV's GrabCut (colour models, no learning) started from hints placed by hand on each photo: sure
person (faces, torsos), sure background (borders, the Moon between the shoulders, the shuttle model),
and a rough outline in between; then holes are filled and specks dropped. The result was checked by eye
at 4x along every edge. Helmets and suits count as the person; chairs, flags and the Moon do not.
The masks are 0/255 PNGs of the photos' own size; the tests paste each person with its mask onto other
backgrounds, so in those composites the mask is the exact truth.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

HERE = Path(__file__).resolve().parent
SURE_FG, SURE_BG, MAYBE_FG = cv2.GC_FGD, cv2.GC_BGD, cv2.GC_PR_FGD
COLLAR = [tuple(int(v) for v in p) for p in cv2.ellipse2Poly((210, 222), (86, 60), 22, 0, 360, 10)]
HINTS = {  # (label, polygon in pixels), drawn in this order over "maybe background"
    "astronaut_eileen_collins_nasa.jpg": [
        (SURE_BG, [(0, 0), (511, 0), (511, 8), (0, 8)]),
        (MAYBE_FG, [(150, 8), (310, 8), (310, 150), (365, 260), (365, 340), (500, 340), (511, 511), (18, 511),
                    (18, 260), (120, 160)]),
        (SURE_BG, [(350, 0), (511, 0), (511, 340), (470, 345), (430, 340), (372, 345), (372, 262), (340, 200),
                   (340, 0)]),  # the shuttle model and the table
        (SURE_BG, [(0, 0), (120, 0), (110, 160), (15, 250), (15, 511), (0, 511)]),  # the flag
        (SURE_FG, [(190, 60), (270, 60), (260, 180), (200, 180)]),  # face
        (SURE_FG, COLLAR),  # the suit's neck ring, silver like the backdrop
        (SURE_FG, [(60, 300), (340, 300), (340, 500), (60, 500)]),  # torso
        (SURE_FG, [(300, 380), (470, 380), (480, 500), (300, 500)]),  # helmet held in the lap
    ],
    "apollo11_crew_nasa.jpg": [
        (MAYBE_FG, [(20, 471), (20, 230), (90, 190), (110, 150), (180, 140), (200, 120), (250, 60), (330, 60),
                    (340, 130), (420, 160), (470, 150), (510, 220), (560, 260), (560, 471)]),
        (SURE_BG, [(0, 0), (599, 0), (599, 140), (470, 140), (420, 150), (345, 120), (330, 55), (250, 55),
                   (195, 110), (175, 135), (105, 140), (80, 185), (15, 225), (0, 225)]),  # sky and Moon
        (SURE_BG, [(0, 225), (15, 225), (15, 471), (0, 471)]),
        (SURE_BG, [(565, 140), (599, 140), (599, 471), (565, 471)]),
        (SURE_BG, [(387, 178), (407, 178), (407, 215), (400, 250), (388, 250)]),  # Moon between two crewmen
        (SURE_BG, [(354, 157), (378, 157), (378, 175), (370, 171)]),  # Moon above a shoulder
        (SURE_FG, [(120, 160), (170, 160), (170, 230), (120, 230)]),  # three faces
        (SURE_FG, [(265, 80), (315, 80), (315, 140), (265, 140)]),
        (SURE_FG, [(415, 170), (465, 170), (465, 230), (415, 230)]),
        (SURE_FG, [(60, 260), (230, 260), (230, 400), (60, 400)]),  # three suits
        (SURE_FG, [(232, 178), (330, 170), (355, 200), (360, 290), (225, 290)]),
        (SURE_FG, [(340, 260), (530, 260), (530, 400), (340, 400)]),
    ],
}


def person_mask(image_bgr: np.ndarray, hints: list) -> np.ndarray:
    labels = np.full(image_bgr.shape[:2], cv2.GC_PR_BGD, np.uint8)
    for label, polygon in hints:
        cv2.fillPoly(labels, [np.array(polygon, np.int32)], label)
    cv2.grabCut(image_bgr, labels, None, np.zeros((1, 65)), np.zeros((1, 65)), 10, cv2.GC_INIT_WITH_MASK)
    mask = np.isin(labels, (cv2.GC_FGD, cv2.GC_PR_FGD)).astype(np.uint8)
    n, comp, stats, _ = cv2.connectedComponentsWithStats(mask)
    keep = np.isin(comp, [i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] > 2000])  # drop specks
    n, holes = cv2.connectedComponents((~keep).astype(np.uint8))
    outside = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
    keep |= (holes > 0) & ~np.isin(holes, outside)  # fill holes
    return np.where(keep, 255, 0).astype(np.uint8)


if __name__ == "__main__":
    for name, hints in HINTS.items():
        mask = person_mask(cv2.imread(str(HERE.parent / name), cv2.IMREAD_COLOR), hints)
        cv2.imwrite(str(HERE / f"{Path(name).stem}.png"), mask)
        print(f"{name}: person on {mask.mean() / 255:.1%} of the frame")
