"""Corral's exceptions, in one tree.

    CorralError
    ├── UsageError            bad command line or settings; the CLI prints it and exits 2
    ├── InvalidArgs           a change names an unknown flag or a bad value (API: 422)
    ├── PreflightFailed       a change cannot work: missing binary/model, busy port (API: 422)
    │   └── NotAllowed        a change breaks a least-privilege rule (binary, file, flag, env)
    ├── StartFailed           llama-server exited or never became ready (API: 422)
    ├── StoreError            the config store failed
    │   ├── StoreCorrupt      a stored file/key cannot be parsed; never overwritten
    │   └── StoreUnavailable  the store cannot be reached or written right now (API: 503)
    └── AlreadyRunning        another supervisor holds this config name

Driver exceptions (OSError, httpx errors, TOML errors) are translated into these at the
store boundary, so callers only ever catch Corral's own types.
"""

from __future__ import annotations


class CorralError(Exception):
    """Base of every error Corral raises on purpose."""


class UsageError(CorralError):
    pass


class InvalidArgs(CorralError):
    pass


class PreflightFailed(CorralError):
    pass


class NotAllowed(PreflightFailed):
    """Refused by a least-privilege rule (:mod:`corral.core.privilege`); ``rule`` names it."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(message)
        self.rule = rule


class StartFailed(CorralError):
    def __init__(self, message: str, log: list[str] | None = None) -> None:
        super().__init__(message)
        self.log = log or []


class StoreError(CorralError):
    pass


class StoreCorrupt(StoreError):
    pass


class StoreUnavailable(StoreError):
    pass


class StoreConflict(StoreError):
    """A newer config was written while this one was being tried: it is not stored."""


class AlreadyRunning(CorralError):
    pass
