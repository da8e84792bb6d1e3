"""Will a config fit in memory? Estimate against what is available -> a verdict with numbers.

Theory of operation
-------------------
An :class:`Estimate` is what one llama-server would take, per device (``Host``, ``CUDA0``,
...), split as llama.cpp itself reports it: model weights, context (KV cache) and compute
buffers, in MiB. :class:`Room` is what the machine has: host bytes available and each GPU's
free bytes. :func:`verdict` compares the two with a margin (``--fit-margin``, default 10 %)
and words the answer with the numbers, so that a rejection says what it would have needed.

Two questions are asked, with different rooms:

- *fits at all* (pre-flight, every change): the room after stopping the running server,
  i.e. what is available now plus what the running server would give back;
- *fits beside* (``--swap auto``): the room now, while the old server keeps serving.

No estimate is not a verdict: :func:`verdict` with ``None`` answers ``known=False``; the
pre-flight passes such a config on (the start decides), ``--swap auto`` picks stop-first.
This module does no I/O.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from corral.core.args import ArgValue, FlagCatalog, LlamaConfig, parse_help
from corral.core.steps import Strategy

MIB = 1 << 20
GIB = 1 << 30
DEFAULT_MARGIN = 0.10
HOST = "Host"

# The flags that bear on memory, as llama-server's --help spells them (each checked against
# llama-fit-params). A config read with its binary's flag catalog has them under these
# canonical names already; one read without (no readable --help) keeps the spellings it
# was given, so ``-c`` is looked up here too.
MEMORY_FLAGS: FlagCatalog = parse_help("""\
-c,    --ctx-size N
-np,   --parallel N
-ctk,  --cache-type-k TYPE
-ctv,  --cache-type-v TYPE
-fa,   --flash-attn [on|off|auto]
-b,    --batch-size N
-ub,   --ubatch-size N
-ngl,  --gpu-layers, --n-gpu-layers N
--swa-full
--kv-offload, -nkvo, --no-kv-offload
-sm,   --split-mode {none,layer,row,tensor}
-ts,   --tensor-split N0,N1,N2,...
-mg,   --main-gpu INDEX
-ot,   --override-tensor <tensor name pattern>=<buffer type>,...
-cmoe, --cpu-moe
-ncmoe, --n-cpu-moe N
-dev,  --device <dev1,dev2,..>
--fit [on|off]
--fit-target MiB0,MiB1,MiB2,...
--fit-ctx N
--lora FNAME
""")


class SwapMode(enum.StrEnum):
    AUTO = "auto"
    START_FIRST = "start-first"
    STOP_FIRST = "stop-first"


@dataclass(frozen=True)
class DeviceNeed:
    """One device's share of an estimate, in MiB."""

    device: str
    model_mib: float
    context_mib: float
    compute_mib: float

    @property
    def total_mib(self) -> float:
        return self.model_mib + self.context_mib + self.compute_mib

    @property
    def is_host(self) -> bool:
        return self.device == HOST


@dataclass(frozen=True)
class Estimate:
    """What a config would take, and how that was found out (``llama-fit-params``, ...)."""

    devices: tuple[DeviceNeed, ...]
    method: str

    @property
    def total_mib(self) -> float:
        return sum(d.total_mib for d in self.devices)

    def host(self) -> DeviceNeed:
        found = [d for d in self.devices if d.is_host]
        return found[0] if found else DeviceNeed(HOST, 0, 0, 0)

    def gpus(self) -> list[DeviceNeed]:
        return [d for d in self.devices if not d.is_host]


@dataclass(frozen=True)
class GpuRoom:
    free_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class Room:
    """Memory a new llama-server could use: host bytes (None: unknown) and GPUs."""

    host_bytes: int | None
    gpus: tuple[GpuRoom, ...] = ()

    def plus(self, freed: Estimate | None) -> Room:
        """The room once a server of estimate ``freed`` has stopped."""
        if freed is None:
            return self
        host = None if self.host_bytes is None else \
            self.host_bytes + int(freed.host().total_mib * MIB)
        gpus = list(self.gpus)
        for i, need in enumerate(freed.gpus()[:len(gpus)]):
            g = gpus[i]
            gpus[i] = GpuRoom(min(g.total_bytes, g.free_bytes + int(need.total_mib * MIB)),
                              g.total_bytes)
        return Room(host, tuple(gpus))


