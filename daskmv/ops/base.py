"""The Op protocol: what a processing step declares and the two methods it implements.

An op is a small class in the style of datatrove's pipeline steps: it knows nothing of clusters,
partitions or files on disk. It declares

- ``inputs``: names it reads from each row. A name is a manifest column, an earlier op's output, or
  one of the values the engine's loader makes from the row's file (:data:`LOADER_INPUTS`);
- ``outputs``: arrays (written to Zarr, one reference column ``<name>_path`` in the manifest) and
  scalar columns;
- ``params``: named parameters with defaults, checked when the op is built;
- ``gpu``: whether it prefers a GPU (it must still run on CPU);
- ``requires``: optional packages it needs, checked when the op is built.

``setup(device)`` runs once per worker process (models load there); ``process(rows)`` gets a
micro-batch of rows (dicts) and returns one dict of outputs per row, or an exception instance for a
row that failed on its own.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
from dataclasses import dataclass
from collections.abc import Iterator
from typing import Any, ClassVar, Literal

from daskmv.errors import InputReadError, PipelineError, RowError

#: Inputs made by the engine's loader from the row's file (``path`` column), decoded once per row
#: on a prefetch thread and shared by every op of the pipeline.
LOADER_INPUTS: dict[str, str] = {
    "url": "the row's file URL, relative paths resolved against the manifest",
    "bytes": "the row's file content (bytes)",
    "image": "the decoded image: RGB uint8 array [H, W, 3] (gray, RGBA and 16-bit converted)",
    "image_info": "what the file held before conversion: width, height, channels, dtype, format",
    "manifest_base": "the folder (or URL) relative paths in the manifest resolve against: the manifest's own",
    "workdir": "a folder of the output root for this row (work/<pipeline>/<id>) that survives retries and resumed "
               "runs: checkpoints (a temporary folder where the root is not a local path)",
}

#: The loader inputs that need the row's file read.
FILE_INPUTS = frozenset({"bytes", "image", "image_info"})

#: Loader inputs from another column than ``path``: ``<kind>:<column>``. The file kinds read the file whose
#: path is in that column (a pair row's ``image:path_a``); ``array`` reads the array output an earlier stage
#: stored, through the reference in that column (``array:keypoints_path_a``).
COLUMN_KINDS: dict[str, str] = {
    "url": "the URL of the file named in <column>",
    "bytes": "the content of the file named in <column>",
    "image": "the decoded image of the file named in <column>",
    "image_info": "what the file named in <column> held",
    "array": "the array an earlier run stored, through the reference in <column> (outputs.zarr/...#row)",
}


def split_input(name: str) -> tuple[str, str | None]:
    """``image:path_a`` -> (``image``, ``path_a``); a plain loader input or column -> (name, None)."""
    kind, sep, column = name.partition(":")
    if sep and kind in COLUMN_KINDS and column:
        return kind, column
    return name, None


def is_loader_input(name: str) -> bool:
    """Whether the engine's loader makes this input (from the row's file, another column's, or a reference)."""
    return name in LOADER_INPUTS or split_input(name)[1] is not None

Row = dict[str, Any]

#: What a frame source gives the ops after it, per frame: the frame (RGB uint8 [H, W, 3]) as ``image``, what
#: it was (``image_info``), its index in the video (presentation order) and its time in seconds.
FRAME_INPUTS = ("image", "image_info", "frame_index", "timestamp")


def stacked_spec(out: Output) -> Output:
    """What a per-frame output becomes per video: arrays gain a leading time axis; number and bool columns
    become lists (``float32`` -> ``float32[]``); text, JSON and list columns become one JSON list."""
    if out.kind == "array":
        return out
    if out.kind == "artifact":
        raise PipelineError(f"output {out.name!r} is an artifact: ops after a frame source make arrays and columns")
    numeric = not out.dtype.endswith("[]") and out.dtype not in ("string", "str", "json", "path")
    return Output(out.name, out.kind, f"{out.dtype}[]" if numeric else "json", out.help, out.compression,
                  out.export_as)


@dataclass(frozen=True)
class Param:
    """A declared op parameter: its default, a one-line help, optionally the allowed values.

    ``types`` are the accepted Python types; by default they follow the default's type (a number
    default takes any number, a list default any list or tuple; a ``None`` default takes anything), and
    ``None`` is accepted only where the default is ``None`` or ``types`` lists ``type(None)``.
    ``path=True`` marks a file parameter: in a YAML pipeline, a relative path resolves against the
    YAML file's folder.
    """

    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    path: bool = False
    types: tuple[type, ...] | None = None

    def accepted(self) -> tuple[type, ...] | None:
        """The types a value may have (None: anything)."""
        if self.types is not None:
            return self.types
        default = self.default
        if default is None:
            return None
        if isinstance(default, bool):
            return (bool,)
        if isinstance(default, int):
            return (int,)
        if isinstance(default, float):
            return (int, float)
        if isinstance(default, (list, tuple)):
            return (list, tuple)
        return (type(default),)

    def check(self, op: str, key: str, value: Any) -> None:
        """Raise a PipelineError when ``value`` is not of an accepted type."""
        accepted = self.accepted()
        if accepted is None or (value is None and type(None) in accepted):
            return
        if isinstance(value, bool) and bool not in accepted:
            ok = False
        else:
            ok = isinstance(value, accepted)
        if not ok:
            kinds = [t for t in accepted if not (t is int and float in accepted)]
            names = " or ".join(dict.fromkeys(_TYPE_NAMES.get(t, t.__name__) for t in kinds))
            raise PipelineError(f"op {op!r}: {key} must be {names}, not {value!r}")


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list",
               tuple: "a list", dict: "a mapping", type(None): "null"}


