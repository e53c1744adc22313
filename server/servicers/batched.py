"""What every hop that runs its work through the shared DynamicBatcher does alike: report
its load (the batcher's estimated wait, sent to routers in trailing metadata by
server/load_report.py), its health (the batcher runs), its batches and queue as metrics,
and stop its batcher (waiting callers get UNAVAILABLE)."""

from __future__ import annotations

from typing import Any

from router.batcher import DynamicBatcher
from server import metrics


class BatchedHop:
    """Mixin of the embedding and rerank hops: ``self._batcher`` is their batcher."""

    _batcher: DynamicBatcher[Any, Any] | None = None

    def _watch_batcher(self, hop: str) -> None:
        """Export the batcher's batches and queue depth under ``hop``."""
        batcher = self._batcher
        assert batcher is not None
        batcher.on_batch = lambda n, _tokens, s: metrics.observe_batch(hop, n, s)
        metrics.watch_queue(hop, lambda: batcher.queued)

    def load(self) -> float:
        """Estimated wait of new work before its batch runs, in seconds."""
        return self._batcher.estimated_delay_s() if self._batcher is not None else 0.0

    def healthy(self) -> bool:
        """True while the batcher runs."""
        return self._batcher is not None and self._batcher.healthy()

    async def stop(self) -> None:
        """Stop the batcher (waiting callers get UNAVAILABLE)."""
        if self._batcher is not None:
            await self._batcher.stop()
