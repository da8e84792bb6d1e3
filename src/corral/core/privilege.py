"""Least privilege: what a change through the API or the fleet may make llama-server do.

Theory of operation
-------------------
The operator's command line is trusted. Everything else (an API change, a fleet config, a
stored config read at start) is judged against a :class:`Policy` before anything runs, and
the first rule it breaks refuses it:

- **binary**: its real path must be one allowed (the command line's, or ``--allow-binary``),
  so re-pointing an allowed symlink at another program does not make that program allowed;
- **file**: with ``--allow-model-dir``, every flag that names a file llama-server reads
  (:data:`FILE_FLAGS`) must resolve inside one of those directories;
- **flag**: flags that write files, open sockets, download or run tools (:data:`RISKY_FLAGS`)
  are refused unless ``--allow-flag`` names them or the command line gave them;
- **env**: environment variables must match ``--allow-env``; :data:`NEVER_ENV` never does.
  ``LLAMA_ARG_*`` variables set flags, so they are judged as the flag they set.

A value exactly as the command line gave it stays allowed (the operator chose it). Paths are
resolved by the caller (``realpath`` is passed in), so this module does no I/O; the
containment test itself is :func:`is_inside` on resolved, absolute paths.
"""

from __future__ import annotations

import fnmatch
import posixpath
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from corral.core.args import ArgValue, FlagCatalog, LlamaConfig
from corral.errors import NotAllowed

# Every spelling of a flag whose value names a file (or directory) llama-server reads.
FILE_FLAGS = frozenset({
    "-m", "--model", "--lora", "--lora-scaled", "--control-vector", "--control-vector-scaled",
    "-mm", "--mmproj", "-md", "--model-draft", "--spec-draft-model", "--model-vocoder",
    "--grammar-file", "-jf", "--json-schema-file", "--chat-template-file",
    "-lcs", "--lookup-cache-static", "-lcd", "--lookup-cache-dynamic", "--path",
    "--ui-config-file", "--webui-config-file", "--api-key-file", "--ssl-key-file",
    "--ssl-cert-file", "--media-path", "--models-dir", "--models-preset",
    "--mcp-servers-config", "--video-ffmpeg-dir", "-f", "--file", "-bf", "--binary-file",
    "-sysf", "--system-prompt-file", "--prompt-cache",
})
# Flags whose values are comma-separated lists of FNAME or FNAME:SCALE.
_LIST_FLAGS = frozenset({"--lora", "--lora-scaled", "--control-vector",
                         "--control-vector-scaled"})
_SCALED_FLAGS = frozenset({"--lora-scaled", "--control-vector-scaled"})

_WRITES = "writes files"
_LISTENS = "opens network sockets"
_DOWNLOADS = "downloads from the network and writes a cache"
_RUNS = "lets llama-server run programs, reach other hosts or write files for a client"
# Every spelling of a flag that writes files or opens sockets beyond llama-server's own port.
RISKY_FLAGS: Mapping[str, str] = {
    "--log-file": _WRITES, "--slot-save-path": _WRITES, "--log-prompts-dir": _WRITES,
    "-lcd": _WRITES, "--lookup-cache-dynamic": _WRITES, "--prompt-cache": _WRITES,
    "--host": _LISTENS, "--reuse-port": _LISTENS, "--rpc": _LISTENS,
    "-mu": _DOWNLOADS, "--model-url": _DOWNLOADS, "-hf": _DOWNLOADS, "-hfr": _DOWNLOADS,
    "--hf-repo": _DOWNLOADS, "-hff": _DOWNLOADS, "--hf-file": _DOWNLOADS,
    "-hfd": _DOWNLOADS, "-hfrd": _DOWNLOADS, "--hf-repo-draft": _DOWNLOADS,
    "--spec-draft-hf": _DOWNLOADS, "-mmu": _DOWNLOADS, "--mmproj-url": _DOWNLOADS,
    "-dr": _DOWNLOADS, "--docker-repo": _DOWNLOADS, "--hf-repo-v": _DOWNLOADS,
    "--hf-file-v": _DOWNLOADS,
    "--tools": _RUNS, "--tools-runtime": _RUNS, "-ag": _RUNS, "--agent": _RUNS,
    "--mcp-servers-config": _RUNS, "--mcp-servers-json": _RUNS, "--ui-mcp-proxy": _RUNS,
    "--webui-mcp-proxy": _RUNS, "--video-ffmpeg-dir": _RUNS,
}
# ``--gpt-oss-20b-default`` and friends download their weights.
_PRESET = re.compile(r"^--(embd|fim|gpt|vision|spec)-[a-z0-9.-]*(default|spec)$")

DEFAULT_ENV = ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES",
               "GGML_VK_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL", "ONEAPI_DEVICE_SELECTOR",
               "LLAMA_ARG_*")
# Never, whatever --allow-env says: they change what code runs or where it comes from.
NEVER_ENV = ("LD_*", "DYLD_*", "PATH", "PYTHON*", "GCONV_PATH", "LOCPATH", "NLSPATH",
             "MALLOC_*", "GLIBC_TUNABLES", "BASH_ENV", "ENV", "IFS", "HOME", "TMPDIR")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
LLAMA_ARG_PREFIX = "LLAMA_ARG_"


