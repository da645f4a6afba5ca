"""Extract stage: real pydoc pages and handmade HTML through real trafilatura."""

from __future__ import annotations

import functools
import http.server
import json
import subprocess
import sys
import threading
from typing import ClassVar

import datasets
import pytest
from pydantic import ValidationError

from tasks.extract import ExtractConfig, extract_text, flatten_table_rows, normalize_text
from tasks.shards import iter_records, write_records
from tasks.stage import StageInputError

PROSE = " ".join(
    f"Paragraph sentence number {i} explains how the parser reads a configuration file "
    "and reports every problem it finds to the user." for i in range(12))
ARTICLE = f"""<!DOCTYPE html><html><head><title>Parser guide</title></head><body>
<nav><a href="/">Home</a> | <a href="/about">About</a></nav>
<article><h1>Parser guide</h1><p>{PROSE}</p><p>{PROSE}</p></article>
<footer>Copyright 2024 Example Corp. All rights reserved.</footer></body></html>"""


@functools.cache
def pydoc_page(name: str) -> str:
    """The HTML that `python -m pydoc -b` serves for a module (pydoc's own renderer).

    Rendered in a child process: pydoc re-imports (reloads) the modules it documents,
    which would leave this process with two generations of e.g. json's exception classes.
    """
    code = f"import pydoc, sys; sys.stdout.write(pydoc._url_handler({name + '.html'!r}, 'text/html'))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout


def crawl_record(doc_id: str, text: str, content_type: str = "text/html; charset=utf-8",
                 url: str | None = None) -> dict:
    return {"id": doc_id, "url": url or f"http://127.0.0.1:8000/{doc_id}.html", "text": text,
            "content_type": content_type, "status": 200,
            "fetched_at": "2024-05-01T12:00:00+00:00", "depth": 1,
            "seed": "http://127.0.0.1:8000/"}


def run(tmp_path, records, **config):
    write_records(records, tmp_path / "in", shard_size=2)
    result = extract_text(ExtractConfig(**config), tmp_path / "in", tmp_path / "out")
    kept = {r["id"]: r for r in iter_records(tmp_path / "out" / "data")}
    removed = {r["id"]: r for r in iter_records(tmp_path / "out" / "removed")}
    return result, kept, removed


def test_pydoc_page_gives_its_documentation_as_plain_lines(tmp_path):
    result, kept, _ = run(tmp_path, [crawl_record("json", pydoc_page("json"))])
    doc = kept["json"]
    text = doc["text"]
    assert doc["title"] == "Pydoc: package json"
    # the module docstring, the function signatures and their docstrings all survive ...
    assert "JSON (JavaScript Object Notation)" in text
    assert "dumps(obj, *, skipkeys=False" in text
    assert "Serialize ``obj`` to a JSON formatted ``str``." in text.splitlines()
    # ... as lines, not as table rows squeezed onto one line or HTML
    assert "|  |" not in text and not any(line.endswith("| |") for line in text.splitlines())
    assert max(len(line) for line in text.splitlines()) < 400
    assert "<table" not in text and "&nbsp;" not in text and "\xa0" not in text
    # crawl columns are kept, the raw body is replaced
    assert doc["fetched_at"] == "2024-05-01T12:00:00+00:00" and doc["depth"] == 1
    assert result["stats"]["chars_out"] < result["stats"]["chars_in"]


def test_tables_matter_on_pydoc_pages(tmp_path):
    html = pydoc_page("json")
    _, with_tables, _ = run(tmp_path / "a", [crawl_record("json", html)], min_chars=0)
    _, without, removed = run(tmp_path / "b", [crawl_record("json", html)], min_chars=0,
                              include_tables=False)
    kept_without = without.get("json", removed.get("json"))
    assert "dumps(obj" in with_tables["json"]["text"]
    assert "dumps(obj" not in kept_without["text"]


def test_preformatted_cells_keep_lines_and_indentation(tmp_path):
    html = ("<html><body><table><tr><td><pre>The statement\n\n    if x:\n        go()\n"
            f"</pre></td><td><p>{PROSE}</p></td></tr></table></body></html>")
    _, kept, _ = run(tmp_path, [crawl_record("pre", html)])
    assert "The statement\n\n    if x:\n        go()" in kept["pre"]["text"]


def test_article_main_text_without_boilerplate(tmp_path):
    _, kept, _ = run(tmp_path, [crawl_record("a", ARTICLE)])
    text = kept["a"]["text"]
    assert "Paragraph sentence number 11 explains" in text
    assert "All rights reserved" not in text and "About" not in text
    assert kept["a"]["title"] == "Parser guide"


