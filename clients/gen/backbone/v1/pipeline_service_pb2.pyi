from backbone.v1 import common_pb2 as _common_pb2
from backbone.v1 import generation_service_pb2 as _generation_service_pb2
from backbone.v1 import vector_search_service_pb2 as _vector_search_service_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GuardrailPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GUARDRAIL_POLICY_UNSPECIFIED: _ClassVar[GuardrailPolicy]
    GUARDRAIL_POLICY_OFF: _ClassVar[GuardrailPolicy]
    GUARDRAIL_POLICY_FLAG: _ClassVar[GuardrailPolicy]
    GUARDRAIL_POLICY_REDACT: _ClassVar[GuardrailPolicy]
    GUARDRAIL_POLICY_BLOCK: _ClassVar[GuardrailPolicy]
GUARDRAIL_POLICY_UNSPECIFIED: GuardrailPolicy
GUARDRAIL_POLICY_OFF: GuardrailPolicy
GUARDRAIL_POLICY_FLAG: GuardrailPolicy
GUARDRAIL_POLICY_REDACT: GuardrailPolicy
GUARDRAIL_POLICY_BLOCK: GuardrailPolicy

class RetrieveRequest(_message.Message):
    __slots__ = ("query", "collection", "search_top_k", "top_n", "skip_rerank", "filter", "mode")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    SEARCH_TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_N_FIELD_NUMBER: _ClassVar[int]
    SKIP_RERANK_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    query: str
    collection: str
    search_top_k: int
    top_n: int
    skip_rerank: bool
    filter: _vector_search_service_pb2.Filter
    mode: _vector_search_service_pb2.SearchMode
    def __init__(self, query: _Optional[str] = ..., collection: _Optional[str] = ..., search_top_k: _Optional[int] = ..., top_n: _Optional[int] = ..., skip_rerank: _Optional[bool] = ..., filter: _Optional[_Union[_vector_search_service_pb2.Filter, _Mapping]] = ..., mode: _Optional[_Union[_vector_search_service_pb2.SearchMode, str]] = ...) -> None: ...

class Source(_message.Message):
    __slots__ = ("id", "text", "search_score", "rerank_score", "metadata")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SEARCH_SCORE_FIELD_NUMBER: _ClassVar[int]
    RERANK_SCORE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    id: str
    text: str
    search_score: float
    rerank_score: float
    metadata: _struct_pb2.Struct
    def __init__(self, id: _Optional[str] = ..., text: _Optional[str] = ..., search_score: _Optional[float] = ..., rerank_score: _Optional[float] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class RetrieveResponse(_message.Message):
    __slots__ = ("sources", "timings", "degradations")
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    DEGRADATIONS_FIELD_NUMBER: _ClassVar[int]
    sources: _containers.RepeatedCompositeFieldContainer[Source]
    timings: _containers.RepeatedCompositeFieldContainer[_common_pb2.HopTiming]
    degradations: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, sources: _Optional[_Iterable[_Union[Source, _Mapping]]] = ..., timings: _Optional[_Iterable[_Union[_common_pb2.HopTiming, _Mapping]]] = ..., degradations: _Optional[_Iterable[str]] = ...) -> None: ...

class AnswerRequest(_message.Message):
    __slots__ = ("retrieve", "model", "sampling", "system_prompt", "history", "skip_cache", "guardrails")
    class GuardrailsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: GuardrailPolicy
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[GuardrailPolicy, str]] = ...) -> None: ...
    RETRIEVE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_PROMPT_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    SKIP_CACHE_FIELD_NUMBER: _ClassVar[int]
    GUARDRAILS_FIELD_NUMBER: _ClassVar[int]
    retrieve: RetrieveRequest
    model: str
    sampling: _generation_service_pb2.SamplingParams
    system_prompt: str
    history: _containers.RepeatedCompositeFieldContainer[_generation_service_pb2.ChatMessage]
    skip_cache: bool
    guardrails: _containers.ScalarMap[str, GuardrailPolicy]
    def __init__(self, retrieve: _Optional[_Union[RetrieveRequest, _Mapping]] = ..., model: _Optional[str] = ..., sampling: _Optional[_Union[_generation_service_pb2.SamplingParams, _Mapping]] = ..., system_prompt: _Optional[str] = ..., history: _Optional[_Iterable[_Union[_generation_service_pb2.ChatMessage, _Mapping]]] = ..., skip_cache: _Optional[bool] = ..., guardrails: _Optional[_Mapping[str, GuardrailPolicy]] = ...) -> None: ...

class GuardrailFinding(_message.Message):
    __slots__ = ("detector", "target", "action", "count", "source_id")
    DETECTOR_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    detector: str
    target: str
    action: str
    count: int
    source_id: str
    def __init__(self, detector: _Optional[str] = ..., target: _Optional[str] = ..., action: _Optional[str] = ..., count: _Optional[int] = ..., source_id: _Optional[str] = ...) -> None: ...

class AnswerSources(_message.Message):
    __slots__ = ("sources",)
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    sources: _containers.RepeatedCompositeFieldContainer[Source]
    def __init__(self, sources: _Optional[_Iterable[_Union[Source, _Mapping]]] = ...) -> None: ...

class AnswerFinal(_message.Message):
    __slots__ = ("finish_reason", "usage", "timings", "model", "degradations", "cache_hit", "sources_used", "guardrails")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DEGRADATIONS_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    SOURCES_USED_FIELD_NUMBER: _ClassVar[int]
    GUARDRAILS_FIELD_NUMBER: _ClassVar[int]
    finish_reason: _generation_service_pb2.FinishReason
    usage: _common_pb2.Usage
    timings: _containers.RepeatedCompositeFieldContainer[_common_pb2.HopTiming]
    model: str
    degradations: _containers.RepeatedScalarFieldContainer[str]
    cache_hit: bool
    sources_used: int
    guardrails: _containers.RepeatedCompositeFieldContainer[GuardrailFinding]
    def __init__(self, finish_reason: _Optional[_Union[_generation_service_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., timings: _Optional[_Iterable[_Union[_common_pb2.HopTiming, _Mapping]]] = ..., model: _Optional[str] = ..., degradations: _Optional[_Iterable[str]] = ..., cache_hit: _Optional[bool] = ..., sources_used: _Optional[int] = ..., guardrails: _Optional[_Iterable[_Union[GuardrailFinding, _Mapping]]] = ...) -> None: ...

class AnswerResponse(_message.Message):
    __slots__ = ("sources", "delta", "final")
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    sources: AnswerSources
    delta: _generation_service_pb2.GenerateDelta
    final: AnswerFinal
    def __init__(self, sources: _Optional[_Union[AnswerSources, _Mapping]] = ..., delta: _Optional[_Union[_generation_service_pb2.GenerateDelta, _Mapping]] = ..., final: _Optional[_Union[AnswerFinal, _Mapping]] = ...) -> None: ...
