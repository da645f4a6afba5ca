"""FineWeb's rules, one at a time, with FineWeb's thresholds and with the defaults."""

from __future__ import annotations

import pytest

from tasks.fineweb_rules import FineWebConfig, check_fineweb, token_count
from tests.tasks.test_filter import SENTENCES

PROSE = list(SENTENCES)  # the filter tests' varied English prose
PAGE = "\n".join(PROSE)
FINEWEB = FineWebConfig(min_line_punct_ratio=0.12, max_short_line_ratio=0.67,
                        max_char_dup_ratio=0.01, max_newline_word_ratio=0.3)


def test_prose_passes_fineweb_and_the_defaults():
    assert check_fineweb(PAGE, FINEWEB) is None
    assert check_fineweb(PAGE, FineWebConfig()) is None


def test_line_punctuation_ratio():
    # one line in ten ends in punctuation: 0.1 <= 0.12
    text = "\n".join([PROSE[0]] + [s.rstrip(".") + " and more" for s in PROSE[1:]]
                     + ["Another line that goes on without a stop here"])
    assert check_fineweb(text, FINEWEB) == "fineweb_line_punct_ratio"
    assert check_fineweb(text, FineWebConfig()) is None  # default 0.03
    no_stop = text.replace(".", "")
    assert check_fineweb(no_stop, FineWebConfig()) == "fineweb_line_punct_ratio"


def test_short_line_ratio():
    short = [f"See section {i}." for i in range(20)]
    text = "\n".join(PROSE[:5] + short)  # 20 of 25 lines have at most 30 characters
    assert check_fineweb(text, FINEWEB) == "fineweb_short_line_ratio"
    assert check_fineweb(text, FINEWEB.model_copy(update={"short_line_length": 4})) is None
    assert check_fineweb(text, FineWebConfig()) is None  # 0.8 < 0.85


def test_duplicated_line_characters():
    text = "\n".join(PROSE + PROSE[:1])  # one line of nine repeats: ~11% of the characters
    assert check_fineweb(text, FINEWEB) == "fineweb_char_dup_ratio"
    assert check_fineweb(text, FineWebConfig()) is None
    spam = "\n".join(PROSE[:2] + PROSE[2:3] * 12)
    assert check_fineweb(spam, FineWebConfig()) == "fineweb_char_dup_ratio"


def test_list_like_documents():
    items = ["Apples.", "Pears.", "Plums.", "Grapes.", "Lemons."]
    listing = "\n".join(items)  # 4 newlines for 10 tokens
    config = FINEWEB.model_copy(update={"short_line_length": 0})
    assert check_fineweb(listing, config) == "fineweb_list_ratio"
    assert check_fineweb(" ".join(items) + "\n" + PAGE, config) is None


@pytest.mark.parametrize("text, tokens", [
    ("Hello, world!", 4),
    ("don't stop", 4),  # word_tokenize: do n't stop; here: don ' t stop
    ("", 0),
])
def test_token_count_splits_words_and_marks(text, tokens):
    assert token_count(text) == tokens


def test_empty_text_fails_without_dividing_by_zero():
    assert check_fineweb("", FineWebConfig()) == "fineweb_line_punct_ratio"
