"""How the management API and the front door meet the network: TLS, tokens, warnings.

Built once at start from the command line (:class:`~corral.supervisor.settings.Security`);
the tokens are re-read on ``SIGHUP`` by the composition root.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from pathlib import Path

from corral.api.security import Tokens, TokenSource
from corral.defaults import TOKEN_ENV
from corral.errors import UsageError
from corral.supervisor.settings import Security

log = logging.getLogger("corral")


def tokens_from(api_token: str | None, security: Security) -> Tokens:
    """The full and read-only tokens, from the command line, the environment or files."""
    if api_token and security.api_token_file:
        raise UsageError("give --api-token (or $CORRAL_API_TOKEN) or --api-token-file, "
                         "not both")
    if security.read_token and security.read_token_file:
        raise UsageError("give --read-token or --read-token-file, not both")
    full = TokenSource(api_token, Path(security.api_token_file)
                       if security.api_token_file else None)
    read = TokenSource(security.read_token, Path(security.read_token_file)
                       if security.read_token_file else None)
    tokens = Tokens(full, read)
    if tokens.read is not None and tokens.full is None:
        raise UsageError("--read-token needs a full token too (--api-token or "
                         "--api-token-file): otherwise nothing could change the config")
    return tokens


def server_tls(security: Security, what: str) -> ssl.SSLContext | None:
    """A server TLS context from ``--tls-cert``/``--tls-key``, or None without them."""
    if not security.tls_cert and not security.tls_key:
        return None
    if not (security.tls_cert and security.tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(security.tls_cert, security.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot load --tls-cert/--tls-key for {what}: {exc}") from None
    return context


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_api_exposure(host: str, token: str | None) -> None:
    """The management API can start programs: off loopback it needs a token."""
    if not is_loopback(host) and not token:
        raise UsageError(
            f"refusing to serve the management API on {host} without a token: it can start "
            f"programs. Set --api-token or {TOKEN_ENV}, or bind to 127.0.0.1")


def warn_if_clear_text(host: str, tokens: Tokens, tls: bool) -> None:
    """A token sent over a network in clear can be read by anyone on the way: say so."""
    if tokens.required and not tls and not is_loopback(host):
        log.warning("!!! the management API on %s takes its token WITHOUT TLS: anyone on the "
                    "network path can read the token and then change what runs. Give "
                    "--tls-cert/--tls-key, or bind to 127.0.0.1 behind a TLS proxy. !!!", host)
