"""PyTorch checkpoints (`torch.save` zip and legacy files): read and write without importing torch.

A `torch.save` file is a pickle of containers holding tensors, whose storages (the raw element
buffers) live outside the pickle: the pickle names each storage by a *persistent id*
``('storage', <storage type>, key, location, numel)`` and rebuilds each tensor by calling
``torch._utils._rebuild_tensor_v2(storage, offset, shape, stride, ...)``.

- **Zip format** (torch >= 1.6): ``<prefix>/data.pkl`` is the pickle, ``<prefix>/data/<key>``
  holds each storage's bytes (stored uncompressed, 64-byte aligned), ``<prefix>/byteorder`` says
  ``little`` or ``big`` (absent means little).
- **Legacy format** (``_use_new_zipfile_serialization=False``): five pickles one after another
  (magic number, protocol version, sys info, the main pickle, the list of storage keys), then for
  each key an 8-byte little-endian element count followed by the storage's bytes.

This module never imports torch. Unpickling runs code by design, so it never uses the standard
unpickler on these files either:
`_SafeUnpickler` resolves only the few globals a tensor checkpoint needs, each to a small
metadata builder of ours, and refuses every other global before anything runs. The result is a
spec per tensor (name, shape, dtype) plus where its elements sit (storage, offset, strides);
`read` maps the storage zero-copy and lays the strides over it with numpy.

The writer emits the zip format that ``torch.load(path, weights_only=True)`` accepts, writing the
pickle by hand (so torch need not be imported), then one aligned, uncompressed entry per tensor
as its tiles arrive. torch is the oracle in the tests.

This module does not read TorchScript archives (``torch.jit.save``), tensor subclasses other than
`Parameter`, quantized or sparse tensors, or the tar format of PyTorch before 0.4; each is refused
with a message that says so.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import pickletools
import reprlib
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

from weightbridge import dtypes
from weightbridge.errors import DtypeError, FormatError, SpecError
from weightbridge.io.base import (
    ZIP_LOCAL_HEADER_SIZE,
    ZIP_MAGIC,
    BaseReader,
    ByteRange,
    MappedFile,
    check_safe_relative,
    zip_first_member_name,
    zip_member_data_start,
)
from weightbridge.spec import MAX_NBYTES, CheckpointSpec, TensorSpec

NAME = "torch"
SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

# torch's legacy files start with this number pickled; pickled with protocol >= 2 it is the
# LONG1 opcode, a length byte of 10 and the 10 little-endian bytes of the number.
_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_MAGIC_BYTES = b"\x8a\x0a" + _LEGACY_MAGIC_NUMBER.to_bytes(10, "little")
# The only protocol version torch has ever written in legacy files.
_LEGACY_PROTOCOL_VERSION = 1001
# torch aligns every storage entry's data to 64 bytes (cache lines, and what its mmap loading
# assumes); we do the same when writing.
_ALIGN = 64
# Extra-field id torch uses for its alignment padding ("FB"); any id would do, readers skip it.
_PAD_EXTRA_ID = 0x4246
# A state dict's pickle is about 100 bytes per tensor (a few MB for the largest models); a
# data.pkl over 256 MB is corrupt or hostile, and refusing it bounds what a deflated entry (a
# zip bomb) can make us allocate.
_MAX_PICKLE_BYTES = 256 << 20
# Containers nested deeper than this are not a state dict; stop before Python's recursion limit.
_MAX_DEPTH = 200
# A pickle can refer to one container many times (memo references). A checkpoint all but never
# names a container of tensors twice; a hostile one nests references so that each level doubles
# the walk (a "billion laughs"). Tensor-holding containers and tensors reached again through
# such references are walked again (giving a tensor two names) at most this many times in all.
_MAX_REVISITS = 100_000
# Tensor names in real checkpoints run to a few hundred characters; a longer one is a key built
# to make every name under it expensive to form.
_MAX_NAME_CHARS = 4096
# DEFLATE cannot expand data more than 1032-fold (a 258-byte match coded in about two bits): a
# deflated entry claiming more than that of its compressed size lies, and is refused before
# anything is allocated for it. Other zip methods (bzip2, LZMA) have no such bound; torch never
# compresses, so they are refused by name.
_MAX_DEFLATE_RATIO = 1032
# Non-tensor leaves (epoch counters, learning rates, names) kept as metadata strings: enough to
# show what a training checkpoint carries without copying an optimizer's worth of numbers.
_MAX_METADATA_ENTRIES = 64
_MAX_METADATA_CHARS = 200
# When the top-level dict holds exactly one dict of tensors under one of these keys, its tensors
# are the model: `{"state_dict": {...}, "epoch": 3}` reads as the inner names.
WRAPPER_KEYS = ("state_dict", "model", "module", "model_state_dict", "params")

# Legacy typed storage classes and the dtype of their elements (None: torch has the class but
# weightbridge has no numpy dtype for it; refused when a tensor uses it).
_STORAGE_DTYPES: dict[str, str | None] = {
    "FloatStorage": "F32",
    "DoubleStorage": "F64",
    "HalfStorage": "F16",
    "BFloat16Storage": "BF16",
    "LongStorage": "I64",
    "IntStorage": "I32",
    "ShortStorage": "I16",
    "CharStorage": "I8",
    "ByteStorage": "U8",
    "BoolStorage": "BOOL",
    "ComplexFloatStorage": "C64",
    "ComplexDoubleStorage": None,
    "QInt8Storage": None,
    "QUInt8Storage": None,
    "QInt32Storage": None,
    "QUInt4x2Storage": None,
    "QUInt2x4Storage": None,
}
# `torch.<dtype>` globals (the dtype argument of `_rebuild_tensor_v3`) and their codes.
_TORCH_DTYPES: dict[str, str | None] = {
    "float32": "F32",
    "float": "F32",
    "float64": "F64",
    "double": "F64",
    "float16": "F16",
    "half": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "long": "I64",
    "int32": "I32",
    "int": "I32",
    "int16": "I16",
    "short": "I16",
    "int8": "I8",
    "uint8": "U8",
    "uint16": "U16",
    "uint32": "U32",
    "uint64": "U64",
    "bool": "BOOL",
    "complex64": "C64",
    "cfloat": "C64",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "complex128": None,
    "cdouble": None,
    "complex32": None,
    "chalf": None,
    "float8_e4m3fnuz": None,
    "float8_e5m2fnuz": None,
    "float8_e8m0fnu": None,
    "float4_e2m1fn_x2": None,
}
# code -> storage class name for the writer (dtypes without a typed storage class are written
# as an untyped storage plus `_rebuild_tensor_v3`, as torch itself does).
_STORAGE_FOR_CODE = {code: name for name, code in _STORAGE_DTYPES.items() if code is not None}
_TORCH_DTYPE_FOR_CODE = {
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


def detect(path: str, head: bytes) -> bool:
    """True for a `torch.save` zip (an entry ``<prefix>/data.pkl``) or a legacy torch pickle."""
    if head.startswith(ZIP_MAGIC):
        return _zip_is_torch(path, head)
    # PROTO opcode, then (for protocol 4 and up) a 9-byte FRAME, then the magic number.
    return head[:1] == b"\x80" and _LEGACY_MAGIC_BYTES in head[:32]


def _zip_is_torch(path: str, head: bytes) -> bool:
    first = zip_first_member_name(path, head)
    if not first:
        return False
    if first == b"data.pkl" or first.endswith(b"/data.pkl"):
        return True
    if first.endswith(b".npy") or not path.endswith(SUFFIXES):
        return False  # .npz archives, or zips no suffix of ours vouches for
    # Writers other than torch may put entries in another order: look at the whole directory.
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n == "data.pkl" or n.endswith("/data.pkl") for n in zf.namelist())
    except (OSError, zipfile.BadZipFile, ValueError, EOFError, NotImplementedError):
        return False


# Opcodes that store into the unpickler's memo at an index of the pickle's choosing.
_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})

# --------------------------------------------------------------------------------------------
# What unpickling produces: metadata only.


def _refuse_state(self: Any, state: Any) -> None:
    """`__setstate__` of every object the unpickler hands a pickle.

    The BUILD opcode sets the state of whatever object is on the stack. Frozen slotted
    dataclasses get a `__setstate__` that ignores `frozen`, so BUILD on one of the shared objects
    in `_ALLOWED` (``torch.FloatStorage``) would change how every later file in this process is
    read; on a storage or tensor reference, it would change it after it was checked.
    """
    raise _BadPickle(f"the pickle sets the state of {_brief(self)}; no checkpoint does that")


@dataclass(frozen=True, slots=True)
class _StorageType:
    """Stands for a `torch.*Storage` class named in a pickle; `code` is its element dtype."""

    name: str
    code: str | None

    __setstate__ = _refuse_state


@dataclass(frozen=True, slots=True)
class _DType:
    """Stands for a `torch.<dtype>` global."""

    name: str
    code: str | None

    __setstate__ = _refuse_state


@dataclass(frozen=True, slots=True)
class _StorageRef:
    """A storage as the pickle names it: `numel` elements of `code` from `key`'s bytes.

    `byte_offset` is nonzero only for the storage views of very old legacy files.
    """

    key: str
    type_name: str
    code: str | None
    numel: int
    byte_offset: int = 0

    __setstate__ = _refuse_state

    @property
    def nbytes(self) -> int:
        return self.numel * (dtypes.itemsize(self.code) if self.code else 1)


@dataclass(frozen=True, slots=True)
class _TensorRef:
    """A tensor as the pickle rebuilds it: strides and offset in elements of its own dtype."""

    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    code: str | None
    dtype_name: str

    __setstate__ = _refuse_state


class _ReadOnlyClass(type):
    """Metaclass of `_Inert`: the class is shared by every file, so a pickle may not set its
    attributes (BUILD with a slot state calls `setattr` on the class itself)."""

    def __setattr__(cls, name: str, value: Any) -> None:
        raise AttributeError(f"{cls.__name__} is read-only")

    def __delattr__(cls, name: str) -> None:
        raise AttributeError(f"{cls.__name__} is read-only")


class _Inert(metaclass=_ReadOnlyClass):
    """A harmless non-tensor object (an `argparse.Namespace`, a numpy scalar) we skip.

    It accepts the construction, state and items pickle gives it and keeps none of them.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


