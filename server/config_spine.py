"""Configuration sections of the spine: complexity routing of ``model="auto"``, the router,
the upstream path and the pipeline (frozen dataclasses, one per section; ``server.config``
assembles them into the process's one ``Config`` and validates them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ROUTING_LEARNED = ("off", "borderline", "always")
# The default tiers. On this machine all three share the bundled SmolLM2 (the default
# model, model = "") and differ in their caps; on a GPU host point them at different
# models (a small, a large and a code model named in [[generation.extra_models]]).
DEFAULT_TIERS: tuple[dict[str, Any], ...] = (
    {"name": "small", "cost": 1.0, "scores": [0.0, 0.5], "max_tokens_cap": 256},
    {"name": "large", "cost": 10.0, "scores": [0.5, 1.0], "max_tokens_cap": 1024,
     "max_running": 16},
    {"name": "code", "cost": 4.0, "tasks": ["code"], "max_tokens_cap": 768},
)


@dataclass(frozen=True)
class RoutingConfig:
    """Complexity routing of ``model="auto"`` in the generation hop (router/model_routing.py)."""

    # Tiers: a TOML array of tables ([[routing.tiers]] name, model, cost, scores = [min,
    # max], tasks = ["code"], max_tokens_cap, max_running), or the same as a JSON string
    # (env / --set). model names a served model ("" = the default model); an unknown one
    # fails the generation hop's start. Empty: "auto" means the default model, unrouted.
    tiers: Any = DEFAULT_TIERS
    # A saturated tier sends requests whose score is within this of the next cheaper
    # tier's range down to it (when that one is not saturated).
    spill_margin: float = 0.1
    # The learned (embedding) part of the scorer: "off"; "borderline" (only when the
    # feature score is within learned_band of a tier boundary: most requests pay no
    # embedding); "always". Needs the embedding hop in the same process; without it the
    # features decide.
    learned: str = "borderline"
    learned_band: float = 0.25
    # Longest the embedding may take before the features decide alone, in ms.
    embed_timeout_ms: float = 100.0
    # Scorer weights (perf/route_train.py writes them); empty: the bundled file.
    weights_file: str = ""


ROUTER_SERVICES = ("embedding", "search", "rerank", "generation")
ROUTER_BALANCERS = ("p2c", "round_robin", "least_request")


@dataclass(frozen=True)
class RouterConfig:
    """``backbone serve router``: the replicas of each hop and the routing policy.

    ``upstreams`` maps a service (embedding, search, rerank, generation) to a list of
    targets: ``host:port``, ``dns:///name:port`` (system resolver) or
    ``dns://DNS_IP:PORT/name:port`` (that DNS server), re-resolved every
    ``dns_refresh_s``. TOML: ``[router.upstreams]`` ``embedding = ["h1:50051", ...]``;
    environment / --set: the same as JSON; the flag ``--upstream embedding=h1:1,h2:2``.
    """

    upstreams: Any = field(default_factory=dict)
    # "p2c" (power of two choices on latency per unit, in-flight and reported queue
    # wait), "round_robin" or "least_request".
    balancer: str = "p2c"
    dns_refresh_s: float = 5.0
    # Deadline given to forwarded calls whose caller set none, in seconds.
    default_timeout_s: float = 30.0
    # Kept back from the caller's deadline for the answer's way back, in milliseconds.
    reserve_ms: float = 2.0
    # Calls in flight per service at most; beyond, RESOURCE_EXHAUSTED/OVERLOADED.
    max_in_flight: int = 512
    # Attempts per call at most (first + retries + hedge).
    max_attempts: int = 3
    # Retry budget: retries and hedges <= retry_ratio x requests + retry_floor.
    retry_ratio: float = 0.2
    retry_floor: float = 10.0
    # Hedge idempotent calls (and Generate's first token) slower than the replica set's
    # recent hedge_percentile, clamped to [hedge_min_ms, hedge_max_ms].
    hedge: bool = True
    hedge_percentile: float = 0.95
    hedge_min_ms: float = 2.0
    hedge_max_ms: float = 2000.0
    # Breaker: open on breaker_consecutive failures in a row, or a failure rate of at
    # least breaker_failure_rate over breaker_window_s with breaker_min_calls calls;
    # open for breaker_open_s (doubling on re-opening), then breaker_trials trial calls.
    breaker_consecutive: int = 5
    breaker_failure_rate: float = 0.5
    breaker_window_s: float = 10.0
    breaker_min_calls: int = 20
    breaker_open_s: float = 1.0
    breaker_trials: int = 2
    # Latency-outlier ejection: latency per unit over outlier_ratio x the peers' median
    # (and outlier_min_ms above it) ejects for ejection_s, doubling on repeats up to
    # max_ejection_s; at most max_ejected_share of a service's replicas at once.
    outlier_ratio: float = 3.0
    outlier_min_ms: float = 5.0
    ejection_s: float = 2.0
    max_ejection_s: float = 60.0
    max_ejected_share: float = 0.5
    # How long start-up waits for a healthy replica of each service before serving.
    start_wait_s: float = 10.0



@dataclass(frozen=True)
class UpstreamConfig:
    """How a hop reaches the hops it calls (search -> embedding, pipeline -> all four).

    An empty address means in-process: the hop must run in this process (the embedded
    default). Over gRPC the channel uses TLS when this process serves TLS
    (``server.tls_cert``) or ``tls_ca`` is set, verifying upstreams with ``tls_ca``, else
    ``server.tls_client_ca``, else the system roots; in an mTLS deployment
    (``server.tls_client_ca`` set) the process presents its own certificate. Calls carry
    ``server.auth_token`` and what is left of the caller's deadline minus ``reserve_ms``.
    """

    # host:port (or any gRPC target) per hop; empty: in-process. For embedding,
    # search.embedding_address is read when this one is empty.
    embedding_address: str = ""
    search_address: str = ""
    rerank_address: str = ""
    generation_address: str = ""
    # PEM bundle of the CAs that verify upstream servers (empty: see above).
    tls_ca: str = ""
    # Name expected in upstream certificates instead of the address's host.
    tls_server_name: str = ""
    # Kept back from the caller's remaining deadline for the answer's way back, in ms.
    reserve_ms: float = 5.0
    # Timeout of an upstream call made for a caller that set no deadline, in seconds.
    default_timeout_s: float = 30.0


@dataclass(frozen=True)
class PipelineConfig:
    """The pipeline hop (Retrieve, Answer): system prompt and the semantic answer cache.

    The cache answers deterministic Answer requests (temperature 0 or top_k 1, and
    ``skip_cache`` unset) from earlier ones: the same question exactly, or a paraphrase
    whose query embedding has cosine >= ``cache_threshold`` and passes the lexical guard
    (no differing number, negation or substituted word). Keyed by collection and its
    version (any write invalidates), filter, model, system prompt, sampling, retrieval
    settings and history. Bounded by entries, MiB and age.
    """

    # System prompt when a request gives none; empty: router.prompt_packing's default
    # (answer from the numbered sources only, cite them as [1]..[n]).
    system_prompt: str = ""
    cache: bool = True
    cache_max_entries: int = 1024
    cache_max_mb: float = 32.0
    cache_ttl_s: float = 3600.0
    cache_threshold: float = 0.8
    # [pipeline.guardrails] (router/guardrails.py): a detector (email, phone, credit_card,
    # iban, ip_address, us_ssn, prompt_injection; "pii" = every PII kind) = "off" | "flag"
    # | "redact" | "block"; answer / passages = false skip those checks; phone_region
    # (default "US"); overrides = false refuses per-request policies. Defaults: PII
    # redacted, prompt injection blocked in the question, injected passages dropped. As
    # JSON in the environment / --set. Matched text is logged only with
    # server.log_payloads.
    guardrails: Any = field(default_factory=dict)
