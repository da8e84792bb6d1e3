"""When to start llama-server again after it failed.

Policy (the same words as supervisord and systemd):
- A *failed start* is an exit, of any code, before the server was ready and had stayed up
  for the minimum healthy time, or a start that never became ready in time.
- Consecutive failed starts wait 0.5 s, 1 s, 2 s ... capped at 30 s; after
  ``max_failures`` of them the policy gives up (FATAL) and nothing starts until a new
  config is applied successfully.
- A crash of a server that had started successfully is restarted at once: its next start
  is a fresh try (a crash loop of a server that becomes ready is paced by its own load
  time; one that never gets ready is paced by this policy).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BackoffPolicy:
    initial_s: float = 0.5
    factor: float = 2.0
    cap_s: float = 30.0
    max_failures: int = 5

    def delay_after(self, consecutive_failures: int) -> float | None:
        """Seconds to wait before the next start, or None to give up (FATAL)."""
        if consecutive_failures <= 0:
            return 0.0
        if consecutive_failures >= self.max_failures:
            return None
        return min(self.cap_s, self.initial_s * self.factor ** (consecutive_failures - 1))


@dataclass
class StartHistory:
    """Counts consecutive failed starts; reset by a successful one."""

    consecutive_failures: int = 0

    def failed(self) -> int:
        self.consecutive_failures += 1
        return self.consecutive_failures

    def succeeded(self) -> None:
        self.consecutive_failures = 0
