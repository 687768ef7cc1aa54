"""DeepSpeed ZeRO checkpoints (stages 1, 2 and 3): the consolidated fp32 weights, read lazily
without DeepSpeed or torch.

Layout (``engine.save_checkpoint(dir)``):

- ``dir/latest`` names the newest tag (``global_step1000``); ``dir/<tag>/`` holds the files.
- ``mp_rank_00_model_states.pt`` (stages 1-2), or ``zero_pp_rank_{r}_mp_rank_00_model_states.pt``
  for each data-parallel rank r (stage 3): ``param_shapes`` (one ordered dict per parameter
  group: name -> shape, in the order the group's flat vector holds them), ``buffer_names``,
  ``module`` (the buffers; in stages 1-2 the 16-bit weights too), ``frozen_param_shapes`` and
  ``frozen_param_fragments`` (parameters the optimizer does not update), ``shared_params``
  (tied names).
- ``[bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt`` for each rank: its
  ``optimizer_state_dict`` holds ``zero_stage``, ``partition_count`` and the fp32 master
  weights: in stages 1-2 ``single_partition_of_fp32_groups`` (rank r's contiguous slice of
  each group's flat vector, so a group is the ranks' slices one after another), in stage 3
  ``fp32_flat_groups`` (rank r's ``ceil(numel / ranks)`` elements of *every* parameter, so a
  parameter is its slices from rank 0, 1, ... one after another, cut to its size). The
  optimizer's moments sit beside them and are never read.

A parameter is thus a list of byte ranges in the ranks' files, concatenated, then reshaped:
DeepSpeed's ``zero_to_fp32`` (``get_fp32_state_dict_from_zero_checkpoint``), whose output this
reader equals bit for bit, tensor for tensor, in its order (buffers, frozen, trainable, tied).
Specs come from the pickles alone; a parameter inside one rank's slice is a memory-mapped view,
one spanning ranks is assembled into one new array, so memory stays within the largest tensor.
In an object store the run is a prefix, listed like a directory; the pickles come by a few
ranged reads each, and a parameter's piece of a rank's fp32 partition by one ranged read of
exactly its bytes: the partition is a stored (uncompressed) zip member, so no read ever
fetches a whole optimizer-states file, nor the moments beside the weights.

The pickles are read by the restricted unpickler of `weightbridge.io._pickle`, with DeepSpeed's
few classes stubbed (the stage enum becomes its number, loss scalers and fragment addresses
inert objects): nothing from the files runs. Not read: model- or pipeline-parallel checkpoints
(``mp_rank_01``, ``layer_*``), which ``zero_to_fp32`` does not consolidate either, AutoEP expert
partitions, and universal checkpoints; each is refused by name.
"""

from __future__ import annotations

import bisect
import math
import os
import re
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from weightbridge import dtypes
from weightbridge.errors import FormatError, SpecError, WeightbridgeError
from weightbridge.io._obstore import is_object_url
from weightbridge.io._pickle import TensorRef, _BadPickle, _Global, _Inert, brief
from weightbridge.io.base import BaseReader, ByteRange, open_source, source_join, source_listdir
from weightbridge.io.torch import TorchReader
from weightbridge.spec import MAX_NBYTES, CheckpointSpec, TensorSpec

NAME = "zero"
# Its files are torch.save zips named *.pt; the checkpoint is detected as a directory layout.
SUFFIXES = (".pt",)

LATEST = "latest"
OPTIM_SUFFIX = "_optim_states.pt"
MODEL_SUFFIX = "_model_states.pt"
# `latest` holds a tag such as "global_step1000"; a file of more bytes is not DeepSpeed's.
_MAX_TAG_BYTES = 1024
_FLOATS = frozenset({"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"})
# A stage number: DeepSpeed's ZeroStageEnum (disabled, optimizer_states, gradients, weights).
_STAGES = range(4)


def _stage(value: Any) -> int:
    """`deepspeed.runtime.zero.config.ZeroStageEnum(value)` as a pickle calls it."""
    if isinstance(value, bool) or not isinstance(value, int) or value not in _STAGES:
        raise _BadPickle(f"a ZeRO stage must be 0-3, found {brief(value)}")
    return value


# DeepSpeed's classes in a ZeRO checkpoint's pickles, each as a stand-in that runs nothing.
ZERO_GLOBALS: dict[tuple[str, str], Any] = {
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"): _Global(_stage),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"): _Inert,
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"): _Inert,
    ("deepspeed.utils.tensor_fragment", "fragment_address"): _Inert,
}


# --------------------------------------------------------------------------------------------
# Finding the checkpoint.


