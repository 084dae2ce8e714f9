"""Tests of ddpmkit.data: the three sources (with files written here in the real formats), their labels, and the
Batcher."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import struct
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpmkit.images import from_uint8
from PIL import Image

from ddpmkit.data import Batcher, DataWarning, ImageData, load_dataset
from ddpmkit.data import cifar10 as cifar_source
from ddpmkit.data import common as data_common
from ddpmkit.data import folder as folder_source
from ddpmkit.data import sources as D
from ddpmkit.errors import CheckpointError, ConfigError, DataError
from ddpmkit.images import to_uint8

# make_folder's mixed layout (images at the top level and in subfolders) is read without labels, with a warning
# that test_folder_with_top_level_images_and_subfolders_is_unlabelled checks; elsewhere it is expected noise.
pytestmark = pytest.mark.filterwarnings("ignore:.*top level as well as in subfolders:ddpmkit.data.DataWarning")

# --------------------------------------------------------------------------------------------------
# Writing CIFAR-10 files the way the official ones were written: Python 2, pickle protocol 2, where every
# str (dict keys, the array's raw bytes) is a byte string (SHORT_BINSTRING / BINSTRING opcodes).


class _Py2Pickler(pickle._Pickler):
    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj):
        if isinstance(obj, str):
            obj = obj.encode("latin1")
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str


def py2_pickle(obj, numpy_module: str = "numpy.core.multiarray") -> bytes:
    f = io.BytesIO()
    _Py2Pickler(f, protocol=2).dump(obj)
    raw = f.getvalue()
    # numpy 2 names its module numpy._core; the official files (old numpy) say numpy.core.
    return raw.replace(b"numpy._core.multiarray\n", numpy_module.encode() + b"\n")


def cifar_batches(n: int = 12, seed: int = 0) -> dict[str, tuple[np.ndarray, list[int]]]:
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    return {nm: (rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n).tolist()) for nm in names}


def batch_bytes(name, data, labels, numpy_module="numpy.core.multiarray") -> bytes:
    d = {"batch_label": f"{name} of fake", "labels": labels, "data": data,
         "filenames": [f"img_{i}.png" for i in range(len(labels))]}
    return py2_pickle(d, numpy_module)


def write_cifar_tree(root: Path, batches, numpy_module="numpy.core.multiarray") -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for name, (x, y) in batches.items():
        (d / name).write_bytes(batch_bytes(name, x, y, numpy_module))
    (d / "batches.meta").write_bytes(py2_pickle({"label_names": ["airplane"] * 10, "num_cases_per_batch": 12}))
    (d / "readme.html").write_text("<html></html>")
    return d


def write_cifar_archive(path: Path, files: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        for name, raw in files.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tf.addfile(info, io.BytesIO(raw))
    return path


def archive_files(batches) -> dict[str, bytes]:
    return {name: batch_bytes(name, x, y) for name, (x, y) in batches.items()}


@pytest.fixture
def batches():
    return cifar_batches()


# --------------------------------------------------------------------------------------------------
# Sources: choosing and checking


def test_unknown_source_lists_choices():
    with pytest.raises(DataError, match="digits, cifar10, folder:PATH"):
        load_dataset("mnist")


def test_missing_paths_and_bad_options(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "nope")):
        load_dataset(f"folder:{tmp_path / 'nope'}")
    with pytest.raises(DataError, match="no such directory"):
        load_dataset(str(tmp_path / "nope"))
    f = tmp_path / "file.png"
    f.write_bytes(b"x")
    with pytest.raises(DataError, match="not a directory"):
        load_dataset(str(f))
    with pytest.raises(DataError, match="channels"):
        load_dataset("digits", channels=2)
    with pytest.raises(DataError, match="image_size"):
        load_dataset("digits", image_size=0)
    with pytest.raises(DataError, match="split"):
        load_dataset("digits", split="validation")
    with pytest.raises(DataError, match="one split"):
        load_dataset("digits", split="test")


# --------------------------------------------------------------------------------------------------
# digits


def test_digits():
    d = load_dataset("digits")
    assert isinstance(d, ImageData) and d.name == "digits"
    assert d.images.shape == (1797, 1, 16, 16) and d.images.dtype == torch.uint8 and d.images.is_contiguous()
    assert (d.num_images, d.channels, d.image_size, d.nbytes) == (1797, 1, 16, 1797 * 256)
    assert d.labels.dtype == torch.int64 and d.labels.shape == (1797,)
    assert set(d.labels.tolist()) == set(range(10))
    assert d.images.min() == 0 and d.images.max() == 255
    rgb = load_dataset("digits", channels=3, image_size=24)
    assert rgb.images.shape == (1797, 3, 24, 24)
    assert torch.equal(rgb.images[:, 0], rgb.images[:, 1]) and torch.equal(rgb.images[:, 0], rgb.images[:, 2])


def test_digits_are_sklearns_digits():
    from sklearn.datasets import load_digits

    ref = load_digits()
    d = load_dataset("digits", image_size=8)  # no resize: just 0..16 -> 0..255
    expect = np.round(ref.images * (255 / 16)).astype(np.uint8)
    assert np.array_equal(d.images[:, 0].numpy(), expect)
    assert np.array_equal(d.labels.numpy(), ref.target)
    assert d.class_names == tuple(str(k) for k in ref.target_names) == tuple("0123456789") and d.num_classes == 10


# --------------------------------------------------------------------------------------------------
# CIFAR-10


@pytest.mark.parametrize("numpy_module", ["numpy.core.multiarray", "numpy._core.multiarray"])
def test_cifar_tree_train_and_test(tmp_path, batches, numpy_module):
    write_cifar_tree(tmp_path, batches, numpy_module)
    tr = load_dataset("cifar10", data_dir=tmp_path, progress=False)
    assert tr.name == "cifar10-train" and tr.images.shape == (60, 3, 32, 32) and tr.images.dtype == torch.uint8
    expect_x = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    expect_y = sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert tr.labels.tolist() == expect_y
    # Row layout: 1024 red values (row-major 32x32), then green, then blue.
    img, c, h, w = 13, 1, 5, 7
    assert tr.images[img, c, h, w] == expect_x[img, c * 1024 + h * 32 + w]
    assert np.array_equal(tr.images.reshape(60, -1).numpy(), expect_x)
    te = load_dataset("cifar10", data_dir=tmp_path, split="test")
    assert te.images.shape == (12, 3, 32, 32) and te.labels.tolist() == batches["test_batch"][1]
    names = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    assert tr.class_names == te.class_names == names and tr.num_classes == 10
    assert tr.labels.dtype == te.labels.dtype == torch.int64


def test_cifar_known_pixel(tmp_path):
    b = cifar_batches(n=3)
    x = b["test_batch"][0]
    x[:] = 0
    x[2, 2 * 1024 + 31 * 32 + 0] = 200  # image 2, blue, bottom-left corner
    write_cifar_tree(tmp_path, b)
    te = load_dataset("cifar10", data_dir=tmp_path, split="test").images
    assert te[2, 2, 31, 0] == 200 and int(te.sum()) == 200


def test_cifar_archive_equals_tree(tmp_path, batches):
    write_cifar_tree(tmp_path / "tree", batches)
    write_cifar_archive(tmp_path / "arch" / "cifar-10-python.tar.gz", archive_files(batches))
    for split in ("train", "test"):
        a = load_dataset("cifar10", data_dir=tmp_path / "tree", split=split)
        b = load_dataset("cifar10", data_dir=tmp_path / "arch", split=split)
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not (tmp_path / "arch" / "cifar-10-batches-py").exists()  # read from the tar, not extracted


def test_cifar_resize_and_gray(tmp_path, batches):
    write_cifar_tree(tmp_path, batches)
    small = load_dataset("cifar10", data_dir=tmp_path, image_size=16)
    assert small.images.shape == (60, 3, 16, 16)
    gray = load_dataset("cifar10", data_dir=tmp_path, channels=1)
    assert gray.images.shape == (60, 1, 32, 32)
    rgb = load_dataset("cifar10", data_dir=tmp_path).images.float()
    luma = (0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]).round()
    assert (gray.images[:, 0].float() - luma).abs().max() <= 1


def test_cifar_missing_says_what_and_where(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", data_dir=tmp_path)
    msg = str(e.value)
    assert D.CIFAR10_URL in msg and str(tmp_path / "cifar-10-python.tar.gz") in msg and "\n" not in msg


def test_cifar_bad_row_width(tmp_path, batches):
    batches["test_batch"] = (np.zeros((4, 3000), np.uint8), [0] * 4)
    write_cifar_tree(tmp_path, batches)
    with pytest.raises(DataError, match="3072"):
        load_dataset("cifar10", data_dir=tmp_path, split="test")


def test_cifar_truncated_and_corrupt(tmp_path, batches):
    arch = write_cifar_archive(tmp_path / "a" / "cifar-10-python.tar.gz", archive_files(batches))
    raw = arch.read_bytes()
    arch.write_bytes(raw[: len(raw) * 6 // 10])
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_dataset("cifar10", data_dir=arch.parent)
    arch.write_bytes(os.urandom(5000))
    with pytest.raises(DataError, match=str(arch)):
        load_dataset("cifar10", data_dir=arch.parent)
    d = write_cifar_tree(tmp_path / "t", batches)
    whole = (d / "test_batch").read_bytes()
    (d / "test_batch").write_bytes(whole[:1000])
    with pytest.raises(DataError, match="test_batch"):
        load_dataset("cifar10", data_dir=tmp_path / "t", split="test")


class _Evil:
    """Unpickling this calls open(marker, 'w'): a file appears if its code ever runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _EvilSystem:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("payload", [_Evil, _EvilSystem])
