"""Atomic snapshots: a directory of files written temp -> fsync -> rename -> dir fsync.

A snapshot of a collection at log sequence ``seq`` is the directory
``snap-<seq:020d>`` holding whatever files the collection writes (state, vectors, index).
Invariants:

* a directory named ``snap-<digits>`` is complete: it only ever appears by an atomic
  rename of a fully written and fsynced temporary directory (``*.tmp``);
* the newest complete snapshot plus the log records after its ``seq`` is the state;
* leftovers of an interrupted write (``*.tmp``) are removed on the next load.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

from retrieval.wal import fsync_dir

_PREFIX = "snap-"
_TMP = ".tmp"

#: Writes one file of the snapshot at the given path.
FileWriter = Callable[[Path], None]


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def snapshot_dirs(directory: Path) -> list[tuple[int, Path]]:
    """Complete snapshots in ``directory``, oldest first."""
    out = []
    for path in Path(directory).glob(f"{_PREFIX}*"):
        digits = path.name[len(_PREFIX) :]
        if path.is_dir() and digits.isdigit():
            out.append((int(digits), path))
    return sorted(out)


def latest_snapshot(directory: Path) -> tuple[int, Path] | None:
    """The newest complete snapshot as ``(seq, path)``, or None."""
    found = snapshot_dirs(directory)
    return found[-1] if found else None


def remove_leftovers(directory: Path) -> None:
    """Delete temporary directories of interrupted snapshot writes."""
    for path in Path(directory).glob(f"{_PREFIX}*{_TMP}"):
        shutil.rmtree(path, ignore_errors=True)


def write_snapshot(directory: Path, seq: int, files: Mapping[str, FileWriter]) -> Path:
    """Write a snapshot for ``seq`` atomically and return its directory.

    Each writer fills one file; every file and the temporary directory are fsynced before
    the rename, and the parent directory after it.
    """
    directory = Path(directory)
    final = directory / f"{_PREFIX}{seq:020d}"
    if final.exists():
        return final
    tmp = directory / f"{_PREFIX}{seq:020d}{_TMP}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, writer in files.items():
        path = tmp / name
        writer(path)
        _fsync_file(path)
    fsync_dir(tmp)
    os.rename(tmp, final)
    fsync_dir(directory)
    return final


def remove_older_than(directory: Path, seq: int) -> None:
    """Delete complete snapshots older than ``seq`` (after a newer one is durable)."""
    for old_seq, path in snapshot_dirs(directory):
        if old_seq < seq:
            shutil.rmtree(path, ignore_errors=True)


def dir_bytes(directory: Path) -> int:
    """Bytes of the files under ``directory``; files (or the whole directory) removed
    while it counts (a snapshot dropping old files, a concurrent delete) count as 0, never
    as an error: ``os.walk`` skips directories it cannot list."""
    total = 0
    for root, _dirs, files in os.walk(directory):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total
