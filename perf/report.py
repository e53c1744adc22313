"""Small helpers shared by the perf scripts: percentiles, medians, JSON and markdown output.

Percentiles use numpy's default (linear interpolation between closest ranks), so a figure
here can be reproduced from the raw samples with ``numpy.percentile``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: The percentiles every latency summary carries, as (key, q) pairs.
PERCENTILES: tuple[tuple[str, float], ...] = (("p50", 50.0), ("p95", 95.0), ("p99", 99.0))


def latency_summary(samples_ms: Iterable[float]) -> dict[str, float | int | None]:
    """p50/p95/p99/max/mean and count of ``samples_ms``; every figure is None when empty."""
    values = np.asarray(list(samples_ms), dtype=np.float64)
    if values.size == 0:
        summary: dict[str, float | int | None] = {key: None for key, _ in PERCENTILES}
        summary.update(max=None, mean=None, count=0)
        return summary
    points = np.percentile(values, [q for _, q in PERCENTILES])
    summary = {key: round(float(v), 3) for (key, _), v in zip(PERCENTILES, points, strict=True)}
    summary.update(
        max=round(float(values.max()), 3),
        mean=round(float(values.mean()), 3),
        count=int(values.size),
    )
    return summary


def median(values: Iterable[float | None]) -> float | None:
    """Median of the non-None values, or None when there are none."""
    present = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not present:
        return None
    return float(np.median(present))


def dig(record: Mapping[str, Any], path: str) -> Any:
    """``record["a"]["b"]`` for ``path="a.b"``; None when any step is missing."""
    node: Any = record
    for key in path.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def write_json(path: Path, data: Any) -> Path:
    """Write ``data`` as indented JSON (creating parent dirs); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def emit_json(path: Path | None, data: Any) -> None:
    """A script's result: written to ``path`` (its --json-out), or printed when None."""
    if path:
        write_json(path, data)
    else:
        print(json.dumps(data, indent=2))


def read_json(path: Path) -> Any:
    """Read a JSON file written by :func:`write_json` (or any JSON file)."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def fmt(value: Any, digits: int = 1) -> str:
    """A table cell: numbers rounded to ``digits``, None as an en dash, bools as yes/no."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table; cells go through :func:`fmt` unless already strings."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        cells = [c if isinstance(c, str) else fmt(c) for c in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
