"""The README's benchmark tables are the saved results, not hand edits (benchmarks/readme.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_performance_tables_are_the_saved_benchmark_results():
    spec = importlib.util.spec_from_file_location("bench_readme", ROOT / "benchmarks" / "readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = (ROOT / "README.md").read_text()
    blocks = list(module.BLOCK.finditer(text))
    assert {m.group("name") for m in blocks} >= {"engine", "engine-640x480", "workers", "workers-640x480", "relight"}
    for match in blocks:
        assert match.group(0) == module.render(match.group("name")), (
            f"README block {match.group('name')!r} differs from the newest saved results: "
            "run python benchmarks/readme.py")
