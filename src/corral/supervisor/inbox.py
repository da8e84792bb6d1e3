"""Where submitted changes wait for their batch, and where their outcomes are kept.

The API (and the fleet, and a restart) *submit* a change: it gets an id, joins the open
batch of the :class:`~corral.core.debounce.Debouncer`, and wakes the controller's loop,
which takes the batch when it is due. Every outcome is announced as a ``change`` event
(streams, metrics, audit) and the last :data:`MAX_CHANGE_RECORDS` are kept for
``GET /v1/changes/{id}``.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from corral.core.args import Change, LlamaConfig
from corral.core.debounce import Debouncer
from corral.observe.events import EventBus
from corral.supervisor.changes import MAX_CHANGE_RECORDS, ChangeIds, ChangeRecord, config_json
from corral.supervisor.seams import Clock
from corral.supervisor.settings import Settings


class Inbox:
    def __init__(self, settings: Settings, clock: Clock, events: EventBus) -> None:
        self.batches: Debouncer[ChangeRecord] = Debouncer(settings.debounce_s,
                                                          settings.max_batch_age_s)
        self.wake = asyncio.Event()  # set at every submit: the loop looks again
        self._clock = clock
        self._events = events
        self._records: OrderedDict[str, ChangeRecord] = OrderedDict()
        self._ids = ChangeIds()  # unique across runs: a revert finds the right one

    def submit(self, change: Change, source: str, client: str | None) -> ChangeRecord:
        loop = asyncio.get_running_loop()
        record = ChangeRecord(self._ids.next(), change, self._clock.wall(),
                              loop.create_future(), self._clock.wall, source=source,
                              client=client)
        self._records[record.id] = record
        record.done.add_done_callback(lambda _: self._emit_outcome(record))
        while len(self._records) > MAX_CHANGE_RECORDS:
            self._records.popitem(last=False)
        self.batches.add(record, self._clock.monotonic())
        self.wake.set()
        return record

    def record(self, change_id: str) -> ChangeRecord | None:
        return self._records.get(change_id)

    @property
    def pending(self) -> int:
        return self.batches.pending

    def _emit_outcome(self, r: ChangeRecord) -> None:
        took = (r.finished_at or r.received_at) - r.received_at
        self._events.emit(
            "change", change=r.id, source=r.source, client=r.client, outcome=r.outcome.value,
            error=r.error, restarted=r.restarted, strategy=r.strategy,
            duration_s=round(took, 3), before=_json(r.before), after=_json(r.config))


def _json(config: LlamaConfig | None) -> object:
    return config_json(config) if config is not None else None
