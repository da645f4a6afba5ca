"""The SSRF guard: private, loopback and link-local hosts are refused before any connection.

Test host names are mapped to addresses by an injected resolver (no DNS query), and every
connection the crawler opens goes through ``tasks.crawl_http.open_tcp_stream``, which the
``connections`` fixture records and limits to 127.0.0.1: even a broken guard could not
send a packet beyond loopback.
"""

import ipaddress
import json
import socket
import time
from contextlib import contextmanager

import httpcore
import pytest
from pydantic import ValidationError

import tasks.crawl_http
import tasks.docserver
from tasks.crawl import CrawlConfig, crawl
from tasks.crawl_guard import AddressPolicy, address_problem, parse_allowance
from tasks.shards import iter_records
from tests.tasks.test_crawl import Site


@pytest.fixture
def site():
    server = Site()
    yield server
    server.close()


@pytest.fixture
def connections(monkeypatch):
    """Every (address, port) the crawler connects to; anything but 127.0.0.1 is refused."""
    opened = []
    real = tasks.crawl_http.open_tcp_stream

    async def recording(address, port, **options):
        opened.append((address, port))
        if address != "127.0.0.1":
            raise httpcore.ConnectError(f"test: no connection beyond loopback ({address})")
        return await real(address, port, **options)

    monkeypatch.setattr(tasks.crawl_http, "open_tcp_stream", recording)
    return opened


def fake_dns(names: dict[str, list[str]], asked: list | None = None):
    """A resolver for made-up names; any other name fails as an unknown host would."""
    def resolve(host: str, port: int) -> list[str]:
        if asked is not None:
            asked.append(host)
        if host not in names:
            raise socket.gaierror(socket.EAI_NONAME, f"test resolver: unknown host {host}")
        return names[host]
    return resolve


def port_of(server: Site) -> int:
    return server.server.server_address[1]


def crawl_site(tmp_path, seeds, resolver=None, **settings):
    config = CrawlConfig(**{"backoff_seconds": 0.01, "timeout_seconds": 5, "retries": 0,
                            **settings})
    result = crawl(config, tmp_path / "out", seeds=seeds, resolver=resolver)
    pages = {r["url"]: r for r in iter_records(tmp_path / "out" / "data")}
    failures = [json.loads(line) for line in
                (tmp_path / "out" / "failures.jsonl").read_text().splitlines()]
    return result, pages, failures


def test_links_to_private_addresses_are_refused_before_any_connection(tmp_path, site,
                                                                       connections):
    private = ["http://intranet.test/admin", "http://10.1.2.3/", "http://192.168.0.1:8080/",
               "http://169.254.169.254/latest/meta-data/", "http://[::ffff:10.0.0.1]/",
               "http://[fe80::1]/", "http://100.64.0.1/"]
    site.page("/", *private, "/ok")
    site.page("/ok")
    asked = []
    result, pages, failures = crawl_site(
        tmp_path, [site.url], fake_dns({"intranet.test": ["10.0.0.7"]}, asked),
        same_host=False, allowed_private_hosts=[f"127.0.0.1:{port_of(site)}"])

    assert set(pages) == {site.url, site.url + "ok"}
    assert result["stats"]["ssrf_refused"] == len(private)
    refused = {f["url"]: f for f in failures if f["counted_as"] == "ssrf_refused"}
    assert set(refused) == set(private)
    assert refused["http://intranet.test/admin"]["reason"] == "private address"
    assert "resolves to 10.0.0.7" in refused["http://intranet.test/admin"]["detail"]
    assert refused["http://169.254.169.254/latest/meta-data/"]["reason"] == "link-local address"
    assert result["stats"]["failed_private_address"] >= 3
    assert asked == ["intranet.test"]  # IP literals need no lookup
    assert {address for address, _ in connections} == {"127.0.0.1"}
    assert {port for _, port in connections} == {port_of(site)}