def test_cifar_malicious_pickle_is_refused(tmp_path, batches, payload):
    # The payload is live: a plain unpickler does create the marker.
    probe = tmp_path / "probe"
    f = pickle.loads(py2_pickle({"data": payload(probe)}))
    if hasattr(f, "close"):
        f.close()
    assert probe.exists()

    marker = tmp_path / "pwned"
    write_cifar_tree(tmp_path / "tree", batches)
    evil = py2_pickle({"data": payload(marker), "labels": [0]})
    (tmp_path / "tree" / "cifar-10-batches-py" / "test_batch").write_bytes(evil)
    with pytest.raises(DataError, match="refused"):
        load_dataset("cifar10", data_dir=tmp_path / "tree", split="test")
    files = archive_files(batches)
    files["data_batch_3"] = evil
    write_cifar_archive(tmp_path / "arch" / "cifar-10-python.tar.gz", files)
    with pytest.raises(DataError, match="refused"):
        load_dataset("cifar10", data_dir=tmp_path / "arch")
    assert not marker.exists()


def _serve(tmp_path, batches) -> tuple[str, str]:
    src = write_cifar_archive(tmp_path / "server" / "cifar-10-python.tar.gz", archive_files(batches))
    return src.as_uri(), hashlib.md5(src.read_bytes()).hexdigest()


