"""Format registry: detect a checkpoint's format and open a reader or writer for it.

Formats are listed as import strings, so a format's module (and any optional library it needs)
is imported only when that format is used. Detection looks at magic bytes and directory
structure first; the file suffix only breaks ties.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from weightbridge.errors import UnknownFormatError
from weightbridge.io.base import ByteRange, Reader, ShardWriter
from weightbridge.spec import TensorSpec

__all__ = ["ByteRange", "Reader", "ShardWriter", "detect_format", "open_reader", "writer_class"]

# name -> module path. Order matters: earlier entries are tried first when detecting.
FORMATS: dict[str, str] = {
    "sharded": "weightbridge.io.sharded",
    "safetensors": "weightbridge.io.safetensors",
    "numpy": "weightbridge.io.numpy",
    "hdf5": "weightbridge.io.hdf5",
    "torch": "weightbridge.io.torch",
    "tfcheckpoint": "weightbridge.io.tfcheckpoint",
    "msgpack": "weightbridge.io.msgpack",
    "tensorstore": "weightbridge.io.tensorstore",
}

# Output format names users type -> registry name.
OUTPUT_ALIASES = {
    "safetensors": "safetensors",
    "npz": "numpy",
    "numpy": "numpy",
    "h5": "hdf5",
    "hdf5": "hdf5",
    "torch": "torch",
    "pt": "torch",
    "bin": "torch",
    "msgpack": "msgpack",
    "flax": "msgpack",
    "zarr": "tensorstore",
    "zarr3": "tensorstore",
    "orbax": "tensorstore",
}

# How many bytes of a file detection looks at.
_HEAD_BYTES = 64


def _module(name: str) -> ModuleType:
    return importlib.import_module(FORMATS[name])


def detect_format(path: str | os.PathLike[str]) -> str:
    """Return the registry name of the format at `path`.

    Raises:
        UnknownFormatError: nothing recognises the path; the message lists the known formats.
    """
    path = os.fspath(path)
    if _is_url(path):
        return "tensorstore"
    if not os.path.exists(path) and not os.path.exists(path + ".index"):  # a bare TF prefix
        raise UnknownFormatError(f"{path}: no such file or directory")
    path = _single_file_in(path)
    head = b""
    if os.path.isfile(path):
        with open(path, "rb") as f:
            head = f.read(_HEAD_BYTES)
    matches: list[str] = []
    unavailable: list[str] = []
    for name in FORMATS:
        # Magic bytes decide alone when the file's suffix agrees: stop there, so opening a
        # safetensors file never imports h5py, tensorstore or the pickle machinery (~0.2 s).
        if matches and (
            matches[0] == "sharded" or path.endswith(tuple(_module(matches[0]).SUFFIXES))
        ):
            break
        try:
            module = _module(name)
        except ImportError as e:  # a format whose optional library is missing cannot match
            unavailable.append(f"{name} ({e})")
            continue
        if module.detect(path, head):
            matches.append(name)
    if len(matches) > 1:
        by_suffix = [m for m in matches if path.endswith(tuple(_module(m).SUFFIXES))]
        matches = by_suffix or matches
    if not matches:
        missing = {u.split(" ")[0] for u in unavailable}
        known = ", ".join(n for n in FORMATS if n not in missing)
        extra = f"; unavailable here: {', '.join(unavailable)}" if unavailable else ""
        raise UnknownFormatError(
            f"{path}: not a checkpoint format weightbridge knows (looked at its first bytes and "
            f"its layout); known formats: {known}{extra}"
        )
    return matches[0]


def _is_url(path: str) -> bool:
    """Object-store and in-memory locations go to tensorstore (``file://`` is a local path)."""
    return "://" in path and not path.startswith("file://")


def _single_file_in(path: str) -> str:
    """A directory holding one checkpoint file and no index stands for that file."""
    if not os.path.isdir(path) or any(e.endswith(".index.json") for e in os.listdir(path)):
        return path
    files = [
        e
        for e in sorted(os.listdir(path))
        if not e.startswith(".") and os.path.isfile(os.path.join(path, e))
    ]
    return os.path.join(path, files[0]) if len(files) == 1 else path


def open_reader(path: str | os.PathLike[str], format: str | None = None) -> Any:
    """Open a checkpoint for reading; detects the format unless `format` is given.

    `path` may be a file, a directory with an index, or a directory holding one checkpoint file.
    """
    path = os.fspath(path)
    if not _is_url(path):
        path = _single_file_in(path)
    name = format or detect_format(path)
    return _module(name).open_reader(path)


def writer_class(format: str) -> type[ShardWriter]:
    """The `ShardWriter` class of an output format (`safetensors`, `npz`, `h5`)."""
    name = OUTPUT_ALIASES.get(format)
    if name is None:
        raise UnknownFormatError(
            f"unknown output format {format!r}; choose one of {sorted(set(OUTPUT_ALIASES))}"
        )
    cls: type[ShardWriter] = _module(name).Writer
    return cls


def write_checkpoint(
    path: str,
    tensors: dict[str, Any],
    format: str | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write small in-memory arrays as one checkpoint file (tests, demos, `adapt`)."""
    import numpy as np

    from weightbridge import dtypes

    fmt = format or _suffix_format(path)
    arrays = {k: np.asarray(v) for k, v in tensors.items()}
    specs: Sequence[TensorSpec] = [
        TensorSpec(k, a.shape, dtypes.from_numpy(a.dtype)) for k, a in arrays.items()
    ]
    w = writer_class(fmt)(path, specs, metadata)
    try:
        for k, a in arrays.items():
            w.write(k, a, 0)
        w.close()
    except BaseException:
        w.abort()
        raise


def _suffix_format(path: str) -> str:
    for alias in ("safetensors", "npz", "h5", "msgpack"):
        if path.endswith("." + alias):
            return alias
    if path.endswith((".bin", ".pt", ".pth", ".ckpt")):
        return "torch"
    raise UnknownFormatError(f"{path}: cannot tell the format from the suffix; pass format=")
