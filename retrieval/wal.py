"""Write-ahead log: msgpack records in length + CRC framed segments, fsynced on append.

Layout: one directory of segments ``wal-<first_seq:020d>.log``. A record on disk is
``<u32 little-endian length><u32 crc32 of the body><msgpack body>``; every body is a map
with an increasing ``seq``. Invariants:

* a record is acknowledged (``append`` returns) only after its bytes are fsynced (when
  ``durable``), so a kill -9 loses at most unacknowledged records;
* a torn or corrupt tail can only be the end of the newest segment (appends are
  sequential); opening the log truncates it there, so later appends follow valid data;
* ``rotate`` starts a new segment and fsyncs the directory; ``drop_through(seq)`` deletes
  whole segments whose records are all covered by a durable snapshot.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack

_HEADER = struct.Struct("<II")
_PREFIX = "wal-"
_SUFFIX = ".log"
# Largest record body accepted on replay; anything larger is a corrupt length field.
MAX_RECORD_BYTES = 1 << 30


def fsync_dir(path: Path) -> None:
    """fsync a directory so that renames and creations inside it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _segment_name(first_seq: int) -> str:
    return f"{_PREFIX}{first_seq:020d}{_SUFFIX}"


def _segments(directory: Path) -> list[tuple[int, Path]]:
    out = []
    for path in directory.glob(f"{_PREFIX}*{_SUFFIX}"):
        digits = path.name[len(_PREFIX) : -len(_SUFFIX)]
        if digits.isdigit():
            out.append((int(digits), path))
    return sorted(out)


def _read_records(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The valid records of a segment and the byte offset just past the last one."""
    data = path.read_bytes()
    records: list[dict[str, Any]] = []
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, crc = _HEADER.unpack_from(data, offset)
        start = offset + _HEADER.size
        end = start + length
        if length > MAX_RECORD_BYTES or end > len(data):
            break
        body = data[start:end]
        if zlib.crc32(body) != crc:
            break
        try:
            record = msgpack.unpackb(body, raw=False)
        except (ValueError, msgpack.UnpackException):
            break
        records.append(record)
        offset = end
    return records, offset


class WriteAheadLog:
    """An append-only, segmented, fsynced log of msgpack records."""

    def __init__(self, directory: Path, *, durable: bool = True) -> None:
        """Open (creating) the log in ``directory``; call :meth:`replay` before appending."""
        self.directory = Path(directory)
        self.durable = durable
        self.directory.mkdir(parents=True, exist_ok=True)
        self._file: Any = None
        self.last_seq = 0
        self._bytes = 0

    @property
    def size_bytes(self) -> int:
        """Bytes of every segment currently on disk."""
        return self._bytes

    def replay(self, after_seq: int) -> Iterator[dict[str, Any]]:
        """Yield every valid record with ``seq > after_seq`` in order, then open for append.

        The newest segment is truncated after its last valid record.
        """
        segments = _segments(self.directory)
        self.last_seq = after_seq
        total = 0
        for i, (_, path) in enumerate(segments):
            records, valid_end = _read_records(path)
            if i == len(segments) - 1 and valid_end < path.stat().st_size:
                with open(path, "r+b") as fh:
                    fh.truncate(valid_end)
                    fh.flush()
                    os.fsync(fh.fileno())
            total += valid_end
            for record in records:
                seq = int(record["seq"])
                if seq <= self.last_seq:
                    continue
                self.last_seq = seq
                yield record
        self._bytes = total
        if segments:
            self._file = open(segments[-1][1], "ab")
        else:
            self._open_segment(self.last_seq + 1)

    def append(self, record: dict[str, Any]) -> int:
        """Write one record (its ``seq`` is assigned here) durably; returns the seq."""
        if self._file is None:
            raise RuntimeError("WriteAheadLog.replay() must run before append()")
        seq = self.last_seq + 1
        body = msgpack.packb({**record, "seq": seq}, use_bin_type=True)
        self._file.write(_HEADER.pack(len(body), zlib.crc32(body)))
        self._file.write(body)
        self._file.flush()
        if self.durable:
            os.fsync(self._file.fileno())
        self.last_seq = seq
        self._bytes += _HEADER.size + len(body)
        return seq

    def rotate(self) -> None:
        """Start a new segment for records after ``last_seq``."""
        self._close_file()
        self._open_segment(self.last_seq + 1)

    def drop_through(self, seq: int) -> None:
        """Delete segments holding only records with ``seq`` or lower (never the open one)."""
        segments = _segments(self.directory)
        for i, (_, path) in enumerate(segments):
            next_first = segments[i + 1][0] if i + 1 < len(segments) else None
            if next_first is not None and next_first - 1 <= seq:
                self._bytes -= path.stat().st_size
                path.unlink()
        fsync_dir(self.directory)

    def close(self) -> None:
        """Close the open segment (all appended records are already durable)."""
        self._close_file()

    def _open_segment(self, first_seq: int) -> None:
        path = self.directory / _segment_name(first_seq)
        self._file = open(path, "ab")
        fsync_dir(self.directory)

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.flush()
            if self.durable:
                os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
