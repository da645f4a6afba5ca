"""Crawl: fetch web pages politely, starting from seed URLs, into shards of raw bodies.

Politeness is most of this module: robots.txt is fetched once per host and obeyed (with
its Crawl-delay and the pages' robots meta tags), each host gets a bounded number of
simultaneous requests and a pause between them, transient failures are retried with
exponential backoff, and a server's Retry-After pauses every request to that host.
Bodies are streamed and abandoned past ``max_bytes``, so one huge page cannot exhaust
memory. Redirects are followed by hand (at most 5 hops) so that each hop is checked
against robots.txt and the crawl scope *before* it is requested, which httpx's automatic
redirects cannot do.

The crawl is breadth first, so a page limit keeps the pages nearest the seeds. Raw
bodies are stored as fetched; main-text extraction is the next stage's job.
"""

from __future__ import annotations

import asyncio
import codecs
import concurrent.futures
import hashlib
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, TextIO
from urllib.parse import quote, urljoin, urlsplit, urlunsplit
from urllib.robotparser import RobotFileParser

import lxml.html
from lxml import etree
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasks.progress import progress
from tasks.redact import redact_secrets, redact_url
from tasks.shards import ShardWriter
from tasks.stage import StageInputError

if TYPE_CHECKING:  # httpx is imported where requests are made: loading a config needs none
    import httpx

log = logging.getLogger(__name__)

# Media types kept, and whether their links are followed.
TEXT_TYPES = {"text/html": True, "application/xhtml+xml": True, "text/plain": False}
RETRY_STATUSES = {408, 429, 500, 502, 503, 504}
MAX_REDIRECTS = 5
ROBOTS_MAX_BYTES = 512_000  # what Google reads of a robots.txt (RFC 9309 asks >= 500 KiB)
URL_SAFE = "/%:@!$&'()*+,;=-._~?"  # characters left as they are when re-quoting a URL
STAT_KEYS = ("pages_fetched", "pages_failed", "robots_disallowed", "too_large", "non_html",
             "retries", "bytes", "requests", "redirects", "noindex", "out_of_scope")


class CrawlConfig(BaseModel):
    """Which pages to fetch, and how politely."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Run this stage (the flow needs it unless "
                                            "source.paths gives local documents).")
    seeds: list[str] = Field(
        [], description="Start URLs (http or https). Empty: this Python's standard-library "
                        "documentation is served on 127.0.0.1 and crawled, so the pipeline "
                        "runs without internet access.")
    max_pages: int = Field(
        250, ge=1, description="Stop after storing this many pages. Failed or refused URLs "
                               "do not count. The default crawls the embedded docs in seconds.")
    max_depth: int = Field(3, ge=0, description="Follow links at most this many clicks away "
                                                "from a seed (0: fetch only the seeds).")
    same_host: bool = Field(
        True, description="Follow only links to the seeds' hosts (exact host name and port; "
                          "a seed that redirects adds its target's host).")
    include: list[str] = Field(
        [], description="Regular expressions; a discovered link is followed only if it "
                        "matches one of them (searched in the full URL). Empty: all links. "
                        "Seeds are always fetched.")
    exclude: list[str] = Field(
        [], description="Regular expressions; a discovered link matching any of them is "
                        "not followed.")
    concurrency: int = Field(8, ge=1, le=256, description="Requests in flight at once, "
                                                          "over all hosts.")
    per_host_concurrency: int = Field(
        2, ge=1, le=64, description="Requests in flight at once to one host. Keep it small "
                                    "for sites you do not own.")
    delay_seconds: float = Field(
        0.0, ge=0, le=600, description="Minimum pause between the starts of two requests to "
                                       "the same host; a larger Crawl-delay in its robots.txt "
                                       "wins. 0 suits loopback; use 1 or more for real sites.")
    timeout_seconds: float = Field(10.0, gt=0, le=600,
                                   description="Give up on one request (connect and whole "
                                               "response) after this many seconds.")
    retries: int = Field(3, ge=0, le=10, description="Retries of a request after a network "
                                                     "error, a timeout, 429 or a 5xx status.")
    backoff_seconds: float = Field(
        0.5, ge=0, le=60, description="Wait before the first retry; it doubles at each "
                                      "further retry. A Retry-After header replaces it.")
    max_retry_after_seconds: float = Field(
        60.0, ge=0, le=3600, description="Cap on the wait a Retry-After header can ask for.")
    max_bytes: int = Field(2_000_000, ge=1_000,
                           description="Pages larger than this many bytes (after decompression) "
                                       "are abandoned while downloading and counted as "
                                       "too_large.")
    user_agent: str = Field(
        "forgeline/0.1 (+https://github.com/forgeline)", min_length=1,
        description="User-Agent header. Its first word (before '/') is the name matched "
                    "against robots.txt groups and robots meta tags.")
    respect_robots: bool = Field(True, description="Obey robots.txt and robots meta tags. "
                                                   "Turn off only for sites you own.")
    shard_size: int = Field(500, ge=1, description="Pages per output parquet shard.")
    snapshot: str = Field(
        "fixed", min_length=1,
        description="A label that is part of this stage's cache key: a different label "
                    "fetches fresh pages, the same label reuses what was fetched. 'daily' "
                    "means the current UTC date, so pages are fetched again once a day.")

    @field_validator("seeds")
    @classmethod
    def _http_seeds(cls, seeds: list[str]) -> list[str]:
        for seed in seeds:
            if canonical_url(seed) is None:
                raise ValueError(f"seed {redact_url(seed)!r} is not an http(s) URL with a host")
        # The crawler never sends a seed's user:password (canonical_url drops it), so it is
        # masked here, before the config reaches logs, MLflow params or Prefect parameters.
        return [redact_url(seed) for seed in seeds]

    @field_validator("include", "exclude")
    @classmethod
    def _valid_patterns(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a valid regular expression: {exc}") \
                    from None
        return patterns


def resolve_snapshot(label: str, now: datetime | None = None) -> str:
    """The cache-key value of ``CrawlConfig.snapshot``: ``daily`` becomes today's UTC date."""
    if label == "daily":
        return (now or datetime.now(timezone.utc)).astimezone(timezone.utc).date().isoformat()
    return label


