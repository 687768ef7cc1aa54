"""The restricted unpickler for PyTorch checkpoints: a pickle in, tensor metadata out.

Unpickling runs code by design, so `torch.save` pickles are never given to the standard
unpickler. `_SafeUnpickler` resolves only the few globals a tensor checkpoint needs, each to a
small metadata builder of ours, and refuses every other global before anything runs. The
result is a `TensorRef` per tensor (its storage, offset, shape, strides and dtype), which
`flatten` names with dotted paths. Nothing here reads tensor data or imports torch; the file
formats around the pickle (zip, legacy) are `weightbridge.io.torch`'s job.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import reprlib
import struct
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import IO, Any

from weightbridge import dtypes
from weightbridge.errors import FormatError
from weightbridge.spec import MAX_NBYTES

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
# Non-tensor leaves (epoch counters, learning rates, names) kept as metadata strings: enough to
# show what a training checkpoint carries without copying an optimizer's worth of numbers.
_MAX_METADATA_ENTRIES = 64
_MAX_METADATA_CHARS = 200
# When the top-level dict holds exactly one dict of tensors under one of these keys, its tensors
# are the model: `{"state_dict": {...}, "epoch": 3}` reads as the inner names.
WRAPPER_KEYS = ("state_dict", "model", "module", "model_state_dict", "params")

# Legacy typed storage classes and the dtype of their elements (None: torch has the class but
# weightbridge has no numpy dtype for it; refused when a tensor uses it).
STORAGE_DTYPES: dict[str, str | None] = {
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
TORCH_DTYPES: dict[str, str | None] = {
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


# Opcodes that store into the unpickler's memo at an index of the pickle's choosing.
_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})

# --------------------------------------------------------------------------------------------
# What unpickling produces: metadata only.


def _refuse_state(self: Any, state: Any) -> None:
    """`__setstate__` of every object the unpickler hands a pickle.

    The BUILD opcode sets the state of whatever object is on the stack. Frozen slotted
    dataclasses get a `__setstate__` that ignores `frozen`, so BUILD on one of the shared objects
    in `ALLOWED` (``torch.FloatStorage``) would change how every later file in this process is
    read; on a storage or tensor reference, it would change it after it was checked.
    """
    raise _BadPickle(f"the pickle sets the state of {brief(self)}; no checkpoint does that")


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
class StorageRef:
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
class TensorRef:
    """A tensor as the pickle rebuilds it: strides and offset in elements of its own dtype."""

    storage: StorageRef
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


def brief(obj: Any) -> str:
    """A short repr for messages: a hostile pickle's objects can be deep, huge or unprintable."""
    try:
        return reprlib.repr(obj)
    except (ValueError, RecursionError):  # an int too long to print, a self-nesting object
        return f"<{type(obj).__name__}>"


def _int(value: Any, what: str) -> int:
    # torch keeps sizes, strides and offsets in int64; larger values come from no torch.save.
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_NBYTES:
        raise _BadPickle(f"{what} must be a non-negative 64-bit integer, found {brief(value)}")
    return value


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)):
        raise _BadPickle(f"{what} must be a tuple of integers, found {brief(value)}")
    return tuple(_int(v, what) for v in value)


class _BadPickle(Exception):
    """Raised inside unpickling; `load_pickle` turns it into a FormatError naming the file."""


def _tensor(storage: Any, offset: Any, size: Any, stride: Any, dtype: _DType | None) -> TensorRef:
    if not isinstance(storage, StorageRef):
        raise _BadPickle(
            f"a tensor's storage must be a persistent storage id, found {brief(storage)}"
        )
    shape, strides = _ints(size, "a tensor's shape"), _ints(stride, "a tensor's strides")
    if len(shape) != len(strides):
        raise _BadPickle(f"tensor shape {shape} and strides {strides} differ in length")
    if dtype is None:
        code, name = storage.code, storage.type_name
    elif isinstance(dtype, _DType):
        code, name = dtype.code, f"torch.{dtype.name}"
    else:
        raise _BadPickle(f"a tensor's dtype must be a torch dtype, found {brief(dtype)}")
    return TensorRef(storage, _int(offset, "a tensor's storage offset"), shape, strides, code, name)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> TensorRef:
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
) -> TensorRef:
    return _tensor(storage, offset, size, stride, dtype)


def _rebuild_parameter(data: Any, *_: Any) -> TensorRef:
    # A Parameter is its tensor plus requires_grad/hooks/state, none of which a checkpoint needs.
    if not isinstance(data, TensorRef):
        raise _BadPickle(f"a Parameter must wrap a tensor, found {brief(data)}")
    return data


_REBUILDERS: tuple[Callable[..., TensorRef], ...] = (
    _rebuild_tensor,
    _rebuild_tensor_v3,
    _rebuild_parameter,
)


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> TensorRef:
    # torch wraps a tensor that carries Python attributes in this call; only plain tensors and
    # Parameters are data, other subclasses would need their code.
    fn = func.fn if isinstance(func, _Global) else None
    if fn not in _REBUILDERS or not isinstance(new_type, _TensorType):
        raise _BadPickle(
            f"tensor subclass rebuild with {brief(func)} and type {brief(new_type)} is not "
            "supported; only torch.Tensor and torch.nn.Parameter are"
        )
    if not isinstance(args, tuple):
        raise _BadPickle(f"tensor rebuild arguments must be a tuple, found {brief(args)}")
    out: TensorRef = func(*args)
    return out


