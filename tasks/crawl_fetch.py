"""Fetching one URL safely and politely: the SSRF guard, robots.txt, per-host limits,
retries, size caps and the WARC archive of every response.

``Fetcher`` is the part of the crawler that knows hosts, not pages: ``tasks.crawl``'s
``Crawler`` builds the frontier on top of it. Before the first request to a host its
name is resolved (by the injectable ``resolver``; a failed lookup is retried as a request
is, and tried again for a later URL once ``DNS_FAILURE_SECONDS`` old) and checked by
``crawl_guard``; the addresses that pass are the only ones ``crawl_http`` connects to.
Then its robots.txt is fetched once (following up to five redirects, each checked the
same way) and parsed as RFC 9309 says, with protego.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING
from urllib.parse import urljoin, urlsplit

from tasks import crawl_guard
from tasks.crawl_config import CrawlConfig
from tasks.crawl_guard import AddressPolicy, Resolver, ip_literal
from tasks.crawl_urls import canonical_url, host_port, origin
from tasks.redact import redact_url

if TYPE_CHECKING:  # imported where requests are made: loading a config needs none of them
    import httpx
    from protego import Protego

    from tasks.crawl_archive import WarcArchive

log = logging.getLogger("tasks.crawl")  # one logger for the whole crawl stage

# Media types kept, and whether their links are followed.
TEXT_TYPES = {"text/html": True, "application/xhtml+xml": True, "text/plain": False}
RETRY_STATUSES = {408, 429, 500, 502, 503, 504}
REDIRECT_STATUSES = {301, 302, 303, 307, 308}
MAX_REDIRECTS = 5
ROBOTS_MAX_BYTES = 512_000  # what Google reads of a robots.txt (RFC 9309 asks >= 500 KiB)
ARCHIVES = ("crawl", "crawldiagnostics")  # stored pages; every other response
# A host whose lookup failed (after its retries) fails at once for this long; then the
# next URL of that host looks it up again, so an outage does not lose it for the crawl.
DNS_FAILURE_SECONDS = 60.0


def media_type(content_type: str) -> str:
    return content_type.split(";")[0].strip().lower()


class Skipped(Exception):
    """A URL that gives no page: ``stat`` names the counter it adds to, ``reason`` is a
    short fixed phrase (counted by reason), ``detail`` the particulars."""

    def __init__(self, stat: str, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.stat, self.reason, self.detail = stat, reason, detail or reason


@dataclass
class Response:
    url: str
    status: int
    headers: httpx.Headers
    body: bytes = b""
    truncated: str = "unspecified"  # '' once the whole body is read; 'length' when cut
    fetched_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    exchange: dict = field(default_factory=dict)  # request line and raw headers, to archive


@dataclass
class Host:
    """Politeness state of one scheme://host:port."""

    slots: asyncio.Semaphore  # per_host_concurrency
    delay: float  # between request starts: delay_seconds or a larger robots.txt Crawl-delay
    next_start: float = 0.0  # monotonic time before which no request may start
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    robots: asyncio.Task | None = None  # -> (rules or None, why everything is refused or "")


