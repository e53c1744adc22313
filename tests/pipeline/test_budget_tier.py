"""Deadline budget step 3: under model="auto", when the answer's generation does not fit
even without rerank, the cheapest routing tier generates (its model, its output cap), and
the final message says so after the first two steps; a named model never falls back."""

from __future__ import annotations

import time

import pytest

from backbone.v1 import generation_service_pb2 as gen_pb
from backbone.v1 import pipeline_service_pb2 as pb
from router import budget
from router.errors import DeadlineTooShort
from server.config import load_config
from server.servicers.pipeline import small_tier_of

SMALL = budget.SmallTier("small", "tiny-model", 64)


def measured(**seconds: float) -> budget.LatencyModel:
    """Priors as if measured: embed/search 10 ms, rerank 10 ms a document, generation as given."""
    return budget.LatencyModel({"embed": 0.01, "search": 0.01, "rerank": 0.01, **seconds})


def plan(model, remaining, generate_model="auto", small=SMALL):
    return budget.make_plan(
        model, remaining, rerank=True, search_top_k=50, top_n=5, generate=True,
        generate_model=generate_model, small_tier=small,
    )


def test_steps_in_order_and_the_smaller_tier_last():
    lat = measured(**{"generate": 1.0, "generate:auto": 1.0, "generate:tiny-model": 0.1})
    assert plan(lat, 3.0).degradations == []  # everything fits
    skipped = plan(lat, 1.4)  # rerank (0.5 s) does not fit, auto's generation does
    assert skipped.degradations == ["rerank_skipped: deadline"] and skipped.small_tier is None
    small = plan(lat, 0.5)  # auto's generation cannot fit: all three steps
    assert small.degradations == [
        "rerank_skipped: deadline", "candidates_reduced: 5", "smaller_tier: small",
    ]
    assert small.small_tier == SMALL and not small.rerank and small.search_top_k == 5
    with pytest.raises(DeadlineTooShort):
        plan(lat, 0.1)  # not even the smaller tier fits


def test_a_named_model_or_no_tiers_never_falls_back():
    lat = measured(**{"generate": 1.0, "generate:llama": 1.0, "generate:tiny-model": 0.1})
    with pytest.raises(DeadlineTooShort):
        plan(lat, 0.5, generate_model="llama")
    with pytest.raises(DeadlineTooShort):
        plan(lat, 0.5, small=None)
    # Unmeasured, the smaller tier is estimated like any generation: no gain, no step.
    with pytest.raises(DeadlineTooShort):
        plan(measured(**{"generate": 1.0}), 0.5)


def test_the_small_tier_is_the_cheapest_ranged_one():
    assert small_tier_of(load_config().routing.tiers) == budget.SmallTier("small", "", 256)
    one = [{"name": "only", "scores": [0.0, 1.0]}]
    assert small_tier_of(one) is None


async def test_auto_answer_on_a_short_deadline_uses_the_smaller_tier(split):
    lat = split.hop.pipeline.latency
    lat.observe("generate:auto", 3.0)  # what auto has been taking
    lat.observe(budget.generate_key(""), 0.05)  # the small tier's model: the default
    request = pb.AnswerRequest(
        retrieve=pb.RetrieveRequest(query="what is green tea", collection="docs", top_n=3),
        model="auto", sampling=gen_pb.SamplingParams(max_tokens=512),
    )
    began = time.monotonic()
    messages = [m async for m in split.stub.Answer(request, timeout=1.0)]
    assert time.monotonic() - began < 1.0
    final = messages[-1].final
    assert list(final.degradations) == [
        "rerank_skipped: deadline", "candidates_reduced: 3", "smaller_tier: small",
    ]
    [gen] = split.hops.generations
    assert gen.model == "" and gen.sampling.max_tokens == 256  # the tier's model and cap
    assert not split.hops.reranks and split.hops.searches[0].top_k == 3
