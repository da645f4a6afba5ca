"""Every HTTP exchange of a crawl, archived as WARC/1.1 (gzip, one member per record).

Two series of files in ``<stage>/archive/``, as Common Crawl splits them:

- ``crawl-00000.warc.gz``: the request and response of every page the crawl stored, so
  extraction can be redone from the archive with the network off, and a WARC reader gets
  exactly the crawl's documents from it;
- ``crawldiagnostics-00000.warc.gz``: every other response: robots.txt, redirects, error
  statuses, retried attempts, non-text and ``noindex`` pages, bodies over the size cap.

A response record holds the status line and the headers as received, and the body as
the crawler read it: decoded from its transfer and content encodings. As Common Crawl
does, the headers that described the encoded form are kept under an ``X-Crawler-``
prefix (``X-Crawler-Content-Encoding: gzip``, ``X-Crawler-Content-Length: 812``), and
``Content-Length`` gives the archived body's length, so any WARC reader (warcio,
fastwarc) reads the body as is. A body the crawler did not download (a redirect, an
error status, a non-text type) or cut at ``crawl.max_bytes`` is marked
``WARC-Truncated: length`` (cut) or ``unspecified`` (not read); its headers are moved
the same way (``Content-Length`` then gives what was archived: the cut part, or 0). A
file is continued until it passes ``max_file_bytes``; ``position()`` says where the last
record ends, so an interrupted crawl can cut off a record that a kill left half written
and go on; a crawl killed before it saved any position starts its archive afresh. A
record that fails to write is cut off at once.

warcio is imported when an archive is opened, not when the config is loaded.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

WARC_FILE_BYTES = 1_000_000_000  # the usual size of a WARC file
ENCODING_HEADERS = {"content-encoding", "transfer-encoding", "content-length"}


@dataclass
class Exchange:
    """One HTTP request and the response to it."""

    url: str  # WARC-Target-URI
    request_line: str  # "GET /path?query HTTP/1.1"
    request_headers: list[tuple[str, str]]
    http_version: str  # "HTTP/1.1"
    status: int
    reason: str
    headers: list[tuple[str, str]]  # as received, in order
    body: bytes
    truncated: str = ""  # '' (whole body), 'length' (cut), 'unspecified' (not read)
    date: datetime | None = None


def warc_date(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def archived_headers(headers: list[tuple[str, str]], body_length: int,
                     truncated: str) -> list[tuple[str, str]]:
    """The response headers to archive beside a decoded body (see the module docstring),
    whole, cut or not read (``truncated``): a reader must never try to decode it again."""
    encoded = any(name.lower() in ("content-encoding", "transfer-encoding")
                  for name, _ in headers)
    lengths = [value for name, value in headers if name.lower() == "content-length"]
    if not encoded and lengths == [str(body_length)]:
        return list(headers)
    kept = [(f"X-Crawler-{name}" if name.lower() in ENCODING_HEADERS else name, value)
            for name, value in headers]
    return kept + [("Content-Length", str(body_length))]


class WarcArchive:
    """One series of WARC files, ``<directory>/<prefix>-NNNNN.warc.gz``, appended to."""

    def __init__(self, directory: str | Path, prefix: str,
                 position: tuple[str, int] | None = None,
                 max_file_bytes: int = WARC_FILE_BYTES, software: str = "forgeline"):
        """``position`` (from ``position()``, saved with the crawl's progress): go on from
        there, cutting off what was written after it. None: start the series afresh, so
        whatever a crawl killed before its first commit left (maybe a half-written record)
        is removed."""
        from warcio.warcwriter import WARCWriter

        self._writer_class = WARCWriter
        self.directory, self.prefix = Path(directory), prefix
        self.max_file_bytes, self.software = max_file_bytes, software
        self.directory.mkdir(parents=True, exist_ok=True)
        index, offset = 0, 0
        if position is not None:
            name, offset = position
            index = self._index(name)
            if index is None:
                raise ValueError(f"{name!r} is not a file of the {prefix!r} WARC series")
        for later in self.files():
            if (self._index(later.name) or 0) > index:
                later.unlink()
        with open(self.directory / f"{prefix}-{index:05d}.warc.gz", "ab") as partial:
            partial.truncate(offset)  # the end of the last record the crawl committed
        self._open(index)

    def files(self) -> list[Path]:
        return sorted(self.directory.glob(f"{self.prefix}-*.warc.gz"))

    def _index(self, name: str) -> int | None:
        """The number of this series' file ``name`` (None for another file)."""
        match = re.fullmatch(rf"{re.escape(self.prefix)}-(\d+)\.warc\.gz", name)
        return int(match.group(1)) if match else None

    def _open(self, index: int) -> None:
        self.index = index
        self.path = self.directory / f"{self.prefix}-{index:05d}.warc.gz"
        self.file = open(self.path, "ab")  # noqa: SIM115 - open across writes, see close()
        self.writer = self._writer_class(self.file, gzip=True, warc_version="1.1")
        if self.file.tell() == 0:
            self.writer.write_record(self.writer.create_warcinfo_record(
                self.path.name, {"software": self.software, "format": "WARC File Format 1.1",
                                 "conformsTo": "https://iipc.github.io/warc-specifications/"
                                               "specifications/warc-format/warc-1.1/"}))

    def write(self, exchange: Exchange) -> str:
        """Append the request and response records; returns the response's WARC-Record-ID."""
        from warcio.statusandheaders import StatusAndHeaders

        date = warc_date(exchange.date or datetime.now(timezone.utc))
        headers = archived_headers(exchange.headers, len(exchange.body), exchange.truncated)
        extra = {"WARC-Date": date}
        if exchange.truncated:
            extra["WARC-Truncated"] = exchange.truncated
        response = self.writer.create_warc_record(
            exchange.url, "response", payload=io.BytesIO(exchange.body),
            warc_headers_dict=extra,
            http_headers=StatusAndHeaders(f"{exchange.status} {exchange.reason}".strip(),
                                          headers, protocol=exchange.http_version))
        request = self.writer.create_warc_record(
            exchange.url, "request", payload=io.BytesIO(b""), warc_headers_dict={"WARC-Date": date},
            http_headers=StatusAndHeaders(exchange.request_line, exchange.request_headers,
                                          is_http_request=True))
        start = self.file.tell()
        try:
            self.writer.write_request_response_pair(request, response)
            self.file.flush()
        except BaseException:
            self.file.truncate(start)  # no half-written record before the next one
            self.file.seek(start)  # and position() says so
            raise
        if self.file.tell() >= self.max_file_bytes:
            self.file.close()
            self._open(self.index + 1)
        return response.rec_headers.get_header("WARC-Record-ID")

    def position(self) -> tuple[str, int]:
        """The current file's name and the offset after its last complete record."""
        return self.path.name, self.file.tell()

    def close(self) -> None:
        self.file.close()
