"""Run directories and checkpoints: atomic writes, safe loads, resume.

A training run is days of compute, so this module never leaves a half-written file where a good one was,
and never unpickles anything: tensors are stored as safetensors, everything else as JSON.

Layout of a run directory::

    RUN/config.json                        the complete resolved configuration (written by the trainer)
    RUN/metrics.csv                        (trainer)
    RUN/samples/                           (trainer)
    RUN/checkpoints/step_000001000/
        model.safetensors                  the raw model weights (a flat state_dict)
        ema.safetensors                    the EMA weights (optional)
        optimizer.safetensors, .json       the optimizer state_dict (optional; see save_state)
        state.safetensors, .json           the rest of the training state: RNG, data order... (optional)
        manifest.json                      written last: format, version, step, size and SHA-256 per file

A checkpoint is complete exactly when its directory is named ``step_N`` and its manifest matches its
files. It is written in a hidden ``checkpoints/.tmp-step_N-<random>`` directory and renamed into place,
so a crash at any moment leaves either the old set of checkpoints or the new one, plus perhaps a hidden
directory that the next save removes.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import stat
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as _safetensors_load
from safetensors.torch import save as _safetensors_save

from .errors import CheckpointError, DdpmkitError

__all__ = [
    "Checkpoint",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_save_safetensors",
    "load_safetensors",
    "save_state",
    "load_state",
    "save_checkpoint",
    "verify_checkpoint",
    "list_checkpoints",
    "latest_checkpoint",
    "prune_checkpoints",
    "load_checkpoint",
    "read_config",
    "write_config",
    "prepare_run_dir",
    "load_model",
    "load_schedule",
]

CONFIG_NAME = "config.json"
CHECKPOINTS_DIR = "checkpoints"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "ddpmkit-checkpoint"
MANIFEST_VERSION = 1
STATE_FORMAT = "ddpmkit-state"
STATE_VERSION = 1

_MODEL_FILE = "model.safetensors"
_EMA_FILE = "ema.safetensors"
_OPTIMIZER = "optimizer"
_TRAIN_STATE = "state"

_STEP_RE = re.compile(r"^step_(\d{9,})$")
# A checkpoint moved aside while the same step is being re-saved: .old-step_N-<hex>.
_OLD_RE = re.compile(r"^\.old-(step_\d{9,})-[0-9a-f]+$")
_TMP_PREFIX = ".tmp-step_"
_DEL_PREFIX = ".del-step_"
_OLD_PREFIX = ".old-step_"

_WRITE_CHUNK = 1 << 26  # 64 MiB per os.write call
_HASH_CHUNK = 1 << 22  # 4 MiB per read when hashing


# ============================================================================ small helpers


def _reason(e: BaseException) -> str:
    """The human part of an exception: 'No space left on device' rather than '[Errno 28] ...: path'."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def _fsync_dir(directory: Path) -> None:
    """Make a rename or file creation inside ``directory`` durable (POSIX). A no-op where unsupported."""
    if os.name == "nt":  # directories cannot be opened for fsync on Windows
        return
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM, errno.EINVAL):
            return
        raise CheckpointError(f"could not sync directory {directory}: {_reason(e)}") from e
    try:
        os.fsync(fd)
    except OSError as e:
        # Some file systems cannot fsync a directory; that says nothing about the data.
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES, errno.EPERM):
            raise CheckpointError(f"could not sync directory {directory}: {_reason(e)}") from e
    finally:
        os.close(fd)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_HASH_CHUNK)
            if not chunk:
                break
            h.update(chunk)
    return h.hexdigest()