def test_cifar_download_good_md5(tmp_path, batches, monkeypatch):
    url, md5 = _serve(tmp_path, batches)
    monkeypatch.setattr(cifar_source, "CIFAR10_URL", url)
    monkeypatch.setattr(cifar_source, "CIFAR10_MD5", md5)
    dest = tmp_path / "data"
    d = load_dataset("cifar10", data_dir=dest, download=True, progress=False)
    assert d.num_images == 60
    assert sorted(p.name for p in dest.iterdir()) == ["cifar-10-python.tar.gz"]  # no temp file left
    assert load_dataset("cifar10", data_dir=dest, download=True, split="test").num_images == 12  # MD5 rechecked


def test_cifar_download_bad_md5_leaves_nothing(tmp_path, batches, monkeypatch):
    url, _ = _serve(tmp_path, batches)
    monkeypatch.setattr(cifar_source, "CIFAR10_URL", url)
    monkeypatch.setattr(cifar_source, "CIFAR10_MD5", "0" * 32)
    dest = tmp_path / "data"
    with pytest.raises(DataError, match="MD5"):
        load_dataset("cifar10", data_dir=dest, download=True, progress=False)
    assert list(dest.iterdir()) == []


def test_cifar_existing_archive_with_bad_md5_is_kept(tmp_path, batches, monkeypatch):
    arch = write_cifar_archive(tmp_path / "cifar-10-python.tar.gz", archive_files(batches))
    monkeypatch.setattr(cifar_source, "CIFAR10_MD5", "0" * 32)
    with pytest.raises(DataError, match="MD5"):
        load_dataset("cifar10", data_dir=tmp_path, download=True)
    assert arch.exists()  # a user's file is never deleted
    assert load_dataset("cifar10", data_dir=tmp_path).num_images == 60  # without download: used as is


def test_cifar_download_network_failure(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match="could not download .*by hand") as e:
        load_dataset("cifar10", data_dir=tmp_path / "d", download=True, progress=False)
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in str(e.value)
    assert list((tmp_path / "d").iterdir()) == []
    monkeypatch.undo()
    monkeypatch.setattr(cifar_source, "CIFAR10_URL", (tmp_path / "missing.tar.gz").as_uri())
    with pytest.raises(DataError, match="could not download"):
        load_dataset("cifar10", data_dir=tmp_path / "d", download=True, progress=False)


def test_memory_estimate_refuses(tmp_path, batches, monkeypatch):
    write_cifar_tree(tmp_path, batches)
    monkeypatch.setattr(data_common, "available_memory_bytes", lambda: 1000)
    with pytest.raises(DataError, match="memory"):
        load_dataset("cifar10", data_dir=tmp_path)
    assert data_common.available_memory_bytes() == 1000
    monkeypatch.undo()
    assert data_common.available_memory_bytes() is None or data_common.available_memory_bytes() > 0


