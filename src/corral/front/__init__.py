"""The front door: Corral's public port, a reverse proxy to the active llama-server.

The controller steers it (``route_to``, ``hold``, ``refuse``, ``drain``); see ``proxy`` for
the theory of operation.
"""

from corral.front.model import FrontSettings, FrontStats, Upstream
from corral.front.proxy import FrontDoor

__all__ = ["FrontDoor", "FrontSettings", "FrontStats", "Upstream"]