def _read_bytes(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError as e:
        raise CheckpointError(f"{path} does not exist") from e
    except OSError as e:
        raise CheckpointError(f"could not read {path}: {_reason(e)}") from e


def _reject_duplicate_keys(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _parse_json(data: bytes, path: Path) -> Any:
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e


def _read_json(path: Path) -> Any:
    return _parse_json(_read_bytes(path), path)


def _json_dumps(obj: Any, path: Path, *, sort_keys: bool, indent: int) -> str:
    try:
        return json.dumps(obj, sort_keys=sort_keys, indent=indent, allow_nan=False, ensure_ascii=False) + "\n"
    except (TypeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"could not write {path}: the data cannot be stored as JSON ({e})") from e


# ============================================================================ atomic writes


def atomic_write_bytes(path, data) -> Path:
    """Write ``data`` to ``path`` so that the file is either the old one or the complete new one.

    The bytes go to a temporary file in the same directory, are flushed and fsynced, and the file is
    renamed over ``path`` (``os.replace``); then the directory is fsynced. On any failure the temporary
    file is removed, ``path`` is left as it was, and a CheckpointError says what happened.
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
        raise CheckpointError(f"could not write {path}: {_reason(e)}") from e
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
    _fsync_dir(directory)
    return path


def atomic_write_text(path, text: str) -> Path:
    """``atomic_write_bytes`` of ``text`` encoded as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj) -> Path:
    """Atomically write ``obj`` as standard JSON (sorted keys, indent 2, no NaN/Infinity, final newline)."""
    path = Path(path)
    return atomic_write_text(path, _json_dumps(obj, path, sort_keys=True, indent=2))


# ============================================================================ safetensors


def _prepare_tensors(tensors: Mapping, what: str) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors, no two of which share memory (safetensors refuses aliasing)."""
    if not isinstance(tensors, Mapping):
        raise CheckpointError(f"cannot save {what}: expected a dict of tensors, got {type(tensors).__name__}")
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, t in tensors.items():
        if type(key) is not str:
            raise CheckpointError(f"cannot save {what}: key {key!r} is not a string")
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"cannot save {what}: {key!r} is a {type(t).__name__}, not a tensor")
        if t.layout != torch.strided or t.device.type == "meta":
            raise CheckpointError(f"cannot save {what}: {key!r} is a {t.layout} tensor on {t.device}")
        t = t.detach()
        if t.is_conj():
            t = t.resolve_conj()
        if t.is_neg():
            t = t.resolve_neg()
        t = t.to("cpu").contiguous()
        if t.numel() > 0:
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:  # a tied weight or a view of another entry: store its own copy
                t = t.clone()
            else:
                seen.add(ptr)
        out[key] = t
    return out


def _safetensors_bytes(tensors: Mapping, what: str, metadata: Mapping | None = None) -> bytes:
    prepared = _prepare_tensors(tensors, what)
    if metadata is not None:
        if not all(type(k) is str and type(v) is str for k, v in metadata.items()):
            raise CheckpointError(f"cannot save {what}: safetensors metadata must map strings to strings")
        metadata = dict(metadata)
    try:
        return _safetensors_save(prepared, metadata=metadata)
    except Exception as e:  # safetensors raises plain exceptions for unsupported dtypes and the like
        raise CheckpointError(f"cannot save {what} as safetensors: {e}") from e


def _tensors_from_bytes(data: bytes, path: Path) -> dict[str, torch.Tensor]:
    try:
        return _safetensors_load(data)
    except Exception as e:  # SafetensorError on a bad header, truncation, bad offsets
        raise CheckpointError(f"{path} is not a valid safetensors file: {e}") from e


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], path,
                            metadata: Mapping[str, str] | None = None) -> Path:
    """Atomically save a flat dict of tensors as a safetensors file.

    Tensors are detached and made contiguous CPU tensors; entries that share memory (tied weights, views)
    are stored as independent copies. ``metadata`` is an optional str -> str dict kept in the header.
    """
    path = Path(path)
    return atomic_write_bytes(path, _safetensors_bytes(tensors, str(path), metadata))


def load_safetensors(path, map_location="cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file (never a pickle); any damage is a CheckpointError naming the file."""
    path = Path(path)
    tensors = _tensors_from_bytes(_read_bytes(path), path)
    return _to_device(tensors, map_location)


def _to_device(tensors: dict[str, torch.Tensor], map_location) -> dict[str, torch.Tensor]:
    if map_location is None or torch.device(map_location).type == "cpu":
        return tensors
    return {k: v.to(map_location) for k, v in tensors.items()}


# ============================================================================ nested state (no pickle)
#
# JSON node grammar (every JSON object in the tree is a one-key tagged node):
#   null, true/false, integers, finite floats, strings, [lists]
#   {"$tuple": [...]}
#   {"$dict": {"str key": node, ...}}      a dict whose keys are all strings (insertion order kept)
#   {"$dict": [[key node, node], ...]}     a dict with other keys (Adam's int parameter ids, tuples, ...)
#   {"$odict": ...}                        the same for collections.OrderedDict
#   {"$float": "nan" | "inf" | "-inf"}
#   {"$tensor": "ref"}, {"$ndarray": "ref"}  a tensor / numpy array stored in NAME.safetensors under "ref"
#   {"$numpy": ["float32", value]}         a numpy scalar
#   {"$bytes": "base64"}

_KEY_TYPES = (str, int, float, bool, type(None), tuple, bytes)


class _StateEncoder:
    def __init__(self, what: str):
        self.what = what
        self.tensors: dict[str, torch.Tensor] = {}
        self._refs: dict[int, str] = {}
        self._alive: list[Any] = []  # keeps encoded objects alive so that id() stays unique
        self._active: set[int] = set()

    def fail(self, where: str, msg: str):
        return CheckpointError(f"cannot save {self.what}: {where or 'the top level'} {msg}")

    def _ref(self, x, where: str) -> str:
        ref = self._refs.get(id(x))
        if ref is not None:
            return ref
        if isinstance(x, np.ndarray):
            if x.dtype.kind not in "biufc" or x.dtype.hasobject:
                raise self.fail(where, f"is a numpy array of dtype {x.dtype}, which cannot be stored")
            if not x.dtype.isnative:
                x_native = x.astype(x.dtype.newbyteorder("="))
            else:
                x_native = x
            try:
                t = torch.from_numpy(np.ascontiguousarray(x_native))
            except TypeError as e:
                raise self.fail(where, f"is a numpy array that cannot be stored ({e})") from e
        else:
            if x.layout != torch.strided or x.device.type == "meta":
                raise self.fail(where, f"is a {x.layout} tensor on {x.device}, which cannot be stored")
            t = x
        ref = str(len(self.tensors))
        self.tensors[ref] = t
        self._refs[id(x)] = ref
        self._alive.append(x)
        return ref

    def encode(self, x, where: str = ""):
        t = type(x)
        if x is None or t is bool or t is str:
            return x
        if t is int:
            return x
        if t is float:
            if math.isfinite(x):
                return x
            return {"$float": "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")}
        if isinstance(x, torch.Tensor):
            return {"$tensor": self._ref(x, where)}
        if isinstance(x, np.ndarray):
            return {"$ndarray": self._ref(x, where)}
        if isinstance(x, np.generic):
            if x.dtype.kind not in "biuf":
                raise self.fail(where, f"is a numpy scalar of dtype {x.dtype}, which cannot be stored")
            return {"$numpy": [x.dtype.name, self.encode(x.item(), where)]}
        if t is bytes:
            return {"$bytes": base64.b64encode(x).decode("ascii")}
        if t in (list, tuple, dict, OrderedDict):
            if id(x) in self._active:
                raise self.fail(where, "contains itself (a reference cycle)")
            self._active.add(id(x))
            try:
                if t is list:
                    return [self.encode(v, f"{where}[{i}]") for i, v in enumerate(x)]
                if t is tuple:
                    return {"$tuple": [self.encode(v, f"{where}[{i}]") for i, v in enumerate(x)]}
                tag = "$dict" if t is dict else "$odict"
                for k in x:
                    if type(k) not in _KEY_TYPES:
                        raise self.fail(where, f"has a key of type {type(k).__name__}, which cannot be stored")
                if all(type(k) is str for k in x):
                    return {tag: {k: self.encode(v, f"{where}[{k!r}]") for k, v in x.items()}}
                return {tag: [[self.encode(k, where), self.encode(v, f"{where}[{k!r}]")] for k, v in x.items()]}
            finally:
                self._active.discard(id(x))
        raise self.fail(where, f"is a {t.__module__}.{t.__qualname__}, which cannot be stored "
                               "(supported: dict, list, tuple, str, int, float, bool, None, bytes, tensors, "
                               "numpy arrays and scalars)")