def test_plain_text_is_normalized_and_passes_through(tmp_path):
    raw = "Cafe\u0301 menu\r\n\r\n\r\n\r\n  indented\u00a0code   \r\nzero\u200bwidth" + "x" * 200
    record = {"id": "local-1", "url": "file:///notes.txt", "text": raw,
              "source": "notes.txt", "content_type": "text/plain"}
    result, kept, _ = run(tmp_path, [record])
    doc = kept["local-1"]
    assert doc["text"].startswith("Café menu\n\n  indented code\nzerowidth")
    assert doc["source"] == "notes.txt" and doc["title"] == ""
    assert result["stats"]["text_documents"] == 1


def test_missing_content_type_is_sniffed(tmp_path):
    record = {"id": "x", "url": "http://h/x", "text": ARTICLE}
    _, kept, _ = run(tmp_path, [record])
    assert "<p>" not in kept["x"]["text"] and "Paragraph sentence" in kept["x"]["text"]


def test_pages_without_main_text_are_removed_with_a_short_snippet(tmp_path):
    empty = "<html><body><nav><a href='/a'>A</a><a href='/b'>B</a></nav></body></html>"
    result, kept, removed = run(tmp_path, [crawl_record("a", ARTICLE),
                                           crawl_record("nav", empty)])
    assert set(kept) == {"a"} and set(removed) == {"nav"}
    assert removed["nav"]["reason"] == "no_main_text"
    assert "min_chars" in removed["nav"]["detail"]
    assert len(removed["nav"]["text"]) <= 500
    assert result["count"] == 1
    assert result["stats"]["removed_no_main_text"] == 1
    assert result["stats"]["removed_extraction_failed"] == 0


def test_large_bodies_are_cut_before_parsing(tmp_path):
    big = ("<html><body><article>" + "".join(f"<p>{PROSE} {i}</p>" for i in range(400))
           + "</article></body></html>")
    result, kept, _ = run(tmp_path, [crawl_record("big", big)], max_input_bytes=20_000)
    assert result["stats"]["truncated_inputs"] == 1
    assert 1_000 < len(kept["big"]["text"]) < 20_000


def test_metadata_columns_on_request(tmp_path):
    page = ARTICLE.replace("<head>", '<head><meta name="author" content="Ada Lovelace">'
                                     '<meta name="description" content="How to parse.">')
    _, kept, _ = run(tmp_path, [crawl_record("a", page)], with_metadata=True)
    assert kept["a"]["author"] == "Ada Lovelace"
    assert kept["a"]["description"] == "How to parse."


def test_output_loads_with_datasets(tmp_path):
    run(tmp_path, [crawl_record("a", ARTICLE), crawl_record("json", pydoc_page("json"))])
    ds = datasets.load_dataset("parquet", data_dir=str(tmp_path / "out" / "data"),
                               split="train")
    assert sorted(ds["id"]) == ["a", "json"]
    assert {"id", "url", "text", "title", "fetched_at"} <= set(ds.column_names)


class _CountingHandler(http.server.BaseHTTPRequestHandler):
    requests: ClassVar[list[str]] = []

    def do_GET(self):
        self.requests.append(self.path)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"<html><body>fetched</body></html>")

    def log_message(self, *args):
        pass


def test_extraction_makes_no_network_requests(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _CountingHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        page = ARTICLE.replace("<head>", f'<head><link rel="canonical" href="{base}/canon">'
                                         f'<meta http-equiv="refresh" content="0; url={base}/r">'
                                         f'<link rel="stylesheet" href="{base}/style.css">')
        page = page.replace("<article>", f'<article><img src="{base}/img.png">'
                                         f'<iframe src="{base}/frame"></iframe>')
        _, kept, _ = run(tmp_path, [crawl_record("a", page, url=f"{base}/page")],
                         with_metadata=True)
    finally:
        server.shutdown()
        server.server_close()
    assert "Paragraph sentence" in kept["a"]["text"]
    assert _CountingHandler.requests == []


def test_nothing_kept_is_an_input_error(tmp_path):
    with pytest.raises(StageInputError, match="min_chars"):
        run(tmp_path, [crawl_record("a", "<html><body><p>tiny</p></body></html>")])


def test_empty_input_is_an_input_error(tmp_path):
    (tmp_path / "in").mkdir()
    with pytest.raises(StageInputError, match="no shard"):
        extract_text(ExtractConfig(), tmp_path / "in", tmp_path / "out")


def test_config_rejects_contradictory_bias():
    with pytest.raises(ValidationError, match="favor_recall"):
        ExtractConfig(favor_precision=True)
    assert ExtractConfig(favor_precision=True, favor_recall=False).favor_precision
    schema = json.dumps(ExtractConfig.model_json_schema())
    assert all(f["description"] for f in ExtractConfig.model_json_schema()["properties"].values())
    assert "max_input_bytes" in schema


def test_flatten_table_rows_keeps_escaped_pipes():
    text = "intro\n| a |  | b \\| c |\n| x |"
    assert flatten_table_rows(text) == "intro\na\nb | c\nx"


def test_normalize_text_collapses_blank_runs_and_trailing_spaces():
    assert normalize_text("a  \n\n\n\nb\t\n") == "a\n\nb"
