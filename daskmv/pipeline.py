"""Pipelines: ordered ops with their parameters, from a comma list, a YAML file or Python.

A pipeline is checked before anything runs: every op's inputs must be a manifest column, an earlier
op's output, or something the loader makes from the row's file. Its fingerprint (a hash of every op's
name, version and parameters) keys the output root, so a changed pipeline never reuses old results.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from daskmv.errors import PipelineError
from daskmv.ops import LOADER_INPUTS, Op, Output, get_op_class
from daskmv.ops.base import COLUMN_KINDS, FRAME_INPUTS, is_loader_input, split_input, stacked_spec
from daskmv.reshape import Reshape, get_reshape
from daskmv.ops.registry import PIPELINES, register_pipeline

__all__ = ["PIPELINES", "Pipeline", "Plan", "register_pipeline"]

#: Columns every output manifest gets; a pipeline output may not take these names.
RESERVED_COLUMNS = ("id", "status", "error", "seconds")


class Pipeline:
    """Ordered, configured ops. Build with :meth:`parse`; check with :meth:`validate`.

    ``chain`` is the fingerprint of what came before this pipeline when it is one stage of a longer one
    (see :class:`Plan`): it is part of this pipeline's fingerprint, so a changed earlier step invalidates it.
    """

    def __init__(self, ops: Sequence[Op], name: str | None = None, chain: str = "") -> None:
        if not ops:
            raise PipelineError("a pipeline needs at least one op")
        self.ops = list(ops)
        self.name = name or ",".join(op.name for op in self.ops)
        self.chain = chain
        self._check_outputs()

    # -- building ----------------------------------------------------------------------------------
    @classmethod
    def parse(cls, spec: str | os.PathLike | Sequence[Any] | Pipeline) -> Pipeline:
        """From a comma list (``"resize,stats"``), a YAML file path, a list of steps, or a Pipeline."""
        if isinstance(spec, Pipeline):
            return spec
        items, name = _parse_items(spec)
        return cls.of_items(items, name)

    @classmethod
    def of_items(cls, items: Sequence[Any], name: str | None = None) -> Pipeline:
        reshapes = [item.name for item in items if isinstance(item, Reshape)]
        if reshapes:
            raise PipelineError(f"the pipeline has reshape steps ({', '.join(reshapes)}): run it with `daskmv run` "
                                "or daskmv.run(), which run it stage by stage")
        return cls(items, name=name)

    @classmethod
    def from_steps(cls, steps: Iterable[Any], name: str | None = None, base: str | None = None) -> Pipeline:
        """From steps: ``"name"``, ``{"name": {params}}``, ``{"op": name, "params": {...}}`` or Op objects."""
        return cls.of_items(_build_items(steps, base), name)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> Pipeline:
        """Read ``steps:`` (or ``ops:``) and an optional ``name:``; file params resolve beside the YAML."""
        items, name = _yaml_items(path)
        return cls.of_items(items, name)

    def steps(self) -> list[dict[str, Any]]:
        """The pipeline as data (what a YAML file holds and workers rebuild from)."""
        return [{"op": op.name, "params": op.config if op.placement is None else {**op.config, "device": op.placement}}
                for op in self.ops]

    def to_yaml(self) -> str:
        return yaml.safe_dump({"name": self.name, "steps": self.steps()}, sort_keys=False)

    # -- what it needs and makes -------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        specs: list[Any] = [op.spec() for op in self.ops]
        if self.chain:
            specs = [{"after": self.chain}, *specs]
        blob = json.dumps(specs, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def frame_source(self) -> int | None:
        """The position of the op whose rows become frames (a ``video`` step), or None."""
        return next((k for k, op in enumerate(self.ops) if op.frame_source), None)

    @property
    def outputs(self) -> list[Output]:
        """Every op's outputs, as the output manifest holds them (per video, stacked, after a frame source)."""
        source = self.frame_source
        return [stacked_spec(out) if source is not None and k > source else out
                for k, op in enumerate(self.ops) for out in op.output_specs()]

    @property
    def array_outputs(self) -> list[Output]:
        return [out for out in self.outputs if out.kind == "array"]

    @property
    def output_columns(self) -> list[str]:
        return [out.column for out in self.outputs]

    @property
    def min_partition_rows(self) -> int | None:
        """The lowest floor the ops put under a partition's rows (None: the engine's)."""
        floors = [op.min_partition_rows for op in self.ops if op.min_partition_rows]
        return min(floors) if floors else None

    @property
    def loader_inputs(self) -> frozenset[str]:
        """What the loader must make from each row's file (empty: no file is read)."""
        produced = {out.name for out in self.outputs} | {o.column for o in self.outputs if o.kind == "artifact"}
        source = self.frame_source
        return frozenset(n for k, op in enumerate(self.ops) for n in op.input_names()
                         if is_loader_input(n) and n not in produced
                         and not (source is not None and k > source and n in FRAME_INPUTS))

    def column_inputs(self, columns: Sequence[str]) -> list[str]:
        """The manifest columns the ops read (not made by an earlier op): part of each row's identity."""
        produced: set[str] = set()
        found: list[str] = []
        for op in self.ops:
            for name in op.input_names():
                column = split_input(name)[1] or name
                if column in columns and column not in produced and column not in found:
                    found.append(column)
            produced |= {out.name for out in op.output_specs()}
        return found

    @property
    def row_bytes(self) -> int:
        """Estimated array output per row (see :meth:`Op.row_bytes`)."""
        return sum(op.row_bytes() for op in self.ops)

    @property
    def needs_gpu(self) -> bool:
        return any(op.gpu for op in self.ops)

    def _check_outputs(self) -> None:
        sources = [op.name for op in self.ops if op.frame_source]
        if len(sources) > 1:
            raise PipelineError(f"a pipeline takes one frame source, not {len(sources)} ({', '.join(sources)})")
        self.outputs  # noqa: B018  (an artifact after a frame source is refused here)
        seen: dict[str, str] = {}
        for op in self.ops:
            for out in op.output_specs():
                for name in {out.name, out.column}:
                    if name in RESERVED_COLUMNS or name in LOADER_INPUTS or ":" in name:
                        raise PipelineError(f"op {op.name!r}: output name {name!r} is reserved")
                    if name in seen:
                        raise PipelineError(f"ops {seen[name]!r} and {op.name!r} both write {name!r}")
                    seen[name] = op.name

    def validate(self, columns: Sequence[str], path_column: str = "path") -> list[str]:
        """Check every input against the manifest's columns; return the input columns outputs replace.

        Raises PipelineError naming the op, the missing input, and what could provide it.
        """
        available = set(columns)
        for k, op in enumerate(self.ops):
            if k and self.ops[k - 1].frame_source:
                available |= set(FRAME_INPUTS)
            for name in op.input_names():
                kind, column = split_input(name)
                if column is not None and name not in available:
                    if column not in columns:
                        raise PipelineError(f"op {op.name!r} reads {name!r}, but the manifest has no column {column!r} "
                                            f"(columns: {', '.join(columns)})")
                    continue
                if name in LOADER_INPUTS and name not in available:
                    if path_column not in columns and name not in ("manifest_base", "workdir"):
                        raise PipelineError(
                            f"op {op.name!r} reads files but the manifest has no column {path_column!r} "
                            "(name the file column with --path-column)"
                        )
                    continue
                if name not in available:
                    raise PipelineError(
                        f"op {op.name!r} needs input {name!r}: not a manifest column, not an output of an "
                        f"earlier op, and not one of {', '.join(LOADER_INPUTS)} or <kind>:<column> "
                        f"(kinds: {', '.join(COLUMN_KINDS)})"
                    )
            available |= {out.name for out in op.output_specs()}
            # a folder-like output is also there by its manifest column's name (a later op reads `model_path`
            # from the same stage's reconstruct as from the scenes manifest)
            available |= {out.column for out in op.output_specs() if out.kind == "artifact"}
        written = set(self.output_columns) | set(RESERVED_COLUMNS[1:])
        return [c for c in columns if c in written]

    def __repr__(self) -> str:
        return f"Pipeline({self.name!r}, {self.ops!r})"