class _StateDecoder:
    def __init__(self, tensors: Mapping[str, torch.Tensor], path: Path):
        self.tensors = tensors
        self.path = path
        self._cache: dict[tuple[str, str], Any] = {}

    def bad(self, msg: str) -> CheckpointError:
        return CheckpointError(f"{self.path} is corrupt: {msg}")

    def _lookup(self, kind: str, ref) -> Any:
        if type(ref) is not str or ref not in self.tensors:
            raise self.bad(f"it refers to a tensor {ref!r} that its safetensors file does not hold")
        key = (kind, ref)
        if key not in self._cache:  # the same object twice in the saved tree -> the same object again
            t = self.tensors[ref]
            self._cache[key] = t.numpy() if kind == "$ndarray" else t
        return self._cache[key]

    def decode(self, node):
        if node is None or type(node) in (bool, int, float, str):
            return node
        if type(node) is list:
            return [self.decode(v) for v in node]
        if type(node) is not dict or len(node) != 1:
            raise self.bad(f"unexpected JSON node {str(node)[:80]}")
        (tag, val), = node.items()
        if tag == "$tuple" and type(val) is list:
            return tuple(self.decode(v) for v in val)
        if tag in ("$dict", "$odict"):
            cls = dict if tag == "$dict" else OrderedDict
            if type(val) is dict:
                return cls((k, self.decode(v)) for k, v in val.items())
            if type(val) is list:
                out = cls()
                for pair in val:
                    if type(pair) is not list or len(pair) != 2:
                        raise self.bad("a dict entry is not a [key, value] pair")
                    k = self.decode(pair[0])
                    try:
                        if k in out:
                            raise self.bad(f"duplicate dict key {k!r}")
                    except TypeError as e:
                        raise self.bad(f"unhashable dict key {k!r}") from e
                    out[k] = self.decode(pair[1])
                return out
        if tag in ("$tensor", "$ndarray"):
            return self._lookup(tag, val)
        if tag == "$float" and val in ("nan", "inf", "-inf"):
            return float(val)
        if tag == "$numpy" and type(val) is list and len(val) == 2 and type(val[0]) is str:
            try:
                dtype = np.dtype(val[0])
            except TypeError as e:
                raise self.bad(f"unknown numpy dtype {val[0]!r}") from e
            if dtype.kind not in "biuf":
                raise self.bad(f"numpy dtype {val[0]!r} is not allowed")
            return dtype.type(self.decode(val[1]))
        if tag == "$bytes" and type(val) is str:
            try:
                return base64.b64decode(val.encode("ascii"), validate=True)
            except (ValueError, UnicodeEncodeError) as e:
                raise self.bad("bad base64 data") from e
        raise self.bad(f"unknown JSON node {str(node)[:80]}")


def _check_name(name: str) -> str:
    if type(name) is not str or not name or name.startswith(".") or name != Path(name).name or "\\" in name:
        raise CheckpointError(f"state name {name!r} must be a plain file name")
    return name


def _state_payload(tree, name: str, what: str) -> tuple[bytes, bytes]:
    """(NAME.safetensors bytes, NAME.json bytes) for a nested state."""
    enc = _StateEncoder(what)
    node = enc.encode(tree)
    st = _safetensors_bytes(enc.tensors, what, {"format": STATE_FORMAT})
    doc = {"format": STATE_FORMAT, "version": STATE_VERSION, "tensors": f"{name}.safetensors", "tree": node}
    # Not sorted: dict order is part of the state and is kept as written.
    text = _json_dumps(doc, Path(f"{name}.json"), sort_keys=False, indent=1)
    return st, text.encode("utf-8")


def _state_from_bytes(json_bytes: bytes, st_bytes: bytes, json_path: Path, st_path: Path, map_location=None):
    doc = _parse_json(json_bytes, json_path)
    if type(doc) is not dict or doc.get("format") != STATE_FORMAT or "tree" not in doc:
        raise CheckpointError(f"{json_path} is not a ddpmkit state file")
    version = doc.get("version")
    if type(version) is not int or version > STATE_VERSION:
        raise CheckpointError(f"{json_path} has state format version {version!r}, which this ddpmkit cannot "
                              "read (upgrade ddpmkit)")
    tensors = _to_device(_tensors_from_bytes(st_bytes, st_path), map_location)
    try:
        return _StateDecoder(tensors, json_path).decode(doc["tree"])
    except RecursionError as e:
        raise CheckpointError(f"{json_path} is corrupt: nested too deeply") from e


