"""The crawler against real HTTP servers on 127.0.0.1 (http.server in a thread)."""

import asyncio
import hashlib
import itertools
import json
import logging
import sys
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from pydantic import ValidationError

from tasks.crawl import DOCS_ORIGIN, CrawlConfig, canonical_url, crawl, resolve_snapshot
from tasks.docserver import serve_python_docs
from tasks.shards import iter_records
from tasks.stage import StageInputError


class Site:
    """A small website: ``routes`` maps a path to (status, headers, body) or to a function
    of the request number for that path returning one. Records every request."""

    def __init__(self, delay: float = 0.0):
        self.routes: dict = {}
        self.requests: list[tuple[str, float]] = []
        self.delay = delay
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                with site.lock:
                    site.requests.append((self.path, time.monotonic()))
                    number = sum(1 for p, _ in site.requests if p == self.path)
                    site.in_flight += 1
                    site.max_in_flight = max(site.max_in_flight, site.in_flight)
                try:
                    time.sleep(site.delay)
                    route = site.routes.get(self.path, (404, {}, "not found"))
                    status, headers, body = route(number) if callable(route) else route
                    body = body.encode() if isinstance(body, str) else body
                    self.send_response(status)
                    headers = {"Content-Type": "text/html; charset=utf-8", **headers}
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(body)
                finally:
                    with site.lock:
                        site.in_flight -= 1

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def page(self, path: str, *links: str, extra: str = "") -> None:
        anchors = "".join(f'<a href="{link}">{link}</a> ' for link in links)
        html = f"<html><head>{extra}</head><body><p>page {path}</p>{anchors}</body></html>"
        self.routes[path] = (200, {}, html)

    def paths(self) -> list[str]:
        return [p for p, _ in self.requests if p != "/robots.txt"]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def site():
    server = Site()
    yield server
    server.close()


LOOPBACK = ["127.0.0.1"]  # the test sites: refused by the SSRF guard unless allowed


def run(tmp_path, seeds, **settings):
    config = CrawlConfig(**{"backoff_seconds": 0.01, "timeout_seconds": 5,
                            "allowed_private_hosts": LOOPBACK, **settings})
    result = crawl(config, tmp_path / "out", seeds=seeds)
    pages = {r["url"]: r for r in iter_records(tmp_path / "out" / "data")}
    return result, pages


def test_follows_same_host_links_up_to_the_depth_limit(tmp_path, site):
    site.page("/", "/a", "b#section", "/a?x=1")
    site.page("/a", "/a1")
    site.page("/b", "/")
    site.page("/a?x=1")
    site.page("/a1", "/a2")
    site.page("/a2")
    result, pages = run(tmp_path, [site.url], max_depth=2)
    assert set(pages) == {site.url + p for p in ("", "a", "b", "a?x=1", "a1")}
    assert "/a2" not in site.paths()  # depth 3
    page = pages[site.url + "a1"]
    assert page["depth"] == 2 and page["seed"] == site.url and page["status"] == 200
    assert page["id"] == hashlib.sha1(page["url"].encode()).hexdigest()[:16]
    assert "page /a1" in page["text"] and page["content_type"].startswith("text/html")
    assert result["count"] == 5 and result["stats"]["pages_fetched"] == 5
    assert sorted(site.paths()) == sorted(set(site.paths()))  # each URL fetched once


def test_page_limit_stops_without_fetching_pages_it_would_discard(tmp_path, site):
    site.page("/", *[f"/p{i}" for i in range(20)])
    for i in range(20):
        site.page(f"/p{i}")
    result, pages = run(tmp_path, [site.url], max_pages=3, concurrency=4,
                        per_host_concurrency=4)
    assert result["count"] == 3 and len(pages) == 3
    assert len(site.paths()) == 3


def test_robots_txt_disallow_is_respected(tmp_path, site):
    site.routes["/robots.txt"] = (200, {"Content-Type": "text/plain"},
                                  "User-agent: *\nDisallow: /private\n")
    site.page("/", "/private/secret", "/public")
    site.page("/private/secret")
    site.page("/public")
    result, pages = run(tmp_path, [site.url])
    assert set(pages) == {site.url, site.url + "public"}
    assert "/private/secret" not in site.paths()
    assert result["stats"]["robots_disallowed"] == 1
    assert site.requests[0][0] == "/robots.txt"
    assert [p for p, _ in site.requests].count("/robots.txt") == 1


