"""Several sources through the flow: a WARC archive and a .jsonl corpus, mixed by weight,
named in every document, counted per source in the data report and in MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from flows.config import load_config
from flows.pipeline import pipeline
from tasks.shards import iter_records
from tests.flows.conftest import write_corpus
from tests.tasks.test_warc_source import write_warc

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
TINY_CONFIG = ROOT / "configs" / "tiny.yaml"


def test_a_warc_archive_and_a_corpus_mixed_by_weight_through_the_flow(tmp_path):
    (tmp_path / "archive").mkdir()
    warc_ids = write_warc(tmp_path / "archive" / "crawl.warc.gz")
    corpus = write_corpus(tmp_path / "corpus", count=40)
    files = json.dumps([{"name": "web", "paths": [str(tmp_path / "archive" / "*.warc.gz")],
                         "weight": 1}])
    config = load_config(TINY_CONFIG, [
        f"source.paths=[{corpus}]", "source.name=books", "source.weight=4",
        f"source.files={files}", "source.shard_size=10"])
    workdir = tmp_path / "work"
    result = pipeline(config=config, workdir=str(workdir), until="extract")

    stages = result["stages"]
    ingest = stages["crawl"]["stats"]
    # 41 corpus documents and 2 pages: books:web = 4:1 keeps the 2 pages and 8 documents
    assert ingest["source.web.read"] == 2 and ingest["source.books.read"] == 41
    assert (ingest["source.web.documents"], ingest["source.books.documents"]) == (2, 8)
    assert ingest["removed_mix"] == 33 and stages["crawl"]["count"] == 10
    extracted = {r["id"]: r for r in iter_records(stages["extract"]["output"])}
    pages = [r for r in extracted.values() if r["source"] == "web"]
    assert {r["id"] for r in pages} == set(warc_ids.values())
    assert all(r["warc_record_id"] == r["id"] and r["fetched_at"] for r in pages)
    assert "stone bridge" in next(r["text"] for r in pages if r["url"].endswith("/a"))

    report = Path(result["data_report"]).read_text()
    assert "## documents per source after each stage" in report
    assert "| books | 41 | 8 |" in report and "| web | 2 | 2 |" in report

    # a client of its own: mlflow.set_tracking_uri would set MLFLOW_TRACKING_URI for every
    # later test in this process
    extract_run = mlflow.MlflowClient(result["tracking_uri"]).get_run(
        stages["extract"]["mlflow_run_id"])
    assert extract_run.data.metrics["source.web.documents"] == 2
    assert extract_run.data.metrics["source.books.documents"] == 8


def test_the_crawl_mixed_in_with_a_corpus_as_the_source_named_crawl(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", count=40)
    config = load_config(TINY_CONFIG, [
        f"source.paths=[{corpus}]", "source.weight=1", "source.include_crawl=true",
        "source.crawl_weight=1", "crawl.max_pages=12", "source.shard_size=10"])
    result = pipeline(config=config, workdir=str(tmp_path / "work"), until="extract")

    ingest = result["stages"]["crawl"]["stats"]
    assert ingest["crawl.pages_fetched"] == ingest["source.crawl.read"] == 12
    # 12 pages and 41 documents at 1:1: 12 of each
    assert (ingest["source.crawl.documents"], ingest["source.local.documents"]) == (12, 12)
    extracted = list(iter_records(result["stages"]["extract"]["output"]))
    pages = [r for r in extracted if r["source"] == "crawl"]
    assert pages and all(r["url"].startswith("http://pydoc.localhost/") for r in pages)
    assert all("<html" not in r["text"].lower() for r in pages)  # the HTML was extracted
    assert {r["source"] for r in extracted} == {"crawl", "local"}


def test_a_crawl_rerun_from_its_own_warc_archive_with_no_server(tmp_path):
    """Crawl a loopback site through the flow, stop the site, then run again from the
    crawl's WARC archive: the same documents come out of extraction."""
    from tests.tasks.test_crawl import LOOPBACK, Site
    from tests.tasks.test_warc_roundtrip import ARTICLE, PROSE

    site = Site()
    links = "".join(f"<a href='/story/{n}'>story {n}</a> " for n in range(4))
    site.routes["/"] = (200, {"Content-Type": "text/html"},
                        ARTICLE.format(title="Front", links=links, body=PROSE * 2))
    for n in range(4):
        site.routes[f"/story/{n}"] = (200, {"Content-Type": "text/html; charset=utf-8"},
                                      ARTICLE.format(title=f"Story {n}", links="",
                                                     body=f"Story {n}. " + PROSE * 3))
    try:
        crawled = pipeline(config=load_config(TINY_CONFIG, [
            f"crawl.seeds=[{site.url}]", f"crawl.allowed_private_hosts={json.dumps(LOOPBACK)}",
            "crawl.delay_seconds=0"]), workdir=str(tmp_path / "live"), until="extract")
    finally:
        site.close()
    archive = Path(crawled["stages"]["crawl"]["output"]).parent / "archive"
    again = pipeline(config=load_config(TINY_CONFIG, [
        f"source.paths=[{archive}/crawl-*.warc.gz]"]), workdir=str(tmp_path / "offline"),
        until="extract")

    def texts(result):
        return {r["url"]: r["text"] for r in iter_records(result["stages"]["extract"]["output"])}

    assert len(texts(crawled)) == 5 and texts(again) == texts(crawled)
