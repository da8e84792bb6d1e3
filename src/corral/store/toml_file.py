"""The default store: one hand-editable TOML file, one table per config name.

Theory of operation
-------------------
Readers never lock. A save writes the whole file to a temp file in the same directory,
fsyncs it, ``os.replace``-s it over the old one and fsyncs the directory, so a reader (or a
writer killed at any moment) sees the old file or the new one, never a torn one; a killed
writer may leave a ``.<name>.*.tmp`` file behind, which nothing reads.

Writers read-modify-write under ``flock`` on a separate ``<file>.lock``, so two supervisors
saving different names never lose each other's update. The lock cannot live on the data
file itself: the rename swaps in a new inode, and the next writer would lock that one while
the first still holds the old. The lock is opened with ``O_CLOEXEC`` so that llama-server,
started while a save is in flight, never inherits it and blocks the next supervisor.

tomlkit keeps the comments and layout of a hand-edited file. A file that does not parse is
never overwritten: save raises :class:`StoreCorrupt` and leaves it for a human to fix.
Blocking file I/O runs in a worker thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import tomlkit
from tomlkit.exceptions import TOMLKitError
from tomlkit.items import Comment, KeyType, SingleKey, Table, Whitespace
from tomlkit.toml_document import TOMLDocument

from corral.core.args import ArgValue, LlamaConfig, normalise_value
from corral.errors import StoreCorrupt, StoreUnavailable
from corral.store.base import StoredConfig

__all__ = ["TomlFileStore"]


class TomlFileStore:
    def __init__(self, path: Path) -> None:
        self._path = Path(path)

    @property
    def description(self) -> str:
        return f"file {self._path}"

    async def load(self, name: str) -> StoredConfig | None:
        return await asyncio.to_thread(self._load_sync, name)

    async def save(self, name: str, stored: StoredConfig) -> None:
        await asyncio.to_thread(self._save_sync, name, stored)

    async def close(self) -> None:
        return None

    def _load_sync(self, name: str) -> StoredConfig | None:
        path = self._real_path()
        table = _read(path).unwrap().get(name)
        return None if table is None else _decode(path, name, table)

    def _save_sync(self, name: str, stored: StoredConfig) -> None:
        # Follow a symlinked config (dotfile managers) instead of replacing the link.
        path = self._real_path()
        try:
            if not path.parent.exists():  # (a file there is reported below as ENOTDIR)
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with _locked(path.with_name(path.name + ".lock")):
                doc = _read(path)
                _put(doc, name, stored)
                _replace(path, tomlkit.dumps(doc))
        except OSError as err:
            raise StoreUnavailable(_why(path, "write", err)) from err

    def _real_path(self) -> Path:
        return Path(os.path.realpath(self._path))


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _read(path: Path) -> TOMLDocument:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return tomlkit.document()
    except OSError as err:
        raise StoreUnavailable(_why(path, "read", err)) from err
    except UnicodeDecodeError as err:
        raise StoreCorrupt(f"config store {path} is not UTF-8 text (byte {err.start})") from err
    try:
        return tomlkit.parse(text)
    except TOMLKitError as err:
        raise StoreCorrupt(f"config store {path} is not valid TOML: {err}") from err


def _replace(path: Path, text: str) -> None:
    """Atomically make ``path`` hold ``text``, durable once this returns."""
    try:
        mode = os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        mode = 0o600
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), mode)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)  # makes the rename itself durable
    finally:
        os.close(dir_fd)


def _why(path: Path, action: str, err: OSError) -> str:
    reason = err.strerror or str(err)
    culprit = f" ({err.filename})" if err.filename and str(err.filename) != str(path) else ""
    return f"cannot {action} config store {path}: {reason}{culprit}"


def _put(doc: TOMLDocument, name: str, stored: StoredConfig) -> None:
    """Update a well-shaped table in place, so a hand-edited one keeps its comments."""
    old = doc.get(name)
    if isinstance(old, Table) and not old.is_super_table() and _has_args_table(old):
        _fill(old, stored)
    else:  # new, or an odd shape (inline args, out-of-order tables): rewrite it
        new = tomlkit.table()
        _fill(new, stored)
        doc[name] = new


def _has_args_table(table: Table) -> bool:
    return isinstance(table.get("args", tomlkit.table()), Table)


def _fill(table: Table, stored: StoredConfig) -> None:
    # Comments after a table's last key introduce whatever follows: keep them last.
    tail = _pop_tail(table)
    table["binary"] = stored.config.binary
    table["applied_at"] = stored.applied_at
    table["applied_by"] = stored.applied_by
    if "args" not in table:
        table["args"] = tomlkit.table()
    args = table["args"]
    wanted = dict(stored.config.args)
    kept = [flag for flag in args if flag in wanted]
    in_order = kept == list(wanted)[: len(kept)]
    for flag in [flag for flag in args if not in_order or flag not in wanted]:
        del args[flag]
    for flag, value in wanted.items():
        if flag in args:
            args[flag] = value  # keeps the comment at the end of the line
        else:
            args.add(SingleKey(flag, KeyType.Basic), value)  # "--model", quoted like the docs
    _fill_env(table, dict(stored.config.env))
    for item in tail:
        _last_table(table).add(item)


def _fill_env(table: Table, wanted: dict[str, str]) -> None:
    """llama-server's own environment variables: an ``[name.env]`` table, only when set."""
    if not wanted:
        if "env" in table:
            del table["env"]
        return
    if not isinstance(table.get("env"), Table):
        if "env" in table:
            del table["env"]
        table["env"] = tomlkit.table()
    env = table["env"]
    for name in [n for n in env if n not in wanted]:
        del env[name]
    for name, value in wanted.items():
        env[name] = value


