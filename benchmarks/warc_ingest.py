"""WARC ingestion plus extraction: forgeline's source and extract stages against the
straightforward loop, on the same generated WARC file.

The WARC (gzip, written with warcio as a crawler archives) holds ``--pages`` HTML pages
(seeded English-like prose in paragraphs, inside navigation, sidebar and footer
boilerplate), each after its request record, plus redirects and images as a crawl has.

* baseline: one process, warcio's ``ArchiveIterator`` over the file and
  ``trafilatura.extract`` on every 2xx HTML response (with the options forgeline's
  extract stage uses by default: favor_recall, tables included).
* forgeline: ``tasks.sources.ingest_local`` (FastWARC, charset detection, parquet
  shards of ``--shard-size`` pages) then ``tasks.extract.extract_text`` with its shards
  mapped over ``--workers`` processes (default: this machine's cores), as the
  pipeline's default engine does. The worker processes are started (trafilatura
  imported) before the clock starts, as in a long run; the start-up is printed beside.
  ``ratio_one_process`` runs the same two stages with every shard in this process.

The three run alternately, ``--repeat`` times each; the best time of each is compared.

``ratio`` = forgeline pages/s over the baseline's (the goal: at least 1.5).

    .venv/bin/python benchmarks/warc_ingest.py
    .venv/bin/python benchmarks/warc_ingest.py --pages 5000 --workers 4
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _corpus import Corpus

NAV = "".join(f'<li class="menu-item"><a href="/section/{i}">Section {i}</a></li>'
              for i in range(80))
SCRIPT = "<script>" + "var tracking = {id: 1, events: []};" * 150 + "</script>"
STYLE = "<style>" + ".menu-item a { color: #333; padding: 2px 4px; }" * 100 + "</style>"
FOOTER = ("<footer><div class='footer-links'><ul>" + NAV + "</ul></div><p>Copyright 2026 "
          "Example Media. All rights reserved.</p></footer>")


def page(title: str, text: str, n: int) -> bytes:
    """A news page about the size of a median Common Crawl HTML response (~40 KB): the
    article's paragraphs inside menus, scripts, styles, related links and comments."""
    words = text.split()
    paragraphs = "".join(f"<p>{' '.join(words[i:i + 60])}.</p>" for i in range(0, len(words), 60))
    related = "".join(f'<li><a href="/2026/story-{(n + k) % 997}">Story {(n + k) % 997}: '
                      f"{' '.join(words[k:k + 8])}</a></li>" for k in range(20))
    comments = "".join(f"<div class='comment'><span class='user'>reader{k}</span><p>"
                       f"{' '.join(words[k * 5:k * 5 + 25])}</p></div>" for k in range(6))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>{STYLE}"
            f"{SCRIPT}</head><body><div class='wrapper'><div class='container'><header>"
            f"<nav><ul>{NAV}</ul></nav></header><div class='row'><main><article>"
            f"<h1>{title}</h1><div class='byline'>By Staff Writer</div>{paragraphs}</article>"
            f"<section class='comments'><h2>Comments</h2>{comments}</section></main>"
            f"<aside><h3>Related</h3><ul>{related}</ul></aside></div>{FOOTER}</div></div>"
            f"{SCRIPT}</body></html>").encode()


def write_warc(path: Path, pages: int) -> None:
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    texts = Corpus(pages, seed=0, min_words=300, max_words=900).texts(0, pages).to_pylist()
    with open(path, "wb") as out:
        writer = WARCWriter(out, gzip=True)
        for n, text in enumerate(texts):
            url = f"https://news.example.org/2026/story-{n}"
            writer.write_record(writer.create_warc_record(
                url, "request", payload=io.BytesIO(b""),
                http_headers=StatusAndHeaders(f"GET /2026/story-{n} HTTP/1.1",
                                              [("Host", "news.example.org")],
                                              is_http_request=True)))
            headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")],
                                       protocol="HTTP/1.1")
            writer.write_record(writer.create_warc_record(
                url, "response", payload=io.BytesIO(page(f"Story {n}", text, n)),
                http_headers=headers))
            if n % 10 == 0:  # a crawl also archives redirects and images
                moved = StatusAndHeaders("301 Moved Permanently", [("Location", url)],
                                         protocol="HTTP/1.1")
                writer.write_record(writer.create_warc_record(
                    f"http://news.example.org/old/{n}", "response", payload=io.BytesIO(b""),
                    http_headers=moved))
                image = StatusAndHeaders("200 OK", [("Content-Type", "image/jpeg")],
                                         protocol="HTTP/1.1")
                writer.write_record(writer.create_warc_record(
                    f"https://news.example.org/img/{n}.jpg", "response",
                    payload=io.BytesIO(b"\xff\xd8\xff" + os.urandom(20_000)), http_headers=image))