@dataclass(frozen=True)
class FitVerdict:
    fits: bool
    reason: str
    known: bool = True  # False: no estimate (or no figure for the memory): not a verdict
    needs_mib: float | None = None
    available_mib: float | None = None
    method: str | None = None
    devices: tuple[DeviceNeed, ...] = field(default=())


def verdict(estimate: Estimate | None, room: Room, *, margin: float = DEFAULT_MARGIN,
            where: str = "available") -> FitVerdict:
    """Does ``estimate`` (plus ``margin``) fit in ``room``? ``where`` ends the sentence:
    "21.3 GiB available after stopping the running server"."""
    if estimate is None:
        return FitVerdict(False, "no memory estimate for this config", known=False)
    checks = [(need, room.host_bytes, "") for need in [estimate.host()]]
    for i, need in enumerate(estimate.gpus()):
        free = room.gpus[i].free_bytes if i < len(room.gpus) else None
        checks.append((need, free, f"GPU {i} ({need.device}) "))
    lines = []
    for need, free, label in checks:
        if need.total_mib == 0 and label == "":
            continue
        line = _device_line(need, free, margin, where, label)
        if free is None:
            return FitVerdict(False, f"{line} (memory available unknown)", known=False,
                              needs_mib=need.total_mib, method=estimate.method,
                              devices=estimate.devices)
        if need.total_mib * (1 + margin) > free / MIB:
            return FitVerdict(False, line, needs_mib=need.total_mib,
                              available_mib=free / MIB, method=estimate.method,
                              devices=estimate.devices)
        lines.append(line)
    host = room.host_bytes
    return FitVerdict(True, "; ".join(lines) or "needs nothing", needs_mib=estimate.total_mib,
                      available_mib=None if host is None else host / MIB,
                      method=estimate.method, devices=estimate.devices)


def _device_line(need: DeviceNeed, free: int | None, margin: float, where: str,
                 label: str) -> str:
    have = "unknown" if free is None else f"{free / GIB:.1f} GiB"
    return (f"{label}needs ~{_gib(need.total_mib)} GiB: model {need.model_mib / 1024:.1f} + "
            f"context {need.context_mib / 1024:.1f} + compute {need.compute_mib / 1024:.1f} "
            f"(+{margin:.0%} margin); {have} {where}")


def _gib(mib: float) -> str:
    gib = mib / 1024
    return f"{gib:.0f}" if gib >= 10 else f"{gib:.1f}"


def memory_flags(config: LlamaConfig) -> dict[str, str]:
    """The flags of ``config`` that bear on memory, under canonical names."""
    return {name: "" if value is True else str(value) for name, value in _memory_args(config)}


def memory_value(config: LlamaConfig, canonical: str) -> ArgValue | None:
    """The value of the memory flag ``canonical`` under any of its spellings (the last one
    given wins, as in llama-server)."""
    return dict(_memory_args(config)).get(canonical)


def _memory_args(config: LlamaConfig) -> Iterator[tuple[str, ArgValue]]:
    for key, value in config.args:
        if (flag := MEMORY_FLAGS.lookup(key)) is not None:
            yield flag.canonical, value


def gpu_layers_wanted(value: object) -> bool:
    """Does a ``--gpu-layers`` value ask for layers on a GPU? (``0`` does not)."""
    text = str(value).strip().lower()
    return text not in ("", "0", "none")


def choose_strategy(mode: SwapMode, verdict: FitVerdict | None) -> Strategy:
    if mode is SwapMode.START_FIRST:
        return Strategy.START_FIRST
    if mode is SwapMode.STOP_FIRST or verdict is None:
        return Strategy.STOP_FIRST
    return auto_strategy(verdict)[0]


