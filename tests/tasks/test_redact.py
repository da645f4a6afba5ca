"""Credentials in URLs are masked wherever they could be shown."""

import logging

import pytest

from tasks.redact import (
    has_credentials,
    install_log_redaction,
    redact_exception,
    redact_secrets,
    redact_url,
)


@pytest.mark.parametrize("url, expected", [
    ("https://user:pass@example.org/", "https://***@example.org/"),
    ("http://user:secret@host:5000", "http://***@host:5000"),
    ("postgresql://u:pw@db.internal/mlflow", "postgresql://***@db.internal/mlflow"),
    ("postgresql+psycopg2://u:pw@db:5432/m?sslmode=require",
     "postgresql+psycopg2://***@db:5432/m?sslmode=require"),
    ("https://token@github.com/org/repo.git", "https://***@github.com/org/repo.git"),
    ("https://user:p@ss@example.org/x", "https://***@example.org/x"),  # unencoded '@'
    ("https://example.org/", "https://example.org/"),
    ("https://medium.com/@someone/post", "https://medium.com/@someone/post"),
    ("https://example.org/?to=a@b.org", "https://example.org/?to=a@b.org"),
    ("sqlite:////work/mlflow.db", "sqlite:////work/mlflow.db"),
    ("mailto:someone@example.org", "mailto:someone@example.org"),
    ("not a url at all", "not a url at all"),
    ("", ""),
])
def test_redact_url(url, expected):
    assert redact_url(url) == expected


def test_redact_url_can_drop_the_user_information_and_passes_non_strings():
    assert redact_url("https://u:pw@example.org:8443/a", mask="") == "https://example.org:8443/a"
    assert redact_url(None) is None and redact_url(5) == 5


def test_redact_secrets_walks_containers_and_free_text():
    data = {"crawl": {"seeds": ["https://user:pw@example.org/", "https://plain.org/"],
                      "max_pages": 5},
            "note": "stored in postgresql://u:pw@db/m, ask admin@example.org",
            "pair": ("ftp://a:pw@h/", 1.5), "none": None}
    out = redact_secrets(data)
    assert out == {"crawl": {"seeds": ["https://***@example.org/", "https://plain.org/"],
                             "max_pages": 5},
                   "note": "stored in postgresql://***@db/m, ask admin@example.org",
                   "pair": ("ftp://***@h/", 1.5), "none": None}
    assert data["crawl"]["seeds"][0] == "https://user:pw@example.org/"  # input untouched
    # inside a repr: the quote ends the URL, so the masking stays within it
    assert redact_secrets(str(["https://u:pw@a.org", "x@y"])) == "['https://***@a.org', 'x@y']"
    assert has_credentials("see http://u:pw@h/") and not has_credentials("see http://h/@x")


def test_redact_exception_masks_the_message_and_its_causes():
    try:
        try:
            raise ConnectionError("cannot reach http://u:pw@host:5000/api")
        except ConnectionError as inner:
            error = RuntimeError("API request to http://u:pw@host:5000/api failed")
            error.message = "API request to http://u:pw@host:5000/api failed"
            raise error from inner
    except RuntimeError as exc:
        redact_exception(exc)
        assert "pw" not in str(exc) and "pw" not in exc.message
        assert str(exc.__cause__) == "cannot reach http://***@host:5000/api"


def test_log_redaction_masks_messages_and_tracebacks(caplog):
    factory = logging.getLogRecordFactory()
    try:
        install_log_redaction()
        install_log_redaction()  # idempotent
        log = logging.getLogger("tests.redact")
        with caplog.at_level(logging.INFO, logger="tests.redact"):
            log.info("MLflow run %s in %s", "abc", "http://u:s3cret@host:5000")
            log.info("nothing to hide in %s", "https://example.org/")
            try:
                raise ValueError("bad store postgresql://u:s3cret@db/m")
            except ValueError:
                log.exception("tracking failed")
        assert "s3cret" not in caplog.text
        assert "MLflow run abc in http://***@host:5000" in caplog.text
        assert "nothing to hide in https://example.org/" in caplog.text
        assert "postgresql://***@db/m" in caplog.text
    finally:
        logging.setLogRecordFactory(factory)
