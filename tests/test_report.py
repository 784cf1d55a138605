"""The HTML report: numbers equal the manifest's, self-contained, renders in a real browser, handles killed runs."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

import daskmv
from daskmv.report import build_report, error_kind

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reported(dataset, client, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "out"
    result = daskmv.run(str(dataset / "manifest.csv"), [{"resize": {"size": 64}}, "stats", "testops:Flaky"], str(out),
                        client=client, partition_rows=40, progress="none", max_error_rate=1.0)
    path = build_report(str(out), n=12, seed=3)
    return result, out, Path(path).read_text()


def cell(page: str, ident: str) -> str:
    return re.search(rf"id='{ident}'>([^<]*)<", page).group(1)


def test_numbers_equal_the_manifest(reported):
    result, out, page = reported
    frame = pd.read_parquet(out / "manifest.parquet")
    assert int(cell(page, "rows-total").replace(",", "")) == len(frame)
    assert int(cell(page, "rows-ok").replace(",", "")) == (frame["status"] == "ok").sum()
    assert int(cell(page, "rows-error").replace(",", "")) == (frame["status"] == "error").sum()
    assert int(cell(page, "rows-pending").replace(",", "")) == 0
    assert cell(page, "state") == "complete"
    assert cell(page, "partitions") == f"{result.counts['rows'] // 40 + 1} of {result.counts['rows'] // 40 + 1} done"
    groups = [int(n.replace(",", "")) for n in re.findall(r"<tr class='error-group'><td class='count'>([\d,]+)<", page)]
    assert sum(groups) == (frame["status"] == "error").sum()
    assert groups == sorted(groups, reverse=True)  # most frequent first
    assert "<td>testops:Flaky: ValueError</td>" in page and "<td>read</td>" in page


def test_page_is_self_contained_and_every_image_decodes(reported):
    _, _, page = reported
    sources = re.findall(r"src='([^']*)'", page)
    assert len(sources) >= 12 * 2  # input and resized for each sampled row
    for src in sources:
        assert src.startswith("data:image/")
        data = base64.b64decode(src.split(",", 1)[1])
        assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) is not None
    assert "<script" not in page and "<link" not in page
    assert not re.search(r"(?:href|src)=['\"](?:https?:)?//", page)
    assert not re.search(r"url\((?!data:|#)", page)  # only data: URLs and the SVG's own ids
    assert page.count("<svg") == 1 and "partitions per worker" in page


def test_gallery_sample_is_seeded(reported):
    _, out, page = reported
    again = Path(build_report(str(out), n=12, seed=3, out=str(out / "again.html"))).read_text()
    ids = lambda p: re.findall(r"<div class='id'>([^<]*)<", p)  # noqa: E731
    assert ids(again) == ids(page) and len(ids(page)) == 12
    other = Path(build_report(str(out), n=12, seed=4, out=str(out / "other.html"))).read_text()
    assert ids(other) != ids(page)


def test_error_kinds_normalise_paths_numbers_and_quotes():
    a = error_kind("read: file not found: /data/a/1.jpg")
    b = error_kind("read: file not found: /other/place/27.jpg")
    assert a == b == ("read", "file not found: <path>")
    assert error_kind("resize: ValueError: size 12 'x'") == ("resize: ValueError", "size <n> <str>")


CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--enable-logging=stderr", "--v=0"]


@pytest.fixture(scope="session")
def chromium(tmp_path_factory):
    """Debian's chromium, installed here when apt works (as root); a clear skip elsewhere."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
        if subprocess.run(install, capture_output=True, timeout=900, env=env).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=600, env=env)
            subprocess.run(install, capture_output=True, timeout=900, env=env)
        exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("no chromium, and it cannot be installed here (needs root and apt-get)")
    return exe


def browse(exe: str, url: str, tmp: Path, screenshot: Path | None = None) -> str:
    args = [exe, *CHROME_FLAGS, f"--user-data-dir={tmp}", "--window-size=1200,2000"]
    args += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    proc = subprocess.run([*args, url], capture_output=True, text=True, timeout=120)
    return proc.stderr


def test_opens_in_a_real_browser_without_console_errors(reported, chromium, tmp_path):
    _, out, _ = reported
    control = tmp_path / "control.html"
    control.write_text("<!DOCTYPE html><html><body><script>console.error('control-error')</script></body></html>")
    assert "control-error" in browse(chromium, control.as_uri(), tmp_path / "p0")  # the check can fail
    log = browse(chromium, (out / "report.html").as_uri(), tmp_path / "p1")
    assert "CONSOLE" not in log, log
    shot = tmp_path / "shot.png"
    browse(chromium, (out / "report.html").as_uri(), tmp_path / "p2", screenshot=shot)
    image = cv2.imread(str(shot))
    assert image is not None and image.shape[0] > 500
    assert image.std() > 20 and (image < 128).mean() > 0.01  # text, plots and thumbnails: not a blank page


def test_report_of_a_killed_run_lists_pending_partitions(dataset, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "daskmv.cli", "run", str(dataset / "manifest.parquet"), "--pipeline",
           "testops:Slow", "--out", str(out), "--workers", "2", "--partition-rows", "16", "--progress", "none"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(list((out / "parts").glob("p*[0-9].json")) if (out / "parts").exists() else []) < 4:
            assert time.monotonic() < deadline, "the run never finished a partition"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = {json.loads(p.read_text())["index"] for p in (out / "parts").glob("p*[0-9].json")}
    page = Path(build_report(str(out))).read_text()
    assert cell(page, "state") == "interrupted"
    pending = re.search(r"id='pending-partitions'>pending partitions \((\d+)\)", page)
    assert pending and int(pending.group(1)) == 19 - len(done)
    assert int(cell(page, "rows-ok").replace(",", "")) == sum(
        json.loads(p.read_text())["ok"] for p in (out / "parts").glob("p*[0-9].json"))
    assert int(cell(page, "rows-pending").replace(",", "")) == 304 - int(cell(page, "rows-ok").replace(",", "")) - int(
        cell(page, "rows-error").replace(",", ""))


def test_ops_choose_their_gallery_pictures_and_notebooks_get_a_summary(dataset, client, tmp_path):
    out = tmp_path / "heat"
    result = daskmv.run(str(dataset / "manifest.parquet"), "testops:Heatmap", str(out), client=client, limit=20,
                        progress="none")
    html_summary = result._repr_html_()
    assert "complete; 20 rows, 20 ok, 0 errors, 0 pending" in html_summary
    assert "report" not in html_summary  # no report written yet: no link
    page = Path(result.report(n=4)).read_text()
    assert page.count("<figcaption>heatmap</figcaption>") == 4  # the op's own picture, not the 4x4 array
    assert "<figcaption>scores</figcaption>" not in page
    assert "report.html" in result._repr_html_()


def test_cli_run_with_report(dataset, client, tmp_path):
    from typer.testing import CliRunner

    from daskmv.cli import app

    out = tmp_path / "cli"
    res = CliRunner().invoke(app, ["run", str(dataset / "manifest.csv"), "--pipeline", "resize", "--out", str(out),
                                   "--cluster", client.scheduler.address, "--limit", "30", "--report",
                                   "--progress", "none"])
    assert res.exit_code == 0, res.output
    assert "report: " in res.output and (out / "report.html").exists()
    res = CliRunner().invoke(app, ["report", str(out), "--n", "2", "--to", str(tmp_path / "r.html")])
    assert res.exit_code == 0 and (tmp_path / "r.html").read_text().count("<div class='card'>") == 2
    assert CliRunner().invoke(app, ["report", str(tmp_path)]).exit_code == 2
