"""On the MS MARCO subset, the pipeline's Retrieve ranks exactly as calling the search and
rerank hops directly (nDCG@10 equal within 0.001, with and without rerank), and Answer's
sources message equals Retrieve's. Real hops in one process (the embedded default's
in-process upstreams): MiniLM embedding, FAISS search, the default MaxSim reranker."""

from __future__ import annotations

import grpc
import pytest

from backbone.v1 import pipeline_service_pb2 as pl_pb
from backbone.v1 import pipeline_service_pb2_grpc as pl_grpc
from backbone.v1 import rerank_service_pb2 as rr_pb
from backbone.v1 import rerank_service_pb2_grpc as rr_grpc
from backbone.v1 import vector_search_service_pb2 as vs_pb
from backbone.v1 import vector_search_service_pb2_grpc as vs_grpc
from server.servicers.embedding import EmbeddingHop
from server.servicers.pipeline import PipelineHop
from server.servicers.rerank import RerankHop
from server.servicers.search import SearchHop
from tests.conftest import running
from tests.search.conftest import search_config
from retrieval.ir_metrics import ndcg_at_k

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

QUERIES = 10  # of the 50 (rerank on 2 CPU cores is the cost)
CANDIDATES = 15


async def test_retrieve_equals_search_then_rerank_on_msmarco(minilm, msmarco, tmp_path):
    corpus, queries, qrels = msmarco.corpus, msmarco.queries[:QUERIES], msmarco.qrels
    hops = [EmbeddingHop(embedder=minilm), SearchHop(), RerankHop(), PipelineHop()]
    async with running(search_config(tmp_path), hops) as server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            search = vs_grpc.VectorSearchServiceStub(channel)
            rerank = rr_grpc.RerankServiceStub(channel)
            pipeline = pl_grpc.PipelineServiceStub(channel)
            await search.CreateCollection(vs_pb.CreateCollectionRequest(name="msmarco", dimension=384))
            for start in range(0, len(corpus), 1000):
                await search.UpsertBatch(vs_pb.UpsertBatchRequest(collection="msmarco", points=[
                    vs_pb.Point(id=d["_id"], vector={"values": v.tolist()},
                                payload=vs_pb.Payload(text=d["text"]))
                    for d, v in zip(corpus[start : start + 1000], msmarco.doc_vectors[start : start + 1000])
                ]))
            ndcg = {k: [] for k in ("direct_dense", "retrieve_dense", "direct_rerank", "retrieve_rerank")}
            for q in queries:
                found = await search.Search(vs_pb.SearchRequest(
                    collection="msmarco", text=q["text"], top_k=CANDIDATES, with_payload=True
                ), timeout=60)
                dense = [h.id for h in found.hits]
                ranked = await rerank.Rerank(rr_pb.RerankRequest(
                    query=q["text"], documents=[h.payload.text for h in found.hits], top_n=10
                ), timeout=120)
                reranked = [dense[r.index] for r in ranked.results]
                plain = await pipeline.Retrieve(pl_pb.RetrieveRequest(
                    query=q["text"], collection="msmarco", search_top_k=CANDIDATES, top_n=10,
                    skip_rerank=True,
                ), timeout=60)
                full = await pipeline.Retrieve(pl_pb.RetrieveRequest(
                    query=q["text"], collection="msmarco", search_top_k=CANDIDATES, top_n=10,
                ), timeout=120)
                assert not plain.degradations and not full.degradations
                grades = qrels.get(q["_id"], {})
                for key, ranking in (
                    ("direct_dense", dense[:10]), ("retrieve_dense", [s.id for s in plain.sources]),
                    ("direct_rerank", reranked), ("retrieve_rerank", [s.id for s in full.sources]),
                ):
                    ndcg[key].append(ndcg_at_k(ranking, grades, 10))
                # Scores carried through: search's for every source, rerank's when reranked.
                assert [s.search_score for s in plain.sources] == pytest.approx([h.score for h in found.hits[:10]], abs=1e-5)
                assert [s.rerank_score for s in full.sources] == pytest.approx([r.score for r in ranked.results], abs=1e-4)
            mean = {k: sum(v) / len(v) for k, v in ndcg.items()}
            print("\nnDCG@10 over", QUERIES, "queries:", {k: round(v, 4) for k, v in mean.items()})
            assert mean["retrieve_dense"] == pytest.approx(mean["direct_dense"], abs=0.001)
            assert mean["retrieve_rerank"] == pytest.approx(mean["direct_rerank"], abs=0.001)
            assert mean["direct_rerank"] != mean["direct_dense"]  # reranking did something

            # Answer's sources message equals Retrieve's (generation is not needed for it:
            # the sources come first, and the stream is cancelled after them).
            request = pl_pb.RetrieveRequest(
                query=queries[0]["text"], collection="msmarco", search_top_k=CANDIDATES, top_n=5
            )
            retrieved = await pipeline.Retrieve(request, timeout=120)
            stream = pipeline.Answer(pl_pb.AnswerRequest(retrieve=request), timeout=120)
            first = await stream.read()
            stream.cancel()
            assert list(first.sources.sources) == list(retrieved.sources)
