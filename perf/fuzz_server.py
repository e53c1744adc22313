"""The embedded default with fake engines, as its own process, for ``perf/fuzz_bench.py
--fake-engines``: every hop (embedding, search, rerank, generation, pipeline) with the real
servicers, validation, batchers, interceptors and the real search hop over ``--data``,
but engines that cost nothing (``tests/fuzz/fakes.py``), so a fuzz run of tens of
thousands of requests measures the error contract, not the models.

``python -m perf.fuzz_server --port 0 --data DIR``: serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from server.app import BackboneServer
from server.config import load_config
from server.engines.generator import model_specs
from server.servicers.embedding import EmbeddingHop
from server.servicers.generation import GenerationHop
from server.servicers.pipeline import PipelineHop
from server.servicers.rerank import RerankHop
from server.servicers.search import SearchHop
from tests.fuzz.fakes import EchoGenerator, FakeEmbedder, FakeReranker


async def serve(port: int, data: str) -> None:
    """Start the fake-engine default on ``port``; stop on SIGTERM/SIGINT."""
    config = load_config(overrides={
        "server": {"port": port, "metrics_port": 0, "grace_seconds": 2},
        "search": {"data_dir": data},
    })
    spec = model_specs(config.generation)[0]
    hops = [EmbeddingHop(FakeEmbedder()), SearchHop(), RerankHop(FakeReranker()),
            GenerationHop({spec.name: EchoGenerator()}), PipelineHop()]
    server = BackboneServer(config, hops)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await server.start()
    print(f"fuzz server serving on {server.address}", flush=True)
    await stop.wait()
    await server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--data", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(args.port, args.data))


if __name__ == "__main__":
    main()
