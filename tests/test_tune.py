"""``daskmv tune`` on a real local cluster: the batch search stops at out-of-memory, the chosen settings are
the best row of its own table, and the config it writes reproduces that row in ``daskmv run --config``."""

from __future__ import annotations

import json

import pandas as pd
import yaml
from typer.testing import CliRunner

from daskmv.cli import app


def test_tune_writes_its_best_row_and_run_reproduces_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pd.DataFrame({"id": [f"r{i}" for i in range(64)], "label": range(64)}).to_csv("rows.csv", index=False)
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text("steps:\n  - testops:BatchCost: {overhead: 0.1, per_row: 0.001, fits: 8}\n")
    runner = CliRunner()
    result = runner.invoke(app, ["tune", "rows.csv", "--pipeline", str(pipeline), "--sample", "32",
                                 "--write-config", "tuned.yaml", "--max-workers", "2"])
    assert result.exit_code == 0, result.output
    doc = yaml.safe_load((tmp_path / "tuned.yaml").read_text())
    table = doc["tuning"]["table"]
    batches = [row["batch_size"] for row in table if row["threads_per_worker"] == 1 and row["workers"] == table[0]["workers"]]
    assert batches[:5] == [1, 2, 4, 8, 16]  # doubling until the batch of 16 ran out of memory
    assert next(row for row in table if row["batch_size"] == 16)["out_of_memory"] is True
    usable = [row for row in table if not row["out_of_memory"]]
    best = max(usable, key=lambda row: row["items_per_second"])
    settings = {k: v for k, v in doc.items() if k not in ("pipeline", "tuning")}
    assert settings == doc["tuning"]["best"] and settings["batch_size"] == best["batch_size"] == 8
    assert settings.get("workers") == best["workers"] and settings["threads_per_worker"] == best["threads_per_worker"]
    assert "best:" in result.output and "would take about" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline.yaml", "rows.csv", "tuned.yaml"]  # no root left

    run = runner.invoke(app, ["run", "rows.csv", "--config", "tuned.yaml", "--out", "out", "--progress", "none"])
    assert run.exit_code == 0, run.output
    recorded = json.loads((tmp_path / "out" / "run.json").read_text())
    assert recorded["options"]["batch_size"] == 8 and recorded["options"]["workers"] == best["workers"]
    assert recorded["tuning"]["best"] == settings and recorded["cluster"]["workers"] == best["workers"]
    frame = pd.read_parquet(tmp_path / "out" / "manifest.parquet")
    assert (frame["status"] == "ok").all() and frame["batch"].max() == 8

    # the report charts the table the settings came from
    report = runner.invoke(app, ["report", "out"])
    assert report.exit_code == 0, report.output
    page = (tmp_path / "out" / "report.html").read_text()
    assert "<section id='tuning'>" in page and "b8 w" in page
