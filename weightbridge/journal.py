"""The resume journal: which output shards of which conversion are committed, and their hashes.

It lives in the destination as ``.weightbridge-journal.json`` and is rewritten atomically (temp
name, fsync, rename) after each shard is committed. A shard is recorded only after its file was
fsynced and renamed into place, so a crash at any point leaves either a recorded, complete shard
or one that the rerun writes again.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from weightbridge.errors import ConversionError

JOURNAL_NAME = ".weightbridge-journal.json"
JOURNAL_VERSION = 1


@dataclass
class Journal:
    """In-memory copy of the journal file of one destination directory."""

    dest: str
    job: str = ""
    shards: dict[str, dict[str, Any]] = field(default_factory=dict)
    complete: bool = False
    outputs: list[str] = field(default_factory=list)

    @property
    def path(self) -> str:
        return os.path.join(self.dest, JOURNAL_NAME)

    @classmethod
    def load(cls, dest: str) -> Journal | None:
        path = os.path.join(dest, JOURNAL_NAME)
        try:
            with open(path, encoding="utf-8") as f:
                obj = json.load(f)
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConversionError(
                f"{path}: resume journal is not valid JSON ({e}); it was edited or damaged. "
                "Delete it (the conversion then starts over) or pass --overwrite"
            ) from e
        if not isinstance(obj, dict) or obj.get("version") != JOURNAL_VERSION:
            raise ConversionError(
                f"{path}: not a weightbridge journal of version {JOURNAL_VERSION}"
            )
        return cls(
            dest,
            str(obj.get("job", "")),
            dict(obj.get("shards") or {}),
            bool(obj.get("complete")),
            list(obj.get("outputs") or []),
        )

    def save(self) -> None:
        body = {
            "version": JOURNAL_VERSION,
            "job": self.job,
            "complete": self.complete,
            "outputs": self.outputs,
            "shards": self.shards,
        }
        tmp = f"{self.path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(body, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fsync_dir(self.dest)

    def record(self, shard: str, size: int, sha256: str) -> None:
        self.shards[shard] = {"size": size, "sha256": sha256}
        self.save()


def fsync_dir(path: str) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
