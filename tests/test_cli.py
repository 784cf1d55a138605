"""The command-line contract: commands, output, and exit codes 0 / 1 / 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
from typer.testing import CliRunner

from daskmv.cli import app
from daskmv.ops import REGISTRY

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_console_script_is_installed():
    exe = __import__("shutil").which("daskmv") or str(__import__("pathlib").Path(sys.executable).parent / "daskmv")
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for command in ("run", "validate", "status", "ops"):
        assert command in proc.stdout


def test_ops_lists_every_op_with_inputs_outputs_and_parameters():
    result = invoke("ops")
    assert result.exit_code == 0
    for name, op in REGISTRY.items():
        assert name in result.stdout
        for param in op.params:
            assert param in result.stdout
    assert "resized_path" in result.stdout and "sharpness" in result.stdout and "image_info" in result.stdout
    assert "[width, height]" in result.stdout  # help texts are not eaten as markup


@pytest.mark.slow
def test_run_status_and_validate(dataset, client, tmp_path):
    out = tmp_path / "out"
    result = invoke("run", dataset / "manifest.csv", "--pipeline", "decode,resize", "--out", out,
                    "--cluster", client.scheduler.address, "--partition-rows", "50", "--progress", "log")
    assert result.exit_code == 0, result.output
    assert "done:" in result.output and "304 rows: 300 ok, 4 errors" in result.output
    assert "errors.log" in result.output
    status = invoke("status", out)
    assert status.exit_code == 0
    assert "complete" in status.stdout and "done 304 (ok 300, error 4)" in status.stdout
    assert "partitions 7/7 done" in status.stdout
    info = json.loads(invoke("status", out, "--json").stdout)
    assert info["ok"] == 300 and info["pending"] == 0
    ok = invoke("validate", dataset / "manifest.csv", "--pipeline", "resize,stats")
    assert ok.exit_code == 0 and "304 rows" in ok.stdout and "inputs ok" in ok.stdout
    again = invoke("run", dataset / "manifest.csv", "--pipeline", "resize", "--out", out,
                   "--cluster", client.scheduler.address)
    assert again.exit_code == 2 and "made by a different run" in again.output


def write_csv(tmp_path, frame, name="m.csv"):
    frame.to_csv(tmp_path / name, index=False)
    return tmp_path / name


@pytest.mark.parametrize(
    ("frame", "args", "message"),
    [
        (pd.DataFrame({"path": ["a.jpg", "a.jpg"]}), [], "duplicate paths"),
        (pd.DataFrame({"file": ["a.jpg"]}), [], "has no column 'path'"),
        (pd.DataFrame({"path": pd.Series([], dtype=str)}), [], "has no rows"),
        (pd.DataFrame({"path": ["bogus://x/a.jpg"]}), [], "unknown URL scheme"),
        (pd.DataFrame({"path": ["a.jpg"]}), ["--pipeline", "resize,nope"], "unknown op 'nope'"),
        (pd.DataFrame({"path": ["a.jpg"]}), ["--pipeline", "testops:Flaky"], "needs input 'label'"),
        (pd.DataFrame({"path": ["a.jpg"]}), ["--limit", "0"], "--limit 0: must be a whole number of at least 1"),
        (pd.DataFrame({"path": ["a.jpg"]}), ["--batch-size", "0"], "--batch-size 0: must be a whole number of at least 1"),
        (pd.DataFrame({"path": ["a.jpg"]}), ["--batch-size", "-3"], "--batch-size -3: must be a whole number"),
        (pd.DataFrame({"path": ["a.jpg"]}), ["--partition-rows", "0"], "--partition-rows 0: must be a whole number"),
        (pd.DataFrame({"path": ["a.jpg"]}), ["--partition-rows", "-5"], "--partition-rows -5: must be a whole number"),
        (pd.DataFrame({"path": ["a.jpg"]}), ["--progress", "anything"], "--progress 'anything': use one of auto, bar"),
        (pd.DataFrame({"path": ["a.jpg"]}), ["--retries", "-1"], "--retries -1: must be a whole number of at least 0"),
        (pd.DataFrame({"path": ["a.jpg"]}), ["--max-error-rate", "2"], "--max-error-rate 2.0: must be between 0 and 1"),
        (pd.DataFrame({"path": ["a.jpg"]}), ["--pipeline", "big.yaml"], "op 'resize': size must be an integer or a list"),
        (pd.DataFrame({"path": ["a.jpg"]}), ["--pipeline", "low.yaml"], "op 'albedo': low must be a number, not 'a'"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, frame, args, message):
    manifest = write_csv(tmp_path, frame)
    (tmp_path / "big.yaml").write_text("steps:\n  - resize: {size: big}\n")
    (tmp_path / "low.yaml").write_text("steps:\n  - albedo: {low: a}\n")
    args = [str(tmp_path / a) if a.endswith(".yaml") else a for a in args]
    full = ["run", manifest, "--out", tmp_path / "out", *(args if "--pipeline" in args else ["--pipeline", "resize", *args])]
    result = invoke(*full)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "out").exists()  # nothing written, not even the folder


def test_report_with_an_unreadable_config_is_one_line(tmp_path):
    manifest = write_csv(tmp_path, pd.DataFrame({"path": ["a.jpg"]}))
    result = invoke("run", manifest, "--pipeline", "resize", "--out", tmp_path / "out", "--report",
                    "--config", tmp_path / "absent.yaml")
    assert result.exit_code == 2 and "cannot read --config" in result.output and "Traceback" not in result.output


def test_usage_errors_exit_2(tmp_path):
    manifest = write_csv(tmp_path, pd.DataFrame({"path": ["a.jpg"]}))
    assert invoke("run", manifest, "--out", tmp_path / "o").exit_code == 2
    assert "no pipeline" in invoke("run", manifest, "--out", tmp_path / "o").output
    assert "no output root" in invoke("run", manifest, "--pipeline", "resize").output
    assert invoke("run", manifest, "--pipeline", "resize", "--out", tmp_path / "o", "--bogus").exit_code == 2
    assert invoke("validate", tmp_path / "absent.csv").exit_code == 2
    assert invoke("status", tmp_path).exit_code == 2
    (tmp_path / "bad.yaml").write_text("wrokers: 3\n")
    bad = invoke("run", manifest, "--pipeline", "resize", "--out", tmp_path / "o", "--config", tmp_path / "bad.yaml")
    assert bad.exit_code == 2 and "unknown setting(s) wrokers" in bad.output
    assert invoke("run", manifest, "--pipeline", "resize", "--out", tmp_path / "o", "--cluster", "carrier-pigeon",
                  "--progress", "none").exit_code == 2


def test_config_file_supplies_settings_and_flags_win(tmp_path, dataset, client):
    (tmp_path / "settings.yaml").write_text(
        f"pipeline: resize\nout: {tmp_path / 'from-config'}\npartition-rows: 20\nlimit: 30\n"
        f"cluster: {client.scheduler.address}\nprogress: none\n"
    )
    result = invoke("run", dataset / "manifest.parquet", "--config", tmp_path / "settings.yaml", "--limit", "25")
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "from-config" / "run.json").read_text())
    assert run["binding"]["partition_rows"] == 20 and run["manifest"]["rows"] == 25
