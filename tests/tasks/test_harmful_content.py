"""Harmful content: domain and word blocklists, the shipped defaults, and the user's scorer."""

from __future__ import annotations

import textwrap

import pytest

from flows.config import ConfigError, load_config
from tasks.filter import FilterConfig, filter_documents
from tasks.harmful_content import (
    DomainBlocklist,
    HarmfulContentConfig,
    WordBlocklist,
    blocklists,
    read_entries,
)
from tasks.shards import iter_records, write_records
from tests.tasks.test_filter import SENTENCES

PROSE_LINES = list(SENTENCES)  # the filter tests' varied English prose
PROSE = "\n".join(PROSE_LINES)


@pytest.mark.parametrize("url, blocked", [
    ("https://example.com/", True),
    ("https://www.example.com/page?q=1", True),
    ("http://user@EXAMPLE.COM.:8080/x", True),
    ("https://notexample.com/", False),
    ("https://example.com.elsewhere.org/", False),
    ("https://deep.sub.bad.org/", True),
    ("https://bad.org.uk/", False),
    ("http://evil.net/download", True),
    ("https://anything.xxx/", True),
    ("https://www.xn--bcher-kva.de/", True),
    ("https://bücher.de/", True),
    ("", False),
    (None, False),
    ("not a url", False),
    ("http://[::1/", False),
])
def test_domains_block_themselves_and_their_subdomains(url, blocked):
    domains = DomainBlocklist(["example.com", "*.bad.org", "https://evil.net/path", "xxx",
                               "bücher.de", "http://[broken"])
    assert domains.blocks(url) is blocked


@pytest.mark.parametrize("text, count", [
    ("Nothing to see here.", 0),
    ("Spam spam SPAM, and more spam!", 4),
    ("spammer and spams are other words", 0),  # whole words only
    ("Get a FREE download now; free, download it!", 2),  # phrases, across punctuation
    ("free of charge, download later", 0),
])
def test_words_match_whole_words_ignoring_case(text, count):
    words = WordBlocklist(["spam", "free download"])
    assert words.count(text) == count


def test_list_files_skip_comments_and_blank_lines(tmp_path):
    path = tmp_path / "list.txt"
    path.write_text("# a comment\n\nexample.com  # trailing comment\n  other.org\n")
    assert read_entries([path]) == ["example.com", "other.org"]


def test_the_default_lists_ship_with_the_package():
    lists = blocklists(HarmfulContentConfig())
    assert len(lists.domains) >= 5 and len(lists.words) >= 5
    assert lists.domains.blocks("https://www.pornhub.com/view")
    assert lists.domains.blocks("https://example.porn/")
    assert not lists.domains.blocks("https://docs.python.org/3/")
    none = blocklists(HarmfulContentConfig(use_default_blocklists=False))
    assert len(none.domains) == 0 and len(none.words) == 0


def _stage(tmp_path, records, config: FilterConfig, name="run"):
    write_records(records, tmp_path / name / "in")
    result = filter_documents(config, tmp_path / name / "in", tmp_path / name / "out")
    kept = {r["id"]: r for r in iter_records(tmp_path / name / "out" / "data")}
    removed = {r["id"]: r for r in iter_records(tmp_path / name / "out" / "removed")}
    return result["stats"], kept, removed


