"""Domain types of the vector search hop: collection specs, points, queries, hits.

Plain dataclasses and enums with no grpc or protobuf import; the servicer converts the
wire messages to these and back.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from retrieval.errors import InvalidArgument
from retrieval.fusion import Fusion

MAX_NAME_CHARS = 64
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,%d}$" % MAX_NAME_CHARS)
MAX_DIMENSION = 4096
MAX_ID_BYTES = 256
MAX_TEXT_BYTES = 64 * 1024
MAX_METADATA_BYTES = 64 * 1024


class Metric(enum.Enum):
    """Similarity metric of a collection."""

    COSINE = "cosine"
    INNER_PRODUCT = "inner_product"
    L2 = "l2"

    @property
    def higher_is_closer(self) -> bool:
        """True for similarities (cosine, inner product), False for L2 distance."""
        return self is not Metric.L2


class IndexKind(enum.Enum):
    """FAISS index structure of a collection."""

    FLAT = "flat"
    IVF_FLAT = "ivf_flat"
    IVF_PQ = "ivf_pq"
    HNSW = "hnsw"

    @property
    def needs_training(self) -> bool:
        """True for the inverted-file kinds, which are trained before they index."""
        return self in (IndexKind.IVF_FLAT, IndexKind.IVF_PQ)


class SearchMode(enum.Enum):
    """How a search ranks points."""

    DENSE = "dense"
    KEYWORD = "keyword"
    HYBRID = "hybrid"


# Defaults of the index-structure parameters (zero in a request means these).
DEFAULT_HNSW_M = 32
DEFAULT_EF_CONSTRUCTION = 80
# Measured at 1M x 384 (perf.search_bench): recall@10 0.910 at 64, 0.967 at 128 for +0.17 ms.
DEFAULT_EF_SEARCH = 128
DEFAULT_NPROBE = 32
DEFAULT_CANDIDATES = 100
MAX_EF_SEARCH = 8192
MAX_NPROBE = 65536
MAX_CANDIDATES = 10000


@dataclass(frozen=True)
class CollectionSpec:
    """What a collection is, fixed at creation (zero params mean "decided later")."""

    name: str
    dimension: int
    metric: Metric = Metric.COSINE
    kind: IndexKind = IndexKind.HNSW
    # IVF lists; 0 means about 4*sqrt(n) chosen at training time.
    nlist: int = 0
    # IVF-PQ sub-quantisers; always resolved (dimension/8 or the largest divisor below).
    pq_m: int = 0
    hnsw_m: int = DEFAULT_HNSW_M
    ef_construction: int = DEFAULT_EF_CONSTRUCTION
    # BM25 tokens go through the English stemmer. New collections default to True; specs
    # written before the option existed load as False, so an existing collection keeps
    # ranking exactly as it did (its keyword index was built unstemmed).
    stemming: bool = True

    def to_dict(self) -> dict[str, Any]:
        """Plain form for msgpack."""
        return {
            "name": self.name,
            "dimension": self.dimension,
            "metric": self.metric.value,
            "kind": self.kind.value,
            "nlist": self.nlist,
            "pq_m": self.pq_m,
            "hnsw_m": self.hnsw_m,
            "ef_construction": self.ef_construction,
            "stemming": self.stemming,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CollectionSpec:
        """Inverse of :meth:`to_dict`."""
        return cls(
            name=data["name"],
            dimension=int(data["dimension"]),
            metric=Metric(data["metric"]),
            kind=IndexKind(data["kind"]),
            nlist=int(data["nlist"]),
            pq_m=int(data["pq_m"]),
            hnsw_m=int(data["hnsw_m"]),
            ef_construction=int(data["ef_construction"]),
            stemming=bool(data.get("stemming", False)),
        )


def make_spec(
    name: str,
    dimension: int,
    metric: Metric | None = None,
    kind: IndexKind | None = None,
    *,
    nlist: int = 0,
    pq_m: int = 0,
    hnsw_m: int = 0,
    ef_construction: int = 0,
    stemming: bool = True,
) -> CollectionSpec:
    """Validate creation parameters and fill in defaults; raises InvalidArgument."""
    if not NAME_PATTERN.match(name or ""):
        raise InvalidArgument(
            "collection name must be 1-64 characters of [A-Za-z0-9_-]",
            metadata={"field": "name"},
        )
    if not 1 <= dimension <= MAX_DIMENSION:
        raise InvalidArgument(
            f"dimension must be 1-{MAX_DIMENSION}",
            metadata={"field": "dimension", "limit": MAX_DIMENSION},
        )
    kind = kind or IndexKind.HNSW
    if nlist < 0 or nlist > 65536:
        raise InvalidArgument("nlist must be 0-65536", metadata={"field": "nlist"})
    if hnsw_m < 0 or hnsw_m > 256:
        raise InvalidArgument("hnsw_m must be 0-256", metadata={"field": "hnsw_m"})
    if ef_construction < 0 or ef_construction > MAX_EF_SEARCH:
        raise InvalidArgument(
            f"ef_construction must be 0-{MAX_EF_SEARCH}", metadata={"field": "ef_construction"}
        )
    if kind is IndexKind.IVF_PQ:
        if pq_m == 0:
            pq_m = _default_pq_m(dimension)
        elif dimension % pq_m != 0:
            raise InvalidArgument(
                "pq_m must divide the dimension", metadata={"field": "pq_m"}
            )
    else:
        pq_m = 0
    return CollectionSpec(
        name=name,
        dimension=dimension,
        metric=metric or Metric.COSINE,
        kind=kind,
        nlist=nlist,
        pq_m=pq_m,
        hnsw_m=hnsw_m or DEFAULT_HNSW_M,
        ef_construction=ef_construction or DEFAULT_EF_CONSTRUCTION,
        stemming=stemming,
    )


def _default_pq_m(dimension: int) -> int:
    """dimension/8 when it divides evenly, else the largest divisor not above it."""
    target = max(1, dimension // 8)
    for m in range(target, 0, -1):
        if dimension % m == 0:
            return m
    return 1


@dataclass(frozen=True)
class Payload:
    """What is stored with a point besides its vector."""

    text: str = ""
    # Top-level scalars (str, float, bool) are filterable; nested values are kept as is.
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Point:
    """A point to write: id, vector (float32, 1-D) and payload."""

    id: str
    vector: np.ndarray
    payload: Payload = field(default_factory=Payload)


@dataclass(frozen=True)
class StoredPoint:
    """A point as read back by Get."""

    id: str
    payload: Payload
    vector: np.ndarray | None = None


@dataclass(frozen=True)
class SearchParams:
    """Per-search tunables; zero means the default."""

    nprobe: int = 0
    ef_search: int = 0
    rrf_k: int = 0
    candidates: int = 0
    # Hybrid fusion; None: the server default (retrieval.fusion.FusionDefaults).
    fusion: Fusion | None = None
    # Hybrid: weight of the dense ranking in [0, 1] (keyword: 1 - it); None: the default.
    dense_weight: float | None = None


@dataclass(frozen=True)
class Hit:
    """One search result."""

    id: str
    score: float
    payload: Payload | None = None
    vector: np.ndarray | None = None


def check_id(point_id: str) -> None:
    """Ids are 1-256 bytes of UTF-8."""
    size = len(point_id.encode("utf-8"))
    if not 1 <= size <= MAX_ID_BYTES:
        raise InvalidArgument(
            f"point id must be 1-{MAX_ID_BYTES} bytes", metadata={"limit": MAX_ID_BYTES}
        )


def check_vector(values: np.ndarray, dimension: int, what: str = "vector") -> np.ndarray:
    """A 1-D float32 copy of ``values`` after checking its length and finiteness."""
    vec = np.asarray(values, dtype=np.float32).reshape(-1)
    if vec.shape[0] != dimension:
        raise InvalidArgument(
            f"{what} has {vec.shape[0]} values, the collection's dimension is {dimension}",
            reason="DIMENSION_MISMATCH",
            metadata={"expected": dimension, "got": vec.shape[0]},
        )
    if not np.isfinite(vec).all():
        raise InvalidArgument(f"{what} holds NaN or Inf", reason="INVALID_VECTOR")
    return vec


def normalize_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero); returns a new float32 array."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return (vectors / norms).astype(np.float32, copy=False)


def check_top_k(top_k: int, max_top_k: int) -> int:
    """top_k must be 1..max_top_k; 0 is rejected (there is no implicit default)."""
    if not 1 <= top_k <= max_top_k:
        raise InvalidArgument(
            f"top_k must be 1-{max_top_k}",
            reason="INVALID_TOP_K",
            metadata={"limit": max_top_k, "got": top_k},
        )
    return top_k


@dataclass(frozen=True)
class SearchQuery:
    """One search against a collection, already validated for shape and limits.

    ``vector`` is required for dense and hybrid modes (a text query is embedded first);
    ``text`` for keyword and hybrid modes.
    """

    k: int
    vector: np.ndarray | None = None
    text: str = ""
    mode: SearchMode = SearchMode.DENSE
    # A conjunction of filter conditions (retrieval.filters), empty for none.
    conditions: tuple[Any, ...] = ()
    params: SearchParams = field(default_factory=SearchParams)
    with_payload: bool = False
    with_vector: bool = False
