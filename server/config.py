"""One frozen configuration object per process.

Built in ``main()`` from, lowest precedence first: defaults, a TOML file, ``BACKBONE_*``
environment variables, command-line flags. Environment keys are
``BACKBONE_<SECTION>__<FIELD>`` (double underscore), e.g. ``BACKBONE_SERVER__PORT=50052``
or ``BACKBONE_EMBEDDING__MAX_BATCH_SIZE=64``. Nothing here reads the environment at import
time: ``load_config`` takes the mapping it should read.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from router.guardrails import settings_from as guardrail_settings
from retrieval.fusion import Fusion, FusionDefaults
from server.config_spine import (
    ROUTER_BALANCERS,
    ROUTER_SERVICES,
    ROUTING_LEARNED,
    PipelineConfig,
    RouterConfig,
    RoutingConfig,
    TelemetryConfig,
    UpstreamConfig,
)
from server.engines import registry

ENV_PREFIX = "BACKBONE_"
SECRET_FIELDS = frozenset({"auth_token", "milvus_token", "milvus_password"})


@dataclass(frozen=True)
class ServerConfig:
    """Process-level settings: listening address, limits, security, shutdown."""

    host: str = "127.0.0.1"
    port: int = 50051
    # Hops `backbone serve` runs when none is named (the embedded default: all of them).
    services: str = "embedding,search,rerank,generation,pipeline"
    # Prometheus /metrics HTTP port; 0 disables it.
    metrics_port: int = 9464
    # Hard cap on one received gRPC message; larger messages get RESOURCE_EXHAUSTED from
    # gRPC itself before any handler runs.
    max_message_bytes: int = 4 * 1024 * 1024
    # Seconds in-flight calls get to finish after SIGTERM (health flips first).
    grace_seconds: float = 10.0
    # Bearer token required on every call except health when set.
    auth_token: str = ""
    # TLS: server certificate chain and key (PEM paths). Both or neither.
    tls_cert: str = ""
    tls_key: str = ""
    # mTLS: CA bundle that client certificates must chain to (PEM path).
    tls_client_ca: str = ""
    # Log prompts, documents and tokens. Off by default.
    log_payloads: bool = False
    log_level: str = "INFO"


SEARCH_BACKENDS = ("faiss", "milvus")


@dataclass(frozen=True)
class EmbeddingConfig:
    """The embedding hop: model, batching and input limits."""

    # Local model directory; empty means the bundled all-MiniLM-L6-v2.
    model_path: str = ""
    model_name: str = "all-MiniLM-L6-v2"
    # "onnx": ONNX Runtime on CPU, each text on its own in parallel lanes (the fastest here,
    # see server/engines/onnx_embedder.py); falls back to "torch" when the model cannot be
    # exported or its vectors differ from sentence-transformers'. "torch":
    # sentence-transformers' own model, padded or packed batches, on ``device``.
    engine: str = "onnx"
    # Torch engine's device ("cpu", "cuda"); the ONNX engine is CPU only.
    device: str = "cpu"
    # ONNX engine: texts run at once, sharing the cores; 1 = one text at a time on every
    # core (the lowest latency under load; the default), 0 = one per CPU core (~30 % more
    # texts/s on 2 cores, each text about twice as slow). See the README's figures.
    lanes: int = 1
    # Largest number of texts in one model batch (the ONNX engine runs one text per call).
    max_batch_size: int = 64
    # Longest a request waits for company before its batch runs, in milliseconds.
    max_wait_ms: float = 2.0
    # Padded tokens per model batch (rows x longest row) at most. 1024 is about the best a
    # 2-core CPU does with MiniLM (bigger batches are no faster, only longer); raise it on
    # a GPU.
    token_budget: int = 1024
    # Run batches padding-free (texts end to end, block-diagonal attention) when the
    # model allows it and matches padded output at load; false: always pad.
    pack: bool = True
    # Tokens per packed row at most (attention cost grows with its square).
    pack_row_tokens: int = 384
    # Admission by deadline (router/admission.py): a request is admitted when its
    # estimated completion -- the wait for the texts queued or running ahead of it plus
    # its own compute, from the cost the batcher measures -- fits what is left of its
    # deadline (less a 5 ms reserve) and max_queue_delay_ms; otherwise it is refused at
    # once, before it is tokenised, with RESOURCE_EXHAUSTED/OVERLOADED and a RetryInfo
    # saying when the work ahead will have drained enough. 10 s (the default deadline)
    # leaves the caller's deadline as the rule: 64 callers of one text each queue ~1-2 s
    # here (15-30 ms a text on a 2-core CPU) and 5-8 s when a shared machine runs 4-5x
    # slower (measured: 10-13 texts/s); a 5 s ceiling refused such callers thousands of
    # times, and every refusal of a caller that retries costs the CPU that should embed.
    # A backlog that would only grow is still refused. 0: only the deadline bounds.
    max_queue_delay_ms: float = 10000.0
    # Deadline of a request that sets none, in milliseconds.
    default_deadline_ms: float = 10000.0
    # Hard bounds, whatever the deadlines: texts waiting, and their tokens (the memory the
    # queue holds: token ids, ~8 bytes each); beyond, RESOURCE_EXHAUSTED/OVERLOADED.
    max_queue: int = 1024
    max_queue_tokens: int = 262144
    # Input limits, checked before any work.
    max_inputs: int = 256
    max_text_chars: int = 32768
    max_request_bytes: int = 1024 * 1024


@dataclass(frozen=True)
class SearchConfig:
    """The vector search hop: storage and limits."""

    # Directory for collections (snapshots + write-ahead logs).
    data_dir: str = "data/collections"
    # fsync the write-ahead log before acknowledging writes. Turning it off loses durability.
    durable: bool = True
    # Embedding service address for text queries when split; empty: in-process.
    embedding_address: str = ""
    max_top_k: int = 1000
    max_points_per_request: int = 1024
    # Snapshot a collection once its log exceeds this many bytes and also
    # snapshot_log_ratio times its last snapshot's size (amortises snapshot cost).
    snapshot_min_log_bytes: int = 64 * 1024 * 1024
    snapshot_log_ratio: float = 1.0
    # Threads running FAISS calls (searches run concurrently; writes are serialised).
    workers: int = 4
    # OpenMP threads per FAISS search call. 1 by default: concurrent callers already keep
    # the cores busy, and OpenMP spin-waiting steals them from the gRPC event loop.
    faiss_threads: int = 1
    # OpenMP threads for index writes (HNSW inserts, IVF training); 0: every core.
    faiss_build_threads: int = 0
    # Chunks embedded (and upserted) together during ingestion.
    ingest_batch_size: int = 64
    # Concurrent dense searches are batched onto one FAISS call: at most this many
    # queries, waiting at most this long for company (only under concurrent traffic).
    search_batch_max: int = 64
    search_batch_wait_ms: float = 0.5
    # Dense queries waiting for the index at most; beyond, RESOURCE_EXHAUSTED/OVERLOADED.
    max_search_queue: int = 4096
    # Admission by deadline of dense queries (router/admission.py, as embedding): the
    # estimated wait for the FAISS batches ahead plus the query's own must fit the
    # deadline and this ceiling, in ms (a FAISS batch takes ~1-10 ms: 2 s is a deep
    # burst); 0: only the deadline bounds.
    max_queue_delay_ms: float = 2000.0
    # Deadline of a search that sets none, in milliseconds.
    default_deadline_ms: float = 10000.0
    # Vector store: "faiss" (embedded, collections under data_dir; the default) or
    # "milvus" (a Milvus server at milvus_uri; see retrieval/milvus_store.py for what it
    # does not offer). SEARCH_BACKENDS lists the choices.
    backend: str = "faiss"
    # Milvus: server URI (http://host:19530), credentials (a token, or user + password),
    # database, the prefix of the Milvus collections this hop owns, and the per-call timeout.
    milvus_uri: str = ""
    milvus_token: str = ""
    milvus_user: str = ""
    milvus_password: str = ""
    milvus_db_name: str = ""
    milvus_collection_prefix: str = "backbone_"
    milvus_timeout_s: float = 10.0
    # Hybrid search defaults (a request's SearchParams override them; see
    # retrieval/fusion.py). fusion: "convex_minmax", "convex_zscore" or "rrf".
    fusion: str = "convex_minmax"
    # Dense weight alpha in [0, 1] of the convex methods (keyword: 1 - alpha); chosen on
    # the MS MARCO subset on a broad plateau, leaning to dense (perf/quality_bench.py).
    dense_weight: float = 0.8
    # Dense weight of RRF (0.5: classic equal-weight RRF) and its k.
    rrf_dense_weight: float = 0.5
    rrf_k: int = 60

    def fusion_defaults(self) -> FusionDefaults:
        """The hybrid defaults as retrieval takes them (values checked by load_config)."""
        return FusionDefaults(
            Fusion(self.fusion), self.dense_weight, self.rrf_dense_weight, self.rrf_k
        )


@dataclass(frozen=True)
class RerankConfig:
    """The rerank hop: engine, batching and limits."""

    # "maxsim" (bundled MiniLM late interaction, the offline default) or "cross_encoder".
    engine: str = "maxsim"
    # Local model directory for the cross-encoder engine.
    model_path: str = ""
    max_batch_size: int = 64
    max_wait_ms: float = 2.0
    token_budget: int = 32768
    # Hard bounds: pairs waiting, and their tokens; beyond, RESOURCE_EXHAUSTED/OVERLOADED.
    max_queue: int = 4096
    max_queue_tokens: int = 1048576
    max_documents: int = 1000
    max_text_chars: int = 8192
    # Torch device of the rerank model.
    device: str = "cpu"
    # Torch intra-op threads, process-wide (0: torch's default). 1: two crawl beside vLLM's
    # busy-looping CPU worker (README, "Rerank hop"); raise it on a rerank host of its own.
    threads: int = 1
    # maxsim: LRU cache of document vectors, in MiB; 0 disables it. A
    # document reranked again (any query) then costs no model time. ~0.2 MiB per passage.
    doc_cache_mb: int = 256
    # Admission by deadline (router/admission.py): the wait for the pairs ahead plus own
    # compute must fit the deadline (less 5 ms) and this ceiling (ms; 0: none); else
    # OVERLOADED at once with RetryInfo. 32 passages: ~1 s here, so 5 s lets a burst queue.
    max_queue_delay_ms: float = 5000.0
    # Deadline of a request that sets none, in milliseconds.
    default_deadline_ms: float = 10000.0


@dataclass(frozen=True)
class GenerationConfig:
    """The generation hop: models and caps."""

    # Directory of the converted bundled model (HF layout); empty: the default cache dir.
    model_dir: str = ""
    # "vllm" or "tensorrt_llm".
    engine: str = "vllm"
    model_name: str = "smollm2-135m-instruct"
    max_tokens_cap: int = 1024
    max_context_tokens: int = 2048
    max_prompt_chars: int = 65536
    # Requests waiting for the engine at most (the hard bound); beyond,
    # RESOURCE_EXHAUSTED/OVERLOADED.
    max_waiting: int = 256
    # Admission by deadline in front of the engine's waiting queue (router/admission.py):
    # the estimated time to first token -- the wait for a free sequence slot, from the
    # requests running and waiting and the measured decode step and completion length,
    # plus the prompt's prefill at the measured rate -- must fit what is left of the
    # deadline (less 5 ms) and this ceiling, in ms; beyond, RESOURCE_EXHAUSTED/OVERLOADED
    # at once with a RetryInfo. Generation queues are long by nature (a request holds its
    # slot for its whole completion): 30 s lets a burst of a few times max_running queue.
    # 0: only the deadline bounds.
    max_queue_delay_ms: float = 30000.0
    # Deadline of a request that sets none, in milliseconds.
    default_deadline_ms: float = 120000.0
    # -- generation hop engine options (server/engines/generator.py ModelSpec) --
    # Sequences the engine runs at once (vLLM max_num_seqs); more wait, up to max_waiting.
    max_running: int = 32
    # Weights/activations dtype: "auto" (vLLM's choice, but float32 on CPUs without
    # AVX512-BF16, where bfloat16 is slow), "float32", "bfloat16", "float16".
    dtype: str = "auto"
    # KV cache per model in GiB of host memory (CPU) or device memory (GPU).
    kv_cache_gib: float = 2.0
    # Run without torch.compile: engine start in seconds instead of minutes on CPU.
    enforce_eager: bool = True
    # vLLM CPU only: OpenMP thread binding (VLLM_CPU_OMP_THREADS_BIND): "auto" binds one
    # core per worker and leaves the rest to the scheduler/server; "nobind"; or "0-3".
    cpu_omp_threads_bind: str = "auto"
    # Engine steps between streamed outputs (vLLM stream_interval); 1 = every token.
    stream_interval: int = 1
    # Further models served by this process, selected by GenerateRequest.model: a TOML
    # array of tables ([[generation.extra_models]] name = "...", model_dir = "...",
    # engine = "...", any field above), or the same as a JSON string (env / --set).
    extra_models: Any = ()


def router_upstreams(cfg: RouterConfig) -> dict[str, tuple[str, ...]]:
    """``cfg.upstreams`` as {service: targets}, from a table, a JSON string, or lists of
    comma-separated strings. Raises ConfigError for an unknown service."""
    value = cfg.upstreams
    if isinstance(value, str):
        import json

        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as exc:
            raise ConfigError(f"router.upstreams is not JSON: {exc}") from exc
    if not isinstance(value, Mapping):
        raise ConfigError("router.upstreams must be a table of service = [targets]")
    out: dict[str, tuple[str, ...]] = {}
    for service, targets in value.items():
        if service not in ROUTER_SERVICES:
            raise ConfigError(
                f"router.upstreams.{service}: not one of {', '.join(ROUTER_SERVICES)}")
        items = [targets] if isinstance(targets, str) else list(targets)
        flat = tuple(t.strip() for item in items for t in str(item).split(",") if t.strip())
        if flat:
            out[service] = flat
    return out



@dataclass(frozen=True)
class Config:
    """The whole effective configuration of one process."""

    server: ServerConfig = field(default_factory=ServerConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    rerank: RerankConfig = field(default_factory=RerankConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)


class ConfigError(ValueError):
    """A configuration value that cannot be used; raised before the server starts."""


def _coerce(value: Any, typ: Any, where: str, *, text_ok: bool = True) -> Any:
    """``value`` as ``typ``. Text (env, flags) is parsed when ``text_ok``; typed values (TOML)
    must already have the type (an int is a float), never bool for a number or vice versa."""
    if typ not in (str, int, float, bool):
        return value
    if typ is str and isinstance(value, os.PathLike) and text_ok:
        return os.fspath(value)
    if isinstance(value, str) and typ is not str and text_ok:
        try:
            if typ is bool:
                text = value.strip().lower()
                if text in {"1", "true", "yes", "on"}:
                    return True
                if text in {"0", "false", "no", "off", ""}:
                    return False
                raise ValueError(value)
            if typ in (int, float):
                return typ(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: cannot read {value!r} as {typ.__name__}") from exc
    elif typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    elif type(value) is typ:
        return value
    raise ConfigError(f"{where}: {value!r} is not a {typ.__name__}")


def _merge(
    base: dict[str, dict[str, Any]],
    layer: Mapping[str, Mapping[str, Any]],
    *,
    text_ok: bool = True,
) -> None:
    sections = {f.name for f in dataclasses.fields(Config)}
    for section, values in layer.items():
        if section not in sections:
            raise ConfigError(f"unknown config section [{section}]")
        if not isinstance(values, Mapping):
            raise ConfigError(f"config section [{section}] must be a table")
        known = typing.get_type_hints(_section_type(section))
        for key, value in values.items():
            if key not in known:
                raise ConfigError(f"unknown config key {section}.{key}")
            base.setdefault(section, {})[key] = _coerce(
                value, known[key], f"{section}.{key}", text_ok=text_ok
            )


def _section_type(section: str) -> type:
    return type(getattr(Config(), section))


def env_layer(environ: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """The ``BACKBONE_<SECTION>__<FIELD>`` variables of ``environ`` as a config layer."""
    layer: dict[str, dict[str, str]] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX) :].partition("__")
        layer.setdefault(section.lower(), {})[key.lower()] = value
    return layer


def load_config(
    path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """Build the frozen config: defaults < TOML file < environment < overrides (flags)."""
    merged: dict[str, dict[str, Any]] = {}
    if path:
        with open(path, "rb") as fh:
            try:
                document = tomllib.load(fh)
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{path}: {exc}") from exc
        _merge(merged, document, text_ok=False)  # TOML is typed: no parsing of strings
    if environ is not None:
        _merge(merged, env_layer(environ))
    if overrides:
        _merge(merged, overrides)
    sections = {
        name: dataclasses.replace(getattr(Config(), name), **values)
        for name, values in merged.items()
    }
    config = Config(**sections)
    _validate(config)
    return config


def _validate(config: Config) -> None:
    s = config.server
    if bool(s.tls_cert) != bool(s.tls_key):
        raise ConfigError("server.tls_cert and server.tls_key must be set together")
    if s.tls_client_ca and not s.tls_cert:
        raise ConfigError("server.tls_client_ca (mTLS) needs server.tls_cert and tls_key")
    if not 0 <= s.port < 65536:
        raise ConfigError(f"server.port {s.port} is not a port")
    # gRPC reads a negative limit as "unlimited": the cap must stay a real cap.
    if s.max_message_bytes <= 0:
        raise ConfigError(f"server.max_message_bytes {s.max_message_bytes} must be positive")
    if s.grace_seconds < 0:
        raise ConfigError(f"server.grace_seconds {s.grace_seconds} must be >= 0")
    if not isinstance(logging.getLevelName(s.log_level.upper()), int):
        raise ConfigError(f"server.log_level {s.log_level!r} is not a logging level")
    # Engine names are the registry's (server/engines/registry.py), for every hop.
    for hop, engine in (
        (registry.EMBEDDING, config.embedding.engine),
        (registry.RERANK, config.rerank.engine),
        (registry.GENERATION, config.generation.engine),
    ):
        problem = registry.unknown_engine(hop, engine)
        if problem:
            raise ConfigError(problem)
    e = config.embedding
    if e.lanes < 0:
        raise ConfigError(f"embedding.lanes {e.lanes} must be >= 0")
    for name in ("embedding", "search", "rerank", "generation"):
        section = getattr(config, name)
        if section.max_queue_delay_ms < 0 or section.default_deadline_ms <= 0:
            raise ConfigError(
                f"{name}.max_queue_delay_ms must be >= 0 and {name}.default_deadline_ms > 0"
            )
    q = config.search
    if q.backend not in SEARCH_BACKENDS:
        raise ConfigError(
            f"search.backend {q.backend!r} is not one of {', '.join(SEARCH_BACKENDS)}"
        )
    if q.backend == "milvus" and not q.milvus_uri:
        raise ConfigError("search.backend = \"milvus\" needs search.milvus_uri")
    if q.fusion not in {f.value for f in Fusion}:
        raise ConfigError(f"search.fusion {q.fusion!r} is not one of {[f.value for f in Fusion]}")
    for key in ("dense_weight", "rrf_dense_weight"):
        if not 0.0 <= getattr(q, key) <= 1.0:
            raise ConfigError(f"search.{key} {getattr(q, key)} must be in [0, 1]")
    if not 1 <= q.rrf_k <= 1_000_000:
        raise ConfigError(f"search.rrf_k {q.rrf_k} must be 1-1000000")
    _validate_routing(config.routing)
    _validate_router(config.router)
    try:
        guardrail_settings(config.pipeline.guardrails)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _validate_routing(r: RoutingConfig) -> None:
    from router.model_routing import tiers_from

    try:
        tiers_from(r.tiers)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if r.learned not in ROUTING_LEARNED:
        raise ConfigError(f"routing.learned {r.learned!r} is not one of {', '.join(ROUTING_LEARNED)}")
    if r.spill_margin < 0 or r.learned_band < 0 or r.embed_timeout_ms < 0:
        raise ConfigError("routing.spill_margin, learned_band and embed_timeout_ms must be >= 0")


def _validate_router(r: RouterConfig) -> None:
    router_upstreams(r)
    if r.balancer not in ROUTER_BALANCERS:
        raise ConfigError(f"router.balancer {r.balancer!r} is not one of {', '.join(ROUTER_BALANCERS)}")
    if not 0 <= r.max_ejected_share <= 1 or r.max_attempts < 1 or r.max_in_flight < 1:
        raise ConfigError("router: max_ejected_share in [0, 1], max_attempts and max_in_flight >= 1")


def parse_assignment(text: str) -> tuple[str, str, str]:
    """Split a ``section.key=value`` flag into its parts."""
    dotted, sep, value = text.partition("=")
    section, dot, key = dotted.partition(".")
    if not sep or not dot or not section or not key:
        raise ConfigError(f"--set wants section.key=value, got {text!r}")
    return section.strip(), key.strip(), value


def redacted(config: Config) -> dict[str, dict[str, Any]]:
    """The config as plain dicts with secrets replaced, for the start-up log."""
    out = dataclasses.asdict(config)
    for values in out.values():
        for key in values:
            if key in SECRET_FIELDS and values[key]:
                values[key] = "***"
    return out
