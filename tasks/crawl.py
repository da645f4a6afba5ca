"""Crawl: fetch web pages politely, starting from seed URLs, into shards of raw bodies.

This module holds the crawl itself: a breadth-first frontier worked on by asyncio
workers, the links and robots meta tags of each page, and ``crawl()``, the stage core.
The rest sits beside it, one concern per module:

- ``crawl_config``: the settings (``crawl.`` in the pipeline config);
- ``crawl_fetch``: fetching one URL politely and safely: robots.txt read as RFC 9309 says
  (protego: the longest matching rule wins, ``*`` and ``$`` wildcards) with its
  Crawl-delay, per-host concurrency and pauses, retries with backoff and Retry-After, a
  size cap while streaming, redirects followed by hand so each hop is checked (SSRF
  guard, robots.txt, scope) *before* it is requested;
- ``crawl_guard`` and ``crawl_http``: the SSRF guard (private, loopback and link-local
  hosts refused unless allowed) and a client that connects only to checked addresses;
- ``crawl_urls``: one canonical URL per page (tracking parameters, query order, ...);
- ``crawl_archive``: every response written to WARC files;
- ``crawl_state``: the frontier saved as the crawl goes, so a killed crawl resumes;
- ``crawl_report``: the statistics as markdown.

The crawl is breadth first, so a page limit keeps the pages nearest the seeds. Raw
bodies are stored as fetched (decoded to text by ``tasks.charset``); main-text
extraction is the next stage's job.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hashlib
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urljoin, urlsplit

import lxml.html
from lxml import etree

from tasks import (
    crawl_archive,
    crawl_config,
    crawl_fetch,
    crawl_guard,
    crawl_report,
    crawl_state,
    crawl_urls,
    redact,
)
from tasks.charset import decode
from tasks.crawl_config import CrawlConfig, resolve_snapshot
from tasks.crawl_fetch import (
    ARCHIVES,
    MAX_REDIRECTS,
    REDIRECT_STATUSES,
    TEXT_TYPES,
    Fetcher,
    Response,
    Skipped,
    media_type,
)
from tasks.crawl_guard import Resolver
from tasks.crawl_report import crawl_report_markdown, reason_key
from tasks.crawl_state import CrawlState
from tasks.crawl_urls import canonical_url, host_port, origin, url_id
from tasks.progress import progress
from tasks.redact import redact_exception, redact_secrets, redact_url
from tasks.shards import write_text_atomic
from tasks.stage import StageInputError

if TYPE_CHECKING:
    from tasks.crawl_archive import WarcArchive

__all__ = ["CODE_MODULES", "DOCS_ORIGIN", "CrawlConfig", "canonical_url", "crawl",
           "crawl_report_markdown", "resolve_snapshot", "url_id"]

log = logging.getLogger(__name__)

# The modules besides this one whose code decides what a crawl produces (its cache key):
# redact shapes the stored URLs and failures; crawl_http makes the requests (what they
# send is archived, where they may go decides what is fetched), named by its file so that
# importing this module (loading a config does) does not import httpx.
CODE_MODULES = (crawl_archive, crawl_config, crawl_fetch, crawl_guard, crawl_report,
                crawl_state, crawl_urls, redact, Path(__file__).with_name("crawl_http.py"))
STAT_KEYS = ("pages_fetched", "pages_failed", "robots_disallowed", "ssrf_refused",
             "too_large", "non_html", "retries", "bytes", "bytes_downloaded", "requests",
             "redirects", "noindex", "out_of_scope", "undecodable_pages", "resumes")


def _directives(value: str) -> set[str]:
    """Robots directives of a meta tag or X-Robots-Tag ('none' is both no-s); entries
    addressed to one crawler ('googlebot: noindex') are skipped."""
    found = {token.strip().lower() for token in value.split(",") if ":" not in token}
    return found | {"noindex", "nofollow"} if "none" in found else found


def _base_url(url: str, href: str | None) -> str:
    """What a page's relative links resolve against: its <base href> resolved against its
    URL, or the URL itself when there is none or it is malformed (``http://[oops/``)."""
    if not href:
        return url
    try:
        base = urljoin(url, href.strip())
        urlsplit(base).port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return url
    return base


def page_links(html: str, url: str, agent: str,
               canonical: Callable[[str, str], str | None] = canonical_url,
               ) -> tuple[list[str], set[str]]:
    """Canonical links of an HTML page (honouring <base> and rel=nofollow), and the robots
    directives of its meta tags named 'robots' or ``agent``."""
    try:
        doc = lxml.html.document_fromstring(
            html.encode("utf-8"), parser=lxml.html.HTMLParser(encoding="utf-8"))
    except (etree.ParserError, ValueError):
        return [], set()
    base = _base_url(url, next((b.get("href") for b in doc.iter("base") if b.get("href")),
                               None))
    directives: set[str] = set()
    for meta in doc.iter("meta"):
        if (meta.get("name") or "").strip().lower() in ("robots", agent):
            directives |= _directives(meta.get("content") or "")
    links = []
    for anchor in doc.iter("a"):
        href = anchor.get("href")
        if href and "nofollow" not in (anchor.get("rel") or "").lower().split():
            link = canonical(href, base)
            if link:
                links.append(link)
    return links, directives


class Crawler(Fetcher):
    """One crawl: a breadth-first frontier worked on by ``concurrency`` asyncio workers.

    Every finished URL is committed to ``state`` with the links it yielded, so a crawl
    killed at any point resumes from there (see ``tasks.crawl_state``)."""

    def __init__(self, config: CrawlConfig, seeds: list[str], state: CrawlState,
                 archives: dict[str, WarcArchive] | None = None,
                 stored_url: Callable[[str], str] = str, resolver: Resolver | None = None,
                 allowed_hosts: list[str] = ()):
        super().__init__(config, archives, stored_url, resolver, allowed_hosts)
        self.state = state
        self.include = [re.compile(p) for p in config.include]
        self.exclude = [re.compile(p) for p in config.exclude]
        self.stats.update({**dict.fromkeys(STAT_KEYS, 0), **state.get("stats", {})})
        self.failures: Counter[str] = Counter(state.get("failures", {}))
        self.kept = state.get("kept", 0)
        saved_hosts = state.get("hosts_in_scope")
        self.hosts_in_scope = {urlsplit(state.load_url(u)).netloc for u in saved_hosts} \
            if saved_hosts else {urlsplit(s).netloc for s in seeds}
        self.frontier = state.frontier()
        self.seen: set[str] = state.seen()
        self.started, self.earlier_seconds = time.perf_counter(), state.get("seconds", 0.0)
        self.bar = progress(total=config.max_pages, initial=self.kept, desc="crawl",
                            unit="page")

    async def run(self) -> None:
        from tasks.crawl_http import pinned_client

        self.queue: asyncio.Queue = asyncio.Queue()
        self.done = asyncio.Event()
        # Taken before a fetch and given back unless a page was kept: pages in flight never
        # exceed what max_pages still allows, so no fetched page has to be thrown away.
        self.page_slots = asyncio.Semaphore(max(self.config.max_pages - self.kept, 0))
        if self.kept >= self.config.max_pages:
            self.frontier = []
        for item in self.frontier:
            self.queue.put_nowait(item)
        async with pinned_client(self.checked, user_agent=self.config.user_agent,
                                 timeout=self.config.timeout_seconds,
                                 max_connections=self.config.concurrency) as self.client:
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
                    kept = await self._visit_safely(url, depth, seed)
                finally:
                    if not kept:
                        self.page_slots.release()
                    elif self.kept >= self.config.max_pages:
                        self.done.set()
            finally:
                self.queue.task_done()

    async def _visit_safely(self, url: str, depth: int, seed: str) -> bool:
        """Visit one URL and commit what came of it to the crawl state, in one step with no
        await in between; True if a page was stored. An unexpected error (a bug, a page no
        code foresaw) becomes a committed failure of that URL rather than the end of the
        crawl, which a resumed or retried crawl would otherwise meet again at this URL."""
        fetched: list[str] = []  # redirect targets fetched on the way
        try:
            outcome = await self._visit(url, depth, seed, fetched)
        except Exception as exc:  # noqa: BLE001 - one URL's failure, logged with its traceback
            outcome = {"failure": self._internal_error(url, exc)}
        self._commit(url, fetched=fetched, **outcome)
        if "record" not in outcome:
            return False
        self.bar.update(1)
        return True

    def _internal_error(self, url: str, exc: Exception) -> dict:
        """The failure record of a URL whose visit raised ``exc`` unexpectedly. Only the
        exception's class is recorded: its message may quote a URL with credentials."""
        reason = f"internal error ({type(exc).__name__})"
        log.warning("crawl: %s not kept: %s", redact_url(url), reason,
                    exc_info=redact_exception(exc))
        self.stats["pages_failed"] += 1
        self.stats[reason_key(reason)] += 1
        self.failures[reason] += 1
        return {"url": self.stored_url(url), "counted_as": "pages_failed", "reason": reason,
                "detail": f"{reason} while visiting this URL; the crawl log has the traceback"}

    async def _visit(self, url: str, depth: int, seed: str, fetched: list[str]) -> dict:
        """Fetch one URL, archive the response, queue its links: what to commit for it (a
        ``record`` when a page is stored, else maybe a ``failure``). ``fetched`` gets the
        redirect targets fetched on the way. The frontier and the counters change only
        once nothing can fail any more."""
        try:
            response = await self._fetch(url, depth, fetched)
        except Skipped as skip:
            self.stats[skip.stat] += 1
            self.stats[reason_key(skip.reason)] += 1
            self.failures[skip.reason] += 1
            log.debug("crawl: %s not kept: %s", redact_url(url), redact_secrets(skip.detail))
            return {"failure": {"url": self.stored_url(url), "counted_as": skip.stat,
                                "reason": skip.reason, "detail": redact_secrets(skip.detail)}}
        content_type = response.headers.get("content-type", "")
        decoded = decode(response.body, content_type)
        links, directives = [], set()
        if TEXT_TYPES[media_type(content_type)]:
            links, directives = page_links(decoded.text, response.url, self.agent,
                                           self.canonical)
        directives = directives.union(*map(_directives, response.headers.get_list("x-robots-tag")))
        if not self.config.respect_robots:
            directives = set()
        record = None
        if "noindex" in directives:
            self._archive(response)
        else:
            stored = self.stored_url(response.url)
            record = {"id": url_id(stored), "url": stored, "text": decoded.text,
                      "content_type": content_type, "status": response.status,
                      "fetched_at": response.fetched_at.isoformat(timespec="seconds"),
                      "depth": depth, "seed": self.stored_url(seed)}
            self._archive(response, stored=True)
        queued, skipped = [], []
        if "nofollow" not in directives and depth < self.config.max_depth:
            queued, skipped = self._enqueue(links, depth + 1, seed)
        if decoded.errors:
            self.stats["undecodable_pages"] += 1
        if record is None:
            self.stats["noindex"] += 1
            return {"queued": queued, "skipped": skipped}
        self.kept += 1
        self.stats["pages_fetched"] += 1
        self.stats["bytes"] += len(response.body)
        return {"record": record, "queued": queued, "skipped": skipped}

    def seconds(self) -> float:
        """Time spent crawling, over every run of an interrupted crawl."""
        return self.earlier_seconds + time.perf_counter() - self.started

    def _commit(self, url: str, **outcome) -> None:
        meta = {"stats": dict(self.stats), "failures": dict(self.failures), "kept": self.kept,
                "seconds": self.seconds(),
                "hosts_in_scope": sorted(self.state.save_url(f"http://{netloc}/")
                                         for netloc in self.hosts_in_scope),
                "archives": {name: a.position() for name, a in self.archives.items()}}
        self.state.commit(url, meta=meta, **outcome)

    def _enqueue(self, links: list[str], depth: int, seed: str,
                 ) -> tuple[list[tuple[str, int, str]], list[str]]:
        queued, skipped = [], []
        for link in links:
            if link not in self.seen:
                self.seen.add(link)
                if self._in_scope(link, depth):
                    self.queue.put_nowait((link, depth, seed))
                    queued.append((link, depth, seed))
                else:
                    self.stats["out_of_scope"] += 1
                    skipped.append(link)
        return queued, skipped

    def _in_scope(self, url: str, depth: int) -> bool:
        if self.config.same_host and urlsplit(url).netloc not in self.hosts_in_scope:
            return False
        if depth == 0:
            return True
        if self.include and not any(p.search(url) for p in self.include):
            return False
        return not any(p.search(url) for p in self.exclude)

    async def _fetch(self, url: str, depth: int, fetched: list[str]) -> Response:
        """The response to store for ``url``, after redirects; else Skipped saying why."""
        for _ in range(MAX_REDIRECTS + 1):
            host = await self._allowed_host(url)
            response = await self._request(url, host)
            location = response.headers.get("location")
            if response.status not in REDIRECT_STATUSES or not location:
                break
            self._archive(response)
            target = self._redirect_target(location, url)
            if depth == 0:  # a seed's redirect (http -> https, www.) defines its site
                self.hosts_in_scope.add(urlsplit(target).netloc)
            if target in self.seen or not self._in_scope(target, depth):
                raise Skipped("out_of_scope", "redirect out of scope",
                              f"redirect to {target} (seen or out of scope)")
            self.seen.add(target)
            fetched.append(target)
            self.stats["redirects"] += 1
            url = target
        else:
            raise Skipped("pages_failed", "too many redirects",
                          f"more than {MAX_REDIRECTS} redirects")
        if not 200 <= response.status < 300:
            self._archive(response)
            raise Skipped("pages_failed", f"HTTP {response.status}")
        if media_type(response.headers.get("content-type", "")) not in TEXT_TYPES:
            self._archive(response)
            raise Skipped("non_html", "not text",
                          f"content type {response.headers.get('content-type')!r}")
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
          record_origin: str | None = None, *, resolver: Resolver | None = None,
          allowed_hosts: list[str] = ()) -> dict:
    """Crawl from ``seeds`` (default ``config.seeds``; when both are empty, this Python's
    docs served on loopback) into ``out_dir/data``; ``out_dir/failures.jsonl`` lists the
    URLs that gave no page and why, ``out_dir/archive/`` holds the WARC files.

    A crawl into an ``out_dir`` that holds an unfinished crawl with the same settings and
    seeds resumes it. With ``record_origin``, pages of the first seed's origin are
    recorded (url and id) as if served from that origin. ``resolver`` maps ``(host,
    port)`` to addresses (default: the system's DNS); ``allowed_hosts`` adds entries to
    ``config.allowed_private_hosts`` without changing the config."""
    seeds = list(config.seeds if seeds is None else seeds)
    shown = [redact_url(s) for s in seeds]  # what logs and errors say: no user:password
    if not seeds:
        from tasks.docserver import serve_python_docs

        with serve_python_docs() as url:
            log.info("crawl: serving this Python's documentation at %s (recorded as %s)",
                     url, DOCS_ORIGIN)
            served_host, served_port = host_port(url)
            return crawl(config, out_dir, [url], record_origin=DOCS_ORIGIN, resolver=resolver,
                         allowed_hosts=[f"{served_host}:{served_port}"])
    canonical = [canonical_url(s, strip_params=config.strip_query_params,
                               sort_query=config.sort_query) for s in seeds]
    if None in canonical:
        bad = shown[canonical.index(None)]
        raise StageInputError("crawl", f"seed {bad!r} is not an http(s) URL with a valid "
                                       "host name; give full URLs such as "
                                       "https://example.org/")
    canonical = list(dict.fromkeys(canonical))
    out_dir = Path(out_dir)
    save_url = load_url = str
    if record_origin:
        served = origin(canonical[0])
        save_url = functools.partial(_rebase, old=served, new=record_origin)
        load_url = functools.partial(_rebase, old=record_origin, new=served)
    fingerprint = hashlib.sha256(json.dumps(
        {"config": config.model_dump(mode="json"), "seeds": [save_url(s) for s in canonical]},
        sort_keys=True).encode()).hexdigest()
    state = CrawlState(out_dir, fingerprint, config.shard_size, save_url, load_url)
    try:
        if state.get("result"):  # finished, but the stage did not get to record it
            log.info("crawl: %s already holds this finished crawl", out_dir)
            return state.get("result")
        return _crawl_into(config, out_dir, canonical, shown, state, save_url, resolver,
                           allowed_hosts)
    finally:
        state.close()


