"""An interrupted crawl resumes from its saved frontier: no finished page is fetched again."""

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

import tasks.crawl_state
from tasks.crawl import DOCS_ORIGIN, CrawlConfig, crawl, crawl_report_markdown
from tasks.crawl_state import STATE_FILE
from tasks.shards import iter_records, shard_paths
from tasks.stage import load_manifest, partial_dir, run_stage_in
from tests.tasks.test_crawl import Site
from tests.tasks.test_crawl_archive import read_warcs

ROOT = Path(__file__).resolve().parents[2]
PAGES = 40
SETTINGS = {"allowed_private_hosts": ["127.0.0.1"], "backoff_seconds": 0.01, "concurrency": 2,
            "per_host_concurrency": 2, "shard_size": 7, "max_pages": 1000}
# Crawls argv[2] into argv[1] with the settings in argv[3]; killed by the test mid-way.
CRAWL_SCRIPT = """
import json, sys
from tasks.crawl import CrawlConfig, crawl
crawl(CrawlConfig(**json.loads(sys.argv[3])), sys.argv[1], seeds=[sys.argv[2]])
"""


def make_site(delay: float = 0.0) -> Site:
    """A site of PAGES pages, two levels deep, each page linking to a few others."""
    site = Site(delay=delay)
    site.page("/", *[f"/p{i}" for i in range(0, PAGES, 4)])
    for i in range(PAGES):
        site.page(f"/p{i}", *[f"/p{(i + k) % PAGES}" for k in (1, 2, 3)], "/missing")
    return site


def documents(out: Path) -> set[tuple[str, str]]:
    return {(r["url"], r["text"]) for r in iter_records(out / "data", ["url", "text"])}


def finished_paths(out: Path, site: Site) -> set[str]:
    """The URLs the interrupted crawl had committed as finished, as request paths."""
    with sqlite3.connect(out / STATE_FILE) as db:
        rows = db.execute("SELECT url FROM urls WHERE state = 'done'").fetchall()
    return {"/" + url.removeprefix(site.url) for (url,) in rows}


def test_a_killed_crawl_resumes_without_fetching_finished_pages_again(tmp_path):
    site = make_site(delay=0.05)
    try:
        out = tmp_path / "out"
        process = subprocess.Popen([sys.executable, "-c", CRAWL_SCRIPT, str(out), site.url,
                                    json.dumps(SETTINGS)], cwd=ROOT)
        deadline = time.monotonic() + 60
        while len(site.paths()) < 15 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        process.kill()  # SIGKILL: no clean-up, maybe in the middle of a write
        process.wait()
        assert len(site.paths()) >= 15, "the crawl in the subprocess did not get going"
        with sqlite3.connect(out / STATE_FILE) as db:
            assert db.execute("SELECT value FROM meta WHERE key = 'result'").fetchone() is None
        finished = finished_paths(out, site)
        assert len(finished) >= 5
        before = len(site.requests)

        result = crawl(CrawlConfig(**SETTINGS), out, seeds=[site.url])
        again = {path for path, _ in site.requests[before:]}
        assert not again & finished, f"fetched again after resuming: {again & finished}"
        assert "/robots.txt" in again  # politeness state is not saved: robots.txt is re-read

        full = crawl(CrawlConfig(**SETTINGS), tmp_path / "full", seeds=[site.url])
    finally:
        site.close()
    assert documents(out) == documents(tmp_path / "full")
    assert result["count"] == full["count"] == PAGES + 1
    assert result["stats"]["resumes"] == 1 and full["stats"]["resumes"] == 0
    ids = [r["id"] for r in iter_records(out / "data", ["id"])]
    assert len(ids) == len(set(ids)) == PAGES + 1
    assert [p.name for p in shard_paths(out / "data")] == \
        [p.name for p in shard_paths(tmp_path / "full" / "data")]  # shards of shard_size
    # the archive of stored pages holds each page once and reads to its end
    stored = read_warcs(sorted((out / "archive").glob("crawl-*.warc.gz")))
    uris = [uri for kind, uri, *_ in stored if kind == "response"]
    assert sorted(uris) == sorted(url for url, _ in documents(out))
    failures = (out / "failures.jsonl").read_text().splitlines()
    assert [json.loads(line)["url"] for line in failures] == [site.url + "missing"]


class Interrupted(Exception):
    """Stands in for a crash in the middle of a crawl."""


def test_the_stage_runner_resumes_an_interrupted_crawl(tmp_path, monkeypatch):
    site = make_site()
    config = CrawlConfig(**SETTINGS)
    final = tmp_path / "stages" / "crawl-key"
    build = lambda out: crawl(config, out, seeds=[site.url])
    commit = tasks.crawl_state.CrawlState.commit
    commits = []

    def failing_commit(self, url, **outcome):
        if len(commits) == 12:
            raise Interrupted("the crawl stopped here")
        commit(self, url, **outcome)
        commits.append(url)

    try:
        monkeypatch.setattr(tasks.crawl_state.CrawlState, "commit", failing_commit)
        with pytest.raises(Interrupted):
            run_stage_in(final, "crawl", build, resumable=True, log=lambda _: None)
        assert load_manifest(final) is None and partial_dir(final).is_dir()
        monkeypatch.setattr(tasks.crawl_state.CrawlState, "commit", commit)
        before = len(site.requests)
        manifest = run_stage_in(final, "crawl", build, resumable=True, log=lambda _: None)
    finally:
        site.close()
    again = [path for path, _ in site.requests[before:]]
    done = {"/" + url.removeprefix(site.url) for url in commits}
    assert not done & set(again)
    assert manifest["count"] == PAGES + 1 and manifest["stats"]["resumes"] == 1
    assert len({r["id"] for r in iter_records(manifest["output"], ["id"])}) == PAGES + 1


