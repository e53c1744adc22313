"""The engine registry: the one place a process chooses its engines, the same way for
every hop.

A hop's engines are one table, engine name -> ``"module:Class"``; modules are imported
only for the engine that is chosen (``backbone embed`` never imports vLLM). Every engine
class answers two class-level calls, declared by :class:`EngineClass`:

* ``unavailable_reason(settings)`` - why it cannot run here (a missing package, no GPU,
  a device it does not support), or None;
* ``from_config(settings)`` - the engine, loaded (blocking).

``settings`` is the hop's config section (``EmbeddingConfig``, ``RerankConfig``) or, for
generation, the model's ``ModelSpec``. :func:`load` picks the class by the configured
name, asks it, builds it, and, when the table names a fallback for it, falls back when it
is unavailable or fails to build (ONNX embedding -> torch).

Adding an engine to a hop: write its module (a class with ``from_config`` and
``unavailable_reason``, implementing the hop's protocol: ``Embedder``, ``Reranker`` or
``Generator``) and add ONE line to that hop's table below. Config validation and the
engine lists in errors read the tables; nothing else names engines.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any, Protocol

log = logging.getLogger(__name__)

EMBEDDING = "embedding"
RERANK = "rerank"
GENERATION = "generation"

#: hop -> engine name -> "module:Class". The first engine of a table is its default.
ENGINES: dict[str, dict[str, str]] = {
    EMBEDDING: {
        "onnx": "server.engines.onnx_embedder:OnnxEmbedder",
        "torch": "server.engines.embedder:SentenceTransformerEmbedder",
    },
    RERANK: {
        "maxsim": "server.engines.maxsim_reranker:MaxSimReranker",
        "cross_encoder": "server.engines.cross_encoder_reranker:CrossEncoderReranker",
    },
    GENERATION: {
        "vllm": "server.engines.vllm_engine:VllmGenerator",
        "tensorrt_llm": "server.engines.trtllm_engine:TrtLlmGenerator",
    },
}

#: (hop, engine) -> the engine used instead when it is unavailable or fails to load.
FALLBACKS: dict[tuple[str, str], str] = {
    (EMBEDDING, "onnx"): "torch",
}


class EngineClass(Protocol):
    """What the registry asks of an engine class (class-level, before any instance)."""

    @classmethod
    def unavailable_reason(cls, settings: Any) -> str | None:
        """Why the engine cannot run with ``settings`` here, or None when it can."""

    @classmethod
    def from_config(cls, settings: Any) -> Any:
        """The engine loaded for ``settings`` (blocking: may load weights)."""


def names(hop: str) -> tuple[str, ...]:
    """The engines ``hop`` can run, the default first."""
    return tuple(ENGINES[hop])


def unknown_engine(hop: str, engine: str) -> str | None:
    """Why ``engine`` is not an engine of ``hop`` (config validation), or None when it is."""
    if engine in ENGINES[hop]:
        return None
    return f"{hop}.engine {engine!r} is not one of {', '.join(names(hop))}"


def engine_class(hop: str, engine: str) -> EngineClass:
    """The class of ``hop``'s ``engine`` (imports its module; may raise ImportError)."""
    problem = unknown_engine(hop, engine)
    if problem:
        raise ValueError(problem)
    module, _, cls = ENGINES[hop][engine].partition(":")
    return getattr(importlib.import_module(module), cls)


def unavailable_reason(hop: str, engine: str, settings: Any = None) -> str | None:
    """Why ``hop``'s ``engine`` cannot run here (its module does not import, or it says
    so), or None when it can."""
    try:
        cls = engine_class(hop, engine)
    except ImportError as exc:
        return f"{engine}: {exc}"
    return cls.unavailable_reason(settings)


def _build(hop: str, engine: str, settings: Any) -> Any:
    reason = unavailable_reason(hop, engine, settings)
    if reason:
        raise RuntimeError(f"{hop} engine {engine!r} cannot run here: {reason}")
    return engine_class(hop, engine).from_config(settings)


def load(hop: str, engine: str, settings: Any) -> Any:
    """``hop``'s ``engine`` built from ``settings``, or its fallback (see FALLBACKS)."""
    fallback = FALLBACKS.get((hop, engine))
    if fallback is None:
        return _build(hop, engine, settings)
    try:
        return _build(hop, engine, settings)
    except Exception as exc:  # missing runtime, unsupported device, vectors differ
        log.warning("%s: engine %s unavailable (%s); using %s", hop, engine, exc, fallback)
        return _build(hop, fallback, settings)
