"""A bounded chaos soak (``make soak``; ``make test`` runs two short ones, 15 s each).

For ``--seconds`` it does, at random: kill -9 of llama-server; kill -9 of the supervisor
(then starts it again with the same state dir and config file), sometimes in the middle of
an apply; valid changes; invalid ones (unknown flag, missing model, bad port, malformed
bodies, and one that passes the checks but fails to start, which must be rolled back).
A checker thread verifies all along:

- at most one llama-server for the config (processes whose command line has this soak's
  model path; zombies aside), and none 1 s after the supervisor was SIGKILLed;
- ``/v1/status`` pid agrees with /proc (alive, and it is that llama-server);
- the stored config (the TOML file) equals the last successfully applied one (the last
  200; after a supervisor killed mid-apply, either the old or the new one);
- the running config equals it too when nothing is pending;
- no answer is a 5xx, no invalid change is applied, every valid change is;
- nothing is left behind at the end.

It prints one summary line and exits 1 on any violation. It uses the fake llama-server
(``tests/fake_llama_server.py --fake-load-s 0.3``) unless ``--real`` is given.

    .venv/bin/python -m bench.soak --seconds 120 [--real] [--seed N]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import signal
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.supervisors import temp_dir
from scripts.llama_paths import llama_server, model
from tests.harness import FAKE, SupervisorProcess, corrupt_gguf, free_port, make_fake_model
from tests.procfs import is_alive, parent_pid

TIMING = ["--debounce-ms", "50", "--max-batch-ms", "500", "--min-healthy", "0.1",
          "--stop-timeout", "3", "--quiet-llama"]


# ---- a small client: a fresh connection per request ---------------------------------------

def call(port: int, method: str, path: str, body: bytes | None = None,
         timeout: float = 60) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"content-type": "application/json", "connection": "close"}
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        data = r.read()
    finally:
        conn.close()
    try:
        return r.status, json.loads(data)
    except ValueError:
        return r.status, data.decode(errors="replace")


def cfg(view: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(binary, args) of a config as the API shows it or as the TOML file stores it."""
    return view["binary"], dict(view.get("args", {}))


# ---- /proc -----------------------------------------------------------------------------------

def servers(marker: str) -> list[int]:
    """Live (non-zombie) llama-servers whose command line contains ``marker`` (the model
    path); the supervisor's own command line has it too and is left out. A match whose
    parent matches too is the same server: a wrapper script's subshells carry its command
    line (the fake's ``#!/usr/bin/env python3`` may run a pyenv shim, whose bash forks
    while it looks for python3)."""
    found: dict[int, int | None] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if b"\0supervise\0" not in cmd and marker.encode() in cmd and is_alive(name):
            found[int(name)] = parent_pid(name)
    return [pid for pid, parent in found.items() if parent not in found]


