"""A small load generator for the front door tests: a few client threads send a mix of
llama-server requests and record each one's outcome.

The mix, per client, in turn: a non-streamed ``/completion``, a streamed ``/completion``, an
OpenAI chat completion (through the official ``openai`` client), ``GET /v1/models``, a
streamed OpenAI chat completion, an OpenAI (legacy) text completion. Each client starts at a
different place in the mix, so all kinds run side by side.

A request *failed* when it got a non-2xx answer, a connection error, a timeout, or a stream
that ended without its final chunk (``"stop": true`` for ``/completion``, a chunk with a
``finish_reason`` for the OpenAI stream). The ``openai`` client's own retries are off: a
retry would hide a failure.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import openai

KINDS = ("completion", "completion_stream", "chat", "models", "chat_stream", "openai_completion")


@dataclass(frozen=True)
class Outcome:
    kind: str
    client: int
    start: float          # time.monotonic() just before the request was sent
    end: float            # ... when its answer (or failure) was complete
    ok: bool
    reason: str = ""      # why it failed ("" when ok)

    def in_flight_at(self, t: float) -> bool:
        return self.start <= t <= self.end

    def __str__(self) -> str:
        verdict = "ok" if self.ok else f"FAILED ({self.reason})"
        return (f"{self.kind} by client {self.client} "
                f"[{self.start:.3f} .. {self.end:.3f}]: {verdict}")


class Failed(Exception):
    """The answer came but is not a success (status, body, or a stream without its end)."""


class LoadGen:
    """``clients`` threads sending requests to ``base_url`` until :meth:`stop`."""

    def __init__(self, base_url: str, clients: int = 4, *, n_predict: int = 4,
                 timeout: float = 90.0, prompt: str = "Say hi.") -> None:
        self.base_url = base_url.rstrip("/")
        self.clients = clients
        self.n_predict = n_predict
        self.timeout = timeout
        self.prompt = prompt
        self._outcomes: list[Outcome] = []
        self._running: dict[int, tuple[str, float]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True,
                                          name=f"loadgen-{i}") for i in range(clients)]

    # ---- lifetime ---------------------------------------------------------------------------

    def start(self) -> LoadGen:
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop sending; wait (at most ``timeout``, default the request timeout + 10 s) for
        the requests in flight to end."""
        self._stop.set()
        deadline = time.monotonic() + (self.timeout + 10 if timeout is None else timeout)
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        assert not alive, f"load generator threads still running: {alive}"

    def __enter__(self) -> LoadGen:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- what happened ----------------------------------------------------------------------

    def outcomes(self) -> list[Outcome]:
        with self._lock:
            return list(self._outcomes)

    def in_flight(self) -> list[tuple[int, str, float]]:
        """(client, kind, start) of every request being sent now."""
        with self._lock:
            return [(c, k, s) for c, (k, s) in self._running.items()]

    def ok_since(self, t: float) -> int:
        """How many requests that started at or after ``t`` have succeeded."""
        return sum(1 for o in self.outcomes() if o.ok and o.start >= t)

    @staticmethod
    def summary(outcomes: list[Outcome]) -> str:
        ok = sum(o.ok for o in outcomes)
        kinds = Counter(o.kind for o in outcomes if o.ok)
        return (f"{ok} ok, {len(outcomes) - ok} failed ("
                + ", ".join(f"{k} {kinds[k]}" for k in KINDS) + " ok)")

    # ---- the clients ------------------------------------------------------------------------

    def _run(self, client: int) -> None:
        with contextlib.ExitStack() as stack:
            http = stack.enter_context(httpx.Client(base_url=self.base_url,
                                                    timeout=self.timeout))
            oai = stack.enter_context(openai.OpenAI(base_url=f"{self.base_url}/v1",
                                                    api_key="x", max_retries=0,
                                                    timeout=self.timeout))
            senders: dict[str, Callable[[], None]] = {
                "completion": lambda: self._completion(http),
                "completion_stream": lambda: self._completion_stream(http),
                "chat": lambda: self._chat(oai),
                "models": lambda: self._models(http),
                "chat_stream": lambda: self._chat_stream(oai),
                "openai_completion": lambda: self._openai_completion(oai),
            }
            mix = itertools.islice(itertools.cycle(KINDS), client, None)
            for kind in mix:
                if self._stop.is_set():
                    return
                ok = self._one(client, kind, senders[kind])
                if not ok:
                    # Pacing, not synchronisation: a refused connection fails at once, and a
                    # tight loop of failures would only burn the CPU the servers need.
                    self._stop.wait(0.05)

    def _one(self, client: int, kind: str, send: Callable[[], None]) -> bool:
        with self._lock:
            start = time.monotonic()
            self._running[client] = (kind, start)
        reason = ""
        try:
            send()
        except Failed as exc:
            reason = str(exc)
        except openai.APIStatusError as exc:
            reason = f"HTTP {exc.status_code}: {str(exc)[:200]}"
        except Exception as exc:  # noqa: BLE001 - any other failure is a failed request
            reason = f"{type(exc).__name__}: {str(exc)[:200]}"
        with self._lock:
            end = time.monotonic()
            del self._running[client]
            self._outcomes.append(Outcome(kind, client, start, end, not reason, reason))
        return not reason

    def _body(self, **extra: object) -> dict[str, object]:
        return {"prompt": self.prompt, "n_predict": self.n_predict, **extra}

    @staticmethod
    def _check(r: httpx.Response) -> None:
        if not 200 <= r.status_code < 300:
            raise Failed(f"HTTP {r.status_code}: {r.text[:200]}")

    def _completion(self, http: httpx.Client) -> None:
        r = http.post("/completion", json=self._body())
        self._check(r)
        if r.json().get("stop") is not True:
            raise Failed(f"no stop in {r.text[:200]}")

    def _completion_stream(self, http: httpx.Client) -> None:
        with http.stream("POST", "/completion", json=self._body(stream=True)) as r:
            if not 200 <= r.status_code < 300:
                r.read()
                self._check(r)
            last: dict[str, object] = {}
            for line in _sse_data(r.iter_lines()):
                last = json.loads(line)
            if last.get("stop") is not True:
                raise Failed(f"stream ended without its final chunk (last: {last})")

    def _models(self, http: httpx.Client) -> None:
        r = http.get("/v1/models")
        self._check(r)
        if not r.json().get("data"):
            raise Failed(f"no models in {r.text[:200]}")

    def _chat(self, oai: openai.OpenAI) -> None:
        r = oai.chat.completions.create(model="x", max_tokens=self.n_predict,
                                        messages=[{"role": "user", "content": self.prompt}])
        if not r.choices or r.choices[0].finish_reason is None:
            raise Failed(f"no finished choice in {r}")

    def _chat_stream(self, oai: openai.OpenAI) -> None:
        finished = None
        stream = oai.chat.completions.create(
            model="x", max_tokens=self.n_predict, stream=True,
            messages=[{"role": "user", "content": self.prompt}])
        with stream:
            for chunk in stream:
                if chunk.choices and chunk.choices[0].finish_reason is not None:
                    finished = chunk.choices[0].finish_reason
        if finished is None:
            raise Failed("chat stream ended without a finish_reason")

    def _openai_completion(self, oai: openai.OpenAI) -> None:
        r = oai.completions.create(model="x", prompt=self.prompt, max_tokens=self.n_predict)
        if not r.choices or r.choices[0].finish_reason is None:
            raise Failed(f"no finished choice in {r}")


def _sse_data(lines: Iterator[str]) -> Iterator[str]:
    for line in lines:
        if line.startswith("data: "):
            data = line[6:].strip()
            if data and data != "[DONE]":
                yield data
