"""How the etcd driver stores things: configs as readable JSON, names as key segments.

Theory of operation
-------------------
A config is kept as human-readable JSON, one flag per line, so ``etcdctl get`` shows it as
an operator would write it. Reading is lenient about what a person may have written by hand
(``args`` as an object instead of a list of pairs) and strict about everything else: a value
that is not a config raises :class:`StoreCorrupt`. Flags and values are normalised exactly as
the core does (``canonical_key``, ``normalise_value``).

Config and instance names become single key segments: ``/`` would nest a key, so it (and
``%``, to stay reversible) is %-escaped.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from corral.core.args import ArgValue, LlamaConfig, canonical_key, normalise_value
from corral.errors import InvalidArgs, StoreCorrupt
from corral.store.base import StoredConfig

__all__ = ["decode_config", "encode_config"]


def encode_config(stored: StoredConfig) -> bytes:
    """Readable JSON, one flag per line: ``etcdctl get`` shows it as an operator would."""
    args = ",\n".join(
        f"    {json.dumps(list(pair), ensure_ascii=False)}" for pair in stored.config.args
    )
    fields = [
        f'  "binary": {json.dumps(stored.config.binary, ensure_ascii=False)}',
        f'  "args": [\n{args}\n  ]' if args else '  "args": []',
        f'  "applied_at": {json.dumps(stored.applied_at, ensure_ascii=False)}',
        f'  "applied_by": {json.dumps(stored.applied_by, ensure_ascii=False)}',
    ]
    if stored.config.env:  # llama-server's own environment variables, only when set
        fields.append(f'  "env": {json.dumps(dict(stored.config.env), ensure_ascii=False)}')
    return ("{\n" + ",\n".join(fields) + "\n}\n").encode()


def decode_config(raw: bytes, where: str) -> StoredConfig:
    """Parse a stored value; ``args`` may be a list of pairs or (hand-written) an object."""
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise StoreCorrupt(f"etcd key {where} does not hold JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise StoreCorrupt(f"etcd key {where} holds {type(data).__name__}, not a JSON object")
    binary = data.get("binary")
    if not isinstance(binary, str) or not binary.strip():
        raise StoreCorrupt(f"etcd key {where}: 'binary' must be a non-empty string")
    try:
        args = _decode_args(data.get("args", []))
    except (InvalidArgs, TypeError, ValueError) as exc:
        raise StoreCorrupt(f"etcd key {where}: bad 'args': {exc}") from exc
    env = data.get("env") or {}
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        raise StoreCorrupt(f"etcd key {where}: 'env' must be an object of strings")
    stamps = [data.get(k) or "" for k in ("applied_at", "applied_by")]
    return StoredConfig(LlamaConfig(binary.strip(), args, tuple(env.items())),
                        str(stamps[0]), str(stamps[1]))


def _decode_args(raw: object) -> tuple[tuple[str, ArgValue], ...]:
    pairs: Iterable[object]
    if isinstance(raw, dict):
        pairs = raw.items()
    elif isinstance(raw, list):
        pairs = raw
    else:
        raise TypeError("expected a list of [flag, value] pairs or an object")
    out: dict[str, ArgValue] = {}
    for pair in pairs:
        if not isinstance(pair, list | tuple) or len(pair) != 2 or not isinstance(pair[0], str):
            raise TypeError(f"{pair!r} is not a [flag, value] pair")
        key, value = pair
        if value is not None and not isinstance(value, str | int | float | bool):
            raise TypeError(f"value of {key!r} must be a string, number or boolean")
        name = canonical_key(key, None)
        normal = normalise_value(name, value, None)
        if normal is None:
            out.pop(name, None)
        else:
            out[name] = normal
    return tuple(out.items())


def _escape(part: str) -> str:
    """Names become one key segment: '/' would nest, so it (and '%') is %-escaped."""
    return part.replace("%", "%25").replace("/", "%2F")


def _unescape(part: str) -> str:
    return part.replace("%2F", "/").replace("%25", "%")