@dataclass(frozen=True)
class Output:
    """A declared output. ``array`` outputs go to Zarr; ``column`` outputs become manifest columns;
    ``artifact`` outputs are folders (or files) of the op's own making, such as a COLMAP model or a PLY.

    ``dtype`` is a NumPy dtype name, or for columns also ``string``, ``json`` (any JSON-able value,
    stored as text) or a short vector of numbers such as ``float32[]`` (an Arrow list column: embeddings a
    later reshape reads); artifacts use ``path``. ``compression`` (arrays only: ``zstd``, ``lz4`` or None) suits
    outputs that compress well, such as masks; images and embeddings barely compress and are stored raw by
    default. ``export_as`` names the file ``--export png`` writes (``<id>_<export_as>.png``; default the name).

    An op returns an artifact as the local path of a folder or file it wrote (a temporary one is fine): the
    engine moves it into the output root (``artifacts/<name>/<attempt>/<id>/``), commits it with the
    partition's marker like an array, and puts its path, relative to the manifest, in ``<name>_path``.
    """

    name: str
    kind: Literal["array", "column", "artifact"]
    dtype: str
    help: str = ""
    compression: str | None = None
    export_as: str | None = None

    @property
    def column(self) -> str:
        """The manifest column that holds this output (a reference for arrays, a path for artifacts)."""
        return f"{self.name}_path" if self.kind in ("array", "artifact") else self.name


