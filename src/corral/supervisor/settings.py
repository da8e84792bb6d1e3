"""The controller's settings and what it starts with."""

from __future__ import annotations

from dataclasses import dataclass, field

from corral.core.args import LlamaConfig
from corral.core.backoff import BackoffPolicy
from corral.core.fit import DEFAULT_MARGIN, SwapMode


@dataclass(frozen=True)
class Settings:
    ready_timeout_s: float = 300.0
    stop_timeout_s: float = 10.0
    min_healthy_s: float = 0.3
    debounce_s: float = 0.2
    max_batch_age_s: float = 2.0
    liveness_interval_s: float = 0.0
    liveness_failures: int = 3
    drain_timeout_s: float = 30.0
    swap: SwapMode = SwapMode.STOP_FIRST  # AUTO and START_FIRST need the front door
    backoff: BackoffPolicy = field(default_factory=BackoffPolicy)
    echo_output: bool = True
    fit_margin: float = DEFAULT_MARGIN  # headroom on top of a memory estimate
    allow_degraded: bool = False  # accept a start that came up smaller than asked


@dataclass(frozen=True)
class Security:
    """Least privilege (``--allow-*``, ``--user``) and the transport (TLS, tokens)."""

    allow_binaries: tuple[str, ...] = ()
    allow_model_dirs: tuple[str, ...] = ()
    allow_flags: tuple[str, ...] = ()
    allow_env: tuple[str, ...] | None = None  # None: corral.core.privilege.DEFAULT_ENV
    user: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    api_token_file: str | None = None
    read_token: str | None = None
    read_token_file: str | None = None


@dataclass(frozen=True)
class Startup:
    """What to run at start: the stored config wins, the CLI config is the fallback."""

    preferred: LlamaConfig
    fallback: LlamaConfig | None = None
    persist_when_ready: bool = False

    def candidates(self) -> list[LlamaConfig]:
        if self.fallback is None or self.fallback == self.preferred:
            return [self.preferred]
        return [self.preferred, self.fallback]
