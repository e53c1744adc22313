"""Collection lifecycle under churn: create/delete of one collection against concurrent
describe, list, search, get and upserts through the real server answer OK, NOT_FOUND,
ALREADY_EXISTS or FAILED_PRECONDITION (never INTERNAL); every point acknowledged into the
last incarnation is readable, also after a restart; a delete interrupted after its rename
never comes back."""

from __future__ import annotations

import os

import grpc
import pytest

from backbone.v1 import vector_search_service_pb2 as pb
from backbone.v1 import vector_search_service_pb2_grpc as pb_grpc
from retrieval.manager import CollectionManager
from retrieval.types import make_spec
from server.servicers.search import SearchHop
from tests.conftest import make_config, running
from tests.fuzz.churn import NAME, churn
from tests.fuzz.fakes import FakeEmbedder
from server.servicers.embedding import EmbeddingHop

CHURN_S = float(os.environ.get("BACKBONE_CHURN_SECONDS", "5"))


async def _readable(channel, ids: set[str]) -> set[str]:
    stub = pb_grpc.VectorSearchServiceStub(channel)
    found = await stub.Get(pb.GetRequest(collection=NAME, ids=sorted(ids)), timeout=10)
    return {p.id for p in found.points}


async def test_churn_never_internal_and_acknowledged_points_survive_restart(tmp_path, captured_log):
    config = make_config(search={"data_dir": str(tmp_path / "data"), "snapshot_min_log_bytes": 4096})
    async with running(config, [EmbeddingHop(FakeEmbedder()), SearchHop()]) as server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            result = await churn(channel, CHURN_S)
            assert not result.bad, result.bad[:5]
            assert result.cycles >= 10, result.cycles
            # the churn did hit the races: reads of a vanished collection happened
            assert result.codes[("DescribeCollection", "NOT_FOUND")] > 0, result.codes
            assert result.codes[("UpsertBatch", "OK")] > 0, result.codes
            assert result.final_acked, "no point was acknowledged into the last incarnation"
            assert await _readable(channel, result.final_acked) == result.final_acked
    assert "Traceback" not in captured_log.getvalue()
    # restart on the same data: the collection loads whole, no tombstone is left
    async with running(config, [EmbeddingHop(FakeEmbedder()), SearchHop()]) as server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            assert await _readable(channel, result.final_acked) == result.final_acked
    assert not [p for p in (tmp_path / "data").iterdir() if p.name.startswith(".")]


def _make_collection(data_dir, name: str) -> None:
    manager = CollectionManager(data_dir, durable=False)
    manager.load()
    manager.create(make_spec(name, 4))
    manager.close()


def test_a_delete_cut_after_its_rename_never_loads_again(tmp_path):
    data = tmp_path / "data"
    _make_collection(data, "gone")
    _make_collection(data, "kept")
    # the crash: the directory was renamed to its tombstone, removal never ran
    os.rename(data / "gone", data / ".gone.deleting-0123")
    manager = CollectionManager(data, durable=False)
    manager.load()
    assert [c.spec.name for c in manager.list()] == ["kept"]
    assert sorted(p.name for p in data.iterdir()) == ["kept"]
    manager.close()


def test_stats_of_a_collection_whose_directory_vanished_is_no_error(tmp_path):
    data = tmp_path / "data"
    manager = CollectionManager(data, durable=False)
    manager.load()
    collection = manager.create(make_spec("c", 4))
    doomed = data / ".c.deleting-x"
    os.rename(collection.directory, doomed)
    import shutil

    shutil.rmtree(doomed)
    stats = collection.stats()
    assert stats.points == 0 and stats.disk_bytes == 0
    manager.close(snapshot=False)


@pytest.mark.slow
@pytest.mark.parametrize("seconds", [30.0])
async def test_churn_30s(tmp_path, seconds):
    """The judged length of the churn (slow)."""
    config = make_config(search={"data_dir": str(tmp_path / "data")})
    async with running(config, [EmbeddingHop(FakeEmbedder()), SearchHop()]) as server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            result = await churn(channel, seconds)
    assert not result.bad, result.bad[:5]
