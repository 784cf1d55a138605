"""Model files that built-in ops use by default, fetched once at set-up time, never at run time.

The default person segmenter is MediaPipe's selfie-segmentation model (Apache-2.0, 250 KB), which ships
inside the ``mediapipe`` 0.10.21 wheel on PyPI. Installing mediapipe itself would pin numpy<2 and pull
jax, so set-up downloads the wheel (``pip download --no-deps``, 35 MB, once) and keeps only the model
and its license:

    python -m daskmv.models fetch                       # what `make` runs after installing daskmv
    python -m daskmv.models fetch --wheel mediapipe-0.10.21-....whl   # offline: from a wheel you have

Models live in ``$DASKMV_MODEL_DIR`` or else ``~/.cache/daskmv/models``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

MEDIAPIPE_WHEEL = "mediapipe==0.10.21"
SELFIE_FILES = {
    "mediapipe/modules/selfie_segmentation/selfie_segmentation.tflite": "selfie_segmentation.tflite",
    "mediapipe/modules/selfie_segmentation/selfie_segmentation_landscape.tflite":
        "selfie_segmentation_landscape.tflite",
    "mediapipe-0.10.21.dist-info/LICENSE": "LICENSE-mediapipe.txt",
}
#: The model files' SHA-256: a changed or corrupted download is refused, never used.
SHA256 = {
    "selfie_segmentation.tflite": "9ee168ec7c8f2a16c56fe8e1cfbc514974cbbb7e434051b455635f1bd1462f5c",
    "selfie_segmentation_landscape.tflite": "a77d03f4659b9f6b6c1f5106947bf40e99d7655094b6527f214ea7d451106edd",
}


def model_dir() -> Path:
    return Path(os.environ.get("DASKMV_MODEL_DIR") or Path.home() / ".cache" / "daskmv" / "models")


def selfie_model(landscape: bool = False) -> Path:
    """The selfie-segmentation model file; a clear error naming the fix when it was never fetched."""
    path = model_dir() / ("selfie_segmentation_landscape.tflite" if landscape else "selfie_segmentation.tflite")
    if not path.exists():
        from daskmv.errors import PipelineError

        raise PipelineError(f"the default person segmenter is not installed ({path} is missing): run "
                            "`python -m daskmv.models fetch` once (make does), or give segment a model=")
    return path


#: What pip prints when it cannot reach the package index (as opposed to the index answering "no").
NETWORK_ERRORS = ("NewConnectionError", "ConnectTimeout", "ReadTimeout", "timed out", "Max retries exceeded",
                  "Temporary failure in name resolution", "Name or service not known", "Network is unreachable",
                  "Connection refused", "Connection reset", "ProxyError", "RemoteDisconnected")


class DownloadError(RuntimeError):
    """pip could not download the wheel; ``unreachable`` when the index was out of reach or too slow."""

    def __init__(self, message: str, unreachable: bool) -> None:
        super().__init__(message)
        self.unreachable = unreachable


def download_wheel(folder: Path, timeout: float | None = None) -> Path:
    """``pip download`` the mediapipe wheel into ``folder``; a DownloadError after ``timeout`` seconds."""
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", MEDIAPIPE_WHEEL, "-d", str(folder)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise DownloadError(f"pip download {MEDIAPIPE_WHEEL} took longer than {timeout:.0f} s", True) from None
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        network = [line for line in lines if any(marker in line for marker in NETWORK_ERRORS)]
        said = " | ".join(network[-1:] + lines[-1:])
        raise DownloadError(f"pip download {MEDIAPIPE_WHEEL} failed (exit {proc.returncode}): {said}", bool(network))
    return next(folder.glob("mediapipe-*.whl"))


def fetch(dest: Path | None = None, wheel: Path | None = None, timeout: float | None = None) -> Path:
    """Extract the selfie-segmentation models and license from the mediapipe wheel: ``wheel`` when given (a
    file you have), else one downloaded with pip (a DownloadError when that fails or passes ``timeout`` s)."""
    dest = dest or model_dir()
    if all((dest / name).exists() for name in SELFIE_FILES.values()):
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        source = wheel or download_wheel(Path(tmp), timeout)
        with zipfile.ZipFile(source) as zf:
            missing = sorted(set(SELFIE_FILES) - set(zf.namelist()))
            if missing:
                raise RuntimeError(f"{source} is not the {MEDIAPIPE_WHEEL} wheel: it has no {missing[0]}")
            files = {name: zf.read(member) for member, name in SELFIE_FILES.items()}
    for name, digest in SHA256.items():
        got = hashlib.sha256(files[name]).hexdigest()
        if got != digest:
            raise RuntimeError(f"{name} from {MEDIAPIPE_WHEEL} has SHA-256 {got}, expected {digest}: not installed")
    for name, data in files.items():  # write, then rename: an interrupted fetch leaves no half file
        (dest / f"{name}.tmp").write_bytes(data)
        os.replace(dest / f"{name}.tmp", dest / name)
    (dest / "README.txt").write_text(
        "selfie_segmentation*.tflite: MediaPipe Selfie Segmentation (Google), Apache License 2.0, see\n"
        f"LICENSE-mediapipe.txt. Extracted from the {MEDIAPIPE_WHEEL} wheel on PyPI by daskmv.models.fetch.\n")
    return dest


def main(argv: list[str]) -> int:
    if argv[:1] != ["fetch"] or len(argv) not in (1, 3) or (len(argv) == 3 and argv[1] != "--wheel"):
        print("usage: python -m daskmv.models fetch [--wheel MEDIAPIPE_WHEEL_FILE]", file=sys.stderr)
        return 2
    try:
        print(f"models in {fetch(wheel=Path(argv[2]) if len(argv) == 3 else None)}")
    except DownloadError as exc:
        print(f"{exc}\nno network? download {MEDIAPIPE_WHEEL} elsewhere and run `python -m daskmv.models fetch "
              "--wheel FILE`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
