"""``corral balance``'s composition root: connects etcd and HAProxy, owns the signals."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from corral.fleet.balance import Balancer, BalanceSettings
from corral.fleet.haproxy import RuntimeAPI
from corral.store.etcd import EtcdStore
from corral.store.factory import DriverSpec

__all__ = ["run_balance"]

log = logging.getLogger("corral.balance")


def run_balance(spec: DriverSpec, name: str, socket_path: str,
                settings: BalanceSettings) -> int:
    """Balance until SIGTERM or SIGINT; exit 0 (the registration revoked on the way out)."""
    return asyncio.run(_balance(spec, name, socket_path, settings))


async def _balance(spec: DriverSpec, name: str, socket_path: str,
                   settings: BalanceSettings) -> int:
    assert spec.addr, "an etcd spec names an address"
    etcd = EtcdStore.connect(spec.addr, **spec.etcd_options())
    balancer = Balancer(etcd, name, RuntimeAPI(socket_path), settings)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        task = asyncio.create_task(balancer.run(), name="corral balance")
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # a crash is reported, not swallowed
        task.cancel()
        stopping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await etcd.close()
    log.info("balancer stopped (the servers it added stay in HAProxy)")
    return 0
