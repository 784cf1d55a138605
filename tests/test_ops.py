"""Built-in ops on real and synthetic images: decode conversions, resize, stats, torch_model."""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
import torch

from conftest import PEOPLE
from daskmv.errors import RowError
from daskmv.ops import REGISTRY
from daskmv.ops.core import image_stats, stats_reference
from daskmv.ops.image import decode_image, load_inputs, read_bytes, shrink


def encode(ext: str, img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(ext, img)
    assert ok
    return buf.tobytes()


def test_decode_converts_gray_rgba_and_16bit_to_rgb8():
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    image, info = decode_image(encode(".png", gray))
    assert image.shape == (20, 30, 3) and image.dtype == np.uint8
    assert info == {"width": 30, "height": 20, "channels": 1, "dtype": "uint8", "format": "png"}
    assert (image[..., 0] == gray).all() and (image[..., 2] == gray).all()

    bgra = rng.integers(0, 256, (8, 9, 4), dtype=np.uint8)
    image, info = decode_image(encode(".png", bgra))
    assert info["channels"] == 4
    assert (image == bgra[..., [2, 1, 0]]).all()

    deep = rng.integers(0, 65536, (5, 6, 3), dtype=np.uint16)
    image, info = decode_image(encode(".png", deep))
    assert info["dtype"] == "uint16"
    expected = np.round(deep[..., ::-1].astype(np.float64) / 257).astype(np.uint8)
    assert np.abs(image.astype(int) - expected.astype(int)).max() == 0


def test_decode_errors_are_row_errors(tmp_path):
    jpeg = encode(".jpg", np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(RowError, match="looks like jpeg, probably truncated"):
        decode_image(jpeg[:100])
    with pytest.raises(RowError, match="cannot decode image"):
        decode_image(b"hello, I am text")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(RowError, match="empty file"):
        read_bytes(str(tmp_path / "empty.jpg"))
    with pytest.raises(RowError, match="file not found"):
        read_bytes(str(tmp_path / "missing.jpg"))
    with pytest.raises(RowError, match="directory"):
        read_bytes(str(tmp_path))


def test_loader_makes_only_what_is_asked(tmp_path):
    path = tmp_path / "a.png"
    cv2.imwrite(str(path), np.zeros((4, 5, 3), np.uint8))
    assert set(load_inputs(str(path), frozenset({"url"}))) == {"url"}
    assert set(load_inputs(str(path), frozenset({"bytes"}))) == {"url", "bytes"}
    assert set(load_inputs(str(path), frozenset({"image"}))) == {"url", "image", "image_info"}


def _encoded(image: np.ndarray, ext: str, *params: int) -> bytes:
    return cv2.imencode(ext, image, list(params))[1].tobytes()


def photo_like(h: int = 471, w: int = 599, seed: int = 0) -> np.ndarray:
    """A BGR picture of odd size with what photos have: smooth shading, shapes with soft edges, fine grain."""
    rng = np.random.default_rng(seed)
    base = cv2.resize(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), (w, h), interpolation=cv2.INTER_CUBIC)
    for _ in range(12):
        centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        cv2.circle(base, centre, int(rng.integers(8, 120)), colour, -1, cv2.LINE_AA)
    base = cv2.GaussianBlur(base, (0, 0), 1.0)
    grain = cv2.GaussianBlur(rng.normal(0, 6, (h, w, 3)).astype(np.float32), (0, 0), 1.0)
    return np.clip(base + grain, 0, 255).astype(np.uint8)


def test_reduced_decoding_is_off_unless_asked(tmp_path):
    photo = photo_like()
    path = tmp_path / "p.jpg"
    path.write_bytes(_encoded(photo, ".jpg", cv2.IMWRITE_JPEG_QUALITY, 95))
    loaded = load_inputs(str(path), frozenset({"image"}))
    np.testing.assert_array_equal(loaded["image"], cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB))
    assert "scale" not in loaded["image_info"]