def test_robots_meta_tags_and_nofollow_links(tmp_path, site):
    links = ('<a href="/hidden">h</a><a href="/closed">c</a>'
             '<a rel="nofollow" href="/nofollow-target">n</a>')
    site.routes["/"] = (200, {}, links)
    site.page("/hidden", "/via-hidden", extra='<meta name="robots" content="noindex">')
    site.page("/closed", "/via-closed", extra='<meta name="ROBOTS" content="nofollow">')
    site.page("/via-hidden")
    site.page("/via-closed")
    result, pages = run(tmp_path, [site.url])
    assert set(pages) == {site.url, site.url + "closed", site.url + "via-hidden"}
    assert "/via-closed" not in site.paths() and "/nofollow-target" not in site.paths()
    assert result["stats"]["noindex"] == 1


def test_transient_503_is_retried_then_succeeds(tmp_path, site):
    site.routes["/"] = lambda n: (503, {}, "busy") if n <= 2 else (200, {}, "<p>finally</p>")
    result, pages = run(tmp_path, [site.url])
    assert site.paths() == ["/", "/", "/"]
    assert "finally" in pages[site.url]["text"]
    assert result["stats"]["retries"] == 2 and result["stats"]["pages_failed"] == 0


def test_retry_after_is_honoured(tmp_path, site):
    site.routes["/"] = lambda n: ((429, {"Retry-After": "1"}, "slow down") if n == 1
                                  else (200, {}, "<p>ok</p>"))
    result, _ = run(tmp_path, [site.url], backoff_seconds=0.01)
    times = [t for p, t in site.requests if p == "/"]
    assert len(times) == 2 and times[1] - times[0] >= 0.95
    assert result["count"] == 1


def test_oversized_pages_are_abandoned(tmp_path, site):
    site.page("/", "/declared", "/streamed", "/small")
    site.routes["/declared"] = (200, {"Content-Length": "50000"}, "x" * 50_000)
    site.routes["/streamed"] = (200, {}, "y" * 50_000)  # no length: cut while reading
    site.page("/small")
    result, pages = run(tmp_path, [site.url], max_bytes=10_000)
    assert set(pages) == {site.url, site.url + "small"}
    assert result["stats"]["too_large"] == 2


def test_only_text_pages_are_kept(tmp_path, site):
    site.page("/", "/image.png", "/notes.txt")
    site.routes["/image.png"] = (200, {"Content-Type": "image/png"}, b"\x89PNG")
    site.routes["/notes.txt"] = (200, {"Content-Type": "text/plain"}, "plain words")
    result, pages = run(tmp_path, [site.url])
    assert set(pages) == {site.url, site.url + "notes.txt"}
    assert result["stats"]["non_html"] == 1


def test_delay_spaces_out_requests_to_a_host(tmp_path, site):
    site.page("/", "/a", "/b")
    site.page("/a")
    site.page("/b")
    run(tmp_path, [site.url], delay_seconds=0.2, per_host_concurrency=2)
    starts = [t for _, t in site.requests]  # robots.txt, /, /a, /b
    assert len(starts) == 4
    assert min(b - a for a, b in itertools.pairwise(starts)) >= 0.19


def test_per_host_concurrency_is_never_exceeded(tmp_path):
    site = Site(delay=0.1)
    try:
        site.page("/", *[f"/p{i}" for i in range(12)])
        for i in range(12):
            site.page(f"/p{i}")
        result, _ = run(tmp_path, [site.url], concurrency=8, per_host_concurrency=2)
    finally:
        site.close()
    assert result["count"] == 13
    assert site.max_in_flight == 2  # reached, never exceeded


def test_links_to_other_hosts_are_followed_only_without_same_host(tmp_path, site):
    other = Site()
    try:
        other.page("/elsewhere")
        site.page("/", other.url + "elsewhere", "/local")
        site.page("/local")
        result, pages = run(tmp_path / "a", [site.url])
        assert set(pages) == {site.url, site.url + "local"} and other.paths() == []
        assert result["stats"]["out_of_scope"] == 1
        _, pages = run(tmp_path / "b", [site.url], same_host=False)
        assert other.url + "elsewhere" in pages
    finally:
        other.close()


def test_include_and_exclude_patterns_filter_discovered_links(tmp_path, site):
    site.page("/", "/docs/a", "/docs/old/b", "/blog/c")
    for path in ("/docs/a", "/docs/old/b", "/blog/c"):
        site.page(path)
    _, pages = run(tmp_path, [site.url], include=["/docs/"], exclude=["/old/"])
    assert set(pages) == {site.url, site.url + "docs/a"}


