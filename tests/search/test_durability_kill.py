"""Durability under SIGKILL: a server process (``python -m server.main serve search``) is
killed at >= 50 random moments while a client upserts; after every restart each
acknowledged id is present with its payload and is its own top-1 hit, and the index
loads every time. Snapshots are made frequent so that kills also land in them."""

from __future__ import annotations

import random
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from backbone.v1 import common_pb2
from backbone.v1 import vector_search_service_pb2 as pb
from backbone.v1 import vector_search_service_pb2_grpc as pb_grpc
from perf.harness import ServerProcess, start_announced

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

DIM = 16
KILLS = 50
READY_TIMEOUT_S = 60
PACE_S = 0.01


def start_search_hop(data_dir: Path, log: Path) -> ServerProcess:
    """The search hop alone in a process (perf/harness.py), frequent snapshots, ready once it
    prints its address; stderr appended to ``log``."""
    return start_announced(
        [
            sys.executable, "-m", "server.main", "serve", "search", "--port", "0",
            "--set", f"search.data_dir={data_dir}",
            "--set", "search.snapshot_min_log_bytes=8192",
            "--set", "search.snapshot_log_ratio=0",
            "--set", "search.faiss_threads=1",
            "--set", "search.faiss_build_threads=1",
            "--set", "server.metrics_port=0",
        ],
        "search hop", log, timeout_s=READY_TIMEOUT_S,
    )  # fmt: skip


class Writer(threading.Thread):
    """Upserts new points until the server dies; records what was acknowledged."""

    def __init__(self, stub, acked: dict[str, np.ndarray], rng: random.Random, start_id: int):
        super().__init__(daemon=True)
        self.stub, self.acked, self.rng, self.next_id = stub, acked, rng, start_id

    def _points(self, n: int) -> list[pb.Point]:
        out = []
        for _ in range(n):
            pid = f"id{self.next_id}"
            self.next_id += 1
            vector = np.random.default_rng(self.next_id).standard_normal(DIM).astype(np.float32)
            out.append(pb.Point(
                id=pid, vector=common_pb2.Vector(values=vector.tolist()),
                payload=pb.Payload(text=f"payload of {pid}"),
            ))  # fmt: skip
        return out

    def run(self) -> None:
        try:
            while True:
                if self.rng.random() < 0.2:  # a client stream, acknowledged as a whole
                    messages = [pb.UpsertRequest(collection="dur", points=self._points(5))
                                for _ in range(self.rng.randint(1, 4))]
                    self.stub.Upsert(iter(messages), timeout=10)
                    batch = [p for m in messages for p in m.points]
                else:
                    batch = self._points(self.rng.randint(1, 8))
                    self.stub.UpsertBatch(pb.UpsertBatchRequest(collection="dur", points=batch), timeout=10)
                for p in batch:  # only now acknowledged
                    self.acked[p.id] = np.asarray(p.vector.values, dtype=np.float32)
                # Pacing, not synchronisation: keeps the acknowledged set (and so the
                # verification after each of the 50 restarts) small on a fast machine.
                time.sleep(PACE_S)
        except grpc.RpcError:
            return  # the server was killed


def verify(stub, acked: dict[str, np.ndarray]) -> None:
    ids = list(acked)
    for start in range(0, len(ids), 10_000):
        chunk = ids[start : start + 10_000]
        got = stub.Get(pb.GetRequest(collection="dur", ids=chunk), timeout=60)
        found = {p.id: p.payload.text for p in got.points}
        missing = [i for i in chunk if i not in found]
        assert not missing, f"{len(missing)} acknowledged ids lost, e.g. {missing[:3]}"
        assert all(found[i] == f"payload of {i}" for i in chunk)
    for start in range(0, len(ids), 256):
        chunk = ids[start : start + 256]
        response = stub.SearchBatch(pb.SearchBatchRequest(searches=[
            pb.SearchRequest(collection="dur", top_k=1, vector=common_pb2.Vector(values=acked[i].tolist()),
                             params=pb.SearchParams(ef_search=256))
            for i in chunk
        ]), timeout=60)  # fmt: skip
        wrong = [i for i, r in zip(chunk, response.results) if not r.hits or r.hits[0].id != i]
        assert not wrong, f"{len(wrong)} ids are not their own top-1, e.g. {wrong[:3]}"


def test_no_acknowledged_point_is_lost_across_kill_9(tmp_path):
    rng = random.Random(1234)
    data_dir = tmp_path / "data"
    log = tmp_path / "server.log"
    acked: dict[str, np.ndarray] = {}
    next_id = 0
    snapshots_seen = 0
    for round_ in range(KILLS + 1):
        server = start_search_hop(data_dir, log)
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.VectorSearchServiceStub(channel)
            if round_ == 0:
                stub.CreateCollection(pb.CreateCollectionRequest(name="dur", dimension=DIM))
            info = stub.DescribeCollection(pb.DescribeCollectionRequest(name="dur"), timeout=10)
            assert info.collection.points >= len(acked)
            verify(stub, acked)
            if round_ == KILLS:
                server.kill()
                break
            writer = Writer(stub, acked, rng, next_id)
            writer.start()
            time.sleep(rng.uniform(0.02, 0.8))
            server.kill()
            writer.join(30)
            assert not writer.is_alive()
            next_id = writer.next_id
        snapshots_seen += any((data_dir / "dur").glob("snap-*"))
    assert len(acked) > 500, "the client wrote too little for the test to mean much"
    assert snapshots_seen > KILLS // 2, "snapshots should exist for most restarts"