class Soak:
    def __init__(self, tmp: Path, seconds: float, real: bool, seed: int) -> None:
        self.tmp = tmp
        self.seconds = seconds
        self.real = real
        self.rng = random.Random(seed)
        self.model = tmp / "soak-model.gguf"
        if real:
            self.model.symlink_to(model())
            binary: Path = llama_server()
            llama_args = ["-c", "2048", "-np", "1"]
            self.bad_start = corrupt_gguf(tmp, model())
        else:
            make_fake_model(self.model)
            binary = FAKE
            llama_args = ["--fake-load-s", "0.3"]
        self.sup = SupervisorProcess(tmp, binary, self.model, llama_args,
                                     api_port=free_port(), port=free_port(),
                                     extra_cli=TIMING, state_dir=tmp / "state")
        self.api = self.sup.api_port
        self.marker = str(self.model)
        self.lock = threading.Lock()
        self.killing = False
        self.posting = 0
        self.last_applied: tuple[str, dict[str, Any]] | None = None
        self.violations: list[str] = []
        self.counts = {"llama_kills": 0, "supervisor_kills": 0, "supervisor_kills_mid_apply": 0,
                       "applies_ok": 0, "rejected": 0, "checks": 0, "supervisor_restarts": 0}
        self.stop = threading.Event()
        self.alias_n = 0

    # ---- helpers ------------------------------------------------------------------------

    def violation(self, what: str) -> None:
        with contextlib.suppress(Exception):
            what += f" [t={time.monotonic() - self.t0:.1f}s]"
        self.violations.append(what)
        print(f"soak: VIOLATION: {what}", file=sys.stderr, flush=True)

    def stored(self) -> tuple[str, dict[str, Any]] | None:
        try:
            doc = tomllib.loads(self.sup.config_file.read_text())
        except FileNotFoundError:
            return None
        table = doc.get("default")
        return cfg(table) if table else None

    def status(self) -> dict[str, Any] | None:
        try:
            code, body = call(self.api, "GET", "/v1/status", timeout=10)
        except OSError:
            return None
        return body if code == 200 else None

    def wait_running(self, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.sup.proc is not None and self.sup.proc.poll() is not None:
                raise RuntimeError(f"supervisor exited: {self.sup.log()[-2000:]}")
            s = self.status()
            if s and s["state"] == "RUNNING" and s["pid"] and s["pending_changes"] == 0:
                return s
            time.sleep(0.02)
        raise RuntimeError(f"not RUNNING within {timeout} s: {self.status()}")

    # ---- the checker ---------------------------------------------------------------------

    def checker(self) -> None:
        while not self.stop.is_set():
            self.check_once()
            self.stop.wait(0.03)

    def check_once(self) -> None:
        self.counts["checks"] += 1
        live = servers(self.marker)
        if len(live) > 1:
            # a stopping server may linger for a moment: look again before calling it
            time.sleep(0.2)
            live2 = servers(self.marker)
            if len(set(live) & set(live2)) > 1:
                self.violation(f"{len(live2)} llama-servers at once: {live2}")
        with self.lock:
            if self.killing:
                return
            s1 = self.status()
            if not s1:
                return
            if s1["state"] == "RUNNING" and s1["pid"]:
                pid = s1["pid"]
                ok = pid in servers(self.marker)
                s2 = self.status()
                if (not ok and s2 and s2["pid"] == pid
                        and s2["generation"] == s1["generation"]):
                    self.violation(f"/v1/status says pid {pid} runs, /proc disagrees")
            if self.posting == 0 and self.last_applied is not None:
                st = self.stored()
                if st != self.last_applied:
                    self.violation(f"stored config {st} != last applied {self.last_applied}")
                s3 = self.status()
                if (s3 and s3["state"] == "RUNNING" and s3["pending_changes"] == 0
                        and cfg(s3["config"]) != self.last_applied):
                    self.violation(f"running config {cfg(s3['config'])} != last applied "
                                   f"{self.last_applied}")

    # ---- actions -------------------------------------------------------------------------

    def kill_llama(self) -> None:
        with self.lock:
            s = self.status()
            if not s or not s["pid"]:
                return
            with contextlib.suppress(ProcessLookupError):
                os.kill(s["pid"], signal.SIGKILL)
                self.counts["llama_kills"] += 1
            # the checker must not mistake the dead pid still in /v1/status for a lie
            self.killing = True
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                n = self.status()
                if n and n["pid"] != s["pid"]:
                    break
                time.sleep(0.01)
        finally:
            self.killing = False
        if self.rng.random() < 0.6:
            self.wait_running()

    def kill_supervisor(self, mid_apply: bool) -> None:
        answer: dict[str, Any] = {}
        thread = None
        if mid_apply:
            change = self.valid_change()
            with self.lock:
                self.posting += 1

            def post() -> None:
                try:
                    answer["r"] = call(self.api, "POST", "/v1/params",
                                       json.dumps({"args": change}).encode())
                except (OSError, http.client.HTTPException) as exc:
                    answer["error"] = repr(exc)

            thread = threading.Thread(target=post, daemon=True)
            thread.start()
            time.sleep(self.rng.uniform(0.0, 0.8))
        with self.lock:
            self.killing = True
        try:
            assert self.sup.proc is not None
            self.sup.proc.kill()
            self.sup.proc.wait(10)
            self.counts["supervisor_kills"] += 1
            t = time.monotonic()
            while servers(self.marker) and time.monotonic() - t < 1.0:
                time.sleep(0.01)
            left = servers(self.marker)
            if left:
                self.violation(f"llama-server {left} still alive 1 s after the supervisor's "
                               "SIGKILL")
            if thread is not None:
                thread.join(30)
                self.counts["supervisor_kills_mid_apply"] += 1
                code, body = answer.get("r", (None, None))
                if code == 200:
                    self.last_applied = cfg(body["config"])
                    self.counts["applies_ok"] += 1
                elif code is not None and code >= 500:
                    self.violation(f"POST mid-kill answered {code}: {body}")
                if code != 200:
                    # no answer: the store holds the old or the new config (it cannot be
                    # checked more closely here: flag spellings are canonicalised); from now
                    # on it must not change without a 200
                    self.last_applied = self.stored()
                    if self.last_applied is None:
                        self.violation("config store empty after a kill mid-apply")
            self.sup.start()
            self.counts["supervisor_restarts"] += 1
            s = self.wait_running()
            st = self.stored()
            if st is not None and cfg(s["config"]) != st:
                self.violation(f"restarted supervisor runs {cfg(s['config'])}, stored {st}")
        finally:
            with self.lock:
                self.killing = False
                if thread is not None:
                    self.posting -= 1

    def valid_change(self) -> dict[str, Any]:
        self.alias_n += 1
        options: list[dict[str, Any]] = [
            {"-np": self.rng.randint(1, 3)},
            {"--alias": f"soak-{self.alias_n}"},
            {"-c": self.rng.choice([1024, 2048, 4096])},
            {"--alias": False},
            {"-np": self.rng.randint(1, 3), "--alias": f"soak-{self.alias_n}"},
        ]
        return self.rng.choice(options)

    def invalid(self) -> tuple[str, bytes]:
        options = [
            ("unknown flag", json.dumps({"args": {"--no-such-flag": "1"}}).encode()),
            ("missing model", json.dumps({"args": {"-m": "/nonexistent/x.gguf"}}).encode()),
            ("bad port", json.dumps({"args": {"--port": "not-a-port"}}).encode()),
            ("args not an object", json.dumps({"args": "-np 2"}).encode()),
            ("malformed JSON", b'{"args": {"-np": '),
            ("extra key", json.dumps({"args": {}, "evil": 1}).encode()),
        ]
        if self.real:
            options.append(("fails to load", json.dumps(
                {"args": {"-m": str(self.bad_start)}}).encode()))
        else:
            options.append(("exits at start", json.dumps(
                {"args": {"--fake-exit-at-start": 3}}).encode()))
        return self.rng.choice(options)

    @contextlib.contextmanager
    def in_flight(self) -> Iterator[None]:
        """A POST is on its way: the stored config may change under the checker."""
        with self.lock:
            self.posting += 1
        try:
            yield
        finally:
            with self.lock:
                self.posting -= 1

    def post_valid(self) -> None:
        change = self.valid_change()
        with self.in_flight():
            code, body = call(self.api, "POST", "/v1/params",
                              json.dumps({"args": change}).encode())
            if code == 200:
                self.last_applied = cfg(body["config"])
                self.counts["applies_ok"] += 1
            else:
                self.violation(f"valid change {change} answered {code}: {body}")

    def post_invalid(self) -> None:
        what, raw = self.invalid()
        with self.in_flight():
            code, body = call(self.api, "POST", "/v1/params", raw)
            if code in (400, 422):
                self.counts["rejected"] += 1
            else:
                self.violation(f"invalid change ({what}) answered {code}: {body}")

    # ---- the run -------------------------------------------------------------------------

    def run(self) -> int:
        self.t0 = time.monotonic()
        self.sup.start()
        s = self.wait_running(120)
        self.last_applied = self.stored()
        if self.last_applied != cfg(s["config"]):
            self.violation(f"first start: stored {self.last_applied} != running {s['config']}")
        checker = threading.Thread(target=self.checker, daemon=True)
        checker.start()
        actions = [(self.kill_llama, 3), (lambda: self.kill_supervisor(False), 1),
                   (lambda: self.kill_supervisor(True), 1), (self.post_valid, 4),
                   (self.post_invalid, 3)]
        fns, weights = zip(*actions, strict=True)
        end = self.t0 + self.seconds
        try:
            while time.monotonic() < end and len(self.violations) < 50:
                self.rng.choices(fns, weights)[0]()
                time.sleep(self.rng.uniform(0, 0.1))
            self.wait_running()
        except Exception as exc:  # noqa: BLE001 - a hang or crash is a finding too
            self.violation(f"soak aborted: {exc!r}")
        finally:
            self.stop.set()
            checker.join(10)
            self.finish()
        return 1 if self.violations else 0

    def finish(self) -> None:
        seen = set(self.sup.seen_pids) | set(servers(self.marker))
        if self.sup.proc is not None and self.sup.proc.poll() is None:
            code = self.sup.stop(signal.SIGTERM, 30)
            if code != 0:
                self.violation(f"supervisor exited with {code} on SIGTERM")
        self.sup.close()
        deadline = time.monotonic() + 5
        while servers(self.marker) and time.monotonic() < deadline:
            time.sleep(0.02)
        left = servers(self.marker) + [p for p in seen if is_alive(p)]
        if left:
            self.violation(f"left behind: {sorted(set(left))}")
            for p in set(left):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)

    def summary(self) -> str:
        c = self.counts
        return (f"soak: {time.monotonic() - self.t0:.0f} s ({'real' if self.real else 'fake'} "
                f"llama-server), kills: llama-server {c['llama_kills']}, supervisor "
                f"{c['supervisor_kills']} ({c['supervisor_kills_mid_apply']} mid-apply); "
                f"applies ok {c['applies_ok']}, rejected {c['rejected']}; "
                f"{c['checks']} invariant checks, {len(self.violations)} violations")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=120)
    p.add_argument("--real", action="store_true", help="the real llama-server and model")
    p.add_argument("--seed", type=int, default=None)
    ns = p.parse_args()
    seed = ns.seed if ns.seed is not None else random.randrange(1 << 30)
    print(f"soak: seed {seed}", file=sys.stderr, flush=True)
    with temp_dir("soak") as tmp:
        soak = Soak(tmp, ns.seconds, ns.real, seed)
        code = soak.run()
        if code:
            print(f"soak: supervisor log tail:\n{soak.sup.log()[-3000:]}", file=sys.stderr)
    print(soak.summary())
    return code


if __name__ == "__main__":
    raise SystemExit(main())
