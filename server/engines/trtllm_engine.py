"""TensorRT-LLM behind the :class:`~server.engines.generator.Generator` protocol.

Selected with ``generation.engine = "tensorrt_llm"`` (or per model in
``generation.extra_models``). Uses TensorRT-LLM's LLM API with async streaming::

    llm = tensorrt_llm.LLM(model=hf_dir, ...)
    async for out in llm.generate_async(prompt, sampling_params, streaming=True): ...

Import-guarded: ``tensorrt_llm`` is imported only in :meth:`TrtLlmGenerator.start`, and
:meth:`TrtLlmGenerator.unavailable_reason` tells the conformance tests (and the hop)
why it cannot load. It needs an NVIDIA GPU and the ``tensorrt_llm`` wheel; it has not
run on the CPU machines this project is developed on, and no test pretends it has - the
conformance suite runs it on a GPU host, where its import succeeds.

Prompts are rendered and tokenised with the model directory's own Hugging Face
tokenizer (the same chat template vLLM uses) and handed to the engine as token ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from server.engines.generator import (
    ChatTurn,
    GenerationEvent,
    GenerationFinal,
    GenerationParams,
    ModelSpec,
    TokenDelta,
    probe,
)
from server.engines.vllm_engine import render_prompt_ids, resolve_model_dir
from server.errors import Unavailable

log = logging.getLogger(__name__)

# TensorRT-LLM finish reasons -> the contract's.
FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "abort", "timeout": "abort"}
SEED_MODULUS = 1 << 63


def trtllm_sampling_params(params: GenerationParams) -> Any:
    """TensorRT-LLM ``SamplingParams`` for validated ``params`` (max_tokens set)."""
    from tensorrt_llm import SamplingParams

    greedy = params.temperature == 0.0
    return SamplingParams(
        max_tokens=params.max_tokens,
        temperature=None if greedy else params.temperature,
        top_k=1 if greedy else (params.top_k or None),
        top_p=None if greedy else params.top_p,
        stop=list(params.stop) or None,
        seed=None if params.seed is None else params.seed % SEED_MODULUS,
        repetition_penalty=params.repetition_penalty,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        detokenize=True,
    )


class TrtLlmGenerator:
    """A model served by TensorRT-LLM's LLM API."""

    engine = "tensorrt_llm"

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.model_dir: Path | None = None
        self._llm: Any = None
        self._tokenizer: Any = None
        # request id -> the engine's GenerationResult, for abort.
        self._active: dict[str, Any] = {}
        self._dead = False

    @classmethod
    def from_config(cls, spec: ModelSpec) -> TrtLlmGenerator:
        """A not-yet-started engine for one configured model (the registry's call)."""
        return cls(spec)

    @classmethod
    def unavailable_reason(cls, settings: object = None) -> str | None:
        """Why TensorRT-LLM cannot load here, or None when it can."""
        if importlib.util.find_spec("tensorrt_llm") is None:
            return "tensorrt_llm is not installed (needs an NVIDIA GPU host)"
        try:
            import torch

            if not torch.cuda.is_available():
                return "tensorrt_llm needs a CUDA GPU; none is visible"
        except ImportError:
            return "tensorrt_llm needs torch with CUDA"
        return None

    async def start(self) -> None:
        """Load the model (building/loading its engine), then probe it."""
        reason = self.unavailable_reason()
        if reason:
            raise Unavailable(reason)
        self.model_dir = await asyncio.to_thread(resolve_model_dir, self.spec)
        self._llm, self._tokenizer = await asyncio.to_thread(self._load, self.model_dir)
        await probe(self, self.spec.name)

    def _load(self, model_dir: Path) -> tuple[Any, Any]:
        from tensorrt_llm import LLM
        from transformers import AutoTokenizer

        # The KV cache is sized by TensorRT-LLM from free GPU memory (its default).
        llm = LLM(
            model=str(model_dir),
            tokenizer=str(model_dir),
            max_seq_len=self.spec.limits.max_context_tokens,
            max_batch_size=self.spec.max_running,
        )
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        return llm, tokenizer

    async def stop(self) -> None:
        """Shut the engine down."""
        llm, self._llm = self._llm, None
        if llm is not None:
            await asyncio.to_thread(llm.shutdown)

    def prompt_token_ids(self, prompt: str, messages: Sequence[ChatTurn]) -> list[int]:
        """See :meth:`Generator.prompt_token_ids`."""
        if self._tokenizer is None:
            raise Unavailable(f"model {self.spec.name!r} is not started")
        return render_prompt_ids(self._tokenizer, prompt, messages)

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: GenerationParams
    ) -> AsyncIterator[GenerationEvent]:
        """Stream deltas then one final event; closing early aborts in the engine."""
        if self._llm is None:
            raise Unavailable(f"model {self.spec.name!r} is not started")
        result = self._llm.generate_async(
            prompt_token_ids, sampling_params=trtllm_sampling_params(params), streaming=True
        )
        self._active[request_id] = result
        finished = False
        completion = 0
        try:
            async for out in result:
                choice = out.outputs[0]
                new_ids = list(choice.token_ids_diff)
                if new_ids:
                    completion += len(new_ids)
                    yield TokenDelta(choice.text_diff, tuple(new_ids))
                if out.finished:
                    finished = True
                    reason = FINISH_REASONS.get(choice.finish_reason or "", "stop")
                    yield GenerationFinal(reason, len(prompt_token_ids), completion)
                    return
        except Exception as exc:
            if getattr(self._llm, "_executor", None) is None:
                self._dead = True
            raise Unavailable(f"tensorrt_llm failed: {type(exc).__name__}") from exc
        finally:
            self._active.pop(request_id, None)
            if not finished:
                with contextlib.suppress(Exception):
                    result.abort()

    async def abort(self, request_id: str) -> bool:
        """Abort a running request; its stream ends with finish reason "abort"."""
        result = self._active.get(request_id)
        if result is None:
            return False
        result.abort()
        return True

    def num_unfinished(self) -> int:
        """Requests this generator has handed to the engine and not seen finish."""
        return len(self._active)

    def healthy(self) -> bool:
        """False once the engine failed."""
        return self._llm is not None and not self._dead
