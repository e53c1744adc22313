"""Metadata filters: conditions (equality, in, range), their validation, and the index
over point metadata that turns a filter into the set of rows that pass it.

Only top-level scalar metadata values (strings, numbers, booleans) are filterable.
Numbers compare as float64 (``google.protobuf.Value`` has only doubles); booleans are not
numbers (``True`` never equals ``1``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from retrieval.errors import InvalidArgument

MAX_CONDITIONS = 16
MAX_IN_VALUES = 1024
# Longest filter field name (characters); longer is INVALID_FILTER before any lookup.
MAX_FIELD_CHARS = 256

Scalar = str | float | bool
# A hashable key that keeps booleans, numbers and strings apart.
ValueKey = tuple[str, Any]


def _bad(message: str, field: str | None = None) -> InvalidArgument:
    """INVALID_FILTER; the field name goes into the metadata only (the server bounds every
    metadata value it sends), never into the message, so it is echoed once."""
    metadata = {"field": field} if field is not None else None
    return InvalidArgument(message, reason="INVALID_FILTER", metadata=metadata)


def value_key(value: Any) -> ValueKey | None:
    """The posting-list key of a metadata value; None when it is not a filterable scalar."""
    if isinstance(value, bool):
        return ("b", value)
    if isinstance(value, (int, float)):
        number = float(value)
        return ("n", number) if math.isfinite(number) else None
    if isinstance(value, str):
        return ("s", value)
    return None


@dataclass(frozen=True)
class Equals:
    """``field == value``."""

    field: str
    value: Scalar


@dataclass(frozen=True)
class In:
    """``field`` equals one of ``values``."""

    field: str
    values: tuple[Scalar, ...]


@dataclass(frozen=True)
class Range:
    """``field`` is a number within the bounds; None bounds are open."""

    field: str
    gte: float | None = None
    gt: float | None = None
    lte: float | None = None
    lt: float | None = None


Condition = Equals | In | Range


def make_filter(conditions: Sequence[Condition]) -> tuple[Condition, ...]:
    """Check the shape of a conjunction (not its fields) and return it as a tuple."""
    if len(conditions) > MAX_CONDITIONS:
        raise _bad(f"a filter has at most {MAX_CONDITIONS} conditions")
    for cond in conditions:
        if not cond.field:
            raise _bad("a filter condition needs a field")
        if len(cond.field) > MAX_FIELD_CHARS:
            raise InvalidArgument(
                f"a filter field name has at most {MAX_FIELD_CHARS} characters",
                reason="INVALID_FILTER", metadata={"limit": MAX_FIELD_CHARS},
            )
        if isinstance(cond, Equals):
            if value_key(cond.value) is None:
                raise _bad("equals needs a string, number or boolean", cond.field)
        elif isinstance(cond, In):
            if not cond.values or len(cond.values) > MAX_IN_VALUES:
                raise _bad(f"in needs 1-{MAX_IN_VALUES} values", cond.field)
            if any(value_key(v) is None for v in cond.values):
                raise _bad("in takes strings, numbers or booleans", cond.field)
        elif isinstance(cond, Range):
            bounds = (cond.gte, cond.gt, cond.lte, cond.lt)
            if all(b is None for b in bounds):
                raise _bad("range needs at least one bound", cond.field)
            if any(b is not None and math.isnan(b) for b in bounds):
                raise _bad("range has a NaN bound", cond.field)
            if cond.gte is not None and cond.gt is not None:
                raise _bad("range sets both gte and gt", cond.field)
            if cond.lte is not None and cond.lt is not None:
                raise _bad("range sets both lte and lt", cond.field)
        else:  # pragma: no cover - the type union is closed
            raise _bad("unknown condition type")
    return tuple(conditions)


class MetadataIndex:
    """Posting lists over point metadata, by row number.

    Invariant: entries are only ever added; a row that is later replaced or deleted keeps
    its entries, and callers AND the result with the collection's live mask. A compaction
    builds a fresh index.
    """

    def __init__(self) -> None:
        self._postings: dict[str, dict[ValueKey, list[int]]] = {}
        self._numbers: dict[str, tuple[list[int], list[float]]] = {}
        # Every top-level key any point has carried (filterable or not).
        self.known_fields: set[str] = set()
        self._cache: dict[Any, np.ndarray] = {}

    def add(self, row: int, metadata: Mapping[str, Any]) -> None:
        """Index one row's metadata."""
        if not metadata:
            return
        self._cache.clear()
        for name, value in metadata.items():
            self.known_fields.add(name)
            key = value_key(value)
            if key is None:
                continue
            self._postings.setdefault(name, {}).setdefault(key, []).append(row)
            if key[0] == "n":
                rows, values = self._numbers.setdefault(name, ([], []))
                rows.append(row)
                values.append(key[1])

    def add_known_fields(self, names: Iterable[str]) -> None:
        """Remember fields carried by points that no longer exist (kept across snapshots)."""
        self.known_fields.update(names)

    def check_fields(self, conditions: Sequence[Condition]) -> None:
        """INVALID_FILTER when a condition names a field no point has ever carried."""
        for cond in conditions:
            if cond.field not in self.known_fields:
                raise InvalidArgument(
                    "a filter field is unknown in this collection",
                    reason="INVALID_FILTER",
                    metadata={"field": cond.field},
                )

    def mask(self, conditions: Sequence[Condition], n_rows: int) -> np.ndarray:
        """Boolean mask over rows ``0..n_rows-1`` of the rows passing every condition."""
        out = np.ones(n_rows, dtype=bool)
        for cond in conditions:
            out &= self._condition_mask(cond, n_rows)
        return out

    def _condition_mask(self, cond: Condition, n_rows: int) -> np.ndarray:
        if isinstance(cond, Range):
            rows, values = self._number_arrays(cond.field)
            ok = np.ones(values.shape[0], dtype=bool)
            if cond.gte is not None:
                ok &= values >= cond.gte
            if cond.gt is not None:
                ok &= values > cond.gt
            if cond.lte is not None:
                ok &= values <= cond.lte
            if cond.lt is not None:
                ok &= values < cond.lt
            selected = rows[ok]
        else:
            wanted = (cond.value,) if isinstance(cond, Equals) else cond.values
            parts = [self._posting_array(cond.field, value_key(v)) for v in wanted]
            selected = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
        mask = np.zeros(n_rows, dtype=bool)
        mask[selected[selected < n_rows]] = True
        return mask

    def _posting_array(self, name: str, key: ValueKey | None) -> np.ndarray:
        cache_key = ("p", name, key)
        arr = self._cache.get(cache_key)
        if arr is None:
            rows = self._postings.get(name, {}).get(key, []) if key else []
            arr = np.asarray(rows, dtype=np.int64)
            self._cache[cache_key] = arr
        return arr

    def _number_arrays(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        cache_key = ("n", name)
        cached = self._cache.get(cache_key)
        if cached is None:
            rows, values = self._numbers.get(name, ([], []))
            cached = np.asarray(rows, dtype=np.int64), np.asarray(values, dtype=np.float64)
            self._cache[cache_key] = cached  # type: ignore[assignment]
        return cached  # type: ignore[return-value]