def baseline(path: Path) -> dict[str, str]:
    """warcio + trafilatura.extract per record, one process."""
    import trafilatura
    from warcio.archiveiterator import ArchiveIterator

    out = {}
    with open(path, "rb") as stream:
        for record in ArchiveIterator(stream):
            if record.rec_type != "response" or record.http_headers is None:
                continue
            status = int(record.http_headers.get_statuscode())
            content_type = record.http_headers.get_header("Content-Type") or ""
            if not 200 <= status < 300 or "html" not in content_type:
                continue
            html = record.content_stream().read().decode("utf-8", errors="replace")
            url = record.rec_headers.get_header("WARC-Target-URI")
            text = trafilatura.extract(html, url=url, favor_recall=True, include_tables=True,
                                       include_comments=False, deduplicate=False)
            if text:
                out[url] = text
    return out


def forgeline(path: Path, work: Path, shard_size: int, mapper) -> dict[str, str]:
    from tasks.extract import ExtractConfig, extract_text
    from tasks.shards import iter_records
    from tasks.sources import SourceConfig, ingest_local

    ingest_local(SourceConfig(paths=[str(path)], shard_size=shard_size), work / "ingest")
    extract_text(ExtractConfig(), work / "ingest" / "data", work / "extract", mapper=mapper)
    return {r["url"]: r["text"] for r in iter_records(work / "extract" / "data")}


def _import_trafilatura() -> None:
    import trafilatura
    import trafilatura.utils  # noqa: F401


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=2000, help="HTML pages (default 2000)")
    parser.add_argument("--shard-size", type=int, default=100, help="pages per shard (100)")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs of each (best kept)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="extract processes (default: this machine's cores)")
    args = parser.parse_args()

    from tasks.shard_runner import ProcessPoolMapper, serial_mapper

    with tempfile.TemporaryDirectory(prefix="forgeline-warc-") as tmp:
        root = Path(tmp)
        archive = root / "crawl.warc.gz"
        write_warc(archive, args.pages)
        _import_trafilatura()

        # alternating, best of --repeat each: neither side gets a quiet moment alone
        base_seconds = one_seconds = our_seconds = float("inf")
        started = time.perf_counter()
        with ProcessPoolMapper(args.workers, warm_up=_import_trafilatura) as mapper:
            startup = time.perf_counter() - started
            for attempt in range(args.repeat):
                started = time.perf_counter()
                expected = baseline(archive)
                base_seconds = min(base_seconds, time.perf_counter() - started)

                started = time.perf_counter()
                ours = forgeline(archive, root / f"pool-{attempt}", args.shard_size, mapper)
                our_seconds = min(our_seconds, time.perf_counter() - started)

                started = time.perf_counter()
                single = forgeline(archive, root / f"one-{attempt}", args.shard_size,
                                   serial_mapper)
                one_seconds = min(one_seconds, time.perf_counter() - started)

    assert single == ours, "the process pool changed the output"
    same_pages = len(set(expected) & set(ours))
    words_base = sum(len(t.split()) for t in expected.values())
    words_ours = sum(len(t.split()) for t in ours.values())
    result = {
        "pages": args.pages, "workers": args.workers,
        "baseline_pages_per_second": round(args.pages / base_seconds, 1),
        "forgeline_pages_per_second": round(args.pages / our_seconds, 1),
        "forgeline_one_process_pages_per_second": round(args.pages / one_seconds, 1),
        "worker_startup_seconds": round(startup, 2),
        "pages_extracted": {"baseline": len(expected), "forgeline": len(ours),
                            "both": same_pages},
        "words_extracted": {"baseline": words_base, "forgeline": words_ours},
        "ratio_one_process": round(base_seconds / one_seconds, 3),
        "ratio": round(base_seconds / our_seconds, 3),
    }
    print(f"baseline (warcio + trafilatura.extract): {base_seconds:.2f}s; forgeline: "
          f"{our_seconds:.2f}s on {args.workers} workers (+{startup:.1f}s start-up), "
          f"{one_seconds:.2f}s in one process, for {args.pages} pages")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
