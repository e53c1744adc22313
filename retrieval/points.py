"""The point table of a collection: rows of (id, vector, text, metadata, live).

Rows are append-only: upserting an id appends a row and marks the id's previous row dead;
deleting marks it dead. Row numbers are the index labels. Invariants: ``row_of[id]`` is
the id's only live row; ``live[r]`` is false exactly for replaced/deleted rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from retrieval.filters import MetadataIndex


class PointTable:
    """Rows of points with a growable float32 vector matrix."""

    def __init__(self, dimension: int) -> None:
        """An empty table for vectors of ``dimension``."""
        self.dimension = dimension
        self._vectors = np.empty((0, dimension), dtype=np.float32)
        self._live = np.empty(0, dtype=bool)
        self.n_rows = 0
        self.ids: list[str | None] = []
        self.texts: list[str] = []
        self.metas: list[dict[str, Any]] = []
        self.row_of: dict[str, int] = {}
        self.meta_index = MetadataIndex()

    @property
    def vectors(self) -> np.ndarray:
        """Vectors of rows ``0..n_rows-1`` (a view; do not keep across writes)."""
        return self._vectors[: self.n_rows]

    @property
    def live(self) -> np.ndarray:
        """Live mask of rows ``0..n_rows-1`` (a view; do not keep across writes)."""
        return self._live[: self.n_rows]

    @property
    def n_live(self) -> int:
        """Points that exist."""
        return len(self.row_of)

    @property
    def n_dead(self) -> int:
        """Rows of replaced or deleted points still held."""
        return self.n_rows - len(self.row_of)

    def append(
        self,
        ids: Sequence[str],
        vectors: np.ndarray,
        texts: Sequence[str],
        metas: Sequence[dict[str, Any]],
    ) -> range:
        """Append rows (ids unique within the call); returns the new row numbers."""
        m = len(ids)
        self._reserve(self.n_rows + m)
        start = self.n_rows
        self._vectors[start : start + m] = vectors
        self._live[start : start + m] = True
        for offset, point_id in enumerate(ids):
            old = self.row_of.get(point_id)
            if old is not None:
                self._kill(old)
            row = start + offset
            self.row_of[point_id] = row
            self.meta_index.add(row, metas[offset])
        self.ids.extend(ids)
        self.texts.extend(texts)
        self.metas.extend(metas)
        self.n_rows += m
        return range(start, start + m)

    def append_dead(self, vectors: np.ndarray) -> None:
        """Append rows that are already deleted (used when loading a snapshot)."""
        m = vectors.shape[0]
        self._reserve(self.n_rows + m)
        self._vectors[self.n_rows : self.n_rows + m] = vectors
        self._live[self.n_rows : self.n_rows + m] = False
        self.ids.extend([None] * m)
        self.texts.extend([""] * m)
        self.metas.extend([{}] * m)
        self.n_rows += m

    def delete(self, ids: Sequence[str]) -> int:
        """Mark the ids' rows dead; returns how many existed."""
        count = 0
        for point_id in ids:
            row = self.row_of.pop(point_id, None)
            if row is not None:
                self._kill(row)
                count += 1
        return count

    def live_rows(self) -> np.ndarray:
        """Row numbers of live points, ascending."""
        return np.flatnonzero(self.live)

    def _kill(self, row: int) -> None:
        self._live[row] = False
        # Dead rows keep their vector (the index still holds it) but drop their payload.
        self.ids[row] = None
        self.texts[row] = ""
        self.metas[row] = {}

    def _reserve(self, rows: int) -> None:
        capacity = self._vectors.shape[0]
        if rows <= capacity:
            return
        new_capacity = max(rows, int(capacity * 1.5) + 1024)
        vectors = np.empty((new_capacity, self.dimension), dtype=np.float32)
        vectors[: self.n_rows] = self._vectors[: self.n_rows]
        live = np.zeros(new_capacity, dtype=bool)
        live[: self.n_rows] = self._live[: self.n_rows]
        self._vectors, self._live = vectors, live
