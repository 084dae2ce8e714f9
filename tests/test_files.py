"""Tests of ddpmkit.files: the atomic writer, the strict JSON reader, the hasher, the cache folder, the downloader."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from ddpmkit import files
from ddpmkit.errors import CheckpointError, DataError, DdpmkitError, FileError
from ddpmkit.files import (atomic_write_bytes, atomic_write_json, atomic_write_text, cache_dir, download, read_json,
                           read_json_object, sha256_file)


def no_tmp_files(directory: Path):
    return [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]


# ============================================================================ atomic writes


def test_atomic_writes_roundtrip_and_json_format(tmp_path):
    p = tmp_path / "f.bin"
    atomic_write_bytes(p, b"\x00\x01abc")
    assert p.read_bytes() == b"\x00\x01abc"
    atomic_write_bytes(p, b"new")  # replaces
    assert p.read_bytes() == b"new"
    atomic_write_text(tmp_path / "t.txt", "héllo\n")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo\n"
    atomic_write_json(tmp_path / "c.json", {"b": 1, "a": [1.5, None, True]})
    text = (tmp_path / "c.json").read_text()
    assert text == json.dumps({"a": [1.5, None, True], "b": 1}, sort_keys=True, indent=2) + "\n"
    assert no_tmp_files(tmp_path) == []


def test_atomic_write_keeps_existing_permissions(tmp_path):
    p = tmp_path / "secret.json"
    p.write_text("{}")
    os.chmod(p, 0o600)
    atomic_write_json(p, {"x": 1})
    assert (os.stat(p).st_mode & 0o777) == 0o600


@pytest.mark.parametrize("fail_in", ["write", "fsync"])
def test_atomic_write_failure_leaves_previous_file(tmp_path, monkeypatch, fail_in):
    p = tmp_path / "config.json"
    atomic_write_json(p, {"old": True})
    before = p.read_bytes()

    def boom(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    for error in (FileError, CheckpointError):  # a caller may ask for its own error class
        with monkeypatch.context() as m:
            m.setattr(os, fail_in, boom)
            with pytest.raises(error, match=r"could not write .*config.json: No space left on device"):
                atomic_write_json(p, {"new": True}, error=error)
    assert p.read_bytes() == before
    assert no_tmp_files(tmp_path) == []


def test_atomic_write_partial_writes_are_completed(tmp_path, monkeypatch):
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:3])))
    atomic_write_bytes(tmp_path / "x", b"0123456789")
    monkeypatch.undo()
    assert (tmp_path / "x").read_bytes() == b"0123456789"


def test_atomic_write_unserialisable_json_is_refused(tmp_path):
    p = tmp_path / "c.json"
    atomic_write_json(p, {"ok": 1})
    with pytest.raises(FileError, match="cannot be stored as JSON"):
        atomic_write_json(p, {"bad": float("nan")})
    with pytest.raises(FileError, match="cannot be stored as JSON"):
        atomic_write_json(p, {"bad": object()})
    assert json.loads(p.read_text()) == {"ok": 1}


def _can_write_despite_chmod(directory: Path) -> bool:
    probe = directory / "probe"
    try:
        probe.write_bytes(b"x")
    except OSError:
        return False
    probe.unlink()
    return True


def test_atomic_write_read_only_dir_real(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    atomic_write_text(d / "f.txt", "old")
    os.chmod(d, 0o555)
    try:
        if _can_write_despite_chmod(d):
            pytest.skip("running with privileges that ignore directory permissions (root); "
                        "see the simulated read-only test")
        with pytest.raises(FileError, match="could not write .*f.txt: Permission denied"):
            atomic_write_text(d / "f.txt", "new")
        assert (d / "f.txt").read_text() == "old"
    finally:
        os.chmod(d, 0o755)


def test_errors_are_ddpmkit_errors():
    assert issubclass(FileError, DdpmkitError)


# ============================================================================ JSON, hashes, cache folder


def test_read_json_strict(tmp_path):
    p = tmp_path / "c.json"
    p.write_text('{"a": 1, "b": [1, 2]}')
    assert read_json(p) == {"a": 1, "b": [1, 2]} and read_json_object(p) == {"a": 1, "b": [1, 2]}
    p.write_text('{"a": 1, "a": 2}')
    with pytest.raises(FileError, match=r"c.json is not valid JSON: duplicate key 'a'"):
        read_json(p)
    p.write_text('{"a": 1,')
    with pytest.raises(CheckpointError, match=r"c.json is not valid JSON"):
        read_json_object(p, error=CheckpointError)
    p.write_text("[1, 2]")
    assert read_json(p) == [1, 2]
    with pytest.raises(FileError, match="does not hold a JSON object"):
        read_json_object(p)
    with pytest.raises(FileError, match="missing.json does not exist"):
        read_json(tmp_path / "missing.json")


def test_sha256_file(tmp_path):
    p = tmp_path / "f.bin"
    data = os.urandom(5 << 20)  # more than one 4 MiB piece
    p.write_bytes(data)
    assert sha256_file(p) == hashlib.sha256(data).hexdigest()
    with pytest.raises(FileError, match="does not exist"):
        sha256_file(tmp_path / "nope")


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("DDPMKIT_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("DDPMKIT_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "ddpmkit"


# ============================================================================ download


def _served(tmp_path, data: bytes = b"payload " * 5000) -> tuple[str, bytes]:
    src = tmp_path / "server" / "file.bin"
    src.parent.mkdir()
    src.write_bytes(data)
    return src.as_uri(), data


def test_download_checks_hashes_and_leaves_no_temp_file(tmp_path):
    url, data = _served(tmp_path)
    dest = tmp_path / "cache" / "sub" / "file.bin"
    got = download(url, dest, md5=hashlib.md5(data).hexdigest(), sha256=hashlib.sha256(data).hexdigest(),
                   progress=False)
    assert got == dest and dest.read_bytes() == data
    assert [p.name for p in dest.parent.iterdir()] == ["file.bin"]
    assert download(url, tmp_path / "plain.bin", progress=False).read_bytes() == data  # no hash to check


@pytest.mark.parametrize("which", ["md5", "sha256"])
def test_download_with_wrong_hash_leaves_nothing(tmp_path, which):
    url, _ = _served(tmp_path)
    dest = tmp_path / "cache" / "file.bin"
    dest.parent.mkdir()
    dest.write_bytes(b"the old file")
    want = "0" * (32 if which == "md5" else 64)
    with pytest.raises(DataError, match=("MD5" if which == "md5" else "SHA-256") + " .* expected 0+; the file "
                                         "was discarded") as e:
        download(url, dest, progress=False, error=DataError, **{which: want})
    assert "\n" not in str(e.value)
    assert dest.read_bytes() == b"the old file"  # untouched
    assert [p.name for p in dest.parent.iterdir()] == ["file.bin"]


def test_download_offline_is_one_line_naming_url_and_hint(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure\nin name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    dest = tmp_path / "d" / "net.pt"
    with pytest.raises(FileError, match=r"could not download https://example.org/net.pt .*; download it by hand "
                                        r"from https://example.org/net.pt and put it at .*net.pt") as e:
        download("https://example.org/net.pt", dest, progress=False)
    assert "\n" not in str(e.value)
    with pytest.raises(FileError, match=r"could not download .*; pass --inception PATH$"):
        download("https://example.org/net.pt", dest, progress=False, hint="pass --inception PATH")
    assert list((tmp_path / "d").iterdir()) == []


def test_download_interrupted_stream_leaves_nothing(tmp_path, monkeypatch):
    class Broken:
        headers = {"Content-Length": "100"}

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def __init__(self):
            self.calls = 0

        def read(self, n):
            self.calls += 1
            if self.calls > 2:
                raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
            return b"x" * 10

    monkeypatch.setattr(files.urllib.request, "urlopen", lambda *a, **k: Broken())
    with pytest.raises(FileError, match="could not download .*Connection reset by peer"):
        download("https://example.org/f", tmp_path / "f", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_download_unwritable_destination(tmp_path):
    url, _ = _served(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(FileError, match="cannot write to"):
        download(url, blocker / "sub" / "f.bin", progress=False)


def test_output_dir_removes_only_the_empty_folders_it_made_when_the_block_fails(tmp_path):
    (tmp_path / "run").mkdir()
    out = tmp_path / "run" / "samples" / "tag"
    with pytest.raises(RuntimeError):
        with files.output_dir(out):
            assert out.is_dir()
            raise RuntimeError("the sampler failed")
    assert not (tmp_path / "run" / "samples").exists() and (tmp_path / "run").is_dir()  # the run was there before
    with pytest.raises(KeyboardInterrupt):
        with files.output_dir(out):
            (out / "sample_000.png").write_bytes(b"x")  # what was written stays, and so do its folders
            raise KeyboardInterrupt
    assert (out / "sample_000.png").is_file()
    with files.output_dir(tmp_path / "new") as made:  # success keeps it
        pass
    assert made.is_dir()
