"""Retrieval quality on the MS MARCO subset: 5,000 passages ingested through the Ingest
RPC, 50 queries by text in dense, BM25 and hybrid modes.

Dense nDCG@10 must equal an in-process sentence-transformers + exact search reference
(+-0.005) and the default ANN index must reach recall@10 >= 0.95 against exact search.
The numbers are printed (run with -s) for the README.
"""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest

from backbone.v1 import common_pb2
from backbone.v1 import vector_search_service_pb2 as pb
from backbone.v1 import vector_search_service_pb2_grpc as pb_grpc
from retrieval.ir_metrics import doc_ranking, ndcg_at_k, recall_at_k

# Embeds the corpus through the server (the reference is the shared session fixture).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

MODES = {"dense": pb.SEARCH_MODE_DENSE, "bm25": pb.SEARCH_MODE_KEYWORD, "hybrid": pb.SEARCH_MODE_HYBRID}



def mean(values):
    return float(np.mean(values))


async def test_msmarco_dense_bm25_hybrid(text_server, msmarco):
    corpus, queries, qrels = msmarco.corpus, msmarco.queries, msmarco.qrels
    assert len(corpus) == 5000 and len(queries) == 50
    async with grpc.aio.insecure_channel(text_server.address) as channel:
        stub = pb_grpc.VectorSearchServiceStub(channel)
        await stub.CreateCollection(pb.CreateCollectionRequest(name="msmarco", dimension=384))

        async def messages():
            for start in range(0, len(corpus), 128):
                yield pb.IngestRequest(collection="msmarco", documents=[
                    pb.Document(id=d["_id"], text=d["text"]) for d in corpus[start : start + 128]
                ])

        ingested = await stub.Ingest(messages(), timeout=1800)
        assert ingested.documents == 5000 and ingested.chunks == 5000  # every passage < 254 tokens

        rankings = {}
        for mode, value in MODES.items():
            response = await stub.SearchBatch(pb.SearchBatchRequest(searches=[
                pb.SearchRequest(collection="msmarco", text=q["text"], top_k=100, mode=value)
                for q in queries
            ]), timeout=600)
            rankings[mode] = {
                q["_id"]: doc_ranking([h.id for h in r.hits]) for q, r in zip(queries, response.results)
            }

        # Reference: sentence-transformers in-process (session fixture), exact cosine search.
        qv = msmarco.query_vectors
        exact = msmarco.exact_top(100)
        reference = {q["_id"]: [corpus[j]["_id"] for j in exact[i]] for i, q in enumerate(queries)}

        # ANN recall@10: the same query vectors through the default (HNSW) index.
        response = await stub.SearchBatch(pb.SearchBatchRequest(searches=[
            pb.SearchRequest(collection="msmarco", vector=common_pb2.Vector(values=v.tolist()), top_k=10)
            for v in qv
        ]))
        ann = [doc_ranking([h.id for h in r.hits]) for r in response.results]
        ann_recall = mean([len(set(a) & set(reference[q["_id"]][:10])) / 10 for a, q in zip(ann, queries)])

    judged = [q["_id"] for q in queries if q["_id"] in qrels]
    report = {"judged_queries": len(judged), "ann_recall@10": ann_recall}
    for name, ranking in {**rankings, "reference_exact": reference}.items():
        report[f"{name}_ndcg@10"] = mean([ndcg_at_k(ranking[q], qrels[q], 10) for q in judged])
        report[f"{name}_recall@100"] = mean([recall_at_k(ranking[q], qrels[q], 100) for q in judged])
    print("\nMS MARCO subset quality:", json.dumps(report, indent=2))

    assert abs(report["dense_ndcg@10"] - report["reference_exact_ndcg@10"]) <= 0.005
    assert ann_recall >= 0.95
    # BM25 and fusion are real rankings of this corpus, not noise.
    assert report["bm25_ndcg@10"] > 0.3 and report["hybrid_ndcg@10"] > 0.3
    assert report["hybrid_recall@100"] >= min(report["dense_recall@100"], report["bm25_recall@100"])
    # Issue 18: stemmed BM25 beats the unstemmed 0.6876; the default fusion is no worse
    # than dense (in-process sweep: perf/quality_bench.py).
    assert report["bm25_ndcg@10"] >= 0.6876
    assert report["hybrid_ndcg@10"] >= report["dense_ndcg@10"]
