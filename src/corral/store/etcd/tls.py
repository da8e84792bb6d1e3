"""TLS to etcd: the settings, and what a failed handshake means in words.

A handshake failure is an error of its own, never a timeout: a server certificate that does
not verify, a server that wants a client certificate, a client certificate it does not
trust. A server that refuses our client certificate alerts after the TLS 1.3 handshake, so
the request often fails first with a bare broken pipe: :func:`tls_alert` opens a bare TLS
connection and reads what the server says.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass

import httpx

from corral.errors import UsageError

__all__ = ["EtcdTLS", "ssl_cause", "tls_alert", "tls_failure"]


@dataclass(frozen=True)
class EtcdTLS:
    """TLS to etcd: ``cacert`` verifies the server (None: the system's CAs), ``cert`` and
    ``key`` are the client certificate (``key`` may be omitted if ``cert`` holds it)."""

    cacert: str | None = None
    cert: str | None = None
    key: str | None = None

    def context(self) -> ssl.SSLContext:
        """The SSL context; UsageError naming the file that cannot be used."""
        if self.key and not self.cert:
            raise UsageError(f"etcd TLS: a client key ({self.key}) needs its certificate (cert)")
        try:
            ctx = ssl.create_default_context(cafile=self.cacert)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"etcd TLS: cannot use CA file {self.cacert}: {exc}") from None
        if self.cert:
            try:
                ctx.load_cert_chain(self.cert, self.key)
            except (OSError, ssl.SSLError) as exc:
                raise UsageError(f"etcd TLS: cannot use client certificate {self.cert}"
                                 f"{f' with key {self.key}' if self.key else ''}: {exc}") from None
        return ctx


def ssl_cause(exc: BaseException) -> ssl.SSLError | None:
    """The TLS error behind ``exc``, if one is among its causes."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, ssl.SSLError):
        cause = cause.__cause__ or cause.__context__
    return cause


def tls_failure(cause: ssl.SSLError, tls: EtcdTLS | None) -> str:
    """Why a handshake failed, naming the certificate to fix."""
    if isinstance(cause, ssl.SSLCertVerificationError):
        against = f"CA {tls.cacert}" if tls and tls.cacert else "the system's CAs"
        return (f"the server's certificate could not be verified against {against}: "
                f"{cause.verify_message or cause.reason}")
    reason = str(getattr(cause, "reason", None) or cause)  # set only by the ssl module
    if "BAD_CERTIFICATE" in reason or "CERTIFICATE_REQUIRED" in reason:
        if not (tls and tls.cert):
            return ("the server requires a client certificate and none was given "
                    f"(set cert and key): {reason}")
        return f"the server rejected the client certificate {tls.cert}: {reason}"
    if "UNKNOWN_CA" in reason:
        return (f"the server does not trust the client certificate "
                f"{tls.cert if tls else ''}: {reason}")
    return f"TLS handshake failed: {reason}"


async def tls_alert(url: str, context: ssl.SSLContext | None,
                    timeout: float) -> ssl.SSLError | None:
    """The TLS alert ``url`` sends right after a handshake, if any."""
    target = httpx.URL(url)
    host, port = target.host, target.port or 443
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                host, port, ssl=context or ssl.create_default_context(),
                server_hostname=host)
            try:
                await reader.read(1)
            finally:
                writer.close()
    except ssl.SSLError as alert:
        return alert
    except (OSError, TimeoutError):
        pass
    return None
