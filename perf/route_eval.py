"""Evaluate complexity routing on a labelled prompt file, and what ``auto`` costs.

Reports, for the chosen split (default: the held-out ``test`` split) and for each scorer
mode - ``features`` (no model call), ``borderline`` (the default: the embedding is asked
only when the feature score is within ``routing.learned_band`` of a tier boundary) and
``full`` (embedding always):

- routing accuracy: a prompt labelled simple must land on the cheapest tier, a complex
  one on any other (the code tier counts as not-cheap), with the confusion matrix
  (label x tier) and the per-tier share;
- the share of calls kept off the expensive tier, and the share of simple prompts sent
  to it;
- decision latency: p50/p99 of the feature scorer alone, and of the full scorer with the
  embedding computed by a real in-process embedding hop (the same call the generation
  hop makes).

``--e2e`` also starts a server in a separate process (real embedding hop, generation hop
over an instant fake engine, so the measured difference is routing alone) and measures
client-side time to first token of ``model="auto"`` against naming the default model, in
alternating rounds over the same prompts.

    python -m perf.route_eval [--prompts FILE] [--split test|train|all] [--rounds N]
        [--e2e] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from perf.harness import READY_PREFIX, child_env, start_announced
from perf.report import latency_summary, markdown_table
from router.complexity import DEFAULT_PROMPTS, ComplexityScorer, read_prompts
from router.model_routing import ModelRouter, TierLoad, tiers_from

MODES = ("features", "borderline", "full")
# The embedding hop's deadline-based shedding off: a sequential caller here must not be
# refused (a refusal in the generation hop only means the features decide alone).
NO_EMBED_SHEDDING = {"embedding": {"max_queue_delay_ms": 0}}


def f3(value: float | None) -> str:
    """Three decimals."""
    return "-" if value is None else f"{value:.3f}"


def idle(tier) -> TierLoad:
    """No load anywhere: routing by task and score alone."""
    return TierLoad(0, 0, 1)


def wants_embedding(score: float, router: ModelRouter, mode: str, band: float) -> bool:
    """The generation hop's rule (server.engines.auto_route) for asking the embedding."""
    if mode == "full":
        return True
    if mode == "features":
        return False
    return any(abs(score - edge) < band for edge in router.boundaries)


def evaluate(rows, vectors, scorer, router, mode: str, band: float) -> dict[str, Any]:
    """Routing metrics of ``rows`` (with their embeddings) under ``mode``."""
    cheapest = min(router.tiers, key=lambda t: t.cost).name
    expensive = router.expensive.name
    confusion: Counter = Counter()
    hits = embedded = 0
    for row, vector in zip(rows, vectors):
        result = scorer.score_features(row["text"], int(row.get("turns", 1)))
        if wants_embedding(result.score, router, mode, band):
            result = scorer.score_with_embedding(result, vector)
            embedded += 1
        tier = router.choose(result, result.task, idle).tier.name
        confusion[(row["label"], tier)] += 1
        hits += (tier == cheapest) == (row["label"] == "simple")
    n = len(rows)
    simple = sum(1 for r in rows if r["label"] == "simple")
    tiers = [t.name for t in router.tiers]
    return {
        "mode": mode,
        "prompts": n,
        "accuracy": round(hits / n, 4),
        "confusion": {label: {t: confusion[(label, t)] for t in tiers}
                      for label in ("simple", "complex")},
        "tier_share": {t: round(sum(confusion[(lb, t)] for lb in ("simple", "complex")) / n, 4)
                       for t in tiers},
        "kept_off_expensive": round(
            1 - sum(confusion[(lb, expensive)] for lb in ("simple", "complex")) / n, 4),
        "simple_to_expensive": round(confusion[("simple", expensive)] / max(1, simple), 4),
        "embedding_asked": round(embedded / n, 4),
    }