def save_state(tree, directory, name: str) -> tuple[Path, Path]:
    """Save a nested state (an optimizer state_dict, RNG states, data order...) without pickle.

    Writes ``directory/name.safetensors`` (every tensor and numpy array in ``tree``) and then
    ``directory/name.json`` (the structure, with tensors as references), each atomically. Supported:
    dict / OrderedDict with keys of type str, int, float, bool, None, tuple or bytes; list; tuple; str;
    int; float (nan and inf included); bool; None; bytes; torch tensors (stored from CPU); numpy arrays
    and numeric numpy scalars. Anything else is a CheckpointError, raised before any file is written.
    Returns the two paths (safetensors, json).
    """
    name = _check_name(name)
    directory = Path(directory)
    st, js = _state_payload(tree, name, f"state {name!r}")
    st_path = atomic_write_bytes(directory / f"{name}.safetensors", st)
    js_path = atomic_write_bytes(directory / f"{name}.json", js)
    return st_path, js_path


def load_state(directory, name: str, map_location=None):
    """Load what ``save_state`` wrote: the same types (dict key types, tuples vs lists) and bit-exact tensors.

    Tensors come back on the CPU unless ``map_location`` names a device. Nothing is unpickled.
    """
    name = _check_name(name)
    directory = Path(directory)
    js_path, st_path = directory / f"{name}.json", directory / f"{name}.safetensors"
    return _state_from_bytes(_read_bytes(js_path), _read_bytes(st_path), js_path, st_path, map_location)


# ============================================================================ checkpoints


@dataclass
class Checkpoint:
    """A loaded checkpoint. ``config`` is the run's config.json when the run directory has one.

    ``skipped`` lists newer checkpoints that were passed over as corrupt when a run directory was loaded.
    Model and EMA tensors are on ``map_location``; optimizer and training state tensors stay on the CPU
    (``Optimizer.load_state_dict`` moves them to the parameters; RNG states must be CPU tensors).
    """

    step: int
    path: Path
    model_state: dict[str, torch.Tensor]
    ema_state: dict[str, torch.Tensor] | None = None
    optimizer_state: Any = None
    train_state: Any = None
    config: dict | None = None
    run_dir: Path | None = None
    skipped: list[Path] = field(default_factory=list)


def _step_name(step: int) -> str:
    return f"step_{step:09d}"


def _step_of(path: Path) -> int | None:
    name = Path(path).name
    m = _STEP_RE.match(name)
    if m:
        return int(m.group(1))
    m = _OLD_RE.match(name)
    if m:
        return int(m.group(1)[len("step_"):])
    return None


def _corrupt(path: Path, msg: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {path} is corrupt: {msg}")


def _read_manifest(path: Path) -> dict:
    mpath = path / MANIFEST_NAME
    if not mpath.is_file():
        raise _corrupt(path, f"{MANIFEST_NAME} is missing (the save did not finish)")
    try:
        m = _read_json(mpath)
    except CheckpointError as e:
        raise _corrupt(path, f"{MANIFEST_NAME} is unreadable ({e})") from e
    if type(m) is not dict or m.get("format") != MANIFEST_FORMAT:
        raise _corrupt(path, f"{MANIFEST_NAME} is not a ddpmkit checkpoint manifest")
    version = m.get("version")
    if type(version) is not int:
        raise _corrupt(path, f"{MANIFEST_NAME} has no format version")
    if version > MANIFEST_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {version}, newer than this ddpmkit "
                              f"reads ({MANIFEST_VERSION}); upgrade ddpmkit")
    step, files = m.get("step"), m.get("files")
    if type(step) is not int or step < 0:
        raise _corrupt(path, f"{MANIFEST_NAME} has no valid step")
    named = _step_of(path)
    if named is not None and named != step:
        raise _corrupt(path, f"{MANIFEST_NAME} says step {step} but the directory is for step {named}")
    if type(files) is not dict or _MODEL_FILE not in files:
        raise _corrupt(path, f"{MANIFEST_NAME} does not list {_MODEL_FILE}")
    for fname, entry in files.items():
        if (fname in ("", ".", "..", MANIFEST_NAME) or fname != Path(fname).name or "/" in fname
                or "\\" in fname):
            raise _corrupt(path, f"{MANIFEST_NAME} lists a bad file name {fname!r}")
        if (type(entry) is not dict or type(entry.get("bytes")) is not int or entry["bytes"] < 0
                or type(entry.get("sha256")) is not str or not re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])):
            raise _corrupt(path, f"{MANIFEST_NAME} has a bad entry for {fname}")
    return m


def _check_file(path: Path, fname: str, entry: dict, keep_bytes: bool) -> bytes | None:
    """Check one file against its manifest entry; return its bytes when ``keep_bytes`` (read only once)."""
    fpath = path / fname
    try:
        size = os.stat(fpath).st_size
    except FileNotFoundError:
        raise _corrupt(path, f"{fname} is missing") from None
    except OSError as e:
        raise CheckpointError(f"could not read {fpath}: {_reason(e)}") from e
    if size < entry["bytes"]:
        raise _corrupt(path, f"{fname} is truncated ({size} of {entry['bytes']} bytes)")
    if size > entry["bytes"]:
        raise _corrupt(path, f"{fname} has the wrong size ({size} bytes, the manifest says {entry['bytes']})")
    data = None
    try:
        if keep_bytes:
            data = fpath.read_bytes()
            digest = hashlib.sha256(data).hexdigest()
        else:
            digest = _sha256_file(fpath)
    except OSError as e:
        raise CheckpointError(f"could not read {fpath}: {_reason(e)}") from e
    if digest != entry["sha256"]:
        raise _corrupt(path, f"{fname} has the wrong SHA-256 (the file was changed or damaged)")
    return data


