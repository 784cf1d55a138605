"""Put the latest saved benchmark tables into README.md, so its Performance section is never typed by hand.

    python benchmarks/readme.py          # after any `python benchmarks/<name>.py --save`

README.md holds ``<!-- results:NAME -->`` ... ``<!-- /results:NAME -->`` blocks; each is replaced by the
newest ``benchmarks/results/<date>-NAME.md`` (its heading two levels down). The prose around the blocks,
which says what the numbers mean, is written by people and checked against the tables.

A benchmark listed in :data:`NEW_SECTIONS` whose results are saved but which README.md has no block for yet
gets one: a ``### <title>`` subsection, its one-line description and the block, at the end of the
Performance section. From then on it is a block like the others (move it, write prose around it).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"
BLOCK = re.compile(r"<!-- results:(?P<name>[\w-]+) -->\n.*?<!-- /results:(?P=name) -->", re.S)
PERFORMANCE = "## Performance"

#: Blocks added to the Performance section when README.md has none: name -> (subsection title, what it measures).
NEW_SECTIONS = {
    "video": ("Video", "`benchmarks/video.py`: decoding generated 720p videos and running a small TorchScript CNN on "
              "every frame (the `video` and `torch_model` ops), against a single-process loop and a hand-written "
              "`multiprocessing` pool with one model per process, in the same run, with the process tree's peak "
              "memory and the limit the cores set."),
    "splat": ("Gaussian splatting", "`benchmarks/splat.py`: the `splat` op on synthetic scenes (CPU: the reference "
              "renderer) against a plain per-scene training loop with the same trainer and settings, one scene and "
              "several queued, with held-out PSNR and the process tree's peak memory."),
}


def latest(name: str) -> Path | None:
    files = sorted((HERE / "results").glob(f"????-??-??-{name}.md"))
    return files[-1] if files else None


def render(name: str) -> str:
    path = latest(name)
    if path is None:
        body = f"(no saved results yet: run `python benchmarks/{name.split('-')[0]}.py --save`)"
    else:
        body = re.sub(r"^## ", "#### ", path.read_text().strip(), flags=re.M)
        body += f"\n\n<sub>from `benchmarks/results/{path.name}`</sub>"
    return f"<!-- results:{name} -->\n{body}\n<!-- /results:{name} -->"


def add_sections(text: str) -> str:
    """``text`` with a subsection for every :data:`NEW_SECTIONS` name that has saved results and no block yet,
    placed at the end of the Performance section (before the next ``## `` heading)."""
    have = {m.group("name") for m in BLOCK.finditer(text)}
    start = text.find(f"\n{PERFORMANCE}\n")
    if start < 0:
        return text
    end = text.find("\n## ", start + len(PERFORMANCE) + 2)
    end = len(text) if end < 0 else end + 1
    for name, (title, about) in NEW_SECTIONS.items():
        if name in have or latest(name) is None:
            continue
        section = f"### {title}\n\n{about}\n\n<!-- results:{name} -->\n<!-- /results:{name} -->\n\n"
        text = text[:end] + section + text[end:]
        end += len(section)
    return text


def main() -> int:
    text = add_sections(README.read_text())
    names = [m.group("name") for m in BLOCK.finditer(text)]
    if not names:
        print("README.md has no <!-- results:NAME --> blocks", file=sys.stderr)
        return 1
    README.write_text(BLOCK.sub(lambda m: render(m.group("name")), text))
    print(f"README.md: updated {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
