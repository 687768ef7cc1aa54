"""Hugging Face model folders: which of the weight files beside ``config.json`` to read.

A folder from ``save_pretrained`` or the Hub often holds the same weights several times
(``model.safetensors``, ``pytorch_model.bin``, ``tf_model.h5``, ``flax_model.msgpack``) next to
config and tokenizer files. `choose_weights` picks one by a fixed preference, so the choice is
the same on every machine, and says which others were there. It reads no file, only names,
except in a Hugging Face Trainer checkpoint saved under DeepSpeed (``checkpoint-500/`` with
``global_step500/``, ``latest`` and ``zero_to_fp32.py`` beside the weights file).

There the weights file may be hollow: under ZeRO-3 a module's parameters are partitioned
across ranks and each ``param.data`` is an empty placeholder, so a ``state_dict()`` saved
without gathering (``model.save_pretrained``, ``torch.save(model.state_dict())``, older
transformers' Trainer without ``stage3_gather_16bit_weights_on_model_save``) holds tensors of
0 elements. Transformers 4.57's Trainer deletes such a file and keeps only the ZeRO run; one
that remains would convert into empty tensors. So when a ZeRO run is there, the chosen file's
tensor list is read (a header or a pickle, no data); if it has no tensors, or tensors of 0
elements that the ZeRO run holds with elements, the ZeRO run is read instead and
`WeightsChoice.describe` says why. When both are complete the weights file stays the choice
and the run is named as the other one there.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

from weightbridge.io._obstore import is_object_url

# Preference order: safetensors first (headers only, zero-copy, no pickle), then PyTorch, then
# TensorFlow, then Flax; an index before a single file of the same kind, because the index names
# every tensor of a sharded save while a lone file beside it may be left from an older one.
WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
    "tf_model.h5",
    "flax_model.msgpack",
)


@dataclass(frozen=True, slots=True)
class WeightsChoice:
    """The weights chosen in a folder.

    Attributes:
        folder: the folder.
        chosen: the file name read (one of `WEIGHT_FILES`), or the ZeRO run's tag directory
            (`zero_run`) when the weights file is hollow.
        others: the other weight files present, in preference order.
        extra: whether the folder holds anything else (config, tokenizer, ...).
        zero_run: the DeepSpeed ZeRO run's tag directory in the folder (``global_step500``;
            ``.`` when the folder itself holds the rank files), or "" when there is none.
        hollow: why the weights file was passed over for the ZeRO run, or "".
    """

    folder: str
    chosen: str
    others: tuple[str, ...]
    extra: bool
    zero_run: str = ""
    hollow: str = ""

    @property
    def path(self) -> str:
        if is_object_url(self.folder):  # an object-store prefix
            return self.folder.rstrip("/") + "/" + self.chosen
        return os.path.join(self.folder, self.chosen)

    def describe(self) -> str:
        """One line for people: what was read, and what else was there.

        >>> c = WeightsChoice("m", "model.safetensors", ("tf_model.h5",), True)
        >>> print(c.describe())  # doctest: +NORMALIZE_WHITESPACE
        m: a Hugging Face folder; reading model.safetensors (also there: tf_model.h5; pass a file to
        choose another)
        """
        if self.hollow:
            return (
                f"{self.folder}: a Hugging Face folder with a DeepSpeed ZeRO run; reading the ZeRO "
                f"run {self.chosen} (fp32 master weights), because {self.hollow} (pass "
                f"{self.others[0]} itself to read it anyway)"
            )
        others = list(self.others)
        if self.zero_run:
            others.append(
                f"the DeepSpeed ZeRO run {self.zero_run} (fp32 master weights: pass "
                f"{self._join(self.zero_run)} to read it)"
            )
        also = f" (also there: {', '.join(others)}; pass a file to choose another)"
        return f"{self.folder}: a Hugging Face folder; reading {self.chosen}" + (
            also if others else ""
        )

    def _join(self, name: str) -> str:
        if is_object_url(self.folder):
            return self.folder.rstrip("/") + "/" + name
        return os.path.join(self.folder, name)


def choose_weights(folder: str) -> WeightsChoice | None:
    """The preferred weight file of a Hugging Face folder, or None when it has none of them.

    >>> import tempfile, pathlib
    >>> d = tempfile.mkdtemp()
    >>> for n in ("config.json", "pytorch_model.bin", "model.safetensors"):
    ...     _ = pathlib.Path(d, n).write_bytes(b"")
    >>> c = choose_weights(d)
    >>> c.chosen, c.others, c.extra
    ('model.safetensors', ('pytorch_model.bin',), True)
    """
    if is_object_url(folder):  # a prefix in an object store: its listing, one request
        from weightbridge.io._remote import list_directory

        listing = list_directory(folder)
        names = {e for e in (*listing.files, *listing.dirs) if not e.startswith(".")}
        present = [n for n in WEIGHT_FILES if n in listing.files]
    else:
        try:
            names = {e for e in os.listdir(folder) if not e.startswith(".")}
        except OSError:
            return None
        present = [n for n in WEIGHT_FILES if os.path.isfile(os.path.join(folder, n))]
    if not present:
        return None
    chosen, others = present[0], tuple(present[1:])
    own = {chosen, *others}
    if chosen.endswith(".index.json"):  # its shards are part of the choice, not extras
        stem = chosen.removesuffix(".index.json").rsplit(".", 1)
        own |= {n for n in names if n.startswith(stem[0]) and n.endswith("." + stem[1])}
    choice = WeightsChoice(folder, chosen, others, extra=bool(names - own))
    return _with_zero_run(choice, names)


def _with_zero_run(choice: WeightsChoice, names: set[str]) -> WeightsChoice:
    """`choice`, naming the DeepSpeed ZeRO run beside it, or switched to that run when the
    weights file is hollow (see the module's docstring)."""
    from weightbridge.io import zero

    if zero.LATEST not in names and not any(n.endswith(zero.OPTIM_SUFFIX) for n in names):
        return choice  # no ZeRO run: nothing read
    run = zero._tag_directory(choice.folder)
    if run is None or not zero._listing(run, zero.MODEL_SUFFIX):
        return choice
    tag = run.rstrip("/")[len(choice.folder.rstrip("/")) :].lstrip("/") or "."
    hollow = _hollow(choice.path, run)
    if not hollow:
        return replace(choice, zero_run=tag)
    return replace(choice, chosen=tag, others=(choice.chosen, *choice.others), hollow=hollow)


def _hollow(weights: str, run: str) -> str:
    """Why `weights` does not hold the model the ZeRO run `run` holds, or "" when it does (or
    cannot be read: then reading it says what is wrong)."""
    from weightbridge.errors import WeightbridgeError
    from weightbridge.io import detect_format, open_reader, zero

    name = weights.rstrip("/").rsplit("/", 1)[-1]
    try:
        with open_reader(weights, detect_format(weights)) as r:
            empty = [s.name for s in r.specs() if math.prod(s.shape) == 0]
            total = len(r.specs())
        if total and not empty:
            return ""
        with zero.open_reader(run) as z:
            full = {s.name for s in z.specs() if math.prod(s.shape) > 0}
    except (OSError, WeightbridgeError):
        return ""
    if not total:
        return f"{name} holds no tensors" if full else ""
    placeholders = [n for n in empty if n in full]
    if not placeholders:
        return ""
    return (
        f"{name} holds {len(placeholders)} empty placeholder tensors of {total} (e.g. "
        f"{placeholders[0]!r} has 0 elements; the ZeRO run has it whole): saved under ZeRO-3 "
        "without gathering the weights (stage3_gather_16bit_weights_on_model_save)"
    )
