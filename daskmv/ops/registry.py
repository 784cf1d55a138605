"""Ops by name: built-ins register themselves; a user's op is named by import path (``pkg.mod:Class``)."""

from __future__ import annotations

import importlib
from typing import Any, TypeVar

from daskmv.errors import PipelineError
from daskmv.ops.base import Op

REGISTRY: dict[str, type[Op]] = {}

#: Named pipelines: a name that expands to steps, usable wherever an op name is.
PIPELINES: dict[str, list[dict[str, Any]]] = {}

OpT = TypeVar("OpT", bound=type[Op])


def register_op(cls: OpT) -> OpT:
    """Class decorator: make ``cls`` available by its ``name`` in pipelines and ``daskmv ops``."""
    if not (isinstance(cls, type) and issubclass(cls, Op)) or not cls.name:
        raise TypeError(f"{cls!r} is not an Op subclass with a name")
    existing = REGISTRY.get(cls.name)
    if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"an op named {cls.name!r} is already registered ({existing.__module__})")
    REGISTRY[cls.name] = cls
    return cls


def register_pipeline(name: str, steps: list[dict[str, Any]]) -> None:
    """Make ``name`` expand to ``steps`` (dicts of ``op`` and ``params``) in pipeline specs."""
    PIPELINES[name] = steps


def get_op_class(name: str) -> type[Op]:
    """A registered op by name, or an Op subclass by import path ``package.module:ClassName``."""
    if ":" in name:
        return _import_op(name)
    try:
        return REGISTRY[name]
    except KeyError:
        raise PipelineError(f"unknown op {name!r} (built-in ops: {', '.join(sorted(REGISTRY))}; "
                            "a user op is named as package.module:ClassName)") from None


def _import_op(path: str) -> type[Op]:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PipelineError(f"cannot import op {path!r}: {exc}") from None
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Op)):
        raise PipelineError(f"{path!r} is not an Op subclass (found {cls!r})")
    if not cls.name:
        cls.name = path
    return cls
