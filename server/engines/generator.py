"""The generation hop's core: the ``Generator`` protocol, its domain types, request
validation against per-model caps, admission, and the per-request flow.

No grpc here. The servicer converts protobuf to these types and back; engines
(``vllm_engine``, ``trtllm_engine``) implement :class:`Generator`.

The flow of one request (:meth:`ServedModel.stream`):

1. :func:`validate_request` - shape, sizes and sampling ranges; pure and cheap, so bad
   input is refused before any tokenizer or engine work;
2. :class:`router.admission.AdmissionGate` - at most ``max_running + max_waiting``
   requests in the engine, and only while the estimated time to first token fits the
   request's deadline and the model's ceiling; otherwise a fast ``Overloaded``
   (RESOURCE_EXHAUSTED / OVERLOADED) with a RetryInfo;
3. prompt rendering (chat template) and tokenisation, then :func:`fit_to_context`;
4. the engine's token stream, timed (TTFT from receipt, time per output token).

Leaving the stream early (the caller cancelled, disconnected or ran out of deadline)
raises ``CancelledError``/``GeneratorExit`` inside the engine's iterator, whose cleanup
aborts the sequence in the engine; the gate slot is released on every path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from router.admission import AdmissionGate, AdmissionPolicy
from router.errors import MAX_MODEL_NAME_CHARS, check_name_length
from server.engines import registry
from server.errors import InvalidArgument, NotFound, Overloaded, Unavailable

if TYPE_CHECKING:
    from server.config import GenerationConfig

from server.engines.generation_types import (  # noqa: F401 - re-exported
    FinishReason,
    DEFAULT_MAX_TOKENS,
    MAX_STOP_STRINGS,
    MAX_STOP_CHARS,
    MAX_TOP_K,
    MAX_MESSAGES,
    MAX_REQUEST_ID_CHARS,
    CHAT_ROLES,
    INLINE_TOKENIZE_CHARS,
    AUTO_MODEL,
    ChatTurn,
    GenerationParams,
    GenerationRequest,
    ModelLimits,
    TokenDelta,
    GenerationFinal,
    GenerationEvent,
    _bad_sampling,
    _in_range,
    validate_params,
    validate_input,
    validate_request,
    fit_to_context,
)


@runtime_checkable
class Generator(Protocol):
    """One loaded model in one engine. Implementations: vLLM, TensorRT-LLM."""

    #: "vllm" or "tensorrt_llm".
    engine: str

    async def start(self) -> None:
        """Load the model and warm it with one real generation; raise if it cannot serve."""

    async def stop(self) -> None:
        """Abort what runs and release the engine (processes, memory)."""

    def prompt_token_ids(self, prompt: str, messages: Sequence[ChatTurn]) -> list[int]:
        """Tokenise a raw prompt, or render ``messages`` with the chat template and
        tokenise that. Blocking; the core runs long prompts off the event loop."""

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: GenerationParams
    ) -> AsyncIterator[GenerationEvent]:
        """Stream deltas then exactly one :class:`GenerationFinal`. ``params.max_tokens``
        is set. Closing the iterator early aborts the sequence in the engine."""

    async def abort(self, request_id: str) -> bool:
        """Abort a running request; False when it is not running here."""

    def num_unfinished(self) -> int:
        """Requests the engine still tracks (waiting or running)."""

    def healthy(self) -> bool:
        """False once the engine died."""


@dataclass(frozen=True)
class ModelSpec:
    """One served model: its name, engine, weights and caps (from config)."""

    name: str
    engine: str = "vllm"
    # HF directory; empty: the bundled SmolLM2 (converted on first use).
    model_dir: str = ""
    limits: ModelLimits = field(default_factory=ModelLimits)
    max_running: int = 32
    max_waiting: int = 256
    # Admission by time to first token (see GenerationConfig).
    max_queue_delay_ms: float = 30000.0
    default_deadline_ms: float = 120000.0
    # Engine options (see GenerationConfig for their meaning).
    dtype: str = "auto"
    kv_cache_gib: float = 2.0
    enforce_eager: bool = True
    cpu_omp_threads_bind: str = "auto"
    stream_interval: int = 1
    seed: int = 0
    # [telemetry] otlp_endpoint, for engines that export their own spans (vLLM).
    otlp_traces_endpoint: str = ""


def _spec_from(values: Mapping[str, Any], base: ModelSpec) -> ModelSpec:
    limits_keys = {"max_tokens_cap", "max_context_tokens", "max_prompt_chars"}
    spec_keys = {f for f in ModelSpec.__dataclass_fields__ if f != "limits"}
    unknown = set(values) - limits_keys - spec_keys
    if unknown:
        raise ValueError(f"unknown generation model keys: {sorted(unknown)}")
    limits = replace(base.limits, **{k: int(v) for k, v in values.items() if k in limits_keys})
    fields = {k: v for k, v in values.items() if k in spec_keys}
    types = {"max_running": int, "max_waiting": int, "kv_cache_gib": float, "seed": int,
             "max_queue_delay_ms": float, "default_deadline_ms": float}
    fields = {k: types.get(k, lambda x: x)(v) for k, v in fields.items()}
    spec = replace(base, limits=limits, **fields)
    if not spec.name:
        raise ValueError("every generation model needs a name")
    return spec


def model_specs(config: GenerationConfig) -> list[ModelSpec]:
    """The models a process serves: the default one first, then ``extra_models``.

    ``extra_models`` is a list of tables (TOML ``[[generation.extra_models]]``) or the
    same as a JSON string (environment / ``--set``); each names ``name`` and optionally
    any :class:`ModelSpec` field or cap, defaulting to the main section's values.
    """
    default = ModelSpec(
        name=config.model_name,
        engine=config.engine,
        model_dir=config.model_dir,
        limits=ModelLimits(
            max_tokens_cap=config.max_tokens_cap,
            max_context_tokens=config.max_context_tokens,
            max_prompt_chars=config.max_prompt_chars,
        ),
        max_running=config.max_running,
        max_waiting=config.max_waiting,
        max_queue_delay_ms=config.max_queue_delay_ms,
        default_deadline_ms=config.default_deadline_ms,
        dtype=config.dtype,
        kv_cache_gib=config.kv_cache_gib,
        enforce_eager=config.enforce_eager,
        cpu_omp_threads_bind=config.cpu_omp_threads_bind,
        stream_interval=config.stream_interval,
    )
    extra = config.extra_models
    if isinstance(extra, str):
        extra = json.loads(extra) if extra.strip() else []
    specs = [default] + [_spec_from(values, replace(default, name="")) for values in extra]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate generation model names: {names}")
    for spec in specs:
        problem = registry.unknown_engine(registry.GENERATION, spec.engine)
        if problem:
            raise ValueError(f"model {spec.name!r}: {problem}")
        if spec.limits.max_tokens_cap >= spec.limits.max_context_tokens:
            raise ValueError(f"model {spec.name!r}: max_tokens_cap must be < context")
    return specs


# The real request an engine answers before its model reports SERVING.
PROBE_MESSAGES = (ChatTurn("user", "Say hello."),)


async def probe(generator: Generator, name: str) -> None:
    """Generate a few greedy tokens through ``generator``; raise when none come back."""
    ids = generator.prompt_token_ids("", PROBE_MESSAGES)
    params = GenerationParams(temperature=0.0, max_tokens=4)
    tokens = 0
    async for event in generator.generate(f"probe-{id(generator)}", ids, params):
        if isinstance(event, TokenDelta):
            tokens += len(event.token_ids)
    if tokens < 1:
        raise RuntimeError(f"{generator.engine}: probe generation of {name!r} gave no tokens")


# --------------------------------------------------------------------------- validation


class ServedModel:
    """A named model: spec, generator, gate, and the request ids it is running."""

    def __init__(self, spec: ModelSpec, generator: Generator, *, default: bool = False) -> None:
        self.spec = spec
        self.generator = generator
        self.default = default
        self.gate = AdmissionGate(
            spec.max_running, spec.max_waiting,
            AdmissionPolicy(
                max_queue_delay_s=spec.max_queue_delay_ms / 1000.0,
                default_deadline_s=spec.default_deadline_ms / 1000.0,
            ),
        )
        self.ready = False

    @property
    def name(self) -> str:
        """Name used in requests."""
        return self.spec.name

    @property
    def limits(self) -> ModelLimits:
        """This model's caps."""
        return self.spec.limits

    async def count_tokens(self, prompt: str, messages: Sequence[ChatTurn]) -> int:
        """Prompt tokens after the chat template (input validated first)."""
        validate_input(prompt, messages, self.limits)
        return len(await self._tokenize(prompt, messages))

    async def _tokenize(self, prompt: str, messages: Sequence[ChatTurn]) -> list[int]:
        chars = len(prompt) + sum(len(m.content) for m in messages)
        if chars <= INLINE_TOKENIZE_CHARS:
            return self.generator.prompt_token_ids(prompt, messages)
        return await asyncio.to_thread(self.generator.prompt_token_ids, prompt, messages)

    async def stream(
        self, request: GenerationRequest, received_at: float, max_tokens_cap: int = 0
    ) -> AsyncIterator[GenerationEvent]:
        """Run ``request`` (already validated) and stream its events, timed from
        ``received_at`` (a ``time.perf_counter()`` value). ``max_tokens_cap`` (a routing
        tier's cap; 0: none) lowers the model's cap for this request."""
        if not self.ready or not self.generator.healthy():
            raise Unavailable(f"model {self.name!r} is not ready")
        limits = self.limits
        if 0 < max_tokens_cap < limits.max_tokens_cap:
            limits = replace(limits, max_tokens_cap=max_tokens_cap)
        # Admitted before tokenising (a refusal costs nothing), on a prompt length guessed
        # from its characters (~4 per token); a request that finds a free sequence slot
        # measures the prefill rate.
        chars = len(request.prompt) + sum(len(m.content) for m in request.messages)
        free_slot = self.gate.in_flight < self.gate.max_running
        try:
            self.gate.acquire(
                prompt_tokens=max(1, chars // 4), deadline=request.deadline,
                priority=request.priority,
            )
        except Overloaded:
            # Bad input is the caller's error whatever the load: a prompt long enough to
            # overflow the context is counted before the refusal (INVALID_ARGUMENT wins).
            if chars // 4 > limits.max_context_tokens // 2:
                ids = await self._tokenize(request.prompt, request.messages)
                fit_to_context(len(ids), request.params, limits)
            raise
        try:
            ids = await self._tokenize(request.prompt, request.messages)
            max_tokens = fit_to_context(len(ids), request.params, limits)
            params = replace(request.params, max_tokens=max_tokens)
            first_at = last_at = None
            engine_stream = self.generator.generate(request.request_id, ids, params)
            # aclosing: however this generator ends (cancelled, closed, garbage-collected),
            # the engine's stream is closed now, which aborts the sequence in the engine.
            async with contextlib.aclosing(engine_stream) as events:
                async for event in events:
                    now = time.perf_counter()
                    if isinstance(event, TokenDelta):
                        if event.token_ids:
                            first_at = first_at or now
                            last_at = now
                        yield event
                        continue
                    final = _timed(event, received_at, first_at, last_at, now)
                    self.gate.ttft.observe(
                        prompt_tokens=len(ids), completion_tokens=final.completion_tokens,
                        prefill_s=(final.ttft_s - final.tpot_s) if free_slot and first_at else None,
                        step_s=final.tpot_s if final.completion_tokens > 1 else None,
                    )
                    yield final
                    return
        finally:
            self.gate.release()


def _timed(
    final: GenerationFinal,
    received_at: float,
    first_at: float | None,
    last_at: float | None,
    now: float,
) -> GenerationFinal:
    ttft = (first_at - received_at) if first_at is not None else 0.0
    tpot = 0.0
    if first_at is not None and last_at is not None and final.completion_tokens > 1:
        tpot = (last_at - first_at) / (final.completion_tokens - 1)
    return replace(final, ttft_s=ttft, tpot_s=tpot, total_s=now - received_at)


class ModelRegistry:
    """The models of one process, the default first, and the running request ids."""

    def __init__(self, models: Sequence[ServedModel]) -> None:
        if not models:
            raise ValueError("no generation model configured")
        self.models: dict[str, ServedModel] = {m.name: m for m in models}
        self.default = next((m for m in models if m.default), models[0])
        self.running: dict[str, ServedModel] = {}

    def resolve(self, name: str) -> ServedModel:
        """The model called ``name``; empty means the default, and so does "auto" where
        no routing tiers are configured (with tiers, the servicer routes "auto" through
        ``server.engines.auto_route`` before it gets here)."""
        if not name or name == AUTO_MODEL:
            return self.default
        model = self.models.get(name)
        if model is None:
            check_name_length(name, "model", MAX_MODEL_NAME_CHARS)
            raise NotFound(
                "the model is not served here",
                reason="MODEL_NOT_FOUND",
                metadata={"model": name, "served": ",".join(self.models)},
            )
        return model

    async def stream(
        self,
        model: ServedModel,
        request: GenerationRequest,
        received_at: float,
        max_tokens_cap: int = 0,
    ) -> AsyncIterator[GenerationEvent]:
        """``model.stream`` with the request id registered for Abort while it runs."""
        if request.request_id in self.running:
            raise InvalidArgument(
                "request_id is already running", metadata={"field": "request_id"}
            )
        self.running[request.request_id] = model
        try:
            events = model.stream(request, received_at, max_tokens_cap)
            async with contextlib.aclosing(events) as events:
                async for event in events:
                    yield event
        finally:
            self.running.pop(request.request_id, None)

    async def abort(self, request_id: str) -> bool:
        """Abort a running request by id; raise NotFound when none runs."""
        if not request_id:
            raise InvalidArgument("request_id is empty", reason="EMPTY_INPUT")
        model = self.running.get(request_id)
        if model is None or not await model.generator.abort(request_id):
            raise NotFound(
                "no running generation has that request_id", reason="REQUEST_NOT_FOUND"
            )
        return True