def verify_checkpoint(path) -> None:
    """Raise CheckpointError unless ``path`` is a complete checkpoint whose files match its manifest
    (present, of the recorded size, with the recorded SHA-256)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist" if not path.exists()
                              else f"{path} is not a checkpoint directory")
    manifest = _read_manifest(path)
    for fname, entry in manifest["files"].items():
        _check_file(path, fname, entry, keep_bytes=False)


def _is_intact(path: Path) -> bool:
    try:
        verify_checkpoint(path)
        return True
    except CheckpointError:
        return False


def _require_dir(run_dir, what: str = "run directory") -> Path:
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise CheckpointError(f"{what} {run_dir} does not exist")
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir} is not a directory")
    return run_dir


def list_checkpoints(run_dir) -> list[Path]:
    """The checkpoint directories of a run, oldest first (by step), whether intact or not.

    Hidden work directories are ignored, except that a checkpoint moved aside during a same-step re-save
    that was interrupted (``.old-step_N-*`` with no ``step_N``) is listed in its place, so it is not lost.
    """
    run_dir = _require_dir(run_dir)
    ckdir = run_dir / CHECKPOINTS_DIR
    if not ckdir.is_dir():
        return []
    try:
        names = os.listdir(ckdir)
    except OSError as e:
        raise CheckpointError(f"could not list {ckdir}: {_reason(e)}") from e
    found: dict[int, Path] = {}
    orphans: dict[int, Path] = {}
    for name in sorted(names):
        p = ckdir / name
        if not p.is_dir():
            continue
        if _STEP_RE.match(name):
            found[_step_of(p)] = p
        elif _OLD_RE.match(name):
            orphans.setdefault(_step_of(p), p)
    for step, p in orphans.items():
        found.setdefault(step, p)
    return [found[s] for s in sorted(found)]


def latest_checkpoint(run_dir, verify: bool = True) -> tuple[Path, list[Path]]:
    """The newest intact checkpoint of a run and the newer, corrupt ones that were skipped (newest first).

    ``verify_checkpoint(p)`` says why a skipped one is corrupt. CheckpointError when there is none.
    """
    run_dir = _require_dir(run_dir)
    candidates = list_checkpoints(run_dir)
    if not candidates:
        raise CheckpointError(f"{run_dir} has no checkpoints")
    skipped: list[Path] = []
    reasons: list[str] = []
    for p in reversed(candidates):
        if not verify:
            return p, skipped
        try:
            verify_checkpoint(p)
        except CheckpointError as e:
            skipped.append(p)
            reasons.append(str(e))
            continue
        return p, skipped
    raise CheckpointError(f"{run_dir} has no intact checkpoint: " + "; ".join(reasons))


def _remove_tree(path: Path) -> None:
    """Delete a directory without ever leaving a half-deleted ``step_N``: rename it hidden, then delete."""
    target = path
    if not path.name.startswith("."):
        target = path.parent / f"{_DEL_PREFIX}{path.name[len('step_'):]}-{secrets.token_hex(4)}"
        os.rename(path, target)
    shutil.rmtree(target)


def prune_checkpoints(run_dir, keep: int, *, _known_intact: Path | None = None) -> list[Path]:
    """Keep the newest ``keep`` intact checkpoints; delete every checkpoint older than the oldest of them,
    and leftover hidden work directories. Corrupt checkpoints newer than that are left for inspection.
    With fewer than ``keep`` intact checkpoints, no checkpoint is deleted. Returns what was deleted.

    Not safe while another process is saving into the same run directory.
    """
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be an integer >= 1, got {keep!r}")
    run_dir = _require_dir(run_dir)
    ckdir = run_dir / CHECKPOINTS_DIR
    if not ckdir.is_dir():
        return []
    deleted: list[Path] = []
    # 1. Hidden work directories: unfinished saves and deletions go; a moved-aside checkpoint is
    #    deleted when its replacement is in place, and put back when it is not.
    for name in sorted(os.listdir(ckdir)):
        p = ckdir / name
        if name.startswith(_TMP_PREFIX) or name.startswith(_DEL_PREFIX):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            deleted.append(p)
        elif _OLD_RE.match(name) and p.is_dir():
            canonical = ckdir / _OLD_RE.match(name).group(1)
            if canonical.exists():
                shutil.rmtree(p, ignore_errors=True)
                deleted.append(p)
            else:
                os.rename(p, canonical)
                _fsync_dir(ckdir)
    # 2. Old checkpoints.
    candidates = list_checkpoints(run_dir)
    intact = 0
    cutoff = None
    for p in reversed(candidates):
        if (_known_intact is not None and p == _known_intact) or _is_intact(p):
            intact += 1
            if intact == keep:
                cutoff = _step_of(p)
                break
    if cutoff is None:
        return deleted
    for p in candidates:
        if _step_of(p) < cutoff:
            _remove_tree(p)
            deleted.append(p)
    _fsync_dir(ckdir)
    return deleted


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` directory to ``final``, replacing an existing ``final`` safely."""
    ckdir = final.parent
    if os.path.lexists(final):
        aside = ckdir / f".old-{final.name}-{secrets.token_hex(4)}"
        os.rename(final, aside)
        try:
            os.rename(tmp, final)
        except OSError:
            try:
                os.rename(aside, final)
            except OSError:
                pass  # list_checkpoints still finds it under its .old- name
            raise
        _fsync_dir(ckdir)
        shutil.rmtree(aside, ignore_errors=True)  # leftovers are removed by the next prune
    else:
        os.rename(tmp, final)
    _fsync_dir(ckdir)


