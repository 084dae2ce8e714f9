"""Durable files: the one atomic writer, the one hasher, the strict JSON reader, the cache folder, the downloader.

A leaf module (standard library and ``ddpmkit.errors`` only). Every write goes to a temporary file in the
destination's folder, is flushed and fsynced, and is renamed over the destination (``os.replace``), so a
crash leaves either the old file or the complete new one, never a half-written one.

Failures are one-line ``FileError``s by default. A caller that reports its own kind of error (a checkpoint,
a data source, the Inception network) passes ``error=CheckpointError`` (or another ``DdpmkitError``
subclass) and gets the same message in that class.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import json
import os
import secrets
import stat
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

from .errors import DdpmkitError, FileError

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "json_text",
    "read_bytes",
    "read_json",
    "read_json_object",
    "parse_json",
    "file_digest",
    "sha256_file",
    "fsync_dir",
    "cache_dir",
    "download",
    "reason",
    "output_dir",
]

ErrorClass = type[DdpmkitError]

_WRITE_CHUNK = 1 << 26  # 64 MiB per os.write call
_HASH_CHUNK = 1 << 22  # 4 MiB per read when hashing
_DOWNLOAD_CHUNK = 1 << 20


def reason(e: BaseException) -> str:
    """The human part of an exception, on one line: 'No space left on device' rather than '[Errno 28] ...'."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = " ".join(str(getattr(e, "reason", None) or e).split())
    return text or type(e).__name__


@contextlib.contextmanager
def output_dir(path, *, error: ErrorClass = FileError):
    """``with output_dir(out) as out:`` creates the folder ``out`` (and its missing parents) for a command's files;
    when the block fails, the folders it created are removed again where they are still empty (deepest first), so
    a failed command leaves no empty folder behind and removes nothing that was there before."""
    path = Path(path)
    created = []
    p = path
    while not p.exists() and p != p.parent:
        created.append(p)
        p = p.parent
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise error(f"cannot create the folder {path}: {reason(e)}") from None
    try:
        yield path
    except BaseException:
        for d in created:
            try:
                d.rmdir()  # only an empty folder: whatever the block wrote stays
            except OSError:
                break
        raise


def cache_dir() -> Path:
    """``$DDPMKIT_CACHE`` if set, else ``~/.cache/ddpmkit`` (not created here)."""
    env = os.environ.get("DDPMKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ddpmkit"


# ============================================================================ directories and hashes


def fsync_dir(directory, *, error: ErrorClass = FileError) -> None:
    """Make a rename or file creation inside ``directory`` durable (POSIX). A no-op where unsupported."""
    if os.name == "nt":  # directories cannot be opened for fsync on Windows
        return
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM, errno.EINVAL):
            return
        raise error(f"could not sync directory {directory}: {reason(e)}") from e
    try:
        os.fsync(fd)
    except OSError as e:
        # Some file systems cannot fsync a directory; that says nothing about the data.
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES, errno.EPERM):
            raise error(f"could not sync directory {directory}: {reason(e)}") from e
    finally:
        os.close(fd)


def file_digest(path, algorithm: str = "sha256", *, error: ErrorClass = FileError) -> str:
    """The hex digest of a file by ``algorithm`` (a hashlib name: sha256, md5, ...), read in 4 MiB pieces."""
    h = hashlib.new(algorithm, usedforsecurity=False)  # a checksum of a download, not a password
    try:
        with open(path, "rb") as f:
            while True:
                chunk = f.read(_HASH_CHUNK)
                if not chunk:
                    break
                h.update(chunk)
    except FileNotFoundError as e:
        raise error(f"{path} does not exist") from e
    except OSError as e:
        raise error(f"could not read {path}: {reason(e)}") from e
    return h.hexdigest()


def sha256_file(path, *, error: ErrorClass = FileError) -> str:
    """The SHA-256 of a file as 64 hex digits."""
    return file_digest(path, "sha256", error=error)


# ============================================================================ JSON


