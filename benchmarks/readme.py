"""Put the latest saved benchmark tables into README.md, so its Performance section is never typed by hand.

    python benchmarks/readme.py          # after any `python benchmarks/<name>.py --save`

README.md holds ``<!-- results:NAME -->`` ... ``<!-- /results:NAME -->`` blocks; each is replaced by the
newest ``benchmarks/results/<date>-NAME.md`` (its heading two levels down). The prose around the blocks,
which says what the numbers mean, is written by people and checked against the tables.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"
BLOCK = re.compile(r"<!-- results:(?P<name>[\w-]+) -->\n.*?<!-- /results:(?P=name) -->", re.S)


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


def main() -> int:
    text = README.read_text()
    names = [m.group("name") for m in BLOCK.finditer(text)]
    if not names:
        print("README.md has no <!-- results:NAME --> blocks", file=sys.stderr)
        return 1
    README.write_text(BLOCK.sub(lambda m: render(m.group("name")), text))
    print(f"README.md: updated {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
