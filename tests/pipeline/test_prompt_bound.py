"""The byte bound that lets the packer skip CountTokens: it must never be below the real
tokenizer's count, and a prompt whose bound fits is not counted."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from router.prompt_packing import CALIBRATION, DEFAULT_SYSTEM_PROMPT, build_messages, pack, token_bound

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "msmarco" / "corpus.jsonl"


def passages(n: int) -> list[str]:
    with CORPUS.open() as f:
        return [json.loads(line)["text"] for line in itertools.islice(f, n)]


@pytest.mark.generation
def test_the_bound_is_never_below_smollm2s_count_with_its_chat_template():
    from transformers import AutoTokenizer

    from server.engines import model_prep
    from server.engines.generator import ChatTurn
    from server.engines.vllm_engine import render_prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(model_prep.ensure_model_dir())

    def count(messages) -> int:  # as the generation hop counts (CountTokens)
        return len(render_prompt_ids(tokenizer, "", [ChatTurn(r, c) for r, c in messages]))

    per_message = count((("user", "x"),)) + 4  # what the pipeline derives from its probe
    texts = passages(2000)
    worst = 0.0
    for i in range(0, len(texts), 5):  # prompts of 5 sources each, as the pipeline builds
        messages = build_messages(DEFAULT_SYSTEM_PROMPT, texts[i:i + 5], (), texts[i][:80])
        tokens, bound = count(messages), token_bound(messages, per_message)
        assert tokens <= bound
        worst = max(worst, tokens / bound)
    calibration = (("system", CALIBRATION), ("user", CALIBRATION))
    assert count(calibration) <= token_bound(calibration, per_message)
    assert worst > 0.15  # a bound, but not a uselessly loose one (English: ~4 bytes a token)


async def test_a_prompt_whose_bound_fits_is_not_counted_and_one_that_may_not_fit_is():
    calls = []

    async def count(messages) -> int:
        calls.append(messages)
        return sum(len(c.split()) + 4 for _, c in messages)  # words + 4 per message

    sources = ["green tea has caffeine"] * 3
    kwargs = dict(system_prompt="Cite [n].", sources=sources, history=(), question="tea?")
    roomy = await pack(count, window=1000, per_message=10, **kwargs)
    assert calls == [] and roomy.sources_used == 3
    assert roomy.tokens == token_bound(roomy.messages, 10)
    tight = await pack(count, window=40, per_message=10, **kwargs)  # bound 132 > 40: counted
    assert calls and tight.tokens <= 40
    calls.clear()
    await pack(count, window=1000, per_message=None, **kwargs)  # no bound known: counted
    assert len(calls) == 1