@dataclass(frozen=True, slots=True)
class _TensorType:
    """Stands for `torch.Tensor` / `torch.nn.Parameter` as the `new_type` of a rebuild."""

    name: str

    __setstate__ = _refuse_state


class _Global:
    """An allowed function as a pickle sees it: callable, and without attributes to set.

    BUILD on a plain function would set attributes such as ``__defaults__`` on our module's own
    functions, changing how every later file in this process is read.
    """

    __slots__ = ("fn",)
    fn: Callable[..., Any]

    def __init__(self, fn: Callable[..., Any]) -> None:
        object.__setattr__(self, "fn", fn)

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{self.fn.__name__} is read-only")

    def __repr__(self) -> str:
        return f"<{self.fn.__name__}>"


def _brief(obj: Any) -> str:
    """A short repr for messages: a hostile pickle's objects can be deep, huge or unprintable."""
    try:
        return reprlib.repr(obj)
    except (ValueError, RecursionError):  # an int too long to print, a self-nesting object
        return f"<{type(obj).__name__}>"


def _int(value: Any, what: str) -> int:
    # torch keeps sizes, strides and offsets in int64; larger values come from no torch.save.
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_NBYTES:
        raise _BadPickle(f"{what} must be a non-negative 64-bit integer, found {_brief(value)}")
    return value


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)):
        raise _BadPickle(f"{what} must be a tuple of integers, found {_brief(value)}")
    return tuple(_int(v, what) for v in value)


class _BadPickle(Exception):
    """Raised inside unpickling; `_load_pickle` turns it into a FormatError naming the file."""


def _tensor(storage: Any, offset: Any, size: Any, stride: Any, dtype: _DType | None) -> _TensorRef:
    if not isinstance(storage, _StorageRef):
        raise _BadPickle(
            f"a tensor's storage must be a persistent storage id, found {_brief(storage)}"
        )
    shape, strides = _ints(size, "a tensor's shape"), _ints(stride, "a tensor's strides")
    if len(shape) != len(strides):
        raise _BadPickle(f"tensor shape {shape} and strides {strides} differ in length")
    if dtype is None:
        code, name = storage.code, storage.type_name
    elif isinstance(dtype, _DType):
        code, name = dtype.code, f"torch.{dtype.name}"
    else:
        raise _BadPickle(f"a tensor's dtype must be a torch dtype, found {_brief(dtype)}")
    return _TensorRef(
        storage, _int(offset, "a tensor's storage offset"), shape, strides, code, name
    )


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> _TensorRef:
    # v1 takes (storage, offset, size, stride); v2 adds requires_grad, backward_hooks, metadata.
    return _tensor(storage, offset, size, stride, None)


def _rebuild_tensor_v3(
    storage: Any,
    offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    backward_hooks: Any,
    dtype: Any,
    metadata: Any = None,
) -> _TensorRef:
    return _tensor(storage, offset, size, stride, dtype)


def _rebuild_parameter(data: Any, *_: Any) -> _TensorRef:
    # A Parameter is its tensor plus requires_grad/hooks/state, none of which a checkpoint needs.
    if not isinstance(data, _TensorRef):
        raise _BadPickle(f"a Parameter must wrap a tensor, found {_brief(data)}")
    return data


