"""The pure fit verdict: estimate vs room with a margin, worded with the numbers."""

from __future__ import annotations

import pytest

from corral.core.fit import (
    GIB,
    MIB,
    DeviceNeed,
    Estimate,
    FitVerdict,
    GpuRoom,
    Room,
    SwapMode,
    auto_strategy,
    choose_strategy,
    fewer_layers_than_asked,
    smaller_than_asked,
    verdict,
)
from corral.core.steps import Strategy

HUGE = Estimate((DeviceNeed("Host", 222, 98319, 32787),), "llama-fit-params")  # -c 33554432
SMALL = Estimate((DeviceNeed("Host", 222, 72, 521),), "llama-fit-params")  # -c 4096 -np 4
ROOM = Room(int(21.3 * GIB))


def test_the_issues_misfit_is_refused_with_its_numbers() -> None:
    """-c 33554432 on the test model: 'needs ~128 GiB: model 0.2 + context 96.0 + ...'."""
    v = verdict(HUGE, ROOM, where="available after stopping the running server")
    assert (v.fits, v.known) == (False, True)
    assert v.reason == ("needs ~128 GiB: model 0.2 + context 96.0 + compute 32.0 (+10% "
                        "margin); 21.3 GiB available after stopping the running server")
    assert v.needs_mib == pytest.approx(131328)


@pytest.mark.parametrize(("need_mib", "room_mib", "margin", "fits"), [
    (815, 21811, 0.10, True),
    (1000, 1099, 0.10, False),  # fits alone, not with the margin
    (1000, 1100, 0.10, True),
    (1000, 1000, 0.0, True),
    (1000, 1049, 0.05, False),
])
def test_the_margin_is_headroom_on_top_of_the_estimate(need_mib: float, room_mib: int,
                                                       margin: float, fits: bool) -> None:
    """Fits only when estimate x (1 + margin) <= available."""
    e = Estimate((DeviceNeed("Host", need_mib, 0, 0),), "test")
    assert verdict(e, Room(room_mib * MIB), margin=margin).fits is fits


def test_no_estimate_is_not_a_verdict() -> None:
    """No estimate, or no figure for the memory: known=False, never a rejection."""
    assert verdict(None, ROOM).known is False
    assert verdict(SMALL, Room(None)).known is False


def test_a_stopped_server_gives_its_memory_back() -> None:
    """The room after stopping the running server is now + what it holds."""
    after = Room(500 * MIB).plus(SMALL)
    assert after.host_bytes == (500 + 222 + 72 + 521) * MIB
    assert verdict(SMALL, Room(500 * MIB)).fits is False
    assert verdict(SMALL, after).fits is True


def test_each_gpu_is_checked_against_its_own_free_memory() -> None:
    """A GPU device that does not fit names itself; no GPU figure is no verdict."""
    e = Estimate((DeviceNeed("Host", 100, 0, 0), DeviceNeed("CUDA0", 7000, 1000, 500)), "t")
    ok = Room(8 * GIB, (GpuRoom(10 * GIB, 24 * GIB),))
    tight = Room(8 * GIB, (GpuRoom(8 * GIB, 24 * GIB),))
    assert verdict(e, ok).fits is True
    v = verdict(e, tight)
    assert not v.fits and v.reason.startswith("GPU 0 (CUDA0) needs ~8.3 GiB")
    assert verdict(e, Room(8 * GIB)).known is False


def test_freed_gpu_memory_is_capped_at_the_cards_size() -> None:
    """Giving back cannot make a card larger than it is."""
    e = Estimate((DeviceNeed("CUDA0", 20000, 0, 0),), "t")
    room = Room(0, (GpuRoom(10 * GIB, 24 * GIB),)).plus(e)
    assert room.gpus[0].free_bytes == 24 * GIB


@pytest.mark.parametrize(("mode", "v", "expected"), [
    (SwapMode.AUTO, FitVerdict(True, ""), Strategy.START_FIRST),
    (SwapMode.AUTO, FitVerdict(False, ""), Strategy.STOP_FIRST),
    (SwapMode.AUTO, FitVerdict(False, "", known=False), Strategy.STOP_FIRST),
    (SwapMode.AUTO, None, Strategy.STOP_FIRST),
    (SwapMode.START_FIRST, FitVerdict(False, ""), Strategy.START_FIRST),
    (SwapMode.STOP_FIRST, FitVerdict(True, ""), Strategy.STOP_FIRST),
])
def test_auto_starts_first_only_on_a_known_fit(mode: SwapMode, v: FitVerdict | None,
                                               expected: Strategy) -> None:
    """--swap auto picks start-first only when both are known to fit."""
    assert choose_strategy(mode, v) is expected