# --------------------------------------------------------------------------------------------------
# A folder of images

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def make_folder(root: Path) -> dict[str, object]:
    """A mixed folder; returns the expected 16x16 RGB colour of each readable file, by relative path."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "sub" / "deeper").mkdir(parents=True)
    expect = {}
    Image.new("RGB", (40, 30), RED).save(root / "a_red.png")
    expect["a_red.png"] = RED
    Image.new("RGB", (32, 48), GREEN).save(root / "b_green.jpg", quality=95)
    expect["b_green.jpg"] = "jpeg-green"
    Image.new("RGB", (20, 20), BLUE).save(root / "c_blue.webp", lossless=True)
    expect["c_blue.webp"] = BLUE
    Image.new("RGB", (17, 23), (10, 20, 30)).save(root / "d.BMP")
    expect["d.BMP"] = (10, 20, 30)
    Image.new("RGBA", (16, 16), (255, 0, 0, 0)).save(root / "e_transparent.png")  # invisible red
    expect["e_transparent.png"] = (255, 255, 255)
    Image.new("RGBA", (16, 16), (0, 0, 0, 128)).save(root / "e_half.png")  # half-opaque black on white
    expect["e_half.png"] = (127, 127, 127)
    pal = Image.new("P", (24, 24), 1)
    pal.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    pal.save(root / "sub" / "f_palette.png")
    expect["sub/f_palette.png"] = (200, 100, 50)
    Image.new("L", (30, 30), 77).save(root / "sub" / "g_gray.png")
    expect["sub/g_gray.png"] = (77, 77, 77)
    Image.fromarray(np.full((20, 20), 257 * 180, np.uint16)).save(root / "sub" / "deeper" / "h_16bit.png")
    expect["sub/deeper/h_16bit.png"] = (180, 180, 180)
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(root / "sub" / "deeper" / "i_cmyk.jpg", quality=95)
    expect["sub/deeper/i_cmyk.jpg"] = "jpeg-red"
    (root / "notes.txt").write_text("not an image")
    (root / "sub" / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    return dict(sorted(expect.items()))


def _check_colours(images: torch.Tensor, expect: dict) -> None:
    assert images.shape[0] == len(expect)
    for img, (rel, colour) in zip(images, expect.items()):
        mean = img.float().mean(dim=(1, 2))
        if colour == "jpeg-green":
            assert mean[1] > 240 and mean[0] < 15 and mean[2] < 15, rel
        elif colour == "jpeg-red":
            assert mean[0] > 240 and mean[1] < 15 and mean[2] < 15, rel
        else:
            assert torch.allclose(mean, torch.tensor(colour, dtype=torch.float32), atol=1.0), (rel, mean)
            assert (img.float() - mean[:, None, None]).abs().max() <= 1, rel  # flat colour stays flat


def test_folder_mixed_images(tmp_path):
    expect = make_folder(tmp_path / "imgs")
    with pytest.warns(DataWarning, match=r"skipped 1 of 11 .*zz_broken\.png"):
        d = load_dataset(str(tmp_path / "imgs"), image_size=16, cache_dir=tmp_path / "cache", progress=False)
    assert d.images.shape == (10, 3, 16, 16) and d.images.dtype == torch.uint8 and d.labels is None
    assert len(d.skipped) == 1 and "zz_broken.png" in d.skipped[0]
    _check_colours(d.images, expect)
    with pytest.warns(DataWarning, match="skipped 1 of 11"):
        gray = load_dataset(f"folder:{tmp_path / 'imgs'}", image_size=8, channels=1, cache_dir=tmp_path / "cache",
                            progress=False)
    assert gray.images.shape == (10, 1, 8, 8)


def test_folder_resize_and_center_crop(tmp_path):
    a = np.zeros((20, 40, 3), np.uint8)  # wide: red | green (the centre square) | blue
    a[:, :10] = RED
    a[:, 10:30] = GREEN
    a[:, 30:] = BLUE
    Image.fromarray(a).save(tmp_path / "wide.png")
    t = np.zeros((60, 20, 3), np.uint8)  # tall: the middle 20 rows are white
    t[20:40] = 255
    Image.fromarray(t).save(tmp_path / "tall.png")
    data = load_dataset(str(tmp_path), image_size=10, cache_dir=tmp_path / "c", progress=False)
    assert data.labels is None and data.class_names is None and data.num_classes is None  # a flat folder
    d = data.images
    tall, wide = d[0], d[1]
    assert torch.equal(wide[:, :, 2:8], torch.tensor(GREEN, dtype=torch.uint8).view(3, 1, 1).expand(3, 10, 6))
    assert (tall[:, 2:8, :] == 255).all()


def test_folder_strict_raises_on_corrupt(tmp_path):
    make_folder(tmp_path / "imgs")
    with pytest.raises(DataError, match=r"zz_broken\.png"):
        load_dataset(str(tmp_path / "imgs"), strict=True, cache_dir=tmp_path / "c", progress=False)


def test_folder_empty_nonimage_and_undecodable(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        load_dataset(str(tmp_path / "empty"), cache_dir=tmp_path / "c")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("hello")
    (tmp_path / "text" / "b.csv").write_text("1,2")
    with pytest.raises(DataError, match="no image files"):
        load_dataset(str(tmp_path / "text"), cache_dir=tmp_path / "c")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="none of the 1 image files"):
        load_dataset(str(tmp_path / "bad"), cache_dir=tmp_path / "c")


def test_folder_memory_estimate(tmp_path, monkeypatch):
    make_folder(tmp_path / "imgs")
    monkeypatch.setattr(data_common, "available_memory_bytes", lambda: 10_000)
    with pytest.raises(DataError, match="memory"):
        load_dataset(str(tmp_path / "imgs"), image_size=64, cache_dir=tmp_path / "c", progress=False)


def test_folder_cache_hit_invalidation_and_corruption(tmp_path, monkeypatch):
    root, cache = tmp_path / "imgs", tmp_path / "cache"
    make_folder(root)
    (root / "sub" / "zz_broken.png").unlink()
    first = load_dataset(str(root), image_size=16, cache_dir=cache, progress=False)
    files = list((cache / "folders").glob("*.safetensors"))
    assert len(files) == 1
    head = files[0].read_bytes()[:9]
    assert head[8:9] == b"{" and not head.startswith(b"\x80")  # a safetensors header, never a pickle

    real_decode = folder_source._decode_image
    calls = []

    def failing(*a, **k):
        raise AssertionError("decoded despite the cache")

    monkeypatch.setattr(folder_source, "_decode_image", failing)
    again = load_dataset(str(root), image_size=16, cache_dir=cache, progress=False)
    assert torch.equal(again.images, first.images)

    def counting(path, *a):
        calls.append(path)
        return real_decode(path, *a)

    monkeypatch.setattr(folder_source, "_decode_image", counting)
    load_dataset(str(root), image_size=8, cache_dir=cache, progress=False)  # another size: another key
    assert len(calls) == 10
    calls.clear()

    # Change one file's content (and its mtime): the cache is invalid, the new pixels show.
    target = root / "a_red.png"
    Image.new("RGB", (40, 30), BLUE).save(target)
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = load_dataset(str(root), image_size=16, cache_dir=cache, progress=False)
    assert len(calls) == 10
    assert changed.images[0, :, 0, 0].tolist() == list(BLUE)

    # Only a touch (same bytes, new mtime) also invalidates.
    calls.clear()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))
    load_dataset(str(root), image_size=16, cache_dir=cache, progress=False)
    assert len(calls) == 10

    # A corrupt cache file is ignored with a warning and rebuilt.
    calls.clear()
    for f in (cache / "folders").glob("*.safetensors"):
        f.write_bytes(b"\x00garbage" * 10)
    with pytest.warns(DataWarning, match="unreadable cache"):
        rebuilt = load_dataset(str(root), image_size=16, cache_dir=cache, progress=False)
    assert len(calls) == 10 and torch.equal(rebuilt.images, changed.images)
    calls.clear()
    load_dataset(str(root), image_size=16, cache_dir=cache, progress=False)
    assert calls == []
    assert not list((cache / "folders").glob("*.part"))


def test_folder_cache_env_default(tmp_path, monkeypatch):
    Image.new("RGB", (8, 8), RED).save(tmp_path / "x.png")
    monkeypatch.setenv("DDPMKIT_CACHE", str(tmp_path / "envcache"))
    load_dataset(str(tmp_path), image_size=8, progress=False)
    assert len(list((tmp_path / "envcache" / "folders").glob("*.safetensors"))) == 1


# --------------------------------------------------------------------------------------------------
# Labels of a folder: one subfolder per class


def make_class_folder(root: Path) -> dict[str, tuple[str, tuple[int, int, int]]]:
    """Class subfolders (one nested deeper, one empty, one without images); returns rel path -> (class, colour)."""
    files = {
        "dog/1.png": ("dog", (200, 0, 0)),
        "dog/2.png": ("dog", (190, 0, 0)),
        "cat/a.png": ("cat", (0, 200, 0)),
        "cat/indoor/sofa/b.png": ("cat", (0, 180, 0)),  # nested: still the class of its top-level subfolder
        "Zebra/z.bmp": ("Zebra", (0, 0, 200)),  # upper case sorts first, as Python's sorted() and ImageFolder
        "ant bee/x.png": ("ant bee", (90, 90, 90)),
    }
    for rel, (_, colour) in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (12, 12), colour).save(root / rel)
    (root / "empty").mkdir()  # no images at all: not a class
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not an image")  # no images either
    return dict(sorted(files.items()))


def test_folder_classes_rules():
    fc = D.folder_classes
    assert fc(["b/1.png", "a/x/2.png", "a/3.png", "C/4.png"]) == (("C", "a", "b"), [2, 1, 1, 0])
    assert fc(["only/1.png", "only/2.png"]) == (("only",), [0, 0])  # one subfolder: one class
    assert fc(["1.png", "2.png"]) == (None, None)  # flat
    assert fc(["1.png", "a/2.png"]) == (None, None)  # mixed: unlabelled
    assert fc([]) == (None, None)


def test_folder_class_subfolders_are_labels(tmp_path):
    root = tmp_path / "classes"
    expect = make_class_folder(root)
    d = load_dataset(str(root), image_size=8, cache_dir=tmp_path / "c", progress=False)
    assert d.class_names == ("Zebra", "ant bee", "cat", "dog") and d.num_classes == 4
    assert d.labels.dtype == torch.int64 and d.labels.shape == (len(expect),)
    # images come in sorted path order; each label names the class of its file, checked by its colour
    for img, y, (rel, (cls, colour)) in zip(d.images, d.labels.tolist(), expect.items()):
        assert d.class_names[y] == cls, rel
        assert img.float().mean(dim=(1, 2)).round().tolist() == list(colour), rel
    assert "labels of 4 classes" in repr(d)


def test_folder_labels_skip_unreadable_images_without_renumbering(tmp_path):
    root = tmp_path / "classes"
    make_class_folder(root)
    (root / "aardvark").mkdir()
    (root / "aardvark" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(100))
    (root / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.warns(DataWarning, match="skipped 2 of 8"):
        d = load_dataset(str(root), image_size=8, cache_dir=tmp_path / "c", progress=False)
    # the class of an unreadable file stays a class, so the indices do not depend on decoding
    assert d.class_names == ("Zebra", "aardvark", "ant bee", "cat", "dog")
    assert d.num_images == 6 and sorted(d.labels.tolist()) == [0, 2, 3, 3, 4, 4]


def test_folder_with_top_level_images_and_subfolders_is_unlabelled(tmp_path):
    root = tmp_path / "mixed"
    make_class_folder(root)
    Image.new("RGB", (12, 12), RED).save(root / "stray.png")
    with pytest.warns(DataWarning, match="top level as well as in subfolders.*without labels"):
        d = load_dataset(str(root), image_size=8, cache_dir=tmp_path / "c", progress=False)
    assert d.num_images == 7 and d.labels is None and d.class_names is None


def test_folder_cache_round_trip_keeps_labels(tmp_path, monkeypatch):
    from safetensors import safe_open
    from safetensors.torch import save_file

    root, cache = tmp_path / "classes", tmp_path / "cache"
    make_class_folder(root)
    first = load_dataset(str(root), image_size=8, cache_dir=cache, progress=False)
    [cached] = list((cache / "folders").glob("*.safetensors"))
    with safe_open(str(cached), framework="pt") as f:
        assert set(f.keys()) == {"images", "labels"}
        meta = f.metadata()
        assert meta["format"] == "ddpmkit-folder-cache-v2"
        assert json.loads(meta["class_names"]) == list(first.class_names)

    def failing(*a, **k):
        raise AssertionError("decoded despite the cache")

    monkeypatch.setattr(folder_source, "_decode_image", failing)
    again = load_dataset(str(root), image_size=8, cache_dir=cache, progress=False)
    assert torch.equal(again.images, first.images) and torch.equal(again.labels, first.labels)
    assert again.labels.dtype == torch.int64 and again.class_names == first.class_names
    monkeypatch.undo()

    # A cache written in the old format (no labels) is never read as an unlabelled folder: it is rebuilt.
    save_file({"images": first.images}, str(cached), metadata={**meta, "format": "ddpmkit-folder-cache-v1"})
    with pytest.warns(DataWarning, match="unreadable cache"):
        rebuilt = load_dataset(str(root), image_size=8, cache_dir=cache, progress=False)
    assert torch.equal(rebuilt.labels, first.labels) and rebuilt.class_names == first.class_names
    # labels that do not fit the folder's classes are not trusted either
    bad = first.labels.clone()
    bad[0] = 99
    save_file({"images": first.images, "labels": bad}, str(cached), metadata=meta)
    with pytest.warns(DataWarning, match="unreadable cache"):
        assert torch.equal(load_dataset(str(root), image_size=8, cache_dir=cache, progress=False).labels,
                           first.labels)


def test_image_data_checks_labels_against_class_names():
    x = torch.zeros(3, 1, 4, 4, dtype=torch.uint8)
    with pytest.raises(DataError, match="0..1"):
        ImageData(x, torch.tensor([0, 1, 2]), "t", class_names=("a", "b"))
    with pytest.raises(DataError, match="without labels"):
        ImageData(x, None, "t", class_names=("a", "b"))
    with pytest.raises(DataError, match="labels for 3 images"):
        ImageData(x, torch.tensor([0, 1]), "t")


# --------------------------------------------------------------------------------------------------
# Batcher


def _ids(n=10, size=4, seed=0):
    """n random (hence asymmetric) images and their indices as labels."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8), torch.arange(n)


