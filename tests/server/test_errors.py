"""Error policy: domain errors -> canonical status + exactly one ErrorInfo; never UNKNOWN.

The static checks read the code base so that no reason the interceptor could emit is
missing from the proto ``ErrorReason`` enum. The wire checks run a real grpc.aio server
with a fake embedding hop whose servicer raises what each test tells it to.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import re
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool

import retrieval.errors as retrieval_errors
import router.errors as errors_module
from backbone.v1 import common_pb2
from backbone.v1 import embedding_service_pb2_grpc as emb_grpc
from server import metrics
from server.app import contract_services
from server.errors import (
    ERROR_DOMAIN,
    AlreadyExists,
    BackboneError,
    FailedPrecondition,
    Cancelled,
    DeadlineTooShort,
    InvalidArgument,
    NotFound,
    NotImplementedYet,
    Overloaded,
    Unauthenticated,
    Unavailable,
)
from server_fakes import (
    EMBEDDING_SERVICE,
    FakeEmbeddingHop,
    embed_request,
    embed_stream,
    only_error_info,
    stream_request,
)
from tests.conftest import make_config, running

REPO = Path(__file__).resolve().parents[2]
SCANNED_DIRS = ("server", "router", "retrieval")
ENUM_PREFIX = "ERROR_REASON_"
ENUM_REASONS = {
    name[len(ENUM_PREFIX) :]
    for name in common_pb2.ErrorReason.keys()
    if name != "ERROR_REASON_UNSPECIFIED"
}
# reason="X", reason = "X", reason: str = "X" (keyword arguments and class attributes).
REASON_LITERAL = re.compile(r"""\breason\s*(?::\s*str\s*)?=\s*["']([^"']*)["']""")

# The canonical code each domain error must map to (DESIGN.md, "The contract").
EXPECTED_CODE = {
    BackboneError: grpc.StatusCode.INTERNAL,
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineTooShort: grpc.StatusCode.DEADLINE_EXCEEDED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    NotImplementedYet: grpc.StatusCode.UNIMPLEMENTED,
    Cancelled: grpc.StatusCode.CANCELLED,
}


def python_sources() -> list[Path]:
    """Every Python file of the scanned packages."""
    files = [p for d in SCANNED_DIRS for p in sorted((REPO / d).rglob("*.py"))]
    assert files, "no sources found: is REPO right?"
    return files


def error_classes() -> list[type[BackboneError]]:
    """BackboneError and every subclass defined in router.errors (re-exported by
    server.errors)."""
    return [
        obj
        for _, obj in inspect.getmembers(errors_module, inspect.isclass)
        if issubclass(obj, BackboneError) and obj.__module__ == errors_module.__name__
    ]


def retrieval_error_classes() -> list[type[retrieval_errors.RetrievalError]]:
    """Every error class of retrieval.errors, which server.errors maps onto the contract."""
    return [
        obj
        for _, obj in inspect.getmembers(retrieval_errors, inspect.isclass)
        if issubclass(obj, retrieval_errors.RetrievalError)
        and obj.__module__ == retrieval_errors.__name__
    ]


@pytest.mark.parametrize("cls", retrieval_error_classes(), ids=lambda c: c.__name__)
def test_retrieval_errors_map_to_the_same_status_and_reason(cls):
    from server.errors import as_backbone_error

    mapped = as_backbone_error(cls("boom", metadata={"field": "x"}))
    assert mapped is not None
    assert (mapped.status, mapped.reason, mapped.metadata) == (cls.status, cls.reason, {"field": "x"})
    documented = status_of_reasons()
    if cls is not retrieval_errors.RetrievalError:
        assert documented.get(cls.reason) == cls.status


def status_of_reasons() -> dict[str, str]:
    """Reason -> the status its proto comment names ("... Status INVALID_ARGUMENT.")."""
    text = (REPO / "protos" / "backbone" / "v1" / "common.proto").read_text()
    body = text[text.index("enum ErrorReason") :]
    out: dict[str, str] = {}
    comment = ""
    for line in body.splitlines()[1:]:
        line = line.strip()
        if line.startswith("//"):
            comment += " " + line[2:]
        elif line.startswith(ENUM_PREFIX):
            found = re.search(r"Status ([A-Z_]+)\.", comment)
            if found:
                out[line.split()[0][len(ENUM_PREFIX) :]] = found.group(1)
            comment = ""
        elif line.startswith("}"):
            break
    return out


# -- static: no reason outside the enum ----------------------------------------------


def test_every_reason_literal_in_the_code_base_is_an_enum_value():
    found: dict[str, list[str]] = {}
    for path in python_sources():
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            for reason in REASON_LITERAL.findall(line):
                found.setdefault(reason, []).append(f"{path.relative_to(REPO)}:{lineno}")
    assert found, "the scan found no reason literals at all"
    unknown = {r: where for r, where in found.items() if r not in ENUM_REASONS}
    assert not unknown, f"reasons missing from backbone.v1.ErrorReason: {unknown}"


@pytest.mark.parametrize("cls", error_classes(), ids=lambda c: c.__name__)
def test_error_class_defaults_are_enum_values_and_canonical_codes(cls):
    assert cls in EXPECTED_CODE, f"add {cls.__name__} to EXPECTED_CODE (and its wire test)"
    assert cls.reason in ENUM_REASONS
    assert grpc.StatusCode[cls.status] is EXPECTED_CODE[cls]
    assert cls.status not in ("UNKNOWN", "OK")
    assert common_pb2.ErrorReason.Value(ENUM_PREFIX + cls.reason) > 0


@pytest.mark.parametrize(
    "cls",
    error_classes(),
    ids=lambda c: c.__name__,
)
def test_error_class_default_reason_matches_the_status_the_proto_documents(cls):
    documented = status_of_reasons()
    assert documented.get(cls.reason) == cls.status


def test_literal_reasons_are_raised_with_the_status_the_proto_documents():
    """``InvalidArgument(..., reason="MODEL_NOT_FOUND")`` would contradict the contract."""
    documented = status_of_reasons()
    classes = {c.__name__: c for c in error_classes()}
    checked, wrong = 0, []
    for path in python_sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            if name not in classes:
                continue
            for kw in node.keywords:
                if kw.arg == "reason" and isinstance(kw.value, ast.Constant):
                    checked += 1
                    want = documented.get(kw.value.value)
                    if want is not None and want != classes[name].status:
                        wrong.append(f"{path.relative_to(REPO)}:{node.lineno} {name} "
                                     f"reason={kw.value.value} documented as {want}")
    assert checked, "found no error raised with a literal reason"
    assert not wrong, wrong


# -- on the wire -----------------------------------------------------------------------


@pytest.fixture(scope="module")
async def served():
    """(hop, stub, channel) of one server with the fake embedding hop."""
    hop = FakeEmbeddingHop()
    async with running(make_config(), [hop]) as server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            yield hop, emb_grpc.EmbeddingServiceStub(channel), channel


@pytest.fixture
async def hop(served):
    """The fake hop, reset to answering normally."""
    hop = served[0]
    hop.raise_in_call, hop.raise_from_call, hop.call_gate = None, 1, None
    yield hop
    hop.raise_in_call = None


@pytest.fixture
def stub(served):
    """EmbeddingService stub on the shared server."""
    return served[1]


async def stream_embed(stub, n: int) -> tuple[list, grpc.aio.AioRpcError | None]:
    """Send ``n`` EmbedStream messages (ping-pong); the responses and the error, if any."""
    return await embed_stream(stub, [stream_request(i) for i in range(n)])


async def until(predicate, timeout: float = 5.0) -> None:
    """Wait until ``predicate()`` holds (for effects recorded after the status was sent)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.001)


