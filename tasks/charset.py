"""Bytes of a web page or record to text: the declared charset, else one sniffed from the
bytes, else a fallback. Never raises; what could not be decoded is counted.

The order follows what browsers do (the WHATWG encoding sniffing algorithm, simplified):

1. a byte-order mark wins;
2. the charset the transport declared (``Content-Type: text/html; charset=...``), if the
   body decodes with it, or with at most 1% of its bytes (or 8) broken (those become U+FFFD and
   are counted: a page with a few bad bytes is still in its declared charset);
3. for HTML, a ``<meta charset>`` / ``http-equiv`` declaration in the first 4 KB, the
   same way;
4. UTF-8, if every byte fits (most of the web, and cheap to try);
5. the encoding charset-normalizer detects from the bytes (windows-1252 among equally
   likely ones);
6. UTF-8 with every undecodable byte replaced by U+FFFD (counted in ``errors``).

As browsers do, a declared ``iso-8859-1``/``us-ascii`` is read as ``windows-1252``, and a
``<meta>`` naming UTF-16 as UTF-8.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

_DECLARED = re.compile(r"charset\s*=\s*[\"']?([\w.:-]+)", re.IGNORECASE)
_META = re.compile(rb"<meta[^>]+charset\s*=\s*[\"']?([\w.:-]+)", re.IGNORECASE)
_BOMS = ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"),
         (codecs.BOM_UTF16_BE, "utf-16"))
# WHATWG: these labels mean windows-1252 on the web
_AS_WINDOWS_1252 = {"latin_1", "iso8859-1", "ascii", "iso-8859-1", "us-ascii"}
METHODS = ("bom", "declared", "meta", "utf-8", "sniffed", "fallback")


@dataclass(frozen=True)
class Decoded:
    text: str
    encoding: str  # the Python codec name used
    method: str  # one of METHODS: how the encoding was chosen
    errors: int = 0  # bytes that could not be decoded (each became U+FFFD)


def _codec(label: str | bytes | None) -> str | None:
    """Python's codec name for a charset label, or None for an unknown label."""
    if not label:
        return None
    if isinstance(label, bytes):
        label = label.decode("ascii", errors="ignore")
    try:
        name = codecs.lookup(label.strip().lower()).name
    except LookupError:
        return None
    return "cp1252" if name in _AS_WINDOWS_1252 else name


def _strict(body: bytes, encoding: str) -> str | None:
    try:
        return body.decode(encoding)
    except (UnicodeDecodeError, LookupError):
        return None


def _errors(text: str, body: bytes) -> int:
    """U+FFFD that decoding introduced (not those the body spelled out in UTF-8)."""
    return text.count("\ufffd") - body.count(b"\xef\xbf\xbd")


def _mostly(body: bytes, encoding: str, method: str) -> Decoded | None:
    """``body`` in ``encoding``: strictly, else with replacements when at most 1% of its
    bytes (or 8) do not decode; None when more do."""
    text = _strict(body, encoding)
    if text is not None:
        return Decoded(text, encoding, method)
    text = body.decode(encoding, errors="replace")
    errors = _errors(text, body)
    return Decoded(text, encoding, method, errors) if errors <= max(8, len(body) // 100) else None


def declared_charset(content_type: str) -> str | None:
    """The codec named by a Content-Type header's charset parameter (None if absent or
    unknown)."""
    match = _DECLARED.search(content_type or "")
    return _codec(match.group(1)) if match else None


def decode(body: bytes, content_type: str = "", *, html: bool | None = None) -> Decoded:
    """Text of ``body``; ``content_type`` is the transport's header value (may be empty).
    ``html`` (default: guessed from the content type) allows a ``<meta>`` declaration."""
    if not body:
        return Decoded("", "utf-8", "utf-8")
    for bom, encoding in _BOMS:
        if body.startswith(bom):
            text = _strict(body, encoding)
            if text is not None:
                return Decoded(text, encoding, "bom")
    candidates = [(declared_charset(content_type), "declared")]
    if html is None:
        html = "html" in (content_type or "").lower() or not content_type
    if html:
        match = _META.search(body[:4096])
        meta = _codec(match.group(1)) if match else None
        # a <meta> read as ASCII cannot be UTF-16: browsers take it as UTF-8 (WHATWG)
        candidates.append(("utf-8" if meta and meta.replace("_", "-").startswith("utf-16") else meta,
                           "meta"))
    for encoding, method in candidates:
        if encoding:
            found = _mostly(body, encoding, method)
            if found is None and encoding == "cp1252":  # 5 bytes cp1252 leaves undefined
                found = Decoded(body.decode("latin-1"), "latin-1", method)
            if found is not None:
                return found
    text = _strict(body, "utf-8")  # undeclared: UTF-8 only when every byte fits
    if text is not None:
        return Decoded(text, "utf-8", "utf-8")
    sniffed = _sniff(body)
    if sniffed:
        text = _strict(body, sniffed)
        if text is not None:
            return Decoded(text, sniffed, "sniffed")
    text = body.decode("utf-8", errors="replace")
    return Decoded(text, "utf-8", "fallback", _errors(text, body))


def _sniff(body: bytes) -> str | None:
    """The encoding charset-normalizer finds most likely; among equally likely ones,
    windows-1252 (the web's most common legacy encoding: short Western European text
    often reads as well in cp1250, and that pick would turn 'è' into 'č')."""
    from charset_normalizer import from_bytes

    matches = list(from_bytes(body[:65536]))  # a sample is enough to tell, and bounds the cost
    if not matches:
        return None
    best = matches[0]
    tied = [m.encoding for m in matches
            if m.chaos <= best.chaos + 1e-9 and m.coherence >= best.coherence - 1e-9]
    return "cp1252" if "cp1252" in tied else _codec(best.encoding)
