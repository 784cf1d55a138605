"""``torch_model``: run any torch model over resized images, in micro-batches, on the worker's device.

The model is named by a TorchScript file (``model: path/to/net.pt``), a ``torch.export`` program
(``net.pt2``), or by an import path to a
factory (``model: mypkg.nets:build``, with optional ``kwargs`` and a ``checkpoint`` state-dict file).
Nothing is ever downloaded. The model loads once per worker process (:meth:`TorchModel.setup`); its
output for each row is stored as one array.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import os
import re
import warnings
from typing import Any

import cv2
import numpy as np

from daskmv.errors import PipelineError
from daskmv.ops.base import Op, Output, Param, Row
from daskmv.ops.core import INTERPOLATIONS, parse_size
from daskmv.ops.registry import register_op

_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@register_op
class TorchModel(Op):
    name = "torch_model"
    help = "Run a TorchScript file or a module:factory model over resized images; store its output per row."
    inputs = ("image",)
    gpu = True
    preload = ("torch",)
    params = {
        "model": Param(None, "TorchScript file, torch.export .pt2 file, or module:factory returning an nn.Module",
                       path=True),
        "checkpoint": Param(None, "state-dict file loaded into a factory-built model (optional)", path=True),
        "kwargs": Param({}, "keyword arguments for the factory"),
        "input": Param("image", "what the model sees: the row's decoded image (a video's frame after a `video` step), "
                       "an earlier op's image output, or array:<column> (a frame manifest's array:frame_path)"),
        "size": Param(224, "input size: an int or [width, height]", types=(int, list, tuple)),
        "interpolation": Param("area", "OpenCV interpolation for the input resize", tuple(INTERPOLATIONS)),
        "mean": Param(IMAGENET_MEAN, "per-channel mean subtracted from RGB in [0, 1]"),
        "std": Param(IMAGENET_STD, "per-channel standard deviation divided out"),
        "output": Param("model_output", "name of the array output (column <output>_path)"),
        "output_key": Param(None, "key or index of the tensor to keep when the model returns a dict/tuple"),
        "dtype": Param("float32", "stored dtype of the output", ("float32", "float16")),
    }

    def check_params(self) -> None:
        self.config["model"], self.config["checkpoint"] = check_model(
            self.name, self.config["model"], self.config["checkpoint"])
        self.size = parse_size(self.config["size"], self.name)
        self.config["size"] = list(self.size)
        for key in ("mean", "std"):
            if len(self.config[key]) != 3:
                raise PipelineError(f"op 'torch_model': {key} needs 3 values (RGB), got {self.config[key]!r}")
        if not re.match(r"^[A-Za-z_][\w]*$", str(self.config["output"])):
            raise PipelineError(f"op 'torch_model': output name {self.config['output']!r} is not an identifier")
        self.model: Any = None
        self.device = "cpu"

    def input_names(self) -> tuple[str, ...]:
        return (self.config["input"],)

    def output_specs(self) -> tuple[Output, ...]:
        return (Output(self.config["output"], "array", self.config["dtype"], "the model's output per row"),)

    def spec(self) -> dict[str, Any]:
        spec = super().spec()
        files = [self.config["model"], self.config["checkpoint"]]
        spec["files"] = {f: file_identity(f) for f in files if f and os.path.isfile(f)}
        return spec

    def setup(self, device: str) -> None:
        import torch

        self.device = device
        self.model = load_torch_model(self.config["model"], self.config["checkpoint"], self.config["kwargs"], device)
        self.mean = torch.tensor(self.config["mean"], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(self.config["std"], device=device).view(1, 3, 1, 1)

    def process(self, rows: list[Row]) -> list[Row | BaseException]:
        import torch

        flag = INTERPOLATIONS[self.config["interpolation"]]
        key = self.config["input"]
        batch = np.stack([cv2.resize(_rgb(row[key], key), self.size, interpolation=flag) for row in rows])
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device, non_blocking=True)
            x = x.permute(0, 3, 1, 2).float().div_(255.0).sub_(self.mean).div_(self.std)
            y = self._select(self.model(x))
            y = y.to(torch.float16 if self.config["dtype"] == "float16" else torch.float32).cpu().numpy()
        if y.shape[0] != len(rows):
            raise RuntimeError(f"model returned {y.shape[0]} outputs for a batch of {len(rows)}")
        name = self.config["output"]
        return [{name: y[i]} for i in range(len(rows))]

    def _select(self, out: Any) -> Any:
        return select_output(out, self.config["output_key"])


def _rgb(image: Any, key: str) -> np.ndarray:
    """An RGB uint8 image from the input (an array output may be gray, or a stored float image in [0, 1])."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"input {key!r} is not an image (shape {image.shape})")
    image = image[:, :, :3]
    if image.dtype != np.uint8:
        image = np.clip(image * (255.0 if image.dtype.kind == "f" else 1.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image)


def select_output(out: Any, key: Any) -> Any:
    """The tensor to keep from a model's output: itself, ``out[key]`` of a dict, or item ``key`` (0) of a tuple."""
    if isinstance(out, dict):
        if key is None:
            raise RuntimeError(f"model returned a dict ({', '.join(map(str, out))}); set output_key")
        return out[key]
    if isinstance(out, (tuple, list)):
        return out[int(key or 0)]
    return out


def check_model(op: str, model: Any, checkpoint: Any, extensions: tuple[str, ...] = ()) -> tuple[str, str | None]:
    """A model parameter checked before anything runs: an existing file (absolute path) or an importable
    ``module:factory``; a checkpoint only with a factory. Returns (model, checkpoint), normalised."""
    if not model:
        raise PipelineError(f"op {op!r} needs model=<TorchScript file or module:factory>")
    model = str(model)
    if os.path.isfile(model):
        model = os.path.abspath(model)
        if checkpoint:
            raise PipelineError(f"op {op!r}: checkpoint= applies to a module:factory model only")
    elif _IMPORT_PATH.match(model):
        if importlib.util.find_spec(model.partition(":")[0]) is None:
            raise PipelineError(f"op {op!r}: cannot find module {model.partition(':')[0]!r}")
    else:
        raise PipelineError(f"op {op!r}: model file not found: {model} (give a file{', '.join(extensions)}"
                            " or a module:factory import path)")
    if checkpoint:
        checkpoint = str(checkpoint)
        if not os.path.isfile(checkpoint):
            raise PipelineError(f"op {op!r}: checkpoint file not found: {checkpoint}")
        checkpoint = os.path.abspath(checkpoint)
    return model, checkpoint or None


def load_torch_model(model: str, checkpoint: str | None, kwargs: dict[str, Any] | None, device: str) -> Any:
    """A torch module in eval mode on ``device``, from a TorchScript file, a ``torch.export`` .pt2 file,
    or a ``module:factory`` (called with ``kwargs``, then loaded with the ``checkpoint`` state dict)."""
    import torch

    if os.path.isfile(model) and model.endswith(".pt2"):
        net = torch.export.load(model).module()
    elif os.path.isfile(model):
        with warnings.catch_warnings():  # TorchScript is deprecated upstream, still what users have
            warnings.simplefilter("ignore", DeprecationWarning)
            net = torch.jit.load(model, map_location=device)
    else:
        module_name, _, attr = model.partition(":")
        factory = importlib.import_module(module_name)
        for part in attr.split("."):
            factory = getattr(factory, part)
        net = factory(**(kwargs or {}))
        if checkpoint:
            net.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
    try:
        net = net.eval()
    except NotImplementedError:  # torch.export modules are traced in eval mode and refuse eval()
        pass
    return net.to(device)


def file_identity(path: str) -> str:
    """A model file's identity for the pipeline fingerprint: the SHA-256 of its content, so a copy or a
    ``touch`` keeps finished work, and a file replaced by another of the same size and time does not.
    Hashed once per process per version of the file (its inode and change time, which no ``touch`` sets)."""
    stat = os.stat(path)
    return _content_hash(os.path.abspath(path), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


@functools.lru_cache(maxsize=64)
def _content_hash(path: str, *version: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()
