"""llama-server arguments as data: canonical flag names, merging, rendering to argv.

Theory of operation
-------------------
A config is a ``binary`` plus an *ordered* mapping from canonical flag names to values.
Every spelling of a flag (``-m``, ``--model``, ``model``) maps to one canonical key, the
long form the binary's own ``--help`` lists first, so that merging ``-m`` and then
``--model`` touches one key. The :class:`FlagCatalog` that knows the spellings is parsed
from ``--help`` text (see :func:`parse_help`); without one, keys are taken as given.

Values are strings, or ``True`` for a bare flag. Numbers coming from JSON are turned into
strings at the edge, so ``8081`` and ``"8081"`` are the same config (no restart).
``False``/``None`` in a change means "remove the flag". This module does no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeAlias, TypeVar

from corral.errors import InvalidArgs

ArgValue: TypeAlias = str | Literal[True]
"""A flag's value: a string, or ``True`` for a flag given without value."""

ChangeValue: TypeAlias = str | int | float | bool | None
"""What a client may send for a flag: ``False``/``None`` removes it."""

BINARY_KEY = "binary"
_V = TypeVar("_V")

_ENV_NOTE = re.compile(r"\(env: ([A-Z][A-Z0-9_]*)\)")
_SPELLING = re.compile(r"(--?[A-Za-z0-9][A-Za-z0-9_\-.]*)(?:,\s*|\s+|$)")


@dataclass(frozen=True)
class Flag:
    canonical: str
    aliases: frozenset[str]
    takes_value: bool
    opposite: str | None = None  # ``--no-cont-batching`` for ``--cont-batching``, and back


@dataclass(frozen=True)
class FlagCatalog:
    """The flags one llama-server binary understands, keyed by every spelling."""

    flags: Mapping[str, Flag] = field(default_factory=dict)
    env_vars: Mapping[str, str] = field(default_factory=dict)  # LLAMA_ARG_X -> its flag

    def lookup(self, key: str) -> Flag | None:
        for spelling in _spellings(key):
            if spelling in self.flags:
                return self.flags[spelling]
        return None

    def __len__(self) -> int:
        return len({f.canonical for f in self.flags.values()})


def _spellings(key: str) -> list[str]:
    """``model`` may mean ``--model`` or ``-model``; ``m`` may mean ``-m`` or ``--m``."""
    if key.startswith("-"):
        return [key]
    return [f"--{key}", f"-{key}"]


def parse_help(text: str) -> FlagCatalog:
    """Build a catalog from llama-server's ``--help`` output.

    Option lines look like ``-m,    --model FNAME     model path ...`` or
    ``-cb,   --cont-batching   enable ...``: comma-separated spellings, then an optional
    placeholder (upper case, ``{a,b}``, ``<x>``) meaning the flag takes a value.
    """
    flags: dict[str, Flag] = {}
    env_vars: dict[str, str] = {}
    last: str | None = None
    for line in text.splitlines():
        parsed = _parse_option_line(line)
        if parsed is None:
            env = _ENV_NOTE.search(line)
            if env is not None and last is not None:
                env_vars.setdefault(env.group(1), last)
            continue
        spellings, takes_value = parsed
        groups = _split_negations(spellings)
        names = [_canonical_of(g) for g in groups]
        for i, group in enumerate(groups):
            other = names[1 - i] if len(groups) == 2 else None
            flag = Flag(names[i], frozenset(group), takes_value, other)
            for spelling in group:
                flags.setdefault(spelling, flag)
        last = names[0]
    return FlagCatalog(flags, env_vars)


def _canonical_of(spellings: list[str]) -> str:
    return next((s for s in spellings if s.startswith("--")), spellings[0])


def _split_negations(spellings: list[str]) -> list[list[str]]:
    """``-kvo, --kv-offload, -nkvo, --no-kv-offload`` is two flags, not four spellings.

    llama-server lists the positive spellings first: the negative group starts right after
    the last long spelling that is not ``--no-...``, if a ``--no-...`` spelling follows it.
    """
    positive_longs = [i for i, s in enumerate(spellings)
                      if s.startswith("--") and not s.startswith("--no-")]
    if not positive_longs:
        return [spellings]
    cut = positive_longs[-1] + 1
    if not any(s.startswith("--no-") for s in spellings[cut:]):
        return [spellings]
    return [spellings[:cut], spellings[cut:]]


