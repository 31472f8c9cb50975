"""Who may use ``lit-route serve``: clients sending the server's token, which it requires whenever it listens
beyond the loopback interface (anyone reaching the port could otherwise spend the judge budget, or send samples
of a trainer's prompt and join its groups).

The token is read from an environment variable (``LIT_ROUTE_SERVE_TOKEN`` unless ``auth_token_env`` names
another). A client sends it as ``Authorization: Bearer <token>``, or as the password of HTTP Basic authentication:
what ``aiohttp`` (OpenRLHF 0.9.1+) and ``requests`` (earlier) send for a URL with credentials,
``http://lit-route:<token>@host:5000/get_reward``, since OpenRLHF's reward client sets no headers of its own.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import os
import re
from collections.abc import Mapping

DEFAULT_TOKEN_ENV = "LIT_ROUTE_SERVE_TOKEN"
# characters that stand as they are in a URL's password, and enough of them that guessing is hopeless
_TOKEN = re.compile(r"[A-Za-z0-9._~-]{16,}")


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (only this machine can connect)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name (resolved by the OS, possibly to an outside interface) or "" (every interface)
        return False


def server_token(host: str, env_name: str = DEFAULT_TOKEN_ENV, environ: Mapping[str, str] = os.environ) -> str | None:
    """The token clients must send: the value of ``$env_name``, or ``None`` when it is unset on a loopback host.

    Raises:
        ValueError: one line, when the token is unfit for a URL or too short, or when ``host`` is not loopback and
            no token is set.
    """
    token = environ.get(env_name) or None
    if token is not None and not _TOKEN.fullmatch(token):
        raise ValueError(f"auth_token_env: ${env_name} must be 16 or more of the characters A-Z a-z 0-9 . _ ~ - "
                         f"(clients may send it in a URL); e.g. export {env_name}=$(openssl rand -hex 32)")
    if token is None and not is_loopback(host):
        raise ValueError(f"host: {host or 'every interface'} can be reached from other machines and ${env_name} is "
                         f"not set: export {env_name}=$(openssl rand -hex 32) so that only clients sending it are "
                         f"served, or listen on 127.0.0.1")
    return token


def authorized(authorization: str | None, token: str | None) -> bool:
    """Whether an ``Authorization`` header carries ``token`` (as a bearer token, or as the Basic password; the
    user name is not read). Always ``True`` without a token."""
    if token is None:
        return True
    scheme, _, credentials = (authorization or "").strip().partition(" ")
    presented = credentials.strip()
    if scheme.lower() == "basic":
        try:
            presented = base64.b64decode(presented, validate=True).decode("utf-8").partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return False
    elif scheme.lower() != "bearer":
        return False
    # compare_digest takes as long for any wrong token: its time says nothing of how much of it was right
    return hmac.compare_digest(presented.encode("utf-8", "surrogateescape"), token.encode("utf-8"))
