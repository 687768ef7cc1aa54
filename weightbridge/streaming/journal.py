"""The resume journal: which output shards of which conversion are committed, and their hashes.

It lives in the destination as ``.weightbridge-journal.json``. A conversion run in this process
rewrites it atomically after each shard is committed; one whose shards are tasks in other
processes (or partitions) writes it at the start and once at the end, while each shard's own
record (`weightbridge.streaming.tasks`) says it is committed in between. A shard is recorded only
after it was committed under its final name, so a crash at any point leaves either a recorded,
complete shard or one that the rerun writes again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from weightbridge.errors import ConversionError

if TYPE_CHECKING:  # the object-store destination imports JOURNAL_NAME from here
    from weightbridge.streaming.dest.base import Destination

JOURNAL_NAME = ".weightbridge-journal.json"
JOURNAL_VERSION = 2  # 2: shard checksums are CRC-32 + size (were sha256)


@dataclass
class Journal:
    """In-memory copy of the journal of one destination."""

    dest: Destination
    job: str = ""
    shards: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Written by the converter (`weightbridge.streaming.convert`) alone, after
    # `Destination.finalize`; kept in the file for people and tools, never read back to act on.
    complete: bool = False
    outputs: list[str] = field(default_factory=list)
    source: list[list[Any]] = field(default_factory=list)  # [path, size, mtime_ns] per file

    @classmethod
    def load(cls, dest: Destination) -> Journal | None:
        obj = dest.read_json(JOURNAL_NAME)
        if obj is None:
            return None
        if not isinstance(obj, dict) or obj.get("version") != JOURNAL_VERSION:
            raise ConversionError(
                f"{dest.url}: {JOURNAL_NAME} is not a weightbridge journal of version "
                f"{JOURNAL_VERSION}; delete it or pass --overwrite"
            )
        return cls(
            dest,
            str(obj.get("job", "")),
            dict(obj.get("shards") or {}),
            bool(obj.get("complete")),
            list(obj.get("outputs") or []),
            list(obj.get("source") or []),
        )

    def save(self) -> None:
        self.dest.write_json(
            JOURNAL_NAME,
            {
                "version": JOURNAL_VERSION,
                "job": self.job,
                "complete": self.complete,
                "outputs": self.outputs,
                "source": self.source,
                "shards": self.shards,
            },
        )

    def record(self, shard: str, size: int, checksum: str) -> None:
        self.shards[shard] = {"size": size, "checksum": checksum}
        self.save()
