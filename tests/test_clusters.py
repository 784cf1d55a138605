"""Beyond one machine, for real: a SLURM started by the tests, scancel mid-run, a full disk, Jupyter.

The SLURM tests start Debian's slurm-wlm and munge on this machine with deploy/slurm/local-cluster.sh (as
root, with apt); where that cannot run they skip and say why. The commands are the README's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import N_GOOD
from daskmv.data import load_output

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
LOCAL_SLURM = REPO / "deploy" / "slurm" / "local-cluster.sh"
DASKMV = [sys.executable, "-m", "daskmv.cli"]

#: What a one-node test cluster needs on top of the shipped daskmv-cpu profile (2 CPUs: 2 jobs of 1 core).
SLURM_SITE = {
    "retry_delay": 0.2,
    "cluster_kwargs": {
        "cores": 1, "processes": 1, "memory": "2GB", "queue": "debug", "walltime": "00:10:00",
        "interface": "lo", "scheduler_options": {"interface": "lo", "dashboard_address": ":0"},
    },
}


def markers(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "parts").glob("p*[0-9].json"))]


@pytest.fixture(scope="module")
def slurm():
    if shutil.which("bash") is None:
        pytest.skip("no bash to run deploy/slurm/local-cluster.sh")
    proc = subprocess.run([str(LOCAL_SLURM), "up"], capture_output=True, text=True, timeout=900)
    if proc.returncode == 3:
        pytest.skip(f"no real SLURM here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    yield
    subprocess.run([str(LOCAL_SLURM), "down"], capture_output=True, timeout=120)


@pytest.fixture
def site_config(tmp_path) -> Path:
    path = tmp_path / "slurm-site.yaml"
    site = {**SLURM_SITE, "cluster_kwargs": {**SLURM_SITE["cluster_kwargs"], "log_directory": str(tmp_path / "logs")}}
    path.write_text(yaml.safe_dump(site))
    return path


def slurm_run(dataset: Path, out: Path, config: Path, pipeline: str) -> list[str]:
    return [*DASKMV, "run", str(dataset / "manifest.csv"), "--pipeline", pipeline, "--out", str(out),
            "--cluster", "slurm:daskmv-cpu", "--workers", "2", "--config", str(config), "--progress", "log"]


def test_slurm_run_executes_inside_slurm_jobs(slurm, dataset, site_config, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(slurm_run(dataset, out, site_config, "decode,resize,stats"), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    frame = pd.read_parquet(out / "manifest.parquet")
    assert len(frame) == N_GOOD + 4 and (frame["status"] == "ok").sum() == N_GOOD and frame["id"].is_unique
    jobs = {m["slurm_job_id"] for m in markers(out)}
    assert None not in jobs and all(j.isdigit() for j in jobs)
    run = json.loads((out / "run.json").read_text())
    assert sorted(int(i) for parts in run["slurm_jobs"].values() for i in parts) == list(range(run["partitions"]))
    assert set(run["slurm_jobs"]) == jobs
    row = frame[frame["status"] == "ok"].iloc[0]
    assert load_output(str(out / "manifest.parquet"), row["id"], "resized").shape == (224, 224, 3)


def test_a_cancelled_worker_job_is_replaced_and_nothing_is_lost(slurm, dataset, site_config, tmp_path):
    out = tmp_path / "out"
    (tmp_path / "slow.yaml").write_text("steps:\n  - testops:Slow: {seconds: 0.03}\n")
    cmd = slurm_run(dataset, out, site_config, str(tmp_path / "slow.yaml")) + ["--partition-rows", "16"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not ((out / "parts").exists() and len({m["slurm_job_id"] for m in markers(out)} - {None}) >= 1
               and len(markers(out)) >= 3):
        assert time.monotonic() < deadline and proc.poll() is None, "the run never got going"
        time.sleep(0.1)
    victim = markers(out)[-1]["slurm_job_id"]
    before = {m["index"]: m["started"] for m in markers(out)}
    subprocess.run(["scancel", victim], check=True)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    frame = pd.read_parquet(out / "manifest.parquet")
    assert len(frame) == N_GOOD + 4 and frame["id"].is_unique and (frame["status"] == "ok").all()
    run = json.loads((out / "run.json").read_text())
    assert victim in run["slurm_jobs"]
    assert len(run["slurm_jobs"]) >= 2  # the survivor, and the job that replaced the cancelled one
    after = {m["index"]: m["started"] for m in markers(out)}
    assert all(after[i] == started for i, started in before.items())  # finished partitions stayed finished


def test_slurm_with_no_site_keys_sizes_its_jobs_from_sinfo(slurm, dataset, tmp_path):
    """`--cluster slurm`, no profile, and no cores, memory, processes or partition anywhere: one job is the
    default partition's smallest node, as sinfo says, and the run says so and completes inside the jobs."""
    config = tmp_path / "no-sizes.yaml"
    keys = {k: v for k, v in SLURM_SITE["cluster_kwargs"].items() if k not in ("cores", "processes", "memory", "queue")}
    config.write_text(yaml.safe_dump({"retry_delay": 0.2, "cluster_kwargs": {**keys, "log_directory": str(tmp_path)}}))
    sinfo = subprocess.run(["sinfo", "-h", "-N", "-o", "%c %m"], capture_output=True, text=True, check=True).stdout
    cpus, mem_mb = min(int(line.split()[0]) for line in sinfo.splitlines()), min(int(line.split()[1]) for line in sinfo.splitlines())
    out = tmp_path / "out"
    proc = subprocess.run([*DASKMV, "run", str(dataset / "manifest.csv"), "--pipeline", "decode,resize", "--out", str(out),
                           "--cluster", "slurm", "--workers", "1", "--config", str(config), "--progress", "log"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    chosen = f"cores={cpus}, processes={cpus}, memory={mem_mb // 1024}GiB per job, from sinfo"
    assert chosen in proc.stderr and "partition debug" in proc.stderr, proc.stderr
    frame = pd.read_parquet(out / "manifest.parquet")
    assert len(frame) == N_GOOD + 4 and (frame["status"] == "ok").sum() == N_GOOD
    jobs = {m["slurm_job_id"] for m in markers(out)}
    assert jobs and None not in jobs and all(j.isdigit() for j in jobs)


def test_slurm_profile_errors_are_clear(slurm, dataset, tmp_path):
    proc = subprocess.run([*DASKMV, "run", str(dataset / "manifest.csv"), "--pipeline", "resize", "--out",
                           str(tmp_path / "o"), "--cluster", "slurm:no-such-profile", "--progress", "none"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no-such-profile" in proc.stderr and "Traceback" not in proc.stderr


def test_a_job_slurm_cannot_run_is_refused_in_one_line(slurm, dataset, site_config, tmp_path):
    site = yaml.safe_load(site_config.read_text())
    site["cluster_kwargs"]["memory"] = "4000GB"  # more than any node has
    site_config.write_text(yaml.safe_dump(site))
    proc = subprocess.run(slurm_run(dataset, tmp_path / "out", site_config, "resize"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "SLURM refuses the worker job (sbatch --test-only: allocation failure: Requested node configuration" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


def test_slurm_jobs_that_never_start_are_a_clear_error(slurm, dataset, site_config, tmp_path):
    """Jobs that stay pending (here: told to begin in an hour) end the run after the start timeout with a
    message about SLURM, not a misdiagnosis of the output root or the scheduler."""
    site = yaml.safe_load(site_config.read_text())
    extra = list(site["cluster_kwargs"].get("job_extra_directives") or [])
    site["cluster_kwargs"]["job_extra_directives"] = [*extra, "--begin=now+3600"]
    site_config.write_text(yaml.safe_dump(site))
    proc = subprocess.run(slurm_run(dataset, tmp_path / "out", site_config, "resize"), capture_output=True,
                          text=True, timeout=300, env={**os.environ, "DASKMV_SLURM_START_TIMEOUT": "8"})
    assert proc.returncode == 1, proc.stderr
    assert "no SLURM job started a worker within 8 s" in proc.stderr, proc.stderr
    assert "output root" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.fixture
def tiny_disk(tmp_path):
    """A 16 MB filesystem (tmpfs), to fill up; skipped where mounting is not allowed."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_full_disk_is_a_clear_error_and_leaves_no_marker_without_its_data(dataset, tiny_disk, tmp_path):
    out = tiny_disk / "out"
    (tmp_path / "s.yaml").write_text("retries: 1\nretry-delay: 0.1\n")
    cmd = [*DASKMV, "run", str(dataset / "manifest.csv"), "--pipeline", "resize", "--out", str(out),
           "--workers", "2", "--partition-rows", "16", "--config", str(tmp_path / "s.yaml"), "--progress", "none"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr
    assert "No space left on device" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert "run the same command again" in proc.stderr, proc.stderr
    done = markers(out)
    assert done, f"some partitions should fit before the disk fills: {proc.stderr}"
    for marker in done:  # write, then mark: every marker's rows and arrays are there and readable
        part = pd.read_parquet(out / "parts" / marker["part"])
        assert len(part) == marker["rows"]
        for _, row in part[part["status"] == "ok"].iterrows():
            ref = row["resized_path"]
            from daskmv.data import resolve_ref
            from daskmv.arrays import read_array_row

            url, r = resolve_ref(str(out / "manifest.parquet"), ref)
            assert read_array_row(url, r).shape == (224, 224, 3)
    assert not list(out.rglob("*.tmp-*")), f"half-written files were left behind: {proc.stderr}"
    subprocess.run(["mount", "-o", "remount,size=256m", str(tiny_disk)], check=True)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    frame = pd.read_parquet(out / "manifest.parquet")
    assert len(frame) == N_GOOD + 4 and frame["id"].is_unique and (frame["status"] == "ok").sum() == N_GOOD
    run = json.loads((out / "run.json").read_text())
    assert run["counts"]["skipped_partitions"] == len(done)


def test_quickstart_notebook_runs(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    notebook = nbformat.read(REPO / "examples" / "quickstart.ipynb", as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    html = " ".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert "<progress value='48' max='48'" in html  # the notebook progress display, finished
    assert "48 rows, 48 ok, 0 errors, 0 pending" in html  # the result's summary
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the plotted outputs
    assert any("report.html" in o.get("text", "") for o in outputs)


def test_the_driver_as_a_batch_job(slurm, dataset, site_config, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "MANIFEST": str(dataset / "manifest.csv"), "PIPELINE": "decode,resize,stats",
           "OUT": str(out), "JOBS": "1", "SETTINGS": str(site_config), "VENV": str(Path(sys.executable).parents[1])}
    proc = subprocess.run(["sbatch", "--wait", f"--output={tmp_path}/driver-%j.log", "--chdir", str(REPO),
                           str(REPO / "deploy" / "slurm" / "daskmv.sbatch")], capture_output=True, text=True,
                          env=env, timeout=600)
    log = "".join(p.read_text() for p in tmp_path.glob("driver-*.log"))
    assert proc.returncode == 0, proc.stderr + log
    assert "done: 304 rows: 300 ok, 4 errors" in log
    driver_job = proc.stdout.split()[-1]
    jobs = {m["slurm_job_id"] for m in markers(out)}
    assert jobs and driver_job not in jobs  # the work ran in the worker jobs the driver submitted
