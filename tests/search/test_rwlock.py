"""The readers-writer lock: shared reads, exclusive writes, writers not starved."""

from __future__ import annotations

import threading

from retrieval.rwlock import ReadWriteLock


def test_readers_share_and_a_writer_waits_for_them():
    lock = ReadWriteLock()
    inside = threading.Barrier(3, timeout=10)
    release = threading.Event()
    order: list[str] = []

    def reader(name):
        with lock.read():
            inside.wait()  # both readers hold the lock at once
            release.wait(10)
            order.append(name)

    def writer(started):
        started.set()
        with lock.write():
            order.append("writer")

    readers = [threading.Thread(target=reader, args=(f"r{i}",)) for i in range(2)]
    for t in readers:
        t.start()
    inside.wait()
    started = threading.Event()
    w = threading.Thread(target=writer, args=(started,))
    w.start()
    started.wait(10)
    assert order == []  # the writer cannot enter while readers hold the lock
    release.set()
    for t in [*readers, w]:
        t.join(10)
    assert order[-1] == "writer" and sorted(order[:2]) == ["r0", "r1"]


def test_a_waiting_writer_blocks_new_readers():
    lock = ReadWriteLock()
    first_in = threading.Event()
    let_first_go = threading.Event()
    order: list[str] = []

    def first_reader():
        with lock.read():
            first_in.set()
            let_first_go.wait(10)
        order.append("r1 out")

    def writer():
        with lock.write():
            order.append("writer")

    def late_reader():
        with lock.read():
            order.append("r2")

    t1 = threading.Thread(target=first_reader)
    t1.start()
    first_in.wait(10)
    tw = threading.Thread(target=writer)
    tw.start()
    while not lock._writers_waiting:  # the writer is queued (state check, no sleep)
        threading.Event().wait(0.001)
    t2 = threading.Thread(target=late_reader)
    t2.start()
    let_first_go.set()
    for t in (t1, tw, t2):
        t.join(10)
    assert order.index("writer") < order.index("r2")
