from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EndpointHealth(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENDPOINT_HEALTH_UNSPECIFIED: _ClassVar[EndpointHealth]
    ENDPOINT_HEALTH_SERVING: _ClassVar[EndpointHealth]
    ENDPOINT_HEALTH_NOT_SERVING: _ClassVar[EndpointHealth]

class BreakerState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BREAKER_STATE_UNSPECIFIED: _ClassVar[BreakerState]
    BREAKER_STATE_CLOSED: _ClassVar[BreakerState]
    BREAKER_STATE_OPEN: _ClassVar[BreakerState]
    BREAKER_STATE_HALF_OPEN: _ClassVar[BreakerState]
ENDPOINT_HEALTH_UNSPECIFIED: EndpointHealth
ENDPOINT_HEALTH_SERVING: EndpointHealth
ENDPOINT_HEALTH_NOT_SERVING: EndpointHealth
BREAKER_STATE_UNSPECIFIED: BreakerState
BREAKER_STATE_CLOSED: BreakerState
BREAKER_STATE_OPEN: BreakerState
BREAKER_STATE_HALF_OPEN: BreakerState

class ListEndpointsRequest(_message.Message):
    __slots__ = ("service",)
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    service: str
    def __init__(self, service: _Optional[str] = ...) -> None: ...

class Endpoint(_message.Message):
    __slots__ = ("service", "address", "health", "breaker", "in_flight", "latency_ewma_us", "latency_p99_us", "calls", "failures", "ejections", "ejected", "reported_queue_wait_us", "reported_in_flight", "weight", "retries", "hedges", "latency_per_unit_us")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    BREAKER_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    LATENCY_EWMA_US_FIELD_NUMBER: _ClassVar[int]
    LATENCY_P99_US_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    EJECTIONS_FIELD_NUMBER: _ClassVar[int]
    EJECTED_FIELD_NUMBER: _ClassVar[int]
    REPORTED_QUEUE_WAIT_US_FIELD_NUMBER: _ClassVar[int]
    REPORTED_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    RETRIES_FIELD_NUMBER: _ClassVar[int]
    HEDGES_FIELD_NUMBER: _ClassVar[int]
    LATENCY_PER_UNIT_US_FIELD_NUMBER: _ClassVar[int]
    service: str
    address: str
    health: EndpointHealth
    breaker: BreakerState
    in_flight: int
    latency_ewma_us: int
    latency_p99_us: int
    calls: int
    failures: int
    ejections: int
    ejected: bool
    reported_queue_wait_us: int
    reported_in_flight: int
    weight: float
    retries: int
    hedges: int
    latency_per_unit_us: int
    def __init__(self, service: _Optional[str] = ..., address: _Optional[str] = ..., health: _Optional[_Union[EndpointHealth, str]] = ..., breaker: _Optional[_Union[BreakerState, str]] = ..., in_flight: _Optional[int] = ..., latency_ewma_us: _Optional[int] = ..., latency_p99_us: _Optional[int] = ..., calls: _Optional[int] = ..., failures: _Optional[int] = ..., ejections: _Optional[int] = ..., ejected: _Optional[bool] = ..., reported_queue_wait_us: _Optional[int] = ..., reported_in_flight: _Optional[int] = ..., weight: _Optional[float] = ..., retries: _Optional[int] = ..., hedges: _Optional[int] = ..., latency_per_unit_us: _Optional[int] = ...) -> None: ...

class ListEndpointsResponse(_message.Message):
    __slots__ = ("endpoints", "retry_budget_left")
    class RetryBudgetLeftEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    RETRY_BUDGET_LEFT_FIELD_NUMBER: _ClassVar[int]
    endpoints: _containers.RepeatedCompositeFieldContainer[Endpoint]
    retry_budget_left: _containers.ScalarMap[str, float]
    def __init__(self, endpoints: _Optional[_Iterable[_Union[Endpoint, _Mapping]]] = ..., retry_budget_left: _Optional[_Mapping[str, float]] = ...) -> None: ...