async def embedding_hop():
    """A started in-process embedding hop (the real model, default config)."""
    from server.config import load_config
    from server.hop import HopContext
    from server.servicers.embedding import EmbeddingHop

    hop = EmbeddingHop()
    await hop.start(HopContext(load_config(overrides=NO_EMBED_SHEDDING)))
    return hop


async def measure(rows, scorer, rounds: int) -> tuple[list, dict[str, Any]]:
    """Embeddings of the rows (through the hop) and decision latencies."""
    hop = await embedding_hop()
    try:
        vectors, full_ms, embed_ms = [], [], []
        for row in rows:
            vectors.append((await hop.embed_texts([row["text"][:2000]], normalize=True))[0])
        feature_ms: list[float] = []
        per_prompt: list[list[float]] = [[] for _ in rows]
        for _ in range(rounds):
            for index, row in enumerate(rows):
                t0 = time.perf_counter()
                scorer.score_features(row["text"], int(row.get("turns", 1)))
                t1 = time.perf_counter()
                feature_ms.append((t1 - t0) * 1e3)
                per_prompt[index].append((t1 - t0) * 1e3)
        for row in rows:
            t0 = time.perf_counter()
            base = scorer.score_features(row["text"], int(row.get("turns", 1)))
            t1 = time.perf_counter()
            vector = (await hop.embed_texts([row["text"][:2000]], normalize=True))[0]
            t2 = time.perf_counter()
            scorer.score_with_embedding(base, vector)
            full_ms.append((time.perf_counter() - t0) * 1e3)
            embed_ms.append((t2 - t1) * 1e3)
    finally:
        await hop.stop()
    return vectors, {
        "feature_scorer_ms": latency_summary(feature_ms),
        # Each prompt's median over the rounds: the scorer's own cost per prompt, without
        # the preemption spikes of a shared machine.
        "feature_scorer_per_prompt_median_ms": latency_summary(
            statistics.median(samples) for samples in per_prompt),
        "embedding_hop_ms": latency_summary(embed_ms),
        "full_scorer_ms": latency_summary(full_ms),
    }


# --------------------------------------------------------------------------- end to end


