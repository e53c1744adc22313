"""Hostile requests for every RPC of the contract, as hypothesis strategies, and the
client side that sends them as raw bytes and judges the answers against the contract.

Shared by ``tests/fuzz/test_properties.py`` (hypothesis drives and shrinks) and
``perf/fuzz_bench.py`` (the same strategies, drawn in bulk by :func:`draw_cases`);
``perf/fuzz_client.py`` sends a case and judges the answer.

A :class:`Case` is one call: a method of the contract (taken from the descriptor pool, so
an RPC added later is fuzzed without a change here) and the raw messages to send. The
messages are drawn field by field from the request's descriptor with adversarial values
(empty, huge and odd-Unicode strings, known and unknown names, NaN/inf floats, unknown
enum numbers, boundary integers, oversized lists, nested metadata), then serialized and
possibly damaged on the wire: invalid UTF-8 put into a string field, bytes flipped or
cut, random bytes, Struct metadata nested past every limit.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from google.protobuf import descriptor as pb_descriptor
from google.protobuf import descriptor_pool, message_factory, struct_pb2
from hypothesis import strategies as st

from backbone.v1 import common_pb2
from server.app import CONTRACT_MODULES  # every service of the contract, in one place

ERROR_DOMAIN = "backbone.v1"
# ErrorInfo.reason values: the ErrorReason enum's names without their prefix.
REASONS = frozenset(n.removeprefix("ERROR_REASON_") for n in common_pb2.ErrorReason.keys()) - {"UNSPECIFIED"}
# An error's message plus trailing metadata stays under this (bounded echoes).
MAX_TRAILER_BYTES = 2048
# Fuzzed messages stay under the server's message cap (4 MiB), past which gRPC core
# answers RESOURCE_EXHAUSTED itself, without an ErrorInfo (the README's one exception).
MAX_CASE_BYTES = 3 * 1024 * 1024
# Channel options of a fuzzing client: one attempt per call, and room for big answers.
CHANNEL_OPTIONS = (
    ("grpc.enable_retries", 0),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
)
# Codes no answer may have.
NEVER = frozenset({"UNKNOWN", "INTERNAL"})
# Codes any RPC may answer to hostile input (with one ErrorInfo when not OK). A
# DEADLINE_EXCEEDED that carries an ErrorInfo is the server's own answer (admission by
# deadline: DEADLINE_TOO_SHORT); one without is the client's timer (send_and_judge).
BASE_ALLOWED = frozenset({
    "OK", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED",
    "DEADLINE_EXCEEDED",
})
EXTRA_ALLOWED = {
    "CreateCollection": frozenset({"ALREADY_EXISTS"}),
}
# Stands for invalid UTF-8 in drawn strings; replaced on the wire (same length, so no
# length prefix changes) by bytes that are not UTF-8. A noncharacter, never drawn as text.
BAD_UTF8_MARK = "\U0010fffe"
_MARK_BYTES = BAD_UTF8_MARK.encode()
_BAD_BYTES = b"\xff\xfe\xc0\x80"
assert len(_MARK_BYTES) == len(_BAD_BYTES)


@dataclass(frozen=True)
class Method:
    """One RPC of the contract."""

    path: str  # /backbone.v1.Service/Method
    service: str
    name: str
    client_streaming: bool
    server_streaming: bool
    input: pb_descriptor.Descriptor = field(compare=False, repr=False)


def contract_methods() -> list[Method]:
    """Every method of every service of the contract, from the descriptor pool."""
    pool = descriptor_pool.Default()
    out = []
    for module in CONTRACT_MODULES:
        file = importlib.import_module(module).DESCRIPTOR
        for service in file.services_by_name.values():
            for m in pool.FindServiceByName(service.full_name).methods:
                out.append(Method(
                    f"/{service.full_name}/{m.name}", service.full_name, m.name,
                    m.client_streaming, m.server_streaming, m.input_type,
                ))
    return out


@dataclass(frozen=True)
class Target:
    """What the fuzzed server knows, so drawn requests also get past the lookups.

    ``collection`` exists with ``dimension`` and is never deleted by a drawn request
    (deletes are pointed at ``scratch`` instead); ``unserved``: services answered
    UNIMPLEMENTED there; ``max_tokens``: drawn generation lengths up to this one are
    clamped to it (real engines), larger ones are kept (they must be refused)."""

    collection: str = "fuzz"
    dimension: int = 8
    models: tuple[str, ...] = ()
    scratch: tuple[str, ...] = ("fuzz-scratch", "fuzz-other")
    metadata_keys: tuple[str, ...] = ("lang", "year", "tags")
    unserved: frozenset[str] = frozenset()
    max_tokens: int = 4

    def allowed(self, method: Method) -> frozenset[str]:
        """Codes ``method`` may answer on this target."""
        if method.service in self.unserved:
            return frozenset({"UNIMPLEMENTED"})
        return BASE_ALLOWED | EXTRA_ALLOWED.get(method.name, frozenset())


@dataclass(frozen=True)
class Case:
    """One call: ``messages`` (raw bytes) to ``method``; ``kind`` says how they were made."""

    method: Method
    messages: tuple[bytes, ...]
    kind: str

    def __repr__(self) -> str:  # what hypothesis prints for a failing example
        shown = [m[:64].hex() + ("..." if len(m) > 64 else "") for m in self.messages]
        return f"Case({self.method.path}, {self.kind}, sizes={[len(m) for m in self.messages]}, {shown})"


# ----------------------------------------------------------------- values


@functools.cache
def _text() -> st.SearchStrategy[str]:
    odd = st.characters(exclude_categories=("Cs",), exclude_characters=BAD_UTF8_MARK)
    return st.one_of(
        st.just(""),
        st.text(odd, max_size=24),
        st.sampled_from(["😀" * 300, "\x00", "a\nb\r\n", " ", "\u202e", "../../etc", "%s%n{}"]),
        st.integers(129, 40_000).map(lambda n: "x" * n),
        st.sampled_from([1_000_000]).map(lambda n: "z" * n),  # a 1 MB value
        st.just(BAD_UTF8_MARK + "abc"),
    )


@functools.cache
def _names(pool: tuple[str, ...]) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(list(pool)), st.sampled_from(list(pool)), _text())


U32 = st.one_of(
    st.integers(0, 16), st.sampled_from([0, 1, 255, 256, 257, 4096, 10_001, 2**31 - 1, 2**32 - 1]),
    st.integers(0, 2**32 - 1),
)
U64 = st.one_of(U32, st.sampled_from([2**63 - 1, 2**64 - 1]), st.integers(0, 2**64 - 1))
I32 = st.one_of(st.integers(-4, 16), st.integers(-(2**31), 2**31 - 1))
F32 = st.one_of(
    st.floats(width=32), st.sampled_from([float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1.0]),
)
F64 = st.one_of(st.floats(), st.sampled_from([float("nan"), float("inf"), float("-inf")]))


@functools.cache
def _json_values(depth: int) -> st.SearchStrategy:
    scalar = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=False), st.just([]), st.just({}),
                       _text().filter(lambda s: len(s) < 200))
    return st.recursive(
        scalar,
        lambda children: st.one_of(
            st.lists(children, min_size=1, max_size=3),
            st.dictionaries(st.text(max_size=8), children, min_size=1, max_size=3),
        ),
        max_leaves=depth,
    )


def nested_dict(depth: int) -> dict:
    """{"a": {"a": ...}} with ``depth`` levels (the outer dict is level 1)."""
    out: dict = {}
    for _ in range(depth - 1):
        out = {"a": out}
    return out


@st.composite
def _struct(draw) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    if draw(st.integers(0, 5)) == 0:
        s.update(nested_dict(draw(st.integers(1, 30))))  # around the contract's limit (16)
    else:
        s.update(draw(st.dictionaries(st.sampled_from(["lang", "year", "tags", "x", ""]) | st.text(max_size=6),
                                      _json_values(8), max_size=4)))
    return s


# ----------------------------------------------------------------- messages

_T = pb_descriptor.FieldDescriptor


@functools.cache
def _scalar(fd: pb_descriptor.FieldDescriptor, target: Target, parent: str) -> st.SearchStrategy:
    t = fd.type
    if t == _T.TYPE_STRING:
        name = fd.name
        if name in ("collection",) or (name == "name" and "Collection" in parent):
            return _names((target.collection, *target.scratch))
        if name == "model":
            return _names((*target.models, "", "auto"))
        if name == "role":
            return st.one_of(st.sampled_from(["user", "assistant", "system", ""]), _text())
        if name == "field":
            return _names(target.metadata_keys)
        if name == "service":
            return _names(("embedding", "search", "rerank", "generation", "backbone.v1.EmbeddingService"))
        return _text()
    if t == _T.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == _T.TYPE_BOOL:
        return st.booleans()
    if t == _T.TYPE_ENUM:
        numbers = [v.number for v in fd.enum_type.values]
        return st.one_of(st.sampled_from(numbers), st.sampled_from(numbers), I32)
    if t == _T.TYPE_FLOAT:
        return F32
    if t == _T.TYPE_DOUBLE:
        return F64
    if t in (_T.TYPE_UINT32, _T.TYPE_FIXED32):
        return U32
    if t in (_T.TYPE_UINT64, _T.TYPE_FIXED64):
        return U64
    if t in (_T.TYPE_INT64, _T.TYPE_SINT64, _T.TYPE_SFIXED64):
        return st.integers(-(2**63), 2**63 - 1)
    return I32


def _is_repeated(fd) -> bool:
    return fd.is_repeated


def _sizes(big: int, depth: int) -> st.SearchStrategy[int]:
    """List lengths: mostly small; oversized (past every limit) only at the top level, so
    one message stays a few MB at most."""
    if depth:
        return st.integers(0, 3)
    return st.one_of(st.integers(0, 3), st.integers(0, 3), st.sampled_from([0, 1, big]))


@st.composite
def message_of(draw, desc: pb_descriptor.Descriptor, target: Target, depth: int = 0):
    """A message of ``desc`` with adversarial field values (about a third left unset)."""
    msg = message_factory.GetMessageClass(desc)()
    for fd in desc.fields:
        if draw(st.integers(0, 2)) == 0:
            continue
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            continue  # no request has a map
        if fd.message_type is not None:
            full = fd.message_type.full_name
            if full == "google.protobuf.Struct":
                getattr(msg, fd.name).CopyFrom(draw(_struct()))
                continue
            if full == "google.protobuf.Value":
                value = struct_pb2.Value()
                json_value = draw(_json_values(4))
                value.CopyFrom(_to_value(json_value))
                if _is_repeated(fd):
                    getattr(msg, fd.name).append(value)
                else:
                    getattr(msg, fd.name).CopyFrom(value)
                continue
            if full == "backbone.v1.Vector":
                vector = getattr(msg, fd.name)
                n = draw(st.sampled_from([0, 1, target.dimension - 1, target.dimension,
                                          target.dimension, target.dimension + 1, 5000]))
                vector.values.extend(draw(st.lists(F32, min_size=n, max_size=n))
                                     if n < 64 else [draw(F32)] * n)
                continue
            if depth >= 3:
                continue
            child = _message_strategy(fd.message_type, target, depth + 1)
            if _is_repeated(fd):
                n = draw(_sizes(300, depth))
                items = [draw(child) for _ in range(min(n, 3))]
                getattr(msg, fd.name).extend((items * (n // max(len(items), 1) + 1))[:n] if items else [])
            else:
                getattr(msg, fd.name).CopyFrom(draw(child))
            continue
        values = _scalar(fd, target, desc.name)
        if _is_repeated(fd):
            n = draw(_sizes(10_001, depth))
            items = [draw(values) for _ in range(min(n, 4))]
            if n > 4:  # an oversized list repeats short values (one message stays small)
                items = [v[:64] if isinstance(v, str) else v for v in items]
            getattr(msg, fd.name).extend((items * (n // max(len(items), 1) + 1))[:n] if items else [])
        else:
            setattr(msg, fd.name, draw(values))
    return msg


@functools.cache
def _message_strategy(desc, target: Target, depth: int) -> st.SearchStrategy:
    return message_of(desc, target, depth)


def _to_value(obj) -> struct_pb2.Value:
    holder = struct_pb2.Struct()
    holder.update({"v": obj})
    return holder.fields["v"]


def _tame(msg, method: Method, target: Target) -> None:
    """Keep the target usable: never delete the known collection; clamp generation
    lengths that a real engine would actually run (larger ones stay: they are refused)."""
    if method.name == "DeleteCollection" and msg.name == target.collection:
        msg.name = target.scratch[0]
    if method.name in ("Generate", "Answer"):
        sampling = msg.sampling
        if not sampling.HasField("max_tokens") or sampling.max_tokens <= 4096:
            sampling.max_tokens = min(sampling.max_tokens or target.max_tokens, target.max_tokens)


# ----------------------------------------------------------------- wire damage


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def wire_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def nested_struct(depth: int) -> bytes:
    """A Struct nesting ``depth`` Structs, encoded by hand (deeper than protobuf encodes)."""
    struct = b""
    for _ in range(depth - 1):
        struct = wire_field(1, wire_field(1, b"a") + wire_field(2, wire_field(5, struct)))
    return struct


def deep_metadata_message(method: Method, target: Target, depth: int) -> bytes:
    """A write to ``target.collection`` whose metadata nests ``depth`` Structs, for the
    RPCs that carry metadata (Upsert, UpsertBatch: a point's payload; Ingest: a document)."""
    name = wire_field(1, target.collection.encode())
    if method.name == "Ingest":
        return name + wire_field(2, wire_field(1, b"d") + wire_field(2, b"text") + wire_field(3, nested_struct(depth)))
    vector = wire_field(2, wire_field(1, b"\x00\x00\x80\x3f" * target.dimension))
    return name + wire_field(2, wire_field(1, b"p") + vector + wire_field(3, wire_field(2, nested_struct(depth))))


DEEP_METHODS = ("Upsert", "UpsertBatch", "Ingest")


@st.composite
def _damaged(draw, raw: bytes) -> tuple[bytes, str]:
    how = draw(st.sampled_from(["flip", "cut", "append", "prefix"]))
    if how == "flip" and raw:
        i = draw(st.integers(0, len(raw) - 1))
        return raw[:i] + bytes([raw[i] ^ draw(st.integers(1, 255))]) + raw[i + 1:], "flipped"
    if how == "cut" and len(raw) > 1:
        return raw[: draw(st.integers(1, len(raw) - 1))], "cut"
    if how == "append":
        return raw + draw(st.binary(min_size=1, max_size=16)), "appended"
    return draw(st.binary(min_size=1, max_size=8)) + raw, "prefixed"


def cases(target: Target, methods: Sequence[Method] | None = None) -> st.SearchStrategy[Case]:
    """Hostile calls to ``methods`` (default: every method of the contract)."""
    chosen = list(methods or contract_methods())

    @st.composite
    def case(draw) -> Case:
        method = draw(st.sampled_from(chosen))
        streaming = method.client_streaming
        n = draw(st.sampled_from([0, 1, 1, 2, 3])) if streaming else 1
        kind = draw(st.sampled_from(["fields", "fields", "fields", "bad_utf8", "damaged", "random", "deep"]))
        if kind == "deep" and method.name not in DEEP_METHODS:
            kind = "fields"
        if kind == "random":
            messages = tuple(draw(st.lists(st.binary(max_size=96), min_size=n, max_size=n)))
            return Case(method, messages, "random")
        if kind == "deep":
            depth = draw(st.sampled_from([17, 31, 33, 40, 120, 300]))
            messages = (deep_metadata_message(method, target, depth),) * max(n, 1)
            return Case(method, messages, f"deep{depth}")
        out, labels = [], set()
        for _ in range(n):
            msg = draw(_message_strategy(method.input, target, 0))
            _tame(msg, method, target)
            raw = msg.SerializeToString()
            if kind == "bad_utf8":
                if _MARK_BYTES not in raw:
                    raw += wire_field(_first_string_field(method.input), _MARK_BYTES)
                raw, label = raw.replace(_MARK_BYTES, _BAD_BYTES), "bad_utf8"
            elif kind == "damaged":
                raw, label = draw(_damaged(raw))
            else:
                label = "fields" if _MARK_BYTES not in raw else "bad_utf8"
                raw = raw.replace(_MARK_BYTES, _BAD_BYTES)
            labels.add(label)
            out.append(raw)
        if sum(map(len, out)) > MAX_CASE_BYTES:
            out = [m[:4096] for m in out]
            labels = {"cut"}
        return Case(method, tuple(out), "+".join(sorted(labels)) or "empty_stream")

    return case()


def _first_string_field(desc) -> int:
    for fd in desc.fields:
        if fd.type == _T.TYPE_STRING:
            return fd.number
    return 15  # no string field: an unknown field, which decoders skip (stays valid)


def draw_cases(target: Target, n: int, seed: int, methods: Sequence[Method] | None = None) -> list[Case]:
    """``n`` cases drawn by hypothesis outside a test (generation phase only, no database)."""
    from hypothesis import HealthCheck, Phase, given, settings

    drawn: list[Case] = []

    @settings(max_examples=n, database=None, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck), derandomize=False)
    @given(cases(target, methods))
    def collect(case: Case) -> None:
        drawn.append(case)

    from hypothesis import seed as with_seed

    with_seed(seed)(collect)()
    return drawn