def canonical_url(url: str, base: str | None = None) -> str | None:
    """One spelling per page: resolved against ``base``, lower-case scheme and host, no
    default port, user info or fragment, '/' for an empty path, unsafe characters
    percent-quoted. The query is kept as is (its order can matter). None unless http(s)."""
    try:
        parts = urlsplit(urljoin(base, url.strip()) if base else url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme, host = parts.scheme.lower(), (parts.hostname or "")
    if scheme not in ("http", "https") or not host:
        return None
    netloc = f"[{host}]" if ":" in host else host
    if port is not None and port != {"http": 80, "https": 443}[scheme]:
        netloc += f":{port}"
    path = quote(parts.path or "/", safe=URL_SAFE)
    return urlunsplit((scheme, netloc, path, quote(parts.query, safe=URL_SAFE), ""))


def url_id(url: str) -> str:
    """A page's document id: 16 hex characters of the SHA-1 of its canonical URL."""
    return hashlib.sha1(url.encode("utf-8")).hexdigest()[:16]


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def media_type(content_type: str) -> str:
    return content_type.split(";")[0].strip().lower()


def decode_body(body: bytes, content_type: str) -> str:
    """Text of a body: the header's charset, else an HTML meta charset, else UTF-8; bytes
    that do not decode become U+FFFD rather than failing the page."""
    match = re.search(r"charset=[\"']?([\w.:-]+)", content_type, re.IGNORECASE) or \
        re.search(rb"<meta[^>]+charset=[\"']?([\w.:-]+)", body[:4096], re.IGNORECASE)
    encoding = "utf-8"
    if match:
        name = match.group(1)
        name = name.decode("ascii") if isinstance(name, bytes) else name
        try:
            encoding = codecs.lookup(name).name
        except LookupError:
            pass
    return body.decode(encoding, errors="replace")


def _directives(value: str) -> set[str]:
    """Robots directives of a meta tag or X-Robots-Tag ('none' is both no-s); entries
    addressed to one crawler ('googlebot: noindex') are skipped."""
    found = {token.strip().lower() for token in value.split(",") if ":" not in token}
    return found | {"noindex", "nofollow"} if "none" in found else found


def page_links(html: str, url: str, agent: str) -> tuple[list[str], set[str]]:
    """Canonical links of an HTML page (honouring <base> and rel=nofollow), and the robots
    directives of its meta tags named 'robots' or ``agent``."""
    try:
        doc = lxml.html.document_fromstring(
            html.encode("utf-8"), parser=lxml.html.HTMLParser(encoding="utf-8"))
    except (etree.ParserError, ValueError):
        return [], set()
    base = next((urljoin(url, b.get("href").strip()) for b in doc.iter("base")
                 if b.get("href")), url)
    directives: set[str] = set()
    for meta in doc.iter("meta"):
        if (meta.get("name") or "").strip().lower() in ("robots", agent):
            directives |= _directives(meta.get("content") or "")
    links = []
    for anchor in doc.iter("a"):
        href = anchor.get("href")
        if href and "nofollow" not in (anchor.get("rel") or "").lower().split():
            link = canonical_url(href, base)
            if link:
                links.append(link)
    return links, directives


class Skipped(Exception):
    """A URL that gives no page; ``stat`` names the counter it adds to."""

    def __init__(self, stat: str, reason: str):
        super().__init__(reason)
        self.stat, self.reason = stat, reason


@dataclass
class Response:
    url: str
    status: int
    headers: httpx.Headers
    body: bytes = b""


@dataclass
class Host:
    """Politeness state of one scheme://host:port."""

    slots: asyncio.Semaphore  # per_host_concurrency
    delay: float  # between request starts: delay_seconds or a larger robots.txt Crawl-delay
    next_start: float = 0.0  # monotonic time before which no request may start
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    robots: asyncio.Task | None = None  # -> (rules or None, why everything is refused or "")


class Crawler:
    """One crawl: a breadth-first frontier worked on by ``concurrency`` asyncio workers."""

    def __init__(self, config: CrawlConfig, seeds: list[str], writer: ShardWriter,
                 failures: TextIO, stored_url: Callable[[str], str] = str):
        self.config, self.seeds, self.writer, self.failures_file = \
            config, seeds, writer, failures
        self.stored_url = lambda url: redact_url(stored_url(url))
        self.agent = config.user_agent.split("/")[0].strip().lower()
        self.include = [re.compile(p) for p in config.include]
        self.exclude = [re.compile(p) for p in config.exclude]
        self.hosts_in_scope = {urlsplit(s).netloc for s in seeds}
        self.stats: Counter[str] = Counter(dict.fromkeys(STAT_KEYS, 0))
        self.failures: Counter[str] = Counter()
        self.seen: set[str] = set(seeds)
        self.hosts: dict[str, Host] = {}
        self.kept = 0
        self.bar = progress(total=config.max_pages, desc="crawl", unit="page")

    async def run(self) -> None:
        import httpx

        self.queue: asyncio.Queue = asyncio.Queue()
        self.done = asyncio.Event()
        # Taken before a fetch and given back unless a page was kept: pages in flight never
        # exceed what max_pages still allows, so no fetched page has to be thrown away.
        self.page_slots = asyncio.Semaphore(self.config.max_pages)
        for seed in self.seeds:
            self.queue.put_nowait((seed, 0, seed))
        async with httpx.AsyncClient(
                headers={"User-Agent": self.config.user_agent},
                timeout=httpx.Timeout(self.config.timeout_seconds),
                limits=httpx.Limits(max_connections=self.config.concurrency)) as self.client:
            workers = [asyncio.create_task(self._worker())
                       for _ in range(self.config.concurrency)]
            waits = [asyncio.create_task(self.queue.join()), asyncio.create_task(self.done.wait())]
            await asyncio.wait(waits + workers, return_when=asyncio.FIRST_COMPLETED)
            for task in waits + workers:
                task.cancel()
            results = await asyncio.gather(*workers, return_exceptions=True)
        self.bar.close()
        for result in results:  # a worker only ends early on a bug: surface it
            if isinstance(result, Exception):
                raise result

    async def _worker(self) -> None:
        while True:
            url, depth, seed = await self.queue.get()
            try:
                await self.page_slots.acquire()
                kept = False
                try:
                    kept = await self._visit(url, depth, seed)
                finally:
                    self.kept += kept
                    if not kept:
                        self.page_slots.release()
                    elif self.kept >= self.config.max_pages:
                        self.done.set()
            finally:
                self.queue.task_done()

    async def _visit(self, url: str, depth: int, seed: str) -> bool:
        """Fetch one URL, queue its links, store it; True if a page was stored."""
        try:
            response = await self._fetch(url, depth)
        except Skipped as skip:
            self.stats[skip.stat] += 1
            categorical = skip.stat in ("pages_failed", "robots_disallowed")
            self.failures[skip.reason if categorical else skip.stat] += 1
            self.failures_file.write(json.dumps(
                {"url": redact_url(url), "counted_as": skip.stat,
                 "reason": redact_secrets(skip.reason)}) + "\n")
            log.debug("crawl: %s not kept: %s", redact_url(url), redact_secrets(skip.reason))
            return False
        content_type = response.headers.get("content-type", "")
        text = decode_body(response.body, content_type)
        links, directives = [], set()
        if TEXT_TYPES[media_type(content_type)]:
            links, directives = page_links(text, response.url, self.agent)
        directives = directives.union(*map(_directives, response.headers.get_list("x-robots-tag")))
        if not self.config.respect_robots:
            directives = set()
        if "nofollow" not in directives and depth < self.config.max_depth:
            self._enqueue(links, depth + 1, seed)
        if "noindex" in directives:
            self.stats["noindex"] += 1
            return False
        self.writer.add({
            "id": url_id(self.stored_url(response.url)), "url": self.stored_url(response.url),
            "text": text,
            "content_type": content_type, "status": response.status,
            "fetched_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "depth": depth, "seed": self.stored_url(seed)})
        self.stats["pages_fetched"] += 1
        self.stats["bytes"] += len(response.body)
        self.bar.update(1)
        return True

    def _enqueue(self, links: list[str], depth: int, seed: str) -> None:
        for link in links:
            if link not in self.seen:
                self.seen.add(link)
                if self._in_scope(link, depth):
                    self.queue.put_nowait((link, depth, seed))
                else:
                    self.stats["out_of_scope"] += 1

    def _in_scope(self, url: str, depth: int) -> bool:
        if self.config.same_host and urlsplit(url).netloc not in self.hosts_in_scope:
            return False
        if depth == 0:
            return True
        if self.include and not any(p.search(url) for p in self.include):
            return False
        return not any(p.search(url) for p in self.exclude)

    async def _fetch(self, url: str, depth: int) -> Response:
        """The response to store for ``url``, after redirects; else Skipped saying why."""
        for _ in range(MAX_REDIRECTS + 1):
            host = await self._allowed_host(url)
            response = await self._request(url, host)
            location = response.headers.get("location")
            if response.status not in (301, 302, 303, 307, 308) or not location:
                break
            target = canonical_url(location, url)
            if target is None:
                raise Skipped("pages_failed", "redirect to a non-http URL")
            if depth == 0:  # a seed's redirect (http -> https, www.) defines its site
                self.hosts_in_scope.add(urlsplit(target).netloc)
            if target in self.seen or not self._in_scope(target, depth):
                raise Skipped("out_of_scope", f"redirect to {target} (seen or out of scope)")
            self.seen.add(target)
            self.stats["redirects"] += 1
            url = target
        else:
            raise Skipped("pages_failed", f"more than {MAX_REDIRECTS} redirects")
        if not 200 <= response.status < 300:
            raise Skipped("pages_failed", f"HTTP {response.status}")
        if media_type(response.headers.get("content-type", "")) not in TEXT_TYPES:
            raise Skipped("non_html", f"content type {response.headers.get('content-type')!r}")
        return response

    async def _allowed_host(self, url: str) -> Host:
        """The host's politeness state, once its robots.txt allows ``url``."""
        origin = _origin(url)
        host = self.hosts.get(origin)
        if host is None:
            host = self.hosts[origin] = Host(
                asyncio.Semaphore(self.config.per_host_concurrency), self.config.delay_seconds)
        if not self.config.respect_robots:
            return host
        if host.robots is None:  # one fetch per host, awaited by every worker that needs it
            host.robots = asyncio.create_task(self._load_robots(origin, host))
        rules, refusal = await host.robots
        if refusal:
            raise Skipped("robots_disallowed", refusal)
        if rules and not rules.can_fetch(self.agent, url):
            raise Skipped("robots_disallowed", "disallowed by robots.txt")
        return host

    async def _load_robots(self, origin: str, host: Host) -> tuple[RobotFileParser | None, str]:
        """RFC 9309 as Google applies it: 2xx rules apply, other 4xx allow everything,
        5xx, 429 and network errors refuse everything (the site may be overloaded)."""
        url, rules, refusal = f"{origin}/robots.txt", None, ""
        try:
            response = await self._request(url, host, robots=True)
        except Skipped as skip:
            refusal = f"robots.txt unreachable ({skip.reason})"
        else:
            if response.status == 429 or response.status >= 500:
                refusal = f"robots.txt answered HTTP {response.status}"
            elif 200 <= response.status < 300:
                rules = RobotFileParser(url)
                rules.parse(decode_body(response.body, "").splitlines())
                host.delay = max(host.delay, float(rules.crawl_delay(self.agent) or 0))
        log.info("crawl: robots.txt of %s: %s", redact_url(origin),
                 refusal or ("rules loaded" if rules else "none, all allowed"))
        return rules, refusal

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
                raise Skipped("pages_failed", f"undecodable body ({exc})") from None
            except (httpx.TransportError, asyncio.TimeoutError) as exc:
                reason = type(exc).__name__
            else:
                if response.status not in RETRY_STATUSES:
                    return response
                reason, retry_after = f"HTTP {response.status}", response.headers.get("retry-after")
            if attempt < self.config.retries:
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
        """One streamed GET. A page's body is read only if it is 2xx text, and abandoned
        past max_bytes; robots.txt follows redirects and is cut at ROBOTS_MAX_BYTES."""
        limit = ROBOTS_MAX_BYTES if robots else self.config.max_bytes
        async with self.client.stream("GET", url, follow_redirects=robots) as raw:
            self.stats["requests"] += 1
            response = Response(url, raw.status_code, raw.headers)
            is_text = media_type(raw.headers.get("content-type", "")) in TEXT_TYPES
            if not raw.is_success or not (is_text or robots):
                return response
            declared = raw.headers.get("content-length", "")
            if not robots and declared.isdigit() and int(declared) > limit:
                raise Skipped("too_large", f"Content-Length {declared} > {limit}")
            body = bytearray()
            async for chunk in raw.aiter_bytes():
                body += chunk
                if len(body) > limit:
                    if robots:
                        break
                    raise Skipped("too_large", f"body over {limit} bytes")
            response.body = bytes(body[:limit])
            return response


def _run(coroutine_factory) -> None:
    """Run a coroutine to completion from sync code, even inside a running event loop
    (Prefect async tasks, notebooks), where asyncio.run refuses: then in a fresh thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(coroutine_factory())
        return
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(lambda: asyncio.run(coroutine_factory())).result()


# Where the embedded docs' pages are recorded: the server's port changes from run to run,
# and page ids (hence the train/validation split) must not.
DOCS_ORIGIN = "http://pydoc.localhost"


def crawl(config: CrawlConfig, out_dir: Path, seeds: list[str] | None = None,
          record_origin: str | None = None) -> dict:
    """Crawl from ``seeds`` (default ``config.seeds``; when both are empty, this Python's
    docs served on loopback) into ``out_dir/data``; ``out_dir/failures.jsonl`` lists the
    URLs that gave no page and why. With ``record_origin``, pages of the first seed's
    origin are recorded (url and id) as if served from that origin."""
    seeds = list(config.seeds if seeds is None else seeds)
    shown = [redact_url(s) for s in seeds]  # what logs and errors say: no user:password
    if not seeds:
        from tasks.docserver import serve_python_docs

        with serve_python_docs() as url:
            log.info("crawl: serving this Python's documentation at %s (recorded as %s)",
                     url, DOCS_ORIGIN)
            return crawl(config, out_dir, [url], record_origin=DOCS_ORIGIN)
    canonical = [canonical_url(s) for s in seeds]
    if None in canonical:
        bad = shown[canonical.index(None)]
        raise StageInputError("crawl", f"seed {bad!r} is not an http(s) URL; give full URLs "
                                       "such as https://example.org/")
    out_dir = Path(out_dir)
    log.info("crawl: %d seed(s) %s, up to %d pages at depth <= %d", len(seeds), shown,
             config.max_pages, config.max_depth)
    started = time.perf_counter()
    with ShardWriter(out_dir / "data", config.shard_size) as writer, \
            open(out_dir / "failures.jsonl", "w", encoding="utf-8") as failures_file:
        stored_url = str
        if record_origin:
            served = _origin(canonical[0])
            stored_url = lambda url: (record_origin + url[len(served):]
                                      if url.startswith(served + "/") else url)
        crawler = Crawler(config, list(dict.fromkeys(canonical)), writer, failures_file,
                          stored_url)
        _run(crawler.run)
    seconds = time.perf_counter() - started
    stats = {**crawler.stats, "seconds": round(seconds, 3),
             "pages_per_second": round(crawler.kept / seconds, 3) if seconds else 0.0}
    summary = redact_secrets(", ".join(f"{reason}: {n}"
                                       for reason, n in crawler.failures.most_common(8)))
    log.info("crawl: kept %d pages in %.1fs (%.1f pages/s, %d requests, %d retries); "
             "not kept: %s", crawler.kept, seconds, stats["pages_per_second"],
             stats["requests"], stats["retries"], summary or "none")
    if crawler.kept == 0:
        raise StageInputError(
            "crawl", f"no pages could be fetched from {shown}: {summary or 'no links found'}; "
                     "check the seeds are reachable and serve text/html or text/plain, that "
                     f"robots.txt allows user agent {crawler.agent!r}, and the include/"
                     "exclude patterns")
    return {"count": crawler.kept, "stats": stats,
            "artifacts": {"failures": "failures.jsonl"}}