class Op:
    """Base class of every op. Subclasses set the class attributes and implement :meth:`process`."""

    name: ClassVar[str] = ""
    inputs: ClassVar[tuple[str, ...]] = ()
    outputs: ClassVar[tuple[Output, ...]] = ()
    params: ClassVar[dict[str, Param]] = {}
    gpu: ClassVar[bool] = False
    version: ClassVar[str] = "1"
    requires: ClassVar[tuple[str, ...]] = ()
    help: ClassVar[str] = ""
    #: The fewest rows a partition may hold (None: the engine's floor, 16). Ops that take a good part of a
    #: second or more per row (SIFT on photos, a reconstruction per scene) lower it, so that a small manifest
    #: still spreads over every worker.
    min_partition_rows: ClassVar[int | None] = None
    #: A frame source turns each row into a stream of frames (a video's sampled frames): the ops after it run
    #: on micro-batches of frame rows (inputs :data:`FRAME_INPUTS`), and their outputs are stacked per row along
    #: a leading time axis (see :meth:`open_frames` and :func:`stacked_spec`).
    frame_source: ClassVar[bool] = False
    #: Modules the op's set-up imports that a local cluster's fork server imports once, before it starts the
    #: workers (torch: ~1 s and a few hundred MB per worker otherwise, paid inside each worker's first task).
    preload: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **params: Any) -> None:
        placement = params.pop("device", None)
        if placement is not None and (not isinstance(placement, int) or isinstance(placement, bool) or placement < 0):
            raise PipelineError(f"op {self.name!r}: device must be a GPU number (0, 1, ...), not {placement!r}")
        #: ``device: p`` in a pipeline: run on the worker's p-th GPU after its own (stage placement: models
        #: that do not fit one GPU together); not part of the fingerprint (where an op runs is not what it makes).
        self.placement: int | None = placement
        missing = [pkg for pkg in self.requires if importlib.util.find_spec(pkg) is None]
        if missing:
            raise PipelineError(f"op {self.name!r} needs the package(s) {', '.join(missing)}; pip install them")
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            known = ", ".join(self.params) or "none"
            raise PipelineError(f"op {self.name!r} has no parameter {', '.join(unknown)} (parameters: {known})")
        values = {key: spec.default for key, spec in self.params.items()}
        values.update(params)
        for key, spec in self.params.items():
            if spec.choices is not None and values[key] not in spec.choices:
                raise PipelineError(
                    f"op {self.name!r}: {key}={values[key]!r} is not one of {', '.join(map(repr, spec.choices))}"
                )
            if key in params:
                spec.check(self.name, key, values[key])
        self.config: dict[str, Any] = values
        try:
            self.check_params()
        except (TypeError, ValueError, KeyError, IndexError) as exc:  # a value check_params could not read
            raise PipelineError(f"op {self.name!r}: bad parameter ({type(exc).__name__}: {exc}); "
                                f"parameters given: {params}") from None

    def check_params(self) -> None:
        """Validate and normalise ``self.config``; raise PipelineError with the fix in the message."""

    # -- what the engine asks of an op -------------------------------------------------------------
    def input_names(self) -> tuple[str, ...]:
        """Inputs of this instance (may depend on parameters)."""
        return self.inputs

    def output_specs(self) -> tuple[Output, ...]:
        """Outputs of this instance (may depend on parameters)."""
        return self.outputs

    def row_bytes(self) -> int:
        """About how many bytes of array output one row makes: sizes partitions to a memory budget.

        The default guesses 64 KB per array output; ops whose outputs have a known size say so.
        """
        return sum(64 << 10 for out in self.output_specs() if out.kind == "array")

    def published_columns(self, columns: list[str]) -> list[str]:
        """The input columns a staged pipeline's top-level manifest keeps when this op ends it (default: all).

        An op on group rows whose inputs are long per-member lists (a scene's pairs) keeps only what
        describes the group; the lists stay in the stage's own manifest."""
        return columns

    def setup(self, device: str) -> None:
        """Load models and other per-process state. Called once per worker process before use."""

    def process(self, rows: list[Row]) -> list[Row | BaseException]:
        """Process a micro-batch; return one output dict (or an exception) per row, in order."""
        raise NotImplementedError

    def open_frames(self, row: Row) -> tuple[Row, Iterator[list[Row]]]:
        """A frame source's outputs for ``row`` and its frames, in chunks of frame rows (dicts holding
        :data:`FRAME_INPUTS`). Raise a :class:`RowError` for a row whose frames cannot be read."""
        raise NotImplementedError(f"op {self.name!r} is not a frame source")

    def gallery(self, row: Row) -> list[tuple[str, Any]]:
        """Images that show this op's result for one row, for reports and contact sheets.

        ``row`` holds the row's columns and its array outputs, loaded, by output name. The default shows
        every array output of this op that looks like an image; ops whose results are not images
        (points, matches, splats) override this to draw something a person can judge.
        """
        return [(out.name, row[out.name]) for out in self.output_specs()
                if out.kind == "array" and looks_like_image(row.get(out.name))]

    # -- identity ----------------------------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        """What identifies this configured op: name, version and parameters (JSON-able)."""
        return {"op": self.name, "version": self.version, "params": self.config}

    def fingerprint(self) -> str:
        blob = json.dumps(self.spec(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"{type(self).__name__}({params})"


#: errno values that say a file path is bad (the row's fault): anything else from a read is the machine's.
ROW_ERRNOS = frozenset({errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG,
                        errno.ELOOP, errno.EINVAL})

#: Phrases of device and driver failures (torch/CUDA, cuDNN, cuBLAS, NCCL): the GPU's fault, not the row's.
_DEVICE_ERRORS = ("cuda error", "cuda driver", "cudnn_status", "cudnn error", "cublas_status", "cusolver",
                  "device-side assert", "illegal memory access", "unspecified launch failure", "nccl error",
                  "ecc error", "no cuda gpus are available", "cuda-capable device", "hip error")


def is_device_error(exc: BaseException) -> bool:
    """A GPU or driver failure: retrying the row on the same device will not help."""
    if type(exc).__name__ in ("AcceleratorError", "CudaError", "CUDAError") and not is_out_of_memory(exc):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and not is_out_of_memory(exc) and any(p in text for p in _DEVICE_ERRORS)


def is_infrastructure_error(exc: BaseException) -> bool:
    """Whether a failure belongs to the machine rather than to the row: an I/O error that is not a bad path
    (a network filesystem, an object store, a timeout), or a device error. Such failures fail the partition,
    which is retried, instead of being recorded as row errors that a rerun would skip."""
    if isinstance(exc, RowError):
        return False
    if isinstance(exc, (InputReadError, TimeoutError, ConnectionError)):
        return True
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, OSError):  # with no errno (a decoder's "cannot identify image file"), the file's fault
        return exc.errno is not None and exc.errno not in ROW_ERRNOS
    return is_device_error(exc)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for the errors that mean "this batch did not fit": MemoryError and torch's CUDA OOM."""
    if isinstance(exc, MemoryError):
        return True
    name = type(exc).__name__
    if name in ("OutOfMemoryError", "OutOfMemoryError_"):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def looks_like_image(value: Any) -> bool:
    """An array that can be shown as a picture: [H, W] or [H, W, 1|3|4], at least 8 pixels a side."""
    shape = getattr(value, "shape", None)
    if shape is None or len(shape) not in (2, 3) or min(shape[:2]) < 8:
        return False
    return len(shape) == 2 or shape[2] in (1, 3, 4)
