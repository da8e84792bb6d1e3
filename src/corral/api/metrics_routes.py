"""``GET /metrics``: Prometheus' text format, written by ``prometheus_client``.

Importing this module imports neither ``prometheus_client`` nor :mod:`corral.observe.metrics`
(the metrics are imported at the first scrape). The route needs the API token like the
others (the read-only one will do): give it to Prometheus as ``authorization.credentials``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from fastapi import APIRouter
from fastapi.responses import Response

if TYPE_CHECKING:
    from corral.observe.metrics import Metrics

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def metrics_router(metrics_factory: Callable[[], Metrics]) -> APIRouter:
    """A router with ``GET /metrics``; ``metrics_factory()`` is called at each scrape (return
    the same :class:`~corral.observe.metrics.Metrics` every time: it keeps the counts)."""
    router = APIRouter()

    @router.get("/metrics", response_class=Response,
                responses={200: {"content": {CONTENT_TYPE: {}},
                                 "description": "Prometheus text format 0.0.4"}})
    async def metrics() -> Response:
        """Supervisor, front door, fleet and llama-server metrics, for Prometheus."""
        body = await metrics_factory().render()
        return Response(body, media_type=CONTENT_TYPE)

    return router