def read_bytes(path, *, error: ErrorClass = FileError) -> bytes:
    """The bytes of a file; a one-line error naming it when it is missing or unreadable."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError as e:
        raise error(f"{path} does not exist") from e
    except OSError as e:
        raise error(f"could not read {path}: {reason(e)}") from e


def _reject_duplicate_keys(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def parse_json(data: bytes, path, *, error: ErrorClass = FileError) -> Any:
    """Strict JSON from UTF-8 bytes: duplicate keys are refused. ``path`` only names the source in errors."""
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise error(f"{path} is not valid JSON: {e}") from e


def read_json(path, *, error: ErrorClass = FileError) -> Any:
    """A JSON file, strictly parsed (duplicate keys refused)."""
    return parse_json(read_bytes(path, error=error), path, error=error)


def read_json_object(path, *, error: ErrorClass = FileError) -> dict:
    """A JSON file that must hold an object (duplicate keys refused); an error naming the file otherwise."""
    obj = read_json(path, error=error)
    if type(obj) is not dict:
        raise error(f"{path} does not hold a JSON object")
    return obj


def json_text(obj: Any, path, *, sort_keys: bool = True, indent: int = 2, error: ErrorClass = FileError) -> str:
    """Standard JSON text with a final newline (no NaN/Infinity); ``path`` only names the target in errors."""
    try:
        return json.dumps(obj, sort_keys=sort_keys, indent=indent, allow_nan=False, ensure_ascii=False) + "\n"
    except (TypeError, ValueError, RecursionError) as e:
        raise error(f"could not write {path}: the data cannot be stored as JSON ({e})") from e


# ============================================================================ atomic writes


def atomic_write_bytes(path, data, *, error: ErrorClass = FileError) -> Path:
    """Write ``data`` to ``path`` so that the file is either the old one or the complete new one.

    The bytes go to a temporary file in the same directory, are flushed and fsynced, and the file is
    renamed over ``path`` (``os.replace``); then the directory is fsynced. On any failure the temporary
    file is removed, ``path`` is left as it was, and ``error`` says what happened in one line.
    An existing file's permission bits are kept; a new file gets the usual 0666 & ~umask.
    """
    path = Path(path)
    directory = path.parent
    view = memoryview(data).cast("B")
    tmp: Path | None = None
    fd: int | None = None
    try:
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            mode = None
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
        for _ in range(16):
            candidate = directory / f".{path.name[:180]}.{secrets.token_hex(6)}.tmp"
            try:
                fd = os.open(candidate, flags, 0o666)
            except FileExistsError:
                continue
            tmp = candidate
            break
        else:  # pragma: no cover - 16 collisions of 48 random bits
            raise OSError(errno.EEXIST, "could not create a unique temporary file")
        if mode is not None:
            os.chmod(tmp, mode)
        written = 0
        while written < len(view):
            n = os.write(fd, view[written:written + _WRITE_CHUNK])
            if n <= 0:
                raise OSError(errno.EIO, "the write made no progress")
            written += n
        os.fsync(fd)
        os.close(fd)
        fd = None
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise error(f"could not write {path}: {reason(e)}") from e
    finally:
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    fsync_dir(directory, error=error)
    return path


def atomic_write_text(path, text: str, *, error: ErrorClass = FileError) -> Path:
    """``atomic_write_bytes`` of ``text`` encoded as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"), error=error)


def atomic_write_json(path, obj, *, error: ErrorClass = FileError) -> Path:
    """Atomically write ``obj`` as standard JSON (sorted keys, indent 2, no NaN/Infinity, final newline)."""
    path = Path(path)
    return atomic_write_text(path, json_text(obj, path, error=error), error=error)


# ============================================================================ downloads


def _progress_bar(total: int | None, desc: str, enabled: bool):
    if enabled:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # progress is a nicety, never a requirement
            enabled = False
        else:
            return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc)

    class _Silent:
        def update(self, n):
            pass

        def close(self):
            pass

    return _Silent()


def download(url: str, dest, *, md5: str | None = None, sha256: str | None = None, progress: bool = True,
             hint: str | None = None, error: ErrorClass = FileError) -> Path:
    """Fetch ``url`` into ``dest`` and return ``dest``.

    The bytes go to a temporary file in ``dest``'s folder, are fsynced, checked against ``md5`` and/or
    ``sha256`` when given, and only then renamed into place; any failure removes the temporary file and
    leaves ``dest`` as it was. Errors are one line naming the url and ``hint`` (what to do instead; default:
    download it by hand and put it at ``dest``).
    """
    dest = Path(dest).expanduser()
    hint = hint or f"download it by hand from {url} and put it at {dest}"
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    except OSError as e:
        raise error(f"cannot write to {dest.parent} ({reason(e)})") from None
    tmp = Path(tmp_name)
    hashes = {}
    if md5 is not None:
        hashes["MD5"] = (hashlib.md5(usedforsecurity=False), md5.lower())
    if sha256 is not None:
        hashes["SHA-256"] = (hashlib.sha256(), sha256.lower())
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                resp = urllib.request.urlopen(url, timeout=60)
            except (OSError, http.client.HTTPException, ValueError) as e:
                raise error(f"could not download {url} ({type(e).__name__}: {reason(e)[:300]}); {hint}") from None
            with resp:
                length = resp.headers.get("Content-Length") if getattr(resp, "headers", None) else None
                total = int(length) if length and length.isdigit() else None
                bar = _progress_bar(total, f"downloading {dest.name}", progress)
                try:
                    while True:
                        try:
                            chunk = resp.read(_DOWNLOAD_CHUNK)
                        except (OSError, http.client.HTTPException, ValueError) as e:
                            raise error(f"could not download {url} ({type(e).__name__}: {reason(e)[:300]}); "
                                        f"{hint}") from None
                        if not chunk:
                            break
                        try:
                            out.write(chunk)
                        except OSError as e:
                            raise error(f"cannot write {tmp} ({reason(e)})") from None
                        for h, _ in hashes.values():
                            h.update(chunk)
                        bar.update(len(chunk))
                finally:
                    bar.close()
            try:
                out.flush()
                os.fsync(out.fileno())
            except OSError as e:
                raise error(f"cannot write {tmp} ({reason(e)})") from None
        for name, (h, want) in hashes.items():
            got = h.hexdigest()
            if got != want:
                raise error(f"the download of {url} has {name} {got}, expected {want}; the file was discarded "
                            f"(a corrupt or altered download); try again, or {hint}")
        try:
            os.replace(tmp, dest)
        except OSError as e:
            raise error(f"cannot write {dest} ({reason(e)})") from None
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:
        fsync_dir(dest.parent, error=error)
    except DdpmkitError:
        pass  # the file is in place; durability of the rename is best effort here
    return dest