def test_batcher_shape_dtype_range():
    d = load_dataset("digits")
    b = Batcher(d, 32)  # ImageData works too (its labels come along)
    x = b.next_batch()
    assert x.shape == (32, 1, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    x2, y = b.next_batch(return_labels=True)
    assert y.dtype == torch.int64 and y.shape == (32,)
    assert next(iter(b)).shape == (32, 1, 16, 16)


def test_a_float_batcher_serves_its_values_as_they_are_and_flips_from_the_mirrored_tensor():
    """Latents: a float tensor is not scaled as uint8 pixels are, and a flipped sample is the mirrored tensor's row
    (the latent of the mirror image), in the same order and with the same flips as a uint8 Batcher of the same seed."""
    x, _ = _ids()
    u8 = Batcher(x, 8, flip=True, seed=3)
    fl = Batcher(from_uint8(x), 8, flip=True, seed=3, mirrored=from_uint8(x.flip(3)))
    for _ in range(5):
        assert torch.equal(u8.next_batch(), fl.next_batch())
    marked = torch.arange(x.shape[0], dtype=torch.float32).view(-1, 1, 1, 1).expand(x.shape).contiguous()
    b = Batcher(marked, x.shape[0], flip=True, seed=0, mirrored=-marked)
    idx, flips = Batcher(marked, x.shape[0], flip=True, seed=0).next_indices()
    expected = torch.where(flips.view(-1, 1, 1, 1), -marked[idx], marked[idx])
    assert torch.equal(b.next_batch(), expected) and flips.any() and not flips.all()


def test_batcher_bad_arguments():
    x, _ = _ids()
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ConfigError):
            Batcher(x, bad)
    with pytest.raises(DataError):
        Batcher(x.int(), 4)
    with pytest.raises(DataError, match="mirrored"):
        Batcher(x.float(), 4, mirrored=x.float()[:-1])
    with pytest.raises(ConfigError, match="no labels"):
        Batcher(x, 4).next_batch(return_labels=True)
    with pytest.raises(ConfigError, match="divisible"):
        Batcher(x, 5).next_batch(world_size=2)


