"""Documents from web archives: WARC files (Common Crawl's layout, a crawl's own archive)
and WET files (their extracted plain text), read with FastWARC.

* A WARC ``response`` record with a 2xx HTML or plain-text HTTP response becomes one
  document whose ``text`` is the decoded body (``tasks.charset``: declared charset, then
  sniffed, then a fallback) and whose ``content_type`` sends HTML on to the extract stage.
* A WET ``conversion`` record (already plain text) becomes a ``text/plain`` document,
  which extract passes through.
* Redirects, error statuses, other media types (images, PDFs, ...), payloads over the
  size cap or in an encoding that cannot be read, and malformed responses are skipped and
  counted (``SKIPPED``); revisit, request, metadata and warcinfo records hold no document
  and are not read at all.

Every document keeps its record's id (``warc_record_id``, the ``<urn:uuid:...>`` of the
record, which is also the document id), target URI (``url``) and fetch date
(``fetched_at``, ISO 8601 UTC, as the crawl stage writes it). Records are streamed: memory
does not grow with the file.
"""

from __future__ import annotations

import hashlib
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from tasks.charset import decode
from tasks.stage import StageInputError

SUFFIXES = (".warc", ".warc.gz", ".wet", ".wet.gz")
HTML_TYPES = ("text/html", "application/xhtml+xml")
TEXT_TYPES = ("text/plain",)
# what a record skipped for this reason counts as in the stage's stats
SKIPPED = ("warc_redirects", "warc_http_errors", "warc_non_text", "warc_empty",
           "warc_malformed", "warc_too_large", "warc_undecodable_encoding")


def is_archive(path: Path) -> bool:
    return path.name.lower().endswith(SUFFIXES)


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


class TooLarge(Exception):
    pass


_CONTROL = bytes(b for b in range(32) if b not in b"\t\n\r\f")


def _looks_like_text(body: bytes) -> bool:
    """Text has next to no control bytes; compressed data has about one in nine."""
    sample = body[:2048]
    return len(sample.translate(None, _CONTROL)) >= 0.98 * len(sample)


def _uncompressed(body: bytes, encoding: str | None, max_bytes: int) -> bytes | None:
    """The payload without a Content-Encoding that was archived as sent (most archivers,
    Common Crawl's included, store it decoded; some keep the compressed bytes); None when
    it cannot be decoded here (br, zstd, ...). Decompression stops past ``max_bytes``."""
    encoding = (encoding or "").strip().lower()
    if encoding in ("", "identity") or _looks_like_text(body):
        return body  # stored decoded (the usual case), whatever the header says
    tries = {"gzip": (31,), "x-gzip": (31,), "deflate": (15, -15)}.get(encoding, ())
    for wbits in tries:
        try:
            out = zlib.decompressobj(wbits).decompress(body, max_bytes + 1)
        except zlib.error:
            continue
        if len(out) > max_bytes:
            raise TooLarge
        return out
    return None


def _date(record) -> str:
    date = record.record_date
    if date is None:
        return record.headers.get("WARC-Date") or ""
    return date.strftime("%Y-%m-%dT%H:%M:%S+00:00")


def _read_at_most(reader, limit: int) -> bytes:
    """Up to ``limit`` bytes of the payload (one read may return fewer)."""
    chunks, size = [], 0
    while size < limit:
        chunk = reader.read(min(limit - size, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _record_id(record, path: Path, url: str) -> str:
    """The WARC-Record-ID; for a record without one (not valid WARC, but seen), an id
    made from the file and the record's offset in it, so ids stay unique and stable."""
    if record.record_id:
        return record.record_id
    digest = hashlib.sha1(f"{path.resolve()}\0{record.stream_pos}\0{url}".encode()).hexdigest()
    return f"<urn:forgeline:{digest}>"


def read_archive(path: Path, stats: Counter, max_bytes: int = 10_000_000) -> Iterator[dict]:
    """The documents in one WARC/WET file (gzip or not); ``stats`` counts what was read,
    skipped and how the text was decoded. A payload over ``max_bytes`` is skipped
    (``warc_too_large``) without being read into memory whole."""
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    wanted = WarcRecordType.response | WarcRecordType.conversion | WarcRecordType.resource
    read = 0
    try:
        with open(path, "rb") as stream:
            # not strict: FastWARC tolerates small deviations from the standard
            for record in ArchiveIterator(stream, record_types=wanted, parse_http=True,
                                          strict_mode=False):
                read += 1
                document = _document(record, path, stats, max_bytes)
                if document is not None:
                    yield document
    except (OSError, ValueError, RuntimeError) as exc:
        raise StageInputError("crawl", f"{path} is not a readable WARC/WET file after {read} "
                                       f"records ({type(exc).__name__}: {exc}); re-download it "
                                       "or remove it from the sources") from None


def _document(record, path: Path, stats: Counter, max_bytes: int) -> dict | None:
    """One record's document, or None (and the reason counted)."""
    from fastwarc.warc import WarcRecordType

    stats["warc_records"] += 1
    url = record.headers.get("WARC-Target-URI") or ""
    kind = record.record_type
    if kind == WarcRecordType.response:
        http = record.http_headers
        status = getattr(http, "status_code", None) if http is not None else None
        if http is None or not isinstance(status, int):  # not HTTP, or a broken status line
            stats["warc_malformed"] += 1
            return None
        if 300 <= status < 400:
            stats["warc_redirects"] += 1
            return None
        if not 200 <= status < 300:
            stats["warc_http_errors"] += 1
            return None
        content_type = http.get("Content-Type") or ""
        encoding = http.get("Content-Encoding")
    else:  # conversion (WET) or resource: the WARC header types the block
        status, encoding = 200, None
        content_type = record.headers.get("Content-Type") or "text/plain"
    media = _media_type(content_type)
    if kind == WarcRecordType.conversion and media in ("", "application/octet-stream"):
        media = "text/plain"
    if media not in HTML_TYPES + TEXT_TYPES:  # decided before the payload is read
        stats["warc_non_text"] += 1
        return None
    body = _read_at_most(record.reader, max_bytes + 1)
    try:
        if len(body) > max_bytes:
            raise TooLarge
        body = _uncompressed(body, encoding, max_bytes)
    except TooLarge:
        stats["warc_too_large"] += 1
        return None
    if body is None:
        stats["warc_undecodable_encoding"] += 1
        return None
    if not body.strip():
        stats["warc_empty"] += 1
        return None
    decoded = decode(body, content_type, html=media in HTML_TYPES)
    stats[f"charset_{decoded.method}"] += 1
    if decoded.errors:
        stats["undecodable_documents"] += 1
        stats["undecodable_bytes"] += decoded.errors
    if record.headers.get("WARC-Truncated"):
        stats["warc_truncated"] += 1
    record_id = _record_id(record, path, url)
    return {"id": record_id, "text": decoded.text, "url": url,
            "content_type": "text/html" if media in HTML_TYPES else "text/plain",
            "warc_record_id": record_id, "fetched_at": _date(record)}