@dataclass(frozen=True)
class Policy:
    """What a change not from the command line may ask for.

    ``binaries`` and ``model_dirs`` are real paths (resolved at start). No model dirs means
    files are not confined. ``flags`` are the risky flags allowed by name (every spelling);
    ``trusted`` is the command line's config, whose values stay allowed as given.
    """

    binaries: frozenset[str] = frozenset()
    model_dirs: tuple[str, ...] = ()
    flags: frozenset[str] = frozenset()
    env: tuple[str, ...] = DEFAULT_ENV
    trusted: LlamaConfig | None = None
    confine_binaries: bool = True


def is_inside(path: str, root: str) -> bool:
    """Is the absolute, resolved ``path`` ``root`` itself or below it? (string logic only)"""
    path, root = posixpath.normpath(path), posixpath.normpath(root)
    if not (posixpath.isabs(path) and posixpath.isabs(root)):
        return False
    return path == root or path.startswith(root.rstrip("/") + "/")


def file_values(flag: str, value: ArgValue) -> list[str]:
    """The file names in one flag's value: lists are comma-separated, ``FNAME:SCALE``."""
    if value is True or not value:
        return []
    if flag not in _LIST_FLAGS:
        return [value]
    names = [part.strip() for part in value.split(",") if part.strip()]
    return [n.rsplit(":", 1)[0] if flag in _SCALED_FLAGS and ":" in n else n for n in names]


def spellings_of(key: str, catalog: FlagCatalog) -> frozenset[str]:
    flag = catalog.lookup(key)
    return flag.aliases | {key} if flag is not None else frozenset({key})


def canonical_file_flag(spellings: frozenset[str]) -> str | None:
    """The spelling :func:`file_values` knows this flag by, if it names files."""
    hits = sorted(spellings & FILE_FLAGS, key=lambda s: (not s.startswith("--"), s))
    return hits[0] if hits else None


def risk_of(spellings: frozenset[str]) -> str | None:
    for spelling in sorted(spellings):
        if spelling in RISKY_FLAGS:
            return RISKY_FLAGS[spelling]
        if _PRESET.match(spelling):
            return _DOWNLOADS
    return None


def env_matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def flag_of_env(name: str, catalog: FlagCatalog) -> str | None:
    """The flag a ``LLAMA_ARG_*`` variable sets: the catalog's ``(env: ...)``, else its name."""
    known = catalog.env_vars.get(name)
    if known is not None:
        return known
    return "--" + name[len(LLAMA_ARG_PREFIX):].lower().replace("_", "-")


def files_of(config: LlamaConfig, catalog: FlagCatalog) -> list[tuple[str, str]]:
    """(flag, file name) for every file ``config`` makes llama-server read."""
    out: list[tuple[str, str]] = []
    for key, value in config.args:
        as_file = canonical_file_flag(spellings_of(key, catalog))
        if as_file is not None:
            out.extend((key, name) for name in file_values(as_file, value))
    return out


class Judge:
    """Applies a :class:`Policy` to configs; ``realpath`` resolves symlinks and ``..``."""

    def __init__(self, policy: Policy, realpath: Callable[[str], str]) -> None:
        self.policy = policy
        self.realpath = realpath

    def check(self, config: LlamaConfig, catalog: FlagCatalog) -> None:
        """Raise :class:`NotAllowed` naming the first rule ``config`` breaks."""
        self.check_binary(config.binary)
        for key, value in config.args:
            self.check_flag(key, value, catalog)
        for name, value in config.env:
            self.check_env(name, value, catalog)

    def check_binary(self, binary: str) -> None:
        p = self.policy
        if not p.confine_binaries:
            return
        real = self.realpath(binary)
        if real not in p.binaries:
            allowed = ", ".join(sorted(p.binaries)) or "none"
            raise NotAllowed("binary", f"binary not allowed: {binary} (really {real}) is not "
                             f"one of {allowed}; start the supervisor with --allow-binary to "
                             "allow it")

    def check_flag(self, key: str, value: ArgValue, catalog: FlagCatalog) -> None:
        if self._given_at_start(key, value):
            return
        spellings = spellings_of(key, catalog)
        why = risk_of(spellings)
        if why is not None and not spellings & self.policy.flags:
            raise NotAllowed("flag", f"flag not allowed: {key} {why}; only the command line "
                             f"may set it, or start the supervisor with --allow-flag {key}")
        as_file = canonical_file_flag(spellings)
        if as_file is not None:
            for name in file_values(as_file, value):
                self.check_file(key, name)

    def check_file(self, key: str, name: str) -> None:
        dirs = self.policy.model_dirs
        if not dirs:
            return
        real = self.realpath(name)
        if not any(is_inside(real, d) for d in dirs):
            raise NotAllowed("file", f"file not allowed: {key} {name} (really {real}) is "
                             f"outside every --allow-model-dir ({', '.join(dirs)})")

    def check_env(self, name: str, value: str, catalog: FlagCatalog) -> None:
        if not ENV_NAME.fullmatch(name) or env_matches(name, NEVER_ENV):
            raise NotAllowed("env", f"environment variable not allowed: {name} is never "
                             "passed to llama-server")
        if not env_matches(name, self.policy.env):
            raise NotAllowed("env", f"environment variable not allowed: {name} (allowed: "
                             f"{', '.join(self.policy.env)}; see --allow-env)")
        if name.startswith(LLAMA_ARG_PREFIX):
            flag = flag_of_env(name, catalog)
            if flag is not None:
                self.check_flag(flag, value, catalog)

    def _given_at_start(self, key: str, value: ArgValue) -> bool:
        trusted = self.policy.trusted
        return trusted is not None and trusted.get(key) == value

