"""Failed token checks per client address: too many in a window blocks that address.

After ``max_failures`` failures within ``window_s`` from one address, that address is
blocked for ``block_s``: every request it sends is refused, whatever it carries, and is not
counted. Other addresses are not affected. Time is passed in (``now``, monotonic seconds);
the number of addresses remembered is bounded, forgetting the quietest first.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field


@dataclass
class FailureLimit:
    max_failures: int = 10
    window_s: float = 1.0
    block_s: float = 1.0
    max_addresses: int = 10_000
    _failures: OrderedDict[str, deque[float]] = field(default_factory=OrderedDict)
    _blocked: dict[str, float] = field(default_factory=dict)  # address -> until

    def is_blocked(self, address: str, now: float) -> bool:
        until = self._blocked.get(address)
        if until is None:
            return False
        if now < until:
            return True
        del self._blocked[address]
        return False

    def failed(self, address: str, now: float) -> bool:
        """Count one failure; True if it blocks ``address`` from now on."""
        seen = self._failures.pop(address, None) or deque()
        while seen and now - seen[0] >= self.window_s:
            seen.popleft()
        seen.append(now)
        if len(seen) >= self.max_failures:
            if len(self._blocked) >= self.max_addresses:
                self._blocked = {a: t for a, t in self._blocked.items() if t > now}
            self._blocked[address] = now + self.block_s
            return True
        self._failures[address] = seen  # most recent last
        while len(self._failures) > self.max_addresses:
            self._failures.popitem(last=False)
        return False
