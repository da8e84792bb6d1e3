"""Choosing a config store from the command line (``--config-driver`` and friends).

The etcd driver's JSON takes, besides ``addr`` and ``name``, TLS and auth settings::

    {"type": "etcd", "addr": "h1:2379,h2:2379", "name": "gpt",
     "cacert": "/etc/corral/etcd-ca.pem", "cert": "/etc/corral/client.pem",
     "key": "/etc/corral/client.key", "user": "corral", "password": "..."}

``cacert``/``cert`` make endpoints without a scheme ``https://``. The password is better
left out of the command line (``ps`` shows it): without ``"password"``, a ``user``'s
password is read from the environment variable ``CORRAL_ETCD_PASSWORD``. Command-line flags
(``--etcd-cacert`` ...) are merged in with :meth:`DriverSpec.with_tls`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import platformdirs

from corral.errors import UsageError
from corral.store.base import ConfigStore

if TYPE_CHECKING:
    from corral.store.etcd.tls import EtcdTLS

DEFAULT_NAME = "default"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def default_config_path() -> Path:
    return Path(platformdirs.user_config_dir("corral")) / "config.toml"


_ETCD_SETTINGS = ("cacert", "cert", "key", "user", "password")


class EtcdOptions(TypedDict):
    """Keyword arguments of EtcdStore/EtcdClient for TLS and auth."""

    tls: EtcdTLS | None
    user: str | None
    password: str | None


@dataclass(frozen=True)
class DriverSpec:
    type: str
    name: str
    path: Path | None = None
    addr: str | None = None
    cacert: str | None = None
    """etcd: CA certificate (PEM) that verifies the servers; implies https."""
    cert: str | None = None
    """etcd: client certificate (PEM) for ``--client-cert-auth``; implies https."""
    key: str | None = None
    """etcd: the client certificate's private key (if not in ``cert``)."""
    user: str | None = None
    """etcd: user for etcd's auth; password from ``password`` or $CORRAL_ETCD_PASSWORD."""
    password: str | None = field(default=None, repr=False)

    def with_tls(self, *, cacert: str | None = None, cert: str | None = None,
                 key: str | None = None, user: str | None = None,
                 password: str | None = None) -> DriverSpec:
        """This spec with the command line's etcd settings merged in.

        For ``--etcd-cacert``, ``--etcd-cert``, ``--etcd-key`` and ``--etcd-user``: pass
        each flag's value (None when not given). A flag fills what the JSON left out; a flag
        that contradicts the JSON is a UsageError; any of them with a driver other than etcd
        too. Paths are expanded (``~``) and made absolute.
        """
        flags = {"cacert": cacert, "cert": cert, "key": key, "user": user, "password": password}
        given = {k: v if k in ("user", "password") else _path(v)
                 for k, v in flags.items() if v is not None}
        if not given:
            return self
        if self.type != "etcd":
            names = ", ".join(f"--etcd-{k}" for k in given)
            raise UsageError(f"{names} only apply to the etcd config driver, not {self.type}")
        for setting, value in given.items():
            mine = getattr(self, setting)
            if mine is not None and mine != value:
                shown = "(hidden)" if setting == "password" else repr(mine)
                raise UsageError(f"--etcd-{setting} contradicts --config-driver "
                                 f"{setting} {shown}")
        return replace(self, cacert=given.get("cacert", self.cacert),
                       cert=given.get("cert", self.cert), key=given.get("key", self.key),
                       user=given.get("user", self.user),
                       password=given.get("password", self.password))

    @property
    def tls(self) -> EtcdTLS | None:
        """The etcd TLS settings, or None for plain http."""
        if not (self.cacert or self.cert or self.key):
            return None
        from corral.store.etcd.tls import EtcdTLS

        return EtcdTLS(self.cacert, self.cert, self.key)

    def etcd_options(self) -> EtcdOptions:
        """``EtcdStore.connect(spec.addr, **spec.etcd_options())``: TLS and auth as configured."""
        return EtcdOptions(tls=self.tls, user=self.user, password=self.password)


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
    allowed = {"file": {"type", "path", "name"},
               "etcd": {"type", "addr", "name", *_ETCD_SETTINGS},
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
        settings: dict[str, str] = {}
        for setting in _ETCD_SETTINGS:
            value = raw.get(setting)
            if value is None:
                continue
            if not isinstance(value, str) or not value:
                raise UsageError(f"--config-driver: etcd {setting} must be a non-empty string")
            settings[setting] = value if setting in ("user", "password") else _path(value)
        return DriverSpec("etcd", _check_name(name), addr=addr, cacert=settings.get("cacert"),
                          cert=settings.get("cert"), key=settings.get("key"),
                          user=settings.get("user"), password=settings.get("password"))
    return DriverSpec("memory", _check_name(name))


def _path(value: str) -> str:
    return str(Path(value).expanduser().absolute())


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
        return EtcdStore.connect(spec.addr, **spec.etcd_options())
    from corral.store.toml_file import TomlFileStore

    assert spec.path is not None
    return TomlFileStore(spec.path)