def test_batcher_determinism():
    x, _ = _ids(50)
    a, b, c = Batcher(x, 8, seed=3), Batcher(x, 8, seed=3), Batcher(x, 8, seed=4)
    sa = [a.next_batch() for _ in range(20)]
    assert all(torch.equal(p, q) for p, q in zip(sa, (b.next_batch() for _ in range(20))))
    assert not all(torch.equal(p, q) for p, q in zip(sa, (c.next_batch() for _ in range(20))))


@pytest.mark.parametrize("n,bs", [(10, 3), (10, 10), (5, 12), (7, 1)])
def test_batcher_without_replacement_within_epoch(n, bs):
    x, ids = _ids(n)
    b = Batcher(x, bs, labels=ids, flip=False)
    served = torch.cat([b.next_batch(return_labels=True)[1] for _ in range(3 * n)])  # 3*bs whole epochs
    epochs = served.view(-1, n)
    for e in epochs:
        assert sorted(e.tolist()) == list(range(n))
    assert not all(torch.equal(epochs[0], e) for e in epochs[1:])  # a fresh permutation per epoch
    assert b.epoch == 3 * bs - 1 and b.position == n


def test_batcher_flip_is_a_mirror_at_half_rate():
    x, ids = _ids(40, size=6)
    b = Batcher(x, 50, labels=ids, seed=7)
    flips = total = 0
    for _ in range(80):  # 4000 images
        xb, yb = b.next_batch(return_labels=True)
        got = to_uint8(xb)
        src = x[yb]
        same = (got == src).flatten(1).all(1)
        mirrored = (got == src.flip(-1)).flatten(1).all(1)
        assert (same ^ mirrored).all()  # every image is exactly its source or exactly its mirror
        flips += int(mirrored.sum())
        total += len(yb)
    # Binomial(4000, 1/2): sd = sqrt(4000 / 4) ~ 31.6; accept within 5 sd (a false alarm ~ 6e-7).
    assert abs(flips - total / 2) < 5 * (total / 4) ** 0.5
    nb = Batcher(x, 50, labels=ids, seed=7, flip=False)
    xb, yb = nb.next_batch(return_labels=True)
    assert torch.equal(to_uint8(xb), x[yb])


