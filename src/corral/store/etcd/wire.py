"""etcd's JSON gateway on the wire: the values Corral sends and reads, and their encoding.

Pure: no I/O. Keys and values travel base64-encoded, 64-bit integers as strings, and a
watch answers with one JSON object per line. A key range "every key under ``prefix``" is
``[prefix, prefix_end(prefix))``.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "JSON",
    "Compare",
    "KeyValue",
    "Op",
    "Range",
    "TxnResult",
    "WatchEvent",
    "WatchMessage",
    "b64",
    "key_range",
    "parse_range",
    "parse_txn",
    "parse_watch_message",
    "prefix_end",
    "revision_of",
    "unb64",
]

JSON = dict[str, Any]


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    lease: int = 0
    create_revision: int = 0

    @staticmethod
    def from_json(raw: JSON) -> KeyValue:
        return KeyValue(
            unb64(raw["key"]).decode(errors="replace"),
            unb64(raw.get("value", "")),
            int(raw.get("mod_revision", 0)),
            int(raw.get("lease", 0)),
            int(raw.get("create_revision", 0)),
        )


@dataclass(frozen=True)
class Range:
    kvs: tuple[KeyValue, ...]
    revision: int
    """The store's revision when this was read: watch from ``revision + 1``."""


@dataclass(frozen=True)
class WatchEvent:
    kind: Literal["PUT", "DELETE"]
    kv: KeyValue


@dataclass(frozen=True)
class Compare:
    """One guard of a transaction: ``key``'s ``target`` (``"MOD"``, ``"CREATE"``, ``"VALUE"``)
    ``result`` (``"EQUAL"``, ``"LESS"``, ...) ``value``. A missing key has revisions 0."""

    key: str
    target: Literal["MOD", "CREATE", "VERSION", "VALUE"]
    value: int | bytes
    result: Literal["EQUAL", "NOT_EQUAL", "GREATER", "LESS"] = "EQUAL"

    @staticmethod
    def unchanged(key: str, mod_revision: int) -> Compare:
        """``key`` is as last read (``mod_revision`` 0: it still does not exist)."""
        return Compare(key, "MOD", mod_revision)

    @staticmethod
    def absent(key: str) -> Compare:
        return Compare(key, "CREATE", 0)

    def to_json(self) -> JSON:
        field = {"MOD": "mod_revision", "CREATE": "create_revision", "VERSION": "version",
                 "VALUE": "value"}[self.target]
        value = b64(self.value) if isinstance(self.value, bytes) else str(self.value)
        return {"key": b64(self.key), "target": self.target, "result": self.result,
                field: value}


@dataclass(frozen=True)
class Op:
    """One operation of a transaction: a put, a delete, or a read."""

    kind: Literal["put", "delete", "range"]
    key: str
    value: bytes = b""
    lease: int = 0
    prefix: bool = False

    @staticmethod
    def put(key: str, value: bytes | str, lease: int = 0) -> Op:
        return Op("put", key, value.encode() if isinstance(value, str) else value, lease)

    @staticmethod
    def delete(key: str) -> Op:
        return Op("delete", key)

    @staticmethod
    def get(key: str, *, prefix: bool = False) -> Op:
        return Op("range", key, prefix=prefix)

    def to_json(self) -> JSON:
        body = key_range(self.key, self.prefix)
        if self.kind == "put":
            body["value"] = b64(self.value)
            if self.lease:
                body["lease"] = str(self.lease)
        name = {"put": "request_put", "delete": "request_delete_range",
                "range": "request_range"}[self.kind]
        return {name: body}


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    revision: int
    """The store's revision after the transaction (that of its writes, if it wrote)."""
    ranges: tuple[Range, ...]
    """What the transaction's reads returned, in order."""


@dataclass(frozen=True)
class WatchMessage:
    """One line of a watch stream: events, or why etcd ended the watch, or an error."""

    events: tuple[WatchEvent, ...] = ()
    canceled: str | None = None
    """Why etcd canceled the watch (compaction, an expired auth token), if it did."""
    error: str | None = None
    """The error the gateway sent instead of a result, if it did."""


def key_range(key: str, prefix: bool = False) -> JSON:
    """The ``key`` (and ``range_end``, for every key under ``key``) of a request."""
    body: JSON = {"key": b64(key)}
    if prefix:
        body["range_end"] = b64(prefix_end(key.encode()))
    return body


def parse_range(data: JSON) -> Range:
    kvs = tuple(KeyValue.from_json(kv) for kv in data.get("kvs", []))
    return Range(kvs, revision_of(data))


def parse_txn(data: JSON) -> TxnResult:
    ranges = tuple(parse_range(r["response_range"]) for r in data.get("responses", [])
                   if "response_range" in r)
    return TxnResult(bool(data.get("succeeded", False)), revision_of(data), ranges)


def parse_watch_message(line: str) -> WatchMessage:
    """ValueError or KeyError for a line that is not a watch message."""
    data = json.loads(line)
    if "error" in data:
        return WatchMessage(error=f"watch error: {data['error']}")
    result = data.get("result", {})
    if result.get("canceled"):
        reason = result.get("cancel_reason") or f"compacted at {result.get('compact_revision')}"
        return WatchMessage(canceled=reason)
    return WatchMessage(tuple(
        WatchEvent("DELETE" if ev.get("type") == "DELETE" else "PUT", KeyValue.from_json(ev["kv"]))
        for ev in result.get("events", [])
    ))


def revision_of(data: JSON) -> int:
    """The store's revision in an answer's header."""
    return int(data.get("header", {}).get("revision", 0))


def b64(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


def prefix_end(prefix: bytes) -> bytes:
    """The first key after every key that starts with ``prefix`` (etcd's range_end)."""
    for i in range(len(prefix) - 1, -1, -1):
        if prefix[i] < 0xFF:
            return prefix[:i] + bytes([prefix[i] + 1])
    return b"\0"
