"""What a config would take in memory, before it runs: llama.cpp's own estimate, cached.

Theory of operation
-------------------
``llama-fit-params`` ships beside ``llama-server``; with ``-fitp on`` it prints one line per
device, ``Host 222 98319 32787`` (MiB of model, context, compute). It takes 0.7-3 s, so
results are cached per (binary, model file identity (device, inode, size, mtime), the flags
that bear on memory). It refuses server-only flags (``--port``, ``--metrics``, even
``--kv-unified``), so only :data:`~corral.core.fit.MEMORY_FLAGS` are passed (under their
canonical names, whatever spelling a config kept). Where it is missing or fails, the GGUF
metadata gives the estimate (:mod:`corral.sense.gguf_meta`); where that fails too (a
truncated or fake GGUF), there is no estimate: the caller logs it and lets the start
decide. The log says which method was used.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from corral.core.args import LlamaConfig
from corral.core.fit import DeviceNeed, Estimate, memory_flags

if TYPE_CHECKING:
    # The fallback pulls in the gguf package, and with it numpy (~15 MiB): imported only
    # when an estimate needs it (the real llama-server ships llama-fit-params).
    from corral.sense import gguf_meta

log = logging.getLogger("corral.sense")

FIT_PARAMS = "llama-fit-params"
METHOD = "llama-fit-params"
_LINE = re.compile(r"^(\S+)\s+(\d+)\s+(\d+)\s+(\d+)\s*$")

Key = tuple[str, tuple[int, int, int, int], tuple[tuple[str, str], ...]]
Wrap = Callable[[list[str]], list[str]]  # a command line -> how to run it (--user: as whom)


def file_identity(path: str) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def model_file(config: LlamaConfig) -> tuple[str, tuple[int, int, int, int]] | None:
    """The model's path and file identity; None without ``--model`` or a file to stat."""
    model = config.get("--model")
    if not isinstance(model, str):
        return None
    try:
        return model, file_identity(model)
    except OSError:
        return None


def parse_fit_output(text: str) -> Estimate | None:
    devices = [DeviceNeed(m[1], float(m[2]), float(m[3]), float(m[4]))
               for line in text.splitlines() if (m := _LINE.match(line.strip()))]
    return Estimate(tuple(devices), METHOD) if devices else None


@dataclass
class Estimator:
    """Estimates per config, cached. ``fit_params``: the program's path, or ``""`` to never
    use it (the fallback alone); by default the one beside the config's binary."""

    fit_params: str | None = None
    timeout_s: float = 60.0
    wrap: Wrap | None = None  # --user: llama-fit-params runs as that user
    _cache: dict[Key, Estimate | None] = field(default_factory=dict)
    _meta: dict[tuple[int, int, int, int], gguf_meta.GgufMeta | None] = field(
        default_factory=dict)
    _lock: asyncio.Lock | None = None

    def key(self, config: LlamaConfig) -> Key | None:
        found = model_file(config)
        if found is None:
            return None
        return config.binary, found[1], tuple(sorted(memory_flags(config).items()))

    def cached(self, config: LlamaConfig) -> Estimate | None:
        """The estimate if it was made already (cheap: for the status page)."""
        key = self.key(config)
        return self._cache.get(key) if key is not None else None

    def is_cached(self, config: LlamaConfig) -> bool:
        key = self.key(config)
        return key is not None and key in self._cache

    async def estimate(self, config: LlamaConfig) -> Estimate | None:
        """llama-fit-params, else GGUF metadata, else None (logged as a warning)."""
        key = self.key(config)
        if key is None:
            return None
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # one estimate at a time: they are CPU-heavy
            if key not in self._cache:
                self._cache[key] = await self._estimate(config, key[1])
        return self._cache[key]

    def estimate_now(self, config: LlamaConfig) -> Estimate | None:
        """Without waiting: the cached estimate, else the (fast) metadata one."""
        key = self.key(config)
        if key is None:
            return None
        if key in self._cache:
            return self._cache[key]
        return self._from_meta(config, key[1], quiet=True)

    async def _estimate(self, config: LlamaConfig, identity: tuple[int, int, int, int]
                        ) -> Estimate | None:
        why = await self._from_fit_params(config)
        if isinstance(why, Estimate):
            log.info("memory estimate by llama-fit-params: %s", _describe(why))
            return why
        result = await asyncio.to_thread(self._from_meta, config, identity)
        if result is not None:
            log.info("memory estimate from GGUF metadata (%s): %s", why, _describe(result))
        return result

    def _from_meta(self, config: LlamaConfig, identity: tuple[int, int, int, int],
                   quiet: bool = False) -> Estimate | None:
        meta = self.meta(config)
        if meta is None:
            if not quiet:
                log.warning("no memory estimate for %s: llama-fit-params and the GGUF "
                            "metadata both failed; the start decides", config.get("--model"))
            return None
        from corral.sense import gguf_meta

        return gguf_meta.estimate(meta, memory_flags(config))

    def meta(self, config: LlamaConfig) -> gguf_meta.GgufMeta | None:
        """The model's GGUF metadata (cached per file identity), or None."""
        found = model_file(config)
        if found is None:
            return None
        model, identity = found
        if identity not in self._meta:
            from corral.sense import gguf_meta

            try:
                self._meta[identity] = gguf_meta.read_meta(model)
            except gguf_meta.GgufError as exc:
                log.warning("%s", exc)
                self._meta[identity] = None
        return self._meta[identity]

    def program(self, config: LlamaConfig) -> str | None:
        if self.fit_params is not None:
            return self.fit_params or None
        binary = config.binary if os.sep in config.binary else shutil.which(config.binary)
        if binary is None:
            return None
        path = os.path.join(os.path.dirname(os.path.realpath(binary)), FIT_PARAMS)
        return path if os.access(path, os.X_OK) else None

    async def _from_fit_params(self, config: LlamaConfig) -> Estimate | str:
        """The estimate, or why there is none."""
        program = self.program(config)
        if program is None:
            return f"no {FIT_PARAMS} beside {config.binary}"
        argv = [program, "--model", str(config.get("--model")), "-fitp", "on"]
        for key, value in memory_flags(config).items():
            argv += [key] if value == "" else [key, value]
        env = {**os.environ, "GGML_NO_BACKTRACE": "1"}  # else a crash waits for gdb
        try:
            proc = await asyncio.create_subprocess_exec(
                *(self.wrap(argv) if self.wrap else argv), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=env)
        except OSError as exc:
            return f"{FIT_PARAMS} cannot run: {exc}"
        try:
            out, err = await asyncio.wait_for(proc.communicate(), self.timeout_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return f"{FIT_PARAMS} took over {self.timeout_s:g} s"
        result = parse_fit_output(out.decode("utf-8", "replace"))
        if proc.returncode != 0 or result is None:
            tail = err.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
            return f"{FIT_PARAMS} failed (exit {proc.returncode}: {tail[0][:200]})"
        return result


def _describe(e: Estimate) -> str:
    return ", ".join(f"{d.device} model {d.model_mib:.0f} + context {d.context_mib:.0f} + "
                     f"compute {d.compute_mib:.0f} MiB" for d in e.devices)