def _natural(text: str) -> list[Any]:
    """Sort key putting rank 2 before rank 10, as DeepSpeed's own loader does."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text)]


def _names(directory: str) -> list[str]:
    """What a local directory or an object-store prefix holds; empty if it cannot be read."""
    try:
        return source_listdir(directory)
    except (OSError, WeightbridgeError):
        return []


def _listing(directory: str, suffix: str) -> list[str]:
    return sorted((n for n in _names(directory) if n.endswith(suffix)), key=_natural)


def _tag_directory(path: str) -> str | None:
    """The directory holding the `.pt` files: `path` itself, or the tag `latest` names. In an
    object store, a prefix: its listing says which files are there."""
    if is_object_url(path):
        path = path.rstrip("/")
    elif not os.path.isdir(path):
        return None
    names = _names(path)
    if any(n.endswith(OPTIM_SUFFIX) for n in names):
        return path
    if LATEST not in names:
        return None
    try:
        with open_source(source_join(path, LATEST)) as f:
            raw = f.read(_MAX_TAG_BYTES + 1)
        tag = raw.decode("utf-8").strip()
    except (OSError, UnicodeDecodeError, WeightbridgeError):
        return None
    if len(raw) > _MAX_TAG_BYTES or not tag or "/" in tag or "\\" in tag or tag in (".", ".."):
        return None
    inner = source_join(path, tag)
    return inner if _listing(inner, OPTIM_SUFFIX) else None


def detect(path: str, head: bytes) -> bool:
    """True for a ZeRO checkpoint directory: `*_optim_states.pt` and `*_model_states.pt` files,
    or a ``latest`` file naming a subdirectory with them."""
    if is_object_url(path) and head:  # an object, not a prefix: no listing needed to say no
        return False
    found = _tag_directory(path)
    return found is not None and bool(_listing(found, MODEL_SUFFIX))


# --------------------------------------------------------------------------------------------
# Where each tensor's elements are.


@dataclass(frozen=True, slots=True)
class _Piece:
    """Elements ``start:start + count`` of a tensor of one file (flattened in C order)."""

    file: int  # index into ZeroReader._files
    ref: TensorRef
    what: str  # names the tensor in errors
    start: int
    count: int


@dataclass(frozen=True, slots=True)
class _Entry:
    spec: TensorSpec
    pieces: tuple[_Piece, ...]


class _Flat:
    """Tensors of files laid end to end (a group across ranks, or a rank's groups): the pieces
    of any element range, found by bisection."""

    def __init__(self, parts: list[tuple[int, TensorRef, str]]) -> None:
        self.parts = parts
        self.starts = [0]
        for _, ref, _ in parts:
            self.starts.append(self.starts[-1] + math.prod(ref.shape))

    @property
    def numel(self) -> int:
        return self.starts[-1]

    def pieces(self, lo: int, hi: int) -> list[_Piece]:
        out = []
        i = bisect.bisect_right(self.starts, lo) - 1
        while lo < hi and i < len(self.parts):
            file, ref, what = self.parts[i]
            end = min(hi, self.starts[i + 1])
            if end > lo:
                out.append(_Piece(file, ref, what, lo - self.starts[i], end - lo))
            lo = end
            i += 1
        return out


def _field(obj: Any, key: str, where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise FormatError(
            f"{where}: no {key!r} in it; this is not a DeepSpeed ZeRO checkpoint file (or one "
            "this reader does not know)"
        )
    return obj[key]


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_NBYTES for d in value
    ):
        raise FormatError(f"{where}: a shape must be a tuple of sizes, found {brief(value)}")
    return tuple(value)


def _shapes(value: Any, where: str) -> dict[str, tuple[int, ...]]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise FormatError(f"{where}: expected a dict of name -> shape, found {brief(value)}")
    return {k: _shape(v, f"{where} {k!r}") for k, v in value.items()}


class ZeroReader(BaseReader):
    """Reads the consolidated fp32 weights of a DeepSpeed ZeRO checkpoint (stages 1-3)."""

    def __init__(self, path: str) -> None:
        path = os.fspath(path)
        found = _tag_directory(path)
        if found is None:
            raise FormatError(
                f"{path}: not a DeepSpeed ZeRO checkpoint: no *{OPTIM_SUFFIX} files, and no "
                f"'{LATEST}' file naming a directory with them"
            )
        self.path = found
        self._files: list[TorchReader] = []
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    # -- opening --------------------------------------------------------------------------

    def _torch(self, name: str) -> tuple[int, Any]:
        reader = TorchReader(source_join(self.path, name), extra_globals=ZERO_GLOBALS)
        self._files.append(reader)
        return len(self._files) - 1, reader.pickled

    def _open(self) -> None:
        optim_names = _listing(self.path, OPTIM_SUFFIX)
        model_names = _listing(self.path, MODEL_SUFFIX)
        other = [n for n in optim_names + model_names if re.search(r"mp_rank_(?!00_)\d+", n)]
        if other or any(n.startswith("layer_") for n in _names(self.path)):
            raise FormatError(
                f"{self.path}: a model- or pipeline-parallel ZeRO checkpoint ({(other or ['layer_*'])[0]}); "
                "weightbridge reads data-parallel ones (mp_rank_00 only), as zero_to_fp32 does. "
                "Consolidate it with DeepSpeed's ds_to_universal.py first"
            )
        optim: list[tuple[int, dict[str, Any]]] = []
        for name in optim_names:
            index, obj = self._torch(name)
            state = _field(obj, "optimizer_state_dict", self._files[index].path)
            optim.append((index, state))
        first_file = self._files[optim[0][0]].path
        stage = _field(optim[0][1], "zero_stage", first_file)
        if not isinstance(stage, int) or stage not in (1, 2, 3):
            raise FormatError(f"{first_file}: zero_stage {brief(stage)} is not 1, 2 or 3")
        world = _field(optim[0][1], "partition_count", first_file)
        if isinstance(world, list) and world and all(isinstance(w, int) for w in world):
            world = max(world)  # stages 1-2 keep one count per group (experts may differ)
        if not isinstance(world, int) or world != len(optim):
            raise FormatError(
                f"{self.path}: the checkpoint was saved by {brief(world)} ranks, but "
                f"{len(optim)} *{OPTIM_SUFFIX} files are here; one is missing or left from "
                "another run"
            )
        key = "single_partition_of_fp32_groups" if stage <= 2 else "fp32_flat_groups"
        groups: list[list[tuple[int, TensorRef, str]]] = []
        for rank, (index, state) in enumerate(optim):
            where = self._files[index].path
            flat = _field(state, key, where)
            if not isinstance(flat, list) or not all(
                isinstance(t, TensorRef) and len(t.shape) == 1 for t in flat
            ):
                raise FormatError(f"{where}: {key} must be a list of 1-D tensors")
            if groups and len(flat) != len(groups[0]):
                raise FormatError(
                    f"{where}: {len(flat)} parameter groups, rank 0 has {len(groups[0])}"
                )
            groups.append([(index, t, f"{key}[{i}] of rank {rank}") for i, t in enumerate(flat)])

        if stage <= 2:
            (model_index, model) = self._torch("mp_rank_00_model_states.pt")
            models = [(model_index, model)]
        else:
            names = [n for n in model_names if n.startswith("zero_pp_rank_")]
            if len(names) != world:
                raise FormatError(
                    f"{self.path}: a stage-3 checkpoint of {world} ranks has one "
                    f"zero_pp_rank_R_mp_rank_00{MODEL_SUFFIX} per rank; found {names}"
                )
            models = [self._torch(n) for n in names]
        model_index, model = models[0]
        model_file = self._files[model_index].path
        self._entries: dict[str, _Entry] = {}
        self._add_buffers(model_index, model, model_file)
        self._add_frozen(models, stage, model_file)
        param_shapes = _field(model, "param_shapes", model_file)
        if not isinstance(param_shapes, list):
            raise FormatError(f"{model_file}: param_shapes must be a list (one per group)")
        shapes = [_shapes(s, f"{model_file}: param_shapes") for s in param_shapes]
        if stage <= 2:
            paddings = optim[0][1].get("param_alignment_paddings")
            self._add_zero2(shapes, groups, world, paddings)
        else:
            self._add_zero3(shapes, groups, world)
        shared = model.get("shared_params") or {}
        if not isinstance(shared, dict):
            raise FormatError(f"{model_file}: shared_params must be a dict")
        for alias, name in shared.items():
            if isinstance(alias, str) and name in self._entries:
                self._entries[alias] = _Entry(
                    self._entries[name].spec.renamed(alias), self._entries[name].pieces
                )
        meta = {
            "zero.stage": str(stage),
            "zero.world_size": str(world),
            "zero.tag": os.path.basename(self.path),
            "zero.note": "fp32 master weights from the optimizer states (as zero_to_fp32); the "
            "optimizer moments are not read",
        }
        module = model.get("module")
        left = [
            k
            for k, v in (module.items() if isinstance(module, dict) else ())
            if k not in self._entries and isinstance(v, TensorRef) and all(v.shape)
        ]
        if left:
            meta["zero.not_consolidated"] = (
                f"{len(left)} tensor(s) of the module's state are neither parameters the "
                f"optimizer holds nor recorded frozen parameters or buffers, so zero_to_fp32 "
                f"leaves them out too: {', '.join(left[:8])}{', ...' if len(left) > 8 else ''}"
            )
        version = model.get("ds_version")
        if isinstance(version, str):
            meta["zero.ds_version"] = version
        try:
            self._spec = CheckpointSpec(tuple(e.spec for e in self._entries.values()), meta)
        except SpecError as e:
            raise FormatError(f"{self.path}: {e}") from e

    def _add(self, name: Any, shape: tuple[int, ...], dtype: str, pieces: list[_Piece]) -> None:
        if not isinstance(name, str):
            raise FormatError(f"{self.path}: a parameter name must be a string, found {name!r}")
        if name in self._entries:
            raise FormatError(f"{self.path}: tensor {name!r} appears twice")
        if sum(p.count for p in pieces) != math.prod(shape):
            raise FormatError(
                f"{self.path}: tensor {name!r} of shape {shape} needs {math.prod(shape)} "
                f"elements; its pieces hold {sum(p.count for p in pieces)}"
            )
        self._entries[name] = _Entry(TensorSpec(name, shape, dtype), tuple(pieces))

    def _whole(self, file: int, ref: Any, what: str) -> tuple[_Piece, str]:
        if not isinstance(ref, TensorRef) or ref.code is None:
            raise FormatError(f"{self._files[file].path}: {what} is {brief(ref)}, not a tensor")
        return _Piece(file, ref, what, 0, math.prod(ref.shape)), ref.code

    def _add_buffers(self, index: int, model: Any, where: str) -> None:
        names = model.get("buffer_names") or []
        module = _field(model, "module", where)
        if not isinstance(names, list) or not isinstance(module, dict):
            raise FormatError(f"{where}: buffer_names must be a list and module a dict")
        for name in names:
            if name not in module:
                continue  # zero_to_fp32 keeps only the buffers the module holds
            piece, code = self._whole(index, module[name], f"buffer {name!r}")
            # zero_to_fp32 restores float buffers to fp32 ("saved in fp16"): read as F32.
            self._add(name, piece.ref.shape, "F32" if code in _FLOATS else code, [piece])

    def _add_frozen(self, models: list[tuple[int, Any]], stage: int, where: str) -> None:
        """Parameters the optimizer does not hold: whole in rank 0's model states (stages 1-2),
        or ceil(numel / ranks) elements in each rank's, the last padded (stage 3)."""
        frozen = models[0][1].get("frozen_param_shapes")
        if not frozen:
            return
        for name, shape in _shapes(frozen, f"{where}: frozen_param_shapes").items():
            fragments = []
            for index, model in models if stage == 3 else models[:1]:
                held = _field(model, "frozen_param_fragments", self._files[index].path)
                piece, code = self._whole(
                    index, _field(held, name, self._files[index].path), f"frozen {name!r}"
                )
                fragments.append((index, piece.ref, piece.what))
            flat, n = _Flat(fragments), math.prod(shape)
            if flat.numel < n:
                raise FormatError(
                    f"{self.path}: frozen {name!r} of shape {shape} needs {n} elements; its "
                    f"fragments hold {flat.numel}"
                )
            self._add(name, shape, code, flat.pieces(0, n))

    def _add_zero2(
        self,
        shapes: list[dict[str, tuple[int, ...]]],
        groups: list[list[tuple[int, TensorRef, str]]],
        world: int,
        paddings: Any,
    ) -> None:
        """Stages 1-2: group i is the ranks' partitions i end to end; its parameters follow one
        another in it (with alignment padding after each, in newer DeepSpeed)."""
        if len(shapes) != len(groups[0]):
            raise FormatError(
                f"{self.path}: param_shapes has {len(shapes)} groups, the optimizer states "
                f"{len(groups[0])}"
            )
        align = 2 * world  # DeepSpeed pads each group to a multiple of this
        for i, group_shapes in enumerate(shapes):
            flat = _Flat([groups[r][i] for r in range(world)])
            pads = paddings[i] if isinstance(paddings, list) and i < len(paddings) else None
            if pads is not None and (not isinstance(pads, list) or len(pads) != len(group_shapes)):
                raise FormatError(
                    f"{self.path}: param_alignment_paddings of group {i} must list one padding "
                    f"per parameter ({len(group_shapes)})"
                )
            offset = 0
            for k, (name, shape) in enumerate(group_shapes.items()):
                n = math.prod(shape)
                self._add(name, shape, "F32", flat.pieces(offset, offset + n))
                offset += n + (int(pads[k]) if pads is not None else 0)
            if -(-offset // align) != -(-flat.numel // align):
                raise FormatError(
                    f"{self.path}: group {i}'s parameters take {offset} elements, but the ranks' "
                    f"fp32 partitions hold {flat.numel}; the checkpoint is inconsistent"
                )

    def _add_zero3(
        self,
        shapes: list[dict[str, tuple[int, ...]]],
        groups: list[list[tuple[int, TensorRef, str]]],
        world: int,
    ) -> None:
        """Stage 3: every rank holds ceil(numel / ranks) elements of each parameter, in order."""
        ranks = [_Flat(groups[r]) for r in range(world)]
        if len({r.numel for r in ranks}) != 1:
            raise FormatError(
                f"{self.path}: the ranks' fp32 partitions differ in size "
                f"{[r.numel for r in ranks]}; stage 3 partitions are equal"
            )
        offset = 0
        for group_shapes in shapes:
            for name, shape in group_shapes.items():
                n = math.prod(shape)
                part = -(-n // world)
                pieces = [p for r in ranks for p in r.pieces(offset, offset + part)]
                self._add(name, shape, "F32", _first(pieces, n))
                offset += part
        if offset != ranks[0].numel:
            raise FormatError(
                f"{self.path}: the parameters take {offset} elements of each rank's fp32 "
                f"partition, which holds {ranks[0].numel}; the checkpoint is inconsistent"
            )

    # -- reading --------------------------------------------------------------------------

    def _piece_array(self, piece: _Piece) -> np.ndarray:
        ref, file = piece.ref, self._files[piece.file]
        if piece.count != math.prod(ref.shape) and _c_contiguous(ref):
            # Only the piece's elements: a view of the same storage, so from an object store
            # one ranged read fetches them, never the rank's whole fp32 partition.
            part = replace(ref, offset=ref.offset + piece.start, shape=(piece.count,), stride=(1,))
            return file.read_ref(part, piece.what)
        whole = file.read_ref(ref, piece.what)
        return whole.reshape(-1)[piece.start : piece.start + piece.count]

    def read(self, name: str) -> np.ndarray:
        entry = self._entries.get(name)
        if entry is None:
            raise self._missing(name)
        spec, pieces = entry.spec, entry.pieces
        dt = dtypes.to_numpy(spec.dtype)
        if len(pieces) == 1 and pieces[0].ref.code == spec.dtype:
            return self._piece_array(pieces[0]).reshape(spec.shape)
        out = np.empty(spec.numel, dtype=dt)
        pos = 0
        for p in pieces:
            out[pos : pos + p.count] = self._piece_array(p)
            pos += p.count
            self._release_piece(p)
        out.flags.writeable = False
        return out.reshape(spec.shape)

    def _piece_range(self, piece: _Piece) -> ByteRange | None:
        whole = self._files[piece.file].ref_range(piece.ref, piece.what)
        if whole is None:
            return None
        item = dtypes.itemsize(piece.ref.code or "U8")
        return ByteRange(whole.path, whole.offset + piece.start * item, piece.count * item)

    def byte_range(self, name: str) -> ByteRange | None:
        """The bytes of a tensor that lies inside one rank's partition, in its dtype."""
        entry = self._entries.get(name)
        if entry is None or len(entry.pieces) != 1:
            return None
        piece = entry.pieces[0]
        return self._piece_range(piece) if piece.ref.code == entry.spec.dtype else None

    def _release_piece(self, piece: _Piece) -> None:
        found = self._piece_range(piece)
        if found is not None:
            self._files[piece.file].release_bytes(found.offset, found.length)

    def release(self, name: str) -> None:
        entry = self._entries.get(name)
        for p in entry.pieces if entry is not None else ():
            self._release_piece(p)

    def files(self) -> list[str]:
        return [path for f in self._files for path in f.files()]

    def close(self) -> None:
        for f in self._files:
            f.close()


def _c_contiguous(ref: TensorRef) -> bool:
    """Whether a tensor's elements are its storage's, in C order (dimensions of size 1 aside)."""
    step = 1
    for d, s in zip(reversed(ref.shape), reversed(ref.stride), strict=True):
        if d != 1 and s != step:
            return False
        step *= d
    return True


def _first(pieces: list[_Piece], n: int) -> list[_Piece]:
    """The pieces cut to their first `n` elements (dropping stage 3's padding at the end)."""
    out, left = [], n
    for p in pieces:
        if left <= 0:
            break
        take = min(left, p.count)
        out.append(_Piece(p.file, p.ref, p.what, p.start, take))
        left -= take
    return out


def open_reader(path: str) -> ZeroReader:
    return ZeroReader(path)
