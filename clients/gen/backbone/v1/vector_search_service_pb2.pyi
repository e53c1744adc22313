from backbone.v1 import common_pb2 as _common_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Metric(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METRIC_UNSPECIFIED: _ClassVar[Metric]
    METRIC_COSINE: _ClassVar[Metric]
    METRIC_INNER_PRODUCT: _ClassVar[Metric]
    METRIC_L2: _ClassVar[Metric]

class IndexKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INDEX_KIND_UNSPECIFIED: _ClassVar[IndexKind]
    INDEX_KIND_FLAT: _ClassVar[IndexKind]
    INDEX_KIND_IVF_FLAT: _ClassVar[IndexKind]
    INDEX_KIND_IVF_PQ: _ClassVar[IndexKind]
    INDEX_KIND_HNSW: _ClassVar[IndexKind]

class SearchMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEARCH_MODE_UNSPECIFIED: _ClassVar[SearchMode]
    SEARCH_MODE_DENSE: _ClassVar[SearchMode]
    SEARCH_MODE_KEYWORD: _ClassVar[SearchMode]
    SEARCH_MODE_HYBRID: _ClassVar[SearchMode]

class FusionMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FUSION_METHOD_UNSPECIFIED: _ClassVar[FusionMethod]
    FUSION_METHOD_RRF: _ClassVar[FusionMethod]
    FUSION_METHOD_CONVEX_MINMAX: _ClassVar[FusionMethod]
    FUSION_METHOD_CONVEX_ZSCORE: _ClassVar[FusionMethod]

class Stemming(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STEMMING_UNSPECIFIED: _ClassVar[Stemming]
    STEMMING_ENGLISH: _ClassVar[Stemming]
    STEMMING_NONE: _ClassVar[Stemming]
METRIC_UNSPECIFIED: Metric
METRIC_COSINE: Metric
METRIC_INNER_PRODUCT: Metric
METRIC_L2: Metric
INDEX_KIND_UNSPECIFIED: IndexKind
INDEX_KIND_FLAT: IndexKind
INDEX_KIND_IVF_FLAT: IndexKind
INDEX_KIND_IVF_PQ: IndexKind
INDEX_KIND_HNSW: IndexKind
SEARCH_MODE_UNSPECIFIED: SearchMode
SEARCH_MODE_DENSE: SearchMode
SEARCH_MODE_KEYWORD: SearchMode
SEARCH_MODE_HYBRID: SearchMode
FUSION_METHOD_UNSPECIFIED: FusionMethod
FUSION_METHOD_RRF: FusionMethod
FUSION_METHOD_CONVEX_MINMAX: FusionMethod
FUSION_METHOD_CONVEX_ZSCORE: FusionMethod
STEMMING_UNSPECIFIED: Stemming
STEMMING_ENGLISH: Stemming
STEMMING_NONE: Stemming

class IndexParams(_message.Message):
    __slots__ = ("nlist", "pq_m", "hnsw_m", "ef_construction")
    NLIST_FIELD_NUMBER: _ClassVar[int]
    PQ_M_FIELD_NUMBER: _ClassVar[int]
    HNSW_M_FIELD_NUMBER: _ClassVar[int]
    EF_CONSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    nlist: int
    pq_m: int
    hnsw_m: int
    ef_construction: int
    def __init__(self, nlist: _Optional[int] = ..., pq_m: _Optional[int] = ..., hnsw_m: _Optional[int] = ..., ef_construction: _Optional[int] = ...) -> None: ...

class CreateCollectionRequest(_message.Message):
    __slots__ = ("name", "dimension", "metric", "index_kind", "index_params", "stemming")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    INDEX_KIND_FIELD_NUMBER: _ClassVar[int]
    INDEX_PARAMS_FIELD_NUMBER: _ClassVar[int]
    STEMMING_FIELD_NUMBER: _ClassVar[int]
    name: str
    dimension: int
    metric: Metric
    index_kind: IndexKind
    index_params: IndexParams
    stemming: Stemming
    def __init__(self, name: _Optional[str] = ..., dimension: _Optional[int] = ..., metric: _Optional[_Union[Metric, str]] = ..., index_kind: _Optional[_Union[IndexKind, str]] = ..., index_params: _Optional[_Union[IndexParams, _Mapping]] = ..., stemming: _Optional[_Union[Stemming, str]] = ...) -> None: ...

class CollectionInfo(_message.Message):
    __slots__ = ("name", "dimension", "metric", "index_kind", "points", "trained", "disk_bytes", "index_params", "stemming", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    INDEX_KIND_FIELD_NUMBER: _ClassVar[int]
    POINTS_FIELD_NUMBER: _ClassVar[int]
    TRAINED_FIELD_NUMBER: _ClassVar[int]
    DISK_BYTES_FIELD_NUMBER: _ClassVar[int]
    INDEX_PARAMS_FIELD_NUMBER: _ClassVar[int]
    STEMMING_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    dimension: int
    metric: Metric
    index_kind: IndexKind
    points: int
    trained: bool
    disk_bytes: int
    index_params: IndexParams
    stemming: Stemming
    version: int
    def __init__(self, name: _Optional[str] = ..., dimension: _Optional[int] = ..., metric: _Optional[_Union[Metric, str]] = ..., index_kind: _Optional[_Union[IndexKind, str]] = ..., points: _Optional[int] = ..., trained: _Optional[bool] = ..., disk_bytes: _Optional[int] = ..., index_params: _Optional[_Union[IndexParams, _Mapping]] = ..., stemming: _Optional[_Union[Stemming, str]] = ..., version: _Optional[int] = ...) -> None: ...

class CreateCollectionResponse(_message.Message):
    __slots__ = ("collection",)
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    collection: CollectionInfo
    def __init__(self, collection: _Optional[_Union[CollectionInfo, _Mapping]] = ...) -> None: ...

class ListCollectionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListCollectionsResponse(_message.Message):
    __slots__ = ("collections",)
    COLLECTIONS_FIELD_NUMBER: _ClassVar[int]
    collections: _containers.RepeatedCompositeFieldContainer[CollectionInfo]
    def __init__(self, collections: _Optional[_Iterable[_Union[CollectionInfo, _Mapping]]] = ...) -> None: ...

class DescribeCollectionRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DescribeCollectionResponse(_message.Message):
    __slots__ = ("collection",)
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    collection: CollectionInfo
    def __init__(self, collection: _Optional[_Union[CollectionInfo, _Mapping]] = ...) -> None: ...

class DeleteCollectionRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteCollectionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Payload(_message.Message):
    __slots__ = ("text", "metadata")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    text: str
    metadata: _struct_pb2.Struct
    def __init__(self, text: _Optional[str] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class Point(_message.Message):
    __slots__ = ("id", "vector", "payload")
    ID_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    id: str
    vector: _common_pb2.Vector
    payload: Payload
    def __init__(self, id: _Optional[str] = ..., vector: _Optional[_Union[_common_pb2.Vector, _Mapping]] = ..., payload: _Optional[_Union[Payload, _Mapping]] = ...) -> None: ...

class UpsertRequest(_message.Message):
    __slots__ = ("collection", "points")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    POINTS_FIELD_NUMBER: _ClassVar[int]
    collection: str
    points: _containers.RepeatedCompositeFieldContainer[Point]
    def __init__(self, collection: _Optional[str] = ..., points: _Optional[_Iterable[_Union[Point, _Mapping]]] = ...) -> None: ...

class UpsertResponse(_message.Message):
    __slots__ = ("upserted", "timings")
    UPSERTED_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    upserted: int
    timings: _containers.RepeatedCompositeFieldContainer[_common_pb2.HopTiming]
    def __init__(self, upserted: _Optional[int] = ..., timings: _Optional[_Iterable[_Union[_common_pb2.HopTiming, _Mapping]]] = ...) -> None: ...

class UpsertBatchRequest(_message.Message):
    __slots__ = ("collection", "points")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    POINTS_FIELD_NUMBER: _ClassVar[int]
    collection: str
    points: _containers.RepeatedCompositeFieldContainer[Point]
    def __init__(self, collection: _Optional[str] = ..., points: _Optional[_Iterable[_Union[Point, _Mapping]]] = ...) -> None: ...

class UpsertBatchResponse(_message.Message):
    __slots__ = ("upserted", "timings")
    UPSERTED_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    upserted: int
    timings: _containers.RepeatedCompositeFieldContainer[_common_pb2.HopTiming]
    def __init__(self, upserted: _Optional[int] = ..., timings: _Optional[_Iterable[_Union[_common_pb2.HopTiming, _Mapping]]] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("collection", "ids")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    collection: str
    ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, collection: _Optional[str] = ..., ids: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    def __init__(self, deleted: _Optional[int] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("collection", "ids", "with_vector")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    WITH_VECTOR_FIELD_NUMBER: _ClassVar[int]
    collection: str
    ids: _containers.RepeatedScalarFieldContainer[str]
    with_vector: bool
    def __init__(self, collection: _Optional[str] = ..., ids: _Optional[_Iterable[str]] = ..., with_vector: _Optional[bool] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("points",)
    POINTS_FIELD_NUMBER: _ClassVar[int]
    points: _containers.RepeatedCompositeFieldContainer[Point]
    def __init__(self, points: _Optional[_Iterable[_Union[Point, _Mapping]]] = ...) -> None: ...

class ValueList(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedCompositeFieldContainer[_struct_pb2.Value]
    def __init__(self, values: _Optional[_Iterable[_Union[_struct_pb2.Value, _Mapping]]] = ...) -> None: ...

class Range(_message.Message):
    __slots__ = ("gte", "gt", "lte", "lt")
    GTE_FIELD_NUMBER: _ClassVar[int]
    GT_FIELD_NUMBER: _ClassVar[int]
    LTE_FIELD_NUMBER: _ClassVar[int]
    LT_FIELD_NUMBER: _ClassVar[int]
    gte: float
    gt: float
    lte: float
    lt: float
    def __init__(self, gte: _Optional[float] = ..., gt: _Optional[float] = ..., lte: _Optional[float] = ..., lt: _Optional[float] = ...) -> None: ...

class Condition(_message.Message):
    __slots__ = ("field", "equals", "range")
    FIELD_FIELD_NUMBER: _ClassVar[int]
    EQUALS_FIELD_NUMBER: _ClassVar[int]
    IN_FIELD_NUMBER: _ClassVar[int]
    RANGE_FIELD_NUMBER: _ClassVar[int]
    field: str
    equals: _struct_pb2.Value
    range: Range
    def __init__(self, field: _Optional[str] = ..., equals: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., range: _Optional[_Union[Range, _Mapping]] = ..., **kwargs) -> None: ...

class Filter(_message.Message):
    __slots__ = ("must",)
    MUST_FIELD_NUMBER: _ClassVar[int]
    must: _containers.RepeatedCompositeFieldContainer[Condition]
    def __init__(self, must: _Optional[_Iterable[_Union[Condition, _Mapping]]] = ...) -> None: ...

class SearchParams(_message.Message):
    __slots__ = ("nprobe", "ef_search", "rrf_k", "candidates", "fusion", "dense_weight")
    NPROBE_FIELD_NUMBER: _ClassVar[int]
    EF_SEARCH_FIELD_NUMBER: _ClassVar[int]
    RRF_K_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    FUSION_FIELD_NUMBER: _ClassVar[int]
    DENSE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    nprobe: int
    ef_search: int
    rrf_k: int
    candidates: int
    fusion: FusionMethod
    dense_weight: float
    def __init__(self, nprobe: _Optional[int] = ..., ef_search: _Optional[int] = ..., rrf_k: _Optional[int] = ..., candidates: _Optional[int] = ..., fusion: _Optional[_Union[FusionMethod, str]] = ..., dense_weight: _Optional[float] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("collection", "vector", "text", "top_k", "filter", "params", "with_payload", "with_vector", "mode")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    WITH_PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    WITH_VECTOR_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    collection: str
    vector: _common_pb2.Vector
    text: str
    top_k: int
    filter: Filter
    params: SearchParams
    with_payload: bool
    with_vector: bool
    mode: SearchMode
    def __init__(self, collection: _Optional[str] = ..., vector: _Optional[_Union[_common_pb2.Vector, _Mapping]] = ..., text: _Optional[str] = ..., top_k: _Optional[int] = ..., filter: _Optional[_Union[Filter, _Mapping]] = ..., params: _Optional[_Union[SearchParams, _Mapping]] = ..., with_payload: _Optional[bool] = ..., with_vector: _Optional[bool] = ..., mode: _Optional[_Union[SearchMode, str]] = ...) -> None: ...

class Hit(_message.Message):
    __slots__ = ("id", "score", "payload", "vector")
    ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    id: str
    score: float
    payload: Payload
    vector: _common_pb2.Vector
    def __init__(self, id: _Optional[str] = ..., score: _Optional[float] = ..., payload: _Optional[_Union[Payload, _Mapping]] = ..., vector: _Optional[_Union[_common_pb2.Vector, _Mapping]] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("hits", "timings")
    HITS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[Hit]
    timings: _containers.RepeatedCompositeFieldContainer[_common_pb2.HopTiming]
    def __init__(self, hits: _Optional[_Iterable[_Union[Hit, _Mapping]]] = ..., timings: _Optional[_Iterable[_Union[_common_pb2.HopTiming, _Mapping]]] = ...) -> None: ...

class SearchBatchRequest(_message.Message):
    __slots__ = ("searches",)
    SEARCHES_FIELD_NUMBER: _ClassVar[int]
    searches: _containers.RepeatedCompositeFieldContainer[SearchRequest]
    def __init__(self, searches: _Optional[_Iterable[_Union[SearchRequest, _Mapping]]] = ...) -> None: ...

class SearchBatchResponse(_message.Message):
    __slots__ = ("results", "timings")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SearchResponse]
    timings: _containers.RepeatedCompositeFieldContainer[_common_pb2.HopTiming]
    def __init__(self, results: _Optional[_Iterable[_Union[SearchResponse, _Mapping]]] = ..., timings: _Optional[_Iterable[_Union[_common_pb2.HopTiming, _Mapping]]] = ...) -> None: ...

class Document(_message.Message):
    __slots__ = ("id", "text", "metadata")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    id: str
    text: str
    metadata: _struct_pb2.Struct
    def __init__(self, id: _Optional[str] = ..., text: _Optional[str] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class ChunkingParams(_message.Message):
    __slots__ = ("chunk_tokens", "overlap_tokens")
    CHUNK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OVERLAP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    chunk_tokens: int
    overlap_tokens: int
    def __init__(self, chunk_tokens: _Optional[int] = ..., overlap_tokens: _Optional[int] = ...) -> None: ...

class IngestRequest(_message.Message):
    __slots__ = ("collection", "documents", "chunking")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    CHUNKING_FIELD_NUMBER: _ClassVar[int]
    collection: str
    documents: _containers.RepeatedCompositeFieldContainer[Document]
    chunking: ChunkingParams
    def __init__(self, collection: _Optional[str] = ..., documents: _Optional[_Iterable[_Union[Document, _Mapping]]] = ..., chunking: _Optional[_Union[ChunkingParams, _Mapping]] = ...) -> None: ...

class IngestResponse(_message.Message):
    __slots__ = ("documents", "chunks", "chunk_tokens", "overlap_tokens", "timings")
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OVERLAP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    documents: int
    chunks: int
    chunk_tokens: int
    overlap_tokens: int
    timings: _containers.RepeatedCompositeFieldContainer[_common_pb2.HopTiming]
    def __init__(self, documents: _Optional[int] = ..., chunks: _Optional[int] = ..., chunk_tokens: _Optional[int] = ..., overlap_tokens: _Optional[int] = ..., timings: _Optional[_Iterable[_Union[_common_pb2.HopTiming, _Mapping]]] = ...) -> None: ...
