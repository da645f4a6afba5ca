"""A WARC round trip: crawl a loopback site to its archive, then read that archive with
the server gone, and get the same documents out of extraction."""

from tasks.extract import ExtractConfig, extract_text
from tasks.shards import iter_records
from tasks.sources import SourceConfig, ingest_local
from tests.tasks.test_crawl import Site, run

ARTICLE = ("<html><head><title>{title}</title></head><body><nav><a href='/'>Home</a> "
           "{links}</nav><article><h1>{title}</h1><p>{body}</p><p>{body}</p></article>"
           "<footer>Site footer</footer></body></html>")
PROSE = ("Every spring the river rose above the old stone steps, and the ferry waited "
         "until the water settled before it carried the market carts across. ")


def test_a_crawl_redone_from_its_warc_archive_without_the_server(tmp_path):
    site = Site()
    links = "".join(f"<a href='/story/{n}'>story {n}</a> " for n in range(5))
    site.routes["/"] = (200, {"Content-Type": "text/html; charset=utf-8"},
                        ARTICLE.format(title="Front page", links=links, body=PROSE * 2))
    for n in range(5):
        body = ARTICLE.format(title=f"Story {n}", links="", body=f"Story {n}. " + PROSE * 3)
        charset = "utf-8" if n % 2 else "windows-1252"
        site.routes[f"/story/{n}"] = (200, {"Content-Type": f"text/html; charset={charset}"},
                                      body.replace("Story", "Störy").encode(charset))
    try:
        run(tmp_path, [site.url])
    finally:
        site.close()  # from here on nothing answers: the archive is all there is

    crawled = tmp_path / "out"
    archives = sorted((crawled / "archive").glob("crawl-*.warc.gz"))
    assert archives
    ingest_local(SourceConfig(paths=[str(crawled / "archive" / "crawl-*.warc.gz")]),
                 tmp_path / "from-warc")
    for name, data in (("live", crawled / "data"), ("warc", tmp_path / "from-warc" / "data")):
        extract_text(ExtractConfig(), data, tmp_path / f"extract-{name}")
    live = {r["url"]: r["text"] for r in iter_records(tmp_path / "extract-live" / "data")}
    again = {r["url"]: r["text"] for r in iter_records(tmp_path / "extract-warc" / "data")}
    assert len(live) == 6 and again == live
    assert "Störy 2." in live[site.url + "story/2"]  # windows-1252, decoded both times
    fetched = {r["url"]: r["fetched_at"] for r in iter_records(crawled / "data")}
    from_warc = {r["url"]: r for r in iter_records(tmp_path / "from-warc" / "data")}
    assert {u: r["fetched_at"] for u, r in from_warc.items()} == fetched
    assert all(r["warc_record_id"].startswith("<urn:uuid:") for r in from_warc.values())