def _torch_size(dims: Any = ()) -> tuple[int, ...]:
    return _ints(dims, "a torch.Size")


def _encode(text: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    # Protocol 2 pickles `bytes` as `_codecs.encode(str, "latin1")`; other codecs (zlib, bz2)
    # could expand data, and no checkpoint needs them.
    if not isinstance(text, str) or encoding.lower().replace("-", "") not in ("latin1", "utf8"):
        raise _BadPickle(f"_codecs.encode is allowed only for latin1 text, found {brief(encoding)}")
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
    for name, code in STORAGE_DTYPES.items():
        allowed[("torch", name)] = _StorageType(f"torch.{name}", code)
    for name, dcode in TORCH_DTYPES.items():
        allowed[("torch", name)] = _DType(name, dcode)
    return allowed


ALLOWED = _allowed_globals()


class _SafeUnpickler(pickle.Unpickler):
    """An unpickler that builds only tensor metadata and plain containers.

    `find_class` is the only way a pickle can reach a callable, so refusing every global outside
    `ALLOWED` (before it is called) means a checkpoint can run none of its own code.
    """

    def __init__(
        self,
        file: IO[bytes],
        *,
        source: str,
        legacy: bool,
        extra: Mapping[tuple[str, str], Any] | None = None,
    ) -> None:
        super().__init__(file)
        self._source = source
        self._legacy = legacy
        self._extra = extra or {}
        # Every storage the pickle names, tensors or not: a legacy file's data section holds
        # them all, and skipping one needs its element size.
        self.storages: dict[str, StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            found = self._extra.get((module, name))
            return found if found is not None else ALLOWED[(module, name)]
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
            raise _BadPickle(f"persistent id must be a tuple, found {brief(pid)}")
        typename = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if typename == "module":
            raise _BadPickle(
                "the file pickles a whole model (with its source code); in a trusted session, "
                "save `model.state_dict()` instead"
            )
        if typename != "storage" or len(pid) != (6 if self._legacy else 5):
            raise _BadPickle(f"unknown persistent id {brief(pid)}; expected ('storage', ...)")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise _BadPickle(f"persistent id names storage type {brief(storage_type)}")
        if isinstance(key, bytes):
            key = key.decode("ascii")
        if not isinstance(key, str) or not key:
            raise _BadPickle(f"storage key must be a non-empty string, found {brief(key)}")
        numel = _int(numel, f"storage {key!r} size")
        ref = StorageRef(key, storage_type.name, storage_type.code, numel)
        view = pid[5] if self._legacy else None
        if view is not None:  # (view key, offset, size) of pre-1.0 storage views
            if not isinstance(view, tuple) or len(view) != 3:
                raise _BadPickle(f"storage view metadata must be a 3-tuple, found {brief(view)}")
            _, offset, size = view
            itemsize = ref.nbytes // numel if numel else 1
            ref = StorageRef(
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


def load_pickle(
    file: IO[bytes],
    *,
    source: str,
    legacy: bool,
    extra_globals: Mapping[tuple[str, str], Any] | None = None,
) -> tuple[Any, dict[str, StorageRef]]:
    """Unpickle one pickle from `file` safely; return it and the storages it names.

    `extra_globals` allows more globals than `ALLOWED`, each mapped to a stand-in of ours
    (a format built on torch.save, such as DeepSpeed's, names its own classes).
    """
    start = file.tell()
    end = file.seek(0, os.SEEK_END)
    file.seek(start)
    _check_memo(_Bounded(file, end), source, end)
    file.seek(start)
    unpickler = _SafeUnpickler(file, source=source, legacy=legacy, extra=extra_globals)
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

    >>> w = TensorRef(StorageRef("0", "torch.FloatStorage", "F32", 6), 0, (2, 3), (3, 1), "F32", "")
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
        self.tensors: dict[str, TensorRef] = {}
        self.meta: dict[str, str] = {}
        self._holds: dict[int, bool] = {}  # id(container) -> whether a tensor is inside
        self._seen: set[int] = set()  # id(container) of those walked once
        self._revisits = 0

    def holds_tensor(self, obj: Any, depth: int) -> bool:
        if isinstance(obj, TensorRef):
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
        if isinstance(obj, TensorRef):
            self._count(again)
            # A bare tensor saved on its own (`torch.save(t)`) has no path to name it by.
            self._add(self._name(path) if path else "tensor", obj)
            return
        if depth > _MAX_DEPTH:
            raise FormatError(
                f"{self.source}: containers nest over {_MAX_DEPTH} deep at "
                f"{brief(self._name(path[:8]))}"
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
                    f"(starting {brief(part)}); the file is corrupt or hostile"
                )
            parts.append(part)
        return ".".join(parts)

    def _add(self, name: str, t: TensorRef) -> None:
        if name in self.tensors:
            raise FormatError(
                f"{self.source}: two tensors flatten to the name {name!r} (a key containing '.' "
                "collides with a nested one); rename one in torch before converting"
            )
        self.tensors[name] = t