def _last_table(table: Table) -> Table:
    """The table whose body is rendered last: ``[gpt.args]`` when it ends ``[gpt]``."""
    body = table.value.body
    return _last_table(body[-1][1]) if body and isinstance(body[-1][1], Table) else table


def _pop_tail(table: Table) -> list[Comment | Whitespace]:
    body = _last_table(table).value.body
    tail: list[Comment | Whitespace] = []
    while body and isinstance(item := body[-1][1], Comment | Whitespace):
        body.pop()
        tail.insert(0, item)
    return tail


def _decode(path: Path, name: str, table: object) -> StoredConfig:
    where = f"config store {path}, table {name!r}"
    if not isinstance(table, Mapping):
        raise StoreCorrupt(f"{where}: expected a table, found {type(table).__name__}")
    binary = table.get("binary")
    if not isinstance(binary, str) or not binary:
        raise StoreCorrupt(f"{where}: 'binary' must be a non-empty string")
    args = table.get("args", {})
    if not isinstance(args, Mapping):
        raise StoreCorrupt(f"{where}: 'args' must be a table")
    env = table.get("env", {})
    if not isinstance(env, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise StoreCorrupt(f"{where}: 'env' must be a table of strings")
    config = LlamaConfig(binary, tuple(_decode_args(where, args)), tuple(env.items()))
    stamps = (_text(where, table, "applied_at"), _text(where, table, "applied_by"))
    return StoredConfig(config, *stamps)


def _decode_args(where: str, args: Mapping[str, object]) -> Iterator[tuple[str, ArgValue]]:
    """Strings stay strings, numbers become strings, true is a bare flag, false is absent."""
    for flag, raw in args.items():
        if isinstance(raw, str):
            yield flag, raw
        elif isinstance(raw, bool | int | float):
            value = normalise_value(flag, raw, None)
            if value is not None:
                yield flag, value
        else:
            raise StoreCorrupt(f"{where}: {flag!r} must be a string, number or boolean")


def _text(where: str, table: Mapping[str, object], key: str) -> str:
    value = table.get(key, "")
    if isinstance(value, dt.date):  # a hand-written bare TOML datetime
        return value.isoformat()
    if not isinstance(value, str):
        raise StoreCorrupt(f"{where}: {key!r} must be a string")
    return value