_REBUILDERS: tuple[Callable[..., _TensorRef], ...] = (
    _rebuild_tensor,
    _rebuild_tensor_v3,
    _rebuild_parameter,
)


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> _TensorRef:
    # torch wraps a tensor that carries Python attributes in this call; only plain tensors and
    # Parameters are data, other subclasses would need their code.
    fn = func.fn if isinstance(func, _Global) else None
    if fn not in _REBUILDERS or not isinstance(new_type, _TensorType):
        raise _BadPickle(
            f"tensor subclass rebuild with {_brief(func)} and type {_brief(new_type)} is not "
            "supported; only torch.Tensor and torch.nn.Parameter are"
        )
    if not isinstance(args, tuple):
        raise _BadPickle(f"tensor rebuild arguments must be a tuple, found {_brief(args)}")
    out: _TensorRef = func(*args)
    return out


def _torch_size(dims: Any = ()) -> tuple[int, ...]:
    return _ints(dims, "a torch.Size")


def _encode(text: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    # Protocol 2 pickles `bytes` as `_codecs.encode(str, "latin1")`; other codecs (zlib, bz2)
    # could expand data, and no checkpoint needs them.
    if not isinstance(text, str) or encoding.lower().replace("-", "") not in ("latin1", "utf8"):
        raise _BadPickle(
            f"_codecs.encode is allowed only for latin1 text, found {_brief(encoding)}"
        )
    return text.encode(encoding, errors)


def _allowed_globals() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {
        ("torch._utils", "_rebuild_tensor"): _Global(_rebuild_tensor),
        ("torch._utils", "_rebuild_tensor_v2"): _Global(_rebuild_tensor),
        ("torch._utils", "_rebuild_tensor_v3"): _Global(_rebuild_tensor_v3),
        ("torch._utils", "_rebuild_parameter"): _Global(_rebuild_parameter),
        ("torch._utils", "_rebuild_parameter_with_state"): _Global(_rebuild_parameter),
        ("torch._tensor", "_rebuild_from_type_v2"): _Global(_rebuild_from_type_v2),
        ("torch", "Tensor"): _TensorType("torch.Tensor"),
        ("torch._tensor", "Tensor"): _TensorType("torch.Tensor"),
        ("torch.nn.parameter", "Parameter"): _TensorType("torch.nn.Parameter"),
        ("torch", "Size"): _Global(_torch_size),
        ("torch", "UntypedStorage"): _StorageType("torch.UntypedStorage", "U8"),
        ("torch.storage", "UntypedStorage"): _StorageType("torch.UntypedStorage", "U8"),
        ("torch.storage", "_UntypedStorage"): _StorageType("torch.UntypedStorage", "U8"),
        ("collections", "OrderedDict"): OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "complex"): complex,
        ("_codecs", "encode"): _Global(_encode),
        # Data carriers some training checkpoints hold beside the weights (fairseq's `args`,
        # numpy scalars for metrics). They become inert placeholders: nothing of theirs runs.
        ("argparse", "Namespace"): _Inert,
        ("numpy.core.multiarray", "scalar"): _Inert,
        ("numpy._core.multiarray", "scalar"): _Inert,
        ("numpy", "dtype"): _Inert,
    }
    for name, code in _STORAGE_DTYPES.items():
        allowed[("torch", name)] = _StorageType(f"torch.{name}", code)
    for name, dcode in _TORCH_DTYPES.items():
        allowed[("torch", name)] = _DType(name, dcode)
    return allowed


_ALLOWED = _allowed_globals()


class _SafeUnpickler(pickle.Unpickler):
    """An unpickler that builds only tensor metadata and plain containers.

    `find_class` is the only way a pickle can reach a callable, so refusing every global outside
    `_ALLOWED` (before it is called) means a checkpoint can run none of its own code.
    """

    def __init__(self, file: IO[bytes], *, source: str, legacy: bool) -> None:
        super().__init__(file)
        self._source = source
        self._legacy = legacy
        # Every storage the pickle names, tensors or not: a legacy file's data section holds
        # them all, and skipping one needs its element size.
        self.storages: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except (KeyError, TypeError):
            pass
        hint = ""
        if module.startswith("__torch__") or module.startswith("torch.jit"):
            hint = " This looks like a TorchScript archive; save the model's state_dict instead."
        elif module.startswith("torch.nn.modules") or module == "__main__":
            hint = (
                " The file pickles a whole model object; in a trusted session, save "
                "`model.state_dict()` instead."
            )
        raise FormatError(
            f"{self._source}: refusing to load global {module}.{name}: checkpoints may not run "
            "code, and weightbridge builds only tensors and plain containers from a pickle "
            f"(torch tensor rebuilds, storages, dtypes, OrderedDict).{hint} If you trust the "
            "file, re-save its tensors once with torch and convert that: "
            "`safetensors.torch.save_file(state_dict, 'model.safetensors')` where state_dict is "
            "the dict of tensors inside `torch.load(path, weights_only=False)`."
        )

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid:
            raise _BadPickle(f"persistent id must be a tuple, found {_brief(pid)}")
        typename = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if typename == "module":
            raise _BadPickle(
                "the file pickles a whole model (with its source code); in a trusted session, "
                "save `model.state_dict()` instead"
            )
        if typename != "storage" or len(pid) != (6 if self._legacy else 5):
            raise _BadPickle(f"unknown persistent id {_brief(pid)}; expected ('storage', ...)")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise _BadPickle(f"persistent id names storage type {_brief(storage_type)}")
        if isinstance(key, bytes):
            key = key.decode("ascii")
        if not isinstance(key, str) or not key:
            raise _BadPickle(f"storage key must be a non-empty string, found {_brief(key)}")
        numel = _int(numel, f"storage {key!r} size")
        ref = _StorageRef(key, storage_type.name, storage_type.code, numel)
        view = pid[5] if self._legacy else None
        if view is not None:  # (view key, offset, size) of pre-1.0 storage views
            if not isinstance(view, tuple) or len(view) != 3:
                raise _BadPickle(f"storage view metadata must be a 3-tuple, found {_brief(view)}")
            _, offset, size = view
            itemsize = ref.nbytes // numel if numel else 1
            ref = _StorageRef(
                key,
                storage_type.name,
                storage_type.code,
                _int(size, "storage view size"),
                _int(offset, "storage view offset") * itemsize,
            )
        old = self.storages.get(key)
        if old is not None and old.code != ref.code:
            raise _BadPickle(
                f"storage {key!r} is named as both {old.type_name} and {ref.type_name}"
            )
        if old is None or old.byte_offset + old.nbytes < ref.byte_offset + ref.nbytes:
            self.storages[key] = ref
        return ref


class _Bounded:
    """A file as pickle readers see it: no read returns (or allocates) past `end`.

    pickletools and the C unpickler read as many bytes as a length field claims, and a buffered
    file allocates that many before reading; clamping each read to what the file holds keeps a
    lying length (``BINBYTES8`` of 2**40) from allocating more than the file's size.
    """

    def __init__(self, file: IO[bytes], end: int) -> None:
        self._file, self._end = file, end

    def read(self, n: int | None = -1) -> bytes:
        left = max(0, self._end - self._file.tell())
        return self._file.read(left if n is None or n < 0 else min(n, left))

    def readline(self, n: int | None = -1) -> bytes:
        left = max(0, self._end - self._file.tell())
        return self._file.readline(left if n is None or n < 0 else min(n, left))

    def tell(self) -> int:
        return self._file.tell()