def save_checkpoint(run_dir, step: int, *, model_state, ema_state=None, optimizer_state=None,
                    train_state=None, keep: int | None = 3) -> Path:
    """Save a checkpoint as ``run_dir/checkpoints/step_{step:09d}`` and return its path.

    ``model_state`` and ``ema_state`` are flat state_dicts (str -> tensor), stored as safetensors.
    ``optimizer_state`` (e.g. ``optimizer.state_dict()``) and ``train_state`` (RNG states, data order,
    counters...) are nested states stored with ``save_state``. Every file is written and fsynced in a
    hidden temporary directory, ``manifest.json`` (sizes and SHA-256) last, and the directory is then
    renamed into place; a checkpoint already saved for the same step is replaced only once the new one is
    complete. Then the newest ``keep`` intact checkpoints are kept and older ones deleted (``keep=None``:
    keep all). On failure the temporary directory is removed, earlier checkpoints are untouched, and a
    CheckpointError says what went wrong.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise ValueError(f"keep must be an integer >= 1 or None, got {keep!r}")
    run_dir = _require_dir(run_dir)
    ckdir = run_dir / CHECKPOINTS_DIR
    name = _step_name(step)
    final = ckdir / name
    try:
        if not ckdir.is_dir():
            ckdir.mkdir(exist_ok=True)
            _fsync_dir(run_dir)
    except OSError as e:
        raise CheckpointError(f"could not create {ckdir}: {_reason(e)}") from e

    tmp = ckdir / f".tmp-{name}-{secrets.token_hex(4)}"
    files: dict[str, dict] = {}

    def put(fname: str, data: bytes) -> None:
        atomic_write_bytes(tmp / fname, data)
        files[fname] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

    try:
        tmp.mkdir()
        # One file at a time, so that at most one file's bytes are held in memory.
        put(_MODEL_FILE, _safetensors_bytes(model_state, "the model state", {"format": "pt"}))
        if ema_state is not None:
            put(_EMA_FILE, _safetensors_bytes(ema_state, "the EMA state", {"format": "pt"}))
        for stem, tree, what in ((_OPTIMIZER, optimizer_state, "the optimizer state"),
                                 (_TRAIN_STATE, train_state, "the training state")):
            if tree is not None:
                st, js = _state_payload(tree, stem, what)
                put(f"{stem}.safetensors", st)
                del st
                put(f"{stem}.json", js)
        manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "step": step, "files": files}
        atomic_write_json(tmp / MANIFEST_NAME, manifest)
        _publish(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (CheckpointError, OSError)):
            raise CheckpointError(f"could not save the checkpoint of step {step} in {ckdir}: "
                                  f"{_reason(e)} (earlier checkpoints are untouched)") from e
        raise

    if keep is not None:
        try:
            prune_checkpoints(run_dir, keep, _known_intact=final)
        except (OSError, CheckpointError) as e:  # the checkpoint itself is saved; pruning is housekeeping
            warnings.warn(f"could not prune old checkpoints in {ckdir}: {_reason(e)}", RuntimeWarning,
                          stacklevel=2)
    return final


def _run_of_checkpoint(path: Path) -> Path | None:
    """RUN for RUN/checkpoints/step_N, when RUN has a config.json."""
    parent = path.parent
    if parent.name == CHECKPOINTS_DIR and (parent.parent / CONFIG_NAME).is_file():
        return parent.parent
    return None


def _looks_like_checkpoint(path: Path) -> bool:
    return (_step_of(path) is not None or (path / MANIFEST_NAME).exists()
            or (path / _MODEL_FILE).exists())


def _classify(target) -> tuple[str, Path]:
    """("run", RUN) or ("checkpoint", CKPT) for a path a user handed in."""
    p = Path(target)
    if not p.exists():
        raise CheckpointError(f"{p} does not exist")
    if p.is_file():
        if p.name == CONFIG_NAME:
            return "run", p.parent
        if _looks_like_checkpoint(p.parent) and p.suffix in (".json", ".safetensors"):
            return "checkpoint", p.parent
        raise CheckpointError(f"{p} is a file, not a ddpmkit run directory or checkpoint")
    if (p / CONFIG_NAME).is_file():
        return "run", p
    if p.name == CHECKPOINTS_DIR and (p.parent / CONFIG_NAME).is_file():
        return "run", p.parent
    if _looks_like_checkpoint(p):
        return "checkpoint", p
    raise CheckpointError(f"{p} is not a ddpmkit run directory (no {CONFIG_NAME})")


_PARTS_ALL = ("model", "ema", "optimizer", "train")


def _load_dir(path: Path, verify: bool, map_location, parts=_PARTS_ALL) -> Checkpoint:
    """Load (and verify, reading each file once) one checkpoint directory."""
    if verify:
        manifest = _read_manifest(path)
        listed = set(manifest["files"])
    else:
        try:
            manifest = _read_manifest(path)
            listed = set(manifest["files"])
        except CheckpointError:
            manifest = None
            listed = {n for n in os.listdir(path) if (path / n).is_file()}
    wanted = set()
    if "model" in parts:
        wanted.add(_MODEL_FILE)
    if "ema" in parts:
        wanted.add(_EMA_FILE)
    if "optimizer" in parts:
        wanted |= {f"{_OPTIMIZER}.json", f"{_OPTIMIZER}.safetensors"}
    if "train" in parts:
        wanted |= {f"{_TRAIN_STATE}.json", f"{_TRAIN_STATE}.safetensors"}
    data: dict[str, bytes] = {}
    if verify:
        for fname, entry in manifest["files"].items():
            b = _check_file(path, fname, entry, keep_bytes=fname in wanted)
            if b is not None:
                data[fname] = b
    else:
        for fname in sorted(wanted & listed):
            if (path / fname).is_file():
                data[fname] = _read_bytes(path / fname)
    if _MODEL_FILE not in listed or ("model" in parts and _MODEL_FILE not in data):
        raise _corrupt(path, f"{_MODEL_FILE} is missing")
    step = manifest["step"] if manifest is not None else _step_of(path)
    if step is None:
        raise CheckpointError(f"cannot tell the step of checkpoint {path} (no {MANIFEST_NAME})")

    def tensors(fname):
        if fname not in data:
            return None
        return _to_device(_tensors_from_bytes(data.pop(fname), path / fname), map_location)

    def state(stem):
        js, st = f"{stem}.json", f"{stem}.safetensors"
        if js not in data and st not in data:
            return None
        if js not in data or st not in data:
            raise _corrupt(path, f"{js if js not in data else st} is missing")
        return _state_from_bytes(data.pop(js), data.pop(st), path / js, path / st)

    model_state = tensors(_MODEL_FILE) if "model" in parts else None
    return Checkpoint(step=step, path=path, model_state=model_state, ema_state=tensors(_EMA_FILE),
                      optimizer_state=state(_OPTIMIZER), train_state=state(_TRAIN_STATE))


def _load(target, verify: bool, map_location, parts=_PARTS_ALL) -> Checkpoint:
    kind, p = _classify(target)
    if kind == "checkpoint":
        ck = _load_dir(p, verify, map_location, parts)
        ck.run_dir = _run_of_checkpoint(p)
        ck.config = read_config(ck.run_dir) if ck.run_dir is not None else None
        return ck
    config = read_config(p)
    candidates = list_checkpoints(p)
    if not candidates:
        raise CheckpointError(f"{p} has no checkpoints yet ({p / CHECKPOINTS_DIR} holds none)")
    skipped: list[Path] = []
    reasons: list[str] = []
    for c in reversed(candidates):
        try:
            ck = _load_dir(c, verify, map_location, parts)
        except CheckpointError as e:
            skipped.append(c)
            reasons.append(str(e))
            continue
        ck.run_dir, ck.config, ck.skipped = p, config, skipped
        return ck
    raise CheckpointError(f"{p} has no intact checkpoint: " + "; ".join(reasons))


def load_checkpoint(path_or_run_dir, *, verify: bool = True, map_location="cpu") -> Checkpoint:
    """Load a checkpoint directory, or the newest intact checkpoint of a run directory.

    With ``verify`` every file is checked against the manifest (size, SHA-256) as it is read; for a run
    directory, corrupt newer checkpoints are passed over and listed in ``Checkpoint.skipped``. Only
    safetensors and JSON are read; nothing is unpickled.
    """
    return _load(path_or_run_dir, verify, map_location)


# ============================================================================ run directories


def read_json_object(path) -> dict:
    """A JSON file that must hold an object (duplicate keys refused); CheckpointError naming the file otherwise."""
    path = Path(path)
    obj = _read_json(path)
    if type(obj) is not dict:
        raise CheckpointError(f"{path} does not hold a JSON object")
    return obj


def run_dir_of(path) -> Path:
    """The run directory of ``path``: itself when it holds a config.json, else RUN for RUN/checkpoints/step_N."""
    p = Path(path)
    return p if (p / CONFIG_NAME).is_file() else p.parent.parent


def read_config(run_dir) -> dict:
    """The run's config.json as a dict; CheckpointError if it is missing or not valid JSON."""
    run_dir = _require_dir(run_dir)
    path = run_dir / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a ddpmkit run directory (no {CONFIG_NAME})")
    return read_json_object(path)