def test_batcher_state_dict_resume_exact(tmp_path):
    from safetensors.torch import load_file, save_file

    x, ids = _ids(23)
    ref = Batcher(x, 10, labels=ids, seed=11)
    for _ in range(7):  # three epochs and a bit, crossing boundaries inside batches
        ref.next_batch()
    state = ref.state_dict()
    tensors = {k: v for k, v in state.items() if torch.is_tensor(v)}
    ints = {k: v for k, v in state.items() if not torch.is_tensor(v)}
    assert all(type(v) is int for v in ints.values()) and len(tensors) + len(ints) == len(state)
    save_file(tensors, tmp_path / "batcher.safetensors")
    (tmp_path / "batcher.json").write_text(json.dumps(ints))
    expect = [ref.next_batch(return_labels=True) for _ in range(12)]

    resumed = Batcher(x, 10, labels=ids, seed=999)
    resumed.load_state_dict({**load_file(tmp_path / "batcher.safetensors"),
                             **json.loads((tmp_path / "batcher.json").read_text())})
    for xe, ye in expect:
        xr, yr = resumed.next_batch(return_labels=True)
        assert torch.equal(xr, xe) and torch.equal(yr, ye)
    with pytest.raises(CheckpointError):
        Batcher(x[:5], 2).load_state_dict(state)