def _check_memo(file: _Bounded, source: str, end: int) -> None:
    """Refuse claims no honest pickle makes, before the C unpickler sees them.

    The C unpickler grows its memo table to the largest index a PUT names, so a single
    ``LONG_BINPUT 2**31`` would make it allocate and clear gigabytes. Writers number memo slots
    from 0 upwards, one per PUT, so an index can never exceed the count of opcodes before it.
    It also reads a whole FRAME (protocol 4) at once, allocating what its length claims, so a
    frame must fit in the bytes that follow it. Every other length (strings, bytes) is read here
    through `file`, which never reads past `end`, so a truncated one is refused here.
    """
    try:
        for count, (op, arg, pos) in enumerate(pickletools.genops(file)):  # type: ignore[arg-type]
            if op.name in _PUT_OPS and isinstance(arg, int) and arg > count:
                raise FormatError(
                    f"{source}: pickle stores memo slot {arg} after only {count} opcodes; no "
                    "writer does that, so the file is corrupt or hostile"
                )
            if op.name == "FRAME" and isinstance(arg, int) and arg > end - (pos or 0):
                raise FormatError(
                    f"{source}: pickle frame at byte {pos} claims {arg} bytes, but only "
                    f"{end - (pos or 0)} follow; the file is truncated or corrupt"
                )
    except (ValueError, EOFError, struct.error) as e:  # an unknown opcode, a truncated argument
        raise FormatError(
            f"{source}: the pickle is corrupt or truncated ({e}); the file may be damaged or "
            "not a PyTorch checkpoint"
        ) from e


def _load_pickle(
    file: IO[bytes], *, source: str, legacy: bool
) -> tuple[Any, dict[str, _StorageRef]]:
    """Unpickle one pickle from `file` safely; return it and the storages it names."""
    start = file.tell()
    end = file.seek(0, os.SEEK_END)
    file.seek(start)
    _check_memo(_Bounded(file, end), source, end)
    file.seek(start)
    unpickler = _SafeUnpickler(file, source=source, legacy=legacy)
    try:
        return unpickler.load(), unpickler.storages
    except FormatError:
        raise
    except _BadPickle as e:
        raise FormatError(f"{source}: {e}") from e
    except RecursionError as e:
        raise FormatError(f"{source}: pickle nests too deeply to be a checkpoint") from e
    except Exception as e:  # any unpickling failure means a corrupt or truncated file
        raise FormatError(
            f"{source}: the pickle is corrupt or truncated ({type(e).__name__}: {e}); "
            "the file may be damaged or not a PyTorch checkpoint"
        ) from e


# --------------------------------------------------------------------------------------------
# Flattening the unpickled object into named tensors.


def flatten(obj: Any, *, source: str = "<pickle>") -> tuple[dict[str, Any], dict[str, str]]:
    """Name every tensor in nested dicts/lists with dotted paths; return (tensors, metadata).

    A top-level dict whose only tensors sit in one dict under a `WRAPPER_KEYS` key is unwrapped.
    Short scalar leaves become metadata strings; other non-tensor leaves are skipped.

    >>> w = _TensorRef(_StorageRef("0", "torch.FloatStorage", "F32", 6), 0, (2, 3), (3, 1), "F32", "")
    >>> names, meta = flatten({"epoch": 3, "state_dict": {"fc": {"weight": w}}})
    >>> list(names), meta
    (['fc.weight'], {'epoch': '3'})
    """
    walk = _Flattener(source)
    if isinstance(obj, dict):
        holders = [k for k, v in dict.items(obj) if walk.holds_tensor(v, 1)]
        if len(holders) == 1 and holders[0] in WRAPPER_KEYS and isinstance(obj[holders[0]], dict):
            rest = {k: v for k, v in dict.items(obj) if k != holders[0]}
            walk.walk(obj[holders[0]], (), 0, False)
            walk.walk(rest, (), 0, False)
            return walk.tensors, walk.meta
    walk.walk(obj, (), 0, False)
    return walk.tensors, walk.meta


class _Flattener:
    """The state of one `flatten`: names found so far, and what it has already walked.

    An unpickled object is a graph, not a tree: memo references let one container appear many
    times (even inside itself). Each container is walked once; one reached again is skipped if
    it holds no tensor, and otherwise walked again (its tensors get a second name) within
    `_MAX_REVISITS`, so the work stays linear in the pickle's size.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.tensors: dict[str, _TensorRef] = {}
        self.meta: dict[str, str] = {}
        self._holds: dict[int, bool] = {}  # id(container) -> whether a tensor is inside
        self._seen: set[int] = set()  # id(container) of those walked once
        self._revisits = 0

    def holds_tensor(self, obj: Any, depth: int) -> bool:
        if isinstance(obj, _TensorRef):
            return True
        if not isinstance(obj, (dict, list, tuple)) or depth > _MAX_DEPTH:
            return False
        key = id(obj)  # the object is alive (inside the pickle's result) while we walk
        if key not in self._holds:
            self._holds[key] = False  # reached again from inside itself: a cycle adds nothing
            values = dict.values(obj) if isinstance(obj, dict) else obj
            self._holds[key] = any(self.holds_tensor(v, depth + 1) for v in values)
        return self._holds[key]

    def walk(self, obj: Any, path: tuple[Any, ...], depth: int, again: bool) -> None:
        if isinstance(obj, _TensorRef):
            self._count(again)
            # A bare tensor saved on its own (`torch.save(t)`) has no path to name it by.
            self._add(self._name(path) if path else "tensor", obj)
            return
        if depth > _MAX_DEPTH:
            raise FormatError(
                f"{self.source}: containers nest over {_MAX_DEPTH} deep at "
                f"{_brief(self._name(path[:8]))}"
            )
        if isinstance(obj, (dict, list, tuple)):
            if id(obj) in self._seen:
                if not self.holds_tensor(obj, depth):
                    return
                again = True
            self._seen.add(id(obj))
            self._count(again)
            # dict.items, not obj.items: a pickle can set instance attributes on an OrderedDict.
            items = dict.items(obj) if isinstance(obj, dict) else enumerate(obj)
            for key, value in items:
                self.walk(value, (*path, key), depth + 1, again)
            return
        if (
            path
            and isinstance(obj, (bool, int, float, str))
            and len(self.meta) < _MAX_METADATA_ENTRIES
        ):
            try:
                text = obj if isinstance(obj, str) else str(obj)
                name = self._name(path)
            except (ValueError, FormatError):  # an int too long to print, a name too long
                return
            if len(text) <= _MAX_METADATA_CHARS:
                self.meta[name] = text

    def _count(self, again: bool) -> None:
        if again:
            self._revisits += 1
            if self._revisits > _MAX_REVISITS:
                raise FormatError(
                    f"{self.source}: the pickle reaches the same tensors through shared "
                    f"containers over {_MAX_REVISITS} times (references nested on references); "
                    "a checkpoint does not, so the file is corrupt or hostile"
                )

    def _name(self, path: tuple[Any, ...]) -> str:
        parts, total = [], 0
        for key in path:
            try:
                part = key if isinstance(key, str) else str(key)
            except ValueError as e:  # an int too long to print
                raise FormatError(f"{self.source}: a container key cannot be printed ({e})") from e
            total += len(part) + 1
            if total > _MAX_NAME_CHARS:
                raise FormatError(
                    f"{self.source}: a tensor name runs over {_MAX_NAME_CHARS} characters "
                    f"(starting {_brief(part)}); the file is corrupt or hostile"
                )
            parts.append(part)
        return ".".join(parts)

    def _add(self, name: str, t: _TensorRef) -> None:
        if name in self.tensors:
            raise FormatError(
                f"{self.source}: two tensors flatten to the name {name!r} (a key containing '.' "
                "collides with a nested one); rename one in torch before converting"
            )
        self.tensors[name] = t


# --------------------------------------------------------------------------------------------
# Reading.


@dataclass(frozen=True, slots=True)
class _Stored:
    """Where one storage's bytes are: `offset` in the file, or a deflated zip entry."""

    key: str
    offset: int
    nbytes: int
    deflated: zipfile.ZipInfo | None = None


