"""Shared fixtures: real servers on port 0, one copy of each heavy model per session."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

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
async def running(config: Config, hops: Sequence[Hop]) -> AsyncIterator[BackboneServer]:
    """Start a real grpc.aio server with ``hops`` on 127.0.0.1:0; stop it afterwards."""
    config = dataclasses.replace(
        config, server=dataclasses.replace(config.server, port=0, metrics_port=0)
    )
    server = BackboneServer(config, hops)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace=1)


@pytest.fixture(scope="session")
def minilm():
    """The bundled all-MiniLM-L6-v2 as an Embedder, loaded once per session."""
    from server.engines.embedder import SentenceTransformerEmbedder

    return SentenceTransformerEmbedder(name="all-MiniLM-L6-v2")


@pytest.fixture(scope="session")
def msmarco_dir() -> Path:
    """The MS MARCO subset beside the repository (../shared/datasets/msmarco)."""
    if not (MSMARCO / "corpus.jsonl").exists():
        pytest.fail(f"dataset missing: {MSMARCO} (the repo's parent must hold shared/)")
    return MSMARCO