def test_redirects_are_followed_and_stored_under_the_final_url(tmp_path, site):
    site.page("/", "/old")
    site.routes["/old"] = (301, {"Location": "/new"}, "")
    site.page("/new", "/old")
    result, pages = run(tmp_path, [site.url])
    assert set(pages) == {site.url, site.url + "new"}
    assert result["stats"]["redirects"] == 1


def test_nothing_fetched_raises_a_stage_input_error(tmp_path, site):
    site.routes["/"] = (404, {}, "gone")
    with pytest.raises(StageInputError, match="no pages could be fetched") as error:
        run(tmp_path, [site.url])
    assert "HTTP 404" in str(error.value) and site.url in str(error.value)


def test_robots_txt_server_error_means_disallow_all(tmp_path, site):
    site.routes["/robots.txt"] = (503, {}, "down")
    site.page("/")
    with pytest.raises(StageInputError, match="robots.txt answered HTTP 503"):
        run(tmp_path, [site.url], retries=1)
    assert site.paths() == []


def test_unreachable_seed_names_the_network_error(tmp_path):
    closed = Site()
    closed.close()
    with pytest.raises(StageInputError, match="ConnectError"):
        run(tmp_path, [closed.url], retries=0)


def test_crawl_works_when_called_inside_a_running_event_loop(tmp_path, site):
    site.page("/")

    async def inside_loop():
        return run(tmp_path, [site.url])

    result, _ = asyncio.run(inside_loop())
    assert result["count"] == 1


def test_small_crawl_of_the_python_docs_server(tmp_path):
    with serve_python_docs() as url:
        result, pages = run(tmp_path, [url], max_pages=10)
    assert result["count"] == 10
    assert all(page["status"] == 200 for page in pages.values())
    modules = [u.removeprefix(url).removesuffix(".html") for u in pages]
    assert {"", "index", "topics", "keywords"} <= set(modules)
    assert all(m.split(".")[0] in sys.stdlib_module_names
               for m in set(modules) - {"", "index", "topics", "keywords"})
    assert len({page["id"] for page in pages.values()}) == 10
    assert all("Pydoc" in page["text"] for page in pages.values())


def test_without_seeds_the_embedded_python_docs_are_crawled_under_stable_ids(tmp_path):
    # the docs server listens on a new port each time; page urls and ids must not change
    first = crawl(CrawlConfig(max_pages=3), tmp_path / "a")
    second = crawl(CrawlConfig(max_pages=3), tmp_path / "b")
    rows = {d: list(iter_records(tmp_path / d / "data", ["id", "url", "seed"])) for d in "ab"}
    assert first["count"] == second["count"] == 3
    assert all(r["url"].startswith(DOCS_ORIGIN + "/") and r["seed"] == DOCS_ORIGIN + "/"
               for r in rows["a"])
    assert {r["id"] for r in rows["a"]} == {r["id"] for r in rows["b"]}


def test_url_canonicalization():
    assert canonical_url("HTTP://Example.ORG:80/a/b?q=1#frag") == "http://example.org/a/b?q=1"
    assert canonical_url("https://example.org:443") == "https://example.org/"
    assert canonical_url("../c d.html", "http://h:8080/a/b/") == "http://h:8080/a/c%20d.html"
    assert canonical_url("mailto:someone@example.org") is None
    assert canonical_url("javascript:void(0)", "http://h/") is None


def test_snapshot_labels_and_config_validation():
    now = datetime(2024, 5, 17, 23, 30, tzinfo=timezone.utc)
    assert resolve_snapshot("daily", now) == "2024-05-17"
    assert resolve_snapshot("fixed", now) == "fixed"
    with pytest.raises(ValidationError, match="not an http"):
        CrawlConfig(seeds=["ftp://example.org/"])
    with pytest.raises(ValidationError, match="regular expression"):
        CrawlConfig(include=["(unclosed"])
    with pytest.raises(ValidationError):
        CrawlConfig(max_pagez=3)


SECRET = "pa55-SECRET"


def with_credentials(url: str) -> str:
    return url.replace("http://", f"http://crawler:{SECRET}@", 1)