async def test_the_fake_server_answers(stub, hop):
    response = await stub.Embed(embed_request("a", "bcd"), timeout=10)
    assert [list(e.values) for e in response.embeddings] == [[0.0, 1.0], [1.0, 3.0]]


@pytest.mark.parametrize("cls", list(EXPECTED_CODE), ids=lambda c: c.__name__)
async def test_each_domain_error_gives_its_code_and_one_error_info(stub, hop, cls):
    hop.raise_in_call = lambda: cls("a message for the caller", metadata={"limit": 7})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Embed(embed_request(), timeout=10)
    error = caught.value
    assert error.code() is EXPECTED_CODE[cls]
    assert error.details() == "a message for the caller"
    info = only_error_info(error)
    assert info.domain == ERROR_DOMAIN == "backbone.v1"
    assert info.reason == cls.reason
    assert dict(info.metadata) == {"limit": "7"}


@pytest.mark.parametrize("cls", list(EXPECTED_CODE), ids=lambda c: c.__name__)
async def test_each_domain_error_mid_stream_gives_its_code_and_one_error_info(stub, hop, cls):
    hop.raise_in_call, hop.raise_from_call = (lambda: cls("stream broke")), hop.calls + 2
    received, error = await stream_embed(stub, 3)
    assert [r.id for r in received] == ["0"]  # the first message was answered
    assert error is not None and error.code() is EXPECTED_CODE[cls]
    assert only_error_info(error).reason == cls.reason


