"""Where a conversion's shards go: a local directory or an object store."""

from weightbridge.streaming.dest.local import (
    Destination,
    LocalDirectory,
    ShardSink,
    destination_for,
    fsync_dir,
)

__all__ = ["Destination", "LocalDirectory", "ShardSink", "destination_for", "fsync_dir"]