def _parse_option_line(line: str) -> tuple[list[str], bool] | None:
    # Options start in column 0; indented lines belong to a description.
    if not line.startswith("-") or line.startswith("--- "):
        return None
    stripped = line.strip()
    # Spellings are comma-separated (padded to align columns); the description starts
    # after the next run of two or more spaces. Whatever follows the spellings in that head
    # (``N``, ``FNAME``, ``{none,linear}``, ``lo-hi``, ``<pattern>=<type>``) is a value.
    head = re.split(r"\s{2,}", re.sub(r",\s+", ", ", stripped), maxsplit=1)[0]
    spellings: list[str] = []
    rest = head
    while match := _SPELLING.match(rest):
        spellings.append(match.group(1))
        rest = rest[match.end():]
    return (spellings, bool(rest.strip())) if spellings else None


def canonical_key(key: str, catalog: FlagCatalog | None) -> str:
    """The one name a flag is stored under. Raises :class:`InvalidArgs` for unknown flags."""
    key = key.strip()
    if key == BINARY_KEY:
        return key
    if not key or key.strip("-") == "" or " " in key:
        raise InvalidArgs(f"{key!r} is not a flag name")
    if catalog is None or len(catalog) == 0:
        return key if key.startswith("-") else ("-" if len(key) == 1 else "--") + key
    flag = catalog.lookup(key)
    if flag is None:
        raise InvalidArgs(f"unknown llama-server flag {key!r} (not in this binary's --help)")
    return flag.canonical


@dataclass(frozen=True)
class LlamaConfig:
    """What to run: a program, its flags in order, and environment variables of its own
    (on top of the supervisor's). Immutable; compare with ``==``."""

    binary: str
    args: tuple[tuple[str, ArgValue], ...] = ()
    env: tuple[tuple[str, str], ...] = ()

    def get(self, key: str) -> ArgValue | None:
        for name, value in self.args:
            if name == key:
                return value
        return None

    def argv(self) -> list[str]:
        out = [self.binary]
        for name, value in self.args:
            out.append(name)
            if value is not True:
                out.append(value)
        return out

    def as_dict(self) -> dict[str, ArgValue]:
        return dict(self.args)


def normalise_value(key: str, value: ChangeValue, flag: Flag | None) -> ArgValue | None:
    """JSON value -> stored value; ``None`` means remove. Checks value against the flag."""
    if value is None or value is False:
        return None
    if value is True:
        if flag is not None and flag.takes_value:
            raise InvalidArgs(f"flag {key!r} needs a value, got true")
        return True
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value)
    if flag is not None and not flag.takes_value:
        if text.lower() in ("true", "1", "on", "yes"):
            return True
        raise InvalidArgs(f"flag {key!r} takes no value; send true to set it, false to remove it")
    if "\n" in text or "\x00" in text:
        raise InvalidArgs(f"value of {key!r} contains a newline or NUL byte")
    return text


@dataclass(frozen=True)
class Change:
    """A validated request: canonical keys, normalised values (``None`` = remove).

    ``replace`` means "this is a whole config": it drops every flag it does not name (a
    fleet config read from the store is applied this way).
    """

    binary: str | None
    args: tuple[tuple[str, ArgValue | None], ...]
    replace: bool = False
    env: tuple[tuple[str, str | None], ...] = ()  # ``None`` removes a variable

    @staticmethod
    def whole(config: LlamaConfig) -> Change:
        return Change(config.binary, config.args, replace=True, env=config.env)


