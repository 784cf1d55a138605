"""``segment``: a soft person mask per image, from one of four backends.

- ``selfie`` (the default): MediaPipe's selfie-segmentation model (Apache-2.0), run with ai-edge-litert
  on CPU. Set up once with ``python -m daskmv.models fetch``; nothing is downloaded at run time.
- ``model``: the user's own network: a TorchScript file, a ``torch.export`` ``.pt2`` file, an ONNX file
  (through onnxruntime), or a ``module:factory`` import path with an optional checkpoint. It gets a
  batch ``[N, 3, H, W]`` of RGB floats in [0, 1] (then ``mean``/``std``) and returns person logits or
  probabilities ``[N, 1, h, w]``, ``[N, h, w]`` or ``[N, C, h, w]`` (``channel`` picks one).
- ``column``: a mask file per row, named in a manifest column (white = person; an alpha channel is used
  when there is one).

The mask is stored as uint8 (0-255, 255 = person) with zstd compression; the foreground is the image
with everything outside the mask (mask < 128) black.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any

import cv2
import numpy as np

from daskmv.errors import PipelineError, RowError
from daskmv.ops.base import Op, Output, Param, Row
from daskmv.ops.core import parse_size
from daskmv.ops.registry import register_op
from daskmv.ops.torch_model import check_model, file_identity, load_torch_model, select_output
from daskmv.ops.rows import PHOTO_BYTES, rgb_image
from daskmv.paths import resolve_path

BACKENDS = ("auto", "selfie", "model", "column")


@register_op
class Segment(Op):
    name = "segment"
    help = "Soft person mask per image (MediaPipe selfie model by default; or your model, or a mask column)."
    gpu = True
    params = {
        "backend": Param("auto", "selfie, model or column; auto: model if model= is set, column if "
                                 "mask_column= is set, else selfie", BACKENDS),
        "model": Param(None, "TorchScript (.pt), torch.export (.pt2) or ONNX (.onnx) file, or module:factory",
                       path=True),
        "checkpoint": Param(None, "state-dict file for a module:factory model", path=True),
        "kwargs": Param({}, "keyword arguments for the factory"),
        "size": Param(512, "model input size: an int or [width, height]; null keeps each image's size",
                      types=(int, list, tuple, type(None))),
        "mean": Param([0.0, 0.0, 0.0], "per-channel mean subtracted from RGB in [0, 1] (model backend)"),
        "std": Param([1.0, 1.0, 1.0], "per-channel standard deviation divided out (model backend)"),
        "activation": Param("sigmoid", "what turns the model's output into a probability",
                            ("sigmoid", "softmax", "none")),
        "channel": Param(0, "output channel that means 'person' when the model returns several"),
        "output_key": Param(None, "key or index of the tensor to keep when the model returns a dict/tuple"),
        "mask_column": Param(None, "manifest column with a mask file per row (column backend)"),
        "variant": Param("auto", "selfie model: general (256x256), landscape (256x144), or auto by aspect",
                         ("auto", "general", "landscape")),
        "image": Param("image", "input that holds the RGB image"),
        "min_coverage": Param(0.001, "a row whose mask covers less of the frame than this is an error "
                                     "(no person found)"),
    }

    outputs = (
        Output("mask", "array", "uint8", "person mask [H, W], 0-255 (255 = person)", compression="zstd"),
        Output("foreground", "array", "uint8", "the image where mask >= 128, black elsewhere [H, W, 3]"),
        Output("mask_coverage", "column", "float64", "fraction of the frame inside the mask (mask >= 128)"),
    )

    def check_params(self) -> None:
        cfg = self.config
        backend = cfg["backend"]
        if backend == "auto":
            backend = "model" if cfg["model"] else "column" if cfg["mask_column"] else "selfie"
        self.backend = backend
        if backend == "model":
            cfg["model"], cfg["checkpoint"] = check_model(self.name, cfg["model"], cfg["checkpoint"], (".onnx",))
            if cfg["model"].endswith(".onnx") and not _has("onnxruntime"):
                raise PipelineError("op 'segment': an ONNX model needs onnxruntime (pip install onnxruntime)")
        elif cfg["model"]:
            raise PipelineError(f"op 'segment': model= is for backend 'model', not {backend!r}")
        if backend == "column" and not cfg["mask_column"]:
            raise PipelineError("op 'segment': backend 'column' needs mask_column=<manifest column of mask files>")
        if backend == "selfie":
            from daskmv.models import selfie_model

            selfie_model()  # a clear error now, not on every worker, when it was never fetched
        if cfg["size"] is not None:
            cfg["size"] = list(parse_size(cfg["size"], self.name))
        for key in ("mean", "std"):
            if len(cfg[key]) != 3:
                raise PipelineError(f"op 'segment': {key} needs 3 values (RGB), got {cfg[key]!r}")
        if not 0.0 <= float(cfg["min_coverage"]) < 1.0:
            raise PipelineError(f"op 'segment': min_coverage must be in [0, 1), not {cfg['min_coverage']!r}")
        self.runner: Any = None

    def input_names(self) -> tuple[str, ...]:
        if self.backend == "column":
            return (self.config["image"], self.config["mask_column"], "manifest_base")
        return (self.config["image"],)

    def row_bytes(self) -> int:
        return PHOTO_BYTES  # the foreground; the mask compresses

    def spec(self) -> dict[str, Any]:
        spec = super().spec()
        if self.backend == "model" and os.path.isfile(self.config["model"]):
            spec["files"] = {self.config["model"]: file_identity(self.config["model"])}
        return spec

    def setup(self, device: str) -> None:
        cfg = self.config
        if self.backend == "selfie":
            self.runner = SelfieSegmenter(cfg["variant"])
        elif self.backend == "model" and cfg["model"].endswith(".onnx"):
            self.runner = OnnxSegmenter(cfg, device)
        elif self.backend == "model":
            self.runner = TorchSegmenter(cfg, device)

    def process(self, rows: list[Row]) -> list[Row | BaseException]:
        results: list[Row | BaseException] = [RowError("not processed")] * len(rows)
        images: list[np.ndarray] = []
        todo: list[int] = []
        for i, row in enumerate(rows):
            try:
                images.append(rgb_image(row, self.config["image"]))
                todo.append(i)
            except RowError as exc:
                results[i] = exc
        if self.backend == "column":
            probs = [self._mask_from_column(rows[i], image) for i, image in zip(todo, images)]
        else:
            probs = self.runner(images) if images else []
        for i, image, prob in zip(todo, images, probs):
            results[i] = prob if isinstance(prob, BaseException) else self._outputs(image, prob)
        return results

    def _outputs(self, image: np.ndarray, prob: np.ndarray) -> Row | BaseException:
        mask = np.rint(np.clip(prob, 0.0, 1.0) * 255.0).astype(np.uint8)
        inside = mask >= 128
        coverage = float(inside.mean())
        if coverage < float(self.config["min_coverage"]):
            return RowError(f"no person found: the mask covers {coverage:.2%} of the frame "
                            f"(min_coverage {float(self.config['min_coverage']):.2%})")
        foreground = np.where(inside[..., None], image, np.uint8(0))
        return {"mask": mask, "foreground": foreground, "mask_coverage": coverage}

    def _mask_from_column(self, row: Row, image: np.ndarray) -> np.ndarray | BaseException:
        try:
            return read_mask_file(row.get(self.config["mask_column"]), row.get("manifest_base") or "", image.shape[:2])
        except RowError as exc:
            return exc


#: What LiteRT prints from C++ to file descriptor 2 the first time a process creates its XNNPACK delegate,
#: in three writes: "INFO: ", the message, a newline (other threads' writes may come between them).
LITERT_BANNER = (b"INFO: ", b"Created TensorFlow Lite XNNPACK delegate for CPU.")
_BANNER_LOCK = threading.Lock()
_BANNER_SEEN = False


@contextlib.contextmanager
def _without_litert_banner() -> Iterator[None]:
    """Drop LiteRT's one-line banner from stderr, and nothing else.

    LiteRT logs from C++, with no Python switch and no environment variable that silences it, once per
    process. The first interpreter of a process is therefore made with file descriptor 2 pointing into a
    pipe; a thread collects what arrives there, and when the interpreters are made, fd 2 is switched back
    and what was collected is written to it without the banner. Whatever other threads print meanwhile is
    kept, in order (only a write in the instant of the switch may come out before what was collected).
    Python's stderr buffer is not flushed from here, so no other thread's output is split. A child process
    that inherited the pipe meanwhile keeps writing through it. Later interpreters print nothing and leave
    stderr alone. Where fd 2 is closed, nothing is done.
    """
    global _BANNER_SEEN
    with _BANNER_LOCK:
        if _BANNER_SEEN:
            yield
            return
        try:
            restore = os.dup(2)
        except OSError:
            _BANNER_SEEN = True
            yield
            return
        read_end, write_end = os.pipe()
        pipe = _CollectedStderr()
        reader = threading.Thread(target=pipe.read, args=(read_end,), daemon=True, name="daskmv-stderr")
        reader.start()
        os.dup2(write_end, 2)
        os.close(write_end)
        try:
            yield
        finally:
            os.dup2(restore, 2)  # closes the pipe's last writer here, unless a child process inherited it
            _BANNER_SEEN = True
            reader.join(timeout=0.5)
            pipe.release(restore, still_open=reader.is_alive())


class _CollectedStderr:
    """What reaches the pipe: collected until :meth:`release`, then passed straight on."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.collected = bytearray()
        self.passthrough: int | None = None
        self.finished = False

    def read(self, read_end: int) -> None:
        try:
            while chunk := os.read(read_end, 65536):
                with self.lock:
                    if self.passthrough is None:
                        self.collected += chunk
                    else:
                        _write_lines(self.passthrough, chunk)
        finally:
            os.close(read_end)
            with self.lock:
                self.finished = True
                if self.passthrough is not None:
                    os.close(self.passthrough)

    def release(self, fd: int, still_open: bool) -> None:
        """Write what was collected, less the banner, to ``fd``; the reader passes on the rest (and closes
        ``fd``) if the pipe is still open, else ``fd`` is closed here."""
        with self.lock:
            _write_lines(fd, without_banner(bytes(self.collected)))
            self.collected.clear()
            if still_open and not self.finished:
                self.passthrough = fd
                return
        os.close(fd)