class Fetcher:
    """Fetches URLs for a crawl: one ``Host`` state per origin, one SSRF check per
    host:port, and every response archived (``archives``: ``ARCHIVES`` names to
    ``WarcArchive``). ``stats`` counts requests, responses by status, bytes and retries."""

    def __init__(self, config: CrawlConfig, archives: dict[str, WarcArchive] | None = None,
                 stored_url: Callable[[str], str] = str, resolver: Resolver | None = None,
                 allowed_hosts: list[str] = ()):
        self.config, self.archives = config, archives or {}
        self.stored_url = lambda url: redact_url(stored_url(url))
        self.canonical = functools.partial(canonical_url, strip_params=config.strip_query_params,
                                           sort_query=config.sort_query)
        self.policy = AddressPolicy([*config.allowed_private_hosts, *allowed_hosts])
        # looked up at each call, so a test may replace crawl_guard.resolve_host
        self.resolver = resolver or (lambda host, port: crawl_guard.resolve_host(host, port))
        self.agent = config.user_agent.split("/")[0].strip().lower()
        self.stats: Counter[str] = Counter()
        self.hosts: dict[str, Host] = {}
        self.address_checks: dict[tuple[str, int], asyncio.Task] = {}
        self.failed_lookups: dict[tuple[str, int], float] = {}  # -> when (time.monotonic())
        self.checked: dict[tuple[str, int], list[str]] = {}  # what crawl_http connects to
        self.client: httpx.AsyncClient | None = None  # set while the crawl runs

    def _redirect_target(self, location: str, url: str) -> str:
        """The canonical URL a redirect points to; Skipped when it is not one to follow."""
        target = self.canonical(location, url)
        if target is None:
            try:
                scheme = urlsplit(urljoin(url, location.strip())).scheme.lower()
            except ValueError:
                scheme = ""
            if scheme and scheme not in ("http", "https"):
                raise Skipped("ssrf_refused", "non-http redirect",
                              f"redirect to a {scheme!r} URL; only http and https are fetched")
            raise Skipped("pages_failed", "invalid redirect", f"redirect to {location[:200]!r}")
        return target

    def _host(self, origin_url: str) -> Host:
        host = self.hosts.get(origin_url)
        if host is None:
            host = self.hosts[origin_url] = Host(
                asyncio.Semaphore(self.config.per_host_concurrency), self.config.delay_seconds)
        return host

    async def _allowed_host(self, url: str) -> Host:
        """The host's politeness state, once the SSRF guard and its robots.txt allow
        ``url``."""
        await self._check_address(url)
        origin_url = origin(url)
        host = self._host(origin_url)
        if not self.config.respect_robots:
            return host
        if host.robots is None:  # one fetch per host, awaited by every worker that needs it
            host.robots = asyncio.create_task(self._load_robots(origin_url, host))
        rules, refusal = await host.robots
        if refusal:
            raise Skipped("robots_disallowed", refusal)
        if rules and not rules.can_fetch(url, self.agent):
            raise Skipped("robots_disallowed", "disallowed by robots.txt")
        return host

    async def _check_address(self, url: str) -> None:
        """Skipped unless the SSRF guard allows ``url``'s host; resolved once per host,
        or again once a failed lookup is ``DNS_FAILURE_SECONDS`` old."""
        key = host_port(url)
        check = self.address_checks.get(key)
        failed_at = self.failed_lookups.get(key)
        if check is None or (failed_at is not None
                             and time.monotonic() - failed_at >= DNS_FAILURE_SECONDS):
            self.failed_lookups.pop(key, None)
            check = self.address_checks[key] = asyncio.create_task(self._resolve_and_check(*key))
        refusal = await check
        if refusal:
            raise Skipped(*refusal)

    async def _resolve_and_check(self, host: str, port: int) -> tuple[str, str, str] | None:
        """None when ``host:port`` may be fetched (its addresses are then recorded for the
        client), else ``(stat, reason, detail)``. No connection is made here."""
        literal = ip_literal(host)
        if literal:
            addresses = [literal]
        else:
            addresses, problem = await self._lookup(host, port)
            if not addresses:
                self.failed_lookups[(host, port)] = time.monotonic()
                return "pages_failed", "DNS lookup failed", f"{host}: {problem}"
        refusal = self.policy.refusal(host, port, addresses)
        if refusal:
            log.info("crawl: refusing %s:%d: %s", host, port, refusal[1])
            return ("ssrf_refused", *refusal)
        self.checked[(host, port)] = list(addresses)
        return None

    async def _lookup(self, host: str, port: int) -> tuple[list[str], str]:
        """The addresses of ``host``, and ``""``; or ``[]`` and why not. A failed or timed
        out lookup is tried again as a request is (``retries``, with backoff); a name no
        lookup can take (ValueError) is not."""
        loop = asyncio.get_running_loop()
        for attempt in range(self.config.retries + 1):
            try:
                addresses = await asyncio.wait_for(
                    loop.run_in_executor(None, self.resolver, host, port),
                    self.config.timeout_seconds)
            except ValueError as exc:
                return [], str(exc)
            except (OSError, asyncio.TimeoutError) as exc:  # socket.gaierror, timeouts
                problem = str(exc) or f"no answer within {self.config.timeout_seconds}s"
            else:
                if addresses:
                    return list(addresses), ""
                problem = "no address"
            if attempt < self.config.retries:
                self.stats["retries"] += 1
                wait = self._retry_wait(attempt, None)
                log.debug("crawl: looking up %s failed (%s), retrying in %.2fs", host,
                          problem, wait)
                await asyncio.sleep(wait)
        return [], problem

    async def _load_robots(self, origin_url: str, host: Host) -> tuple[Protego | None, str]:
        """RFC 9309 as Google applies it: 2xx rules apply, other 4xx (and more than five
        redirects) allow everything, 5xx, 429 and network errors refuse everything (the
        site may be overloaded)."""
        from protego import Protego

        rules, refusal = None, ""
        try:
            response = await self._robots_response(f"{origin_url}/robots.txt", host)
        except Skipped as skip:
            refusal = f"robots.txt unreachable ({skip.reason})"
        else:
            if response is None:
                pass
            elif response.status == 429 or response.status >= 500:
                refusal = f"robots.txt answered HTTP {response.status}"
            elif 200 <= response.status < 300:
                rules = Protego.parse(response.body.decode("utf-8", errors="replace"))
                host.delay = max(host.delay, float(rules.crawl_delay(self.agent) or 0))
        log.info("crawl: robots.txt of %s: %s", redact_url(origin_url),
                 refusal or ("rules loaded" if rules else "none, all allowed"))
        return rules, refusal

    async def _robots_response(self, url: str, host: Host) -> Response | None:
        """robots.txt after redirects (each hop checked by the SSRF guard); None after
        more than five."""
        for _ in range(MAX_REDIRECTS + 1):
            response = await self._request(url, host, robots=True)
            self._archive(response)
            location = response.headers.get("location")
            if response.status not in REDIRECT_STATUSES or not location:
                return response
            url = self._redirect_target(location, url)
            await self._check_address(url)
            host = self._host(origin(url))
        return None

    async def _request(self, url: str, host: Host, robots: bool = False) -> Response:
        """GET with retries on network errors, timeouts, 429 and 5xx. The wait before a
        retry holds back the whole host, so a struggling server gets a rest from every
        worker, and a Retry-After is obeyed by all of them."""
        import httpx

        for attempt in range(self.config.retries + 1):
            response, retry_after = None, None
            try:
                async with host.slots:
                    async with host.lock:  # space out request starts on this host
                        await asyncio.sleep(host.next_start - time.monotonic())
                        host.next_start = time.monotonic() + host.delay
                    response = await asyncio.wait_for(self._get(url, robots),
                                                      self.config.timeout_seconds)
            except httpx.DecodingError as exc:
                raise Skipped("pages_failed", "undecodable body", f"undecodable body ({exc})") \
                    from None
            except (httpx.TransportError, asyncio.TimeoutError) as exc:
                reason = type(exc).__name__
            else:
                if response.status not in RETRY_STATUSES:
                    return response
                reason, retry_after = f"HTTP {response.status}", response.headers.get("retry-after")
            if attempt < self.config.retries:
                if response is not None:
                    self._archive(response)  # an attempt that is retried
                self.stats["retries"] += 1
                wait = self._retry_wait(attempt, retry_after)
                log.debug("crawl: %s: %s, retrying in %.2fs", redact_url(url), reason, wait)
                host.next_start = max(host.next_start, time.monotonic() + wait)
        if response is None:
            raise Skipped("pages_failed", reason)
        return response

    def _retry_wait(self, attempt: int, retry_after: str | None) -> float:
        wait = self.config.backoff_seconds * 2 ** attempt
        if retry_after:
            try:
                wait = float(retry_after)
            except ValueError:
                try:
                    wait = (parsedate_to_datetime(retry_after)
                            - datetime.now(timezone.utc)).total_seconds()
                except (TypeError, ValueError):
                    pass
        return min(max(wait, 0.0), self.config.max_retry_after_seconds)

    async def _get(self, url: str, robots: bool) -> Response:
        """One streamed GET, no redirects followed. A page's body is read only if it is 2xx
        text, and abandoned past max_bytes; robots.txt is cut at ROBOTS_MAX_BYTES."""
        limit = ROBOTS_MAX_BYTES if robots else self.config.max_bytes
        async with self.client.stream("GET", url) as raw:
            self.stats["requests"] += 1
            if not robots:
                self.stats[f"status_{raw.status_code}"] += 1
            response = Response(url, raw.status_code, raw.headers,
                                fetched_at=datetime.now(timezone.utc).replace(microsecond=0),
                                exchange=_exchange_of(raw))
            is_text = media_type(raw.headers.get("content-type", "")) in TEXT_TYPES
            if not raw.is_success or not (is_text or robots):
                return response
            declared = raw.headers.get("content-length", "")
            if not robots and declared.isdigit() and int(declared) > limit:
                response.truncated = "length"
                self._archive(response)
                raise Skipped("too_large", "too large", f"Content-Length {declared} > {limit}")
            body = bytearray()
            async for chunk in raw.aiter_bytes():
                body += chunk
                self.stats["bytes_downloaded"] += len(chunk)
                if len(body) > limit:
                    response.body, response.truncated = bytes(body[:limit]), "length"
                    if robots:
                        return response
                    self._archive(response)
                    raise Skipped("too_large", "too large", f"body over {limit} bytes")
            response.body, response.truncated = bytes(body), ""
            return response

    def _archive(self, response: Response, stored: bool = False) -> None:
        """Write ``response`` to the WARC archive of stored pages or of the others."""
        archive = self.archives.get(ARCHIVES[0] if stored else ARCHIVES[1])
        if archive is None:
            return
        from tasks.crawl_archive import Exchange

        archive.write(Exchange(
            url=self.stored_url(response.url), status=response.status, body=response.body,
            truncated=response.truncated, date=response.fetched_at, **response.exchange))


def _exchange_of(raw: httpx.Response) -> dict:
    """The request line, protocol, reason and raw headers of a response, as sent and
    received, for the WARC archive."""
    def text(pairs) -> list[tuple[str, str]]:
        return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in pairs]

    target = raw.request.url.raw_path.decode("ascii")
    return {"request_line": f"{raw.request.method} {target} {raw.http_version}",
            "request_headers": text(raw.request.headers.raw), "http_version": raw.http_version,
            "reason": raw.reason_phrase, "headers": text(raw.headers.raw)}
