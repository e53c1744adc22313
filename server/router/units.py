"""Units of work of a forwarded request, read from its bytes without decoding it.

The balancer compares latency per unit (texts, passages, searches), so a 32-text Embed
and a 1-text one rank replicas alike. Counting a repeated field only needs the protobuf
wire format's top-level tags: each field is a varint key (number << 3 | wire type)
followed by its value, so one pass over the keys counts the occurrences of field N
without building any message. Malformed bytes count as 1 unit (the replica will say
what is wrong with them).
"""

from __future__ import annotations

EMBED = ("backbone.v1.EmbeddingService", "Embed")
# (service, method) -> the repeated field whose length is the call's units of work.
UNIT_FIELDS: dict[tuple[str, str], int] = {
    ("backbone.v1.EmbeddingService", "Embed"): 1,  # inputs
    ("backbone.v1.VectorSearchService", "SearchBatch"): 1,  # searches
    ("backbone.v1.VectorSearchService", "UpsertBatch"): 2,  # points
    ("backbone.v1.RerankService", "Rerank"): 2,  # documents
}


def _varint(data: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def count_field(data: bytes, number: int) -> int:
    """Occurrences of top-level field ``number`` in a serialized message."""
    count = i = 0
    n = len(data)
    while i < n:
        key, i = _varint(data, i)
        wire = key & 7
        if key >> 3 == number:
            count += 1
        if wire == 0:
            _, i = _varint(data, i)
        elif wire == 1:
            i += 8
        elif wire == 2:
            length, i = _varint(data, i)
            i += length
        elif wire == 5:
            i += 4
        else:
            raise ValueError(f"wire type {wire}")
    if i != n:
        raise ValueError("truncated message")
    return count


def units_of(service: str, method: str, request: bytes) -> int:
    """Units of work of one request (at least 1)."""
    number = UNIT_FIELDS.get((service, method))
    if number is None:
        return 1
    try:
        return max(1, count_field(request, number))
    except (ValueError, IndexError):
        return 1
