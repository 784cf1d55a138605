"""The default segmenter's model files: fetched at set-up with pip, checked by hash, never at run time."""

from __future__ import annotations

import hashlib

import pytest

from daskmv import models


def test_fetch_installs_the_checked_model_files(tmp_path):
    dest = models.fetch(tmp_path / "models")
    for name, digest in models.SHA256.items():
        assert hashlib.sha256((dest / name).read_bytes()).hexdigest() == digest
    assert "Apache License" in (dest / "LICENSE-mediapipe.txt").read_text()
    assert models.fetch(dest) == dest  # already there: nothing to do


def test_a_model_with_another_hash_is_refused_and_not_installed(tmp_path, monkeypatch):
    monkeypatch.setitem(models.SHA256, "selfie_segmentation.tflite", "0" * 64)
    with pytest.raises(RuntimeError, match="SHA-256"):
        models.fetch(tmp_path / "models")
    assert not list((tmp_path / "models").glob("*.tflite"))
