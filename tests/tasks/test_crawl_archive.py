"""Every response of a crawl goes to WARC files that any reader parses back, byte for byte."""

import gzip

import pytest
from fastwarc.warc import ArchiveIterator as FastArchiveIterator
from warcio.archiveiterator import ArchiveIterator

from tasks.charset import decode
from tasks.crawl_archive import Exchange, WarcArchive
from tasks.shards import iter_records
from tests.tasks.test_crawl import Site, run

LATIN1_PAGE = "<html><body><p>Café crème, déjà vu</p></body></html>".encode("latin-1")
GZIP_PAGE = b"<html><body><p>sent compressed</p></body></html>"


@pytest.fixture
def site():
    server = Site()
    yield server
    server.close()


def read_warcs(paths) -> list:
    """(type, target URI, WARC headers, HTTP status line, HTTP headers, body) of each record."""
    records = []
    for path in paths:
        with open(path, "rb") as stream:
            for record in ArchiveIterator(stream):
                http = record.http_headers
                records.append((record.rec_type, record.rec_headers.get_header("WARC-Target-URI"),
                                record.rec_headers, http.statusline if http else None, http,
                                record.content_stream().read()))
    return records


def test_the_warc_archive_round_trips_what_the_server_sent(tmp_path, site):
    site.page("/", "/latin", "/gz", "/old", "/missing", "/image.png")
    site.routes["/latin"] = (200, {"Content-Type": "text/html; charset=iso-8859-1"}, LATIN1_PAGE)
    site.routes["/gz"] = (200, {"Content-Encoding": "gzip"}, gzip.compress(GZIP_PAGE))
    site.routes["/old"] = (301, {"Location": "/new"}, "")
    site.page("/new")
    site.routes["/missing"] = (404, {}, "not here")
    site.routes["/image.png"] = (200, {"Content-Type": "image/png"}, b"\x89PNG")
    result, pages = run(tmp_path, [site.url])
    out = tmp_path / "out"
    site.close()  # from here on, no network: everything comes from the archive

    stored = read_warcs(sorted((out / "archive").glob("crawl-*.warc.gz")))
    responses = {uri: rest for kind, uri, *rest in stored if kind == "response"}
    assert set(responses) == set(pages) == {site.url + p for p in ("", "latin", "gz", "new")}
    assert sorted(kind for kind, *_ in stored) == ["request"] * 4 + ["response"] * 4 + ["warcinfo"]
    for url, page in pages.items():
        warc_headers, status, http, body = responses[url]
        assert status == "200 OK"
        assert warc_headers.get_header("WARC-Date") == \
            page["fetched_at"].replace("+00:00", "Z")
        assert http.get_header("Content-Type") == page["content_type"]
        # extraction redone from the archive gives the stored text
        assert decode(body, http.get_header("Content-Type")).text == page["text"]
    assert responses[site.url + "latin"][3] == LATIN1_PAGE
    gz_headers = responses[site.url + "gz"][2]
    assert responses[site.url + "gz"][3] == GZIP_PAGE  # archived decoded, as Common Crawl does
    assert gz_headers.get_header("X-Crawler-Content-Encoding") == "gzip"
    assert gz_headers.get_header("Content-Encoding") is None
    assert gz_headers.get_header("Content-Length") == str(len(GZIP_PAGE))
    requests = [(uri, http) for kind, uri, _, _, http, _ in stored if kind == "request"]
    assert all(http.protocol == "GET" and http.get_header("User-Agent").startswith("forgeline")
               for _, http in requests)

    others = read_warcs(sorted((out / "archive").glob("crawldiagnostics-*.warc.gz")))
    diagnostics = {(uri.removeprefix(site.url), status.split()[0])
                   for kind, uri, _, status, _, _ in others if kind == "response"}
    assert diagnostics == {("robots.txt", "404"), ("old", "301"), ("missing", "404"),
                           ("image.png", "200")}
    redirect = next(r for r in others if r[0] == "response" and r[1].endswith("/old"))
    assert redirect[4].get_header("Location") == "/new"
    assert redirect[2].get_header("WARC-Truncated") == "unspecified"  # body not downloaded
    assert result["archive"] == "archive"


def test_fastwarc_reads_the_archive_and_its_digests_verify(tmp_path, site):
    site.page("/", "/a")
    site.page("/a")
    _, pages = run(tmp_path, [site.url])
    path, = (tmp_path / "out" / "archive").glob("crawl-*.warc.gz")
    with open(path, "rb") as stream:  # a record is readable only while iterating
        verified = [r.verify_block_digest() for r in FastArchiveIterator(stream, parse_http=False)]
    assert len(verified) == 5 and all(verified)  # warcinfo, 2 x (response, request)
    with open(path, "rb") as stream:
        uris = {r.headers.get("WARC-Target-URI") for r in FastArchiveIterator(stream)
                if r.headers.get("WARC-Type") == "response"}
    assert uris == set(pages)


def test_no_archive_when_it_is_switched_off(tmp_path, site):
    site.page("/")
    result, pages = run(tmp_path, [site.url], archive=False)
    assert len(pages) == 1 and "archive" not in result
    assert not (tmp_path / "out" / "archive").exists()


def test_the_embedded_docs_are_archived_under_their_recorded_urls(tmp_path):
    from tasks.crawl import DOCS_ORIGIN, CrawlConfig, crawl

    crawl(CrawlConfig(max_pages=2), tmp_path / "out")
    stored = read_warcs((tmp_path / "out" / "archive").glob("crawl-*.warc.gz"))
    uris = {uri for kind, uri, *_ in stored if kind == "response"}
    pages = {r["url"] for r in iter_records(tmp_path / "out" / "data", ["url"])}
    assert uris == pages and all(uri.startswith(DOCS_ORIGIN + "/") for uri in uris)


