"""Milvus boolean expressions for ``retrieval.filters`` conditions, and the typed filter
document stored beside each point so that they mean what they mean on FAISS.

Milvus compares JSON values loosely (``true == 1`` holds there). The FAISS backend keeps
booleans, numbers and strings apart, so each point also stores a ``filt`` JSON object
whose keys carry the type: ``"s:<field>"`` for strings, ``"n:<field>"`` for numbers
(as float64), ``"b:<field>"`` for booleans, and ``"k:<field>": true`` for every
top-level key (filterable or not; it makes "unknown field" checkable). A condition on a
string then only ever reads an ``s:`` key, and so on.

Escaping invariant: every user string (field names, values) reaches the expression only
through :func:`quote`, a double-quoted literal in which ``\\``, ``"`` and control
characters are escaped, so no value can end the literal or add an operator.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from retrieval.filters import Condition, Equals, In, Range

FILTER_FIELD = "filt"
#: An expression true for every point (Milvus needs a non-empty expression for queries).
MATCH_ALL = 'id != ""'
#: An expression false for every point (ids are never empty).
MATCH_NONE = 'id == ""'


def quote(text: str) -> str:
    """``text`` as a double-quoted Milvus string literal."""
    out = ['"']
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 0x20:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def number(value: float) -> str:
    """A finite float as a positional literal (no exponent, always a decimal point)."""
    return np.format_float_positional(float(value), unique=True, trim="0")


def typed_key(kind: str, field: str) -> str:
    """The ``filt`` key of ``field`` for values of ``kind`` ("s", "n", "b" or "k")."""
    return f"{kind}:{field}"


def filter_document(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The typed ``filt`` object of one point's metadata (see the module docstring)."""
    doc: dict[str, Any] = {}
    for name, value in metadata.items():
        doc[typed_key("k", name)] = True
        if isinstance(value, bool):
            doc[typed_key("b", name)] = value
        elif isinstance(value, (int, float)):
            if math.isfinite(float(value)):
                doc[typed_key("n", name)] = float(value)
        elif isinstance(value, str):
            doc[typed_key("s", name)] = value
    return doc


def _ref(kind: str, field: str) -> str:
    return f"{FILTER_FIELD}[{quote(typed_key(kind, field))}]"


def _equals(field: str, value: Any) -> str:
    if isinstance(value, bool):
        return f"{_ref('b', field)} == {'true' if value else 'false'}"
    if isinstance(value, (int, float)):
        return f"{_ref('n', field)} == {number(value)}"
    return f"{_ref('s', field)} == {quote(str(value))}"


def _range(cond: Range) -> str:
    ref = _ref("n", cond.field)
    parts = [f"exists {ref}"]
    for op, bound in ((">=", cond.gte), (">", cond.gt), ("<=", cond.lte), ("<", cond.lt)):
        if bound is None:
            continue
        if math.isinf(bound):
            # Stored numbers are finite: a lower bound of -inf or an upper bound of +inf
            # holds for all of them, the other infinities for none.
            lower = op in (">=", ">")
            if (bound < 0) == lower:
                continue
            return MATCH_NONE
        parts.append(f"{ref} {op} {number(bound)}")
    return " and ".join(parts)


def condition_expr(cond: Condition) -> str:
    """One condition as a parenthesised Milvus expression."""
    if isinstance(cond, Equals):
        return f"({_equals(cond.field, cond.value)})"
    if isinstance(cond, In):
        # An OR of equalities: milvus-lite takes no ``in`` on JSON paths.
        return "(" + " or ".join(_equals(cond.field, v) for v in cond.values) + ")"
    return f"({_range(cond)})"


def filter_expr(conditions: Sequence[Condition]) -> str:
    """The conjunction as one expression; "" for no condition."""
    return " and ".join(condition_expr(c) for c in conditions)


def known_field_expr(field: str) -> str:
    """True for points carrying ``field`` at the top level of their metadata."""
    return f"exists {_ref('k', field)}"


def ids_expr(ids: Sequence[str]) -> str:
    """True for the points with these ids."""
    return "id in [" + ", ".join(quote(i) for i in ids) + "]"