@pytest.mark.parametrize("world_size", [2, 4])
def test_batcher_rank_slices_make_the_global_batch(world_size):
    x, ids = _ids(13)
    whole = Batcher(x, 8, labels=ids, seed=5)
    ranks = [Batcher(x, 8, labels=ids, seed=5) for _ in range(world_size)]
    for _ in range(6):
        xg, yg = whole.next_batch(return_labels=True)
        parts = [r.next_batch(return_labels=True, rank=i, world_size=world_size) for i, r in enumerate(ranks)]
        assert all(p[0].shape[0] == 8 // world_size for p in parts)
        assert torch.equal(torch.cat([p[0] for p in parts]), xg)
        assert torch.equal(torch.cat([p[1] for p in parts]), yg)


def test_batcher_labels_follow_their_images_through_flips_and_epochs():
    # Distinct random images with class labels (not their indices): every served image, flipped or not,
    # must come with the label of the one source image it equals, epoch after epoch.
    x, _ = _ids(13, size=5, seed=2)
    y = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9])
    names = tuple("abcdefghij")
    b = Batcher(ImageData(x, y, "t", class_names=names), 5, seed=1)  # labels and names come along
    assert b.class_names == names
    flat = x.flatten(1)
    mirrored = x.flip(-1).flatten(1)
    flips = 0
    for _ in range(13):  # 65 images: five whole epochs, batches crossing epoch ends
        xb, yb = b.next_batch(return_labels=True)
        assert yb.dtype == torch.int64 and yb.shape == (5,)
        for img, lab in zip(to_uint8(xb).flatten(1), yb):
            same = (flat == img).all(1)
            mirror = (mirrored == img).all(1)
            src = torch.nonzero(same | mirror).flatten()
            assert len(src) == 1
            assert int(lab) == int(y[src[0]])
            flips += int(mirror[src[0]] and not same[src[0]])
    assert (b.epoch, b.position) == (4, 13) and 0 < flips < 65  # five epochs served, the last one whole
    # labels= overrides an ImageData's labels (and then there are no class names to go with them)
    b2 = Batcher(ImageData(x, y, "t", class_names=names), 5, labels=torch.arange(13))
    xb, yb = b2.next_batch(return_labels=True)
    assert b2.class_names is None and len(set(yb.tolist())) == 5
    for img, i in zip(to_uint8(xb), yb):
        assert torch.equal(img, x[i]) or torch.equal(img, x[i].flip(-1))