def test_redirects_to_loopback_are_refused_before_any_connection(tmp_path, site, connections):
    service = Site()  # another service on this machine, which the crawl must not reach
    try:
        service.page("/secret")
        port = port_of(service)
        site.page("/", "/go", "/go-by-name", "/go-file", "/fine")
        site.routes["/go"] = (302, {"Location": f"http://127.0.0.1:{port}/secret"}, "")
        site.routes["/go-by-name"] = (301, {"Location": f"http://db.test:{port}/secret"}, "")
        site.routes["/go-file"] = (302, {"Location": "file:///etc/passwd"}, "")
        site.page("/fine")
        result, pages, failures = crawl_site(
            tmp_path, [site.url], fake_dns({"db.test": ["127.0.0.1"]}), same_host=False,
            allowed_private_hosts=[f"127.0.0.1:{port_of(site)}"])
    finally:
        service.close()

    assert service.requests == []
    assert all(p != port for _, p in connections)
    assert set(pages) == {site.url, site.url + "fine"}
    reasons = {f["url"].removeprefix(site.url): (f["counted_as"], f["reason"]) for f in failures}
    assert reasons == {"go": ("ssrf_refused", "loopback address"),
                       "go-by-name": ("ssrf_refused", "loopback address"),
                       "go-file": ("ssrf_refused", "non-http redirect")}
    assert result["stats"]["ssrf_refused"] == 3
    assert sorted(site.paths()) == ["/", "/fine", "/go", "/go-by-name", "/go-file"]


def test_a_loopback_seed_is_refused_unless_allowed(tmp_path, site, connections):
    site.page("/")
    from tasks.stage import StageInputError

    with pytest.raises(StageInputError, match="loopback address.*allowed_private_hosts"):
        crawl_site(tmp_path / "a", [site.url])
    assert site.requests == [] and connections == []
    result, _, _ = crawl_site(tmp_path / "b", [site.url], allowed_private_hosts=["127.0.0.1"])
    assert result["count"] == 1


def test_connections_go_to_the_checked_address_not_a_new_lookup(tmp_path, site, connections):
    # rebind.test exists only in the injected resolver: the page is fetched because the
    # client connects to the address the guard checked, never asking DNS again.
    site.page("/")
    url = f"http://rebind.test:{port_of(site)}/"
    result, pages, _ = crawl_site(tmp_path, [url], fake_dns({"rebind.test": ["127.0.0.1"]}),
                                  allowed_private_hosts=[f"127.0.0.1:{port_of(site)}"])
    assert set(pages) == {url} and result["count"] == 1
    assert set(connections) == {("127.0.0.1", port_of(site))}  # robots.txt, then the page