class TorchReader(BaseReader):
    """Reads a `torch.save` file (zip or legacy) without torch; tensors are zero-copy maps."""

    def __init__(self, path: str) -> None:
        self.path = os.fspath(path)
        try:
            with open(self.path, "rb") as f:
                head = f.read(512)
        except OSError as e:
            raise FormatError(f"{self.path}: cannot open: {e.strerror or e}") from e
        self._big_endian = False
        if head.startswith(ZIP_MAGIC):
            obj, storages = self._open_zip()
        elif head[:1] == b"\x80":
            obj, storages = self._open_legacy()
        elif len(head) > 262 and head[257:262] == b"ustar":
            raise FormatError(
                f"{self.path}: this is the tar format of PyTorch before 0.4, which weightbridge "
                "does not read; load and re-save it with a current torch"
            )
        else:
            raise FormatError(
                f"{self.path}: not a PyTorch checkpoint: it is neither a zip archive nor a pickle "
                f"(first bytes {head[:8]!r})"
            )
        self._storages = storages
        refs, meta = flatten(obj, source=self.path)
        self._refs: dict[str, _TensorRef] = {}
        specs = []
        for name, ref in refs.items():
            specs.append(self._check(name, ref))
            self._refs[name] = ref
        try:
            self._spec = CheckpointSpec(tuple(specs), meta)
        except SpecError as e:
            raise FormatError(f"{self.path}: {e}") from e
        self._file: MappedFile | None = None

    # -- opening --------------------------------------------------------------------------

    def _open_zip(self) -> tuple[Any, dict[str, _Stored]]:
        try:
            zf = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:
            size = os.stat(self.path).st_size
            raise FormatError(
                f"{self.path}: not a readable zip archive ({e}); a torch.save file of {size} "
                "bytes whose zip directory is missing is usually truncated: copy it again"
            ) from e
        with zf:
            infos = {}
            for info in zf.infolist():
                name = check_safe_relative(info.filename, index_path=self.path, what="entry")
                if name in infos:
                    raise FormatError(
                        f"{self.path}: entry {name!r} appears twice in the archive; it is "
                        "ambiguous which holds the data: the file is corrupt or hostile"
                    )
                infos[name] = info
            pickles = [
                n
                for n in infos
                if n == "data.pkl" or (n.count("/") == 1 and n.endswith("/data.pkl"))
            ]
            if len(pickles) != 1:
                raise FormatError(
                    f"{self.path}: a torch.save zip has exactly one '<prefix>/data.pkl' entry, "
                    f"found {pickles or 'none'} among {list(infos)[:5]}"
                )
            prefix = pickles[0][: -len("data.pkl")]
            if f"{prefix}constants.pkl" in infos or any(
                n.startswith(f"{prefix}code/") for n in infos
            ):
                raise FormatError(
                    f"{self.path}: this is a TorchScript archive (torch.jit.save), which holds "
                    "code; weightbridge reads torch.save checkpoints: save the model's "
                    "state_dict() with torch.save instead"
                )
            order = infos.get(f"{prefix}byteorder")
            if order is not None:
                value = self._read_entry(zf, order, 16).strip()
                if value not in (b"little", b"big"):
                    raise FormatError(
                        f"{self.path}: byteorder entry must be 'little' or 'big', found {value!r}"
                    )
                self._big_endian = value == b"big"
            raw = self._read_entry(zf, infos[pickles[0]], _MAX_PICKLE_BYTES)
            obj, keys = _load_pickle(
                io.BytesIO(raw), source=f"{self.path}:{pickles[0]}", legacy=False
            )
            size = os.stat(self.path).st_size
            storages: dict[str, _Stored] = {}
            with open(self.path, "rb") as f:
                for key, ref in keys.items():
                    check_safe_relative(key, index_path=self.path, what="storage key")
                    entry = f"{prefix}data/{key}"
                    found = infos.get(entry)
                    if found is None:
                        raise FormatError(
                            f"{self.path}: the pickle names storage {key!r} but the archive has "
                            f"no entry {entry!r}; the file is incomplete"
                        )
                    storages[key] = self._locate(f, size, found, ref)
        return obj, storages

    def _check_compression(self, info: zipfile.ZipInfo) -> None:
        """Refuse a compressed entry we cannot decompress within a bound its own bytes set."""
        where = f"{self.path}: entry {info.filename!r}"
        if info.compress_type == zipfile.ZIP_STORED:
            return
        if info.compress_type != zipfile.ZIP_DEFLATED:
            raise FormatError(
                f"{where} is compressed with zip method {info.compress_type}; weightbridge reads "
                "stored and deflated entries. Re-save the checkpoint with torch.save, which does "
                "not compress"
            )
        if info.file_size > _MAX_DEFLATE_RATIO * info.compress_size + 1024:
            raise FormatError(
                f"{where} claims {info.file_size} bytes from {info.compress_size} deflated bytes, "
                "more than DEFLATE can expand to; refusing (this is how zip bombs look)"
            )

    def _read_entry(self, zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
        if info.file_size > limit:
            raise FormatError(
                f"{self.path}: entry {info.filename!r} claims {info.file_size} bytes, more than "
                f"the {limit} it may hold; the file is corrupt or hostile"
            )
        self._check_compression(info)
        try:
            with zf.open(info) as f:
                data = f.read(limit + 1)
        except (
            zipfile.BadZipFile,
            OSError,
            EOFError,
            RuntimeError,  # an encrypted entry
            NotImplementedError,  # a compression method zipfile does not have
            ValueError,  # a local header whose name does not decode
        ) as e:
            raise FormatError(f"{self.path}: cannot read entry {info.filename!r}: {e}") from e
        if len(data) > limit:
            raise FormatError(f"{self.path}: entry {info.filename!r} expands past {limit} bytes")
        return data

    def _locate(self, f: IO[bytes], size: int, info: zipfile.ZipInfo, ref: _StorageRef) -> _Stored:
        where = f"{self.path}: storage entry {info.filename!r}"
        if info.flag_bits & 0x1:
            raise FormatError(f"{where} is encrypted; weightbridge cannot read it")
        need = ref.byte_offset + ref.nbytes
        start = zip_member_data_start(f, info, self.path)
        if info.compress_type != zipfile.ZIP_STORED:
            # torch never compresses, but a re-zipped checkpoint might. Decompressing is the
            # fallback; an entry that claims more than its tensors need, or more than its
            # compressed bytes can hold, is refused so that a small file cannot make us
            # allocate without bound.
            if info.file_size != need:
                raise FormatError(
                    f"{where} is compressed and claims {info.file_size} bytes, but the pickle "
                    f"declares {need} bytes for it; refusing (a mismatch here is how zip bombs "
                    "look). Re-save the checkpoint with torch.save, which does not compress"
                )
            self._check_compression(info)
            if start + info.compress_size > size:
                raise FormatError(
                    f"{self.path}: file is truncated: entry {info.filename!r} declares data "
                    f"through byte {start + info.compress_size}, file is {size} bytes"
                )
            return _Stored(ref.key, -1, need, info)
        if info.file_size < need:
            raise FormatError(
                f"{where} holds {info.file_size} bytes, but the pickle declares {need} bytes "
                f"for storage {ref.key!r}; the file is truncated or corrupt"
            )
        if start + info.file_size > size:
            raise FormatError(
                f"{self.path}: file is truncated: entry {info.filename!r} declares data through "
                f"byte {start + info.file_size}, file is {size} bytes"
            )
        return _Stored(ref.key, start, info.file_size)

    def _open_legacy(self) -> tuple[Any, dict[str, _Stored]]:
        size = os.stat(self.path).st_size
        with open(self.path, "rb") as f:
            magic, _ = _load_pickle(f, source=self.path, legacy=True)
            if magic != _LEGACY_MAGIC_NUMBER:
                raise FormatError(
                    f"{self.path}: a pickle, but not a PyTorch checkpoint: expected torch's magic "
                    f"number {_LEGACY_MAGIC_NUMBER:#x}, found {_brief(magic)}"
                )
            version, _ = _load_pickle(f, source=self.path, legacy=True)
            if version != _LEGACY_PROTOCOL_VERSION:
                raise FormatError(
                    f"{self.path}: legacy protocol version {_brief(version)} is not the "
                    f"{_LEGACY_PROTOCOL_VERSION} weightbridge reads"
                )
            _load_pickle(f, source=self.path, legacy=True)  # sys_info: not needed, see below
            obj, refs = _load_pickle(f, source=self.path, legacy=True)
            order, _ = _load_pickle(f, source=self.path, legacy=True)
            if not isinstance(order, list) or not all(isinstance(k, str) for k in order):
                raise FormatError(f"{self.path}: the storage key list is corrupt ({_brief(order)})")
            storages: dict[str, _Stored] = {}
            # Storages follow the key list back to back, each as an 8-byte element count and
            # its bytes; torch writes them little-endian whatever the machine (sys_info's
            # little_endian describes the writer, not the data), and reads them the same way.
            pos = f.tell()
            for key in order:
                ref = refs.get(key)
                if ref is None:
                    raise FormatError(
                        f"{self.path}: storage key {key!r} is listed but the pickle never names "
                        "it, so its size is unknown; the file is corrupt"
                    )
                if ref.code is None:  # its element size is unknown, so we cannot skip past it
                    raise FormatError(
                        f"{self.path}: storage {key!r} is a {ref.type_name}, which weightbridge "
                        "cannot read; convert those tensors to a plain dtype in torch first"
                    )
                f.seek(pos)
                raw = f.read(8)
                if len(raw) < 8:
                    raise FormatError(
                        f"{self.path}: file is truncated: storage {key!r} header expected at "
                        f"byte {pos}, file is {size} bytes"
                    )
                (numel,) = struct.unpack("<q", raw)
                itemsize = dtypes.itemsize(ref.code) if ref.code else 1
                nbytes = numel * itemsize
                if numel < 0 or ref.byte_offset + ref.nbytes > nbytes:
                    raise FormatError(
                        f"{self.path}: storage {key!r} holds {numel} elements, but the pickle "
                        f"needs {(ref.byte_offset + ref.nbytes) // itemsize}; the file is corrupt"
                    )
                if pos + 8 + nbytes > size:
                    raise FormatError(
                        f"{self.path}: file is truncated: storage {key!r} declares data through "
                        f"byte {pos + 8 + nbytes}, file is {size} bytes"
                    )
                storages[key] = _Stored(key, pos + 8, nbytes)
                pos += 8 + nbytes
        missing = [k for k in refs if k not in storages]
        if missing:
            raise FormatError(
                f"{self.path}: storages {missing[:5]} are used by tensors but not in the file"
            )
        return obj, storages

    # -- validation -----------------------------------------------------------------------

    def _check(self, name: str, ref: _TensorRef) -> TensorSpec:
        where = f"{self.path}: tensor {name!r}"
        if ref.code is None:
            raise FormatError(
                f"{where} has dtype {ref.dtype_name}, which weightbridge cannot represent; "
                f"supported: {', '.join(dtypes.CODES)}. Cast it in torch before converting"
            )
        try:
            spec = TensorSpec(name, ref.shape, ref.code)
        except DtypeError as e:
            raise FormatError(f"{where}: {e}") from e
        except SpecError as e:  # it names the tensor already
            raise FormatError(f"{self.path}: {e}") from e
        if spec.nbytes > MAX_NBYTES:  # only a view with zero strides gets this far
            raise FormatError(
                f"{where}: shape {ref.shape} of {spec.dtype} is {spec.nbytes} bytes, more than "
                "numpy can index; the checkpoint is corrupt or hostile"
            )
        stored = self._storages[ref.storage.key]
        # Bytes of the storage (view) the tensor may reach, counted from the storage's start.
        available = min(ref.storage.byte_offset + ref.storage.nbytes, stored.nbytes)
        _, end = _extent(ref, dtypes.itemsize(ref.code))
        if spec.numel and end > available:
            raise FormatError(
                f"{where}: shape {ref.shape}, strides {ref.stride} at offset {ref.offset} reach "
                f"byte {end} of storage {ref.storage.key!r}, which has {available} bytes; "
                "the checkpoint is corrupt"
            )
        return spec

    # -- reading --------------------------------------------------------------------------

    def read(self, name: str) -> np.ndarray:
        if name not in self._refs:
            raise self._missing(name)
        ref, spec = self._refs[name], self._spec[name]
        dt = dtypes.to_numpy(spec.dtype)
        if spec.numel == 0:
            empty = np.empty(spec.shape, dtype=dt)
            empty.flags.writeable = False
            return empty
        stored = self._storages[ref.storage.key]
        start, end = _extent(ref, dt.itemsize)
        count = (end - start) // dt.itemsize
        if stored.deflated is not None:
            raw = self._inflate(stored.deflated, stored.nbytes)
            flat = np.frombuffer(raw, dtype=dt, count=count, offset=start)
        else:
            flat = self._mapped().array(
                stored.offset + start, TensorSpec(name, (count,), spec.dtype)
            )
        # as_strided rebuilds the array from its typestr, which numpy cannot parse for some
        # ml_dtypes (float8 is "<f1"): stride over same-sized unsigned ints, then view back.
        arr = np.lib.stride_tricks.as_strided(
            flat.view(f"u{dt.itemsize}"),
            shape=spec.shape,
            strides=tuple(s * dt.itemsize for s in ref.stride),
            writeable=False,
        ).view(dt)
        if self._big_endian and dt.itemsize > 1:
            return _swapped(arr)
        return arr

    def _inflate(self, info: zipfile.ZipInfo, nbytes: int) -> bytes:
        """A compressed storage's bytes, decompressed (at most `nbytes`) on every read."""
        try:
            with zipfile.ZipFile(self.path) as zf:
                data = self._read_entry(zf, info, nbytes)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:
            raise FormatError(f"{self.path}: cannot reopen the archive: {e}") from e
        if len(data) != nbytes:
            raise FormatError(
                f"{self.path}: entry {info.filename!r} holds {len(data)} bytes, its header says "
                f"{nbytes}; the archive is corrupt: copy it again"
            )
        return data

    def byte_range(self, name: str) -> ByteRange | None:
        """The tensor's bytes in the file when they are contiguous, uncompressed, little-endian."""
        if name not in self._refs:
            return None
        ref, spec = self._refs[name], self._spec[name]
        stored = self._storages[ref.storage.key]
        if stored.deflated is not None or (self._big_endian and dtypes.itemsize(spec.dtype) > 1):
            return None
        if spec.numel and ref.stride != _contiguous_strides(ref.shape, ref.stride):
            return None
        start, _ = _extent(ref, dtypes.itemsize(spec.dtype))
        return ByteRange(self.path, stored.offset + start, spec.nbytes)

    def release(self, name: str) -> None:
        if self._file is None or name not in self._refs:
            return
        ref = self._refs[name]
        stored = self._storages[ref.storage.key]
        if stored.deflated is None:
            start, end = _extent(ref, dtypes.itemsize(self._spec[name].dtype))
            self._file.release(stored.offset + start, end - start)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _extent(ref: _TensorRef, itemsize: int) -> tuple[int, int]:
    """[start, end) bytes of a tensor's elements within its storage view (end = start if empty)."""
    start = ref.storage.byte_offset + ref.offset * itemsize
    if math.prod(ref.shape) == 0:
        return start, start
    last = sum((d - 1) * s for d, s in zip(ref.shape, ref.stride, strict=True))
    return start, start + (last + 1) * itemsize


def _contiguous_strides(shape: tuple[int, ...], actual: tuple[int, ...]) -> tuple[int, ...]:
    """C-order strides for `shape`, keeping `actual` where a dimension of size 1 makes it moot."""
    out, step = [], 1
    for d, s in zip(reversed(shape), reversed(actual), strict=True):
        out.append(s if d == 1 else step)
        step *= d
    return tuple(reversed(out))


def _swapped(arr: np.ndarray) -> np.ndarray:
    """A native (little-endian) copy of an array whose bytes are big-endian."""
    out = np.array(arr)  # C-contiguous copy, still big-endian bytes
    unit = out.dtype.itemsize // 2 if out.dtype.kind == "c" else out.dtype.itemsize
    flat = out.reshape(-1).view(f"u{unit}")
    flat.byteswap(inplace=True)
    return out


# --------------------------------------------------------------------------------------------
# Writing.


class _PickleBuilder:
    """Emits pickle opcodes (protocol 2) by hand: enough for a state dict of tensors.

    The standard `pickle.Pickler` would import torch to check each global it writes.
    """

    def __init__(self) -> None:
        self.out = bytearray(b"\x80\x02")  # PROTO 2, what torch.save writes by default

    def global_(self, module: str, name: str) -> None:
        self.out += b"c" + module.encode() + b"\n" + name.encode() + b"\n"

    def str_(self, text: str) -> None:
        raw = text.encode("utf-8")
        self.out += b"X" + struct.pack("<I", len(raw)) + raw  # BINUNICODE

    def int_(self, value: int) -> None:
        if 0 <= value < 1 << 8:
            self.out += b"K" + bytes([value])  # BININT1
        elif 0 <= value < 1 << 16:
            self.out += b"M" + struct.pack("<H", value)  # BININT2
        elif -(1 << 31) <= value < 1 << 31:
            self.out += b"J" + struct.pack("<i", value)  # BININT
        else:
            raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
            self.out += b"\x8a" + bytes([len(raw)]) + raw  # LONG1

    def tuple_(self, values: Sequence[int]) -> None:
        if not values:
            self.out += b")"  # EMPTY_TUPLE
            return
        self.out += b"("  # MARK
        for v in values:
            self.int_(v)
        self.out += b"t"  # TUPLE

    def ordered_dict(self) -> None:
        self.global_("collections", "OrderedDict")
        self.out += b")R"  # EMPTY_TUPLE, REDUCE: OrderedDict()

    def tensor(self, key: str, spec: TensorSpec) -> None:
        storage = _STORAGE_FOR_CODE.get(spec.dtype)
        v3 = storage is None
        self.global_("torch._utils", "_rebuild_tensor_v3" if v3 else "_rebuild_tensor_v2")
        self.out += b"("  # MARK: the rebuild arguments
        self.out += b"("  # MARK: the persistent id
        self.str_("storage")
        if storage is None:  # untyped storage: its size counts bytes
            self.global_("torch.storage", "UntypedStorage")
        else:
            self.global_("torch", storage)
        self.str_(key)
        self.str_("cpu")
        self.int_(spec.nbytes if v3 else spec.numel)
        self.out += b"tQ"  # TUPLE, BINPERSID
        self.int_(0)  # storage offset
        self.tuple_(spec.shape)
        self.tuple_(_c_strides(spec.shape))
        self.out += b"\x89"  # NEWFALSE: requires_grad
        self.ordered_dict()  # backward hooks
        if v3:
            self.global_("torch", _TORCH_DTYPE_FOR_CODE[spec.dtype])
        self.out += b"tR"  # TUPLE, REDUCE

    def stop(self) -> bytes:
        return bytes(self.out + b".")


def _c_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    out, step = [], 1
    for d in reversed(shape):
        out.append(step)
        step *= max(d, 1)
    return tuple(reversed(out))


def encode_pickle(tensors: Sequence[TensorSpec]) -> bytes:
    """The `data.pkl` bytes for an OrderedDict of `tensors`, tensor i in storage ``str(i)``.

    >>> import pickletools
    >>> [op.name for op, _, _ in pickletools.genops(encode_pickle([]))]
    ['PROTO', 'GLOBAL', 'EMPTY_TUPLE', 'REDUCE', 'STOP']
    """
    p = _PickleBuilder()
    p.ordered_dict()
    if tensors:
        p.out += b"("  # MARK
        for i, spec in enumerate(tensors):
            p.str_(spec.name)
            p.tensor(str(i), spec)
        p.out += b"u"  # SETITEMS
    return p.stop()


class TorchWriter:
    """Writes one `torch.save`-compatible zip: tensors stream into aligned, stored entries.

    The pickle depends only on the specs, so it is written first (as torch does); each tensor's
    tiles then go straight into its own ``archive/data/<i>`` entry. Metadata has no place in a
    state dict that `torch.load` returns, so it is not written.
    """

    suffix = ".bin"
    # The archive's top-level folder. torch names it after the file, but reads any name; a fixed
    # one keeps output bytes independent of the (temporary) file name.
    prefix = "archive"

    def __init__(
        self, path: str, tensors: Sequence[TensorSpec], metadata: dict[str, str] | None = None
    ) -> None:
        self.path = path
        self._tensors = list(tensors)
        for spec in self._tensors:
            if spec.dtype not in _STORAGE_FOR_CODE and spec.dtype not in _TORCH_DTYPE_FOR_CODE:
                raise FormatError(
                    f"{path}: tensor {spec.name!r}: torch has no dtype for {spec.dtype}"
                )
        self._f = open(path, "wb")  # noqa: SIM115 - closed in close()/abort()
        self._zip = zipfile.ZipFile(self._f, "w", zipfile.ZIP_STORED, allowZip64=True)
        self._entry: IO[bytes] | None = None
        self._i = 0  # index of the tensor being written
        self._written = 0  # its bytes written so far
        self._started = False  # whether its entry is open or done
        self._put("data.pkl", encode_pickle(self._tensors))
        self._put("byteorder", b"little")

    def _info(self, name: str, size: int) -> zipfile.ZipInfo:
        info = zipfile.ZipInfo(f"{self.prefix}/{name}")
        info.compress_type = zipfile.ZIP_STORED
        info.file_size = size
        # zipfile adds a 20-byte zip64 extra field for entries near 4 GiB (its own rule).
        zip64 = 20 if size * 1.05 > zipfile.ZIP64_LIMIT else 0
        header = ZIP_LOCAL_HEADER_SIZE + len(info.filename.encode("utf-8")) + 4 + zip64
        pad = -(self._f.tell() + header) % _ALIGN
        info.extra = struct.pack("<HH", _PAD_EXTRA_ID, pad) + b"Z" * pad
        return info

    def _put(self, name: str, data: bytes) -> None:
        with self._zip.open(self._info(name, len(data)), "w") as entry:
            entry.write(data)

    def _open_entry(self, spec: TensorSpec) -> IO[bytes]:
        entry = self._zip.open(self._info(f"data/{self._i}", spec.nbytes), "w")
        if self._f.tell() % _ALIGN:  # our padding arithmetic disagrees with zipfile's header
            raise FormatError(f"{self.path}: internal error: tensor {spec.name!r} data unaligned")
        return entry

    def _finish(self) -> None:
        """Close the current tensor's entry (creating it if no tile came) and move on."""
        if self._entry is None:
            self._entry = self._open_entry(self._tensors[self._i])
        self._entry.close()
        self._entry = None
        self._i += 1
        self._written = 0
        self._started = False

    def _target(self, name: str) -> TensorSpec:
        while self._i < len(self._tensors):
            spec = self._tensors[self._i]
            if spec.name == name and (
                self._written < spec.nbytes or (spec.nbytes == 0 and not self._started)
            ):
                return spec
            if self._written != spec.nbytes:
                break
            self._finish()
        expected = self._tensors[self._i].name if self._i < len(self._tensors) else "nothing more"
        raise FormatError(f"{self.path}: writer expected tensor {expected!r}, got {name!r}")

    def write(self, name: str, tile: np.ndarray, row: int) -> None:
        spec = self._target(name)
        data = np.ascontiguousarray(tile)
        if data.dtype != dtypes.to_numpy(spec.dtype):
            raise FormatError(
                f"{self.path}: tensor {name!r} expects {spec.dtype}, got a tile of {data.dtype}; "
                "cast it before writing"
            )
        row_bytes = spec.nbytes // spec.shape[0] if spec.shape and spec.shape[0] else 0
        expected_row = self._written // row_bytes if row_bytes else 0
        if (
            row != expected_row
            or data.shape[1:] != spec.shape[1:]
            or (self._written + data.nbytes > spec.nbytes)
        ):
            raise FormatError(
                f"{self.path}: tensor {name!r} {spec.shape}: expected whole rows from row "
                f"{expected_row}, got a tile of shape {data.shape} at row {row}"
            )
        if self._entry is None:
            self._entry = self._open_entry(spec)
        self._started = True
        if data.nbytes:
            self._entry.write(data.reshape(-1).view(np.uint8).data)
        self._written += data.nbytes

    def copy_from(self, name: str, src: ByteRange) -> bool:
        """Decline: every zip entry needs a CRC-32 of its bytes, so they pass through tiles."""
        return False

    def close(self) -> None:
        while self._i < len(self._tensors):
            spec = self._tensors[self._i]
            if self._written != spec.nbytes:
                raise FormatError(
                    f"{self.path}: closing with tensor {spec.name!r} incomplete: "
                    f"{self._written} of {spec.nbytes} bytes written; tensors still due: "
                    f"{[t.name for t in self._tensors[self._i :]][:5]}"
                )
            self._finish()
        # The reader in torch requires a `version` record; 3 is what torch.save writes.
        self._put("version", b"3\n")
        self._zip.close()
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def abort(self) -> None:
        for closer in (
            self._entry.close if self._entry is not None else None,
            self._zip.close,
            self._f.close,
        ):
            if closer is not None:
                try:
                    closer()
                except Exception:  # abort promises nothing; the caller deletes the file
                    pass
        self._entry = None
        # If zipfile could not finish, its finaliser would try again on the closed file.
        self._zip.fp = None


Writer = TorchWriter


def open_reader(path: str) -> TorchReader:
    return TorchReader(path)