def test_seed_credentials_never_reach_logs_errors_or_shards(tmp_path, site, caplog):
    site.page("/", "/a", "/missing")
    site.page("/a")
    caplog.set_level(logging.DEBUG, logger="tasks.crawl")
    result, pages = run(tmp_path, [with_credentials(site.url)])
    assert result["count"] == 2 and set(pages) == {site.url, site.url + "a"}
    assert "crawl: 1 seed(s)" in caplog.text and "***@127.0.0.1" in caplog.text
    assert "/missing" in caplog.text  # the failed URL is logged, without credentials
    out = tmp_path / "out"
    stored = [str(v) for r in iter_records(out / "data") for v in r.values()]
    assert SECRET not in caplog.text
    assert not any(SECRET in value for value in stored)
    assert SECRET not in (out / "failures.jsonl").read_text()
    assert SECRET not in json.dumps(result)


def test_seed_credentials_are_masked_in_the_config_and_in_errors(tmp_path, caplog):
    closed = Site()
    closed.close()
    config = CrawlConfig(seeds=[with_credentials(closed.url)], retries=0,
                         allowed_private_hosts=LOOPBACK)
    assert config.seeds == [closed.url.replace("http://", "http://***@")]
    assert SECRET not in config.model_dump_json()
    with pytest.raises(ValidationError) as invalid:
        CrawlConfig(seeds=[f"ftp://user:{SECRET}@example.org/"])
    message = invalid.value.errors()[0]["msg"]  # pydantic's str() adds the raw input
    assert SECRET not in message and "ftp://***@example.org/" in message
    caplog.set_level(logging.DEBUG, logger="tasks.crawl")
    with pytest.raises(StageInputError, match="no pages could be fetched") as error:
        crawl(config.model_copy(update={"seeds": []}), tmp_path / "out",
              seeds=[with_credentials(closed.url)])
    assert SECRET not in str(error.value) and "***@127.0.0.1" in str(error.value)
    assert SECRET not in caplog.text


def test_a_malformed_base_href_falls_back_to_the_page_url():
    from tasks.crawl import page_links

    html = '<html><head><base href="http://[oops/"></head><body><a href="a">a</a></body></html>'
    links, _ = page_links(html, "http://h/dir/page", "forgeline")
    assert links == ["http://h/dir/a"]


def test_a_page_with_a_malformed_base_href_does_not_stop_the_crawl(tmp_path, site):
    html = ('<html><head><base href="http://[oops/"></head><body>'
            '<a href="/a">a</a> <a href="/b">b</a></body></html>')
    site.routes["/"] = (200, {}, html)
    site.page("/a")
    site.page("/b")
    result, pages = run(tmp_path, [site.url])
    assert set(pages) == {site.url, site.url + "a", site.url + "b"}
    assert result["count"] == 3


def test_an_unexpected_error_on_one_page_is_a_committed_failure_not_the_end(
        tmp_path, site, monkeypatch, caplog):
    import tasks.crawl

    site.page("/", "/a", "/bad", "/b")
    site.page("/a")
    site.page("/b")
    site.page("/bad", "/c")
    site.page("/c")
    real_decode = tasks.crawl.decode

    def decode(body, content_type):
        if b"page /bad" in body:  # a bug that only this page meets, quoting a secret
            raise KeyError(f"http://crawler:{SECRET}@127.0.0.1/ no such key")
        return real_decode(body, content_type)

    monkeypatch.setattr(tasks.crawl, "decode", decode)
    caplog.set_level(logging.DEBUG, logger="tasks.crawl")
    result, pages = run(tmp_path, [site.url])
    assert set(pages) == {site.url + p for p in ("", "a", "b")}  # the others are kept
    out = tmp_path / "out"
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert failures == [{"url": site.url + "bad", "counted_as": "pages_failed",
                         "reason": "internal error (KeyError)",
                         "detail": "internal error (KeyError) while visiting this URL; "
                                   "the crawl log has the traceback"}]
    assert result["stats"]["pages_failed"] == 1
    assert result["stats"]["failed_internal_error_keyerror"] == 1
    assert "KeyError" in caplog.text and SECRET not in caplog.text
    assert SECRET not in (out / "failures.jsonl").read_text()
    # committed: a rerun into the directory gives the finished crawl, fetching nothing
    before = len(site.requests)
    monkeypatch.setattr(tasks.crawl, "decode", real_decode)
    again, _ = run(tmp_path, [site.url])
    assert again == result and len(site.requests) == before


def test_the_crawl_cache_key_covers_every_module_that_shapes_its_output():
    from pathlib import Path

    import tasks.crawl

    files = {Path(getattr(m, "__file__", m)).name for m in tasks.crawl.CODE_MODULES}
    crawl_modules = {p.name for p in Path(tasks.crawl.__file__).parent.glob("crawl_*.py")}
    assert crawl_modules | {"redact.py"} <= files  # crawl_http.py among them