def test_host_names_in_the_allowance_allow_that_name_only(tmp_path, site, connections):
    site.page("/", f"http://other.test:{port_of(site)}/x")
    site.page("/x")
    url = f"http://intranet.test:{port_of(site)}/"
    names = {"intranet.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]}
    _, pages, failures = crawl_site(tmp_path, [url], fake_dns(names), same_host=False,
                                    allowed_private_hosts=["intranet.test"])
    assert set(pages) == {url}
    assert [f["reason"] for f in failures] == ["loopback address"]


def test_the_embedded_docs_crawl_allows_its_own_server_and_nothing_else(
        tmp_path, monkeypatch, site, connections):
    service = Site()
    try:
        service.page("/private")
        site.page("/", "/index.html", service.url + "private")
        site.page("/index.html")

        @contextmanager
        def fake_docs_server():  # stands in for the pydoc server, on a port of its own
            yield site.url

        monkeypatch.setattr(tasks.docserver, "serve_python_docs", fake_docs_server)
        result = crawl(CrawlConfig(same_host=False, retries=0), tmp_path / "out")
    finally:
        service.close()
    assert result["count"] == 2
    assert result["stats"]["ssrf_refused"] == 1 and service.requests == []


@pytest.mark.parametrize(("address", "problem"), [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("10.0.0.1", "private"),
    ("172.16.5.4", "private"), ("192.168.1.1", "private"), ("169.254.169.254", "link-local"),
    ("fe80::1", "link-local"), ("fc00::1", "private"), ("0.0.0.0", "unspecified"),
    ("224.0.0.1", "multicast"), ("100.64.0.1", "shared (carrier NAT)"),
    ("240.0.0.1", "reserved"), ("::ffff:127.0.0.1", "loopback"),
    ("2002:7f00:1::", "loopback"),  # 6to4 around 127.0.0.1
    ("fec0::1", "site-local"), ("feff::1", "site-local"),  # deprecated, still routed inside
    ("8.8.8.8", None), ("2606:4700::1111", None),
])
def test_address_kinds(address, problem):
    assert address_problem(ipaddress.ip_address(address)) == problem


def test_allowances_by_network_and_port():
    policy = AddressPolicy(["10.0.0.0/8", "127.0.0.1:8080", "[::1]:9000", "Intranet.Example"])
    assert policy.refusal("wiki.corp", 80, ["10.4.4.4"]) is None
    assert policy.refusal("127.0.0.1", 8080, ["127.0.0.1"]) is None
    assert policy.refusal("127.0.0.1", 8081, ["127.0.0.1"])[0] == "loopback address"
    assert policy.refusal("::1", 9000, ["::1"]) is None
    assert policy.refusal("intranet.example", 443, ["192.168.0.3"]) is None
    # one private address among public ones is enough to refuse: any may be used
    assert policy.refusal("mixed.example", 80, ["93.184.215.14", "192.168.0.3"]) is not None
    assert policy.refusal("example.org", 80, ["93.184.215.14"]) is None


@pytest.mark.parametrize("entry", ["not a host", "10.0.0.0/8:80", "host:99999", "[::1", ""])
def test_invalid_allowances_are_rejected_with_a_clear_message(entry):
    with pytest.raises(ValidationError, match="allowed_private_hosts") as error:
        CrawlConfig(allowed_private_hosts=[entry])
    assert any(word in str(error.value) for word in ("host name", "port", "CIDR"))
    with pytest.raises(ValueError):
        parse_allowance(entry)


def test_a_site_local_address_is_refused(tmp_path, site, connections):
    site.page("/", "http://old-intranet.test/", "http://[fec0::5]/")
    _, pages, failures = crawl_site(
        tmp_path, [site.url], fake_dns({"old-intranet.test": ["fec0::1:2"]}), same_host=False,
        allowed_private_hosts=[f"127.0.0.1:{port_of(site)}"])
    assert set(pages) == {site.url}
    assert [f["reason"] for f in failures] == ["site-local address"] * 2
    assert {address for address, _ in connections} == {"127.0.0.1"}


def flaky_dns(names: dict[str, list[str]], failures: int, asked: list):
    """A resolver whose first ``failures`` lookups of each name fail, as during a DNS
    outage; then it answers from ``names``."""
    def resolve(host: str, port: int) -> list[str]:
        asked.append(host)
        if asked.count(host) <= failures:
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return names[host]
    return resolve


def test_a_failed_dns_lookup_is_retried_as_requests_are(tmp_path, site, connections):
    site.page("/")
    url = f"http://flaky.test:{port_of(site)}/"
    asked = []
    result, pages, _ = crawl_site(tmp_path, [url],
                                  flaky_dns({"flaky.test": ["127.0.0.1"]}, 2, asked),
                                  retries=2, allowed_private_hosts=["flaky.test"])
    assert set(pages) == {url} and asked == ["flaky.test"] * 3
    assert result["stats"]["retries"] == 2


def test_a_failed_dns_lookup_is_not_remembered_for_the_whole_crawl(tmp_path, site, connections,
                                                                   monkeypatch):
    import tasks.crawl_fetch

    monkeypatch.setattr(tasks.crawl_fetch, "DNS_FAILURE_SECONDS", 0.0)
    port = port_of(site)
    site.page("/", f"http://flaky.test:{port}/a", "/slow")
    later_link = f"<a href='http://flaky.test:{port}/b'>b</a>"
    site.routes["/slow"] = lambda n: (time.sleep(0.3), (200, {}, later_link))[1]
    site.page("/a")
    site.page("/b")
    asked = []
    _, pages, failures = crawl_site(
        tmp_path, [site.url], flaky_dns({"flaky.test": ["127.0.0.1"]}, 1, asked),
        same_host=False, allowed_private_hosts=["127.0.0.1", "flaky.test"])
    # /a met the outage (no retries here); /b, found later, gets a fresh lookup
    assert [f["reason"] for f in failures] == ["DNS lookup failed"]
    assert failures[0]["url"] == f"http://flaky.test:{port}/a"
    assert f"http://flaky.test:{port}/b" in pages and asked == ["flaky.test"] * 2
