"""Write-ahead log framing/recovery and atomic snapshots."""

from __future__ import annotations

import os

import pytest

from retrieval import snapshot as snap
from retrieval.wal import WriteAheadLog


def open_log(path, after=0):
    wal = WriteAheadLog(path)
    records = list(wal.replay(after))
    return wal, records


def test_records_round_trip_in_order(tmp_path):
    wal, records = open_log(tmp_path)
    assert records == []
    for i in range(5):
        assert wal.append({"op": "u", "n": i, "blob": bytes([i]) * 3}) == i + 1
    wal.close()
    _, records = open_log(tmp_path)
    assert [r["n"] for r in records] == [0, 1, 2, 3, 4]
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5]
    assert records[2]["blob"] == b"\x02\x02\x02"


def test_replay_skips_records_covered_by_a_snapshot(tmp_path):
    wal, _ = open_log(tmp_path)
    for i in range(6):
        wal.append({"n": i})
    wal.close()
    wal, records = open_log(tmp_path, after=4)
    assert [r["seq"] for r in records] == [5, 6]
    assert wal.append({"n": 6}) == 7


@pytest.mark.parametrize("cut", [1, 5, 9, 12])
def test_torn_tail_is_truncated_and_appends_continue(tmp_path, cut):
    wal, _ = open_log(tmp_path)
    wal.append({"n": 0})
    wal.append({"n": 1, "pad": "x" * 40})
    wal.close()
    (segment,) = (tmp_path).glob("wal-*.log")
    size = segment.stat().st_size
    with open(segment, "r+b") as fh:
        fh.truncate(size - cut)  # a kill -9 in the middle of the last append
    wal, records = open_log(tmp_path)
    assert [r["n"] for r in records] == [0]
    assert wal.append({"n": 2}) == 2
    wal.close()
    _, records = open_log(tmp_path)
    assert [r["n"] for r in records] == [0, 2]


def test_corrupt_record_ends_replay(tmp_path):
    wal, _ = open_log(tmp_path)
    for i in range(3):
        wal.append({"n": i, "pad": "y" * 20})
    wal.close()
    (segment,) = tmp_path.glob("wal-*.log")
    data = bytearray(segment.read_bytes())
    data[-5] ^= 0xFF  # flip a byte inside the last record's body: CRC mismatch
    segment.write_bytes(bytes(data))
    _, records = open_log(tmp_path)
    assert [r["n"] for r in records] == [0, 1]


def test_rotate_and_drop_through_remove_covered_segments(tmp_path):
    wal, _ = open_log(tmp_path)
    wal.append({"n": 0})
    wal.append({"n": 1})
    wal.rotate()
    wal.append({"n": 2})
    assert len(list(tmp_path.glob("wal-*.log"))) == 2
    wal.drop_through(2)
    assert len(list(tmp_path.glob("wal-*.log"))) == 1
    wal.close()
    _, records = open_log(tmp_path, after=2)
    assert [r["n"] for r in records] == [2]


def test_snapshot_is_complete_or_absent(tmp_path):
    def writer(content):
        def write(path):
            path.write_bytes(content)
        return write

    snap.write_snapshot(tmp_path, 3, {"a": writer(b"one"), "b": writer(b"two")})
    assert snap.latest_snapshot(tmp_path)[0] == 3

    def failing(path):
        path.write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        snap.write_snapshot(tmp_path, 7, {"a": writer(b"new"), "b": failing})
    # The failed write left only a temporary directory, never a snapshot.
    seq, path = snap.latest_snapshot(tmp_path)
    assert seq == 3 and (path / "a").read_bytes() == b"one"
    snap.remove_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    snap.write_snapshot(tmp_path, 9, {"a": writer(b"nine")})
    snap.remove_older_than(tmp_path, 9)
    assert [s for s, _ in snap.snapshot_dirs(tmp_path)] == [9]
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    assert os.path.isdir(tmp_path / "snap-00000000000000000009")
