"""The crawl stage's settings (``crawl.`` in the pipeline config).

Loading a config imports nothing heavy: this module needs pydantic and the standard
library only (``crawl_urls`` and ``crawl_guard`` check seeds and host entries).
"""

from __future__ import annotations

import re
from datetime import datetime, timezone

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasks.crawl_guard import parse_allowance
from tasks.crawl_urls import DEFAULT_TRACKING_PARAMS, canonical_url
from tasks.redact import redact_url


class CrawlConfig(BaseModel):
    """Which pages to fetch, and how politely."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Run this stage (the flow needs it unless "
                                            "source.paths gives local documents).")
    seeds: list[str] = Field(
        [], description="Start URLs (http or https). Empty: this Python's standard-library "
                        "documentation is served on 127.0.0.1 and crawled, so the pipeline "
                        "runs without internet access.")
    max_pages: int = Field(
        250, ge=1, description="Stop after storing this many pages. Failed or refused URLs "
                               "do not count. The default crawls the embedded docs in seconds.")
    max_depth: int = Field(3, ge=0, description="Follow links at most this many clicks away "
                                                "from a seed (0: fetch only the seeds).")
    same_host: bool = Field(
        True, description="Follow only links to the seeds' hosts (exact host name and port; "
                          "a seed that redirects adds its target's host).")
    include: list[str] = Field(
        [], description="Regular expressions; a discovered link is followed only if it "
                        "matches one of them (searched in the full URL). Empty: all links. "
                        "Seeds are always fetched.")
    exclude: list[str] = Field(
        [], description="Regular expressions; a discovered link matching any of them is "
                        "not followed.")
    concurrency: int = Field(8, ge=1, le=256, description="Requests in flight at once, "
                                                          "over all hosts.")
    per_host_concurrency: int = Field(
        2, ge=1, le=64, description="Requests in flight at once to one host. Keep it small "
                                    "for sites you do not own.")
    delay_seconds: float = Field(
        0.0, ge=0, le=600, description="Minimum pause between the starts of two requests to "
                                       "the same host; a larger Crawl-delay in its robots.txt "
                                       "wins. 0 suits loopback; use 1 or more for real sites.")
    timeout_seconds: float = Field(10.0, gt=0, le=600,
                                   description="Give up on one request (connect and whole "
                                               "response) after this many seconds.")
    retries: int = Field(3, ge=0, le=10, description="Retries of a request after a network "
                                                     "error, a timeout, 429 or a 5xx status.")
    backoff_seconds: float = Field(
        0.5, ge=0, le=60, description="Wait before the first retry; it doubles at each "
                                      "further retry. A Retry-After header replaces it.")
    max_retry_after_seconds: float = Field(
        60.0, ge=0, le=3600, description="Cap on the wait a Retry-After header can ask for.")
    max_bytes: int = Field(2_000_000, ge=1_000,
                           description="Pages larger than this many bytes (after decompression) "
                                       "are abandoned while downloading and counted as "
                                       "too_large.")
    user_agent: str = Field(
        "forgeline/0.1 (+https://github.com/forgeline)", min_length=1,
        description="User-Agent header. Its first word (before '/') is the name matched "
                    "against robots.txt groups and robots meta tags.")
    respect_robots: bool = Field(True, description="Obey robots.txt and robots meta tags. "
                                                   "Turn off only for sites you own.")
    allowed_private_hosts: list[str] = Field(
        [], description="Hosts the crawler may fetch although they are not on the public "
                        "internet. Any other host whose address is private, loopback, "
                        "link-local, multicast or reserved is refused before any connection "
                        "(links and redirects alike), so a page cannot point the crawler at "
                        "internal services. A host name ('intranet.example', 'localhost') "
                        "allows that name; an IP address or CIDR network ('10.0.0.5', "
                        "'10.0.0.0/8') allows every host resolving into it; add ':port' to "
                        "allow one port ('127.0.0.1:8080'). The embedded docs crawl allows "
                        "its own loopback server by itself.")
    strip_query_params: list[str] = Field(
        list(DEFAULT_TRACKING_PARAMS),
        description="Query parameters removed from every URL because they track a visit "
                    "rather than select a page, so each page is fetched and stored once. "
                    "Case-insensitive; a trailing '*' matches a prefix ('utm_*').")
    sort_query: bool = Field(
        True, description="Sort query parameters by name, so '?b=2&a=1' and '?a=1&b=2' are "
                          "one page. Turn off for sites where the order matters.")
    archive: bool = Field(
        True, description="Write every response to WARC files beside the pages: "
                          "archive/crawl-NNNNN.warc.gz (the stored pages, enough to redo "
                          "extraction offline) and archive/crawldiagnostics-NNNNN.warc.gz "
                          "(robots.txt, redirects, errors and other responses).")
    shard_size: int = Field(500, ge=1, description="Pages per output parquet shard.")
    snapshot: str = Field(
        "fixed", min_length=1,
        description="A label that is part of this stage's cache key: a different label "
                    "fetches fresh pages, the same label reuses what was fetched. 'daily' "
                    "means the current UTC date, so pages are fetched again once a day.")

    @field_validator("seeds")
    @classmethod
    def _http_seeds(cls, seeds: list[str]) -> list[str]:
        for seed in seeds:
            if canonical_url(seed) is None:
                raise ValueError(f"seed {redact_url(seed)!r} is not an http(s) URL with a "
                                 "valid host name (IDNA 2008 for international names)")
        # The crawler never sends a seed's user:password (canonical_url drops it), so it is
        # masked here, before the config reaches logs, MLflow params or Prefect parameters.
        return [redact_url(seed) for seed in seeds]

    @field_validator("include", "exclude")
    @classmethod
    def _valid_patterns(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a valid regular expression: {exc}") \
                    from None
        return patterns

    @field_validator("allowed_private_hosts")
    @classmethod
    def _valid_allowances(cls, entries: list[str]) -> list[str]:
        for entry in entries:
            parse_allowance(entry)  # its ValueError says what a valid entry looks like
        return entries

    @field_validator("strip_query_params")
    @classmethod
    def _valid_param_names(cls, names: list[str]) -> list[str]:
        for name in names:
            if not re.fullmatch(r"[^\s&=*]+\*?", name):
                raise ValueError(f"{name!r} is not a query parameter name (an optional "
                                 "trailing '*' matches a prefix, as in 'utm_*')")
        return names


def resolve_snapshot(label: str, now: datetime | None = None) -> str:
    """The cache-key value of ``CrawlConfig.snapshot``: ``daily`` becomes today's UTC date."""
    if label == "daily":
        return (now or datetime.now(timezone.utc)).astimezone(timezone.utc).date().isoformat()
    return label