def parse_change(raw: Mapping[str, ChangeValue], catalog: FlagCatalog | None) -> Change:
    """Validate a request body's ``args`` object into a :class:`Change`."""
    binary: str | None = None
    args: dict[str, ArgValue | None] = {}
    for key, value in raw.items():
        name = canonical_key(key, catalog)
        if name == BINARY_KEY:
            if not isinstance(value, str) or not value.strip():
                raise InvalidArgs("binary must be a non-empty string (a path or a name on PATH)")
            if "\n" in value or "\x00" in value:
                raise InvalidArgs("binary contains a newline or NUL byte")
            binary = value.strip()
            continue
        flag = catalog.lookup(name) if catalog else None
        args[name] = normalise_value(key, value, flag)
        # Setting --cont-batching drops a --no-cont-batching given earlier (and back),
        # unless this same request says otherwise.
        if flag is not None and flag.opposite and args[name] is not None:
            args.setdefault(flag.opposite, None)
    return Change(binary, tuple(args.items()))


def merge_changes(changes: Iterable[Change]) -> Change:
    """Key-wise merge, later wins (a later removal wins over an earlier set, too)."""
    binary: str | None = None
    args: dict[str, ArgValue | None] = {}
    env: dict[str, str | None] = {}
    replace = False
    for change in changes:
        if change.replace:
            args, env, replace = {}, {}, True
        binary = change.binary or binary
        args.update(change.args)
        env.update(change.env)
    return Change(binary, tuple(args.items()), replace, tuple(env.items()))


def apply_change(config: LlamaConfig, change: Change) -> LlamaConfig:
    """``config ⊕ change``: existing keys keep their place, new keys go last."""
    old = LlamaConfig(config.binary) if change.replace else config
    return LlamaConfig(change.binary or config.binary, _overlay(old.args, change.args),
                       _overlay(old.env, change.env))


def _overlay(base: Iterable[tuple[str, _V]], changes: Iterable[tuple[str, _V | None]]
             ) -> tuple[tuple[str, _V], ...]:
    """``base`` with ``changes`` on top: ``None`` removes a key, a kept key keeps its place."""
    out = dict(base)
    for key, value in changes:
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return tuple(out.items())


def parse_env(raw: Mapping[str, str | None]) -> tuple[tuple[str, str | None], ...]:
    """Validate a request's ``env`` object: names as a shell knows them, no NUL in values."""
    out: dict[str, str | None] = {}
    for name, value in raw.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise InvalidArgs(f"{name!r} is not an environment variable name")
        if value is not None and "\x00" in value:
            raise InvalidArgs(f"value of environment variable {name} contains a NUL byte")
        out[name] = value
    return tuple(out.items())


def parse_argv(tokens: Sequence[str], catalog: FlagCatalog | None) -> list[tuple[str, ArgValue]]:
    """Command-line tokens (``-m x --port 8081 -cb``) -> ordered (canonical, value) pairs."""
    out: dict[str, ArgValue] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("-") or _looks_numeric(token):
            raise InvalidArgs(f"expected a flag, got {token!r}")
        name, _, inline = token.partition("=")
        key = canonical_key(name, catalog)
        flag = catalog.lookup(key) if catalog else None
        if inline:
            out[key] = inline
        elif flag is not None:
            if flag.takes_value:
                if i + 1 >= len(tokens):
                    raise InvalidArgs(f"flag {name!r} needs a value")
                out[key] = tokens[i + 1]
                i += 1
            else:
                out[key] = True
        elif i + 1 < len(tokens) and (
            not tokens[i + 1].startswith("-") or _looks_numeric(tokens[i + 1])
        ):
            out[key] = tokens[i + 1]
            i += 1
        else:
            out[key] = True
        i += 1
    return list(out.items())


def _looks_numeric(token: str) -> bool:
    return re.fullmatch(r"-?\d+(\.\d+)?", token) is not None


def port_of(config: LlamaConfig, default: int = 8080) -> int:
    value = config.get("--port")
    try:
        return int(value) if isinstance(value, str) else default
    except ValueError:
        return default


def host_of(config: LlamaConfig) -> str:
    """Where to reach llama-server: the first of its ``--host`` list, wildcards on loopback."""
    value = config.get("--host")
    first = value.split(",")[0].strip() if isinstance(value, str) else ""
    if first in ("", "0.0.0.0", "::", "[::]") or first.endswith(".sock"):
        return "127.0.0.1"
    return first.strip("[]")
