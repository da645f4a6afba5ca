"""Credentials in URLs (``https://user:password@host/``) are never shown.

A tracking URI such as ``postgresql://user:secret@db/mlflow`` or a seed URL with a user
and password must not reach the console, logs, MLflow params and tags, or Prefect
artifacts. ``redact_url`` masks the user information of one URL; ``redact_secrets``
does it for every such URL inside strings, lists and dicts. Only the part between
``scheme://`` and the host's ``@`` is touched: ``https://medium.com/@user`` and e-mail
addresses stay as they are.

Standard library only: imported by tasks/, models/ and flows/ alike.
"""

from __future__ import annotations

import logging
import re
from typing import Any

MASK = "***"

# scheme://userinfo@ - the userinfo ends at the authority's last '@' (before any / ? #).
_URL = re.compile(r"^(\s*[A-Za-z][A-Za-z0-9+.\-]*://)[^/?#]*@")
# The same inside free text: the userinfo also stops at whitespace, quotes and brackets.
_IN_TEXT = re.compile(r"(?<![A-Za-z0-9+.\-])([A-Za-z][A-Za-z0-9+.\-]*://)"
                      r"[^/?#\s'\"`<>()\[\]{}]*@")


def _replacement(mask: str) -> str:
    return rf"\g<1>{mask}@" if mask else r"\g<1>"


def redact_url(url: str, mask: str = MASK) -> str:
    """``url`` with its user and password replaced by ``mask``
    (``https://user:pw@example.org/`` -> ``https://***@example.org/``; with ``mask=""``
    the user information is removed: ``https://example.org/``). A URL without credentials,
    or a string that is not a URL, is returned unchanged; so is anything not a string."""
    if not isinstance(url, str) or "@" not in url:
        return url
    return _URL.sub(_replacement(mask), url, count=1)


def redact_secrets(obj: Any, mask: str = MASK) -> Any:
    """``obj`` with every ``scheme://user:password@`` inside its strings masked; dicts,
    lists and tuples are walked (a new container is returned), other values kept."""
    if isinstance(obj, str):
        return _IN_TEXT.sub(_replacement(mask), obj) if "@" in obj else obj
    if isinstance(obj, dict):
        return {key: redact_secrets(value, mask) for key, value in obj.items()}
    if isinstance(obj, list):
        return [redact_secrets(value, mask) for value in obj]
    if isinstance(obj, tuple):
        return tuple(redact_secrets(value, mask) for value in obj)
    return obj


def has_credentials(text: str) -> bool:
    """Whether ``text`` holds a URL with user information."""
    return isinstance(text, str) and "@" in text and _IN_TEXT.search(text) is not None


def redact_exception(exc: BaseException) -> BaseException:
    """Mask credentials in the message of ``exc`` and of the exceptions it was raised from
    (``args``, and a ``message`` attribute as MLflow's exceptions have), in place, so that
    re-raising it shows no password in a traceback; returns ``exc``."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if any(has_credentials(a) for a in current.args if isinstance(a, str)):
            try:
                current.args = redact_secrets(tuple(current.args))
            except (AttributeError, TypeError):
                pass
        if has_credentials(getattr(current, "message", None)):
            try:
                current.message = redact_secrets(current.message)
            except (AttributeError, TypeError):
                pass
        current = current.__cause__ or current.__context__
    return exc


def _redact_record(record: logging.LogRecord) -> logging.LogRecord:
    """Mask credentials in a record's message and traceback, in place."""
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a broken record is the handler's to report
        return record
    if has_credentials(message):
        record.msg, record.args = redact_secrets(message), ()
    if record.exc_info and record.exc_info[0] is not None and not record.exc_text:
        text = logging.Formatter().formatException(record.exc_info)
        if has_credentials(text):
            record.exc_text = redact_secrets(text)
    return record


def install_log_redaction() -> None:
    """From now on, mask credentials in URLs of every log record made in this process (its
    message and traceback): a safety net for messages this project does not write itself,
    such as a library's error that quotes the tracking URI. Records without such a URL
    are left as they are. Calling it again does nothing."""
    factory = logging.getLogRecordFactory()
    if getattr(factory, "redacts_urls", False):
        return

    def make_record(*args, **kwargs) -> logging.LogRecord:
        return _redact_record(factory(*args, **kwargs))

    make_record.redacts_urls = True
    logging.setLogRecordFactory(make_record)