def test_blocklists_in_the_stage(tmp_path):
    domains, words = tmp_path / "domains.txt", tmp_path / "words.txt"
    domains.write_text("casino.example\n")
    words.write_text("jackpot\n")
    records = [
        {"id": "good", "url": "https://docs.example/a", "text": PROSE},
        {"id": "adult", "url": "https://www.xvideos.com/v/1", "text": PROSE},
        {"id": "casino", "url": "https://play.casino.example/", "text": PROSE},
        {"id": "three", "url": "https://docs.example/b",
         "text": PROSE + "\nWin the jackpot, the Jackpot, the JACKPOT tonight."},
        {"id": "two", "url": "https://docs.example/c",
         "text": PROSE + "\nNobody wins the jackpot twice, or a jackpot at all."},
    ]
    config = FilterConfig(harmful={"blocked_domain_files": [str(domains)],
                                   "blocked_word_files": [str(words)]})
    stats, kept, removed = _stage(tmp_path, records, config)
    assert set(kept) == {"good", "two"}
    assert {k: r["reason"] for k, r in removed.items()} == {
        "adult": "blocked_domain", "casino": "blocked_domain", "three": "blocked_words"}
    assert stats["removed_blocked_domain"] == 2 and stats["removed_blocked_words"] == 1
    assert removed["adult"]["language"] == "en"  # every document carries its language

    c4_value = config.model_copy(update={"harmful": config.harmful.model_copy(
        update={"max_blocked_words": 0})})
    _, kept, _ = _stage(tmp_path, records, c4_value, name="strict")
    assert set(kept) == {"good"}


def test_missing_list_files_fail_when_the_config_loads(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"filter.harmful.blocked_word_files=[{tmp_path / 'nope.txt'}]"])
    assert "filter.harmful.blocked_word_files" in str(info.value)
    assert "nope.txt" in str(info.value)


def _scorer_module(tmp_path, monkeypatch, name: str, body: str) -> str:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_a_scorer_decides_and_its_score_is_kept(tmp_path, monkeypatch):
    module = _scorer_module(tmp_path, monkeypatch, "forgeline_test_quality", """
        SEEN = []

        def quality(record):
            SEEN.append(record["language"])
            return 0.9 if "decorator" in record["text"] else 0.1

        def harmful(record):
            return "decorator" in record["text"]
    """)
    records = [{"id": "good", "url": "", "text": PROSE},
               {"id": "bland", "url": "", "text": PROSE.replace("a short decorator", "code")}]
    config = FilterConfig(harmful={"scorer": f"{module}:quality"})
    stats, kept, removed = _stage(tmp_path, records, config)
    assert set(kept) == {"good"} and kept["good"]["scorer_score"] == 0.9
    assert removed["bland"]["reason"] == "scorer" and removed["bland"]["scorer_score"] == 0.1
    assert stats["removed_scorer"] == 1
    assert __import__(module).SEEN == ["en", "en"]  # called with the whole record

    above = FilterConfig(harmful={"scorer": f"{module}:harmful", "scorer_removes": "above"})
    _, kept, removed = _stage(tmp_path, records, above, name="above")
    assert set(kept) == {"bland"} and removed["good"]["reason"] == "scorer"
    assert kept["bland"]["scorer_score"] == 0.0


def test_a_scorer_returning_nonsense_fails_only_its_documents(tmp_path, monkeypatch):
    module = _scorer_module(tmp_path, monkeypatch, "forgeline_test_bad_scorer", """
        def score(record):
            return "high" if record["id"] == "odd" else 1
    """)
    records = [{"id": "odd", "url": "", "text": PROSE}, {"id": "fine", "url": "", "text": PROSE}]
    stats, kept, removed = _stage(tmp_path, records,
                                  FilterConfig(harmful={"scorer": f"{module}:score"}))
    assert set(kept) == {"fine"} and removed["odd"]["reason"] == "filter_error"
    assert stats["errors_TypeError"] == 1


@pytest.mark.parametrize("path, message", [
    ("no_colon_here", "package.module:function"),
    ("forgeline_no_such_module_xyz:score", "cannot import 'forgeline_no_such_module_xyz'"),
    ("json:no_such_function", "has no function 'no_such_function'"),
    ("json:JSONDecodeError.msg", "package.module:function"),
])
def test_a_bad_scorer_path_is_a_config_error_naming_the_field(path, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"filter.harmful.scorer={path}"])
    assert "filter.harmful.scorer" in str(info.value) and message in str(info.value)
