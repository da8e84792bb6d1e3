"""The front door: Corral's public port, a reverse proxy to the active llama-server.

The controller steers it (``route_to``, ``hold``, ``refuse``, ``drain``); see ``proxy`` for
the theory of operation.
"""

from corral.front import proxy
from corral.front.model import FrontSettings, FrontStats, Upstream
from corral.front.proxy import FrontDoor

# Whether the per-request modules run compiled by mypyc (setup.py builds them when it can;
# the pure-Python source behaves the same, with more CPU per request).
COMPILED = not proxy.__file__.endswith(".py")

__all__ = ["COMPILED", "FrontDoor", "FrontSettings", "FrontStats", "Upstream"]
