"""``corral serve`` as a test runs it: a subprocess, its two ports, its status."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

from corral.child.process import death_signal_prefix
from tests.fake_llama_server import STARTS_ENV
from tests.harness import free_port, wait_for


class ServeProcess:
    def __init__(self, tmp: Path, binary: str | Path, *, models_dir: Path | None = None,
                 config: str = "", extra: Sequence[str] = (), llama_args: Sequence[str] = ()
                 ) -> None:
        self.tmp = tmp
        self.port, self.api_port = free_port(), free_port()
        self.config_file = tmp / "serve.toml"
        if config:
            self.config_file.write_text(config)
        self.log_path = tmp / f"serve-{self.api_port}.log"
        self.starts_path = tmp / f"starts-{self.api_port}"
        self.cmd = [sys.executable, "-m", "corral", "serve",
                    "--listen", f"127.0.0.1:{self.port}",
                    "--supervisor-addr", f"127.0.0.1:{self.api_port}",
                    "--binary", str(binary), "--state-dir", str(tmp / "state"), *extra]
        if "--etcd" not in extra and "--config-driver" not in extra:
            self.cmd += ["--config-file", str(self.config_file)]
        if models_dir is not None:
            self.cmd += ["--models-dir", str(models_dir)]
        if llama_args:
            self.cmd += ["--", *llama_args]
        self.proc: subprocess.Popen[bytes] | None = None
        self.api = httpx.Client(base_url=f"http://127.0.0.1:{self.api_port}", timeout=60)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=120)

    def start(self) -> ServeProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the child's life
        main = threading.current_thread() is threading.main_thread()
        self.proc = subprocess.Popen([*(death_signal_prefix() if main else []), *self.cmd],
                                     stdout=log, stderr=subprocess.STDOUT, cwd=self.tmp,
                                     env={**os.environ, STARTS_ENV: str(self.starts_path)})
        log.close()
        proc = self.proc
        wait_for(lambda: proc.poll() is not None or self._up(), 30,
                 "corral serve answering /health")
        if proc.poll() is not None:
            raise AssertionError(f"corral serve exited with {proc.returncode}:\n"
                                 + self.log()[-3000:])
        return self

    def _up(self) -> bool:
        try:
            return self.api.get("/health").status_code == 200
        except httpx.HTTPError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = self.api.get("/v1/status").json()
        return data

    def model(self, model_id: str) -> dict[str, Any]:
        rows = [m for m in self.status()["models"] if m["id"] == model_id]
        assert rows, self.status()
        return rows[0]

    def evictions(self) -> dict[tuple[str, str], int]:
        return {(e["model"], e["reason"]): e["count"] for e in self.status()["evictions"]}

    def starts(self, marker: str) -> int:
        """Fake llama-servers run with ``marker`` in their arguments (--help runs aside)."""
        if not self.starts_path.exists():
            return 0
        return sum(marker in line and "--help" not in line
                   for line in self.starts_path.read_text().splitlines())

    def complete(self, model: str, **body: Any) -> httpx.Response:
        return self.client.post("/completion", json={"model": model, "prompt": "hi", **body})

    def stop(self, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def close(self) -> None:
        self.api.close()
        self.client.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@contextlib.contextmanager
def serving(tmp: Path, binary: str | Path, **kwargs: Any) -> Iterator[ServeProcess]:
    server = ServeProcess(tmp, binary, **kwargs).start()
    try:
        yield server
    finally:
        server.close()


def model_table(name: str, binary: str | Path, model: Path, args: dict[str, Any] | None = None,
                serve: str = "") -> str:
    """One [name] table of the catalog (TOML)."""
    lines = [f"[{name}]", f'binary = "{binary}"', f"[{name}.args]", f'"--model" = "{model}"']
    lines += [f'"{k}" = {v!r}'.replace("'", '"') for k, v in (args or {}).items()]
    if serve:
        lines += [f"[{name}.serve]", serve]
    return "\n".join(lines) + "\n"