class Stage:
    """One stage of a :class:`Plan`: an optional reshape of the rows before it, then its ops (maybe none)."""

    def __init__(self, reshape: Reshape | None, ops: list[Op]) -> None:
        self.reshape, self.ops = reshape, ops
        parts = ([reshape.name] if reshape else []) + [op.name.replace(":", "_").replace(".", "_") for op in ops]
        self.name = "-".join(parts)[:48] or "stage"

    def spec(self) -> list[Any]:
        return ([self.reshape.spec()] if self.reshape else []) + [op.spec() for op in self.ops]

    def pipeline(self, chain: str) -> Pipeline | None:
        return Pipeline(self.ops, name=self.name, chain=chain) if self.ops else None


class Plan:
    """A pipeline cut into stages at its reshape steps (``group``, ``explode``, ``pairs``).

    Each stage is an ordinary run of its ops over the rows the reshape made of the previous stage's output
    manifest. Without reshapes, a plan is one stage: an ordinary pipeline.
    """

    def __init__(self, items: Sequence[Any], name: str | None = None) -> None:
        if not items:
            raise PipelineError("a pipeline needs at least one step")
        self.items = list(items)
        self.stages: list[Stage] = []
        reshape: Reshape | None = None
        ops: list[Op] = []
        for item in self.items:
            if isinstance(item, Reshape):
                if reshape is not None or ops:
                    self.stages.append(Stage(reshape, ops))
                reshape, ops = item, []
            else:
                ops.append(item)
        self.stages.append(Stage(reshape, ops))
        self.name = name or ",".join(item.name for item in self.items)

    @classmethod
    def parse(cls, spec: Any) -> Plan:
        if isinstance(spec, Plan):
            return spec
        if isinstance(spec, Pipeline):
            return cls(spec.ops, spec.name)
        items, name = _parse_items(spec)
        return cls(items, name)

    @property
    def staged(self) -> bool:
        return any(stage.reshape is not None for stage in self.stages)

    def pipeline(self) -> Pipeline:
        """The plan as an ordinary pipeline (it has no reshape)."""
        return Pipeline.of_items(self.items, self.name)


