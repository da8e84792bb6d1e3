"""Choosing a config store from the command line (``--config-driver`` and friends)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import platformdirs

from corral.errors import UsageError
from corral.store.base import ConfigStore

DEFAULT_NAME = "default"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def default_config_path() -> Path:
    return Path(platformdirs.user_config_dir("corral")) / "config.toml"


@dataclass(frozen=True)
class DriverSpec:
    type: str
    name: str
    path: Path | None = None
    addr: str | None = None


def driver_spec(config_driver: str | None, config_file: str | None, etcd: str | None,
                name: str | None) -> DriverSpec:
    """One driver from the flags; two at once is a usage error."""
    given = [f for f, v in (("--config-driver", config_driver), ("--config-file", config_file),
                            ("--etcd", etcd)) if v]
    if len(given) > 1:
        raise UsageError(f"choose one config driver, not {' and '.join(given)}")
    if config_driver:
        return _from_json(config_driver, name)
    if etcd:
        return DriverSpec("etcd", _check_name(name or DEFAULT_NAME), addr=etcd)
    path = Path(config_file).expanduser() if config_file else default_config_path()
    return DriverSpec("file", _check_name(name or DEFAULT_NAME), path=path)


def _from_json(text: str, name_flag: str | None) -> DriverSpec:
    try:
        raw: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--config-driver is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise UsageError("--config-driver must be a JSON object, e.g. "
                         '\'{"type": "file", "path": "/etc/corral/config.toml", "name": "gpt"}\'')
    kind = raw.get("type")
    name = raw.get("name", name_flag or DEFAULT_NAME)
    if not isinstance(name, str):
        raise UsageError("--config-driver: name must be a string")
    if name_flag and name_flag != name:
        raise UsageError(f"--name {name_flag!r} contradicts --config-driver name {name!r}")
    allowed = {"file": {"type", "path", "name"}, "etcd": {"type", "addr", "name"},
               "memory": {"type", "name"}}
    if kind not in allowed:
        raise UsageError(f"--config-driver type must be one of {sorted(allowed)}, got {kind!r}")
    extra = set(raw) - allowed[kind]
    if extra:
        raise UsageError(f"--config-driver: unknown key(s) for type {kind}: {sorted(extra)}")
    if kind == "file":
        path = raw.get("path")
        if path is not None and not isinstance(path, str):
            raise UsageError("--config-driver: path must be a string")
        return DriverSpec("file", _check_name(name),
                          path=Path(path).expanduser() if path else default_config_path())
    if kind == "etcd":
        addr = raw.get("addr")
        if not isinstance(addr, str) or not addr:
            raise UsageError('--config-driver: etcd needs "addr": "host:port[,host:port]"')
        return DriverSpec("etcd", _check_name(name), addr=addr)
    return DriverSpec("memory", _check_name(name))


def _check_name(name: str) -> str:
    if not _NAME.match(name):
        raise UsageError(f"config name {name!r} must be 1-100 letters, digits, '.', '_' or '-'")
    return name


def open_store(spec: DriverSpec) -> ConfigStore:
    if spec.type == "memory":
        from corral.store.memory import MemoryStore

        return MemoryStore()
    if spec.type == "etcd":
        try:
            from corral.store.etcd import EtcdStore
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise UsageError(f"the etcd driver needs: pip install 'corral[etcd]' ({exc})") from None
        assert spec.addr is not None
        return EtcdStore(spec.addr)
    from corral.store.toml_file import TomlFileStore

    assert spec.path is not None
    return TomlFileStore(spec.path)
