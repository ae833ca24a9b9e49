"""What the HTTP servers (``flowrl serve reward|sampler``) share: the bearer-token check and the
warning for a server listening beyond the loopback without one."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import sys

BEARER_HELP = ("missing or wrong bearer token: send the header 'Authorization: Bearer <token>' with the "
               "server's token (FLOWRL_API_TOKEN)")


def bearer_ok(authorization: str | None, token: bytes | None) -> bool:
    """Whether an ``Authorization`` header carries ``token`` (constant-time compare); any request
    passes when no token is configured."""
    if token is None:
        return True
    scheme, _, value = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (a host name counts as reachable)."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_if_open(prog: str, host: str, port: int, token, what: str) -> None:
    """Warn on stderr when ``prog`` listens beyond the loopback without a token (``what`` says what
    anyone could then do)."""
    if token is None and not is_loopback(host):
        print(f"{prog}: warning: listening on {host}:{port} without a bearer token; anyone who can reach it "
              f"can {what}. Fix: set FLOWRL_API_TOKEN (clients send 'Authorization: Bearer <token>'), or "
              f"listen on 127.0.0.1 behind a proxy.", file=sys.stderr)


def serve(prog: str, app, settings, what: str) -> int:
    """Run ``app`` under uvicorn on ``settings.host:port`` at ``settings.log_level`` until
    interrupted (after :func:`warn_if_open`); returns the exit status."""
    import uvicorn

    warn_if_open(prog, settings.host, settings.port, settings.token, what)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                timeout_graceful_shutdown=10)
    return 0