def test_an_archive_cut_by_a_kill_is_truncated_to_its_last_whole_record(tmp_path):
    def exchange(n: int) -> Exchange:
        return Exchange(f"http://h/{n}", f"GET /{n} HTTP/1.1", [("Host", "h")], "HTTP/1.1",
                        200, "OK", [("Content-Type", "text/plain")], f"page {n}".encode(),
                        truncated="")

    archive = WarcArchive(tmp_path, "crawl")
    archive.write(exchange(1))
    position = archive.position()
    archive.write(exchange(2))
    archive.close()
    with open(tmp_path / position[0], "ab") as file:
        file.truncate(file.tell() - 10)  # the second record, half written
    resumed = WarcArchive(tmp_path, "crawl", position)
    resumed.write(exchange(3))
    resumed.close()
    bodies = [body for kind, _, _, _, _, body in read_warcs(resumed.files()) if kind == "response"]
    assert bodies == [b"page 1", b"page 3"]


def test_archive_files_roll_over_at_the_size_limit(tmp_path):
    archive = WarcArchive(tmp_path, "crawl", max_file_bytes=1)
    for n in range(3):
        archive.write(Exchange(f"http://h/{n}", f"GET /{n} HTTP/1.1", [], "HTTP/1.1", 200, "OK",
                               [], b"x", truncated=""))
    archive.close()
    assert [p.name for p in archive.files()] == [f"crawl-0000{n}.warc.gz" for n in range(4)]


def test_cut_and_unread_bodies_are_archived_without_their_encoding_headers(tmp_path, site):
    page = b"<html><body>" + b"compressible words " * 2000 + b"</body></html>"
    site.page("/", "/big", "/missing")
    site.routes["/big"] = (200, {"Content-Encoding": "gzip"}, gzip.compress(page))
    missing = gzip.compress(b"not here")
    site.routes["/missing"] = (404, {"Content-Encoding": "gzip",
                                     "Content-Length": str(len(missing))}, missing)
    run(tmp_path, [site.url], max_bytes=10_000)
    others = read_warcs(sorted((tmp_path / "out" / "archive").glob("crawldiagnostics-*")))
    responses = {uri.removeprefix(site.url): (warc, http, body)
                 for kind, uri, warc, _, http, body in others if kind == "response"}
    warc, http, body = responses["big"]  # cut at max_bytes, after decoding
    assert warc.get_header("WARC-Truncated") == "length"
    assert body == page[:10_000]  # content_stream() does not try to gunzip it again
    assert http.get_header("Content-Encoding") is None
    assert http.get_header("X-Crawler-Content-Encoding") == "gzip"
    assert http.get_header("Content-Length") == "10000"
    warc, http, body = responses["missing"]  # not read at all
    assert warc.get_header("WARC-Truncated") == "unspecified" and body == b""
    assert http.get_header("Content-Encoding") is None
    assert http.get_header("X-Crawler-Content-Encoding") == "gzip"
    assert http.get_header("X-Crawler-Content-Length") == str(len(missing))
    assert http.get_header("Content-Length") == "0"


def test_a_resume_without_a_saved_position_starts_the_archive_afresh(tmp_path):
    def exchange(n: int) -> Exchange:
        return Exchange(f"http://h/{n}", f"GET /{n} HTTP/1.1", [("Host", "h")], "HTTP/1.1",
                        200, "OK", [("Content-Type", "text/plain")], f"page {n}".encode(),
                        truncated="")

    killed = WarcArchive(tmp_path, "crawl", max_file_bytes=1)  # killed before any commit
    killed.write(exchange(1))
    killed.write(exchange(2))
    killed.close()
    with open(killed.files()[-1], "ab") as file:
        file.truncate(file.tell() - 10)  # a half-written record
    resumed = WarcArchive(tmp_path, "crawl", None)
    resumed.write(exchange(3))
    resumed.close()
    assert [p.name for p in resumed.files()] == ["crawl-00000.warc.gz"]
    records = read_warcs(resumed.files())
    assert sorted(kind for kind, *_ in records) == ["request", "response", "warcinfo"]
    assert [body for kind, *_, body in records if kind == "response"] == [b"page 3"]


def test_a_record_that_fails_to_write_leaves_no_partial_bytes(tmp_path, monkeypatch):
    archive = WarcArchive(tmp_path, "crawl")
    ok = Exchange("http://h/1", "GET /1 HTTP/1.1", [], "HTTP/1.1", 200, "OK", [], b"one",
                  truncated="")
    archive.write(ok)
    real = archive.writer.write_request_response_pair

    def failing(request, response, *args, **kwargs):
        archive.file.write(b"\x1f\x8b half a record")
        raise OSError("disk full")

    monkeypatch.setattr(archive.writer, "write_request_response_pair", failing)
    before = archive.position()
    with pytest.raises(OSError, match="disk full"):
        archive.write(ok)
    assert archive.position() == before == (before[0], (tmp_path / before[0]).stat().st_size)
    monkeypatch.setattr(archive.writer, "write_request_response_pair", real)
    archive.write(Exchange("http://h/2", "GET /2 HTTP/1.1", [], "HTTP/1.1", 200, "OK", [],
                           b"two", truncated=""))
    archive.close()
    bodies = [body for kind, *_, body in read_warcs(archive.files()) if kind == "response"]
    assert bodies == [b"one", b"two"]
