"""What the HTTP servers (``flowrl serve reward|sampler``) share: the bearer-token check and the
warning for a server listening beyond the loopback without one."""

from __future__ import annotations

import base64
import hmac
import ipaddress
import logging
import sys

BEARER_HELP = ("missing or wrong bearer token: send the header 'Authorization: Bearer <token>' with the "
               "server's token (FLOWRL_API_TOKEN); a client that sends no headers of its own (Flow-Factory's "
               "remote reward) can put the token in the URL as the password: http://flowrl:<token>@host:port")

#: the ``WWW-Authenticate`` of a 401: both schemes :func:`bearer_ok` accepts (RFC 7235 allows a list)
CHALLENGE = {"WWW-Authenticate": 'Bearer, Basic realm="flowrl"'}


def bearer_ok(authorization: str | None, token: bytes | None) -> bool:
    """Whether an ``Authorization`` header carries ``token`` (constant-time compare): ``Bearer
    <token>``, or HTTP Basic with the token as the password (any user name), which is what clients
    send for a URL ``http://user:<token>@host`` (requests, httpx, aiohttp); any request passes when
    no token is configured."""
    if token is None:
        return True
    scheme, _, value = (authorization or "").partition(" ")
    if scheme.lower() == "basic":  # the password's bytes as UTF-8 (httpx) or Latin-1 (requests) would send them
        try:
            _, _, password = base64.b64decode(value.strip(), validate=True).partition(b":")
        except ValueError:
            return False
        try:
            latin = token.decode("utf-8").encode("latin-1")
        except (UnicodeDecodeError, UnicodeEncodeError):
            latin = token
        return hmac.compare_digest(password, token) | hmac.compare_digest(password, latin)
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
