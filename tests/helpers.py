"""Small helpers several test modules share (imported as ``from helpers import ...``)."""

from __future__ import annotations

import mmap

import numpy as np


def is_memory_map(arr: np.ndarray) -> bool:
    """Whether `arr` is a view of a memory-mapped file (not a copy in anonymous memory).

    Follows the chain of bases: views, memoryviews, and the holder `as_strided` puts between
    an array and the one it was built on.
    """
    base: object = arr
    while True:
        if isinstance(base, memoryview):
            base = base.obj
            continue
        nxt = getattr(base, "base", None)
        if nxt is None:
            return isinstance(base, mmap.mmap)
        base = nxt
