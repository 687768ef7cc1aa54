"""Megatron-Core ``torch_dist`` checkpoints: what ``megatron.core.dist_checkpointing.save``
writes with its default backend, read without torch or megatron.

Layout (megatron-core 0.16, proven on files it wrote here with 1 and 2 tensor-parallel ranks):

- ``metadata.json``: ``{"sharded_backend": "torch_dist", "sharded_backend_version": 1,
  "common_backend": "torch", "common_backend_version": 1}``; it is what marks the directory.
- ``.metadata`` and ``__{rank}_{n}.distcp``: a PyTorch DCP checkpoint (`weightbridge.io.dcp`
  reads it), whose ``Metadata`` also carries ``all_local_plans`` (every rank's save plan, kept
  by mcore to reuse on the next save; unpickled as inert records, never used).
- ``common.pt``: a ``torch.save`` of the state that is not sharded (``{}`` for a bare model;
  the training loop's ``iteration``, ``args`` and the like in Megatron-LM). It is read with the
  restricted unpickler (nothing from it runs) and its entries are listed in the metadata, not
  converted.

What mcore's sharded-state-dict conventions need beyond plain DCP:

- **Stacked layers.** A ``TransformerBlock`` saves each layer's tensors under one key without
  the layer number, with the layer as a prepended axis: the model's
  ``decoder.layers.3.self_attention.linear_qkv.weight`` (192, 64) is row 3 of the checkpoint's
  ``decoder.layers.self_attention.linear_qkv.weight`` (L, 192, 64), saved as one chunk (or one
  per tensor-parallel piece) per layer. A key with a ``layers`` segment not followed by a
  number is read as L tensors named with the layer number put back, each read from its own
  chunks only (a zero-copy map when it is one chunk).
- **Stacked experts.** ``SequentialMLP`` (and ``TEGroupedMLP``, which saves the same keys)
  saves expert j of ``decoder.layers.i.mlp.experts.local_experts.j.linear_fc1.weight`` in
  ``decoder.layers.mlp.experts.experts.linear_fc1.weight`` with a second prepended axis; it
  is read back under the ``local_experts.j`` name.
- **Layer-spec renames.** Keys are Transformer Engine's names: mcore's local (non-TE) layer
  spec saves ``input_layernorm`` as ``self_attention.linear_qkv.layer_norm_weight`` and
  ``pre_mlp_layernorm`` as ``mlp.linear_fc1.layer_norm_weight`` (its
  ``sharded_state_dict_keys_map``). Names are read as saved, i.e. as a TE-spec model's
  ``state_dict()`` names them; mapping them to another spec is the matcher's job.
- **Tensor parallelism** needs nothing: mcore saves global tensors (fused QKV in its own
  per-group order, SwiGLU's ``linear_fc1`` as [gate; up] of the whole tensor, like the
  1-rank model), and the DCP chunks tile them.
- **Flattened tensors.** Distributed-optimizer states that megatron-core before 0.14 saved
  "N-D flattened" (``Metadata.mcore_data`` gives their original shape) are stored reshaped to
  ``[X // x, ..., x * y * z]``: they are refused by name (left out, with a note), never read
  as if they were the tensor.
- ``_extra_state/shard_*`` entries (Transformer Engine's FP8 state, ``None`` without TE) are
  non-tensor DCP entries: listed, not converted.

The prepended axes are not recorded in the files (``prepend_axis_num`` lives only in the
running process), so they are recognised by mcore's key conventions and checked against the
chunks (one index of each stacked axis per chunk); a key named like a stacked tensor whose
chunks span several layers is read as stored, with a note. Other backends (``zarr``, before
mcore 0.7) are refused by name.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from weightbridge import dtypes
from weightbridge.errors import FormatError, SpecError, WeightbridgeError
from weightbridge.io import _remote, dcp
from weightbridge.io._obstore import is_object_url
from weightbridge.io._pickle import TensorRef, brief
from weightbridge.io.base import (
    ByteRange,
    local_range,
    open_source,
    source_isdir,
    source_isfile,
    source_join,
    source_size,
)
from weightbridge.io.torch import TorchReader
from weightbridge.spec import CheckpointSpec, TensorSpec

NAME = "megatron"
# Its data files are DCP's; the checkpoint is detected by its directory (metadata.json).
SUFFIXES = (dcp.DATA_SUFFIX,)

CONFIG_FILE = "metadata.json"
COMMON_FILE = "common.pt"
BACKEND = "torch_dist"
# metadata.json is four short keys; anything this large is not mcore's.
_MAX_CONFIG_BYTES = 1 << 16
# Megatron-LM's save directory (``--save ckpt``) holds one folder per saved iteration
# (``iter_0000100``, or ``release``) and this tracker naming the newest, as ZeRO's ``latest``.
TRACKER = "latest_checkpointed_iteration.txt"
RELEASE = "release"
# The tracker holds an iteration number or "release"; a file of more bytes is not Megatron's.
_MAX_TRACKER_BYTES = 64

_T = TypeVar("_T")


def _names_a_file(path: str) -> bool:
    base = path.rstrip("/").rsplit("/", 1)[-1]
    # Not common.pt: named alone, it is a torch.save file (the torch format reads it).
    return dcp._names_a_file(path) or base in (CONFIG_FILE, TRACKER)


def _directory_of(path: str) -> str:
    """The checkpoint directory: `path` itself, or the directory of a file inside it."""
    if is_object_url(path):
        return _remote.dirname(path) if _names_a_file(path) else path.rstrip("/")
    if os.path.isdir(path):
        return path
    return os.path.dirname(path) or "."


def _iteration_directory(directory: str) -> str:
    """The torch_dist directory: `directory` itself, or, in Megatron-LM's save directory (no
    ``metadata.json``, a ``latest_checkpointed_iteration.txt``), the iteration it names:
    ``iter_{n:07d}`` for a number, ``release`` for "release", as Megatron-LM's
    ``get_checkpoint_name`` builds it.

    Raises:
        FormatError: the tracker is unreadable or holds neither, or names a missing folder.
    """
    if source_isfile(source_join(directory, CONFIG_FILE)):
        return directory
    tracker = source_join(directory, TRACKER)
    if not source_isfile(tracker):
        return directory
    try:
        with open_source(tracker) as f:
            raw = f.read(_MAX_TRACKER_BYTES + 1)
        text = raw.decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise FormatError(
            f"{tracker}: cannot read Megatron-LM's iteration tracker ({e}); point at the "
            "iteration folder (iter_NNNNNNN or release) instead"
        ) from e
    if len(raw) > _MAX_TRACKER_BYTES or not (text == RELEASE or text.isdigit()):
        raise FormatError(
            f"{tracker}: Megatron-LM's iteration tracker should hold an iteration number or "
            f"'{RELEASE}', found {brief(text[:_MAX_TRACKER_BYTES])}"
            f"{' (more bytes follow)' if len(raw) > _MAX_TRACKER_BYTES else ''}; point at the "
            "iteration folder (iter_NNNNNNN or release) instead"
        )
    name = RELEASE if text == RELEASE else f"iter_{int(text):07d}"
    inner = source_join(directory, name)
    if not source_isfile(source_join(inner, CONFIG_FILE)):
        what = "is missing" if not source_isdir(inner) else f"has no {CONFIG_FILE}"
        raise FormatError(
            f"{tracker} names iteration {text!r}, but {inner} {what}: not a torch_dist "
            "checkpoint (the legacy per-rank mp_rank_*/model_optim_rng.pt layout is not "
            "read); point at an iteration folder that holds metadata.json"
        )
    return inner


def _read_config(directory: str) -> dict[str, Any]:
    """`metadata.json`, checked to be mcore's."""
    path = source_join(directory, CONFIG_FILE)
    try:
        size = source_size(path)
        if size > _MAX_CONFIG_BYTES:
            raise FormatError(
                f"{path}: {size} bytes is too large for Megatron's metadata.json (limit "
                f"{_MAX_CONFIG_BYTES}); it is not a dist_checkpointing config"
            )
        with open_source(path) as f:
            config = json.loads(f.read().decode("utf-8"))
    except FormatError:
        raise
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise FormatError(
            f"{path}: cannot read it as Megatron's dist_checkpointing metadata.json ({e})"
        ) from e
    if not isinstance(config, dict) or not isinstance(config.get("sharded_backend"), str):
        raise FormatError(
            f"{path}: no 'sharded_backend' string in it, found {brief(config)}; a Megatron "
            "dist_checkpointing directory's metadata.json names its backend"
        )
    return config


