"""Atomic file writes: a file that others read (split.json, an experiment mirror) is written beside its
place under a temporary name, then moved onto it with `os.replace`, so a reader sees the old file or the
new one, never half of one."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["PART_SUFFIX", "atomic_path", "atomic_write_bytes", "atomic_write_text"]

PART_SUFFIX = ".part"  # the temporary files' suffix; what copies a folder (search.storage.push) skips them


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path in `path`'s folder (made if missing) to write to; moved onto `path` when the block
    ends without an error, deleted when it raises. The name is unique, so two writers never share it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{PART_SUFFIX}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically; returns `path`."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically; returns `path`."""
    return atomic_write_bytes(path, text.encode(encoding))
