"""One spelling per page: the canonical form of a crawled URL, and the document id made from it.

Two links that reach the same page must be fetched and stored once, so every URL the
crawler sees (seeds, links, redirect targets) goes through ``canonical_url``:

- resolved against the page it was found on; scheme and host lower-cased, the host in
  its ASCII form (IDNA 2008, as httpx encodes it; a name IDNA 2008 rejects is refused)
  without a trailing dot; the scheme's default port, user information and fragment
  dropped; ``.``/``..`` path segments resolved; an empty path becomes ``/``;
- percent-escapes normalized (``%7e`` -> ``~``, ``%2f`` -> ``%2F``), unsafe characters
  escaped, a ``;jsessionid=...`` path parameter dropped;
- query parameters that only track a visit (``utm_*``, ``fbclid``, ``gclid``, ...: the
  configurable ``crawl.strip_query_params``) removed, and the rest sorted by name
  (parameters of one name keep their order), so ``?b=2&a=1`` and ``?a=1&b=2`` are one page.

courlan (installed with trafilatura) has ``normalize_url``, but it is not used here: its
tracker pattern also strips parameters that select content (``ref``, ``source``, ``cid``,
``uid``, ``keyword``, ``session``...), it drops parameters without a value (``?print``),
keeps ``user:password@`` and the fragment, and does not remove ``:80`` from an IPv6 host;
its strict mode drops every parameter outside a short list (pydoc's ``?key=`` among them).

Standard library only, but for ``idna`` (installed with httpx), imported when a host
name is not ASCII: the config imports this module.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterable
from urllib.parse import quote, urljoin, urlsplit, urlunsplit

DEFAULT_PORTS = {"http": 80, "https": 443}
# Query parameters that identify a click, a campaign or a session, not a page: analytics
# (Google, Matomo/Piwik, HubSpot, Mailchimp, Marketo, ...) and ad-click ids.
DEFAULT_TRACKING_PARAMS = (
    "utm_*", "fbclid", "gclid", "gclsrc", "dclid", "gbraid", "wbraid", "msclkid", "yclid",
    "twclid", "ttclid", "igshid", "li_fat_id", "mc_cid", "mc_eid", "_ga", "_gl", "_hsenc",
    "_hsmi", "mkt_tok", "pk_*", "mtm_*", "oly_anon_id", "oly_enc_id", "vero_id", "vero_conv",
    "jsessionid", "phpsessid", "aspsessionid*",
)
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"
_QUERY_SAFE = _PATH_SAFE + "?"
_JSESSIONID = re.compile(r";jsessionid=[^/]*", re.IGNORECASE)
_HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")


def _normalize_escapes(text: str, safe: str) -> str:
    """Unsafe characters escaped; escapes of unreserved characters decoded, others in upper
    case; a '%' that starts no escape becomes '%25'."""
    text = re.sub(r"%(?![0-9A-Fa-f]{2})", "%25", text)
    text = quote(text, safe=safe)

    def one(match: re.Match) -> str:
        char = chr(int(match.group(1), 16))
        return char if char in _UNRESERVED else "%" + match.group(1).upper()

    return _ESCAPE.sub(one, text)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986, 5.2.4: '/a/./b/../c' -> '/a/c'."""
    if "." not in path:
        return path
    out: list[str] = []
    segments = path.split("/")
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment == ".":
            if last:
                out.append("")
        elif segment == "..":
            if len(out) > 1:
                out.pop()
            if last:
                out.append("")
        else:
            out.append(segment)
    return "/".join(out) if out and out[0] == "" else "/" + "/".join(out)


@functools.lru_cache(maxsize=64)
def _param_matcher(patterns: tuple[str, ...]) -> re.Pattern | None:
    """One regular expression for parameter names: 'utm_*' is a prefix, other names are
    whole names; case does not matter."""
    if not patterns:
        return None
    parts = [re.escape(p[:-1]) + ".*" if p.endswith("*") else re.escape(p) for p in patterns]
    return re.compile("(?:" + "|".join(parts) + ")", re.IGNORECASE)


def _canonical_query(query: str, strip: re.Pattern | None, sort: bool) -> str:
    pairs = []
    for pair in query.split("&"):
        if not pair:
            continue
        name, _, _ = pair.partition("=")
        name = _normalize_escapes(name, _QUERY_SAFE)
        if strip is not None and strip.fullmatch(name.replace("+", " ")):
            continue
        pairs.append((name, _normalize_escapes(pair, _QUERY_SAFE)))
    if sort:
        pairs.sort(key=lambda pair: pair[0])  # stable: values of one name keep their order
    return "&".join(pair for _, pair in pairs)


def _ascii_host(host: str) -> str | None:
    """The host in ASCII: an IP literal as it is, a name lower-cased and IDNA-encoded,
    without a trailing dot; None if it cannot be a host name."""
    host = host.rstrip(".")
    if ":" in host:  # IPv6 literal (urlsplit has checked the brackets)
        return host
    if not host.isascii():
        host = idna_host(host)
        if host is None:
            return None
    host = host.lower()
    return host if _HOST_NAME.fullmatch(host) else None


def idna_host(host: str) -> str | None:
    """An internationalized host name in ASCII as IDNA 2008 (with the UTS #46 mapping:
    case, full-width forms) encodes it, the way httpx does, or None when IDNA 2008 has
    no such name. Not the standard library's IDNA 2003 codec: it maps ``faß.de`` to
    ``fass.de``, another domain, and lets characters through that IDNA 2008 forbids."""
    import idna  # installed with httpx; imported only when a URL needs it

    try:
        return idna.encode(host, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError, ValueError):
        return None


def canonical_url(url: str, base: str | None = None, *,
                  strip_params: Iterable[str] = DEFAULT_TRACKING_PARAMS,
                  sort_query: bool = True) -> str | None:
    """The canonical spelling of ``url`` (resolved against ``base``), or None unless it is
    an http(s) URL with a valid host. ``strip_params`` are the query parameter names to
    drop (``utm_*`` matches a prefix); ``sort_query`` orders the rest by name."""
    try:
        parts = urlsplit(urljoin(base, url.strip()) if base else url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme, host = parts.scheme.lower(), _ascii_host(parts.hostname or "")
    if scheme not in DEFAULT_PORTS or not host:
        return None
    netloc = f"[{host}]" if ":" in host else host
    if port is not None and port != DEFAULT_PORTS[scheme]:
        netloc += f":{port}"
    path = _remove_dot_segments(_JSESSIONID.sub("", parts.path) or "/")
    query = _canonical_query(parts.query, _param_matcher(tuple(strip_params)), sort_query)
    return urlunsplit((scheme, netloc, _normalize_escapes(path, _PATH_SAFE), query, ""))


def url_id(url: str) -> str:
    """A page's document id: 16 hex characters of the SHA-1 of its canonical URL."""
    return hashlib.sha1(url.encode("utf-8")).hexdigest()[:16]


def origin(url: str) -> str:
    """``scheme://host[:port]`` of a canonical URL."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def host_port(url: str) -> tuple[str, int]:
    """The host (lower case, IPv6 without brackets) and port (explicit or the scheme's
    default) that a request to ``url`` connects to."""
    parts = urlsplit(url)
    return (parts.hostname or "").lower(), parts.port or DEFAULT_PORTS[parts.scheme.lower()]
