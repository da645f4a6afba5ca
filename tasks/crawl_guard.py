"""The SSRF guard: which hosts the crawler may connect to.

A crawler follows links that strangers wrote, so a page (or a redirect) can point it at
``http://169.254.169.254/`` (a cloud's metadata service), ``http://localhost:6379/`` or a
printer on the office network. Before any connection, the crawler resolves the host and
refuses it when one of its addresses is not a public one: private, loopback, link-local,
IPv6 site-local, shared (carrier NAT), multicast, reserved or unspecified (IPv4 addresses
inside IPv6 ones are judged as IPv4). The HTTP client then connects only to the addresses
checked here (``tasks.crawl_http``), so a DNS answer that changes between the check and
the connection cannot slip a private address in.

``crawl.allowed_private_hosts`` lifts the refusal: a host name (``localhost``,
``intranet.example``) allows that name as written in URLs, whatever it resolves to; an
address or a CIDR network (``10.0.0.5``, ``10.0.0.0/8``, ``::1``) allows every host that
resolves into it. Any entry may end with ``:port`` (``127.0.0.1:8080``, ``[::1]:8080``)
to allow that port only.

Standard library only: the config imports this module to check those entries.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# (host, port) -> the addresses a connection to it may use. Replaceable in tests, so that
# made-up names can map to private addresses without any DNS query.
Resolver = Callable[[str, int], list[str]]
_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?")
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT (RFC 6598)


@dataclass(frozen=True)
class Allowance:
    """One entry of ``crawl.allowed_private_hosts``: a host name or a network, and a port
    (None: any)."""

    name: str | None
    network: IPNetwork | None
    port: int | None


def parse_allowance(entry: str) -> Allowance:
    """``entry`` as an Allowance; ValueError saying what a valid entry looks like."""
    text = entry.strip().lower()
    host, port = text, None
    bracketed = re.fullmatch(r"\[([0-9a-f:.]+)\](?::(\d+))?", text)
    if bracketed:
        host, port = bracketed.group(1), bracketed.group(2)
    elif text.count(":") == 1:  # name:port or IPv4:port (a bare IPv6 address has several)
        host, port = text.split(":")
    if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"{entry!r} has an invalid port; write host:port with a port "
                         "between 1 and 65535")
    try:
        network = ipaddress.ip_network(host, strict=False)
    except ValueError:
        network = None
    if network is not None:
        if "/" in host and port is not None:
            raise ValueError(f"{entry!r}: a CIDR network cannot have a port")
        return Allowance(None, network, int(port) if port else None)
    if not _NAME.fullmatch(host):
        raise ValueError(f"{entry!r} is not a host name, IP address or CIDR network "
                         "(examples: 'intranet.example', '10.0.0.5', '10.0.0.0/8', "
                         "'localhost:8080', '[::1]:8080')")
    return Allowance(host.rstrip("."), None, int(port) if port else None)


def address_problem(address: IPAddress) -> str | None:
    """Why a connection to ``address`` is refused by default ('loopback', 'private', ...),
    or None for a public address."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or \
            (address.teredo[1] if address.teredo else None)
        if embedded is not None:
            return address_problem(embedded)
    for problem in ("loopback", "link_local", "multicast", "unspecified", "reserved"):
        if getattr(address, f"is_{problem}"):
            return problem.replace("_", "-")
    if isinstance(address, ipaddress.IPv4Address) and address in _SHARED:
        return "shared (carrier NAT)"
    # fec0::/10: deprecated (RFC 3879) but still routed inside some networks, and neither
    # private nor reserved to the standard library
    if isinstance(address, ipaddress.IPv6Address) and address.is_site_local:
        return "site-local"
    if address.is_private:
        return "private"
    if not address.is_global:
        return "non-global"
    return None


class AddressPolicy:
    """Decides, from ``crawl.allowed_private_hosts``, whether a host may be fetched."""

    def __init__(self, allowed: Iterable[str] = ()):
        self.allowances = [parse_allowance(entry) for entry in allowed]

    def allows_name(self, host: str, port: int) -> bool:
        """Whether ``host`` is allowed by name (its addresses are then not checked)."""
        host = host.lower().rstrip(".")
        return any(a.name == host and a.port in (None, port) for a in self.allowances)

    def refusal(self, host: str, port: int, addresses: Iterable[str]) -> tuple[str, str] | None:
        """``(reason, detail)`` when a connection to ``host:port`` at these ``addresses``
        is refused, else None. Every address must pass: the client may use any of them."""
        if self.allows_name(host, port):
            return None
        for text in addresses:
            address = ipaddress.ip_address(text.split("%")[0])  # drop an IPv6 zone (fe80::1%eth0)
            problem = address_problem(address)
            if problem and not any(a.network is not None and address in a.network
                                   and a.port in (None, port) for a in self.allowances):
                shown = f"{host} is" if host == text else f"{host} resolves to {text}, which is"
                detail = (f"{shown} a {problem} address; add it to "
                          "crawl.allowed_private_hosts to crawl it")
                return f"{problem.split(' ')[0]} address", detail
        return None


def ip_literal(host: str) -> str | None:
    """``host`` when it is an IP address (IPv6 without brackets), else None."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


def resolve_host(host: str, port: int) -> list[str]:
    """The addresses of ``host`` (the system resolver, as a connection would use). Raises
    OSError (socket.gaierror) when the name does not resolve."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))
