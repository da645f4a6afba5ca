"""The crawl's statistics as a short markdown report (published as a Prefect artifact).

The statistics are flat numbers, so they also become MLflow metrics as they are:
``status_<code>`` counts responses by HTTP status, ``failed_<reason>`` counts the URLs
that gave no page by reason (``failed_http_404``, ``failed_connecterror``,
``failed_private_address``, ``failed_disallowed_by_robots_txt``, ...).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

STATUS_PREFIX, FAILED_PREFIX = "status_", "failed_"
SUMMARY = (  # (stat, label)
    ("pages_fetched", "pages stored"),
    ("requests", "requests"),
    ("bytes_downloaded", "bytes downloaded"),
    ("seconds", "seconds"),
    ("pages_per_second", "pages per second"),
    ("retries", "retries"),
    ("redirects", "redirects followed"),
    ("robots_disallowed", "URLs excluded by robots.txt"),
    ("ssrf_refused", "URLs refused by the SSRF guard"),
    ("pages_failed", "URLs failed (network error, HTTP error, ...)"),
    ("too_large", "pages over the size cap"),
    ("non_html", "responses not text"),
    ("noindex", "pages marked noindex (not stored)"),
    ("undecodable_pages", "pages with undecodable bytes"),
    ("out_of_scope", "links out of scope"),
    ("resumes", "times resumed after an interruption"),
)


def reason_key(reason: str) -> str:
    """The statistics key counting URLs not kept for ``reason`` ('HTTP 404' ->
    'failed_http_404')."""
    return FAILED_PREFIX + (re.sub(r"[^a-z0-9]+", "_", reason.lower()).strip("_") or "other")


def _number(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) or float(value).is_integer() \
        else f"{value:,.2f}"


def crawl_report_markdown(stats: Mapping[str, float]) -> str:
    """A markdown report of a crawl's ``stats`` (the crawl manifest's ``stats``)."""
    lines = ["## Crawl report", "", "| | |", "|---|---:|"]
    lines += [f"| {label} | {_number(stats[key])} |" for key, label in SUMMARY if key in stats]
    statuses = sorted((int(k.removeprefix(STATUS_PREFIX)), v) for k, v in stats.items()
                      if k.startswith(STATUS_PREFIX) and k.removeprefix(STATUS_PREFIX).isdigit())
    if statuses:
        lines += ["", "### Responses by HTTP status", "", "| status | responses |", "|---|---:|"]
        lines += [f"| {status} | {_number(n)} |" for status, n in statuses]
    failed = sorted(((k.removeprefix(FAILED_PREFIX).replace("_", " "), v)
                     for k, v in stats.items() if k.startswith(FAILED_PREFIX)),
                    key=lambda item: (-item[1], item[0]))
    if failed:
        lines += ["", "### URLs not kept, by reason", "", "| reason | URLs |", "|---|---:|"]
        lines += [f"| {reason} | {_number(n)} |" for reason, n in failed]
    return "\n".join(lines) + "\n"