def without_banner(data: bytes) -> bytes:
    """``data`` less LiteRT's banner: its message, the last ``INFO: `` before it, and the next newline."""
    prefix, message = LITERT_BANNER
    at = data.find(message)
    if at < 0:
        return data
    start = data.rfind(prefix, 0, at)
    newline = data.find(b"\n", at + len(message))
    head = data[:at] if start < 0 else data[:start] + data[start + len(prefix) : at]
    tail = data[at + len(message) :]
    if newline >= 0:
        cut = newline - at - len(message)
        tail = tail[:cut] + tail[cut + 1 :]
    return head + tail


def _write_lines(fd: int, data: bytes, most: int = 4096) -> None:
    """``data`` in writes of whole lines of at most ``most`` bytes (PIPE_BUF): a pipe's writes that size are
    atomic, so lines other threads write at the same moment never land inside these."""
    start = 0
    while start < len(data):
        end = data.rfind(b"\n", start, start + most) + 1 if len(data) - start > most else len(data)
        if end <= start:  # one line longer than that: as it comes
            end = start + most
        _write_all(fd, data[start:end])
        start = end


def _write_all(fd: int, data: bytes) -> None:
    with contextlib.suppress(OSError):
        while data:
            data = data[os.write(fd, data):]


def _has(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


def read_mask_file(path: Any, base: str, shape: tuple[int, int]) -> np.ndarray:
    """A mask file as float32 probabilities ``[H, W]`` the image's size; its alpha channel if it has one.

    A mask of another size is resized (bilinear) when its aspect ratio matches within 1%.
    """
    from daskmv.ops.image import read_bytes

    if path is None or path != path or not str(path):
        raise RowError("no mask file named in this row")
    url = resolve_path(str(path), base)
    raw = cv2.imdecode(np.frombuffer(read_bytes(url), np.uint8), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise RowError(f"cannot decode mask image: {url}")
    if raw.ndim == 3:
        raw = raw[:, :, 3] if raw.shape[2] == 4 else raw[:, :, :3].max(axis=2) if raw.shape[2] == 3 else raw[:, :, 0]
    full = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(raw.dtype, 1.0)
    prob = raw.astype(np.float32) / np.float32(full)
    h, w = shape
    if prob.shape != (h, w):
        if abs(prob.shape[1] / prob.shape[0] - w / h) > 0.01 * (w / h):
            raise RowError(f"mask {url} is {prob.shape[1]}x{prob.shape[0]}, the image {w}x{h}: "
                           "not the same aspect ratio")
        prob = cv2.resize(prob, (w, h), interpolation=cv2.INTER_LINEAR)
    return prob


class SelfieSegmenter:
    """MediaPipe selfie segmentation through ai-edge-litert: RGB in [0, 1] at 256x256 (or 256x144 for
    landscape frames), person probability out, resized back to the image (bilinear)."""

    def __init__(self, variant: str) -> None:
        self.variant = variant
        self.local = threading.local()  # an interpreter is not safe to share: one per thread
        self._interpreters()  # load now, in setup, so a missing or broken model fails there

    def _interpreters(self) -> dict[bool, Any]:
        found = getattr(self.local, "interpreters", None)
        if found is None:
            from ai_edge_litert.interpreter import Interpreter

            from daskmv.models import selfie_model

            found = {}
            with _without_litert_banner():  # LiteRT prints an INFO line about its CPU delegate from C++
                for landscape in (False, True):
                    it = Interpreter(model_path=str(selfie_model(landscape)), num_threads=1)
                    it.allocate_tensors()
                    it.invoke()
                    found[landscape] = it
            self.local.interpreters = found
        return found

    def _landscape(self, image: np.ndarray) -> bool:
        if self.variant != "auto":
            return self.variant == "landscape"
        h, w = image.shape[:2]
        return w >= 1.4 * h

    def __call__(self, images: list[np.ndarray]) -> list[np.ndarray]:
        return [self.one(image) for image in images]

    def one(self, image: np.ndarray) -> np.ndarray:
        it = self._interpreters()[self._landscape(image)]
        inp, out = it.get_input_details()[0], it.get_output_details()[0]
        _, th, tw, _ = inp["shape"]
        small = cv2.resize(image, (int(tw), int(th)), interpolation=cv2.INTER_AREA)
        it.set_tensor(inp["index"], (small.astype(np.float32) / 255.0)[None])
        it.invoke()
        prob = it.get_tensor(out["index"])[0, :, :, 0].copy()
        h, w = image.shape[:2]
        return cv2.resize(prob, (w, h), interpolation=cv2.INTER_LINEAR)


class _ModelSegmenter:
    """Shared by the torch and ONNX runners: resize, normalise, run, pick the person channel, resize back."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.size = tuple(cfg["size"]) if cfg["size"] is not None else None
        self.mean = np.asarray(cfg["mean"], np.float32).reshape(1, 3, 1, 1)
        self.std = np.asarray(cfg["std"], np.float32).reshape(1, 3, 1, 1)
        self.activation = cfg["activation"]
        self.channel = int(cfg["channel"])
        self.output_key = cfg["output_key"]

    def __call__(self, images: list[np.ndarray]) -> list[np.ndarray]:
        from daskmv.ops.rows import groups_by_size

        if self.size is not None:
            resized = [cv2.resize(im, self.size, interpolation=cv2.INTER_AREA) for im in images]
        else:
            resized = images
        probs: list[np.ndarray] = [np.empty(0)] * len(images)
        for group in groups_by_size(resized):
            batch = np.stack([resized[i] for i in group]).transpose(0, 3, 1, 2).astype(np.float32) / 255.0
            out = self.person_probability(self.run((batch - self.mean) / self.std))
            if out.shape[0] != len(group):
                raise RuntimeError(f"model returned {out.shape[0]} masks for a batch of {len(group)}")
            for k, i in enumerate(group):
                h, w = images[i].shape[:2]
                probs[i] = cv2.resize(out[k], (w, h), interpolation=cv2.INTER_LINEAR)
        return probs

    def person_probability(self, out: np.ndarray) -> np.ndarray:
        """``[N, h, w]`` probabilities from the model's raw output."""
        if out.ndim == 3:
            out = out[:, None]
        if out.ndim != 4:
            raise RuntimeError(f"model output has shape {out.shape}; expected [N, 1, h, w], [N, h, w] or [N, C, h, w]")
        if self.activation == "softmax":
            e = np.exp(out - out.max(axis=1, keepdims=True))
            out = e / e.sum(axis=1, keepdims=True)
        elif self.activation == "sigmoid":
            out = 1.0 / (1.0 + np.exp(-out))
        if self.channel >= out.shape[1]:
            raise RuntimeError(f"channel={self.channel} but the model returns {out.shape[1]} channel(s)")
        return np.ascontiguousarray(out[:, self.channel], dtype=np.float32)

    def run(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class TorchSegmenter(_ModelSegmenter):
    def __init__(self, cfg: dict[str, Any], device: str) -> None:
        super().__init__(cfg)
        self.device = device
        self.net = load_torch_model(cfg["model"], cfg["checkpoint"], cfg["kwargs"], device)

    def run(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            y = select_output(self.net(torch.from_numpy(batch).to(self.device)), self.output_key)
            return y.float().cpu().numpy()


class OnnxSegmenter(_ModelSegmenter):
    def __init__(self, cfg: dict[str, Any], device: str) -> None:
        import onnxruntime as ort

        super().__init__(cfg)
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(cfg["model"], options, providers=providers)
        first = self.session.get_inputs()[0]
        self.input_name = first.name
        self.batch_one = first.shape[0] == 1  # exported with a fixed batch of one: run row by row

    def run(self, batch: np.ndarray) -> np.ndarray:
        if self.batch_one:
            return np.concatenate([self._run(batch[i : i + 1]) for i in range(len(batch))])
        return self._run(batch)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        outs = self.session.run(None, {self.input_name: batch})
        return np.asarray(select_output(outs if len(outs) > 1 else outs[0], self.output_key), np.float32)
