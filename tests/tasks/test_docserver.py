"""The embedded Python-docs server: a real subprocess serving pydoc pages on loopback."""

import re
import subprocess
import sys
from urllib.robotparser import RobotFileParser

import httpx
import pytest

from tasks.docserver import content_type_for, is_allowed_module, serve_python_docs


@pytest.fixture(scope="module")
def docs_url():
    with serve_python_docs() as url:
        yield url


def test_serves_standard_library_module_pages(docs_url):
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", docs_url)
    response = httpx.get(docs_url + "json.html")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "json" in response.text and "JSONDecoder" in response.text


def test_index_links_the_standard_library_and_not_installed_packages(docs_url):
    index = httpx.get(docs_url).text
    links = set(re.findall(r'href="([\w.]+)\.html"', index))
    assert {"json", "os", "collections"} <= links
    assert not links & {"numpy", "pytest", "httpx", "tasks", "flows"}


@pytest.mark.parametrize("page", [
    "tkinter.html", "this.html", "antigravity.html", "idlelib.html",  # side effects on import
    "test.test_json.html", "unittest.__main__.html", "json._private.html",
    "numpy.html", "httpx.html",  # installed, but not the standard library
    "search?key=json", "../../../etc/passwd.css",
])
def test_refused_pages_answer_404_without_being_rendered(docs_url, page):
    assert httpx.get(docs_url + page).status_code == 404


def test_unknown_object_is_404_not_an_error_page_with_200(docs_url):
    assert httpx.get(docs_url + "json.no_such_thing.html").status_code == 404


def test_topic_pages_and_stylesheet_are_served(docs_url):
    assert httpx.get(docs_url + "topics.html").status_code == 200
    topic = httpx.get(docs_url + "topic?key=FORMATTING")
    assert topic.status_code == 200 and "format" in topic.text.lower()
    assert httpx.get(docs_url + "pydoc_data/_pydoc.css").headers["content-type"].startswith(
        "text/css")


def test_robots_txt_disallows_source_and_search_pages(docs_url):
    robots = httpx.get(docs_url + "robots.txt")
    assert robots.status_code == 200
    parser = RobotFileParser()
    parser.parse(robots.text.splitlines())
    assert not parser.can_fetch("forgeline", docs_url + "search?key=json")
    assert not parser.can_fetch("forgeline", docs_url + "getfile?key=json")
    assert not parser.can_fetch("forgeline", docs_url + "get?key=json")
    assert parser.can_fetch("forgeline", docs_url + "getopt.html")  # a prefix, not a word
    assert parser.can_fetch("forgeline", docs_url + "json.html")


def test_process_is_gone_after_the_context_exits():
    with serve_python_docs() as url:
        assert httpx.get(url + "robots.txt").status_code == 200
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "robots.txt", timeout=2)


def test_module_entry_point_prints_the_url_first_without_stdin(tmp_path):
    process = subprocess.Popen([sys.executable, "-m", "tasks.docserver", "--port", "0"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    try:
        url = process.stdout.readline().strip()
        assert httpx.get(url + "os.html").status_code == 200
    finally:
        process.kill()
        process.wait()
        process.stdout.close()


def test_allowlist_rules():
    assert is_allowed_module("json") and is_allowed_module("os.path.join")
    assert is_allowed_module("doctest") and is_allowed_module("unittest.mock")
    assert is_allowed_module("__future__")
    for name in ("numpy", "tkinter.ttk", "idlelib.idle_test.htest", "ctypes.test",
                 "lib2to3.tests.data", "asyncio.__main__", "_json", "xxlimited", "json..x",
                 "site"):
        assert not is_allowed_module(name), name
    assert content_type_for("/topic?key=json") == "text/html"
    assert content_type_for("/topic?key=tkinter") is None
    assert content_type_for("/json.html?x=1") is None