# Measured on a 2-core CPU-only machine (README, "Swap strategies"), 10 applies each under 4
# clients: start-first apply median 12.0 s and completion p99 14.1 s; stop-first 2.1 s, 1.0 s.
CPU_SHARED = ("the new server would decode on the same CPU cores as the running one (no GPU "
              "offload): side by side both slow down (measured on a CPU-only machine: "
              "completion p99 14.1 s start-first vs 1.0 s stop-first)")


def decodes_on_cpu(devices: Sequence[DeviceNeed]) -> bool:
    """Does the estimate put the model's weights on no GPU? (Unknown devices: no.)"""
    return bool(devices) and not any(not d.is_host and d.model_mib > 0 for d in devices)


def auto_strategy(verdict: FitVerdict) -> tuple[Strategy, str]:
    """``--swap auto``: start-first only when the new server is known to fit beside the
    running one in memory and decodes on a GPU, so the two do not share CPU cores; why."""
    if not verdict.known or not verdict.fits:
        return Strategy.STOP_FIRST, f"does not fit beside the running server: {verdict.reason}"
    if decodes_on_cpu(verdict.devices):
        return Strategy.STOP_FIRST, CPU_SHARED
    return Strategy.START_FIRST, f"fits beside the running server: {verdict.reason}"


def least_per_slot(asked_ctx: int, slots: int) -> int:
    """The least per-slot context llama.cpp reports for ``-c asked_ctx -np slots`` when it
    shrank nothing: the context divided by the slots, rounded down.

    Versions round differently, always to this or above (``llama-context.cpp``, ``n_ctx_seq``):
    older ones divide and round down (``-c 2048 -np 3``: 682 per slot, 2046 in all); newer
    ones pad ``-c`` up to a multiple of 256 and the per-slot share up again (``-c 1024 -np 3``
    and ``-c 1000 -np 3``: 512 per slot, 1536 in all); with a unified KV cache every slot
    may use the whole context.
    """
    return asked_ctx // max(1, slots)


def smaller_than_asked(asked_ctx: int | None, per_slot_ctx: int | None,
                       slots: int | None) -> str | None:
    """A start came up with less context than ``-c`` asked for: why, or None if it did not.

    llama-server reports the context per slot (``-c 32768 -np 4`` rightly shows 8192 per
    slot); what llama.cpp legitimately rounds (:func:`least_per_slot`) is not held against
    it, anything below is (``--fit`` shrinking the context to free memory).
    """
    if asked_ctx is None or asked_ctx <= 0 or per_slot_ctx is None:
        return None
    n = max(1, slots or 1)
    if per_slot_ctx >= least_per_slot(asked_ctx, n):
        return None
    return (f"came up smaller than asked: context {per_slot_ctx * n} ({per_slot_ctx} per slot "
            f"x {n} slots), asked -c {asked_ctx} (llama.cpp's --fit shrinks to free memory; "
            "--allow-degraded accepts this)")


_OFFLOADED = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")


def fewer_layers_than_asked(asked: object, log_lines: Sequence[str]) -> str | None:
    """A given ``-ngl N`` against the "offloaded K/M layers to GPU" line llama-server logs:
    why it came up smaller, or None (not asked as a number, not logged, or enough)."""
    if not isinstance(asked, str) or not asked.isdigit():
        return None  # auto, all, or not given: --fit may choose
    for line in reversed(log_lines):
        if m := _OFFLOADED.search(line):
            done, total = int(m[1]), int(m[2])
            wanted = min(int(asked), total)
            if done >= wanted:
                return None
            return (f"came up smaller than asked: {done}/{total} layers on the GPU, asked "
                    f"-ngl {asked} (llama.cpp's --fit shrinks to free memory; "
                    "--allow-degraded accepts this)")
    return None


def memory_flags_key(args: Sequence[tuple[str, object]], wanted: frozenset[str]
                     ) -> tuple[tuple[str, str], ...]:
    """The flags that bear on memory, in order, as a cache key."""
    return tuple((k, str(v)) for k, v in args if k in wanted)