@pytest.mark.parametrize("scale", [2, 4, 8])
@pytest.mark.parametrize("kind", ["jpeg", "gray-jpeg", "png", "rgba-png", "16bit-png"])
def test_reduced_decoding_matches_an_area_shrink_and_keeps_the_file_facts(kind, scale):
    """JPEGs within 1 level on average (0.06-0.61 measured) of decoding whole and averaging blocks (libjpeg
    scales in the DCT domain), other formats exactly that; width, height, channels and dtype still describe
    the file."""
    photo = photo_like(471, 599)
    data = {
        "jpeg": lambda: _encoded(photo, ".jpg", cv2.IMWRITE_JPEG_QUALITY, 95),
        "gray-jpeg": lambda: _encoded(cv2.cvtColor(photo, cv2.COLOR_BGR2GRAY), ".jpg", cv2.IMWRITE_JPEG_QUALITY, 95),
        "png": lambda: _encoded(photo, ".png"),
        "rgba-png": lambda: _encoded(np.dstack([photo, np.full(photo.shape[:2], 90, np.uint8)]), ".png"),
        "16bit-png": lambda: _encoded(photo.astype(np.uint16) * 257, ".png"),
    }[kind]()
    full, full_info = decode_image(data)
    small, info = decode_image(data, "x", scale)
    assert small.shape == (-(-471 // scale), -(-599 // scale), 3) and small.dtype == np.uint8
    reference = shrink(full, scale)  # block averages, partial blocks edge-padded
    if kind.endswith("jpeg"):
        assert np.abs(small.astype(int) - reference.astype(int)).mean() < 1.0
    else:
        np.testing.assert_array_equal(small, reference)
    assert info["scale"] == scale
    assert {k: info[k] for k in ("width", "height", "channels", "dtype", "format")} == full_info


def test_reduced_decoding_of_a_broken_jpeg_is_a_row_error():
    with pytest.raises(RowError, match="corrupt"):
        decode_image(b"\xff\xd8\xff\xe0" + b"\x00" * 40, "broken.jpg", 2)


def test_resize_sizes_and_interpolation():
    img = np.random.default_rng(2).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    out = REGISTRY["resize"](size=[40, 20], interpolation="linear").process([{"image": img}])[0]["resized"]
    assert out.shape == (20, 40, 3) and out.dtype == np.uint8
    assert (out == cv2.resize(img, (40, 20), interpolation=cv2.INTER_LINEAR)).all()
    square = REGISTRY["resize"]().process([{"image": img}])[0]["resized"]
    assert square.shape == (224, 224, 3)


@pytest.mark.parametrize("shape", [(33, 47, 3), (1, 1, 3), (256, 128, 3)])
def test_stats_match_the_float64_reference(shape):
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, shape, dtype=np.uint8)
    fast, ref = image_stats(img), stats_reference(img)
    assert fast.keys() == ref.keys()
    for key in fast:
        assert fast[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-3), key


@pytest.mark.parametrize("kind", ["gray", "rgba", "16bit", "gray16"])
def test_stats_match_the_reference_on_decoded_gray_rgba_and_16bit_files(kind):
    """What the loader hands the ops from awkward files (odd sizes), against the float64 reference."""
    rng = np.random.default_rng(5)
    base = cv2.GaussianBlur(rng.integers(0, 256, (61, 83, 3), dtype=np.uint8), (0, 0), 1.5)
    raw = {"gray": cv2.cvtColor(base, cv2.COLOR_BGR2GRAY),
           "rgba": np.dstack([base, np.full(base.shape[:2], 77, np.uint8)]),
           "16bit": base.astype(np.uint16) * 257 + 100,
           "gray16": cv2.cvtColor(base, cv2.COLOR_BGR2GRAY).astype(np.uint16) * 250}[kind]
    image, info = decode_image(_encoded(raw, ".png"))
    assert image.shape == (61, 83, 3) and info["channels"] == (1 if raw.ndim == 2 else raw.shape[2])
    fast, ref = image_stats(image), stats_reference(image)
    for key in fast:
        assert fast[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-3), key


def test_stats_on_flat_and_edge_images():
    flat = np.full((16, 16, 3), (10, 20, 30), np.uint8)
    s = image_stats(flat)
    assert (s["mean_r"], s["mean_g"], s["mean_b"]) == (10, 20, 30)
    assert s["std_r"] == 0 and s["sharpness"] == 0
    edge = np.zeros((16, 16, 3), np.uint8)
    edge[:, 8:] = 255
    assert image_stats(edge)["sharpness"] > 1000


def test_stats_on_real_photos():
    photos = sorted(PEOPLE.glob("*.jpg"))
    assert len(photos) == 2, PEOPLE
    for path in photos:
        image, info = decode_image(path.read_bytes(), str(path))
        fast, ref = image_stats(image), stats_reference(image)
        for key in fast:
            assert fast[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-3)
        assert info["width"] == image.shape[1] and info["height"] == image.shape[0]


def _images(n, size=(40, 30)):
    rng = np.random.default_rng(4)
    return [{"image": rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)} for _ in range(n)]


