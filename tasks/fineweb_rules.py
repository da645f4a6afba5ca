"""FineWeb's quality rules (Penedo et al. 2024, "The FineWeb Datasets: Decanting the Web
for the Finest Text Data at Scale", section 3.3), as datatrove's ``FineWebQualityFilter``
implements them. Each removes a whole document:

* ``fineweb_line_punct_ratio``: too few lines end in punctuation (. ' " ! ?);
* ``fineweb_short_line_ratio``: too many lines are short (<= 30 characters);
* ``fineweb_char_dup_ratio``: too many characters sit in lines that repeat an earlier
  line;
* ``fineweb_list_ratio``: too many newlines per word (lists, menus, tables).

As in datatrove, lines are the text split on ``\\n`` (blank lines count in the first two
ratios) and the duplicate ratio is over the text's characters without newlines. Words are
counted as NLTK's ``word_tokenize`` would roughly split them (word runs and single
punctuation marks), without NLTK.

FineWeb's thresholds were chosen on web pages; Python documentation, the default
corpus, is made of short signature lines, and its class pages repeat their inherited
methods. The defaults below are loosened for it; FineWeb's values are in each
description.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

from pydantic import BaseModel, ConfigDict, Field

STOP_CHARS = (".", "'", '"', "!", "?")
_TOKEN = re.compile(r"\w+|[^\w\s]")

REASONS = ("fineweb_line_punct_ratio", "fineweb_short_line_ratio", "fineweb_char_dup_ratio",
           "fineweb_list_ratio")


class FineWebConfig(BaseModel):
    """FineWeb's rules: each removes a document; FineWeb's value is in each description."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        True, description="Apply the FineWeb rules below (after the C4 rules, on the text "
                          "they kept).")
    min_line_punct_ratio: float = Field(
        0.03, ge=0, le=1, description="Remove documents where the fraction of lines "
                                      "ending in . ' \" ! ? is at most this "
                                      "(fineweb_line_punct_ratio). FineWeb: 0.12, which "
                                      "removes 19% of the default corpus's pages (signature "
                                      "and code lines end otherwise); 0.03 removes one, a "
                                      "bare package listing.")
    short_line_length: int = Field(
        30, ge=0, description="A line of at most this many characters is short. FineWeb: 30.")
    max_short_line_ratio: float = Field(
        0.85, ge=0, le=1, description="Remove documents where the fraction of short lines "
                                      "is at least this (fineweb_short_line_ratio). FineWeb: "
                                      "0.67, which removes 24% of the default corpus's pages "
                                      "(median 0.59: names, signatures); 0.85 removes one, "
                                      "a table of constants.")
    max_char_dup_ratio: float = Field(
        0.7, ge=0, le=1, description="Remove documents where the characters in lines that "
                                     "repeat an earlier line are at least this fraction of "
                                     "the text (fineweb_char_dup_ratio). FineWeb: 0.01, "
                                     "which removes 64% of the default corpus's pages (class "
                                     "pages repeat their inherited methods); 0.7, as "
                                     "filter.max_duplicate_line_char_fraction, removes none.")
    max_newline_word_ratio: float = Field(
        0.3, ge=0, description="Remove documents with more newlines per word than this, "
                               "list-like pages (fineweb_list_ratio). FineWeb: 0.3.")


@lru_cache(maxsize=4)
def token_count(text: str) -> int:
    """Words and punctuation marks, about as NLTK's word_tokenize counts them."""
    return sum(1 for _ in _TOKEN.finditer(text))


def duplicate_share(items: Sequence[str]) -> tuple[float, int]:
    """(fraction of items that repeat an earlier item, characters in those repeats): the
    Gopher repetition rules' measure (tasks.filter) and FineWeb's duplicated-line chars."""
    seen: set[str] = set()
    count = chars = 0
    for item in items:
        if item in seen:
            count += 1
            chars += len(item)
        else:
            seen.add(item)
    return (count / len(items) if items else 0.0), chars


def check_fineweb(text: str, config: FineWebConfig) -> str | None:
    """The first FineWeb rule the text fails, or None."""
    lines = text.split("\n")
    punctuated = sum(line.endswith(STOP_CHARS) for line in lines) / len(lines)
    if punctuated <= config.min_line_punct_ratio:
        return "fineweb_line_punct_ratio"
    short = sum(len(line) <= config.short_line_length for line in lines) / len(lines)
    if short >= config.max_short_line_ratio:
        return "fineweb_short_line_ratio"
    chars = len(text) - (len(lines) - 1)  # without the newlines
    _, repeated = duplicate_share([line for line in lines if line.strip()])
    if chars and repeated / chars >= config.max_char_dup_ratio:
        return "fineweb_char_dup_ratio"
    tokens = token_count(text)
    if (len(lines) - 1) / max(1, tokens) > config.max_newline_word_ratio:
        return "fineweb_list_ratio"
    return None
