"""Where a conversion's shards go: a local directory or an object store.

The protocols are in `base`; `local` is a directory on this machine, `object_store` a kvstore
(``s3://``, ``gs://``, ``memory://``, or a local directory holding zarr/orbax output).
`TensorstoreDestination` is imported on first use (it needs tensorstore).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from weightbridge._files import fsync_dir
from weightbridge.streaming.dest.base import Completed, Destination, ShardSink
from weightbridge.streaming.dest.local import LocalDirectory, destination_for

if TYPE_CHECKING:
    from weightbridge.streaming.dest.object_store import TensorstoreDestination

__all__ = [
    "Completed",
    "Destination",
    "LocalDirectory",
    "ShardSink",
    "TensorstoreDestination",
    "destination_for",
    "fsync_dir",
]


def __getattr__(name: str) -> Any:
    # Lazily, so `import weightbridge` never imports tensorstore.
    if name == "TensorstoreDestination":
        from weightbridge.streaming.dest.object_store import TensorstoreDestination

        return TensorstoreDestination
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