def write_config(run_dir, config: Mapping) -> Path:
    """Atomically write the run's config.json (sorted keys, indent 2)."""
    if not isinstance(config, Mapping):
        raise CheckpointError(f"the configuration must be a dict, got {type(config).__name__}")
    run_dir = _require_dir(run_dir)
    return atomic_write_json(run_dir / CONFIG_NAME, dict(config))


def _check_writable(directory: Path) -> None:
    probe = directory / f".ddpmkit-write-test-{secrets.token_hex(4)}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise CheckpointError(f"cannot write to run directory {directory}: {_reason(e)}") from e


def prepare_run_dir(run_dir, *, resume: bool) -> Path:
    """Get a run directory ready for training and return it.

    New run (``resume=False``): the directory must not exist or be empty; it is created (with parents)
    and checked to be writable. Nothing already there is touched. Resume: it must exist and be a run
    (have a valid config.json), and be writable.
    """
    run_dir = Path(run_dir)
    if resume:
        if not run_dir.exists():
            raise CheckpointError(f"cannot resume: {run_dir} does not exist")
        if not run_dir.is_dir():
            raise CheckpointError(f"cannot resume: {run_dir} is not a directory")
        if not (run_dir / CONFIG_NAME).is_file():
            raise CheckpointError(f"cannot resume: {run_dir} is not a ddpmkit run directory (no {CONFIG_NAME})")
        read_config(run_dir)
        _check_writable(run_dir)
        return run_dir
    if run_dir.exists() or run_dir.is_symlink():
        if not run_dir.is_dir():
            raise CheckpointError(f"{run_dir} already exists and is not a directory; choose another --out")
        try:
            with os.scandir(run_dir) as it:
                nonempty = any(True for _ in it)
        except OSError as e:
            raise CheckpointError(f"cannot read {run_dir}: {_reason(e)}") from e
        if nonempty:
            raise CheckpointError(f"{run_dir} already exists and is not empty; pass --resume to continue it "
                                  "or choose another --out")
    else:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CheckpointError(f"cannot create run directory {run_dir}: {_reason(e)}") from e
    _check_writable(run_dir)
    return run_dir


