"""Format registry: detect a checkpoint's format and open a reader or writer for it.

`FORMATS` is the one table of formats: each row names a format module by import string, so a
format's module (and any optional library it needs) is imported only when that format is used.
A format module meets `weightbridge.io.base.FormatModule` (plus a `Writer` class if it can
write); adding a format is that module plus one `register_format` call (or one row here).
Detection looks at magic bytes and directory structure first; the file suffix only breaks ties.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast

from weightbridge._files import is_remote_url
from weightbridge.errors import UnknownFormatError
from weightbridge.io._obstore import is_object_url
from weightbridge.io._remote import remote_options
from weightbridge.io.base import (
    ByteRange,
    FormatModule,
    PlacingWriter,
    Reader,
    ShardWriter,
    WritableFormatModule,
)
from weightbridge.spec import TensorSpec

__all__ = [
    "ByteRange",
    "FormatEntry",
    "FormatModule",
    "PlacingWriter",
    "Reader",
    "ShardWriter",
    "WritableFormatModule",
    "detect_format",
    "open_reader",
    "register_format",
    "remote_options",
    "weights_path",
    "write_checkpoint",
    "writer_class",
]


@dataclass(frozen=True, slots=True)
class FormatEntry:
    """One row of the format registry.

    Attributes:
        name: the registry name (`detect_format` returns it; `open_reader(format=)` takes it).
        module: the format module, or its import string, imported on first use (a leading
            dot means inside `weightbridge.io`).
        output_names: the names users type to write this format (``--format npz``); empty for
            a format that is only read.
        write_suffixes: file suffixes that choose this format when writing to a path
            (`write_checkpoint`). Detection uses the module's own `SUFFIXES`.
        install_hint: what to install when the module cannot be imported.
    """

    name: str
    module: str | ModuleType
    output_names: tuple[str, ...] = ()
    write_suffixes: tuple[str, ...] = ()
    install_hint: str = ""


# The registry. Order matters: earlier rows are tried first when detecting. Columns: name,
# module ("." = inside weightbridge.io), output names, write suffixes, install hint.
FORMATS: dict[str, FormatEntry] = {
    row.name: row
    for row in (
        FormatEntry("sharded", ".sharded"),
        FormatEntry("safetensors", ".safetensors", ("safetensors",), (".safetensors",)),
        FormatEntry("numpy", ".numpy", ("npz", "numpy"), (".npz",)),
        FormatEntry("hdf5", ".hdf5", ("h5", "hdf5"), (".h5",), "pip install h5py"),
        FormatEntry("megatron", ".megatron"),  # before dcp: a torch_dist dir is DCP too
        FormatEntry("dcp", ".dcp"),
        FormatEntry("zero", ".zero"),
        FormatEntry("torch", ".torch", ("torch", "pt", "bin"), (".bin", ".pt", ".pth", ".ckpt")),
        FormatEntry("tfcheckpoint", ".tfcheckpoint"),
        FormatEntry("msgpack", ".msgpack", ("msgpack", "flax"), (".msgpack",)),
        FormatEntry("gguf", ".gguf", ("gguf",), (".gguf",)),
        FormatEntry(
            "tensorstore", ".zarr", ("zarr", "zarr3", "orbax"), (), "pip install tensorstore"
        ),
    )
}

if TYPE_CHECKING:  # mypy proves each built-in format module meets the contract it is typed as
    from weightbridge.io import (
        dcp,
        gguf,
        hdf5,
        megatron,
        msgpack,
        numpy,
        safetensors,
        sharded,
        tfcheckpoint,
        torch,
        zero,
    )

    _WRITABLE: tuple[WritableFormatModule, ...] = (safetensors, numpy, hdf5, torch, msgpack, gguf)
    _READ_ONLY: tuple[FormatModule, ...] = (sharded, tfcheckpoint, megatron, dcp, zero)

# Members every format module has (`FormatModule`); checked when a module is first loaded.
_REQUIRED = ("NAME", "SUFFIXES", "detect", "open_reader")

_log = logging.getLogger(__name__)

# How many bytes of a file detection looks at.
_HEAD_BYTES = 64


def register_format(
    name: str,
    module: str | ModuleType,
    *,
    output_names: Sequence[str] = (),
    write_suffixes: Sequence[str] = (),
    install_hint: str = "",
) -> None:
    """Add a format to the registry (or replace the row of that name).

    Args:
        name: the registry name.
        module: the format module (a `FormatModule`; with a `Writer` class if `output_names`
            are given), or its import string so it is imported only when used.
        output_names: names that select this format for writing (``format="raw"``).
        write_suffixes: file suffixes that select it when writing to a path.
        install_hint: shown when the module cannot be imported (``pip install ...``).

    Raises:
        TypeError: `module` is a module that lacks a member of `FormatModule`, or a `Writer`
            while `output_names` are given.
        ValueError: an output name already selects another format.

    Example:
        >>> register_format("numpy-again", "weightbridge.io.numpy")
        >>> FORMATS["numpy-again"].module
        'weightbridge.io.numpy'
        >>> del FORMATS["numpy-again"]
    """
    entry = FormatEntry(name, module, tuple(output_names), tuple(write_suffixes), install_hint)
    if isinstance(module, ModuleType):
        _check_module(entry, module)
    taken = _output_names()
    for alias in entry.output_names:
        if taken.get(alias, name) != name:
            raise ValueError(f"output name {alias!r} already selects the {taken[alias]} format")
    FORMATS[name] = entry


def _check_module(entry: FormatEntry, module: ModuleType) -> None:
    needed = _REQUIRED + (("Writer",) if entry.output_names else ())
    missing = [m for m in needed if not hasattr(module, m)]
    if missing:
        raise TypeError(
            f"format {entry.name!r}: module {module.__name__} lacks {missing}; a format module "
            "defines NAME, SUFFIXES, detect(path, head), open_reader(path) and, to be written, "
            "a Writer class (see weightbridge.io.base.FormatModule)"
        )


def _module(name: str) -> FormatModule:
    """The module of registered format `name`, imported now if need be.

    Raises:
        ImportError: the module (or a library it needs) is not installed; says what to install.
    """
    entry = FORMATS[name]
    module = entry.module
    if isinstance(module, str):
        try:
            module = importlib.import_module(module, __name__)
        except ImportError as e:
            if not entry.install_hint:
                raise
            raise ImportError(f"{e}; to read or write {name}: {entry.install_hint}") from e
        _check_module(entry, module)
    return cast(FormatModule, module)


def _output_names() -> dict[str, str]:
    """Output format names users type -> registry name."""
    return {alias: row.name for row in FORMATS.values() for alias in row.output_names}


def detect_format(path: str | os.PathLike[str]) -> str:
    """Return the registry name of the format at `path`.

    Raises:
        UnknownFormatError: nothing recognises the path; the message lists the known formats.
    """
    path = os.fspath(path)
    remote_dir = False
    if is_object_url(path):  # s3://, gs://, https://: read in place by ranged reads
        path = weights_path(path)
        head, remote_dir = _remote_head(path)
    elif is_remote_url(path):  # memory://: tensorstore
        return "tensorstore"
    else:
        if not os.path.exists(path) and not os.path.exists(path + ".index"):  # a bare TF prefix
            raise UnknownFormatError(f"{path}: no such file or directory")
        path = weights_path(path)
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
    if not matches and remote_dir:  # zarr arrays, orbax checkpoints: tensorstore reads them
        return "tensorstore"
    if not matches and os.path.isdir(path):
        raise UnknownFormatError(_unknown_directory(path, unavailable))
    if not matches:
        missing = {u.split(" ")[0] for u in unavailable}
        known = ", ".join(n for n in FORMATS if n not in missing)
        extra = f"; unavailable here: {', '.join(unavailable)}" if unavailable else ""
        raise UnknownFormatError(
            f"{path}: not a checkpoint format weightbridge knows (looked at its first bytes and "
            f"its layout); known formats: {known}{extra}"
        )
    return matches[0]


def _remote_head(url: str) -> tuple[bytes, bool]:
    """(first bytes, is a directory) of an object URL, for detection.

    Raises:
        UnknownFormatError: nothing there, neither an object nor objects under it as a prefix.
    """
    from weightbridge.io import _remote

    kind = _remote.probe(url)
    if kind is None:
        raise UnknownFormatError(
            f"{url}: no such object, and no objects under it as a prefix (endpoint: "
            f"{_remote.current_options().endpoint or 'from the environment'})"
        )
    if kind == "dir":
        return b"", True
    return _remote.head_bytes(url, _HEAD_BYTES), False


def weights_path(path: str) -> str:
    """The file a directory stands for, or `path` itself.

    A Hugging Face folder stands for its preferred weight file (`hf_folder.choose_weights`;
    the choice is logged when the folder holds anything else), and a directory holding one
    checkpoint file and no index for that file; anything else (an index directory, zarr,
    orbax, TensorFlow, DCP) is left to detection. An object-store prefix (``s3://b/ckpt/``)
    is a directory too.
    """
    if is_object_url(path):
        return _remote_weights_path(path)
    if is_remote_url(path) or not os.path.isdir(path):
        return path
    chosen = _chosen_weights(path)
    if chosen is not None:
        return chosen
    if any(e.endswith(".index.json") for e in os.listdir(path)):
        return path
    files = _visible_files(path)
    return os.path.join(path, files[0]) if len(files) == 1 else path


def _chosen_weights(folder: str) -> str | None:
    """The weights file of a Hugging Face folder (local or a prefix), the choice logged when the
    folder holds other weights or files too; None if it is not such a folder."""
    from weightbridge.io.hf_folder import choose_weights

    choice = choose_weights(folder)
    if choice is None:
        return None
    if choice.others or choice.extra:
        _log.info("%s", choice.describe())
    return choice.path


def _remote_weights_path(url: str) -> str:
    """`weights_path` for an object URL: a prefix is listed (one request) like a directory."""
    from weightbridge.io import _remote

    if _remote.probe(url) != "dir":
        return url
    chosen = _chosen_weights(url)
    if chosen is not None:
        return chosen
    from weightbridge.io.zarr import _MARKERS, ORBAX_CHECKPOINT_METADATA

    listing = _remote.list_directory(url)
    markers = {*_MARKERS, ORBAX_CHECKPOINT_METADATA}  # zarr/orbax: tensorstore reads the prefix
    if any(e.endswith(".index.json") or e in markers for e in listing.files):
        return url
    files = [e for e in listing.files if not e.startswith(".")]
    return _remote.join(url, files[0]) if len(files) == 1 and not listing.dirs else url


def _visible_files(path: str) -> list[str]:
    return [
        e
        for e in sorted(os.listdir(path))
        if not e.startswith(".") and os.path.isfile(os.path.join(path, e))
    ]


def _unknown_directory(path: str, unavailable: list[str]) -> str:
    """The refusal for a directory nothing recognises: what was looked for, what was found."""
    from weightbridge.io.hf_folder import WEIGHT_FILES

    files = _visible_files(path)
    found = ", ".join(files[:8]) + (f", ... ({len(files)} files)" if len(files) > 8 else "")
    extra = f"; unavailable here: {', '.join(unavailable)}" if unavailable else ""
    return (
        f"{path}: a directory with no checkpoint weightbridge recognises: looked for Hugging Face "
        f"weights ({', '.join(WEIGHT_FILES)}), an *.index.json, a single checkpoint file, and "
        f"zarr/orbax, TensorFlow, DCP and DeepSpeed ZeRO layouts; found {found or 'no files'}. "
        f"Point at the weights file itself{extra}"
    )


def open_reader(path: str | os.PathLike[str], format: str | None = None) -> Reader:
    """Open a checkpoint for reading; detects the format unless `format` is given.

    `path` may be a file, a directory with an index, a Hugging Face model folder (see
    `weights_path`), or a directory holding one checkpoint file.
    """
    path = weights_path(os.fspath(path))
    name = format or detect_format(path)
    if name == "tensorstore" and is_remote_url(path):
        from weightbridge.io._remote import current_options

        options = current_options()  # the endpoint of `remote_options`, as for byte formats
        given = {"endpoint": options.endpoint, "aws_region": options.aws_region}
        opener = cast(Callable[..., Reader], _module(name).open_reader)  # takes **options
        return opener(path, **{k: v for k, v in given.items() if v is not None})
    return _module(name).open_reader(path)


def writer_class(format: str) -> type[ShardWriter]:
    """The `ShardWriter` class of an output format (`safetensors`, `npz`, `h5`)."""
    names = _output_names()
    name = names.get(format)
    if name is None:
        raise UnknownFormatError(f"unknown output format {format!r}; choose one of {sorted(names)}")
    return cast(WritableFormatModule, _module(name)).Writer


def stored_nbytes_of(
    format: str, metadata: Mapping[str, str] | None
) -> Callable[[TensorSpec], int] | None:
    """The bytes the writer of `format` stores for each tensor, for shard assignment, when they
    are not its spec's (a writer class's optional ``stored_sizes(metadata)``: GGUF's
    quantization); None when they are."""
    sizes = getattr(writer_class(format), "stored_sizes", None)
    if sizes is None:
        return None
    found: Callable[[TensorSpec], int] | None = sizes(metadata)
    return found


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
    writer_cls = writer_class(fmt)
    arrays = {k: np.asarray(v) for k, v in tensors.items()}
    specs: Sequence[TensorSpec] = [
        TensorSpec(k, a.shape, dtypes.from_numpy(a.dtype)) for k, a in arrays.items()
    ]
    w = writer_cls(path, specs, metadata)
    try:
        for k, a in arrays.items():
            w.write(k, a, 0)
        w.close()
    except BaseException:
        w.abort()
        raise


def _suffix_format(path: str) -> str:
    """The output name of the format whose write suffixes `path` ends with."""
    for row in FORMATS.values():
        if row.output_names and path.endswith(row.write_suffixes):
            return row.output_names[0]
    raise UnknownFormatError(f"{path}: cannot tell the format from the suffix; pass format=")
