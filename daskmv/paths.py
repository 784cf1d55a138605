"""File paths in manifests: how a row's path becomes a URL. Light on imports: workers use it too."""

from __future__ import annotations

import posixpath

from fsspec.core import split_protocol


def resolve_path(path: str, base: str) -> str:
    """Resolve a manifest's file path: URLs and absolute paths as they are, others against ``base``."""
    protocol, _ = split_protocol(path)
    if protocol is not None or path.startswith("/") or not base:
        return path
    return posixpath.join(base, path)
