"""``client.rerank`` (RerankService's one RPC), sync and async, against a real rerank hop
(its validation, batcher and servicer) over a word-overlap engine."""

from __future__ import annotations

import asyncio

import pytest

from clients import errors
from clients.client import AsyncClient, Client
from server.servicers.rerank import RerankHop
from tests.clients.hop_fakes import OverlapReranker
from tests.conftest import make_config, running

DOCS = ["the cat sat", "a dog ran home", "nothing relevant", "cat dog home"]


@pytest.fixture(scope="module")
async def server():
    config = make_config(rerank={"max_documents": 8, "max_wait_ms": 1})
    async with running(config, [RerankHop(engine=OverlapReranker())]) as s:
        yield s


async def test_rerank_async_orders_best_first(server):
    async with AsyncClient(address=server.address) as client:
        result = await client.rerank.rerank(
            "cat dog home", DOCS, top_n=2, return_documents=True
        )
    assert [r.index for r in result.results] == [3, 1]
    assert [r.score for r in result.results] == [3.0, 2.0]
    assert result.results[0].document == DOCS[3] and not result.results[0].truncated
    assert result.model == "overlap" and result.truncated_pairs == 0
    assert result.usage.prompt_tokens > 0 and result.timings[0].hop == "rerank"


async def test_rerank_sync_without_documents_and_typed_errors(server):
    def calls():
        with Client(address=server.address) as client:
            result = client.rerank.rerank("cat", DOCS)
            with pytest.raises(errors.TooManyInputsError):
                client.rerank.rerank("cat", ["x"] * 9)
            with pytest.raises(errors.ModelNotFoundError):
                client.rerank.rerank("cat", DOCS, model="no-such-model")
            with pytest.raises(errors.EmptyInputError):
                client.rerank.rerank("", DOCS)
            return result

    result = await asyncio.to_thread(calls)
    assert len(result.results) == 4 and all(r.document == "" for r in result.results)
    assert {r.index for r in result.results[:2]} == {0, 3}  # the two containing "cat"