def detect(path: str, head: bytes) -> bool:
    """True for a directory (or a file inside one) whose `metadata.json` names a Megatron
    dist_checkpointing backend, or for Megatron-LM's save directory: a
    ``latest_checkpointed_iteration.txt`` (whose iteration the reader opens, or refuses
    naming what is wrong)."""
    try:
        if not (_names_a_file(path) or source_isdir(path)):
            return False
        directory = _directory_of(path)
        # One stat (one request in an object store); no listing, which https cannot do.
        if not source_isfile(source_join(directory, CONFIG_FILE)):
            return source_isfile(source_join(directory, TRACKER))
        _read_config(directory)
    except (OSError, WeightbridgeError):
        return False
    return True


def _describe(value: Any) -> str:
    """A `common.pt` entry for the metadata: the same text for the same file, every time."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return brief(value)
    if isinstance(value, (dict, list, tuple, set, frozenset)):
        return f"a {type(value).__name__} of {len(value)} items"
    if isinstance(value, TensorRef):
        return f"a tensor of shape {value.shape}"
    # argparse.Namespace and numpy scalars unpickle as inert stand-ins that keep nothing
    return "an object (e.g. argparse.Namespace) whose contents are not read"


# --------------------------------------------------------------------------------------------
# Stacked layers and experts.


def _stacked_axes(name: str) -> list[tuple[int, str]] | None:
    """Where a stored key's prepended axes go back into its name, in axis order: a list of
    (index into the name's dotted parts, what replaces that part). None for a plain key.

    ``layers`` not followed by a number is a stacked block (the layer is put back after it);
    ``experts.experts`` not followed by a number are stacked experts (back as
    ``experts.local_experts.j``).
    """
    parts = name.split(".")
    axes: list[tuple[int, str]] = []
    for p in range(len(parts) - 1):
        if parts[p + 1].isdigit():
            continue
        if parts[p] == "layers":
            axes.append((p, "layers"))
        elif parts[p] == "experts" and p > 0 and parts[p - 1] == "experts":
            axes.append((p, "local_experts"))
    return axes or None


def _unstacked_name(name: str, axes: list[tuple[int, str]], index: tuple[int, ...]) -> str:
    parts = name.split(".")
    for (p, part), i in zip(axes, index, strict=True):
        parts[p] = f"{part}.{i}"
    return ".".join(parts)


@dataclass(frozen=True, slots=True)
class _Slice:
    """A tensor the reader shows that is one index of a stacked stored tensor."""

    stored: str  # the stored (DCP) key
    index: tuple[int, ...]  # its index along the prepended axes
    chunks: tuple[int, ...]  # which of the stored tensor's chunks hold it


class MegatronReader(dcp.DcpReader):
    """Reads a Megatron-Core ``torch_dist`` directory: the DCP tensors with stacked layers and
    experts split back into the model's per-layer tensors."""

    def __init__(self, path: str) -> None:
        parent = _directory_of(os.fspath(path))
        directory = _iteration_directory(parent)
        config = _read_config(directory)
        backend = config["sharded_backend"]
        if backend != BACKEND:
            raise FormatError(
                f"{source_join(directory, CONFIG_FILE)}: Megatron sharded backend {backend!r} is "
                f"not read (weightbridge reads {BACKEND!r}, mcore's default since 0.7); "
                "convert it with megatron.core.dist_checkpointing (load, then save with "
                f"backend {BACKEND!r})"
            )
        super().__init__(directory)
        stored = self._spec
        meta = dict(stored.metadata)
        for key in ("sharded_backend", "sharded_backend_version", "common_backend"):
            if key in config:
                meta[f"megatron.{key}"] = str(config[key])
        flattened = {k[len("dcp.mcore.") :] for k in meta if k.startswith("dcp.mcore.")}
        self._slices: dict[str, _Slice] = {}
        self._refused: dict[str, str] = {}
        # Layer by layer, as the model's state_dict() lists them: a stacked key's tensors go
        # with the first stacked key of their block, ordered by index, then by stored order.
        ordered: list[tuple[int, tuple[int, ...], int, TensorSpec]] = []
        groups: dict[str, int] = {}
        for pos, spec in enumerate(stored):
            if spec.name in flattened:
                note = meta.pop(f"dcp.mcore.{spec.name}")
                self._refused[spec.name] = (
                    f"{note.split(';')[0]}; mcore saved it N-D flattened (a distributed-"
                    "optimizer state of megatron-core < 0.14), which weightbridge does not "
                    "reassemble: left out"
                )
                meta[f"megatron.refused.{spec.name}"] = self._refused[spec.name]
                continue
            axes = _stacked_axes(spec.name)
            block = ".".join(spec.name.split(".")[: axes[0][0] + 1]) if axes else ""
            group = pos if axes is None else groups.setdefault(block, pos)
            for t in self._unstack(spec, meta):
                s = self._slices.get(t.name)
                ordered.append((group, s.index if s else (), pos, t))
        tensors = [t for *_, t in sorted(ordered, key=lambda o: o[:3])]
        if directory != parent:
            meta["megatron.iteration"] = (
                f"reading {directory.rstrip('/').rsplit('/', 1)[-1]}, the iteration "
                f"{TRACKER} names in {parent}"
            )
        self._read_common(directory, meta)
        try:
            self._shown = CheckpointSpec(tuple(tensors), meta)
        except SpecError as e:
            raise FormatError(
                f"{directory}: {e}; a stacked key split into layers collides with a key saved "
                "per layer: the checkpoint mixes both conventions for one tensor"
            ) from e

    def _unstack(self, spec: TensorSpec, meta: dict[str, str]) -> list[TensorSpec]:
        axes = _stacked_axes(spec.name)
        if axes is None:
            return [spec]
        n = len(axes)
        chunks = self._chunks[spec.name]
        if len(spec.shape) < n or any(any(s != 1 for s in c.sizes[:n]) for c in chunks):
            meta[f"megatron.stacked.{spec.name}"] = (
                f"named like a tensor stacked over {n} prepended axes, but its chunks of shape "
                f"{spec.shape} do not hold one index of them each: read as stored"
            )
            return [spec]
        by_index: dict[tuple[int, ...], list[int]] = {}
        for i, c in enumerate(chunks):
            by_index.setdefault(c.offsets[:n], []).append(i)
        out = []
        for index in itertools.product(*(range(d) for d in spec.shape[:n])):
            name = _unstacked_name(spec.name, axes, index)
            self._slices[name] = _Slice(spec.name, index, tuple(by_index.get(index, ())))
            out.append(TensorSpec(name, spec.shape[n:], spec.dtype))
        what = " x ".join(
            f"{d} {'layers' if part == 'layers' else 'experts'}"
            for (_, part), d in zip(axes, spec.shape[:n], strict=True)
        )
        meta[f"megatron.stacked.{spec.name}"] = (
            f"stacked over {what} (stored shape {spec.shape}): read as {len(out)} tensors "
            f"{out[0].name}, ... of shape {spec.shape[n:]}"
        )
        return out

    def _read_common(self, directory: str, meta: dict[str, str]) -> None:
        """List `common.pt`'s entries (read by the restricted unpickler; nothing runs)."""
        path = source_join(directory, COMMON_FILE)
        try:
            if not source_isfile(path):
                meta["megatron.common"] = f"no {COMMON_FILE}"
                return
            with TorchReader(path) as common:
                obj = common.pickled
                tensors = common.specs().names
        except FormatError as e:
            meta["megatron.common"] = f"{COMMON_FILE} not read: {e}"
            return
        if isinstance(obj, dict):
            meta["megatron.common"] = (
                f"{COMMON_FILE}: {len(obj)} entries, listed here, not converted"
                if obj
                else f"{COMMON_FILE}: empty"
            )
            for key, value in dict.items(obj):
                meta[f"megatron.common.{key}"] = _describe(value)
        else:
            meta["megatron.common"] = f"{COMMON_FILE} holds {brief(obj)}; not converted"
        if tensors:
            meta["megatron.common.tensors"] = (
                f"{len(tensors)} tensors in {COMMON_FILE} (not sharded; not converted): "
                f"{', '.join(tensors[:10])}{', ...' if len(tensors) > 10 else ''}"
            )

    # -- the reader interface, over the names shown ----------------------------------------

    def specs(self) -> CheckpointSpec:
        return self._shown

    def files(self) -> list[str]:
        found = super().files()
        if found:
            found += [os.path.join(self.path, CONFIG_FILE)]
            common = os.path.join(self.path, COMMON_FILE)
            if os.path.isfile(common):
                found.append(common)
        return found

    def chunks(self, name: str) -> list[dcp.Chunk]:
        """The saved chunks holding tensor `name` (for a layer of a stacked tensor, that
        layer's chunks, with offsets in the stacked tensor)."""
        s = self._slices.get(name)
        if s is None:
            return self._stored(name, super().chunks)
        return [self._chunks[s.stored][i] for i in s.chunks]

    def _stored(self, name: str, fn: Callable[[str], _T]) -> _T:
        if name in self._refused:
            raise FormatError(f"{self.path}: tensor {name!r} is not read: {self._refused[name]}")
        if name not in self._shown:
            raise self._missing(name)
        return fn(name)

    def read(self, name: str) -> np.ndarray:
        s = self._slices.get(name)
        if s is None:
            return self._stored(name, super().read)
        spec, n = self._shown[name], len(s.index)
        if len(s.chunks) == 1 and self._chunks[s.stored][s.chunks[0]].sizes[n:] == spec.shape:
            return self._chunk_array(s.stored, s.chunks[0]).reshape(spec.shape)
        out = np.empty(spec.shape, dtype=dtypes.to_numpy(spec.dtype))
        for i in s.chunks:
            c = self._chunks[s.stored][i]
            box = tuple(slice(o, o + d) for o, d in zip(c.offsets[n:], c.sizes[n:], strict=True))
            out[box] = self._chunk_array(s.stored, i).reshape(c.sizes[n:])
            self._release_chunk(s.stored, i)
        out.flags.writeable = False
        return out

    def byte_range(self, name: str) -> ByteRange | None:
        s = self._slices.get(name)
        if s is None:
            return self._stored(name, super().byte_range)
        if len(s.chunks) != 1:
            return None
        c = self._chunks[s.stored][s.chunks[0]]
        if is_object_url(c.file) or math.prod(c.sizes) != self._shown[name].numel:
            return None
        _, placed, start, nbytes = self._extent(s.stored, s.chunks[0])
        ref = placed.ref
        if ref.stride != dcp._c_strides(ref.shape, ref.stride):
            return None
        return local_range(c.file, start, nbytes)

    def release(self, name: str) -> None:
        s = self._slices.get(name)
        if s is None:
            super().release(name)
            return
        for i in s.chunks:
            self._release_chunk(s.stored, i)

    def prefetch(self, name: str) -> None:
        s = self._slices.get(name)
        if s is None:
            super().prefetch(name)
            return
        for i in s.chunks:
            c = self._chunks[s.stored][i]
            if is_object_url(c.file):
                mapped, _, start, nbytes = self._extent(s.stored, i)
                mapped.prefetch(start, nbytes)
            else:
                self._mapped_file(c.file).prefetch(c.offset, c.length)


def open_reader(path: str) -> MegatronReader:
    return MegatronReader(path)