def _parse_items(spec: Any) -> tuple[list[Any], str | None]:
    """Ops and reshapes from a comma list, a YAML file, or a list of steps; and the pipeline's name."""
    if isinstance(spec, os.PathLike) or (isinstance(spec, str) and spec.endswith((".yaml", ".yml"))):
        return _yaml_items(spec)
    if isinstance(spec, str):
        names = [s.strip() for s in spec.split(",") if s.strip()]
        if not names:
            raise PipelineError("empty pipeline: name ops as a comma list, e.g. --pipeline resize,stats")
        return _build_items(names, None), (spec if len(names) == 1 and spec in PIPELINES else None)
    return _build_items(list(spec), None), None


def _yaml_items(path: str | os.PathLike) -> tuple[list[Any], str]:
    """Read ``steps:`` (or ``ops:``) and an optional ``name:``; file params resolve beside the YAML."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"pipeline file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise PipelineError(f"pipeline file {path} is not valid YAML: {exc}") from None
    if isinstance(doc, list):
        doc = {"steps": doc}
    if not isinstance(doc, dict) or not isinstance(doc.get("steps", doc.get("ops")), list):
        raise PipelineError(f"pipeline file {path} needs a list under 'steps:'")
    steps = doc.get("steps", doc.get("ops"))
    return _build_items(steps, str(path.parent.resolve())), doc.get("name") or path.stem


def _build_items(steps: Iterable[Any], base: str | None) -> list[Any]:
    """Ops and reshape steps, named pipelines expanded."""
    items: list[Any] = []
    for step in steps:
        if isinstance(step, (Op, Reshape)):
            items.append(step)
            continue
        name, params = _step_parts(step)
        if name in PIPELINES:
            items.extend(_build_items(_named_steps(name, params), base))
            continue
        reshape = get_reshape(name)
        if reshape is not None:
            items.append(reshape(**params))
            continue
        op_cls = get_op_class(name)
        if base:
            params = _resolve_paths(op_cls, params, base)
        items.append(op_cls(**params))
    return items


def _step_parts(step: Any) -> tuple[str, dict[str, Any]]:
    if isinstance(step, str):
        return step, {}
    if isinstance(step, dict) and "op" in step:
        extra = set(step) - {"op", "params"}
        if extra:
            raise PipelineError(f"pipeline step {step!r}: unknown key(s) {', '.join(sorted(extra))}")
        return str(step["op"]), dict(step.get("params") or {})
    if isinstance(step, dict) and len(step) == 1:
        (name, params), = step.items()
        if params is not None and not isinstance(params, dict):
            raise PipelineError(f"pipeline step {name!r}: parameters must be a mapping, not {params!r}")
        return str(name), dict(params or {})
    raise PipelineError(f"cannot read pipeline step {step!r}: use a name, {{name: {{params}}}} or {{op:, params:}}")


def _named_steps(name: str, overrides: dict[str, Any]) -> list[dict[str, Any]]:
    """A named pipeline's steps, with parameters given per op name (``relight: {degrade: {seed: 3}}``)."""
    steps = [{"op": step["op"], "params": dict(step.get("params") or {})} for step in PIPELINES[name]]
    names = [step["op"] for step in steps]
    for op_name, params in overrides.items():
        if op_name not in names:
            raise PipelineError(f"pipeline {name!r} has no op {op_name!r} to set parameters of "
                                f"(its ops: {', '.join(names)})")
        if not isinstance(params, dict):
            raise PipelineError(f"pipeline {name!r}: parameters of {op_name!r} must be a mapping, not {params!r}")
        for step in steps:
            if step["op"] == op_name:
                step["params"].update(params)
    return steps


def _resolve_paths(op_cls: type[Op], params: dict[str, Any], base: str) -> dict[str, Any]:
    out = dict(params)
    for key, spec in op_cls.params.items():
        value = out.get(key)
        if spec.path and isinstance(value, str) and not os.path.isabs(value) and ":" not in value:
            candidate = os.path.join(base, value)
            if os.path.exists(candidate):
                out[key] = candidate
    return out