async def test_an_explicit_reason_travels(stub, hop):
    hop.raise_in_call = lambda: InvalidArgument(
        "inputs[3] too long", reason="INPUT_TOO_LARGE", metadata={"limit": 10, "index": 3}
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Embed(embed_request(), timeout=10)
    info = only_error_info(caught.value)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert (info.reason, dict(info.metadata)) == ("INPUT_TOO_LARGE", {"limit": "10", "index": "3"})


SECRET = "the user's private prompt text"


@pytest.mark.parametrize(
    "exc",
    [RuntimeError(SECRET), KeyError(SECRET), ValueError(SECRET), ZeroDivisionError(SECRET),
     TypeError(SECRET)],
    ids=lambda e: type(e).__name__,
)
async def test_a_bug_is_internal_without_user_data_never_unknown(stub, hop, exc):
    hop.raise_in_call = lambda: exc
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Embed(embed_request(SECRET), timeout=10)
    error = caught.value
    assert error.code() is grpc.StatusCode.INTERNAL
    info = only_error_info(error)
    assert (info.domain, info.reason) == (ERROR_DOMAIN, "INTERNAL")
    assert SECRET not in error.details()
    assert SECRET not in repr(error.trailing_metadata())
    # streaming handlers get the same treatment
    received, error = await stream_embed(stub, 2)
    assert error is not None and error.code() is grpc.StatusCode.INTERNAL
    assert only_error_info(error).reason == "INTERNAL"
    assert SECRET not in error.details()


async def test_not_implemented_error_is_unimplemented(stub, hop):
    hop.raise_in_call = lambda: NotImplementedError("later")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Embed(embed_request(), timeout=10)
    assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED
    assert only_error_info(caught.value).reason == "NOT_IMPLEMENTED"
    _, error = await stream_embed(stub, 1)
    assert error is not None and error.code() is grpc.StatusCode.UNIMPLEMENTED
    assert only_error_info(error).reason == "NOT_IMPLEMENTED"


async def test_server_keeps_serving_after_errors(stub, hop):
    hop.raise_in_call = lambda: RuntimeError("boom")
    for _ in range(3):
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Embed(embed_request(), timeout=10)
    hop.raise_in_call = None
    assert len((await stub.Embed(embed_request("x"), timeout=10)).embeddings) == 1


async def test_rpc_metrics_count_final_codes(stub, hop):
    registry = metrics.get().registry
    method = f"/{EMBEDDING_SERVICE}/Embed"

    def count(code: str) -> float:
        return registry.get_sample_value("backbone_rpcs_total", {"method": method, "code": code}) or 0

    ok, bad = count("OK"), count("INVALID_ARGUMENT")
    await stub.Embed(embed_request(), timeout=10)
    hop.raise_in_call = lambda: InvalidArgument("no")
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Embed(embed_request(), timeout=10)
    assert count("OK") == ok + 1
    # an aborted call's status reaches the client just before the server's wrappers unwind
    await until(lambda: count("INVALID_ARGUMENT") == bad + 1)
    assert count("OK") == ok + 1


def placeholder_methods() -> list[tuple[str, object]]:
    """(service, method descriptor) of every contract method the fake server does not serve."""
    pool = descriptor_pool.Default()
    return [
        (name, method)
        for name in contract_services()
        # RouterService is always served: in-process ListEndpoints when no router hop runs
        if name not in (EMBEDDING_SERVICE, "backbone.v1.RouterService")
        for method in pool.FindServiceByName(name).methods
    ]


def test_placeholders_cover_the_streaming_shapes():
    shapes = {(m.client_streaming, m.server_streaming) for _, m in placeholder_methods()}
    assert shapes >= {(False, False), (False, True), (True, False)}
    names = {f"{s}/{m.name}" for s, m in placeholder_methods()}
    assert {"backbone.v1.PipelineService/Answer", "backbone.v1.VectorSearchService/Upsert",
            "backbone.v1.GenerationService/Generate"} <= names


@pytest.mark.parametrize(
    ("service", "method"), placeholder_methods(), ids=lambda v: getattr(v, "name", v)
)
async def test_unserved_contract_methods_answer_unimplemented_with_error_info(
    served, service, method
):
    channel = served[2]
    path = f"/{service}/{method.name}"
    shape = (method.client_streaming, method.server_streaming)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if shape == (False, False):
            await channel.unary_unary(path)(b"", timeout=10)
        elif shape == (True, False):
            await channel.stream_unary(path)(iter([b"", b""]), timeout=10)
        else:
            factory = channel.unary_stream if shape == (False, True) else channel.stream_stream
            call = factory(path)(b"" if shape == (False, True) else iter([b""]), timeout=10)
            async for _ in call:
                pytest.fail("a placeholder streamed a response")
    error = caught.value
    assert error.code() is grpc.StatusCode.UNIMPLEMENTED
    info = only_error_info(error)
    assert (info.domain, info.reason) == (ERROR_DOMAIN, "NOT_IMPLEMENTED")
    assert f"{service}/{method.name}" in error.details()


async def test_a_method_outside_the_contract_is_unimplemented_not_unknown(served):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await served[2].unary_unary(f"/{EMBEDDING_SERVICE}/NoSuchMethod")(b"", timeout=10)
    assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED
