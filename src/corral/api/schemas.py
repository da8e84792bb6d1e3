"""Request and response bodies of the management API (they make the OpenAPI description)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from corral.supervisor.status import Status

FlagName = Annotated[str, StringConstraints(min_length=1, max_length=100)]
FlagValue = Annotated[str, StringConstraints(max_length=4096)] | int | float | bool | None
EnvName = Annotated[str, StringConstraints(min_length=1, max_length=200)]
EnvValue = Annotated[str, StringConstraints(max_length=4096)] | None

MAX_ARGS = 200


class ParamsRequest(BaseModel):
    """``{"args": {"-m": "/models/new.gguf", "--port": "8081", "binary": "/opt/llama-server"}}``

    Keys are llama-server flags in any spelling (``-m``, ``--model``, ``model``) plus
    ``binary``. A string or number sets the flag's value, ``true`` sets a flag that takes no
    value, ``false`` or ``null`` removes the flag. ``env`` sets environment variables of
    llama-server (``null`` removes one); only names ``--allow-env`` allows (by default the GPU
    selection variables and ``LLAMA_ARG_*``).
    """

    model_config = ConfigDict(extra="forbid")
    args: dict[FlagName, FlagValue] = Field(max_length=MAX_ARGS)
    env: dict[EnvName, EnvValue] | None = Field(None, max_length=MAX_ARGS)


class ConfigView(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    binary: str
    args: dict[str, str | bool]
    argv: list[str]
    env: dict[str, str] = {}


ChangeStatus = Literal["pending", "applied", "rejected", "failed"]


class ChangeResult(BaseModel):
    status: ChangeStatus
    change_id: str | None
    error: str | None = None
    log: list[str] = []
    restarted: bool = False
    strategy: str | None = Field(None, description="how servers were swapped: stop-first or "
                                 "start-first (none when nothing restarted)")
    config: ConfigView | None = None
    rollout: dict[str, Any] | None = Field(
        default=None, description="in a fleet: the rollout this change started (revision, phase, "
        "canary, per-instance progress); with ?wait=rollout, how it ended")


class ParamsView(BaseModel):
    name: str
    config: ConfigView


class DeviceNeedView(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    device: str
    model_mib: float
    context_mib: float
    compute_mib: float


class FitView(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    fits: bool
    known: bool = Field(description="false: no estimate (or no memory figure); the start "
                        "decides")
    reason: str
    method: str | None = Field(None, description="llama-fit-params or gguf metadata")
    needs_mib: float | None = None
    available_mib: float | None = None
    devices: list[DeviceNeedView] = []


class DryRunResult(BaseModel):
    """What ``POST /v1/params?dry_run=1`` would do; nothing is changed."""

    status: Literal["would-apply", "no-change", "rejected"]
    error: str | None = None
    config: ConfigView = Field(description="the merged config: what runs now + the change")
    fit: FitView | None = Field(None, description="the merged config against the memory "
                                "available after stopping the running server")
    warnings: list[str] = []
    strategy: str | None = Field(None, description="stop-first or start-first, as --swap "
                                 "would choose now (none when nothing would restart)")
    strategy_reason: str | None = None


class ErrorBody(BaseModel):
    status: str = "error"
    error: str
    details: list[Any] | None = None


# /v1/status is corral.supervisor.status.Status itself (a dataclass FastAPI serialises): one
# definition.
StatusView = Status


class HealthView(BaseModel):
    status: Literal["ok"] = "ok"
    state: str
