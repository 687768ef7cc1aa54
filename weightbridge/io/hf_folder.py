"""Hugging Face model folders: which of the weight files beside ``config.json`` to read.

A folder from ``save_pretrained`` or the Hub often holds the same weights several times
(``model.safetensors``, ``pytorch_model.bin``, ``tf_model.h5``, ``flax_model.msgpack``) next to
config and tokenizer files. `choose_weights` picks one by a fixed preference, so the choice is
the same on every machine, and says which others were there. It reads no file, only names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

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
        chosen: the file name read (one of `WEIGHT_FILES`).
        others: the other weight files present, in preference order.
        extra: whether the folder holds anything else (config, tokenizer, ...).
    """

    folder: str
    chosen: str
    others: tuple[str, ...]
    extra: bool

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
        also = f" (also there: {', '.join(self.others)}; pass a file to choose another)"
        return f"{self.folder}: a Hugging Face folder; reading {self.chosen}" + (
            also if self.others else ""
        )


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
    return WeightsChoice(folder, chosen, others, extra=bool(names - own))
