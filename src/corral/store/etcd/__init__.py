"""The etcd driver: shared configs and live instance registrations, over etcd's JSON gateway.

Theory of operation
-------------------
etcd (3.4+) serves its gRPC API as JSON at ``/v3/*``, so a thin httpx client is all we need
(``design/ETCD.md`` records the libraries tried). Keys and values travel base64-encoded,
64-bit integers as strings, and a watch answers with one JSON object per line.

The driver has four parts, each with the details in its own docstring:

- :mod:`.client` -- :class:`EtcdClient`, the KV, lease and watch calls, in layers:
  :mod:`.wire` (the values and their JSON), :mod:`.transport` (one HTTP call per etcd
  operation, with endpoint failover and auth; the one place transport and gateway errors
  become :class:`StoreUnavailable`), :mod:`.failures` and :mod:`.tls` (what they mean).
- :mod:`.codec` -- how a config is stored (readable JSON) and how names become key segments.
- :mod:`.store` -- :class:`EtcdStore`, configs at ``<prefix>/configs/<name>`` with a
  self-healing, level-triggered watch.
- :mod:`.registration` -- :class:`Registration`, ``<prefix>/instances/<name>/<id>`` kept
  alive under a lease.
"""

from __future__ import annotations

from corral.store.etcd.client import EtcdClient
from corral.store.etcd.codec import decode_config, encode_config
from corral.store.etcd.failures import AuthFailed, LeaseNotFound
from corral.store.etcd.registration import Registration
from corral.store.etcd.store import EtcdStore
from corral.store.etcd.tls import EtcdTLS
from corral.store.etcd.wire import KeyValue, Range, WatchEvent

__all__ = [
    "AuthFailed",
    "EtcdClient",
    "EtcdTLS",
    "EtcdStore",
    "KeyValue",
    "LeaseNotFound",
    "Range",
    "Registration",
    "WatchEvent",
    "decode_config",
    "encode_config",
]
