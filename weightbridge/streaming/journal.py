"""The resume bookkeeping: which output shards of which conversion are committed, and their hashes.

Two kinds of files in the destination, so that many writers never contend and a conversion of
N shards writes O(N) bytes of bookkeeping however it runs (an object store uploads each file
whole, so a journal rewritten after every shard would upload O(N^2) bytes):

* each committed shard's own *record* (``.weightbridge/committed/<shard>.json``: job, size,
  checksum; `weightbridge.streaming.tasks`), written once by whoever committed the shard (this
  process, a worker process, a partition run), only after the shard is under its final name;
* the *journal* ``.weightbridge-journal.json`` (job, outputs, source files, completion),
  written when a conversion starts and once more when the converter
  (`weightbridge.streaming.convert`) has finished it, then listing every shard's size and
  checksum.

A crash at any point leaves either a recorded, complete shard or one that the rerun writes
again. A rerun loads the journal, lists the records once and reads those of the shards it
still needs (`Journal.recorded`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from weightbridge.errors import ConversionError
from weightbridge.streaming.tasks import (
    RECORD_PREFIX,
    ShardRecord,
    read_record,
    record_name,
    write_record,
)

if TYPE_CHECKING:  # the object-store destination imports JOURNAL_NAME from here
    from weightbridge.streaming.dest.base import Destination

JOURNAL_NAME = ".weightbridge-journal.json"
JOURNAL_VERSION = 2  # 2: shard checksums are CRC-32 + size (were sha256)


@dataclass
class Journal:
    """In-memory copy of the journal of one destination."""

    dest: Destination
    job: str = ""
    # Every shard known committed: written to the file at the start (what an earlier, finished
    # run listed) and at the end; in between, each shard's own record says it.
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
        """Write the journal (at a conversion's start and end only: see the module docstring)."""
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
        """`shard` is committed: write its own record (the journal file is not rewritten)."""
        stamp = self.dest.stamp(shard)
        write_record(self.dest, self.job, ShardRecord(shard, size, checksum, stamp))
        # (the stamp stays in the record: the journal's bytes must not depend on the run)
        self.shards[shard] = {"size": size, "checksum": checksum}

    def recorded(self, names: Sequence[str]) -> dict[str, dict[str, Any]]:
        """``{"size", "checksum"}`` of each of `names` that the journal or a record of this job
        says is committed (not yet checked against the shard itself).

        The records are listed once; only those of shards the journal does not list are read.
        """
        found = {n: self.shards[n] for n in names if n in self.shards}
        missing = [n for n in names if n not in found]
        if missing:
            listed = set(self.dest.names(RECORD_PREFIX))
            for n in missing:
                if record_name(n) in listed:
                    rec = read_record(self.dest, self.job, n)
                    if rec is not None:
                        found[n] = rec
        return found
