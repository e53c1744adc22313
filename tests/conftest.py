"""Shared fixtures: real servers on port 0, one copy of each heavy model per session."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from server.app import BackboneServer
from server.config import Config, load_config
from server.hop import Hop

REPO = Path(__file__).resolve().parents[1]
MSMARCO = REPO.parent / "shared" / "datasets" / "msmarco"


def make_config(**sections: dict) -> Config:
    """A config for tests: port 0, no metrics port, plus the given section overrides."""
    overrides = {"server": {"port": 0, "metrics_port": 0, "grace_seconds": 2}}
    for name, values in sections.items():
        overrides.setdefault(name, {}).update(values)
    return load_config(overrides=overrides)


@asynccontextmanager
async def running(
    config: Config, hops: Sequence[Hop], tracer_provider=None
) -> AsyncIterator[BackboneServer]:
    """Start a real grpc.aio server with ``hops`` on 127.0.0.1:0; stop it afterwards
    (``tracer_provider``: an OpenTelemetry provider for its spans, e.g. in-memory)."""
    config = dataclasses.replace(
        config, server=dataclasses.replace(config.server, port=0, metrics_port=0)
    )
    server = BackboneServer(config, hops, tracer_provider=tracer_provider)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace=1)


def error_reason(err: grpc.aio.AioRpcError) -> str | None:
    """The single backbone ErrorInfo reason of an RPC error (None when absent); fails the
    test when the status carries more than one ErrorInfo or one of another domain."""
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = rpc_status.status_pb2.Status.FromString(value)
            infos = []
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    infos.append(info)
            assert len(infos) == 1, "exactly one ErrorInfo"
            assert infos[0].domain == "backbone.v1"
            return infos[0].reason
    return None


@pytest.fixture(scope="session")
def minilm():
    """The bundled all-MiniLM-L6-v2 as an Embedder, loaded once per session."""
    from server.engines.embedder import SentenceTransformerEmbedder

    return SentenceTransformerEmbedder(name="all-MiniLM-L6-v2")


@pytest.fixture(scope="session")
def onnx_minilm():
    """The bundled all-MiniLM-L6-v2 on the ONNX Runtime engine, loaded once per session."""
    from server.engines.onnx_embedder import OnnxEmbedder

    return OnnxEmbedder(name="all-MiniLM-L6-v2")


@pytest.fixture(scope="session")
def msmarco_dir() -> Path:
    """The MS MARCO subset beside the repository (../shared/datasets/msmarco)."""
    if not (MSMARCO / "corpus.jsonl").exists():
        pytest.fail(f"dataset missing: {MSMARCO} (the repo's parent must hold shared/)")
    return MSMARCO


@dataclasses.dataclass(frozen=True)
class MsMarco:
    """The MS MARCO subset with the bundled MiniLM's exact-search reference, computed once."""

    corpus: list[dict]
    queries: list[dict]
    qrels: dict[str, dict[str, int]]
    doc_vectors: "np.ndarray"  # (5000, 384) float32, L2-normalised
    query_vectors: "np.ndarray"  # (50, 384) float32, L2-normalised

    def exact_top(self, k: int) -> "np.ndarray":
        """(queries, k) corpus positions in exact cosine order (stable ties)."""
        import numpy as np

        scores = self.query_vectors @ self.doc_vectors.T
        return np.argsort(-scores, axis=1, kind="stable")[:, :k]


@pytest.fixture(scope="session")
def msmarco(msmarco_dir) -> MsMarco:
    """Corpus, queries, graded qrels and in-process sentence-transformers embeddings.

    The quality tests of search and rerank share it, so the 5,000 passages are encoded
    in-process once per session, not once per test.
    """
    import json
    from collections import defaultdict

    from sentence_transformers import SentenceTransformer

    from server.engines.embedder import bundled_model_path

    def read(name: str) -> list[dict]:
        with open(msmarco_dir / name, encoding="utf-8") as f:
            return [json.loads(line) for line in f]

    corpus, queries = read("corpus.jsonl"), read("queries.jsonl")
    qrels: dict[str, dict[str, int]] = defaultdict(dict)
    with open(msmarco_dir / "qrels" / "test.tsv", encoding="utf-8") as f:
        for line in f:
            qid, did, grade = line.rstrip("\n").split("\t")
            if grade.isdigit():  # skips the header
                qrels[qid][did] = int(grade)
    model = SentenceTransformer(str(bundled_model_path()), device="cpu", local_files_only=True)
    docs = model.encode([d["text"] for d in corpus], batch_size=64, normalize_embeddings=True)
    qv = model.encode([q["text"] for q in queries], batch_size=64, normalize_embeddings=True)
    return MsMarco(corpus, queries, dict(qrels), docs, qv)
