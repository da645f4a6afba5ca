"""Filter stage: each quality rule on handmade texts, then the core end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from pydantic import ValidationError

from tasks import filter as F
from tasks.filter import FilterConfig, filter_documents
from tasks.filter import gopher_check as check
from tasks.shards import iter_records, write_records
from tasks.stage import StageInputError

SENTENCES = [
    "The parser reads the configuration file and reports each problem to the user.",
    "Every option has a default value that works for most small projects.",
    "Errors name the line where they happened and suggest a likely fix.",
    "Large files are streamed so that memory stays bounded by one block.",
    "Tests cover the common cases as well as a few unusual inputs.",
    "Plugins can register new commands with a short decorator.",
    "Logging goes to standard error with one line for each event.",
    "The cache is invalidated whenever the source of a step changes.",
]
GOOD = "\n".join(SENTENCES)  # ~90 words of varied English prose
STRICT = FilterConfig()  # the defaults
ROOT = Path(__file__).resolve().parents[2]
PYDOC = """json.dumps(obj, *, skipkeys=False, ensure_ascii=True, indent=None)
Serialize ``obj`` to a JSON formatted ``str``.
If ``skipkeys`` is true then ``dict`` keys that are not basic types
(``str``, ``int``, ``float``, ``bool``, ``None``) will be skipped
instead of raising a ``TypeError``.
If ``ensure_ascii`` is false, then the return value can contain non-ASCII
characters if they appear in strings contained in ``obj``.
Methods inherited from builtins.object:
__delattr__(self, name, /)
Implement delattr(self, name).
__getattribute__(self, name, /)
Return getattr(self, name).
>>> import json
>>> json.dumps(['foo', {'bar': ('baz', None, 1.0, 2)}])
'["foo", {"bar": ["baz", null, 1.0, 2]}]'
Methods inherited from builtins.object:
__delattr__(self, name, /)
Implement delattr(self, name).
__getattribute__(self, name, /)
Return getattr(self, name)."""


def test_good_prose_passes_every_rule():
    assert check(GOOD, STRICT) is None


@pytest.mark.parametrize("text, config, reason", [
    ("Too short to be a document worth training on.", STRICT, "too_few_words"),
    (GOOD, FilterConfig(min_words=10, max_words=20), "too_many_words"),
    (" ".join(["a b c of to"] * 20), STRICT, "mean_word_length"),
    (" ".join(["internationalization telecommunications"] * 30), STRICT, "mean_word_length"),
    (GOOD + "\n" + "#" * 40 + " " + "# " * 20, STRICT, "symbol_ratio"),
    ("\n".join(f"- {s}" for s in SENTENCES * 2), FilterConfig(max_bullet_line_fraction=0.5),
     "bullet_lines"),
    ("\n".join(s[:40] + "..." for s in SENTENCES * 2),
     FilterConfig(max_symbol_to_word_ratio=1.0), "ellipsis_lines"),
    (GOOD + "\n" + " ".join(str(n) for n in range(1000, 1100)), STRICT, "alpha_words"),
    (" ".join(f"word{i} alpha beta gamma delta" for i in range(20)), STRICT, "stopwords"),
])
def test_each_rule_names_its_reason(text, config, reason):
    assert check(text, config) == reason


def test_repeated_lines_are_removed_even_with_the_loose_defaults():
    spam = "\n".join([SENTENCES[0]] * 20 + SENTENCES[1:3])
    assert check(spam, STRICT) == "duplicate_lines"


def test_gopher_repetition_thresholds_are_stricter():
    gopher = FilterConfig(max_duplicate_line_fraction=0.3, max_duplicate_line_char_fraction=0.2,
                          max_duplicate_paragraph_fraction=0.3,
                          max_duplicate_paragraph_char_fraction=0.2)
    text = "\n".join(SENTENCES + SENTENCES[:4])  # a third of the lines repeat
    assert check(text, STRICT) is None
    assert check(text, gopher) == "duplicate_lines"
    long_repeat = "\n".join(SENTENCES[:2] + [SENTENCES[2] * 3] * 2 + SENTENCES[3:])
    assert check(long_repeat, gopher) == "duplicate_line_chars"


def test_repeated_paragraphs():
    paragraphs = ["\n".join(SENTENCES[:4]), "\n".join(SENTENCES[4:])]
    repeated = "\n\n".join([paragraphs[0] + " one", paragraphs[1] + " two"] * 2)
    config = FilterConfig(max_duplicate_line_fraction=1, max_duplicate_line_char_fraction=1,
                          max_duplicate_paragraph_char_fraction=0.2)
    assert check(repeated, config) == "duplicate_paragraph_chars"
    assert check(repeated, config.model_copy(update={"max_duplicate_paragraph_fraction": 0.3})) \
        == "duplicate_paragraphs"


def test_top_ngram_dominating_the_text():
    text = GOOD + "\n" + " ".join(["buy now"] * 60)
    loose = FilterConfig(max_duplicate_line_fraction=1, max_duplicate_line_char_fraction=1,
                         max_duplicate_paragraph_fraction=1,
                         max_duplicate_paragraph_char_fraction=1)
    assert F.top_ngram_char_fraction(text, 2) > 0.2
    assert check(text, loose) == "top_ngram"


def test_duplicate_ngrams_within_lines():
    # the same long sentence repeated inside one line: no duplicate lines, many duplicate 5-grams
    text = GOOD + "\n" + " ".join(SENTENCES * 4)
    assert F.duplicate_ngram_char_fraction(text, 5) > 0.6
    assert check(text, STRICT) == "duplicate_ngram"


def test_duplicate_ngram_fraction_counts_a_repeat_once():
    text = "one two three four five six one two three four five six"
    # the second "one two three four five" (23 of 55 characters) repeats; the overlapping
    # 5-gram after it is not counted again
    assert F.duplicate_ngram_char_fraction(text, 5) == pytest.approx(23 / 55)


def test_python_documentation_passes_the_defaults():
    assert check(PYDOC, STRICT) is None


def test_config_validates_ranges():
    with pytest.raises(ValidationError, match="min_words"):
        FilterConfig(min_words=500, max_words=100)
    with pytest.raises(ValidationError):
        FilterConfig(max_duplicate_line_fraction=1.5)
    assert all(f.description for f in FilterConfig.model_fields.values())


def _corpus(tmp_path):
    records = [
        {"id": "good-1", "url": "http://h/1", "text": GOOD, "title": "One"},
        {"id": "short", "url": "http://h/2", "text": "Buy cheap now.", "title": "Two"},
        {"id": "good-2", "url": "http://h/3", "text": "\n".join(reversed(SENTENCES)),
         "title": "Three"},
        {"id": "numbers", "url": "http://h/4",
         "text": " ".join(str(n) for n in range(1000, 1200)), "title": "Four"},
        {"id": "spam", "url": "http://h/5", "text": "\n".join([SENTENCES[0]] * 20),
         "title": "Five"},
    ]
    write_records(records, tmp_path / "in", shard_size=2)


def test_core_keeps_good_documents_and_records_reasons(tmp_path):
    _corpus(tmp_path)
    result = filter_documents(FilterConfig(), tmp_path / "in", tmp_path / "out")
    assert result["count"] == 2
    stats = result["stats"]
    assert stats["input_documents"] == 5 and stats["kept"] == 2
    # the language checks run first: three words are too few to be sure of English, and
    # a list of numbers is in no language
    assert stats["removed_low_language_score"] == 1
    assert stats["removed_language"] == 1
    assert stats["removed_duplicate_lines"] == 1
    # every reason is reported, zeros included, so runs can be compared
    assert {f"removed_{r}" for r in F.REASONS} <= set(stats)
    assert stats["removed_top_ngram"] == 0

    ds = datasets.load_dataset("parquet", data_dir=str(tmp_path / "out" / "data"),
                               split="train")
    assert ds["id"] == ["good-1", "good-2"]
    assert ds["title"] == ["One", "Three"]
    removed = {r["id"]: r for r in iter_records(tmp_path / "out" / "removed")}
    assert {k: r["reason"] for k, r in removed.items()} == {
        "short": "low_language_score", "numbers": "language", "spam": "duplicate_lines"}
    assert removed["short"]["words"] == 3 and removed["short"]["url"] == "http://h/2"
    assert ds["language"] == ["en", "en"] and min(ds["language_score"]) > 0.9
    assert removed["spam"]["language"] == "en" and removed["numbers"]["language"] != "en"


def test_without_language_checks_the_gopher_rules_name_the_reasons(tmp_path):
    _corpus(tmp_path)
    result = filter_documents(FilterConfig(languages=[]), tmp_path / "in", tmp_path / "out")
    stats = result["stats"]
    assert stats["kept"] == 2 and stats["removed_too_few_words"] == 1
    assert stats["removed_alpha_words"] == 1 and stats["removed_duplicate_lines"] == 1


def test_nothing_left_names_counts_and_setting(tmp_path):
    _corpus(tmp_path)
    with pytest.raises(StageInputError) as info:
        filter_documents(FilterConfig(min_words=1000, languages=[]), tmp_path / "in",
                         tmp_path / "out")
    message = str(info.value)
    assert "all 5 documents were removed" in message
    assert "too_few_words: 5" in message and "filter.min_words" in message


def test_missing_input_is_an_input_error(tmp_path):
    (tmp_path / "in").mkdir()
    with pytest.raises(StageInputError, match="no shard"):
        filter_documents(FilterConfig(), tmp_path / "in", tmp_path / "out")


GERMAN_LINES = [
    "Die Bibliothek öffnet um neun Uhr morgens und schließt um sechs Uhr abends.",
    "Besucher können bis zu zehn Bücher gleichzeitig ausleihen.",
    "Der Lesesaal im zweiten Stock ist ruhig genug zum Lernen.",
    "Unser Zug hatte wegen einer Signalstörung fast eine Stunde Verspätung.",
    "Als wir endlich ankamen, hatte das Hotel unser Zimmer noch frei.",
    "Die Dame an der Rezeption empfahl uns ein kleines Restaurant um die Ecke.",
    "Für das Brot vermischt man das Mehl mit warmem Wasser, Hefe und einer Prise Salz.",
    "Der Teig sollte zwei Stunden ruhen, bis er sich verdoppelt hat.",
]
GERMAN = "\n".join(GERMAN_LINES)


def _run(tmp_path, records, config=None, name="run"):
    write_records(records, tmp_path / name / "in")
    result = filter_documents(config or FilterConfig(), tmp_path / name / "in",
                              tmp_path / name / "out")
    kept = {r["id"]: r for r in iter_records(tmp_path / name / "out" / "data")}
    removed = {r["id"]: r for r in iter_records(tmp_path / name / "out" / "removed")}
    return result["stats"], kept, removed


def test_the_language_check_runs_before_the_quality_rules(tmp_path):
    records = [{"id": "de", "url": "", "text": GERMAN}, {"id": "en", "url": "", "text": GOOD}]
    _, _, removed = _run(tmp_path, records, name="default")
    assert removed["de"]["reason"] == "language" and removed["de"]["language"] == "de"
    # kept by the language check, German prose then fails Gopher's English stop words
    _, kept, removed = _run(tmp_path, records, FilterConfig(languages=[]), name="all")
    assert removed["de"]["reason"] == "stopwords" and set(kept) == {"en"}
    _, kept, _ = _run(tmp_path, records, FilterConfig(languages=["de"], min_stopwords=0),
                      name="de")
    assert set(kept) == {"de"}


def test_c4_line_rules_change_the_kept_text_and_count_the_lines(tmp_path):
    text = "\n".join(SENTENCES[:4] + ["Please enable JavaScript to view the comments."]
                     + SENTENCES[4:] + ["This site uses cookies to improve your visit."])
    stats, kept, _ = _run(tmp_path, [{"id": "page", "url": "https://h/p", "text": text}])
    assert kept["page"]["text"] == GOOD
    assert stats["c4_lines_dropped_javascript"] == 1 and stats["c4_lines_dropped_policy"] == 1
    assert stats["c4_documents_changed"] == 1
    assert stats["c4_chars_dropped"] == len(text) - len(GOOD)
    assert stats["c4_lines_dropped_too_few_words"] == 0  # tracked even when nothing happened


def test_removed_documents_keep_their_text_as_it_came(tmp_path):
    text = GOOD + "\nPlease enable JavaScript to continue.\nlorem ipsum dolor sit amet, at vero."
    _, _, removed = _run(tmp_path, [{"id": "lorem", "url": "", "text": text},
                                    {"id": "good", "url": "", "text": GOOD}])
    assert removed["lorem"]["reason"] == "c4_lorem_ipsum"
    assert removed["lorem"]["text"] == text


def test_python_documentation_passes_every_default_check(tmp_path):
    _, kept, _ = _run(tmp_path, [{"id": "json", "url": "http://pydoc/json.html",
                                  "text": PYDOC}])
    assert set(kept) == {"json"} and kept["json"]["language"] == "en"
    assert kept["json"]["text"] == PYDOC  # no C4 line rule fired


def test_every_reason_is_a_metric_with_its_setting(tmp_path):
    stats, _, _ = _run(tmp_path, [{"id": "en", "url": "", "text": GOOD}])
    assert {f"removed_{r}" for r in F.REASONS} <= set(stats)
    assert not any(stats[f"removed_{r}"] for r in F.REASONS)
    for reason in F.REASONS:  # the nothing-left error names a setting for each reason
        message = F._nothing_left_message({"input_documents": 3, f"removed_{reason}": 3})
        assert f"{reason}: 3" in message and "filter." in message


def test_nothing_left_names_the_languages_found(tmp_path):
    write_records([{"id": f"de-{i}", "url": "", "text": GERMAN} for i in range(3)],
                  tmp_path / "in")
    with pytest.raises(StageInputError) as info:
        filter_documents(FilterConfig(), tmp_path / "in", tmp_path / "out")
    message = str(info.value)
    assert "language: 3" in message and "filter.languages" in message
    assert "de: 3" in message


def test_nested_rule_settings_load_and_name_the_field():
    from flows.config import ConfigError, load_config

    config = load_config(None, ["filter.c4.min_words_per_line=3",
                                "filter.fineweb.enabled=false"]).filter
    assert config.c4.min_words_per_line == 3 and not config.fineweb.enabled
    with pytest.raises(ConfigError, match="filter.fineweb.max_short_line_ratio"):
        load_config(None, ["filter.fineweb.max_short_line_ratio=2"])


def test_validating_the_config_loads_no_language_model():
    code = ("import sys, tasks.filter; tasks.filter.FilterConfig(languages=['de']); "
            "print('py3langid' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False"


def test_the_cache_key_follows_the_blocklists(tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("alpha\n")
    config = FilterConfig(harmful={"blocked_word_files": [str(words)]})
    before = F.key_inputs(config)
    words.write_text("alpha\nbeta\n")
    assert F.key_inputs(config) != before
    assert all(Path(p).is_file() for p in F.CODE)
