"""The crawler's HTTP client: it connects only to addresses the SSRF guard has checked.

The crawler resolves a host and checks its addresses (``tasks.crawl_guard``) before the
first request to it, and records them; the client's network backend then opens a
connection to one of *those* addresses instead of resolving the name again. So a DNS
answer that changes in between (DNS rebinding) cannot point a request at a private
address, and a host the guard never checked gets no connection at all. TLS still
verifies the certificate against the host name in the URL.

Proxies from the environment (HTTP_PROXY, ...) are not used: the guard must know the
address each request goes to.
"""

from __future__ import annotations

import asyncio

import httpcore
import httpx

_BACKEND = httpcore.AnyIOBackend()


async def open_tcp_stream(address: str, port: int, **options) -> httpcore.AsyncNetworkStream:
    """Open a TCP connection to an IP ``address`` (the one place the crawler does; tests
    replace it to see every connection attempt)."""
    return await _BACKEND.connect_tcp(address, port, **options)


class PinnedBackend(httpcore.AsyncNetworkBackend):
    """Connects ``host:port`` to the addresses recorded for it in ``checked``, in order."""

    def __init__(self, checked: dict[tuple[str, int], list[str]]):
        self.checked = checked

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options=None) -> httpcore.AsyncNetworkStream:
        addresses = self.checked.get((host.lower(), port))
        if not addresses:
            raise httpcore.ConnectError(f"{host}:{port} was not checked by the SSRF guard")
        error: Exception | None = None
        for address in addresses:
            try:
                return await open_tcp_stream(address, port, timeout=timeout,
                                             local_address=local_address,
                                             socket_options=socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        raise error

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options=None) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("the crawler does not use unix sockets")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def pinned_client(checked: dict[tuple[str, int], list[str]], *, user_agent: str,
                  timeout: float, max_connections: int) -> httpx.AsyncClient:
    """An httpx client whose connections go only to the addresses in ``checked``
    (``(host, port) -> [address, ...]``, filled by the crawler as it checks hosts)."""
    limits = httpx.Limits(max_connections=max_connections)
    transport = httpx.AsyncHTTPTransport(limits=limits, trust_env=False)
    # httpx has no public way to give its transport a network backend; its pool is built
    # here the way httpx builds it, with the pinned backend added.
    if not isinstance(getattr(transport, "_pool", None), httpcore.AsyncConnectionPool):
        raise TypeError(f"httpx {httpx.__version__} keeps no httpcore connection pool in "
                        "AsyncHTTPTransport._pool; the crawler's SSRF pinning needs one")
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=httpx.create_ssl_context(),  # honours SSL_CERT_FILE/SSL_CERT_DIR
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=PinnedBackend(checked))
    return httpx.AsyncClient(headers={"User-Agent": user_agent},
                             timeout=httpx.Timeout(timeout), transport=transport,
                             trust_env=False)
