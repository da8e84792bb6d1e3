"""The models ``corral serve`` offers: the store's named configs, and ``--models-dir``.

Every named config is a model whose id is its name (its config is read through the store,
as ``supervise`` reads it). How the front door treats it is a ``serve`` table: ``[name.serve]``
in the TOML file, the JSON at ``/corral/serve/<name>`` in etcd. Every ``*.gguf`` in
``--models-dir`` is a model too, named after its file stem, unless a config of that name is
stored: its config is the binary, ``--model FILE`` and the arguments after ``--``, stored
once it has loaded (from then on it is a named config like the others).
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from corral.core.args import FlagCatalog, LlamaConfig, parse_argv
from corral.errors import UsageError
from corral.serve.model import ServeOptions


@dataclass(frozen=True)
class Entry:
    id: str
    fallback: LlamaConfig | None  # what to run when nothing is stored (None: stored only)
    serve: ServeOptions = field(default_factory=ServeOptions)


def read_catalog(tables: Mapping[str, Mapping[str, object]], where: str,
                 models_dir: Path | None, binary: str, dir_args: list[str],
                 flags: FlagCatalog) -> dict[str, Entry]:
    """Every model by id (its aliases not included), from the store's named configs
    (``tables``: name -> its table, of which only ``serve`` is read here) and
    ``models_dir``; UsageError for a malformed entry."""
    entries: dict[str, Entry] = {}
    for name, table in tables.items():
        entries[name] = Entry(name, None, serve_options(name, table.get("serve", {})))
    if models_dir is not None:
        if not models_dir.is_dir():
            raise UsageError(f"--models-dir {models_dir}: not a directory")
        common = parse_argv(dir_args, flags)
        for path in sorted(models_dir.glob("*.gguf")):
            if path.stem in entries:
                continue  # a stored config of that name wins
            args = (("--model", str(path.resolve())), *common)
            entries[path.stem] = Entry(path.stem, LlamaConfig(binary, tuple(args)))
    if not entries:
        folder = (f"--models-dir {models_dir} has no *.gguf" if models_dir
                  else "no --models-dir was given")
        raise UsageError(f"no models: {where} has no named config, and {folder}")
    _check_ids(entries)
    return entries


def toml_tables(path: Path) -> dict[str, Mapping[str, object]]:
    """The named configs of a TOML config file (tables with a ``binary``)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path} is not valid TOML: {exc}") from None
    return {k: v for k, v in doc.items() if isinstance(v, dict) and "binary" in v}


def serve_options(name: str, raw: object) -> ServeOptions:
    where = f"[{name}.serve]"
    if not isinstance(raw, Mapping):
        raise UsageError(f"{where} must be a table")
    unknown = set(raw) - {"aliases", "ttl", "pin"}
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} "
                         "(known: aliases, ttl, pin)")
    aliases = raw.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
        raise UsageError(f"{where}: aliases must be a list of names")
    ttl = raw.get("ttl", 0)
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or ttl < 0:
        raise UsageError(f"{where}: ttl must be seconds (0: never unload for idleness)")
    pin = raw.get("pin", False)
    if not isinstance(pin, bool):
        raise UsageError(f"{where}: pin must be true or false")
    return ServeOptions(tuple(aliases), float(ttl), pin)


def _check_ids(entries: Mapping[str, Entry]) -> None:
    seen: dict[str, str] = {}
    for entry in entries.values():
        for alias in entry.serve.aliases:
            if alias in entries or alias in seen:
                owner = "a model" if alias in entries else f"an alias of {seen[alias]}"
                raise UsageError(f"alias {alias!r} of {entry.id!r} is already the name of "
                                 f"{owner}")
            seen[alias] = entry.id