def test_torch_model_torchscript_file(tmp_path):
    from nets import TinyCNN

    net = TinyCNN(dim=6).eval()
    path = tmp_path / "tiny.pt"
    torch.jit.script(net).save(str(path))
    op = REGISTRY["torch_model"](model=str(path), size=32, output="emb")
    op.setup("cpu")
    rows = _images(5)
    outs = op.process(rows)
    assert [o["emb"].shape for o in outs] == [(6,)] * 5
    x = torch.stack([torch.from_numpy(cv2.resize(r["image"], (32, 32), interpolation=cv2.INTER_AREA)) for r in rows])
    x = x.permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = net(x).numpy()
    np.testing.assert_allclose(np.stack([o["emb"] for o in outs]), expected, rtol=1e-5, atol=1e-5)


def test_torch_model_factory_checkpoint_and_float16(tmp_path):
    from nets import TinyCNN

    trained = TinyCNN(dim=4, seed=123)
    torch.save(trained.state_dict(), tmp_path / "w.pth")
    op = REGISTRY["torch_model"](model="nets:tiny_cnn", kwargs={"dim": 4}, checkpoint=str(tmp_path / "w.pth"),
                                 size=[24, 16], dtype="float16")
    op.setup("cpu")
    out = op.process(_images(2))
    assert out[0]["model_output"].dtype == np.float16 and out[0]["model_output"].shape == (4,)
    other = REGISTRY["torch_model"](model="nets:tiny_cnn", kwargs={"dim": 4}, size=[24, 16])
    other.setup("cpu")
    assert not np.allclose(other.process(_images(2))[0]["model_output"], out[0]["model_output"], atol=1e-3)


def test_torch_model_fingerprint_changes_with_the_model_file(tmp_path):
    from nets import TinyCNN

    path = tmp_path / "m.pt"
    torch.jit.script(TinyCNN()).save(str(path))
    first = REGISTRY["torch_model"](model=str(path)).fingerprint()
    torch.jit.script(TinyCNN(dim=3)).save(str(path))
    assert REGISTRY["torch_model"](model=str(path)).fingerprint() != first


def test_a_model_file_is_identified_by_its_content(tmp_path):
    """Other bytes of the same size and modification time (weights fine-tuned in place, say): another
    fingerprint; the same bytes touched or copied elsewhere: the same fingerprint (finished work is kept)."""
    from nets import TinyCNN

    path = tmp_path / "m.pt"
    torch.jit.script(TinyCNN()).save(str(path))
    stamp = (1_700_000_000, 1_700_000_000)
    os.utime(path, stamp)
    first = REGISTRY["torch_model"](model=str(path)).fingerprint()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, stamp)
    second = REGISTRY["torch_model"](model=str(path)).fingerprint()
    assert second != first
    os.utime(path, None)
    assert REGISTRY["torch_model"](model=str(path)).fingerprint() == second


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torch_model_on_gpu_matches_cpu(tmp_path):
    from nets import TinyCNN

    path = tmp_path / "tiny.pt"
    torch.jit.script(TinyCNN(dim=6).eval()).save(str(path))
    rows = _images(8)
    results = {}
    for device in ("cpu", "cuda"):
        op = REGISTRY["torch_model"](model=str(path), size=32)
        op.setup(device)
        results[device] = np.stack([o["model_output"] for o in op.process(rows)])
    np.testing.assert_allclose(results["cuda"], results["cpu"], rtol=1e-3, atol=1e-3)


def test_torch_model_export_program(tmp_path):
    from nets import TinyCNN

    net = TinyCNN(dim=5).eval()
    program = torch.export.export(net, (torch.zeros(2, 3, 32, 32),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    torch.export.save(program, str(tmp_path / "tiny.pt2"))
    op = REGISTRY["torch_model"](model=str(tmp_path / "tiny.pt2"), size=32)
    op.setup("cpu")
    outs = op.process(_images(3))
    assert [o["model_output"].shape for o in outs] == [(5,)] * 3
