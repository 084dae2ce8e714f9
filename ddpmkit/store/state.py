"""Tensors and nested states on disk, never pickled.

Flat tensor dicts are stored as safetensors. A nested state (an optimizer state_dict, RNG states, the data
order...) is stored as two files: ``NAME.safetensors`` holds every tensor and numpy array, ``NAME.json`` the
structure, with tensors as references. Every write is atomic (``ddpmkit.files``); every failure is a
one-line CheckpointError naming the file.
"""

from __future__ import annotations

import base64
import math
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as _safetensors_load
from safetensors.torch import save as _safetensors_save

from ..errors import CheckpointError
from ..files import atomic_write_bytes, json_text, parse_json, read_bytes

__all__ = [
    "STATE_FORMAT",
    "STATE_VERSION",
    "atomic_save_safetensors",
    "load_safetensors",
    "save_state",
    "load_state",
    "safetensors_bytes",
    "tensors_from_bytes",
    "state_payload",
    "state_from_bytes",
    "to_device",
]

STATE_FORMAT = "ddpmkit-state"
STATE_VERSION = 1


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


def safetensors_bytes(tensors: Mapping, what: str, metadata: Mapping | None = None) -> bytes:
    prepared = _prepare_tensors(tensors, what)
    if metadata is not None:
        if not all(type(k) is str and type(v) is str for k, v in metadata.items()):
            raise CheckpointError(f"cannot save {what}: safetensors metadata must map strings to strings")
        metadata = dict(metadata)
    try:
        return _safetensors_save(prepared, metadata=metadata)
    except Exception as e:  # safetensors raises plain exceptions for unsupported dtypes and the like
        raise CheckpointError(f"cannot save {what} as safetensors: {e}") from e


def tensors_from_bytes(data: bytes, path: Path) -> dict[str, torch.Tensor]:
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
    return atomic_write_bytes(path, safetensors_bytes(tensors, str(path), metadata), error=CheckpointError)


def load_safetensors(path, map_location="cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file (never a pickle); any damage is a CheckpointError naming the file."""
    path = Path(path)
    tensors = tensors_from_bytes(read_bytes(path, error=CheckpointError), path)
    return to_device(tensors, map_location)


def to_device(tensors: dict[str, torch.Tensor], map_location) -> dict[str, torch.Tensor]:
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


def state_payload(tree, name: str, what: str) -> tuple[bytes, bytes]:
    """(NAME.safetensors bytes, NAME.json bytes) for a nested state."""
    enc = _StateEncoder(what)
    node = enc.encode(tree)
    st = safetensors_bytes(enc.tensors, what, {"format": STATE_FORMAT})
    doc = {"format": STATE_FORMAT, "version": STATE_VERSION, "tensors": f"{name}.safetensors", "tree": node}
    # Not sorted: dict order is part of the state and is kept as written.
    text = json_text(doc, Path(f"{name}.json"), sort_keys=False, indent=1, error=CheckpointError)
    return st, text.encode("utf-8")


def state_from_bytes(json_bytes: bytes, st_bytes: bytes, json_path: Path, st_path: Path, map_location=None):
    doc = parse_json(json_bytes, json_path, error=CheckpointError)
    if type(doc) is not dict or doc.get("format") != STATE_FORMAT or "tree" not in doc:
        raise CheckpointError(f"{json_path} is not a ddpmkit state file")
    version = doc.get("version")
    if type(version) is not int or version > STATE_VERSION:
        raise CheckpointError(f"{json_path} has state format version {version!r}, which this ddpmkit cannot "
                              "read (upgrade ddpmkit)")
    tensors = to_device(tensors_from_bytes(st_bytes, st_path), map_location)
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
    st, js = state_payload(tree, name, f"state {name!r}")
    st_path = atomic_write_bytes(directory / f"{name}.safetensors", st, error=CheckpointError)
    js_path = atomic_write_bytes(directory / f"{name}.json", js, error=CheckpointError)
    return st_path, js_path


def load_state(directory, name: str, map_location=None):
    """Load what ``save_state`` wrote: the same types (dict key types, tuples vs lists) and bit-exact tensors.

    Tensors come back on the CPU unless ``map_location`` names a device. Nothing is unpickled.
    """
    name = _check_name(name)
    directory = Path(directory)
    js_path, st_path = directory / f"{name}.json", directory / f"{name}.safetensors"
    js, st = read_bytes(js_path, error=CheckpointError), read_bytes(st_path, error=CheckpointError)
    return state_from_bytes(js, st, js_path, st_path, map_location)
