"""One page, one fetch: URL canonicalization, and robots.txt read as RFC 9309 says."""

from urllib.parse import urlsplit
from urllib.robotparser import RobotFileParser

import pytest

from tasks.crawl import canonical_url
from tasks.stage import StageInputError
from tests.tasks.test_crawl import Site, run


@pytest.fixture
def site():
    server = Site()
    yield server
    server.close()


@pytest.mark.parametrize(("url", "canonical"), [
    ("HTTP://Example.ORG:80/a/b?q=1#frag", "http://example.org/a/b?q=1"),
    ("https://example.org:443", "https://example.org/"),
    ("http://[::1]:80/x", "http://[::1]/x"),
    ("http://example.org./a", "http://example.org/a"),
    ("http://bücher.example/", "http://xn--bcher-kva.example/"),
    ("http://h/a/./b/../c", "http://h/a/c"),
    ("http://h/%7euser/a%2fb", "http://h/~user/a%2Fb"),
    ("http://h/a b", "http://h/a%20b"),
    ("http://h/p?utm_source=news&utm_medium=mail&id=7&fbclid=x&gclid=y", "http://h/p?id=7"),
    ("http://h/p?UTM_Campaign=x&id=7", "http://h/p?id=7"),
    ("http://h/p?b=2&a=1&c", "http://h/p?a=1&b=2&c"),  # sorted; a bare 'c' is kept
    ("http://h/p?a=2&a=1", "http://h/p?a=2&a=1"),  # one name's values keep their order
    ("http://h/p?ref=home&source=x&uid=5", "http://h/p?ref=home&source=x&uid=5"),
    ("http://h/p;jsessionid=ABC123?x=1&PHPSESSID=9", "http://h/p?x=1"),
    ("http://h/p?", "http://h/p"),
    ("http://user:secret@h/p", "http://h/p"),
])
def test_canonical_url(url, canonical):
    assert canonical_url(url) == canonical


def test_canonical_url_settings_and_refusals():
    assert canonical_url("http://h/p?b=1&a=2", sort_query=False) == "http://h/p?b=1&a=2"
    assert canonical_url("http://h/p?session=1&utm_x=2", strip_params=["session"]) == \
        "http://h/p?utm_x=2"
    assert canonical_url("../c d.html", "http://h:8080/a/b/") == "http://h:8080/a/c%20d.html"
    for bad in ("mailto:someone@example.org", "javascript:void(0)", "ftp://h/",
                "http://exa mple.org/", "http://h:99999/"):
        assert canonical_url(bad, "http://h/") is None, bad
    assert canonical_url("http:///x") is None


def test_tracking_parameter_variants_of_a_page_are_fetched_once(tmp_path, site):
    variants = ["/article?id=1&utm_source=feed", "/article?utm_medium=mail&id=1",
                "/article?fbclid=abc&id=1#comments", "/article?id=1&gclid=x&utm_campaign=y",
                f"http://127.0.0.1:{site.server.server_address[1]}/article?id=1",
                "/list?b=2&a=1", "/list?a=1&b=2", "/%7Euser/", "/~user/"]
    site.page("/", *variants)
    site.page("/article?id=1", *variants)  # links back to every variant
    site.page("/list?a=1&b=2")
    site.page("/~user/")
    result, pages = run(tmp_path, [site.url])
    assert set(pages) == {site.url + p for p in ("", "article?id=1", "list?a=1&b=2", "~user/")}
    assert sorted(site.paths()) == ["/", "/article?id=1", "/list?a=1&b=2", "/~user/"]
    assert len({page["id"] for page in pages.values()}) == 4
    assert result["count"] == 4


ROBOTS_TXT = """\
User-agent: *
Disallow: /

# RFC 9309: only the most specific group applies to forgeline, and within it the longest
# matching rule wins (Allow on a tie); '*' matches any characters, '$' ends the pattern.
User-agent: forgeline
Disallow: /*.pdf$
Disallow: /private
Allow: /private/public
Crawl-delay: 0
"""


def test_robots_txt_wildcards_and_longest_match_follow_rfc_9309(tmp_path, site):
    site.routes["/robots.txt"] = (200, {"Content-Type": "text/plain"}, ROBOTS_TXT)
    allowed = ["/a/file.pdf?download=1", "/a/file.pdfx", "/private/public/x", "/priv"]
    refused = ["/a/file.pdf", "/b/c/report.pdf", "/private/x", "/private/", "/privately"]
    site.page("/", *allowed, *refused)
    for path in allowed + refused:
        site.page(path)
    result, pages = run(tmp_path, [site.url])

    assert set(pages) == {site.url} | {site.url + p.lstrip("/") for p in allowed}
    assert not set(refused) & set(site.paths())
    assert result["stats"]["robots_disallowed"] == len(refused)
    assert result["stats"]["failed_disallowed_by_robots_txt"] == len(refused)
    # the standard library's parser, used before, gets these wrong (first match, no wildcards)
    stdlib = RobotFileParser()
    stdlib.parse(ROBOTS_TXT.splitlines())
    assert stdlib.can_fetch("forgeline", site.url + "a/file.pdf")
    assert not stdlib.can_fetch("forgeline", site.url + "private/public/x")


def test_robots_txt_redirects_are_followed_and_checked_by_the_ssrf_guard(tmp_path, site):
    other = Site()
    try:
        other.routes["/rules.txt"] = (200, {"Content-Type": "text/plain"},
                                      "User-agent: *\nDisallow: /hidden\n")
        site.routes["/robots.txt"] = (301, {"Location": other.url + "rules.txt"}, "")
        site.page("/", "/hidden", "/shown")
        site.page("/hidden")
        site.page("/shown")
        _, pages = run(tmp_path / "a", [site.url])
        assert set(pages) == {site.url, site.url + "shown"}
        assert other.paths() == ["/rules.txt"]
        # the same redirect into a loopback port that is not allowed: robots.txt cannot be
        # read, so (as for a server error) nothing on the site is fetched
        only_site = [f"127.0.0.1:{site.server.server_address[1]}"]
        with pytest.raises(StageInputError, match=r"robots.txt unreachable \(loopback address\)"):
            run(tmp_path / "b", [site.url], allowed_private_hosts=only_site)
        assert other.paths() == ["/rules.txt"]
    finally:
        other.close()



@pytest.mark.parametrize(("url", "canonical"), [
    # IDNA 2008 (as httpx encodes host names), not the standard library's IDNA 2003,
    # which maps 'ß' to 'ss': faß.de and fass.de are different domains
    ("http://faß.de/", "http://xn--fa-hia.de/"),
    ("http://BÜCHER.example/", "http://xn--bcher-kva.example/"),  # UTS #46 mapping
    ("http://ｅｘａｍｐｌｅ.org/", "http://example.org/"),  # full-width letters mapped
])
def test_international_host_names_are_encoded_as_httpx_encodes_them(url, canonical):
    import httpx

    assert canonical_url(url) == canonical
    assert httpx.URL(canonical).raw_host.decode() == urlsplit(canonical).hostname
    if "ｅ" not in url:  # httpx itself does not map full-width letters
        assert httpx.URL(url).raw_host.decode() == urlsplit(canonical).hostname


def test_host_names_that_idna_2008_rejects_are_refused():
    for bad in ("http://a\u200db.example/", "http://xn--a.example.ü/", "http://\u2764.example/"):
        assert canonical_url(bad) is None, bad
    from pydantic import ValidationError

    from tasks.crawl import CrawlConfig

    with pytest.raises(ValidationError, match="valid host name"):
        CrawlConfig(seeds=["http://\u2764.example/"])
