"""Documents from web archives: WARC files (Common Crawl's layout, a crawl's own archive)
and WET files (their extracted plain text), read with FastWARC.

* A WARC ``response`` record with a 2xx HTML or plain-text HTTP response becomes one
  document whose ``text`` is the decoded body (``tasks.charset``: declared charset, then
  sniffed, then a fallback) and whose ``content_type`` sends HTML on to the extract stage.
* A WET ``conversion`` record (already plain text) becomes a ``text/plain`` document,
  which extract passes through.
* Redirects, error statuses, other media types (images, PDFs, ...), revisits, requests,
  metadata and warcinfo records are skipped and counted.

Every document keeps its record's id (``warc_record_id``, the ``<urn:uuid:...>`` of the
record, which is also the document id), target URI (``url``) and fetch date
(``fetched_at``, ISO 8601 UTC, as the crawl stage writes it). Records are streamed: memory
does not grow with the file.
"""

from __future__ import annotations

import gzip
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from tasks.charset import decode

SUFFIXES = (".warc", ".warc.gz", ".wet", ".wet.gz")
HTML_TYPES = ("text/html", "application/xhtml+xml")
TEXT_TYPES = ("text/plain",)
# what a record skipped for this reason counts as in the stage's stats
SKIPPED = ("warc_redirects", "warc_http_errors", "warc_non_text", "warc_empty")


def is_archive(path: Path) -> bool:
    return path.name.lower().endswith(SUFFIXES)


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def _uncompressed(body: bytes, encoding: str | None) -> bytes:
    """The payload without a Content-Encoding that was archived as sent (most archivers,
    Common Crawl's included, store it decoded; some keep gzip bytes)."""
    encoding = (encoding or "").strip().lower()
    try:
        if encoding in ("gzip", "x-gzip") and body[:2] == b"\x1f\x8b":
            return gzip.decompress(body)
        if encoding == "deflate":
            return zlib.decompress(body)
    except (OSError, zlib.error, EOFError):
        pass
    return body


def _date(record) -> str:
    date = record.record_date
    if date is None:
        return record.headers.get("WARC-Date") or ""
    return date.strftime("%Y-%m-%dT%H:%M:%S+00:00")


def read_archive(path: Path, stats: Counter) -> Iterator[dict]:
    """The documents in one WARC/WET file (gzip or not); ``stats`` counts what was read,
    skipped and how the text was decoded."""
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    wanted = WarcRecordType.response | WarcRecordType.conversion | WarcRecordType.resource
    with open(path, "rb") as stream:
        for record in ArchiveIterator(stream, record_types=wanted, parse_http=True):
            stats["warc_records"] += 1
            url = record.headers.get("WARC-Target-URI") or ""
            kind = record.record_type
            if kind == WarcRecordType.response:
                http = record.http_headers
                if http is None:  # a response record that is not HTTP (dns:, ...)
                    stats["warc_non_text"] += 1
                    continue
                status = http.status_code
                if 300 <= status < 400:
                    stats["warc_redirects"] += 1
                    continue
                if not 200 <= status < 300:
                    stats["warc_http_errors"] += 1
                    continue
                content_type = http.get("Content-Type") or ""
                body = _uncompressed(record.reader.read(), http.get("Content-Encoding"))
            else:  # conversion (WET) or resource: the WARC header types the block
                status = 200
                content_type = record.headers.get("Content-Type") or "text/plain"
                body = record.reader.read()
            media = _media_type(content_type)
            if kind == WarcRecordType.conversion and media in ("", "application/octet-stream"):
                media = "text/plain"
            if media not in HTML_TYPES + TEXT_TYPES:
                stats["warc_non_text"] += 1
                continue
            if not body.strip():
                stats["warc_empty"] += 1
                continue
            decoded = decode(body, content_type, html=media in HTML_TYPES)
            stats[f"charset_{decoded.method}"] += 1
            if decoded.errors:
                stats["undecodable_documents"] += 1
                stats["undecodable_bytes"] += decoded.errors
            if record.headers.get("WARC-Truncated"):
                stats["warc_truncated"] += 1
            yield {"id": record.record_id or "", "text": decoded.text, "url": url,
                   "content_type": "text/html" if media in HTML_TYPES else "text/plain",
                   "warc_record_id": record.record_id or "", "fetched_at": _date(record),
                   "status": status, "charset": decoded.encoding}