# ============================================================================ models and schedules


def _config_file(ck: Checkpoint) -> str:
    return str(ck.run_dir / CONFIG_NAME) if ck.run_dir is not None else "config.json"


def _strip_wrappers(state: Mapping[str, Any], expected: Mapping[str, Any]) -> Mapping[str, Any]:
    """Undo the key prefixes of DistributedDataParallel ("module.") and torch.compile ("_orig_mod.")."""
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in expected):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def check_state_matches(state: Mapping[str, Any], expected: Mapping[str, torch.Tensor], what: str) -> None:
    """CheckpointError naming the missing, unexpected and mis-shaped keys of ``state`` against ``expected``."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: {tuple(state[k].shape) if isinstance(state[k], torch.Tensor) else type(state[k]).__name__} "
        f"in the checkpoint, {tuple(v.shape)} in the model"
        for k, v in expected.items()
        if k in state and (not isinstance(state[k], torch.Tensor) or tuple(state[k].shape) != tuple(v.shape))
    ]
    problems = []

    def show(label, items):
        if items:
            more = f" and {len(items) - 5} more" if len(items) > 5 else ""
            problems.append(f"{label} {', '.join(items[:5])}{more}")

    show(f"{len(missing)} missing key(s):", missing)
    show(f"{len(unexpected)} unexpected key(s):", unexpected)
    show(f"{len(shapes)} shape mismatch(es):", shapes)
    if problems:
        raise CheckpointError(f"{what} do not match the model its config describes (a different "
                              f"architecture?): " + "; ".join(problems))


def load_model(run_dir_or_checkpoint, ema: bool = True, *, verify: bool = True):
    """The run's U-Net with its EMA weights (``ema=True``, falling back to the raw weights when no EMA
    was saved) or its raw weights, in eval mode on the CPU.

    The architecture comes from ``config.json["model"]`` of the run (a checkpoint's run directory is
    ``RUN`` in ``RUN/checkpoints/step_N``). Keys and shapes are checked strictly; a mismatch is a
    CheckpointError naming it.
    """
    ck = _load(run_dir_or_checkpoint, verify, "cpu", parts=("model", "ema"))
    if ck.config is None:
        raise CheckpointError(f"cannot build the model of checkpoint {ck.path}: its run directory "
                              f"({ck.path.parent.parent}) has no {CONFIG_NAME}")
    model_cfg = ck.config.get("model")
    if type(model_cfg) is not dict:
        raise CheckpointError(f"{_config_file(ck)} has no 'model' section")
    from .unet import UNet  # imported here: loading a state never needs the network code

    try:
        model = UNet.from_config(model_cfg)
    except (DdpmkitError, TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"the 'model' section of {_config_file(ck)} does not describe a valid U-Net: "
                              f"{e}") from e
    use_ema = ema and ck.ema_state is not None
    state = ck.ema_state if use_ema else ck.model_state
    what = f"the {'EMA' if use_ema else 'model'} weights of checkpoint {ck.path}"
    expected = model.state_dict()
    state = _strip_wrappers(state, expected)
    check_state_matches(state, expected, what)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{what} cannot be loaded into the model: {e}") from e
    return model.to("cpu").eval()


def load_schedule(run_dir_or_checkpoint):
    """The run's NoiseSchedule, from ``config.json["diffusion"]``: "schedule" (linear or cosine) and "T", or
    explicit "betas" (the schedule of an imported model that is neither)."""
    from .schedule import NoiseSchedule

    kind, p = _classify(run_dir_or_checkpoint)
    run_dir = p if kind == "run" else _run_of_checkpoint(p)
    if run_dir is None:
        raise CheckpointError(f"cannot find the configuration of checkpoint {p}: its run directory "
                              f"({p.parent.parent}) has no {CONFIG_NAME}")
    config = read_config(run_dir)
    diffusion = config.get("diffusion")
    cfg_path = run_dir / CONFIG_NAME
    if type(diffusion) is not dict or "schedule" not in diffusion or "T" not in diffusion:
        raise CheckpointError(f"{cfg_path} has no 'diffusion' section with 'schedule' and 'T'")
    try:
        if "betas" in diffusion:
            schedule = NoiseSchedule.from_betas(diffusion["betas"], kind=str(diffusion["schedule"]))
            if schedule.T != diffusion["T"]:
                raise ValueError(f"{schedule.T} betas for T={diffusion['T']}")
            return schedule
        return NoiseSchedule.from_name(diffusion["schedule"], diffusion["T"])
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{cfg_path}: bad diffusion settings: {e}") from e