def _rebase(url: str, old: str, new: str) -> str:
    return new + url[len(old):] if url.startswith(old + "/") else url


def _crawl_into(config: CrawlConfig, out_dir: Path, seeds: list[str], shown: list[str],
                state: CrawlState, stored_url: Callable[[str], str],
                resolver: Resolver | None, allowed_hosts: list[str]) -> dict:
    if state.resumed:
        state.set({"stats": {**state.get("stats", {}),
                             "resumes": state.get("stats", {}).get("resumes", 0) + 1}})
        log.info("crawl: resuming the interrupted crawl in %s (%d pages kept, %d URLs queued)",
                 out_dir, state.get("kept", 0), len(state.frontier()))
    else:
        _remove_outputs(out_dir)
        state.add_seeds(seeds)
        log.info("crawl: %d seed(s) %s, up to %d pages at depth <= %d", len(seeds), shown,
                 config.max_pages, config.max_depth)
    archives = {}
    if config.archive:
        from tasks.crawl_archive import WarcArchive

        positions = state.get("archives", {})
        archives = {name: WarcArchive(out_dir / "archive", name, positions.get(name))
                    for name in ARCHIVES}
    crawler = Crawler(config, seeds, state, archives, stored_url, resolver, allowed_hosts)
    try:
        _run(crawler.run)
    finally:
        for archive in archives.values():
            archive.close()
    state.write_shard()  # the last, partial shard
    failures = [json.dumps(f) for f in state.failures()]
    write_text_atomic(out_dir / "failures.jsonl", "".join(line + "\n" for line in failures))
    seconds = crawler.seconds()
    stats = {**crawler.stats, "seconds": round(seconds, 3),
             "pages_per_second": round(crawler.kept / seconds, 3) if seconds else 0.0}
    summary = redact_secrets(", ".join(f"{reason}: {n}"
                                       for reason, n in crawler.failures.most_common(8)))
    log.info("crawl: kept %d pages in %.1fs (%.1f pages/s, %d requests, %d retries); "
             "not kept: %s", crawler.kept, seconds, stats["pages_per_second"],
             stats["requests"], stats["retries"], summary or "none")
    if crawler.kept == 0:
        state.reset()  # nothing worth resuming: a retry starts over
        raise StageInputError(
            "crawl", f"no pages could be fetched from {shown}: {summary or 'no links found'}; "
                     "check the seeds are reachable and serve text/html or text/plain, that "
                     f"robots.txt allows user agent {crawler.agent!r}, that "
                     "crawl.allowed_private_hosts names any private host, and the include/"
                     "exclude patterns")
    write_text_atomic(out_dir / "crawl-report.md", crawl_report_markdown(stats))
    result = {"count": crawler.kept, "stats": stats,
              "artifacts": {"failures": "failures.jsonl", "report": "crawl-report.md"}}
    if archives:  # not an artifact: MLflow would get a copy of every page
        result["archive"] = "archive"
    state.finish(result)
    return result


def _remove_outputs(out_dir: Path) -> None:
    """Clear what an earlier, different crawl left in ``out_dir``."""
    for path in [*(out_dir / "data").glob("shard-*.parquet"),
                 *(out_dir / "archive").glob("*.warc.gz"), out_dir / "failures.jsonl",
                 out_dir / "crawl-report.md"]:
        path.unlink(missing_ok=True)
