"""Worker addresses as the controller keys them, and who counts as a local client.

A worker URL is canonical once its scheme and host are lower case, an IPv4 address in any of the forms the C library
accepts (``127.1``, ``0x7f.0.0.1``, ``2130706433``) or an IPv4-mapped IPv6 address (``[::ffff:127.0.0.1]``) is
written as the plain dotted quad, the port is explicit and a trailing slash is dropped. URLs carrying user info, a
query or a fragment are refused: the controller appends endpoint paths to a worker's URL, and a ``?`` would hand
the registrant the whole path of the controller's requests. Names that differ but reach the same worker
(``localhost`` and ``127.0.0.1``) are told apart by the instance id the worker reports, not here.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from llava_med.errors import BadRequestError

__all__ = ["canonical_url", "is_loopback"]

_DEFAULT_PORTS = {"http": 80, "https": 443}


def _canonical_host(host: str) -> str:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        try:  # the C library's liberal IPv4 forms: 127.1, 0x7f.0.0.1, 017700000001, 2130706433
            address = ipaddress.IPv4Address(socket.inet_aton(host))
        except (OSError, ValueError):
            return host.lower().rstrip(".")
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return f"[{address.compressed}]"
    return str(address)


def canonical_url(url: str) -> str:
    """The canonical form of a worker's URL (see the module docstring); :class:`BadRequestError` naming the problem
    for anything that is not a plain ``http(s)://host[:port][/path]``."""
    text = url.strip()
    shown = text if len(text) <= 80 else text[:77] + "..."
    if any(c in text for c in "?#") or any(ord(c) < 0x21 for c in text):
        raise BadRequestError(f"a worker URL may not hold a query, a fragment or spaces: {shown!r}")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise BadRequestError(f"not a valid worker URL ({exc}): {shown!r}") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise BadRequestError(f"must be the worker's http(s) URL, e.g. http://localhost:21002; got {shown!r}")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise BadRequestError(f"a worker URL may not hold user info (user:password@): {shown!r}")
    host = _canonical_host(parts.hostname)
    path = parts.path.rstrip("/")
    return f"{scheme}://{host}:{port or _DEFAULT_PORTS[scheme]}{path}"


def is_loopback(host: str | None) -> bool:
    """Whether a client address is this machine's loopback (127.0.0.0/8, ::1, IPv4-mapped loopback)."""
    if not host:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host == "localhost"
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback
