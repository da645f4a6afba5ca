"""Filter: keep documents in the configured languages that pass the quality and
harmful-content rules; the others go to removed/ with the reason of the first check they
fail. The checks run in this order:

1. language identification (``tasks.language``, py3langid): ``filter.languages`` and
   ``filter.min_language_score``; every document, kept or removed, gets ``language`` and
   ``language_score`` columns;
2. the domain and word blocklists (``tasks.harmful_content``);
3. the Gopher rules (here): Rae et al. 2021 ("Scaling Language Models: Methods, Analysis &
   Insights from Training Gopher", appendix A), as datatrove's GopherQualityFilter and
   GopherRepetitionFilter implement them. The repetition thresholds are looser than
   Gopher's by default because Python documentation, the default corpus, repeats
   inherited methods on every class page (see the field descriptions for Gopher's values);
4. the C4 rules (``tasks.c4_rules``), which drop lines from the text as well as remove
   documents: a kept document carries the cleaned text;
5. the FineWeb rules (``tasks.fineweb_rules``), on the text C4 kept;
6. the user's scorer, if one is configured (``filter.harmful.scorer``).

Each Gopher rule is a small function ``(text, config) -> reason | None``, run in the order
of ``GOPHER_RULES``. Every reason is a ``removed_<reason>`` statistic (zero included), so
runs can be compared, and the error raised when nothing is left names the settings to
loosen.
"""

from __future__ import annotations

import logging
import re
import string
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tasks import c4_rules, fineweb_rules, harmful_content, language
from tasks.c4_rules import C4Config, clean_c4
from tasks.fineweb_rules import FineWebConfig, check_fineweb, duplicate_share
from tasks.harmful_content import (
    Blocklists,
    HarmfulContentConfig,
    blocklists,
    score_document,
)
from tasks.shard_runner import Mapper, Removed, ShardStep, run_sharded
from tasks.shards import file_sha256
from tasks.stage import StageInputError

log = logging.getLogger(__name__)


class FilterConfig(BaseModel):
    """Language, quality and harmful-content rules; a document failing one is removed with
    that rule's reason."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Run this stage; when off, every document is kept.")
    languages: list[str] = Field(
        ["en"], description="Languages to keep, as ISO 639-1 codes (en, de, fr, zh, ...), "
                            "identified by py3langid before any other rule; documents in "
                            "others are removed (language). Empty keeps every language. "
                            "Every document gets language and language_score columns.")
    min_language_score: float = Field(
        0.65, ge=0, le=1, description="Documents in a kept language whose probability is "
                                      "below this are removed (low_language_score); short "
                                      "and mixed-language texts score lower. FineWeb's "
                                      "value (with fastText). On the default corpus the "
                                      "language checks remove 9 of 249 pages (constant "
                                      "tables, bare listings), all of which the Gopher "
                                      "rules remove too.")
    language_sample_chars: int = Field(
        2000, ge=0, description="Identify the language from the first this many characters "
                                "(py3langid walks bytes in Python: about 0.5 ms per 1000 "
                                "characters, so the cost per document stays bounded); 0: "
                                "the whole text. On the default corpus 1000 or more keep "
                                "every English page the Gopher rules keep; 500 loses 10.")
    gopher_enabled: bool = Field(
        True, description="Apply the Gopher rules below (min_words .. "
                          "max_duplicate_10gram_char_fraction).")
    min_words: int = Field(
        50, ge=0, description="Gopher: documents with fewer words are removed (too_few_words). "
                              "Words are whitespace-separated tokens that are not only "
                              "punctuation.")
    max_words: int = Field(
        100_000, ge=1, description="Gopher: documents with more words are removed "
                                   "(too_many_words).")
    min_mean_word_length: float = Field(
        3.0, ge=0, description="Gopher: documents whose mean word length (characters) is below "
                               "this are removed (mean_word_length).")
    max_mean_word_length: float = Field(
        10.0, ge=0, description="Gopher: documents whose mean word length is above this are "
                                "removed (mean_word_length); on pydoc pages only stub "
                                "modules and bare package listings exceed it.")
    max_symbol_to_word_ratio: float = Field(
        0.1, ge=0, description="Gopher: maximum count of '#' and ellipses ('...', '…') per "
                               "word (symbol_ratio). Doctest continuation lines ('...') count, "
                               "so raise this for code-heavy corpora.")
    max_bullet_line_fraction: float = Field(
        0.9, ge=0, le=1, description="Gopher: maximum fraction of lines starting with a bullet "
                                     "(•, -, *, ‣, ▪) (bullet_lines).")
    max_ellipsis_line_fraction: float = Field(
        0.3, ge=0, le=1, description="Gopher: maximum fraction of lines ending with an ellipsis, "
                                     "typical of truncated teaser lists (ellipsis_lines).")
    min_alpha_word_fraction: float = Field(
        0.8, ge=0, le=1, description="Gopher: minimum fraction of words that contain a letter "
                                     "(alpha_words). Code identifiers count as words with "
                                     "letters, so Python documentation passes (median 0.99 on "
                                     "pydoc pages); what fails are tables of numeric constants "
                                     "(errno, stat, token) and symbol soup.")
    min_stopwords: int = Field(
        2, ge=0, description="Gopher: minimum number of English stop words (the, be, to, of, "
                             "and, that, have, with) a document must contain, a cheap sign "
                             "of running English prose (stopwords). 0 disables.")
    # Python documentation repeats itself by design: every class page lists the methods it
    # inherits, with their docstrings. Gopher's repetition thresholds remove 43% of pydoc
    # pages holding 76% of the text, so the defaults below are looser; the Gopher values,
    # better for web crawls, are given in each description.
    max_duplicate_line_fraction: float = Field(
        0.75, ge=0, le=1, description="Maximum fraction of lines that repeat an earlier line "
                                      "(duplicate_lines). Gopher: 0.3, which removes most "
                                      "pydoc class pages (inherited methods repeat).")
    max_duplicate_line_char_fraction: float = Field(
        0.7, ge=0, le=1, description="Maximum fraction of characters in lines that repeat an "
                                     "earlier line (duplicate_line_chars). Gopher: 0.2.")
    max_duplicate_paragraph_fraction: float = Field(
        0.75, ge=0, le=1, description="Maximum fraction of paragraphs (blocks separated by "
                                      "blank lines) that repeat an earlier one "
                                      "(duplicate_paragraphs). Gopher: 0.3.")
    max_duplicate_paragraph_char_fraction: float = Field(
        0.7, ge=0, le=1, description="Maximum fraction of characters in repeated paragraphs "
                                     "(duplicate_paragraph_chars). Gopher: 0.2.")
    max_top_2gram_char_fraction: float = Field(
        0.20, ge=0, le=1, description="Gopher: maximum fraction of characters covered by the "
                                      "most frequent word 2-gram (top_ngram).")
    max_top_3gram_char_fraction: float = Field(
        0.18, ge=0, le=1, description="Gopher: same for the most frequent 3-gram (top_ngram).")
    max_top_4gram_char_fraction: float = Field(
        0.16, ge=0, le=1, description="Gopher: same for the most frequent 4-gram (top_ngram).")
    max_duplicate_5gram_char_fraction: float = Field(
        0.60, ge=0, le=1, description="Maximum fraction of characters inside word 5-grams "
                                      "seen earlier in the document (duplicate_ngram). "
                                      "Gopher: 0.15.")
    max_duplicate_6gram_char_fraction: float = Field(
        0.59, ge=0, le=1, description="Same for 6-grams (duplicate_ngram). Gopher: 0.14.")
    max_duplicate_7gram_char_fraction: float = Field(
        0.58, ge=0, le=1, description="Same for 7-grams (duplicate_ngram). Gopher: 0.13.")
    max_duplicate_8gram_char_fraction: float = Field(
        0.57, ge=0, le=1, description="Same for 8-grams (duplicate_ngram). Gopher: 0.12.")
    max_duplicate_9gram_char_fraction: float = Field(
        0.56, ge=0, le=1, description="Same for 9-grams (duplicate_ngram). Gopher: 0.11.")
    max_duplicate_10gram_char_fraction: float = Field(
        0.55, ge=0, le=1, description="Same for 10-grams (duplicate_ngram). Gopher: 0.10.")

    c4: C4Config = Field(
        default_factory=C4Config, description="C4's rules (Raffel et al. 2020): line rules "
                                               "that drop lines, and page rules. Shares "
                                               "below are of the default corpus's pages "
                                               "that pass the Gopher rules.")
    fineweb: FineWebConfig = Field(
        default_factory=FineWebConfig, description="FineWeb's rules (Penedo et al. 2024). "
                                                   "Shares below are of the default "
                                                   "corpus's pages that pass the Gopher "
                                                   "rules.")
    harmful: HarmfulContentConfig = Field(
        default_factory=HarmfulContentConfig, description="Domain and word blocklists, and "
                                                          "a scoring function of your own.")

    @field_validator("languages")
    @classmethod
    def _known_languages(cls, codes: list[str]) -> list[str]:
        return language.check_language_codes(codes)

    @model_validator(mode="after")
    def _ranges(self) -> FilterConfig:
        if self.min_words > self.max_words:
            raise ValueError(f"filter.min_words ({self.min_words}) is above filter.max_words "
                             f"({self.max_words})")
        if self.min_mean_word_length > self.max_mean_word_length:
            raise ValueError("filter.min_mean_word_length is above filter.max_mean_word_length")
        return self


STOPWORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
BULLETS = ("•", "-", "*", "‣", "▪", "●", "◦", "–")
ELLIPSES = ("...", "…")
_PUNCTUATION = string.punctuation + "…–—‘’“”«»•‣▪●◦"
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


# Several rules look at the same words and lines; caching the split on the (immutable,
# hash-cached) text means each document is tokenized once, not once per rule.
@lru_cache(maxsize=4)
def words(text: str) -> tuple[str, ...]:
    """Whitespace tokens with surrounding punctuation stripped; punctuation-only ones dropped."""
    stripped = (token.strip(_PUNCTUATION) for token in text.split())
    return tuple(w for w in stripped if w)


@lru_cache(maxsize=4)
def lines(text: str) -> tuple[str, ...]:
    """Non-empty lines, stripped."""
    return tuple(s for s in (line.strip() for line in text.split("\n")) if s)


@lru_cache(maxsize=4)
def paragraphs(text: str) -> tuple[str, ...]:
    return tuple(p for p in (p.strip() for p in _PARAGRAPH_BREAK.split(text)) if p)


def ngrams(tokens: Sequence[str], n: int) -> list[str]:
    return [" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def top_ngram_char_fraction(text: str, n: int) -> float:
    """Share of the text's characters taken by the most frequent word n-gram (if repeated)."""
    grams = ngrams(words(text), n)
    if not grams or not text:
        return 0.0
    gram, count = Counter(grams).most_common(1)[0]
    return len(gram) * count / len(text) if count > 1 else 0.0


def duplicate_ngram_char_fraction(text: str, n: int) -> float:
    """Share of characters inside n-grams seen earlier in the text.

    After a repeat the scan jumps past it, so overlapping repeats are not counted twice
    (as in Gopher: a sentence repeated once counts its length once).
    """
    tokens = words(text)
    if len(tokens) < n or not text:
        return 0.0
    seen: set[tuple[str, ...]] = set()
    repeated = 0
    i = 0
    while i <= len(tokens) - n:
        gram = tokens[i:i + n]
        if gram in seen:
            repeated += sum(len(t) for t in gram) + n - 1
            i += n
        else:
            seen.add(gram)
            i += 1
    return repeated / len(text)


# ---- rules: (text, config) -> removal reason or None ------------------------------------

def word_count_rule(text: str, config: FilterConfig) -> str | None:
    count = len(words(text))
    if count < config.min_words:
        return "too_few_words"
    if count > config.max_words:
        return "too_many_words"
    return None


def mean_word_length_rule(text: str, config: FilterConfig) -> str | None:
    tokens = words(text)
    mean = sum(map(len, tokens)) / len(tokens) if tokens else 0.0
    if not config.min_mean_word_length <= mean <= config.max_mean_word_length:
        return "mean_word_length"
    return None


def symbol_ratio_rule(text: str, config: FilterConfig) -> str | None:
    symbols = text.count("#") + text.count("...") + text.count("…")
    if symbols / max(1, len(words(text))) > config.max_symbol_to_word_ratio:
        return "symbol_ratio"
    return None


def bullet_lines_rule(text: str, config: FilterConfig) -> str | None:
    all_lines = lines(text)
    bullets = sum(line.startswith(BULLETS) for line in all_lines)
    if all_lines and bullets / len(all_lines) > config.max_bullet_line_fraction:
        return "bullet_lines"
    return None


def ellipsis_lines_rule(text: str, config: FilterConfig) -> str | None:
    all_lines = lines(text)
    ellipses = sum(line.endswith(ELLIPSES) for line in all_lines)
    if all_lines and ellipses / len(all_lines) > config.max_ellipsis_line_fraction:
        return "ellipsis_lines"
    return None


def alpha_words_rule(text: str, config: FilterConfig) -> str | None:
    tokens = words(text)
    alpha = sum(any(c.isalpha() for c in w) for w in tokens)
    if tokens and alpha / len(tokens) < config.min_alpha_word_fraction:
        return "alpha_words"
    return None


def stopwords_rule(text: str, config: FilterConfig) -> str | None:
    found = sum(w.lower() in STOPWORDS for w in words(text))
    return "stopwords" if found < config.min_stopwords else None


def duplicate_lines_rule(text: str, config: FilterConfig) -> str | None:
    fraction, chars = duplicate_share(lines(text))
    if fraction > config.max_duplicate_line_fraction:
        return "duplicate_lines"
    if chars / max(1, len(text)) > config.max_duplicate_line_char_fraction:
        return "duplicate_line_chars"
    return None


def duplicate_paragraphs_rule(text: str, config: FilterConfig) -> str | None:
    fraction, chars = duplicate_share(paragraphs(text))
    if fraction > config.max_duplicate_paragraph_fraction:
        return "duplicate_paragraphs"
    if chars / max(1, len(text)) > config.max_duplicate_paragraph_char_fraction:
        return "duplicate_paragraph_chars"
    return None


def top_ngram_rule(text: str, config: FilterConfig) -> str | None:
    for n in (2, 3, 4):
        limit = getattr(config, f"max_top_{n}gram_char_fraction")
        if top_ngram_char_fraction(text, n) > limit:
            return "top_ngram"
    return None


def duplicate_ngram_rule(text: str, config: FilterConfig) -> str | None:
    for n in range(5, 11):
        limit = getattr(config, f"max_duplicate_{n}gram_char_fraction")
        if duplicate_ngram_char_fraction(text, n) > limit:
            return "duplicate_ngram"
    return None


Rule = Callable[[str, FilterConfig], str | None]

# Cheap rules first: most junk is caught before the n-gram scans run.
GOPHER_RULES: tuple[Rule, ...] = (
    word_count_rule, mean_word_length_rule, symbol_ratio_rule, bullet_lines_rule,
    ellipsis_lines_rule, alpha_words_rule, stopwords_rule, duplicate_lines_rule,
    duplicate_paragraphs_rule, top_ngram_rule, duplicate_ngram_rule,
)
LANGUAGE_REASONS = ("language", "low_language_score")
GOPHER_REASONS = ("too_few_words", "too_many_words", "mean_word_length", "symbol_ratio",
                  "bullet_lines", "ellipsis_lines", "alpha_words", "stopwords",
                  "duplicate_lines", "duplicate_line_chars", "duplicate_paragraphs",
                  "duplicate_paragraph_chars", "top_ngram", "duplicate_ngram")
# Every removal reason, in the order the checks run.
REASONS = (LANGUAGE_REASONS + ("blocked_domain", "blocked_words") + GOPHER_REASONS
           + c4_rules.REASONS + fineweb_rules.REASONS + ("scorer",))
# Which setting to loosen for each reason, for the error raised when nothing is left.
_SETTINGS = {
    "language": "languages",
    "low_language_score": "min_language_score",
    "blocked_domain": "harmful.blocked_domain_files (or harmful.use_default_blocklists)",
    "blocked_words": "harmful.max_blocked_words",
    "too_few_words": "min_words", "too_many_words": "max_words",
    "mean_word_length": "min/max_mean_word_length", "symbol_ratio": "max_symbol_to_word_ratio",
    "bullet_lines": "max_bullet_line_fraction", "ellipsis_lines": "max_ellipsis_line_fraction",
    "alpha_words": "min_alpha_word_fraction", "stopwords": "min_stopwords",
    "duplicate_lines": "max_duplicate_line_fraction",
    "duplicate_line_chars": "max_duplicate_line_char_fraction",
    "duplicate_paragraphs": "max_duplicate_paragraph_fraction",
    "duplicate_paragraph_chars": "max_duplicate_paragraph_char_fraction",
    "top_ngram": "max_top_<n>gram_char_fraction",
    "duplicate_ngram": "max_duplicate_<n>gram_char_fraction",
    "c4_lorem_ipsum": "c4.remove_lorem_ipsum",
    "c4_curly_bracket": "c4.remove_curly_bracket",
    "c4_too_few_sentences": "c4.min_sentences (or the c4 line rules)",
    "fineweb_line_punct_ratio": "fineweb.min_line_punct_ratio",
    "fineweb_short_line_ratio": "fineweb.max_short_line_ratio",
    "fineweb_char_dup_ratio": "fineweb.max_char_dup_ratio",
    "fineweb_list_ratio": "fineweb.max_newline_word_ratio",
    "scorer": "harmful.scorer_threshold (or harmful.scorer)",
}
# Checked when the module loads, so a new reason cannot go without its setting.
assert set(_SETTINGS) == set(REASONS), set(REASONS) ^ set(_SETTINGS)


def gopher_check(text: str, config: FilterConfig) -> str | None:
    """The reason of the first failing Gopher rule, or None when the text passes them all."""
    for rule in GOPHER_RULES:
        reason = rule(text, config)
        if reason is not None:
            return reason
    return None


def language_check(language_code: str, score: float, config: FilterConfig) -> str | None:
    if not config.languages:
        return None
    if language_code not in config.languages:
        return "language"
    if score < config.min_language_score:
        return "low_language_score"
    return None


def _nothing_left_message(stats: dict) -> str:
    counts = {r: stats[f"removed_{r}"] for r in REASONS if stats.get(f"removed_{r}")}
    worst = sorted(counts, key=counts.get, reverse=True)
    listing = ", ".join(f"{r}: {counts[r]}" for r in worst)
    if stats.get("removed_filter_error"):
        listing += f"{', ' if listing else ''}filter_error: {stats['removed_filter_error']}"
    settings = [f"filter.{_SETTINGS[r]}" for r in worst[:2]]
    if "language" in worst[:2]:
        found = {k.removeprefix("language_"): v for k, v in stats.items()
                 if k.startswith("language_")}
        top = sorted(found, key=found.get, reverse=True)[:5]
        settings[worst.index("language")] += (
            f" (the documents are in {', '.join(f'{c}: {found[c]}' for c in top)}; [] keeps "
            "every language)")
    if not settings:  # every document raised
        return (f"all {stats['input_documents']} documents were removed ({listing}): a check "
                "raised on each (the log names the errors' classes); check "
                "filter.harmful.scorer, or disable the stage (filter.enabled=false)")
    return (f"all {stats['input_documents']} documents were removed ({listing}); loosen "
            f"{', '.join(settings)}, disable the stage (filter.enabled=false), or check the "
            "source")


class FilterStep(ShardStep):
    """The language, blocklist and quality checks over the documents of a shard."""

    name = "filter"
    batch_size = 256

    def apply(self, records: list[dict], stats: Counter) -> list[dict | Removed]:
        lists = blocklists(self.config.harmful)
        return [self.check_document(record, lists, stats) for record in records]

    def check_document(self, record: dict, lists: Blocklists, stats: Counter
                       ) -> dict | Removed:
        """The record to keep (with its language, and its text as the C4 rules left it),
        or the original record removed with the reason of the first check it fails."""
        config: FilterConfig = self.config
        text = record.get("text") or ""
        code, score = language.identify_language(text, config.language_sample_chars)
        stats[f"language_{code}"] += 1
        record = {**record, "language": code, "language_score": score}
        if config.harmful.scorer:
            record["scorer_score"] = None  # the column exists in every shard
        reason = language_check(code, score, config)
        if reason is None and lists.domains.blocks(record.get("url")):
            reason = "blocked_domain"
        if reason is None and lists.words.count(text) > config.harmful.max_blocked_words:
            reason = "blocked_words"
        if reason is None and config.gopher_enabled:
            reason = gopher_check(text, config)
        cleaned = text
        if reason is None and config.c4.enabled:
            result = clean_c4(text, config.c4)
            reason = result.reason
            if reason is None and result.text != text:
                cleaned = result.text
                stats["c4_documents_changed"] += 1
                stats["c4_chars_dropped"] += len(text) - len(cleaned)
                for rule, lines in result.dropped.items():
                    stats[f"c4_lines_dropped_{rule}"] += lines
        if reason is None and config.fineweb.enabled:
            reason = check_fineweb(cleaned, config.fineweb)
        if reason is None and config.harmful.scorer:
            record["scorer_score"] = score_document(config.harmful, {**record, "text": cleaned})
            if harmful_content.scorer_removes(config.harmful, record["scorer_score"]):
                reason = "scorer"
        if reason is not None:
            return Removed({**record, "words": len(words(text))}, reason)
        return {**record, "text": cleaned} if cleaned is not text else record

    @classmethod
    def summary(cls, config: FilterConfig, stats: dict) -> str:
        found = {k.removeprefix("language_"): v for k, v in stats.items()
                 if k.startswith("language_")}
        top = sorted(found, key=found.get, reverse=True)
        line = "languages: " + ", ".join(f"{c} {found[c]}" for c in top[:8])
        if len(top) > 8:
            line += f" and {len(top) - 8} more"
        dropped = sum(v for k, v in stats.items() if k.startswith("c4_lines_dropped_"))
        if dropped:
            line += (f"; C4 line rules dropped {dropped} lines ({stats['c4_chars_dropped']} "
                     f"characters) from {stats['c4_documents_changed']} kept documents")
        return line

    @classmethod
    def check_result(cls, config: FilterConfig, stats: dict) -> None:
        if stats.get("kept", 0) == 0:
            raise StageInputError("filter", _nothing_left_message(stats))


def filter_documents(config: FilterConfig, input_dir: Path, out_dir: Path,
                     mapper: Mapper | None = None) -> dict:
    """Keep documents in the configured languages that pass every quality and
    harmful-content rule (their text as the C4 line rules leave it); the others go to
    removed/ with a reason."""
    result = run_sharded(FilterStep, config, input_dir, out_dir, mapper)
    stats = result["stats"]
    for reason in REASONS:  # every reason is a tracked metric, even when it never happened
        stats.setdefault(f"removed_{reason}", 0)
    for rule in c4_rules.LINE_RULES:
        stats.setdefault(f"c4_lines_dropped_{rule}", 0)
    stats.setdefault("c4_documents_changed", 0)
    stats.setdefault("c4_chars_dropped", 0)
    return result


# The code and data that decide what the stage keeps, for its cache key (flows/stages.py).
CODE = [Path(__file__), Path(language.__file__), Path(harmful_content.__file__),
        Path(c4_rules.__file__), Path(fineweb_rules.__file__),
        harmful_content.DEFAULT_DOMAINS, harmful_content.DEFAULT_WORDS]


def key_inputs(config: FilterConfig) -> dict:
    """What besides its settings and code decides the stage's output: the contents of the
    blocklist files the config names, and the source of the scorer's module."""
    files = [str(p) for p in config.harmful.blocked_domain_files
             + config.harmful.blocked_word_files]
    key: dict = {"blocklists": [file_sha256(p) for p in files]}
    if config.harmful.scorer:
        module = sys.modules.get(config.harmful.scorer.split(":")[0])
        source = getattr(module, "__file__", None)
        key["scorer"] = file_sha256(source) if source else config.harmful.scorer
    return key