class InstantGenerator:
    """A fake engine that answers at once (one token): the TTFT left is the server's."""

    engine = "vllm"

    async def start(self) -> None:
        """Nothing to load."""

    async def stop(self) -> None:
        """Nothing to release."""

    def prompt_token_ids(self, prompt, messages) -> list[int]:
        """Roughly one id per four characters."""
        return list(range(max(1, (len(prompt) + sum(len(m.content) for m in messages)) // 4)))

    async def generate(self, request_id, ids, params):
        """One token, then the final."""
        from server.engines.generator import GenerationFinal, TokenDelta

        yield TokenDelta("a", (1,))
        yield GenerationFinal("length", len(ids), 1)

    async def abort(self, request_id) -> bool:
        """Nothing runs long enough to abort."""
        return False

    def num_unfinished(self) -> int:
        """Always idle."""
        return 0

    def healthy(self) -> bool:
        """Never dies."""
        return True


async def serve() -> None:
    """Server side of --e2e: embedding + generation (instant engine) on a free port."""
    from server.app import BackboneServer
    from server.config import load_config
    from server.servicers.embedding import EmbeddingHop
    from server.servicers.generation import GenerationHop

    config = load_config(
        overrides={"server": {"port": 0, "metrics_port": 0}, **NO_EMBED_SHEDDING})
    hop = GenerationHop(generators={config.generation.model_name: InstantGenerator()})
    server = BackboneServer(config, [EmbeddingHop(), hop])
    await server.start()
    stopped = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set)
    print(f"{READY_PREFIX}127.0.0.1:{server.port}", flush=True)
    try:
        await stopped.wait()
    finally:
        await server.stop(grace=1)


async def ttft_rounds(address: str, rows, named: str, rounds: int) -> dict[str, Any]:
    """Client side of --e2e: alternating auto / named rounds over the same prompts."""
    import grpc

    from backbone.v1 import generation_service_pb2 as pb
    from backbone.v1 import generation_service_pb2_grpc

    samples: dict[str, list[float]] = {"auto": [], named: []}
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
        for index in range(rounds):
            order = ["auto", named] if index % 2 == 0 else [named, "auto"]
            for row in rows:
                for model in order:
                    request = pb.GenerateRequest(
                        model=model, messages=[pb.ChatMessage(role="user", content=row["text"])])
                    t0 = time.perf_counter()
                    call = stub.Generate(request)
                    async for _ in call:
                        samples[model].append((time.perf_counter() - t0) * 1e3)
                        break
                    call.cancel()
    auto, base = latency_summary(samples["auto"]), latency_summary(samples[named])
    return {"auto_ttft_ms": auto, "named_ttft_ms": base,
            "auto_adds_p50_ms": round(auto["p50"] - base["p50"], 3)}


def e2e(rows, rounds: int) -> dict[str, Any]:
    """Start the server process, run the rounds, stop it."""
    from server.config import GenerationConfig

    server = start_announced([sys.executable, "-m", "perf.route_eval", "--serve"],
                             "route_eval server", env=child_env(keep_backbone=True))
    try:
        return asyncio.run(ttft_rounds(server.target, rows, GenerationConfig().model_name, rounds))
    finally:
        server.stop(grace_s=30)


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation and print a markdown summary (and JSON with --json)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS)
    parser.add_argument("--weights", type=Path, default=None)
    parser.add_argument("--split", choices=("test", "train", "all"), default="test")
    parser.add_argument("--tiers", default="", help="tiers as JSON (default: [routing] default)")
    parser.add_argument("--rounds", type=int, default=20, help="feature-scorer timing rounds")
    parser.add_argument("--e2e", action="store_true", help="also measure auto's TTFT cost")
    parser.add_argument("--e2e-rounds", type=int, default=4)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.serve:
        asyncio.run(serve())
        return 0
    from server.config import RoutingConfig

    routing = RoutingConfig()
    router = ModelRouter(tiers_from(args.tiers or routing.tiers), routing.spill_margin)
    scorer = ComplexityScorer.load(args.weights)
    rows = [r for r in read_prompts(args.prompts) if args.split in ("all", r["split"])]
    vectors, latency = asyncio.run(measure(rows, scorer, args.rounds))
    results = [evaluate(rows, vectors, scorer, router, m, routing.learned_band) for m in MODES]
    report: dict[str, Any] = {"split": args.split, "results": results, "latency": latency}
    if args.e2e:
        report["e2e"] = e2e(rows, args.e2e_rounds)
    tiers = [t.name for t in router.tiers]
    print(markdown_table(
        ["mode", "accuracy", "simple->expensive", "kept off expensive", "embedding asked",
         *[f"share {t}" for t in tiers]],
        [[r["mode"], *map(f3, (r["accuracy"], r["simple_to_expensive"],
                               r["kept_off_expensive"], r["embedding_asked"])),
          *[f3(r["tier_share"][t]) for t in tiers]] for r in results]))
    for r in results:
        print(f"confusion ({r['mode']}, label x tier):")
        print(markdown_table(["label", *tiers],
                             [[lb, *[str(r["confusion"][lb][t]) for t in tiers]]
                              for lb in ("simple", "complex")]))
    print(markdown_table(["decision", "p50 ms", "p99 ms", "n"],
                         [[k, f3(v["p50"]), f3(v["p99"]), str(v["count"])]
                          for k, v in latency.items()]))
    if "e2e" in report:
        e = report["e2e"]
        print(f"TTFT p50: auto {e['auto_ttft_ms']['p50']} ms, named "
              f"{e['named_ttft_ms']['p50']} ms: auto adds {e['auto_adds_p50_ms']} ms")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