def test_the_embedded_docs_crawl_resumes_on_a_new_server_port(tmp_path, monkeypatch):
    commit = tasks.crawl_state.CrawlState.commit
    commits = []

    def failing_commit(self, url, **outcome):
        if len(commits) == 4:
            raise Interrupted("the crawl stopped here")
        commit(self, url, **outcome)
        commits.append(url)

    monkeypatch.setattr(tasks.crawl_state.CrawlState, "commit", failing_commit)
    with pytest.raises(Interrupted):
        crawl(CrawlConfig(max_pages=8), tmp_path / "out")
    first_port = urlsplit(commits[0]).port
    with sqlite3.connect(tmp_path / "out" / STATE_FILE) as db:
        saved = {url for (url,) in db.execute("SELECT url FROM urls")}
    assert len(saved) > 4 and all(url.startswith(DOCS_ORIGIN + "/") for url in saved)
    served = []

    def recording_commit(self, url, **outcome):
        served.append(url)
        commit(self, url, **outcome)

    monkeypatch.setattr(tasks.crawl_state.CrawlState, "commit", recording_commit)
    result = crawl(CrawlConfig(max_pages=8), tmp_path / "out")
    assert result["count"] == 8 and result["stats"]["resumes"] == 1
    assert {urlsplit(url).port for url in served} != {first_port}  # a new server
    urls = [r["url"] for r in iter_records(tmp_path / "out" / "data", ["url"])]
    assert len(set(urls)) == 8 and all(url.startswith(DOCS_ORIGIN + "/") for url in urls)


def test_a_finished_crawl_rerun_into_its_directory_fetches_nothing(tmp_path):
    site = make_site()
    try:
        first = crawl(CrawlConfig(**SETTINGS), tmp_path / "out", seeds=[site.url])
        before = len(site.requests)
        second = crawl(CrawlConfig(**SETTINGS), tmp_path / "out", seeds=[site.url])
        assert len(site.requests) == before and second == first
        # other settings into the same directory: a crawl of its own, from scratch
        third = crawl(CrawlConfig(**{**SETTINGS, "max_pages": 5}), tmp_path / "out",
                      seeds=[site.url])
    finally:
        site.close()
    assert third["count"] == 5 and len(documents(tmp_path / "out")) == 5


def test_crawl_report_counts_statuses_reasons_bytes_and_undecodable_pages(tmp_path):
    site = Site()
    try:
        site.routes["/robots.txt"] = (200, {"Content-Type": "text/plain"},
                                      "User-agent: *\nDisallow: /secret\n")
        site.page("/", "/bad-bytes", "/missing", "/secret", "http://10.9.9.9/", "/moved")
        site.routes["/bad-bytes"] = (200, {}, b"<p>" + b"broken \xff\xfe utf-8 " + b"x" * 900)
        site.routes["/moved"] = (301, {"Location": "/bad-bytes"}, "")
        result = crawl(CrawlConfig(**{**SETTINGS, "same_host": False}), tmp_path / "out",
                       seeds=[site.url])
    finally:
        site.close()
    stats = result["stats"]
    assert stats["status_200"] == 2 and stats["status_404"] == 1 and stats["status_301"] == 1
    assert stats["failed_http_404"] == 1 and stats["failed_disallowed_by_robots_txt"] == 1
    assert stats["failed_private_address"] == stats["ssrf_refused"] == 1
    assert stats["failed_redirect_out_of_scope"] == 1  # /moved -> an already seen page
    assert stats["undecodable_pages"] == 1 and stats["pages_fetched"] == 2
    assert stats["bytes_downloaded"] >= stats["bytes"] > 900
    assert stats["pages_per_second"] > 0
    assert all(isinstance(v, int | float) for v in stats.values())  # MLflow metrics
    report = crawl_report_markdown(stats)
    assert report.startswith("## Crawl report")
    for row in ("| pages stored | 2 |", "| URLs refused by the SSRF guard | 1 |",
                "| 404 | 1 |", "| http 404 | 1 |", "| disallowed by robots txt | 1 |",
                "| pages with undecodable bytes | 1 |", "| URLs excluded by robots.txt | 1 |"):
        assert row in report, row


def test_an_unreadable_state_file_means_starting_over(tmp_path):
    site = make_site()
    try:
        out = tmp_path / "out"
        out.mkdir()
        (out / STATE_FILE).write_bytes(b"not a database" * 100)
        result = crawl(CrawlConfig(**SETTINGS), out, seeds=[site.url])
    finally:
        site.close()
    assert result["count"] == PAGES + 1 and result["stats"]["resumes"] == 0