CPU = (DeviceNeed("Host", 300, 40, 20),)
GPU = (DeviceNeed("Host", 10, 0, 5), DeviceNeed("CUDA0", 300, 40, 20))
CPU_ONLY_WEIGHTS = (DeviceNeed("Host", 300, 0, 5), DeviceNeed("CUDA0", 0, 40, 20))


@pytest.mark.parametrize(("v", "expected", "why"), [
    (FitVerdict(True, "ok", devices=GPU), Strategy.START_FIRST, "fits beside"),
    (FitVerdict(True, "ok", devices=CPU), Strategy.STOP_FIRST, "same CPU cores"),
    (FitVerdict(True, "ok", devices=CPU_ONLY_WEIGHTS), Strategy.STOP_FIRST, "same CPU cores"),
    (FitVerdict(False, "needs 9 GiB", devices=GPU), Strategy.STOP_FIRST, "needs 9 GiB"),
    (FitVerdict(False, "no estimate", known=False), Strategy.STOP_FIRST, "no estimate"),
    (FitVerdict(True, "ok"), Strategy.START_FIRST, "fits beside"),  # devices unknown
])
def test_auto_weighs_cpu_as_well_as_memory(v: FitVerdict, expected: Strategy,
                                           why: str) -> None:
    """--swap auto starts first only when the new server fits beside the old one and its
    weights are on a GPU; on the CPU the two would share cores, and the reason says so."""
    strategy, reason = auto_strategy(v)
    assert strategy is expected and why in reason
    assert choose_strategy(SwapMode.AUTO, v) is expected


@pytest.mark.parametrize(("asked", "per_slot", "slots", "degraded"), [
    (32768, 8192, 4, False),  # -c 32768 -np 4 rightly shows 8192 per slot
    (32768, 4096, 4, True),
    (4096, 4096, 1, False),
    (4096, 2048, None, True),
    (None, 512, 1, False),  # -c not given: --fit may choose
    (4096, None, 1, False),  # /props said nothing
    (0, 512, 1, False),  # -c 0: the model's own
    # What llama.cpp legitimately rounds is not degraded: older versions round the per-slot
    # share down (-c 2048 -np 3: 682 x 3 = 2046), newer ones pad -c and the share up to 256
    # (-c 1024 or -c 1000 with -np 3: 512 x 3), a unified KV cache gives each slot it all.
    (2048, 682, 3, False),
    (1024, 341, 3, False),
    (1000, 333, 3, False),
    (1024, 512, 3, False),
    (1000, 512, 3, False),
    (1024, 1024, 3, False),
    (3, 0, 4, False),  # less than one token a slot: nothing to hold against it
    # Below the rounded-down share is --fit shrinking (or any other loss of context).
    (2048, 681, 3, True),
    (1000, 332, 3, True),
    (4096, 3840, 1, True),  # shrunk by one 256 step
    (32768, 8191, 4, True),
])
def test_a_start_is_degraded_when_the_total_context_is_below_the_asked(
        asked: int | None, per_slot: int | None, slots: int | None, degraded: bool) -> None:
    """Only an explicit -c counts, against per-slot n_ctx x slots, less what llama.cpp
    legitimately rounds away (the per-slot share rounded down)."""
    why = smaller_than_asked(asked, per_slot, slots)
    assert (why is not None) is degraded
    if why:
        assert why.startswith("came up smaller than asked")


@pytest.mark.parametrize(("asked", "line", "degraded"), [
    ("99", "load_tensors: offloaded 19/19 layers to GPU", False),  # all there are
    ("10", "load_tensors: offloaded 10/19 layers to GPU", False),
    ("10", "load_tensors: offloaded 4/19 layers to GPU", True),
    ("99", "load_tensors: offloaded 0/19 layers to GPU", True),
    ("auto", "load_tensors: offloaded 4/19 layers to GPU", False),  # --fit may choose
    (None, "load_tensors: offloaded 4/19 layers to GPU", False),
    ("10", "nothing about layers", False),  # not logged: not compared
])
def test_a_start_is_degraded_when_fewer_layers_were_offloaded_than_asked(
        asked: str | None, line: str, degraded: bool) -> None:
    """An explicit -ngl N against llama-server's 'offloaded K/M layers to GPU' line."""
    why = fewer_layers_than_asked(asked, ["x", line, "y"])
    assert (why is not None) is degraded
